"""A sink's lanes: up to `max_concurrency` threads, each writing its share of every batch, one call at a time.

Latency must not set the throughput. Against AWS every call waits a round trip (20-50 ms in a region), and a sink
that makes one call at a time delivers a few hundred records a second however fast the pipeline is. So each batch
is split across the sink's lanes and the lanes write at once: N lanes keep N calls in flight.

Order is kept where it is promised, and only there:
- ordering "key" (FIFO queues and topics, the replica): an item always goes to the same lane, and a lane writes
  its parts one after another, retries and bisection included, so an item's next change never overtakes its
  previous one. A hot item slows its own lane, not the others.
- ordering "any" (standard queues and topics, which do not order): records go to the lanes in chunks of the
  sink's call size, round-robin, so every lane's calls are full.
A sink may limit its lanes (the archive buffers rows per shard in stream order: one lane).

Threads, not asyncio: the sinks and their clients (botocore, s3fs through its sync API, pyarrow) are blocking, and
botocore clients are thread-safe; a lane is a thread that waits on the network most of the time. Lane threads
start when first given work, so a sink with few items in flight runs few threads.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.delivery.writer import SinkWriter, subset
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import ShutdownInterruptedError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Part:
    batch: Batch
    done: Callable[[int], None]


class SinkLanes:
    def __init__(
        self,
        writer: SinkWriter,
        *,
        concurrency: int,
        on_error: Callable[[BaseException], None],
    ) -> None:
        sink = writer.sink
        limit = sink.concurrency_limit
        self.concurrency = max(1, min(concurrency, limit) if limit is not None else concurrency)
        self._writer = writer
        # Block mode keeps an item on one lane whatever the destination orders: its sink holds back the item's
        # later changes behind a refusal, so the pipeline stops before any of them is written.
        self._keyed = sink.ordering == "key" or writer.blocks
        self._chunk = max(1, sink.call_size)
        self._on_error = on_error
        self._queues: list[queue.SimpleQueue[_Part | None]] = []
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._writing = 0
        self._round_robin = itertools.count()

    @property
    def name(self) -> str:
        return self._writer.sink.name

    @property
    def busy(self) -> bool:
        """A write is in progress, or parts wait that will be written: not safe to close the sink. After a stop,
        waiting parts are never written."""
        with self._lock:
            return self._writing > 0 or (self._outstanding > 0 and not self._stopped.is_set())

    def submit(self, batch: Batch, expect: Callable[[int], None], done: Callable[[int], None]) -> None:
        """Hand `batch` to the lanes. `expect(n)` is told how many parts there are before any is handed out (a
        part may be written before the next is queued); `done(taken)` is called once per part written, with how
        many of its records the sink took (the others were dead-lettered). After a stop the batch is taken as one
        part that is never written, so its ticket never completes."""
        if not batch.records:
            return
        parts = self._split(batch.records)
        with self._lock:  # against stop(): no part is queued behind a lane's end-of-work mark
            if self._stopped.is_set():
                expect(1)
                return
            expect(len(parts))
            self._outstanding += len(parts)
            for lane, records in parts.items():
                self._lane(lane).put(_Part(subset(records), done))

    def stop(self) -> None:
        """No more writes: parts not yet started are dropped (their batches never complete, so no checkpoint
        passes them); a write in progress starts no further call, or is cut short by a hard stop."""
        with self._lock:
            self._stopped.set()
            for lane in self._queues:
                lane.put(None)

    def _split(self, records: tuple[ChangeRecord, ...]) -> dict[int, list[ChangeRecord]]:
        lanes = self.concurrency
        if lanes == 1:
            return {0: list(records)}
        parts: dict[int, list[ChangeRecord]] = {}
        if self._keyed:
            for record in records:
                parts.setdefault(lane_of(record, lanes), []).append(record)
            return parts
        for start in range(0, len(records), self._chunk):
            lane = next(self._round_robin) % lanes
            parts.setdefault(lane, []).extend(records[start : start + self._chunk])
        return parts

    def _lane(self, index: int) -> queue.SimpleQueue[_Part | None]:
        while len(self._queues) <= index:
            work: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._run, args=(work,), name=f"{self.name}-lane-{len(self._queues)}", daemon=True
            )
            self._queues.append(work)
            thread.start()
        return self._queues[index]

    def _run(self, work: queue.SimpleQueue[_Part | None]) -> None:
        while (part := work.get()) is not None:
            with self._lock:
                start = not self._stopped.is_set()
                self._writing += start
            try:
                if start:
                    part.done(self._writer.write(part.batch, self._stopped))
            except ShutdownInterruptedError:
                self.stop()
            except BaseException as error:
                self._on_error(error)  # records the error before any other sink can see this one stopped
                self.stop()
            finally:
                with self._lock:
                    self._outstanding -= 1
                    self._writing -= start


def lane_of(record: ChangeRecord, lanes: int) -> int:
    """The lane an item's changes all go to (`ChangeRecord.item_key`)."""
    return hash(record.item_key) % lanes
