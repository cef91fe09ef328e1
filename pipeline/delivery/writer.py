"""Writes a part of a batch to one sink until every record is taken or refused for good: retries, bisection, dead
letters. One `SinkWriter` serves all of a sink's lanes; each call runs on the lane that owns the records.

Three failure shapes, three answers:
- the destination is down: the whole write fails with a retryable error, or every record of it comes back
  retryable (a replica whose every PutItem timed out). Retry, with back-off, for as long as the outage lasts (or
  until the batch's oldest record is `retry.max_record_age_seconds` old). Nothing is dead-lettered and nothing
  skipped; the queue fills, readers wait, lag grows.
- some records come back retryable while the destination took others in the same write (throttled entries):
  retry only those; an attempt in which the destination took some of the write counts towards
  `retry.max_attempts` for the rest, after which they are dead-lettered.
- a permanent error: bisect the batch (as Lambda's BisectBatchOnFunctionError does) until the records that fail
  are isolated; deliver the rest, dead-letter those.
With `on_failure = "block"`, a record that would be dead-lettered stops the pipeline instead, before anything after
it on its lane (so no later change of the same item) is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import tenacity

from pipeline.delivery.dead_letter import DeadLetters
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy
from sinks.base import PermanentSinkError, RetryableSinkError, Sink, SinkError

log = logging.getLogger(__name__)


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


class SinkWriter:
    def __init__(
        self,
        sink: Sink,
        *,
        retry: RetryPolicy,
        dead_letters: DeadLetters,
        on_failure: str,
        stats: DeliveryStats,
    ) -> None:
        self.sink = sink
        self._retry = retry
        self._dead_letters = dead_letters
        self._on_failure = on_failure
        self._stats = stats

    def write(self, batch: Batch) -> int:
        """Return once the sink has taken every record of `batch` or it has been dead-lettered: how many it took."""
        if not batch.records:
            return 0
        refused = self._isolate(batch)
        if refused:
            self.refuse(refused)
        self._stats.add(self._stats.delivered, self.sink.name, len(batch) - len(refused))
        return len(batch) - len(refused)

    def refuse(self, refused: list[tuple[ChangeRecord, SinkError]]) -> None:
        """Dead-letter refused records (durably, before the checkpoint can pass them), or stop in block mode."""
        sink = self.sink
        if self._on_failure == "block":
            record, error = refused[0]
            raise DeliveryBlockedError(
                f"sink {sink.name} refused record {record.event_id} (shard {record.shard_id}, sequence "
                f"{record.sequence_number}): {error}; on_failure = 'block' stops here"
            )
        self._dead_letters.put(sink.name, refused)
        self._stats.add(self._stats.dead_lettered, sink.name, len(refused))
        log.error(
            "sink %s refused %d record(s); dead letters in %s", sink.name, len(refused), self._dead_letters.location
        )

    def _isolate(self, batch: Batch) -> list[tuple[ChangeRecord, SinkError]]:
        try:
            return self._write(batch)
        except PermanentSinkError as error:
            if len(batch) == 1:
                if self._on_failure == "block":
                    self.refuse([(batch.records[0], error)])  # stop before the rest of the batch is written
                return [(batch.records[0], error)]
            half = len(batch) // 2
            log.warning("sink %s refused a batch of %d (%s); bisecting", self.sink.name, len(batch), error)
            return self._isolate(subset(batch.records[:half])) + self._isolate(subset(batch.records[half:]))

    def _write(self, batch: Batch) -> list[tuple[ChangeRecord, SinkError]]:
        """Write with retries; return the records refused for good. Raises PermanentSinkError for the batch."""
        sink = self.sink
        refused: list[tuple[ChangeRecord, SinkError]] = []
        pending = batch
        record_attempts = 0
        max_age = self._retry.settings.max_record_age_seconds
        oldest = min(r.approximate_creation_time for r in batch.records)

        def give_up(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _RecordsRetryable):
                return record_attempts >= self._retry.settings.max_attempts
            return max_age is not None and (datetime.now(UTC) - oldest).total_seconds() >= max_age

        try:
            for attempt in self._retry.retrying(f"write to sink {sink.name}", stop=give_up):
                with attempt:
                    try:
                        result = sink.write(pending)
                    except Exception as failure:
                        self._stats.failed(sink.name, failure)
                        raise
                    again: list[ChangeRecord] = []
                    last: SinkError | None = None
                    answered = 0
                    for record in pending.records:
                        error = result.failed.get(record.event_id)
                        if isinstance(error, RetryableSinkError):
                            again.append(record)
                            last = error
                        elif error is not None:
                            refused.append((record, error))
                            answered += 1
                        else:
                            answered += 1
                    if not again:
                        self._stats.succeeded(sink.name)
                    else:
                        pending = subset(again)
                        hint = getattr(last, "retry_after", None)
                        self._stats.failed(sink.name, last or RetryableSinkError("not taken"))
                        if answered == 0:
                            raise _Unreachable(f"every record of the write failed: {last}", retry_after=hint)
                        record_attempts += 1  # the destination answered for some: limits apply to the rest
                        raise _RecordsRetryable(f"{len(again)} record(s) not taken: {last}", retry_after=hint)
        except RetryableSinkError as exhausted:
            final = RetryableSinkError(f"still failing after retries: {exhausted}", detail=exhausted.detail)
            refused.extend((record, final) for record in pending.records)
        return refused


def subset(records: Sequence[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))
