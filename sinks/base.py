"""The sink contract: what every destination implements, and what the pipeline promises in return.

Who calls what, and when (all calls come from the pipeline's single delivery thread, never concurrently):

- `open()` once, before the first write. Create clients, check the destination exists. Raising here stops
  start-up with the error shown to the operator.
- `write(batch)` once per batch, in stream order per shard. Return a `WriteResult`: records not named in
  `failed` are *taken*, meaning durably written, or buffered by the sink and made durable by the next `flush()`.
  Report per-record refusals in `failed` instead of raising, so only those records are retried. Raising a
  `RetryableSinkError` or `PermanentSinkError` means the whole batch failed.
- `flush_due(now)` after each write: may the pipeline flush and checkpoint now? A sink that buffers (the
  Parquet archive) answers True when its buffer is big or old enough; sinks that write through answer True.
- `flush()` before every checkpoint: make everything taken so far durable. If it raises, the checkpoint is not
  written and the pipeline retries the flush.
- `close()` once at shutdown, after the final flush.

Sinks know nothing of queues, batching, retries or checkpoints; the pipeline owns all of those. Constructors do
no I/O, so building a sink from a config cannot fail on the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import RetryableError
from pipeline.records import Batch

ClientFactory = Callable[..., Any]
"""`factory(service_name, region=None, endpoint_url=None)` -> a boto3 client configured for this pipeline."""


class SinkError(Exception):
    """Base of the two error kinds every sink maps its client errors into."""


class RetryableSinkError(SinkError, RetryableError):
    """Throttling, 5xx, timeouts: trying again later may succeed. `retry_after` is a hint in seconds."""


class PermanentSinkError(SinkError):
    """Validation, too large, access denied: the same write will fail again."""


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

    def flush_due(self, now: float) -> bool:
        """True when the pipeline may flush and checkpoint now (`now` is `time.monotonic()`)."""
        return True

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make every record taken so far durable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients. Called after the final flush."""
