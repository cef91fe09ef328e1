"""`streamsink tail`: print a table's changes as they happen, read-only.

Every shard is followed, a child only after its parent has been read to the end (the pipeline's lineage rule,
so each item's changes print in the order they were made), and shards that appear as the stream splits are
picked up by rediscovery. Nothing is written anywhere, so tail needs only `dynamodb:DescribeTable` (with
`--table`) and the streams read permissions, and runs beside a pipeline without touching its checkpoints.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, TextIO

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.aws import STREAM_ARN_FORM, AwsClients, NoRegionError, is_stream_arn, region_of_arn, resolve_region
from pipeline.delivery.filters import FilterSyntaxError, compile_filter, parse_filter
from pipeline.records import ChangeRecord, change_record_from_stream, to_json
from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings, SourceSettings
from pipeline.source.reader import ShardPage, ShardReader, StartPosition
from pipeline.source.scheduler import PollScheduler
from pipeline.source.stream import (
    ShardInfo,
    ShardLineage,
    StreamNotFoundError,
    describe_shards,
    resolve_stream_arn,
    table_name_of,
)
from sinks.messages import change_body

TailFormat = Literal["summary", "record", "json"]
TailStart = Literal["LATEST", "TRIM_HORIZON"]
ChangeFilter = Callable[[ChangeRecord], bool]
"""Keeps a change when it returns True; several must all keep it."""


class TailStoppedError(Exception):
    """A retry wait was cut short because tail is stopping."""


@dataclass(frozen=True, slots=True)
class TailPacing:
    """Quicker than the pipeline's defaults because someone is watching: an idle shard is polled about once a
    second, well inside the five GetRecords calls per second a shard allows all its readers together."""

    poll_workers: int = 4
    idle_poll_min_seconds: float = 0.2
    idle_poll_max_seconds: float = 1.0
    discovery_interval_seconds: float = 5.0


# -- formats ---------------------------------------------------------------------------------------------------


def key_text(value: Any) -> str:
    """A key attribute (S, N or B) as the summary shows it: numbers with every digit, binary as base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)  # a Decimal's str is the digits DynamoDB sent


def _ordered_keys(record: ChangeRecord, key_names: Sequence[str]) -> list[str]:
    known = [name for name in key_names if name in record.keys]
    return known + [name for name in record.keys if name not in known]


def summary_line(record: ChangeRecord, key_names: Sequence[str] = ()) -> str:
    """`[2026-05-27T15:35:57Z] MODIFY  pk=test, sk=item`: UTC to the second, key attributes hash first."""
    when = record.approximate_creation_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    keys = ", ".join(f"{name}={key_text(record.keys[name])}" for name in _ordered_keys(record, key_names))
    return f"[{when}] {record.event_name:<6}  {keys}"


def _indented(exact_json: str) -> str:
    # Number tokens stay text (orjson.Fragment) on the way through, so re-indenting cannot round a digit.
    value = json.loads(exact_json, parse_float=orjson.Fragment, parse_int=orjson.Fragment)
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode("utf-8")


def record_block(record: ChangeRecord, key_names: Sequence[str] = ()) -> str:
    """The summary line, then the change's identity and images as indented JSON (attributes sorted by name, so
    the old and new image of a MODIFY read side by side)."""
    details = {
        "eventID": record.event_id,
        "shardId": record.shard_id,
        "sequenceNumber": record.sequence_number,
        "newImage": record.new_image,
        "oldImage": record.old_image,
    }
    return f"{summary_line(record, key_names)}\n{_indented(to_json(details))}\n"


def render(record: ChangeRecord, fmt: TailFormat, key_names: Sequence[str] = ()) -> str:
    """One change in `fmt`, ending in a newline; `record` blocks are followed by a blank line. `json` is the
    `change` message body of the SQS and SNS sinks, one per line."""
    if fmt == "json":
        return to_json(change_body(record)) + "\n"
    if fmt == "record":
        return record_block(record, key_names) + "\n"
    return summary_line(record, key_names) + "\n"


# -- following the stream ------------------------------------------------------------------------------------


def key_schema(streams: Any, stream_arn: str, retry: RetryPolicy) -> list[str]:
    """The table's key attribute names, hash key first, from DescribeStream (no DescribeTable needed)."""
    description = retry.call("DescribeStream", streams.describe_stream, StreamArn=stream_arn, Limit=1)
    schema = description["StreamDescription"].get("KeySchema", [])
    return [k["AttributeName"] for k in sorted(schema, key=lambda k: k["KeyType"] != "HASH")]


class _Follower:
    """Polls every readable shard through the pipeline's PollScheduler; the calling thread prints.

    The scheduler hands over one shard's pages in order and never polls a shard twice at once, so a single
    printing thread keeps each shard's order while the shards are polled in parallel."""

    def __init__(
        self, streams: Any, stream_arn: str, start: TailStart, pacing: TailPacing, stop: threading.Event
    ) -> None:
        self._streams = streams
        self._stream_arn = stream_arn
        self._start = start
        self._pacing = pacing
        self._stop = stop
        self._halt = threading.Event()
        self.retry = RetryPolicy(RetrySettings(), sleep=self._interruptible_sleep)
        self._lineage = ShardLineage()
        self._initial: set[str] = set()
        self._started: set[str] = set()
        # A few pages in hand is enough: when output is slow (a pager, a slow pipe), pollers wait here.
        self.pages: queue.Queue[ShardPage] = queue.Queue(maxsize=2 * pacing.poll_workers)
        self.fatal: BaseException | None = None
        self._scheduler = PollScheduler(
            workers=pacing.poll_workers,
            deliver=self._deliver,
            on_shard_error=self._on_shard_error,
            idle_min_seconds=pacing.idle_poll_min_seconds,
            idle_max_seconds=pacing.idle_poll_max_seconds,
        )

    def _interruptible_sleep(self, seconds: float) -> None:
        # Polled in short steps: the caller's stop event and our own halt are two events, and either ends it.
        deadline = time.monotonic() + seconds
        while not (self._stop.is_set() or self._halt.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._halt.wait(min(left, 0.2))
        raise TailStoppedError("stopped while waiting to retry")

    def start(self) -> set[str]:
        """Discover, start the pollers; returns the shards being read from the start."""
        shards = describe_shards(self._streams, self._stream_arn, self.retry)
        self._lineage.update(shards)
        self._initial = {s.shard_id for s in shards}
        if self._start == "LATEST":
            # Following from now: closed shards hold only the past.
            self._lineage.mark_finished(s.shard_id for s in shards if s.closed)
        first = self.schedule_readable()
        self._scheduler.start()
        return first

    def _position(self, shard: ShardInfo) -> StartPosition:
        if self._start == "LATEST" and shard.shard_id in self._initial:
            return StartPosition("LATEST")
        # A shard that appeared while tailing (or a child reached through lineage) holds only wanted changes.
        return StartPosition("TRIM_HORIZON")

    def schedule_readable(self) -> set[str]:
        scheduled = set()
        for shard in self._lineage.readable(exclude=self._started):
            self._started.add(shard.shard_id)
            scheduled.add(shard.shard_id)
            self._scheduler.add(
                ShardReader(
                    shard,
                    stream_arn=self._stream_arn,
                    streams=self._streams,
                    retry=self.retry,
                    start=self._position(shard),
                )
            )
        return scheduled

    def rediscover(self) -> None:
        self._lineage.update(describe_shards(self._streams, self._stream_arn, self.retry))
        self.schedule_readable()

    def shard_finished(self, shard_id: str) -> None:
        self._lineage.mark_finished([shard_id])
        self.schedule_readable()  # its children may be read now

    def _deliver(self, page: ShardPage) -> None:
        while not self._halt.is_set():
            try:
                self.pages.put(page, timeout=0.2)
                return
            except queue.Full:
                continue

    def _on_shard_error(self, reader: ShardReader, error: BaseException) -> float | None:
        # Retryable errors were already retried by the policy: what reaches here ends the tail.
        if not isinstance(error, TailStoppedError) and self.fatal is None:
            self.fatal = error
        return None

    def close(self) -> None:
        self._halt.set()
        self._scheduler.stop(timeout=5.0)


def tail(
    streams: Any,
    stream_arn: str,
    *,
    out: TextIO,
    stop: threading.Event,
    start: TailStart = "LATEST",
    fmt: TailFormat = "summary",
    limit: int | None = None,
    filters: Sequence[ChangeFilter] = (),
    pacing: TailPacing = TailPacing(),
    ready: threading.Event | None = None,
) -> int:
    """Print the stream's changes to `out` until `stop` is set or `limit` changes are printed.

    Returns how many were printed. `ready` is set once every shard followed from the start has been polled, so
    any change made after that is sure to be shown, even from LATEST. Raises what made a shard unreadable
    (after the retry policy gave up)."""
    follower = _Follower(streams, stream_arn, start, pacing, stop)
    key_names = key_schema(streams, stream_arn, follower.retry)
    table = table_name_of(stream_arn)
    printed = 0
    try:
        not_yet_polled = follower.start()
        next_discovery = time.monotonic() + pacing.discovery_interval_seconds
        while not stop.is_set():
            if ready is not None and not not_yet_polled:
                ready.set()
            if follower.fatal is not None:
                raise follower.fatal
            if time.monotonic() >= next_discovery:
                follower.rediscover()
                next_discovery = time.monotonic() + pacing.discovery_interval_seconds
            try:
                page = follower.pages.get(timeout=0.2)
            except queue.Empty:
                continue
            for raw in page.records:
                if stop.is_set():
                    return printed
                record = change_record_from_stream(raw, table=table, shard_id=page.shard_id, stream_arn=stream_arn)
                if all(keep(record) for keep in filters):
                    out.write(render(record, fmt, key_names))
                    out.flush()
                    printed += 1
                    if limit is not None and printed >= limit:
                        return printed
            not_yet_polled.discard(page.shard_id)
            if page.end_of_shard:
                follower.shard_finished(page.shard_id)
        return printed
    except TailStoppedError:
        return printed
    finally:
        follower.close()


# -- the command -----------------------------------------------------------------------------------------------


def _error_text(exc: BaseException, table_name: str | None, stream_arn: str | None) -> str:
    if not isinstance(exc, ClientError):
        return str(exc) or type(exc).__name__
    error = exc.response.get("Error", {})
    if error.get("Code") == "ResourceNotFoundException":
        return f"stream {stream_arn} not found" if stream_arn else f"table {table_name!r} not found"
    return f"{error.get('Code', 'error')}: {error.get('Message', exc)}"


def _stop_when_reader_leaves(out: TextIO, stop: threading.Event) -> None:
    """`streamsink tail | head -3`: stop once the pipe's reader has gone, not at the next change, which may be
    hours away. Only for a pipe on a system with poll(); elsewhere the next write ends it."""
    try:
        descriptor = out.fileno()
    except (OSError, ValueError):
        return  # not a real file (a StringIO in tests)
    if not hasattr(select, "poll") or not stat.S_ISFIFO(os.fstat(descriptor).st_mode):
        return
    watch = select.poll()
    watch.register(descriptor, 0)  # no events asked for: only POLLERR / POLLHUP, which poll() always reports

    def _wait() -> None:
        watch.poll()
        stop.set()

    threading.Thread(target=_wait, name="stdout-reader-watch", daemon=True).start()


@dataclass(frozen=True, slots=True)
class TailTarget:
    """The stream tail follows and where it asks for it. Exactly one of `table_name` and `stream_arn` is set."""

    table_name: str | None
    stream_arn: str | None
    region: str | None
    """None: the region AWS tools would use (see `pipeline.aws.resolve_region`)."""
    endpoint_url: str | None


def tail_target(
    source: SourceSettings | None,
    *,
    table_name: str | None = None,
    stream_arn: str | None = None,
    region: str | None = None,
    endpoint_url: str | None = None,
) -> TailTarget | None:
    """Flags over the config's `[source]` section (`source`, from `--config`), so `tail --config` reads the
    stream `run` reads, against the same endpoint. `--table` or `--stream-arn` replaces the config's stream;
    the region is `--region`, then the region a `--stream-arn` names, then the config's, then the region of the
    config's stream ARN, then None (left to AWS_REGION, AWS_DEFAULT_REGION, the profile). None when no stream
    is named."""
    named = table_name is not None or stream_arn is not None
    if not named and source is not None:
        table_name, stream_arn = source.table_name, source.stream_arn
    if table_name is None and stream_arn is None:
        return None
    resolved = (
        region
        or (region_of_arn(stream_arn) if named else None)
        or (source.region if source is not None else None)
        or region_of_arn(stream_arn)
    )
    if endpoint_url is None and source is not None:
        endpoint_url = source.endpoint_url
    return TailTarget(table_name, stream_arn, resolved, endpoint_url)


def run_tail(
    *,
    table_name: str | None,
    stream_arn: str | None,
    start: TailStart,
    fmt: TailFormat,
    limit: int | None,
    filters: Sequence[str],
    region: str | None,
    endpoint_url: str | None,
    source: SourceSettings | None = None,
    out: TextIO | None = None,
) -> int:
    """The `streamsink tail` command: exit 0 on --limit, SIGINT, SIGTERM or a closed pipe; 1 when the stream
    cannot be read; 2 for a bad --filter or --stream-arn, no stream named, or no region. `source` is the config's
    `[source]` section, which the other arguments override (see `tail_target`)."""
    out = out or sys.stdout
    target = tail_target(source, table_name=table_name, stream_arn=stream_arn, region=region, endpoint_url=endpoint_url)
    if target is None:
        print("streamsink: tail: name the stream: --table NAME, --stream-arn ARN or --config PATH", file=sys.stderr)
        return 2
    table_name, stream_arn = target.table_name, target.stream_arn
    try:
        keep = [compile_filter(parse_filter(expression)).admits for expression in filters]
    except FilterSyntaxError as exc:
        print(f"streamsink: tail: --filter {exc}", file=sys.stderr)
        return 2
    if stream_arn is not None and not is_stream_arn(stream_arn):
        print(
            f"streamsink: tail: --stream-arn {stream_arn!r} is not a stream ARN: give one of the form "
            f"{STREAM_ARN_FORM} (the table's LatestStreamArn), or --table NAME",
            file=sys.stderr,
        )
        return 2
    try:
        clients = AwsClients(resolve_region(target.region, setting="--region"), target.endpoint_url)
    except NoRegionError as exc:
        print(f"streamsink: tail: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    def _sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise TailStoppedError("stopped while waiting to retry")

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stop_when_reader_leaves(out, stop)
    try:
        if stream_arn is None:
            assert table_name is not None
            stream_arn = resolve_stream_arn(
                clients.client("dynamodb"), table_name, RetryPolicy(RetrySettings(), sleep=_sleep)
            )
        tail(
            clients.client("dynamodbstreams"),
            stream_arn,
            out=out,
            stop=stop,
            start=start,
            fmt=fmt,
            limit=limit,
            filters=keep,
        )
    except TailStoppedError:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): that is a normal end. Point stdout at /dev/null so the interpreter's
        # own flush at exit does not report the broken pipe again.
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ClientError, StreamNotFoundError, BotoCoreError) as exc:
        print(f"streamsink: tail: {_error_text(exc, table_name, stream_arn)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
