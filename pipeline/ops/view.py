"""What the operator tools (metrics, health, the status line) read of a running pipeline.

A protocol the runner implements, so that these tools never import the runner: the arrows point from the runner
to them, never back.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.delivery.batcher import BoundedQueue
from pipeline.delivery.driver import Delivery
from pipeline.settings import Settings
from pipeline.source.scheduler import PollScheduler
from pipeline.state.checkpoint import CheckpointStore
from pipeline.state.load_progress import LoadReport
from sinks.base import Sink


@dataclass
class PipelineStats:
    """Plain counters the pipeline keeps on its hot paths; metrics read them when scraped."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    records_read: int = 0
    filtered: int = 0
    """Records the pipeline-wide [filter] dropped; their positions are checkpointed like delivered ones."""
    checkpoints_written: int = 0
    checkpointed: int = 0
    """Records read whose positions checkpoints cover (delivered, dead-lettered or filtered): never read again."""
    delivered_by_sink: collections.Counter[str] = field(default_factory=collections.Counter)
    """Per sink: records it took, made durable, and a checkpoint covers: what a restart will not send again."""
    buffered: int = 0
    """Records every sink has taken that wait for a flush and the checkpoint after it: a buffering sink (the
    archive) holds them until its buffer is due; a restart before then reads them again."""
    committed: dict[str, str] = field(default_factory=dict)
    """Shard -> the last committed sequence number, for shards the stream still lists or that are being read."""
    shards_finished: int = 0
    aged_out_skips: int = 0
    lease_events: collections.Counter[str] = field(default_factory=collections.Counter)
    """Leases taken (free or expired), stolen (from a worker above its share), lost, released."""
    live_workers: int = 1
    """Workers of this consumer alive as this one last saw them, itself included."""
    leases_held: int = 0
    """Shards that aged out of the stream unread and were skipped (source.on_trimmed_data = skip_to_trim_horizon)."""


class LoadView(Protocol):
    """What the tools read of an initial load under way."""

    def report(self) -> LoadReport | None: ...


class PipelineView(Protocol):
    """The parts of a running pipeline the operator tools read. Every attribute is safe to read from any thread."""

    @property
    def settings(self) -> Settings: ...

    @property
    def stats(self) -> PipelineStats: ...

    @property
    def fatal(self) -> BaseException | None: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def scheduler(self) -> PollScheduler: ...

    @property
    def queue(self) -> BoundedQueue: ...

    @property
    def delivery(self) -> Delivery: ...

    @property
    def sinks(self) -> Sequence[Sink]: ...

    @property
    def store(self) -> CheckpointStore | None: ...

    @property
    def discovery_failing_since(self) -> float | None:
        """Wall-clock time since which DescribeStream has been failing, or None."""

    @property
    def discovery_error(self) -> str | None: ...

    @property
    def heartbeat_failing_since(self) -> float | None:
        """Wall-clock time since which this worker's heartbeats have been failing, or None."""

    @property
    def reading_nothing_since(self) -> float | None:
        """Wall-clock time since which no shard has been read while the stream has unfinished shards, or None."""

    @property
    def initial_load(self) -> LoadView | None:
        """The initial load this pipeline runs or joined (`source.initial_load`), or None."""
