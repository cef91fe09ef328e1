"""The sink contract: what every destination implements, and what the pipeline promises in return.

Who calls what, and when:

- `open()` once, before the first write. Create clients, check the destination exists. Raising here stops
  start-up with the error shown to the operator.
- `write(batch)` once per part of a batch, from up to `max_concurrency` lanes at once (threads; see
  `pipeline.delivery.lanes`). With `ordering = "key"` an item's records always come from the same lane, in stream
  order, and the next part of a lane comes only after the previous one is written; with `"any"` records of one
  item may be written concurrently. Return a `WriteResult`: records not named in `failed` are *taken*, meaning
  durably written, or buffered by the sink and made durable by the next `flush()`. Report per-record refusals in
  `failed` instead of raising, so only those records are retried. Raising a `RetryableSinkError` or
  `PermanentSinkError` means the whole part failed.
- `flush_due(now)` after each write: may the pipeline flush and checkpoint now? A sink that buffers (the
  Parquet archive) answers True when its buffer is big or old enough; sinks that write through answer True.
  `buffer_full()`: the buffer is past its byte limit, so it must be flushed now whatever the other sinks say.
  `max_buffer_seconds`: the longest a taken record may wait for a flush (health allows for it).
- `flush()` before every checkpoint, from the pipeline's delivery thread, possibly while lanes are writing: make
  everything taken so far durable (a sink that buffers guards its buffer with a lock). If it raises, the
  checkpoint is not written and the pipeline retries the flush.
- `close()` once at shutdown, after the final flush.
- With an initial load (`source.initial_load`): `begin_initial_load(load_id)` before the first write while the
  load is under way, `end_initial_load(load_id)` once every SNAPSHOT record is durably taken, and
  `clean_up_initial_load(load_id)` once no write from before that can still be in flight. SNAPSHOT records
  (`event_name == "SNAPSHOT"`) are items as the load read them; a stream change of the same item always wins
  over one, in whatever order the two arrive.

Sinks know nothing of queues, batching, retries or checkpoints; the pipeline owns all of those. Constructors do
no I/O, so building a sink from a config cannot fail on the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import RetryableError
from pipeline.records import Batch


class SinkError(Exception):
    """Base of the two error kinds every sink maps its client errors into.

    `str(error)` goes to logs, `/healthz` and the console, so it names the destination, the record and the
    service's error code, never an item value. `detail` is the service's (or user code's) own wording, which can
    quote values (`Unsupported type ... for value ...`): it is written only to the dead-letter destination,
    beside the record it is about.
    """

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail

    def full_text(self) -> str:
        """The message and the detail, for the dead-letter destination only."""
        return f"{self}: {self.detail}" if self.detail else str(self)


class RetryableSinkError(SinkError, RetryableError):
    """Throttling, 5xx, timeouts: trying again later may succeed. `retry_after` is a hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, detail: str | None = None) -> None:
        SinkError.__init__(self, message, detail=detail)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """Validation, too large: the same write will fail again."""


class DestinationUnusableError(SinkError):
    """The destination itself is gone or refuses these credentials (no such queue, topic or table; access
    denied for the call): no record can be delivered, and dead-lettering the whole stream would only move the
    problem. The pipeline stops naming it, without checkpointing past what it did not take."""


class NotAttemptedError(RetryableSinkError):
    """The record was not sent: it waits behind an earlier change of its item that failed in the same write, or
    behind a call that failed as a whole. Nothing is known against it, so it is written again at once and never
    counted against `retry.max_attempts`."""


class CallRefusedError(PermanentSinkError):
    """The call carrying this record was refused as a whole after other calls of the same write were taken, so
    which of its records caused it is unknown: the pipeline bisects those records to find out."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Per-record outcome of one write. Keys of `failed` are event ids; partial failure is data, not an error."""

    failed: Mapping[str, SinkError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class SinkSettings(BaseModel):
    """Fields every sink config has. Subclasses add a `type` literal, which is the registry key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(default=None, description="Label in logs and dead letters; defaults to the type.")
    region: str | None = Field(default=None, description="Defaults to source.region.")
    endpoint_url: str | None = Field(default=None, description="Defaults to source.endpoint_url.")


class Sink(ABC):
    """A destination for batches. See the module docstring for the calling contract."""

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire clients and check the destination. May do I/O."""

    @abstractmethod
    def write(self, batch: Batch) -> WriteResult:
        """Take a batch; report refused records in the result."""

    ordering: Literal["key", "any"] = "key"
    """"key": an item's records in stream order, on one lane (a FIFO destination, a replica). "any": no order
    between records (a standard queue or topic), so records are spread evenly over the lanes."""
    default_concurrency: int = 1
    """Lanes (calls in flight) when the config does not say; enough to hide a 20-50 ms round trip."""
    concurrency_limit: int | None = None
    """The most lanes this sink can take (the archive keeps one buffer in stream order: 1)."""
    call_size: int = 1
    """Records per call to the destination, so that "any" lanes get whole calls."""

    takes_snapshots: bool = True
    """Whether the sink gets an initial load's SNAPSHOT records unless its `initial_load` setting says otherwise
    (queues and topics: no, their consumers usually want changes only)."""

    def begin_initial_load(self, load_id: str) -> None:  # noqa: B027 - optional hook
        """An initial load is under way: until `end_initial_load`, SNAPSHOT records of `load_id` may arrive after
        stream changes of the same item made later (a replica keeps tombstones for deletes). No I/O."""

    def end_initial_load(self, load_id: str) -> None:  # noqa: B027 - optional hook
        """Every SNAPSHOT record of `load_id` has been taken and flushed: none arrives any more. No I/O."""

    def clean_up_initial_load(self, load_id: str) -> int:
        """Remove what the load needed only while it ran (a replica's tombstones); called once no write made
        before `end_initial_load` can still be in flight, by any worker. Returns how many it removed. May do
        I/O; raise `SinkError` (a retryable one is retried)."""
        return 0

    def flush_due(self, now: float) -> bool:
        """True when the pipeline may flush and checkpoint now (`now` is `time.monotonic()`)."""
        return True

    def buffer_full(self) -> bool:
        """True when the buffer is past its byte limit: flush now, even if other sinks are not due."""
        return False

    @property
    def max_buffer_seconds(self) -> float:
        """The longest a taken record waits in this sink's buffer before `flush_due` asks for a flush."""
        return 0.0

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make every record taken so far durable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients. Called after the final flush."""
