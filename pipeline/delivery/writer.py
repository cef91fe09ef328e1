"""Writes a part of a batch to one sink until every record is taken or refused for good: retries, bisection, dead
letters. One `SinkWriter` serves all of a sink's lanes; each call runs on the lane that owns the records.

Three failure shapes, three answers:
- the destination is down: the whole write fails with a retryable error, or every record of it comes back
  retryable (a replica whose every PutItem timed out). Retry, with back-off, for as long as the outage lasts (or
  until the batch's oldest record is `retry.max_record_age_seconds` old). Nothing is dead-lettered and nothing
  skipped; the queue fills, readers wait, lag grows.
- some records come back retryable while the destination took others in the same write (throttled entries):
  retry only those. A record that failed so `retry.max_attempts` times is dead-lettered; records the sink did
  not send (held back behind an earlier change of their item, or behind a call that failed as a whole) are
  written again at once and never counted.
- a permanent error: bisect the batch (as Lambda's BisectBatchOnFunctionError does) until the records that fail
  are isolated; deliver the rest, dead-letter those. A call refused as a whole after others of the write were
  taken is bisected the same way, without sending again what was taken.
With `on_failure = "block"`, a record that would be dead-lettered stops the pipeline instead, as soon as it is
known: the sinks hold back the item's later changes in that write, so none of them is written.

`on_handled(sink, records)`, when given, hears of records as the sink is done with them: taken by a call (durable,
or buffered until the sink's next flush) or durably dead-lettered. A caller that must say exactly which records a
write that did not finish left behind (the Lambda handler's batchItemFailures) keeps track with it; the counts
alone cannot say which.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import tenacity

from pipeline.delivery.dead_letter import DeadLetters
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy, ShutdownInterruptedError
from sinks.base import (
    CallRefusedError,
    DestinationUnusableError,
    NotAttemptedError,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkError,
)

log = logging.getLogger(__name__)

Handled = Callable[[str, Sequence[ChangeRecord]], None]
"""Told a sink's name and records it is done with (taken, dead-lettered, or left out by its feed)."""


class DeliveryBlockedError(Exception):
    """A sink refused a record and the pipeline is configured to stop rather than skip it."""


@dataclass
class DeliveryStats:
    """Counters per sink, updated from every lane; read by metrics and the status line."""

    delivered: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    """Per sink: records its filter or record_transform chose not to deliver (not failures)."""
    batches: int = 0
    failing_since: dict[str, float] = field(default_factory=dict)
    """Per sink: the wall-clock time since which its writes or flushes have kept failing, while they do."""
    last_error: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, counter: dict[str, int], sink: str, count: int) -> None:
        with self._lock:
            counter[sink] = counter.get(sink, 0) + count

    def failed(self, sink: str, error: BaseException) -> None:
        with self._lock:
            self.failing_since.setdefault(sink, time.time())
            self.last_error[sink] = str(error)

    def succeeded(self, sink: str) -> None:
        with self._lock:
            self.failing_since.pop(sink, None)
            self.last_error.pop(sink, None)


class _RecordsRetryable(RetryableSinkError):
    """Some records of a write came back retryable while others were taken; only they are written again."""


class _Unreachable(RetryableSinkError):
    """Every record of a write came back retryable: the destination is down, whatever it said per record."""


@dataclass
class _WriteState:
    """One part's write across its attempts."""

    pending: Batch
    refused: list[tuple[ChangeRecord, SinkError]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    """Per event id: attempts in which the record itself failed retryably while the destination took others."""
    answered_any: bool = False
    """The destination took or refused some record: from then on a refusal of the rest is not the whole part's."""


class SinkWriter:
    def __init__(
        self,
        sink: Sink,
        *,
        retry: RetryPolicy,
        dead_letters: DeadLetters,
        on_failure: str,
        stats: DeliveryStats,
        on_handled: Handled | None = None,
    ) -> None:
        self.sink = sink
        self._retry = retry
        self._dead_letters = dead_letters
        self._on_failure = on_failure
        self._stats = stats
        self._on_handled = on_handled

    @property
    def blocks(self) -> bool:
        """A refusal stops the pipeline (`on_failure = "block"`) instead of being dead-lettered."""
        return self._on_failure == "block"

    def write(self, batch: Batch, stopped: threading.Event | None = None) -> int:
        """Return once the sink has taken every record of `batch` or it has been dead-lettered: how many it took.
        Once `stopped` is set, no further call is started: ShutdownInterruptedError, and the part stays
        unwritten."""
        if not batch.records:
            return 0
        refused = self._isolate(batch, stopped)
        if refused:
            self.refuse(refused)
        taken = len(batch) - len(refused)
        self._stats.add(self._stats.delivered, self.sink.name, taken)
        return taken

    def refuse(self, refused: list[tuple[ChangeRecord, SinkError]]) -> None:
        """Dead-letter refused records (durably, before the checkpoint can pass them), or stop in block mode."""
        sink = self.sink
        if self.blocks:
            record, error = refused[0]
            raise DeliveryBlockedError(
                f"sink {sink.name} refused record {record.event_id} (shard {record.shard_id}, sequence "
                f"{record.sequence_number}): {error}; on_failure = 'block' stops here"
            )
        self._dead_letters.put(sink.name, refused)
        self._stats.add(self._stats.dead_lettered, sink.name, len(refused))
        self._handled([record for record, _ in refused])
        log.error(
            "sink %s refused %d record(s); dead letters in %s", sink.name, len(refused), self._dead_letters.location
        )

    def _handled(self, records: Sequence[ChangeRecord]) -> None:
        if self._on_handled is not None and records:
            self._on_handled(self.sink.name, records)

    def _isolate(self, batch: Batch, stopped: threading.Event | None) -> list[tuple[ChangeRecord, SinkError]]:
        try:
            return self._write(batch, stopped)
        except PermanentSinkError as error:
            if len(batch) == 1:
                if self.blocks:
                    self.refuse([(batch.records[0], error)])  # stop before the rest of the batch is written
                return [(batch.records[0], error)]
            half = len(batch) // 2
            log.warning("sink %s refused a batch of %d (%s); bisecting", self.sink.name, len(batch), error)
            return self._isolate(subset(batch.records[:half]), stopped) + self._isolate(
                subset(batch.records[half:]), stopped
            )

    def _write(self, batch: Batch, stopped: threading.Event | None) -> list[tuple[ChangeRecord, SinkError]]:
        """Write with retries; return the records refused for good. Raises PermanentSinkError for the batch
        when the destination refused it as a whole before taking any of it."""
        state = _WriteState(batch)
        max_age = self._retry.settings.max_record_age_seconds
        oldest = min(r.approximate_creation_time for r in batch.records)

        def give_up(_: tenacity.RetryCallState) -> bool:
            return max_age is not None and (datetime.now(UTC) - oldest).total_seconds() >= max_age

        try:
            for attempt in self._retry.retrying(f"write to sink {self.sink.name}", stop=give_up):
                with attempt:
                    self._attempt(state, stopped)
        except RetryableSinkError as exhausted:
            final = RetryableSinkError(f"still failing after retries: {exhausted}", detail=exhausted.detail)
            state.refused.extend((record, final) for record in state.pending.records)
        return state.refused

    def _attempt(self, state: _WriteState, stopped: threading.Event | None) -> None:
        """Write what is pending; records only held back are written again at once. Raises a RetryableSinkError
        when some record failed retryably, leaving it (and what waits behind it) in `state.pending`."""
        sink = self.sink
        max_attempts = self._retry.settings.max_attempts
        while state.pending.records:
            if stopped is not None and stopped.is_set():
                raise ShutdownInterruptedError(f"write to sink {sink.name}: the delivery stopped")
            try:
                result = sink.write(state.pending)
            except PermanentSinkError as failure:
                self._stats.failed(sink.name, failure)
                if not state.answered_any:
                    raise  # nothing of it taken yet: the caller bisects
                whole, state.pending = state.pending, subset(())
                state.refused.extend(self._isolate(whole, stopped))
                return
            except Exception as failure:
                self._stats.failed(sink.name, failure)
                raise
            again: list[ChangeRecord] = []
            suspects: list[ChangeRecord] = []
            failed_itself: list[str] = []
            last: RetryableSinkError | None = None
            answered = 0
            took: list[ChangeRecord] = []
            for record in state.pending.records:
                error = result.failed.get(record.event_id)
                if error is None:
                    answered += 1
                    took.append(record)
                elif isinstance(error, DestinationUnusableError):
                    self._stats.failed(sink.name, error)
                    raise error  # stops the pipeline: no record of this sink can be delivered
                elif isinstance(error, NotAttemptedError):
                    again.append(record)
                elif isinstance(error, RetryableSinkError):
                    again.append(record)
                    failed_itself.append(record.event_id)
                    last = error
                elif isinstance(error, CallRefusedError):
                    suspects.append(record)
                    answered += 1
                else:
                    state.refused.append((record, error))
                    answered += 1
            self._handled(took)
            state.answered_any = state.answered_any or answered > 0
            if suspects:
                state.refused.extend(self._isolate(subset(suspects), stopped))
            if state.refused and self.blocks:
                self.refuse(state.refused)  # raises before any later change of the refused item is written
            state.pending = subset(again)
            if not again:
                self._stats.succeeded(sink.name)
                return
            if answered == 0:
                self._stats.failed(sink.name, last or RetryableSinkError("nothing taken"))
                hint = last.retry_after if last is not None else None
                raise _Unreachable(f"every record of the write failed: {last or 'nothing taken'}", retry_after=hint)
            if last is None:
                continue  # only records held back behind ones now taken or refused: write them at once
            self._stats.failed(sink.name, last)
            for event_id in failed_itself:  # the destination answered for others: limits apply to these
                state.failures[event_id] = state.failures.get(event_id, 0) + 1
            exhausted = [r for r in again if state.failures.get(r.event_id, 0) >= max_attempts]
            if exhausted:
                final = RetryableSinkError(f"still failing after {max_attempts} attempts: {last}", detail=last.detail)
                state.refused.extend((record, final) for record in exhausted)
                if self.blocks:
                    self.refuse(state.refused)
                gone = {r.event_id for r in exhausted}
                state.pending = subset([r for r in again if r.event_id not in gone])
                if not state.pending.records:
                    self._stats.succeeded(sink.name)  # the write is over: what is left went to dead letters
                    return
            raise _RecordsRetryable(
                f"{len(again)} record(s) not taken: {last}",
                retry_after=last.retry_after,
            )


def subset(records: Sequence[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))
