"""AWS Lambda as the engine: `pipeline.lambda_handler.handler` (the function's Handler string) takes the DynamoDB
Streams events of an event source mapping and delivers them as `streamsink run` delivers a batch: the same
decoding, pipeline `[filter]`, per-sink filters, record_transforms and projections, sinks, retry policy and dead
letters (`pipeline.delivery`), configured by the same TOML file or `STREAMSINK_<SECTION>__<KEY>` variables.

What Lambda owns instead: reading the stream and remembering positions. The event source mapping polls the
shards, follows their lineage and keeps its own position per shard, so `[source]` (but its `region` and
`endpoint_url`, still the sinks' defaults) and `[checkpoint]` are not used, nor are `[reader]` and `[batch]` (the
mapping's BatchSize and batching window decide), `[metrics]` and the shutdown timeout. A config that names no stream
is given the event's own `eventSourceARN`, only to satisfy the settings model; one that names a table or stream
refuses events from another.

The failure contract (`FunctionResponseTypes = ["ReportBatchItemFailures"]`): the response names at most one
record, the first of the event that some sink has not taken, and Lambda sends the batch again from it. Reporting
that record alone is what keeps per-item order: Lambda goes on from the lowest sequence number reported, so no later
change of an item is delivered before an earlier one that failed (a handler that reports every failed record and
goes on past them, as powertools' batch processor does, lets a later change through first). A record counts as
taken by a sink when the sink took it (and, for a sink that buffers, the flush at the end of the invocation made it
durable), when it dead-lettered it (a refusal for good, `dead_letter.on_failure = "dead_letter"`), or when that
sink's filter or record_transform left it out; records the pipeline `[filter]` drops are taken by every sink. In
block mode a refusal is a failure like an outage. Outages are retried within the invocation by the one retry
policy, until three quarters of the time the invocation had are used; the rest is for calls in flight and the
archive's flush. An empty `batchItemFailures` means every record was handled.

Records read by Lambda carry no shard id (the event does not say which shard a record came from): they are given
the shard id "lambda", which is what the archive names its objects and dead letters their files by; event ids and
sequence numbers identify the records.

Sinks and the dead-letter destination are built and opened once per container, at its first invocation, and kept
for the next ones; after a failed flush they are built afresh, so that a buffer holding records reported as failed
does not outlive the invocation.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.aws import AwsClients
from pipeline.delivery.dead_letter import build_dead_letters
from pipeline.delivery.driver import Delivery
from pipeline.delivery.feed import SinkFeed
from pipeline.delivery.filters import compile_filter
from pipeline.records import Batch, ChangeRecord, change_record_from_stream
from pipeline.retry import RetryPolicy, ShutdownInterruptedError
from pipeline.settings import (
    ENV_PREFIX,
    ConfigError,
    Settings,
    _read_toml,
    environment_warnings,
    load_settings,
    resolve_locations,
)
from pipeline.source.stream import table_name_of
from sinks.base import Sink
from sinks.registry import build_sink

__all__ = [
    "CONFIG_VARIABLE",
    "DEFAULT_CONFIG_FILE",
    "HANDLER",
    "SHARD_ID",
    "LambdaContext",
    "LambdaPipeline",
    "decode_event",
    "handler",
    "load_lambda_settings",
]

log = logging.getLogger(__name__)

HANDLER = "pipeline.lambda_handler.handler"
"""The function's Handler string."""
CONFIG_VARIABLE = "STREAMSINK_CONFIG"
"""Path of the bundled TOML file; relative paths are relative to the function's code (LAMBDA_TASK_ROOT)."""
DEFAULT_CONFIG_FILE = "streamsink.toml"
"""Read from beside the code when CONFIG_VARIABLE is unset; without it, environment variables alone configure."""
SHARD_ID = "lambda"
"""The shard id of records read by Lambda, whose events do not say which shard a record came from."""

WRITE_SHARE = 0.75
"""Writes are retried until this share of the time the invocation had at its start is used."""
RETURN_MARGIN_SECONDS = 1.0
"""The flush's retries end this long before the deadline, leaving time to answer."""

Response = dict[str, list[dict[str, str]]]


class LambdaContext(Protocol):
    """What the handler reads of Lambda's context object."""

    def get_remaining_time_in_millis(self) -> int: ...


class LambdaEventError(ValueError):
    """The event is not a DynamoDB Streams event from an event source mapping; the message says what is wrong."""


class _Deadline:
    """When retry waits must end; moved for each invocation and phase. The one retry policy's sleep asks it, so
    every retry (sink writes, flushes, dead letters) stops in time, as a hard stop ends them under `run`."""

    def __init__(self) -> None:
        self.until = math.inf

    def sleep(self, seconds: float) -> None:
        if time.monotonic() + seconds >= self.until:
            raise ShutdownInterruptedError("the invocation's time is nearly up: no further retry")
        time.sleep(seconds)


class _Handled:
    """Per sink, the event ids it is done with in this invocation (`Delivery`'s on_handled, called from every
    lane)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sink: defaultdict[str, set[str]] = defaultdict(set)
        self._closed = False

    def add(self, sink: str, records: Sequence[ChangeRecord]) -> None:
        with self._lock:
            if not self._closed:
                self._by_sink[sink].update(record.event_id for record in records)

    def close(self) -> None:
        """Count nothing taken from now on: called before the flush, so that a write still in flight cannot put a
        record in a buffer behind the flush and have it counted as durable."""
        with self._lock:
            self._closed = True

    def forget(self, sink: str) -> None:
        with self._lock:
            self._by_sink[sink] = set()

    def lacking(self, record: ChangeRecord, sinks: Sequence[str]) -> list[str]:
        """The sinks not done with `record`."""
        with self._lock:
            return [sink for sink in sinks if record.event_id not in self._by_sink[sink]]


class LambdaPipeline:
    """What one container keeps between invocations: the settings, the sinks and the dead-letter destination."""

    def __init__(
        self,
        settings: Settings,
        *,
        sinks: Sequence[Sink] | None = None,
        clients: AwsClients | None = None,
        stream_configured: bool = True,
    ) -> None:
        self.settings = settings = resolve_locations(settings)
        _check_dead_letters(settings)
        source = settings.source
        self.clients = clients or AwsClients(source.region, source.endpoint_url)
        self.sinks: list[Sink] = (
            list(sinks)
            if sinks is not None
            else [build_sink(s, region=self.clients.region, endpoint_url=source.endpoint_url) for s in settings.sinks]
        )
        # Sinks passed in directly are not built from settings.sinks, so their entries' filters do not apply.
        self._feeds = (
            None
            if sinks is not None
            else [
                SinkFeed.of(s, snapshots_by_default=sink.takes_snapshots)
                for s, sink in zip(settings.sinks, self.sinks, strict=True)
            ]
        )
        self._concurrency = None if sinks is not None else [s.max_concurrency for s in settings.sinks]
        self._deadline = _Deadline()
        self.retry = RetryPolicy(settings.retry, sleep=self._deadline.sleep)
        self.record_filter = compile_filter(settings.filter)
        self.dead_letters = build_dead_letters(settings.dead_letter, self.clients, self.retry)
        self._stream_configured = stream_configured
        self.usable = True
        """False once a flush failed: the handler builds the sinks afresh for the next invocation."""

    def open(self, context: LambdaContext) -> None:
        """Open every sink and check the dead-letter destination, retrying outages within the invocation's time."""
        self._deadline.until = _deadline_of(context, time.monotonic())[1]
        for sink in self.sinks:
            self.retry.call(f"opening sink {sink.name}", sink.open)
        self.dead_letters.open()

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing sink %s: %s", sink.name, exc)

    def handle(self, event: Mapping[str, Any], context: LambdaContext) -> Response:
        """Deliver the event's records; name the first record some sink has not taken, if any."""
        started = time.monotonic()
        write_until, flush_until = _deadline_of(context, started)
        records = decode_event(event, received_at=datetime.now(UTC))
        if not records:
            return {"batchItemFailures": []}
        self._check_stream(records[0])
        read = Batch(tuple(records), sum(r.size_bytes for r in records))
        admitted = self.record_filter.select(read)
        handled = _Handled()
        delivery = Delivery(
            self.sinks,
            retry=self.retry,
            dead_letters=self.dead_letters,
            on_failure=self.settings.dead_letter.on_failure,
            feeds=self._feeds,
            concurrency=self._concurrency,
            max_records_in_flight=self.settings.delivery.max_records_in_flight,
            max_bytes_in_flight=self.settings.delivery.max_bytes_in_flight,
            on_handled=handled.add,
        )
        self._deadline.until = write_until
        failure: BaseException | None = None
        done = False
        try:
            ticket = delivery.submit(admitted, read=read)
            assert ticket is not None  # no timeout: one batch always fits an empty window
            while not ticket.done and delivery.error is None and delivery.busy and time.monotonic() < write_until:
                delivery.wait_done(min(0.05, max(0.0, write_until - time.monotonic())))
            done = ticket.done
        except Exception as error:  # a refusal in block mode, an unusable dead-letter destination
            failure = error
        finally:
            delivery.stop()  # lanes start no further call; one in flight ends within the client's timeouts
        failure = failure or delivery.error
        self._deadline.until = flush_until
        while delivery.busy and time.monotonic() < flush_until:
            time.sleep(0.01)
        handled.close()
        try:
            delivery.flush()  # buffered records become durable before the response says they are delivered
        except Exception as error:
            done = False
            failure = failure or error
            self.usable = False
            for sink in self.sinks:
                if sink.max_buffer_seconds > 0:  # a sink that buffers: what it took is not known to be durable
                    handled.forget(sink.name)
        if done:
            log.info("%d record(s) delivered to every sink in %.2fs", len(records), time.monotonic() - started)
            return {"batchItemFailures": []}
        return self._report(admitted.records, handled, failure, len(records))

    def _report(
        self, admitted: Sequence[ChangeRecord], handled: _Handled, failure: BaseException | None, total: int
    ) -> Response:
        names = [sink.name for sink in self.sinks]
        for index, record in enumerate(admitted):
            lacking = handled.lacking(record, names)
            if lacking:
                log.error(
                    "record %s (sequence %s) not taken by sink(s) %s: reporting it, so that Lambda sends the "
                    "batch again from there (%d of %d record(s) before it delivered)%s",
                    record.event_id,
                    record.sequence_number,
                    ", ".join(lacking),
                    index,
                    total,
                    f": {failure}" if failure is not None else " within the invocation's time",
                )
                return {"batchItemFailures": [{"itemIdentifier": record.sequence_number}]}
        return {"batchItemFailures": []}  # every record handled, as the last write finished in time

    def _check_stream(self, first: ChangeRecord) -> None:
        """A config naming its table or stream must be fed from that one: another table's events are a wiring
        mistake, not changes to deliver."""
        if not self._stream_configured:
            return
        source = self.settings.source
        if source.stream_arn is not None and first.stream_arn != source.stream_arn:
            raise LambdaEventError(
                f"event from stream {first.stream_arn}, but source.stream_arn is {source.stream_arn}: map this "
                "function to that stream, or remove source.stream_arn"
            )
        if source.table_name is not None and first.table != source.table_name:
            raise LambdaEventError(
                f"event from table {first.table!r}, but source.table_name is {source.table_name!r}: map this "
                "function to that table's stream, or remove source.table_name"
            )


def _deadline_of(context: LambdaContext, started: float) -> tuple[float, float]:
    """Until when writes are retried, and until when the flush is."""
    remaining = max(0.0, context.get_remaining_time_in_millis() / 1000)
    write_until = started + remaining * WRITE_SHARE
    return write_until, max(write_until, started + remaining - RETURN_MARGIN_SECONDS)


def _check_dead_letters(settings: Settings) -> None:
    dead_letter = settings.dead_letter
    if dead_letter.destination == "jsonl" and dead_letter.on_failure == "dead_letter":
        raise ConfigError(
            [
                "dead_letter.destination: 'jsonl' writes a file in the function's container, which Lambda discards; "
                "use 's3' (bucket) or 'sqs' (queue_url), or on_failure = 'block'"
            ]
        )


def decode_event(event: Mapping[str, Any], *, received_at: datetime | None = None) -> list[ChangeRecord]:
    """The event's records, in its order (the shard's), as ChangeRecords whose `raw` is the event's record as
    Lambda sent it (dead letters carry it, the `dynamodb` message format passes it on).

    A record without `ApproximateCreationDateTime` (the samples in AWS's documentation have none; the service
    always sends it) is dated `received_at`."""
    records = event.get("Records")
    if not isinstance(records, list):
        raise LambdaEventError("not a DynamoDB Streams event: it has no Records list")
    decoded: list[ChangeRecord] = []
    for position, raw in enumerate(records):
        if not isinstance(raw, Mapping) or raw.get("eventSource") != "aws:dynamodb":
            raise LambdaEventError(f"Records[{position}] is not a DynamoDB Streams record (eventSource aws:dynamodb)")
        arn = raw.get("eventSourceARN")
        stream = raw.get("dynamodb")
        if not isinstance(arn, str) or ":table/" not in arn or not isinstance(stream, Mapping):
            raise LambdaEventError(f"Records[{position}] has no eventSourceARN naming a table, or no dynamodb part")
        source = raw
        if "ApproximateCreationDateTime" not in stream:
            when = (received_at or datetime.now(UTC)).timestamp()
            source = {**raw, "dynamodb": {**stream, "ApproximateCreationDateTime": when}}
        record = change_record_from_stream(source, table=table_name_of(arn), shard_id=SHARD_ID, stream_arn=arn)
        decoded.append(record if source is raw else replace(record, raw=raw))
    return decoded


def load_lambda_settings(stream_arn: str | None, environ: Mapping[str, str] | None = None) -> tuple[Settings, bool]:
    """The settings from the bundled TOML file (CONFIG_VARIABLE, else DEFAULT_CONFIG_FILE beside the code when
    there is one) and the environment; and whether they name the stream. A config that names none is given
    `stream_arn` (the event's), which only satisfies the settings model: Lambda's mapping decides what is read."""
    env = os.environ if environ is None else environ
    path = _config_path(env)
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    source: MutableMapping[str, Any] = dict(data.get("source") or {})
    named = any(source.get(key) for key in ("table_name", "stream_arn")) or any(
        name.upper() in (f"{ENV_PREFIX}SOURCE", f"{ENV_PREFIX}SOURCE__TABLE_NAME", f"{ENV_PREFIX}SOURCE__STREAM_ARN")
        for name in env
    )
    if not named and stream_arn is not None:
        source["stream_arn"] = stream_arn
        data["source"] = source
    for warning in environment_warnings({name: value for name, value in env.items() if name != CONFIG_VARIABLE}):
        log.warning("%s", warning)
    settings = load_settings(None, **data)
    if settings.source.initial_load != "none":
        raise ConfigError(
            [
                f"source.initial_load = {settings.source.initial_load!r}: the Lambda handler delivers the batches "
                "Lambda's event source mapping gives it and cannot copy a table; run the load with `streamsink "
                "run` (README: Loading existing data) and leave source.initial_load unset here"
            ]
        )
    return settings, named


def _config_path(env: Mapping[str, str]) -> Path | None:
    root = Path(env.get("LAMBDA_TASK_ROOT") or ".")
    chosen = env.get(CONFIG_VARIABLE)
    if chosen:
        return root / chosen  # an absolute path stays itself
    default = root / DEFAULT_CONFIG_FILE
    return default if default.is_file() else None


_pipeline: LambdaPipeline | None = None
"""The container's pipeline, built at its first invocation and reused (Lambda runs one invocation at a time in a
container)."""


def handler(event: Mapping[str, Any], context: LambdaContext) -> Response:
    """The Lambda entry point (Handler: pipeline.lambda_handler.handler)."""
    global _pipeline
    pipeline = _pipeline
    if pipeline is None:
        pipeline = _pipeline = _cold_start(event, context)
    try:
        return pipeline.handle(event, context)
    finally:
        if not pipeline.usable:
            _pipeline = None
            pipeline.close()


def _cold_start(event: Mapping[str, Any], context: LambdaContext) -> LambdaPipeline:
    records = event.get("Records") or [{}]
    first = records[0] if isinstance(records, list) and records and isinstance(records[0], Mapping) else {}
    arn = first.get("eventSourceARN")
    settings, named = load_lambda_settings(arn if isinstance(arn, str) else None)
    for name in ("pipeline", "sinks"):
        logging.getLogger(name).setLevel(settings.runtime.log_level)
    pipeline = LambdaPipeline(settings, stream_configured=named)
    pipeline.open(context)
    log.info(
        "streamsink ready: sinks %s; dead letters to %s",
        ", ".join(s.name for s in pipeline.sinks),
        pipeline.dead_letters.location,
    )
    return pipeline
