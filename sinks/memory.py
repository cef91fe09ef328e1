"""In-package fakes, shipped so tests and users exercise the real pipeline without a destination."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Literal

from pipeline.records import Batch, ChangeRecord
from sinks.base import PermanentSinkError, RetryableSinkError, Sink, SinkError, SinkSettings, WriteResult


class MemorySinkSettings(SinkSettings):
    type: Literal["memory"] = "memory"


class MemorySink(Sink):
    """Keeps every taken record in a list; thread-safe to read while the pipeline runs."""

    def __init__(self, name: str = "memory") -> None:
        super().__init__(name)
        self._lock = threading.Lock()
        self._records: list[ChangeRecord] = []
        self.flushes = 0

    def write(self, batch: Batch) -> WriteResult:
        with self._lock:
            self._records.extend(batch.records)
        return WriteResult()

    def flush(self) -> None:
        self.flushes += 1

    @property
    def records(self) -> list[ChangeRecord]:
        with self._lock:
            return list(self._records)


class FlakySink(MemorySink):
    """Refuses chosen records: `refuse(record)` returns an error to report for it, or None to take it.

    With `fail_writes=N`, the first N writes raise a retryable error for the whole batch.
    """

    def __init__(
        self,
        name: str = "flaky",
        *,
        refuse: Callable[[ChangeRecord], SinkError | None] = lambda _r: None,
        fail_writes: int = 0,
    ) -> None:
        super().__init__(name)
        self._refuse = refuse
        self._fail_writes = fail_writes
        self.attempts = 0

    def write(self, batch: Batch) -> WriteResult:
        self.attempts += 1
        if self.attempts <= self._fail_writes:
            raise RetryableSinkError(f"simulated outage (write {self.attempts} of {self._fail_writes})")
        failed: dict[str, SinkError] = {}
        taken: list[ChangeRecord] = []
        for record in batch.records:
            error = self._refuse(record)
            if error is None:
                taken.append(record)
            else:
                failed[record.event_id] = error
        super().write(Batch(tuple(taken), sum(r.size_bytes for r in taken)))
        return WriteResult(failed=failed)


def refuse_event_ids(event_ids: Iterable[str], reason: str = "refused") -> Callable[[ChangeRecord], SinkError | None]:
    """A `refuse` function for FlakySink that permanently refuses the given records."""
    wanted = frozenset(event_ids)
    return lambda record: PermanentSinkError(reason) if record.event_id in wanted else None
