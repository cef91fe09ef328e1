"""Polls many shard readers with a few threads.

A thread per shard does not scale to a thousand shards, and a process per shard even less. Instead each reader
sits in a time-ordered heap; a fixed pool of workers takes the reader that is due, does one GetRecords, hands the
page to the queue and puts the reader back with its next due time: at once while it returns records, backing
off exponentially while it is idle. A reader is never in the heap twice, so one shard is polled by one worker at
a time and its pages reach the queue in order.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from pipeline.reader import ShardPage, ShardReader

log = logging.getLogger(__name__)


class PollScheduler:
    def __init__(
        self,
        *,
        workers: int,
        deliver: Callable[[ShardPage], None],
        on_shard_error: Callable[[ShardReader, BaseException], float | None],
        idle_min_seconds: float,
        idle_max_seconds: float,
    ) -> None:
        """`deliver` may block (queue full): that is the back-pressure. `on_shard_error` returns a delay
        before the shard is polled again, or None to drop the shard (the runner then decides what happens)."""
        self._workers = workers
        self._deliver = deliver
        self._on_shard_error = on_shard_error
        self._idle_min = idle_min_seconds
        self._idle_max = idle_max_seconds
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, ShardReader]] = []
        self._tie = itertools.count()
        self._active: dict[str, ShardReader] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._in_flight = 0
        self.polls = 0
        self.empty_polls = 0

    def add(self, reader: ShardReader, delay: float = 0.0) -> None:
        with self._cond:
            if reader.shard_id in self._active or self._stopping:
                return
            self._active[reader.shard_id] = reader
            self._push(reader, delay)

    def active_shard_ids(self) -> set[str]:
        with self._cond:
            return set(self._active)

    def _push(self, reader: ShardReader, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._tie), reader))
        self._cond.notify()

    def idle_delay(self, reader: ShardReader) -> float:
        if reader.empty_polls == 0:
            return 0.0
        return float(min(self._idle_max, self._idle_min * 2 ** (reader.empty_polls - 1)))

    def start(self) -> None:
        for n in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"poll-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """No new polls; wait for polls in flight (their pages still reach the queue)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _next_due(self) -> ShardReader | None:
        with self._cond:
            while not self._stopping:
                if self._heap:
                    due = self._heap[0][0] - time.monotonic()
                    if due <= 0:
                        self._in_flight += 1
                        return heapq.heappop(self._heap)[2]
                    self._cond.wait(due)
                else:
                    self._cond.wait()
            return None

    def _work(self) -> None:
        while (reader := self._next_due()) is not None:
            delay: float | None
            try:
                page = reader.poll()
                self.polls += 1
                if not page.records:
                    self.empty_polls += 1
                self._deliver(page)
                delay = None if page.end_of_shard else self.idle_delay(reader)
            except Exception as exc:
                delay = self._on_shard_error(reader, exc)
            with self._cond:
                self._in_flight -= 1
                if delay is None:
                    del self._active[reader.shard_id]
                elif not self._stopping:
                    self._push(reader, delay)
