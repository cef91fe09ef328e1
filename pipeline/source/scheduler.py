"""Polls many shard readers with a few threads.

A thread per shard does not scale to a thousand shards, and a process per shard even less. Instead each reader
sits in a time-ordered heap; a fixed pool of workers takes the reader that is due, does one GetRecords, hands the
page to the queue and puts the reader back with its next due time: at once while it returns records, backing
off exponentially while it is idle. A reader is never in the heap twice, so one shard is polled by one worker at
a time and its pages reach the queue in order.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.source.reader import ShardPage, ShardReader, creation_epoch

log = logging.getLogger(__name__)

ACTIVE_WINDOW_SECONDS = 30.0
"""A shard that returned records this recently is polled at `idle_min` pace even when a poll comes back empty."""


@dataclass
class ShardProgress:
    """What the last polls of one shard showed: the raw material of lag metrics and health checks.

    Times are wall-clock epoch seconds. Updated only by the worker polling the shard; read by scrapes.
    """

    shard_id: str
    polls: int = 0
    empty_polls: int = 0
    errors: int = 0
    last_poll_ok_at: float | None = None
    last_records_at: float | None = None
    last_record_created: float | None = None
    last_sequence_read: str | None = None
    unacked_since: float | None = None
    """When records were read that are not checkpointed yet (the oldest such read since the last checkpoint that
    covered everything read); None while everything read is checkpointed. Set here, cleared by the pipeline."""
    oldest_unacked_created: float | None = None
    """Creation time (the service's clock) of the oldest record read and not checkpointed, or a time before it;
    None with `unacked_since`. How close the shard's undelivered changes are to the stream's retention."""
    held_since: float | None = None
    """When this shard's reader began waiting at the full queue, while it waits: delivery is behind."""

    def iterator_age(self, now: float) -> float | None:
        """Now minus the creation time of the newest record read; 0 once a poll came back empty."""
        if self.last_record_created is None:
            return None
        if self.last_poll_ok_at is not None and (self.last_records_at or 0) < self.last_poll_ok_at:
            return 0.0  # the last poll found nothing newer: caught up
        return max(0.0, now - self.last_record_created)


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
        self._polling: collections.Counter[str] = collections.Counter()
        """Shards with a poll in flight: taken from the heap, page not yet handed on."""
        self.polls = 0
        self.empty_polls = 0
        self.errors = 0
        self.progress: dict[str, ShardProgress] = {}
        self._retired_trimmed_skips = 0
        self._retired_skipped_before_start = 0

    def add(self, reader: ShardReader, delay: float = 0.0) -> None:
        with self._cond:
            if reader.shard_id in self._active or self._stopping:
                return
            self._active[reader.shard_id] = reader
            self.progress.setdefault(reader.shard_id, ShardProgress(reader.shard_id))
            self._push(reader, delay)

    def remove(self, shard_id: str) -> ShardReader | None:
        """Stop polling a shard (its lease is gone or given up); returns its reader. A poll in flight finishes
        and hands its page on (`polling` says when it has); the reader is not polled again."""
        with self._cond:
            reader = self._active.pop(shard_id, None)
            if reader is None:
                return None
            self._retire(reader)
            self.progress.pop(shard_id, None)
            self._heap = [entry for entry in self._heap if entry[2] is not reader]
            heapq.heapify(self._heap)
            return reader

    def polling(self, shard_id: str) -> bool:
        """A poll of this shard is in flight (its page not yet handed on), by a reader active or removed."""
        with self._cond:
            return shard_id in self._polling

    def _retire(self, reader: ShardReader) -> None:
        self._retired_trimmed_skips += reader.trimmed_skips
        self._retired_skipped_before_start += reader.skipped_before_start

    @property
    def trimmed_skips(self) -> int:
        """Times any shard skipped past trimmed records (source.on_trimmed_data = 'skip_to_trim_horizon')."""
        with self._cond:
            return self._retired_trimmed_skips + sum(r.trimmed_skips for r in self._active.values())

    @property
    def skipped_before_start(self) -> int:
        """Records left out because they were made before the pipeline's first start (LATEST, AT_TIMESTAMP)."""
        with self._cond:
            return self._retired_skipped_before_start + sum(r.skipped_before_start for r in self._active.values())

    def active_shard_ids(self) -> set[str]:
        with self._cond:
            return set(self._active)

    def _push(self, reader: ShardReader, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._tie), reader))
        self._cond.notify()

    def next_delay(self, reader: ShardReader, page: ShardPage) -> float:
        """When to poll this shard again.

        A page that stopped at a limit (`ShardPage.at_limit`: the record limit or near the 1 MB cap) means more is
        waiting: at once. Any other page with records, or an empty one on a shard that had records in the last
        `ACTIVE_WINDOW_SECONDS`, means the shard is active: `idle_min` later (4 calls a second at the default, as
        a Lambda event source mapping polls), so a change made a moment after a poll still arrives within a
        fraction of a second. A shard quiet for longer backs off exponentially
        to `idle_max` (6 calls a minute at the default), where it costs little however many shards there are.
        """
        if page.read:
            return 0.0 if page.at_limit else self._idle_min
        progress = self.progress.get(reader.shard_id)
        last = progress.last_records_at if progress is not None else None
        if last is not None and time.time() - last < ACTIVE_WINDOW_SECONDS:
            return self._idle_min
        # The exponent is capped: a shard idle for hours must not overflow a float.
        return float(min(self._idle_max, self._idle_min * 2 ** min(reader.empty_polls - 1, 32)))

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
                        reader = heapq.heappop(self._heap)[2]
                        self._polling[reader.shard_id] += 1
                        return reader
                    self._cond.wait(due)
                else:
                    self._cond.wait()
            return None

    def _work(self) -> None:
        while (reader := self._next_due()) is not None:
            delay: float | None
            progress = self.progress.get(reader.shard_id) or ShardProgress(reader.shard_id)  # removed meanwhile
            try:
                page = reader.poll()
                self._note(progress, page)
                progress.held_since = time.time()
                try:
                    self._deliver(page)
                finally:
                    progress.held_since = None
                reader.advance(page)  # only once the page is handed on: a failure before leaves it to be read again
                delay = None if page.end_of_shard else self.next_delay(reader, page)
            except Exception as exc:
                self.errors += 1
                progress.errors += 1
                delay = self._on_shard_error(reader, exc)
            with self._cond:
                self._in_flight -= 1
                self._polling[reader.shard_id] -= 1
                if not self._polling[reader.shard_id]:
                    del self._polling[reader.shard_id]
                if self._active.get(reader.shard_id) is not reader:
                    continue  # removed while it polled
                if delay is None:
                    self._retire(reader)
                    del self._active[reader.shard_id]
                    del self.progress[reader.shard_id]
                elif not self._stopping:
                    self._push(reader, delay)

    def _note(self, progress: ShardProgress, page: ShardPage) -> None:
        now = time.time()
        self.polls += 1
        progress.polls += 1
        progress.last_poll_ok_at = now
        if not page.records:
            self.empty_polls += 1
            progress.empty_polls += 1
            return
        last = page.records[-1]["dynamodb"]
        if progress.unacked_since is None:
            progress.unacked_since = now
            progress.oldest_unacked_created = creation_epoch(
                page.records[0]["dynamodb"].get("ApproximateCreationDateTime")
            )
        progress.last_records_at = now
        progress.last_record_created = creation_epoch(last.get("ApproximateCreationDateTime"))
        progress.last_sequence_read = last["SequenceNumber"]
