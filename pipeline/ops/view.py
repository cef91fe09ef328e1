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
from sinks.base import Sink


@dataclass
class PipelineStats:
    """Plain counters the pipeline keeps on its hot paths; metrics read them when scraped."""

    events: collections.Counter[str] = field(default_factory=collections.Counter)
    records_read: int = 0
    filtered: int = 0
    """Records the pipeline-wide [filter] dropped; their positions are checkpointed like delivered ones."""
    checkpoints_written: int = 0
    committed: dict[str, str] = field(default_factory=dict)
    finished_shards: set[str] = field(default_factory=set)


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
