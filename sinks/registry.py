"""Sink type name -> config entry and constructor. Adding a sink means one entry class and one line in each
table here.

A `[[sinks]]` entry is the sink's own settings joined to `SinkFeedSettings` (filter, record_transform, project):
those keys are the pipeline's business, applied before the sink sees a record, so sinks never import them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from pipeline.delivery.feed import SinkFeedSettings
from sinks.base import Sink, SinkSettings
from sinks.dynamodb_table import DynamoDbTableSink, DynamoDbTableSinkSettings
from sinks.memory import MemorySink, MemorySinkSettings
from sinks.s3_parquet import S3ParquetSink, S3ParquetSinkSettings
from sinks.sns import SnsSink, SnsSinkSettings
from sinks.sqs import SqsSink, SqsSinkSettings


class S3ParquetSinkEntry(S3ParquetSinkSettings, SinkFeedSettings):
    __doc__ = S3ParquetSinkSettings.__doc__


class SqsSinkEntry(SqsSinkSettings, SinkFeedSettings):
    __doc__ = SqsSinkSettings.__doc__


class SnsSinkEntry(SnsSinkSettings, SinkFeedSettings):
    __doc__ = SnsSinkSettings.__doc__


class DynamoDbTableSinkEntry(DynamoDbTableSinkSettings, SinkFeedSettings):
    __doc__ = DynamoDbTableSinkSettings.__doc__


class MemorySinkEntry(MemorySinkSettings, SinkFeedSettings):
    __doc__ = MemorySinkSettings.__doc__


SinkConfig = Annotated[
    S3ParquetSinkEntry | SqsSinkEntry | SnsSinkEntry | DynamoDbTableSinkEntry | MemorySinkEntry,
    Field(discriminator="type"),
]
"""The `[[sinks]]` entries of a config file: one model per sink type, chosen by `type`."""

SINK_TYPES: tuple[str, ...] = ("s3_parquet", "sqs", "sns", "dynamodb_table", "memory")


def _s3_parquet(settings: Any, region: str, endpoint_url: str | None) -> Sink:
    return S3ParquetSink(settings, region=region, endpoint_url=endpoint_url)


def _sqs(settings: Any, region: str, endpoint_url: str | None) -> Sink:
    return SqsSink(settings, region=region, endpoint_url=endpoint_url)


def _sns(settings: Any, region: str, endpoint_url: str | None) -> Sink:
    return SnsSink(settings, region=region, endpoint_url=endpoint_url)


def _dynamodb_table(settings: Any, region: str, endpoint_url: str | None) -> Sink:
    return DynamoDbTableSink(settings, region=region, endpoint_url=endpoint_url)


def _memory(settings: Any, region: str, endpoint_url: str | None) -> Sink:
    return MemorySink(settings.name or settings.type)


_BUILDERS: dict[str, Callable[[Any, str, str | None], Sink]] = {
    "s3_parquet": _s3_parquet,
    "sqs": _sqs,
    "sns": _sns,
    "dynamodb_table": _dynamodb_table,
    "memory": _memory,
}


def build_sink(settings: SinkSettings, *, region: str, endpoint_url: str | None) -> Sink:
    """Construct (not open) the sink for one `[[sinks]]` entry; AWS location defaults come from the source."""
    sink_type: str = getattr(settings, "type")  # noqa: B009 - every concrete settings class has it
    return _BUILDERS[sink_type](settings, settings.region or region, settings.endpoint_url or endpoint_url)


_SINK_CLASSES: dict[str, type[Sink]] = {
    "s3_parquet": S3ParquetSink,
    "sqs": SqsSink,
    "sns": SnsSink,
    "dynamodb_table": DynamoDbTableSink,
    "memory": MemorySink,
}


def takes_snapshots_by_default(sink_type: str) -> bool:
    """Whether a sink of this type gets an initial load's SNAPSHOT records when its entry does not say."""
    return _SINK_CLASSES[sink_type].takes_snapshots
