"""What one sink is given: the records its `filter` admits, passed through its `record_transform`, then cut down
to its `project` attributes, in that order.

The filter sees whole records, so it can test attributes a projection later removes. These keys belong to every
`[[sinks]]` entry, but not to the sink: a sink only writes what it is given, so `SinkFeedSettings` is joined to
each sink's own settings by the registry (`sinks.registry`), and the delivery driver applies the feed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from pipeline.delivery.filters import ADMIT_ALL, AttributeName, FilterSettings, RecordFilter, compile_filter
from pipeline.delivery.transforms import (
    RecordTransform,
    TransformError,
    TransformReference,
    apply_transform,
    project,
    resolve_record_transform,
)
from pipeline.records import Batch, ChangeRecord


class SinkFeedSettings(BaseModel):
    """The keys every `[[sinks]]` entry has for choosing and shaping what that sink gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: FilterSettings = Field(
        default_factory=FilterSettings,
        description="Which records this sink gets, after the pipeline-wide [filter]; unset: all of them.",
    )
    record_transform: TransformReference | None = Field(
        default=None,
        description="'package.module:function' called with each admitted ChangeRecord; returns the ChangeRecord "
        "to deliver, or None to drop it for this sink. Applied by the pipeline, after `filter`.",
    )
    project: list[AttributeName] | None = Field(
        default=None,
        min_length=1,
        description="Keep only these attributes (and the key attributes) in the images; after record_transform.",
    )
    initial_load: bool | None = Field(
        default=None,
        description="Whether this sink gets an initial load's SNAPSHOT records (source.initial_load). Unset: the "
        "sink's default: the archive and a replica table do, queues and topics do not (downstream teams usually "
        "want changes only).",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Calls in flight to this destination at once (lanes; one item's changes always on one lane, "
        "in order). Unset: the sink's default (sqs and sns 16, dynamodb_table 32, s3_parquet 1: the archive "
        "buffers in stream order; see its upload_concurrency).",
    )


@dataclass(frozen=True, slots=True)
class Prepared:
    """One batch as one sink is to get it, and what happened to the rest."""

    batch: Batch
    filtered: int
    """Records the filter did not admit, or the transform dropped: not failures, and never retried."""
    failed: tuple[tuple[ChangeRecord, TransformError], ...]
    """Records (as they came in) whose transform failed: refused for this sink, like a sink's own refusal."""
    left_out: tuple[ChangeRecord, ...] = ()
    """The records counted in `filtered`, as they came in: this sink is done with them (a caller that must know
    which records every sink has handled, such as the Lambda handler, counts them as taken)."""


@dataclass(frozen=True, slots=True)
class SinkFeed:
    """A sink's filter, transform and projection, resolved once when the pipeline is built."""

    record_filter: RecordFilter = ADMIT_ALL
    transform: RecordTransform | None = None
    keep: frozenset[str] | None = None
    snapshots: bool = True
    """Whether SNAPSHOT records (an initial load's items) are given to the sink."""

    @classmethod
    def of(cls, settings: SinkFeedSettings, *, snapshots_by_default: bool = True) -> SinkFeed:
        return cls(
            compile_filter(settings.filter),
            None if settings.record_transform is None else resolve_record_transform(settings.record_transform),
            None if settings.project is None else frozenset(settings.project),
            snapshots_by_default if settings.initial_load is None else settings.initial_load,
        )

    def prepare(self, batch: Batch) -> Prepared:
        if self.record_filter.admits_all and self.transform is None and self.keep is None and self.snapshots:
            return Prepared(batch, 0, ())
        given: list[ChangeRecord] = []
        left_out: list[ChangeRecord] = []
        failed: list[tuple[ChangeRecord, TransformError]] = []
        for record in batch.records:
            if (record.load_id is not None and not self.snapshots) or not self.record_filter.admits(record):
                left_out.append(record)
                continue
            shaped: ChangeRecord | None = record
            if self.transform is not None:
                try:
                    shaped = apply_transform(self.transform, record)
                except TransformError as error:
                    failed.append((record, error))
                    continue
            if shaped is None:
                left_out.append(record)
                continue
            given.append(shaped if self.keep is None else project(shaped, self.keep))
        return Prepared(
            Batch(tuple(given), sum(r.size_bytes for r in given)), len(left_out), tuple(failed), tuple(left_out)
        )
