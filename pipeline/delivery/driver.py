"""Hands each batch to every sink at once, keeps several batches in flight, and says which are done, so that a
checkpoint can follow.

A batch goes to every sink's lanes (`pipeline.delivery.lanes`) as soon as it closes; the sinks write it in
parallel, and each sink several calls at a time. Batches complete out of order (one sink is slower, one lane has a
hot item), but they are handed back in the order they were submitted: a shard's checkpoint is the end of the
longest prefix of batches that every sink has taken (or dead-lettered), so the checkpoint never passes a record
some sink still lacks. How much is in flight is bounded (`delivery.max_records_in_flight`, `max_bytes_in_flight`):
a batch counts from its submission until it is handed back, so batches done behind a slow one still count, and it
counts every record read for it, also those the pipeline's filter dropped. When the window is full, `submit`
waits, the queue in front of it fills and the readers wait, so memory stays flat however slow a sink is.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tenacity

from pipeline.delivery.dead_letter import DeadLetters, WithheldImagesError
from pipeline.delivery.feed import SinkFeed
from pipeline.delivery.lanes import SinkLanes
from pipeline.delivery.writer import DeliveryBlockedError, DeliveryStats, Handled, SinkWriter
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy
from sinks.base import Sink, SinkError

__all__ = ["Delivery", "DeliveryBlockedError", "DeliveryStats", "Ticket"]


@dataclass(eq=False)
class Ticket:
    """One batch in flight: done once every part of it, in every sink, is written."""

    batch: Batch
    context: Any
    """What the caller attached (the runner: the positions the batch moves the checkpoint to)."""
    weight: tuple[int, int] = (0, 0)
    """Records and bytes it holds of the in-flight window, until it is handed back."""
    taken: dict[str, int] = field(default_factory=dict)
    """Per sink: how many of the batch's records it took (not those its filter left out or it dead-lettered)."""
    submitted_at: float = field(default_factory=time.monotonic)
    done_at: float | None = None
    _left: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def done(self) -> bool:
        return self.done_at is not None

    @property
    def seconds(self) -> float:
        """From submission to every sink having taken the batch."""
        return (self.done_at or time.monotonic()) - self.submitted_at

    def expect(self, parts: int) -> None:
        with self._lock:
            self._left += parts


class _Window:
    """How much is in flight, in records and bytes; a batch larger than the whole window fits into an empty one."""

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._records = 0
        self._bytes = 0
        self._cond = threading.Condition()

    def acquire(self, records: int, size: int, timeout: float | None, give_way: Callable[[], bool]) -> bool:
        """Take room for a batch; False after `timeout`, or as soon as `give_way()` holds while there is none
        (the oldest batch is done: the caller hands it back, which is what makes room)."""
        with self._cond:
            room = self._cond.wait_for(lambda: self._room(records, size) or give_way(), timeout)
            return bool(room) and self._room(records, size) and self._take(records, size)

    def _room(self, records: int, size: int) -> bool:
        return self._records == 0 or (
            self._records + records <= self._max_records and self._bytes + size <= self._max_bytes
        )

    def poke(self) -> None:
        """Something a waiting `acquire` gives way to may have changed."""
        with self._cond:
            self._cond.notify_all()

    def _take(self, records: int, size: int) -> bool:
        self._records += records
        self._bytes += size
        return True

    def release(self, records: int, size: int) -> None:
        with self._cond:
            self._records -= records
            self._bytes -= size
            self._cond.notify_all()

    @property
    def depth(self) -> tuple[int, int]:
        with self._cond:
            return self._records, self._bytes


class Delivery:
    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        retry: RetryPolicy,
        dead_letters: DeadLetters,
        on_failure: str = "dead_letter",
        feeds: Sequence[SinkFeed] | None = None,
        concurrency: Sequence[int | None] | None = None,
        max_records_in_flight: int = 20_000,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
        on_handled: Handled | None = None,
    ) -> None:
        """`on_handled(sink, records)` hears which records each sink is done with, as it is (see
        `pipeline.delivery.writer`): taken, dead-lettered, or left out by the sink's filter or record_transform."""
        self.sinks = list(sinks)
        names = [sink.name for sink in self.sinks]
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"two sinks are named {twice!r}: give each a distinct name")
        self._feeds = (
            list(feeds) if feeds is not None else [SinkFeed(snapshots=sink.takes_snapshots) for sink in self.sinks]
        )
        self._retry = retry
        self._on_failure = on_failure
        self._on_handled = on_handled
        self.stats = DeliveryStats()
        self.error: BaseException | None = None
        self._window = _Window(max_records_in_flight, max_bytes_in_flight)
        self._tickets: collections.deque[Ticket] = collections.deque()
        self._tickets_lock = threading.Lock()
        self._completed = threading.Condition()
        chosen = list(concurrency) if concurrency is not None else [None] * len(self.sinks)
        self._writers = [
            SinkWriter(
                sink,
                retry=retry,
                dead_letters=dead_letters,
                on_failure=on_failure,
                stats=self.stats,
                on_handled=on_handled,
            )
            for sink in self.sinks
        ]
        self.lanes = [
            SinkLanes(writer, concurrency=wanted or writer.sink.default_concurrency, on_error=self._lane_failed)
            for writer, wanted in zip(self._writers, chosen, strict=True)
        ]

    # -- in flight ------------------------------------------------------------------------------------------

    def submit(
        self, batch: Batch, context: Any = None, timeout: float | None = None, read: Batch | None = None
    ) -> Ticket | None:
        """Hand `batch` to every sink; None when the in-flight window stayed full for `timeout` seconds, or while
        it is full and the oldest batch is done (hand it back with `done()`, then submit again).

        `read` is what was read for it, when a filter left `batch` smaller: the window counts what was read.
        Each sink's filter, record_transform and projection run here, on the caller's thread; a record_transform
        refusal is dead-lettered here too (or, in block mode, raised before any of the batch is written)."""
        self._raise_lane_error()
        counted = read if read is not None else batch
        weight = (max(len(counted), len(batch)), max(counted.size_bytes, batch.size_bytes))
        if not self._window.acquire(*weight, timeout, give_way=self._head_done):
            return None
        ticket = Ticket(batch, context, weight=weight)
        with self._tickets_lock:
            self._tickets.append(ticket)
        prepared: list[tuple[str, SinkLanes, Batch]] = []
        try:
            for writer, lanes, feed in zip(self._writers, self.lanes, self._feeds, strict=True):
                given = feed.prepare(batch) if batch.records else None
                if given is None:
                    continue
                self.stats.add(self.stats.filtered, writer.sink.name, given.filtered)
                if self._on_handled is not None and given.left_out:
                    self._on_handled(writer.sink.name, given.left_out)
                self.stats.add(self.stats.delivered, writer.sink.name, 0)
                ticket.taken[writer.sink.name] = 0
                if given.failed:
                    untransformable: list[tuple[ChangeRecord, SinkError]] = [
                        (record, WithheldImagesError(f"sink {writer.sink.name}: {error}"))
                        for record, error in given.failed
                    ]
                    writer.refuse(untransformable)  # block mode raises before any later change is written
                prepared.append((writer.sink.name, lanes, given.batch))
        except BaseException:
            self._abandon(ticket)
            raise
        ticket.expect(1)  # held while parts are handed out, so that the ticket cannot complete before they all are
        for sink_name, lanes, given_batch in prepared:
            lanes.submit(given_batch, ticket.expect, functools.partial(self._part_done, ticket, sink_name))
        if batch.records:
            self.stats.batches += 1
        self._part_done(ticket)
        return ticket

    def done(self) -> list[Ticket]:
        """Tickets done, in submission order, from the oldest on: the prefix every sink has taken."""
        self._raise_lane_error()
        finished: list[Ticket] = []
        with self._tickets_lock:
            while self._tickets and self._tickets[0].done:
                finished.append(self._tickets.popleft())
        for ticket in finished:
            self._window.release(*ticket.weight)
        return finished

    def wait_done(self, timeout: float) -> None:
        """Wait until the oldest ticket in flight is done, or `timeout` passes."""
        with self._completed:
            self._completed.wait_for(lambda: self._head_done() or self.error is not None, timeout)

    def deliver(self, batch: Batch) -> None:
        """Submit `batch` and wait until every sink has taken it: for callers that deliver one batch at a time."""
        ticket = self.submit(batch)
        assert ticket is not None
        while not ticket.done:
            self.wait_done(0.1)
            self._raise_lane_error()
        with self._tickets_lock:
            self._tickets.remove(ticket)
        self._window.release(*ticket.weight)

    @property
    def in_flight(self) -> int:
        with self._tickets_lock:
            return len(self._tickets)

    @property
    def records_writing(self) -> int:
        """Records of batches some sink is still writing (not those done and waiting to be handed back)."""
        with self._tickets_lock:
            return sum(len(ticket.batch) for ticket in self._tickets if not ticket.done)

    @property
    def window_depth(self) -> tuple[int, int]:
        """Records and bytes the in-flight window holds: batches not yet handed back, counted as read."""
        return self._window.depth

    @property
    def busy(self) -> bool:
        """A sink may still be writing: not safe to close the sinks."""
        return any(lanes.busy for lanes in self.lanes)

    def stop(self) -> None:
        for lanes in self.lanes:
            lanes.stop()

    # -- flushing -------------------------------------------------------------------------------------------

    def flush_due(self, now: float) -> bool:
        """Flush (and checkpoint) once every sink may, or as soon as any sink's buffer is past its byte limit:
        the checkpoint needs every sink flushed, and a full buffer must not keep growing for the others."""
        return all(sink.flush_due(now) for sink in self.sinks) or any(sink.buffer_full() for sink in self.sinks)

    @property
    def max_buffer_seconds(self) -> float:
        """The longest any sink holds taken records before it asks for a flush."""
        return max((sink.max_buffer_seconds for sink in self.sinks), default=0.0)

    def flush(self) -> None:
        """Flush every sink, retrying outages until each has made its buffer durable."""
        for sink in self.sinks:
            for attempt in self._retry.retrying(f"flush of sink {sink.name}", stop=tenacity.stop_never):
                with attempt:
                    try:
                        sink.flush()
                    except Exception as error:
                        self.stats.failed(sink.name, error)
                        raise
            self.stats.succeeded(sink.name)

    # -- internals ------------------------------------------------------------------------------------------

    def _part_done(self, ticket: Ticket, sink: str | None = None, taken: int = 0) -> None:
        with ticket._lock:
            if sink is not None:
                ticket.taken[sink] += taken
            ticket._left -= 1
            if ticket._left > 0:
                return
            ticket.done_at = time.monotonic()
        self._window.poke()
        with self._completed:
            self._completed.notify_all()

    def _abandon(self, ticket: Ticket) -> None:
        with self._tickets_lock:
            self._tickets.remove(ticket)
        self._window.release(*ticket.weight)

    def _head_done(self) -> bool:
        with self._tickets_lock:
            return bool(self._tickets) and self._tickets[0].done

    def _lane_failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.stop()
        with self._completed:
            self._completed.notify_all()

    def _raise_lane_error(self) -> None:
        if self.error is not None:
            raise self.error
