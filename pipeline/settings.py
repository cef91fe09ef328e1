"""Configuration: one TOML file, overridable by `STREAMSINK_<SECTION>__<KEY>` environment variables.

Every model forbids unknown keys, so a typo is an error that names the key instead of a silently ignored line.
`load_settings` turns any problem into `ConfigError`, whose lines each name the key and what is allowed.
"""

from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.aws import STREAM_ARN_FORM, NoRegionError, is_stream_arn, resolve_region
from pipeline.delivery.filters import FilterSettings
from pipeline.object_names import normalized_prefix
from sinks.registry import SINK_TYPES, SinkConfig, takes_snapshots_by_default

_FROZEN = ConfigDict(frozen=True, extra="forbid")
ENV_PREFIX = "STREAMSINK_"


class SourceSettings(BaseModel):
    """`[source]`: which stream to read, and where."""

    model_config = _FROZEN

    table_name: str | None = Field(default=None, description="Table whose latest stream is read.")
    stream_arn: str | None = Field(default=None, description="A stream ARN; use instead of table_name.")
    starting_position: Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"] = Field(
        default="TRIM_HORIZON",
        description="What the first start delivers: 'TRIM_HORIZON' everything the stream still holds (24 hours), "
        "'LATEST' only changes made after the first start, 'AT_TIMESTAMP' changes made at or after "
        "source.starting_timestamp. Recorded at the first start and honoured by every later start; a checkpoint "
        "always wins.",
    )
    starting_timestamp: datetime | None = Field(
        default=None,
        description="For starting_position = 'AT_TIMESTAMP': an ISO 8601 time with its offset, e.g. "
        "2026-11-30T08:00:00Z. Whole seconds count: DynamoDB rounds creation times down to the second.",
    )
    region: str | None = Field(
        default=None,
        description="Unset: AWS_REGION, AWS_DEFAULT_REGION or the profile's region, as AWS tools resolve it. Also "
        "the default of the checkpoint table, every sink and the dead-letter destination.",
    )
    endpoint_url: str | None = Field(default=None, description="Any AWS-compatible endpoint (moto, LocalStack).")
    on_trimmed_data: Literal["fail", "skip_to_trim_horizon"] = Field(
        default="fail",
        description="When records a shard still needed have passed the stream's 24-hour retention: 'fail' stops "
        "the pipeline with an error naming the shard; 'skip_to_trim_horizon' logs the loss, counts it, and goes "
        "on from the oldest record still kept. Never skipped silently.",
    )

    initial_load: Literal["none", "scan", "export"] = Field(
        default="none",
        description="Copy the table's existing items before and while the stream is read: 'scan' (a parallel "
        "Scan, consumes read capacity), 'export' (a point-in-time export to S3, needs PITR, consumes none), "
        "'none' only changes. Tuned in [initial_load]; see the README's 'Loading existing data'.",
    )

    @model_validator(mode="after")
    def _one_stream(self) -> SourceSettings:
        if (self.table_name is None) == (self.stream_arn is None):
            raise ValueError("set exactly one of source.table_name or source.stream_arn")
        if self.starting_position == "AT_TIMESTAMP" and self.starting_timestamp is None:
            raise ValueError(
                "source.starting_timestamp: required when source.starting_position = 'AT_TIMESTAMP' "
                "(e.g. starting_timestamp = 2026-11-30T08:00:00Z)"
            )
        if self.starting_position != "AT_TIMESTAMP" and self.starting_timestamp is not None:
            raise ValueError(
                "source.starting_timestamp: only used with source.starting_position = 'AT_TIMESTAMP'; "
                "remove it or set starting_position"
            )
        if self.starting_timestamp is not None and self.starting_timestamp.tzinfo is None:
            raise ValueError(
                "source.starting_timestamp: give the time with its offset, e.g. 2026-11-30T08:00:00Z or "
                "2026-11-30T09:00:00+01:00"
            )
        if self.stream_arn is not None and not is_stream_arn(self.stream_arn):
            raise ValueError(f"source.stream_arn must look like {STREAM_ARN_FORM}")
        return self


class InitialLoadSettings(BaseModel):
    """`[initial_load]`: how `source.initial_load` copies the table (each key applies to the mode it names)."""

    model_config = _FROZEN

    segments: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Parts of the table copied side by side: Scan's TotalSegments, or readers of an export's "
        "data files. Fixed at the load's first start (a resumed load keeps its own).",
    )
    read_units_per_second: float | None = Field(
        default=None,
        gt=0.0,
        description="scan: read capacity units per second the copy may consume, all segments together, so the "
        "table's own readers are not starved (ConsumedCapacity of every page counts). Unset: as fast as the "
        "table answers.",
    )
    consistent_read: bool = Field(
        default=False,
        description="scan: strongly consistent reads (twice the read units). Not needed for a correct result: "
        "any change an eventually consistent read missed is in the stream, which wins over the copy.",
    )
    page_items: int | None = Field(
        default=None,
        ge=1,
        description="scan: Scan's Limit (items per page); unset: pages of up to 1 MB, as DynamoDB returns them.",
    )
    export_bucket: str | None = Field(
        default=None,
        min_length=3,
        description="export: the S3 bucket the export is written to (needed unless export_arn is set).",
    )
    export_prefix: str = Field(default="streamsink-exports/", description="export: key prefix of the export.")
    export_arn: str | None = Field(
        default=None,
        description="export: load this completed (or running) export instead of starting one; its ExportTime "
        "must not be earlier than the stream's first start, or changes in between would be lost (refused).",
    )
    export_poll_seconds: float = Field(
        default=30.0, gt=0.0, description="export: how often DescribeExport is asked whether the export is done."
    )
    s3_region: str | None = Field(default=None, description="export: region of the bucket; unset: the source's.")
    s3_endpoint_url: str | None = Field(default=None, description="export: S3 endpoint; unset: the source's.")
    retention_seconds: float = Field(
        default=24 * 3600.0,
        gt=0.0,
        description="The stream's retention (24 hours on DynamoDB): a load that would outlive what the stream "
        "still holds of a position it needs is warned about, and the pipeline stops before the position is lost.",
    )
    warn_margin_seconds: float = Field(
        default=4 * 3600.0,
        ge=0.0,
        description="Warn when the stream's oldest unread position would age out less than this after the load's "
        "expected end.",
    )
    stop_margin_seconds: float = Field(
        default=3600.0,
        ge=0.0,
        description="Stop the pipeline (an error naming the shard) when the stream's oldest unread position is "
        "this close to ageing out: nothing is lost yet, and the operator decides.",
    )


class CheckpointSettings(BaseModel):
    """`[checkpoint]`: the DynamoDB table that remembers how far each shard was delivered."""

    model_config = _FROZEN

    table_name: str = Field(default="streamsink-checkpoints", min_length=3, max_length=255)
    consumer_name: str = Field(
        default="streamsink",
        min_length=1,
        description="Lets several pipelines share one checkpoint table and even one stream.",
    )
    create_table: bool = Field(default=True, description="Create the table (PAY_PER_REQUEST) when missing.")


class LeaseSettings(BaseModel):
    """`[lease]`: how workers sharing one `checkpoint.consumer_name` split the stream's shards between them."""

    model_config = _FROZEN

    worker_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="This worker's name in the lease rows; default: host name, process id and a random suffix, "
        "so that every process is a worker of its own.",
    )
    failover_seconds: float = Field(
        default=10.0,
        ge=1.0,
        le=3600.0,
        description="A worker whose heartbeat has not moved on this long (on the observer's own clock) is gone: "
        "its shards are taken by the others.",
    )
    heartbeat_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="How often a worker shows it is alive (one write per worker); default failover / 3.",
    )
    pass_interval_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="How often a worker looks for shards to take, steal or give up; default failover x 2. A "
        "release or a worker joining makes peers look at once.",
    )

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds if self.heartbeat_seconds is not None else self.failover_seconds / 3

    @property
    def pass_interval(self) -> float:
        return self.pass_interval_seconds if self.pass_interval_seconds is not None else self.failover_seconds * 2

    @model_validator(mode="after")
    def _heartbeat_within_failover(self) -> LeaseSettings:
        if self.heartbeat * 2 > self.failover_seconds:
            raise ValueError(
                "lease.heartbeat_seconds must be at most half of lease.failover_seconds, or one late heartbeat "
                "loses every lease"
            )
        return self


class BatchSettings(BaseModel):
    """`[batch]`: when a batch closes, and how much the queue in front of it holds."""

    model_config = _FROZEN

    max_records: int = Field(default=1000, ge=1, le=100_000)
    max_bytes: int = Field(default=4_000_000, ge=1024, le=256 * 1024 * 1024)
    max_wait_seconds: float = Field(default=0.5, gt=0.0, le=300.0)
    queue_capacity: int = Field(default=10_000, ge=1, description="Records the queue holds before readers wait.")
    queue_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Bytes, likewise.")


class DeliverySettings(BaseModel):
    """`[delivery]`: how much may be in flight to the sinks at once."""

    model_config = _FROZEN

    max_records_in_flight: int = Field(
        default=20_000,
        ge=1,
        description="Records handed to the sinks and not yet taken by all of them; past this, batches wait (and "
        "behind them the queue and the readers), so memory stays flat however slow a sink is.",
    )
    max_bytes_in_flight: int = Field(default=64 * 1024 * 1024, ge=1024, description="Bytes, likewise.")


class ReaderSettings(BaseModel):
    """`[reader]`: how shards are polled."""

    model_config = _FROZEN

    poll_workers: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Threads doing GetRecords; shards share them, one poll at a time.",
    )
    idle_poll_min_seconds: float = Field(
        default=0.25,
        ge=0.0,
        le=60.0,
        description="Pace of a shard that had records in the last 30 s (a page cut by the record limit or the "
        "1 MB cap is followed at once).",
    )
    idle_poll_max_seconds: float = Field(
        default=10.0,
        ge=0.0,
        le=300.0,
        description="Back-off ceiling for a shard with nothing new: 6 calls/min.",
    )
    discovery_interval_seconds: float = Field(default=30.0, gt=0.0, le=3600.0)
    get_records_limit: int = Field(default=1000, ge=1, le=1000)


class RetrySettings(BaseModel):
    """`[retry]`: the one policy for every AWS call and every sink write."""

    model_config = _FROZEN

    max_attempts: int = Field(default=10, ge=1, le=1000)
    initial_delay_seconds: float = Field(default=0.1, ge=0.0, le=60.0)
    max_delay_seconds: float = Field(default=20.0, ge=0.0, le=600.0)
    max_record_age_seconds: float | None = Field(
        default=None,
        gt=0.0,
        description="While a sink is down, whole batches are retried until their oldest record is this old, "
        "then dead-lettered; unset retries an outage for as long as it lasts (the stream keeps 24 hours).",
    )


class DeadLetterSettings(BaseModel):
    """`[dead_letter]`: where records go that a sink refuses for good, and whether to go on without them.

    Every dead letter carries the full stream record, the sink and the reason (AWS Lambda's on-failure
    destination carries only shard and sequence numbers). It is durable before the checkpoint moves past it.
    """

    model_config = _FROZEN

    on_failure: Literal["dead_letter", "block"] = Field(
        default="dead_letter",
        description="'dead_letter': record the refused records with the reason and go on. 'block': stop the "
        "pipeline instead, so nothing is ever skipped (ordering over progress).",
    )
    destination: Literal["jsonl", "sqs", "s3"] = Field(
        default="jsonl", description="'jsonl': a local file (path); 'sqs': a queue (queue_url); 's3': objects."
    )
    path: str = Field(
        default="streamsink-dead-letters.jsonl",
        min_length=1,
        description="The JSONL file; with destination 'sqs', also where entries too large for SQS go.",
    )
    queue_url: str | None = Field(default=None, description="SQS queue URL, for destination 'sqs'.")
    bucket: str | None = Field(default=None, description="S3 bucket, for destination 's3'.")
    prefix: str = Field(
        default="dead-letters/",
        description="S3 key prefix, for destination 's3'; a trailing '/' is added when missing.",
    )
    region: str | None = Field(default=None, description="Defaults to source.region.")
    endpoint_url: str | None = Field(default=None, description="Defaults to source.endpoint_url.")

    @field_validator("prefix")
    @classmethod
    def _slash_terminated(cls, prefix: str) -> str:
        return normalized_prefix(prefix)

    @model_validator(mode="after")
    def _destination_is_complete(self) -> DeadLetterSettings:
        if self.destination == "sqs" and not self.queue_url:
            raise ValueError("dead_letter.queue_url: required when dead_letter.destination = 'sqs'")
        if self.destination == "s3" and not self.bucket:
            raise ValueError("dead_letter.bucket: required when dead_letter.destination = 's3'")
        return self


class RuntimeSettings(BaseModel):
    """`[runtime]`: process-level behaviour."""

    model_config = _FROZEN

    shutdown_timeout_seconds: float = Field(default=30.0, gt=0.0, le=3600.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto",
        description="'auto': a live status line when stderr is a terminal, JSON lines otherwise (containers).",
    )
    progress_interval_seconds: float = Field(
        default=60.0,
        gt=0.0,
        le=86400.0,
        description="Without a status line (JSON or text logs): log a progress line this often, with records "
        "read, delivered and buffered, per sink, lag and dead letters, so that the logs show the pipeline alive.",
    )


class MetricsSettings(BaseModel):
    """`[metrics]`: Prometheus metrics and the health check, served over HTTP while `streamsink run` runs."""

    model_config = _FROZEN

    port: int | None = Field(default=None, ge=0, le=65535, description="Unset: no server. 0: any free port.")
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    stall_seconds: float = Field(
        default=300.0,
        gt=0.0,
        description="/healthz turns unhealthy when a shard has made no progress this long while behind.",
    )


class Settings(BaseSettings):
    """The root of a streamsink configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid", case_sensitive=False
    )

    source: SourceSettings
    checkpoint: CheckpointSettings = CheckpointSettings()
    lease: LeaseSettings = LeaseSettings()
    batch: BatchSettings = BatchSettings()
    delivery: DeliverySettings = DeliverySettings()
    reader: ReaderSettings = ReaderSettings()
    retry: RetrySettings = RetrySettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    metrics: MetricsSettings = MetricsSettings()
    initial_load: InitialLoadSettings = InitialLoadSettings()
    filter: FilterSettings = Field(
        default_factory=FilterSettings,
        description="`[filter]`: records no sink gets; dropped records still advance the checkpoint.",
    )
    sinks: list[SinkConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _load_reaches_the_sinks(self) -> Settings:
        """An `event_names` filter written for changes would drop the copy's SNAPSHOT records silently."""
        if self.source.initial_load == "none":
            return self
        names = self.filter.event_names
        if names is not None and "SNAPSHOT" not in names:
            raise ValueError(
                f"filter.event_names = {list(names)} leaves out SNAPSHOT, so source.initial_load's items would reach "
                'no sink; add "SNAPSHOT" to it'
            )
        for index, sink in enumerate(self.sinks):
            wanted = sink.initial_load if sink.initial_load is not None else takes_snapshots_by_default(sink.type)
            sink_names = sink.filter.event_names
            if wanted and sink_names is not None and "SNAPSHOT" not in sink_names:
                raise ValueError(
                    f"sinks[{index}] ({sink.name or sink.type}): filter.event_names = {list(sink_names)} leaves out "
                    'SNAPSHOT, so the initial load\'s items would not reach it; add "SNAPSHOT", or set '
                    "initial_load = false on this sink"
                )
        return self

    @model_validator(mode="after")
    def _load_has_where(self) -> Settings:
        load = self.initial_load
        if self.source.initial_load == "export" and load.export_bucket is None and load.export_arn is None:
            raise ValueError(
                "initial_load.export_bucket: required with source.initial_load = 'export' (the S3 bucket DynamoDB "
                "writes the export to), unless initial_load.export_arn names an export made already"
            )
        return self

    @model_validator(mode="after")
    def _sink_names_distinct(self) -> Settings:
        """Names key the metrics, the dead letters and the counts: two sinks of one name would share them."""
        names = [sink.name or sink.type for sink in self.sinks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"two [[sinks]] entries are named {twice[0]!r} (a sink's name defaults to its type): give each a "
                "distinct `name`"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init values; environment variables override it.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """A configuration problem; `lines` are ready to print, one per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read `path` (TOML) if given, apply environment overrides, validate, and fill in what is inherited
    (`resolve_locations`): the result is the configuration as it runs."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
    data.update(overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    try:
        return resolve_locations(settings)
    except NoRegionError as exc:
        raise ConfigError([str(exc)]) from None


def _read_toml(file: Path) -> dict[str, Any]:
    name = repr(str(file))
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file {name} not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {name} is a directory; give the path of a TOML file in it"]) from None
    except PermissionError:
        raise ConfigError([f"config file {name} cannot be read: permission denied"]) from None
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start} is {exc.object[exc.start]:#04x}"
        raise ConfigError([f"config file {name} is not UTF-8 text ({where}); save it as UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {name} cannot be read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None


def resolve_locations(settings: Settings) -> Settings:
    """The settings as they run: `source.region` resolved as AWS tools resolve it when unset (`NoRegionError` when
    nothing is found), and every sink and the dead-letter destination given the source's region and endpoint
    where they set none. Idempotent.

    Done once, here, so that `streamsink validate` prints what `run` will use and no client builder has a default
    of its own. An endpoint left null everywhere means the service's own AWS endpoint for the region."""
    source = settings.source
    region = resolve_region(source.region)

    def located(own_region: str | None, own_endpoint: str | None) -> dict[str, Any]:
        return {"region": own_region or region, "endpoint_url": own_endpoint or source.endpoint_url}

    dead_letter = settings.dead_letter
    load = settings.initial_load
    return settings.model_copy(
        update={
            "source": source.model_copy(update={"region": region}),
            "initial_load": load.model_copy(
                update={
                    "s3_region": load.s3_region or region,
                    "s3_endpoint_url": load.s3_endpoint_url or source.endpoint_url,
                }
            ),
            "sinks": [sink.model_copy(update=located(sink.region, sink.endpoint_url)) for sink in settings.sinks],
            "dead_letter": dead_letter.model_copy(update=located(dead_letter.region, dead_letter.endpoint_url)),
        }
    )


def environment_warnings(environ: Mapping[str, str]) -> list[str]:
    """One line per `STREAMSINK_*` variable that configures nothing, naming the form that would.

    pydantic-settings reads `STREAMSINK_<SECTION>` (a JSON value) and `STREAMSINK_<SECTION>__<KEY>...`; any other
    name is ignored without a word, so `STREAMSINK_LOG_LEVEL=DEBUG` would look set and do nothing. (A wrong key
    under a right section, `STREAMSINK_BATCH__MAX_RECORDZ`, is already an error naming the key.)"""
    lines = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest.split("__", 1)[0].lower() in Settings.model_fields:
            continue
        lines.append(f"environment variable {name} configures nothing: {_working_forms(rest)}")
    return lines


def _working_forms(rest: str) -> str:
    """`LOG_LEVEL` -> the variables that set a key of that name, e.g. STREAMSINK_RUNTIME__LOG_LEVEL."""
    wanted = rest.lower().replace("__", "_")
    exact, by_key = [], []
    for section, field in Settings.model_fields.items():
        model = _unwrap_optional(field.annotation)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key in model.model_fields:
            variable = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
            if wanted == f"{section}_{key}":
                exact.append(variable)
            elif wanted == key or wanted.endswith(f"_{key}"):
                by_key.append(variable)
    found = exact or by_key
    if found:
        return f"did you mean {' or '.join(found)}?"
    sections = ", ".join(s.upper() for s in Settings.model_fields)
    return f"use {ENV_PREFIX}<SECTION>__<KEY> (sections: {sections}), e.g. {ENV_PREFIX}BATCH__MAX_RECORDS=500"


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem: the dotted key, what is wrong, and what is allowed."""
    lines = []
    for error in exc.errors():
        key, model = _walk(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            allowed = ", ".join(model.model_fields) if model else "?"
            lines.append(f"{key}: unknown key; allowed here: {allowed}")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"{key}.type: must be one of {', '.join(SINK_TYPES)}")
        elif kind == "too_short" and key == "sinks":
            lines.append(f"sinks: at least one [[sinks]] entry is required (types: {', '.join(SINK_TYPES)})")
        elif kind == "value_error":
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(message if not key or message.startswith(key) else f"{key}: {message}")
        else:
            got = error.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{key}: {error['msg']}{shown}")
    return lines


def _walk(loc: tuple[int | str, ...]) -> tuple[str, type[BaseModel] | None]:
    """Render a pydantic error location as a config key, and find the model the last part belongs to."""
    key = ""
    model: type[BaseModel] | None = Settings
    annotation: Any = None
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            annotation = _element_type(annotation)
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            continue
        if model is None and typing.get_origin(annotation) is dict:  # a table of names the user chose
            key += f".{part}"
            annotation = typing.get_args(annotation)[1]
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            continue
        if model is None and isinstance(part, str) and part in SINK_TYPES:
            model = _sink_model(part)  # the discriminator's tag: not part of the key the user wrote
            continue
        key += f".{part}" if key else part
        parent = model
        field = parent.model_fields.get(part) if parent else None
        annotation = _unwrap_optional(field.annotation) if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and field is None:
            return key, parent
    return key, model


def _element_type(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    return args[0] if args else None


def _unwrap_optional(annotation: Any) -> Any:
    """`X | None` -> X: an optional list or section is walked into like a required one."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else annotation


def _sink_model(sink_type: str) -> type[BaseModel] | None:
    union = typing.get_args(SinkConfig)[0]
    members = typing.get_args(union) if isinstance(union, types.UnionType) else (union,)
    for member in members:
        if sink_type in typing.get_args(member.model_fields["type"].annotation):
            return typing.cast(type[BaseModel], member)
    return None
