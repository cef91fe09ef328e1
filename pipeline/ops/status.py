"""`streamsink status`: where a pipeline is, shard by shard, from its checkpoints and the stream.

Read-only: DescribeTable (with `source.table_name`), DescribeStream, Query on the checkpoint table, and with
`--count-behind` GetShardIterator and GetRecords. It never creates the checkpoint table: a missing one is
reported, since creating it would hide a wrong `checkpoint.table_name`.

How many records a shard still holds for the pipeline is not in any API. Sequence numbers grow but are not
counted one per record, so the distance between two of them says nothing. It is known without reading only for
a done shard (0); `--count-behind` reads ahead from the checkpoint and counts, up to a cap.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.aws import AwsClients
from pipeline.retry import RetryPolicy
from pipeline.settings import Settings
from pipeline.source.reader import ShardReader, StartPosition, TrimmedDataError
from pipeline.source.stream import ShardInfo, StreamNotFoundError, describe_shards, resolve_stream_arn
from pipeline.state.checkpoint import Checkpoint, CheckpointStore, WorkerBeat
from pipeline.state.load_progress import LoadReport, LoadState, LoadStore, load_report_json, report_of

ShardState = Literal["open", "closed", "done"]

# DynamoDB Streams may answer an empty page before later records of an open shard: only a few empty pages in a
# row mean the reader has reached the newest record.
EMPTY_PAGES_AT_THE_TIP = 3


class CheckpointTableMissingError(Exception):
    """The configured checkpoint table does not exist."""


@dataclass(frozen=True, slots=True)
class RecordsBehind:
    """What is known of how many records a shard still holds that the pipeline has not delivered."""

    count: int | None = None
    """None: not counted."""
    at_least: bool = False
    """Counting stopped at the cap: there are `count` or more."""
    trimmed: bool = False
    """Records after the checkpoint have passed the stream's retention: they are gone."""

    def __str__(self) -> str:
        if self.trimmed:
            return "trimmed"
        if self.count is None:
            return "?"
        return f">= {self.count}" if self.at_least else str(self.count)


@dataclass(frozen=True, slots=True)
class ShardStatus:
    shard: ShardInfo
    state: ShardState
    checkpoint: Checkpoint | None
    behind: RecordsBehind

    @property
    def last_record_at(self) -> datetime | None:
        """When the last delivered record was made (its ApproximateCreationDateTime)."""
        text = self.checkpoint.last_record_at if self.checkpoint else None
        return None if text is None else datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream_arn: str
    consumer_name: str
    checkpoint_table: str
    checked_at: datetime
    shards: tuple[ShardStatus, ...]
    """Parents before children (by starting sequence number)."""
    gone_checkpoints: int
    """Checkpoints of shards no longer in the stream: aged out after the 24-hour retention."""
    workers: tuple[WorkerBeat, ...] = ()
    """The heartbeats of this consumer's workers."""
    initial_load: LoadState | None = None
    """The consumer's initial load (`source.initial_load`), if it has one."""

    def heartbeat_age(self, worker: str | None) -> float | None:
        """Seconds since a worker's last heartbeat, by this machine's clock against the worker's (a rough
        figure: workers judge each other by their own clocks, never by this)."""
        beat = next((w for w in self.workers if w.worker == worker), None)
        if beat is None or not beat.heartbeat_at:
            return None
        return (self.checked_at - datetime.fromisoformat(beat.heartbeat_at)).total_seconds()

    def lease_text(self, worker: str | None) -> str:
        if worker is None:
            return "-"
        age = self.heartbeat_age(worker)
        return "no heartbeat" if age is None else f"beat {age_text(age)} ago"

    def count(self, state: ShardState) -> int:
        return sum(1 for s in self.shards if s.state == state)

    @property
    def oldest_unfinished(self) -> ShardStatus | None:
        """The oldest shard not done: where the pipeline's progress is, or where it is stuck."""
        return next((s for s in self.shards if s.state != "done"), None)

    def age_seconds(self, shard: ShardStatus) -> float | None:
        made = shard.last_record_at
        return None if made is None else (self.checked_at - made).total_seconds()


def _state(shard: ShardInfo, checkpoint: Checkpoint | None) -> ShardState:
    if checkpoint is not None and checkpoint.finished:
        return "done"
    return "closed" if shard.closed else "open"


def count_behind(
    streams: Any, stream_arn: str, shard: ShardInfo, checkpoint: Checkpoint | None, cap: int, retry: RetryPolicy
) -> RecordsBehind:
    """Read ahead from the checkpoint (the oldest record when there is none) and count, stopping at `cap`."""
    sequence = checkpoint.sequence_number if checkpoint else None
    start = StartPosition.after(sequence) if sequence else StartPosition("TRIM_HORIZON")
    reader = ShardReader(shard, stream_arn=stream_arn, streams=streams, retry=retry, start=start, limit=min(1000, cap))
    counted = 0
    empty_in_a_row = 0
    try:
        while True:
            page = reader.poll()
            reader.advance(page)
            counted += len(page.records)
            if counted >= cap:
                return RecordsBehind(cap, at_least=True)
            if page.end_of_shard:
                return RecordsBehind(counted)
            empty_in_a_row = 0 if page.records else empty_in_a_row + 1
            if empty_in_a_row >= EMPTY_PAGES_AT_THE_TIP:
                return RecordsBehind(counted)
    except TrimmedDataError:
        return RecordsBehind(trimmed=True)


def with_source_location(settings: Settings, *, region: str | None, endpoint_url: str | None) -> Settings:
    """`settings` with the source's region and endpoint replaced where given; the checkpoint table, which
    lives beside the source, follows them."""
    changes = {key: value for key, value in (("region", region), ("endpoint_url", endpoint_url)) if value}
    if not changes:
        return settings
    return settings.model_copy(update={"source": settings.source.model_copy(update=changes)})


def collect_status(
    settings: Settings,
    clients: AwsClients | None = None,
    *,
    count_cap: int | None = None,
    now: datetime | None = None,
) -> StreamStatus:
    """Checkpoints joined to the stream's shards; with `count_cap`, unfinished shards' backlogs are counted."""
    source = settings.source
    clients = clients or AwsClients(source.region, source.endpoint_url)
    retry = RetryPolicy(settings.retry)
    dynamodb = clients.client("dynamodb")
    streams = clients.client("dynamodbstreams")
    if source.stream_arn:
        stream_arn = source.stream_arn
    else:
        assert source.table_name is not None
        stream_arn = resolve_stream_arn(dynamodb, source.table_name, retry)
    store = CheckpointStore(
        dynamodb,
        table_name=settings.checkpoint.table_name,
        stream_arn=stream_arn,
        consumer_name=settings.checkpoint.consumer_name,
        retry=retry,
    )
    try:
        stored = store.load_state()
        checkpoints = stored.checkpoints
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
        raise CheckpointTableMissingError(
            f"checkpoint table {settings.checkpoint.table_name!r} does not exist: the pipeline has not run with "
            "this config yet, or checkpoint.table_name is wrong (status never creates it)"
        ) from exc
    shards = sorted(describe_shards(streams, stream_arn, retry), key=lambda s: int(s.starting_sequence_number))
    rows = []
    for shard in shards:
        checkpoint = checkpoints.get(shard.shard_id)
        state = _state(shard, checkpoint)
        if state == "done":
            behind = RecordsBehind(0)
        elif count_cap is not None:
            behind = count_behind(streams, stream_arn, shard, checkpoint, count_cap, retry)
        else:
            behind = RecordsBehind()
        rows.append(ShardStatus(shard, state, checkpoint, behind))
    present = {s.shard_id for s in shards}
    load = LoadStore(
        dynamodb, table_name=settings.checkpoint.table_name, partition=store.partition, retry=retry, worker=""
    ).read()
    return StreamStatus(
        stream_arn=stream_arn,
        consumer_name=settings.checkpoint.consumer_name,
        checkpoint_table=settings.checkpoint.table_name,
        checked_at=now or datetime.now(UTC),
        shards=tuple(rows),
        gone_checkpoints=sum(1 for shard_id in checkpoints if shard_id not in present),
        workers=tuple(sorted(stored.workers.values(), key=lambda w: w.worker)),
        initial_load=load,
    )


# -- output ----------------------------------------------------------------------------------------------------


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def age_text(seconds: float | None) -> str:
    """12s, 3m04s, 2h05m, 1d02h: precise where it matters, short where it does not."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


COLUMNS = ("SHARD", "PARENT", "STATE", "CHECKPOINT", "BEHIND", "LAST RECORD AGE", "OWNER", "LEASE", "UPDATED")


def summary_text(status: StreamStatus) -> str:
    text = (
        f"{len(status.shards)} shard(s): {status.count('open')} open, {status.count('closed')} closed, "
        f"{status.count('done')} done; oldest unfinished: "
    )
    oldest = status.oldest_unfinished
    if oldest is None:
        text += "none"
    else:
        age = status.age_seconds(oldest)
        delivered = "nothing delivered yet" if age is None else f"last delivered record {age_text(age)} old"
        text += f"{oldest.shard.shard_id} ({oldest.state}, {delivered})"
    if status.gone_checkpoints:
        text += f"; {status.gone_checkpoints} checkpoint(s) of shards past retention"
    if status.workers:
        held = {w.worker: 0 for w in status.workers}
        for s in status.shards:
            owner = s.checkpoint.owner if s.checkpoint and s.state != "done" else None
            if owner in held:
                held[owner] += 1
        text += f"\n{len(status.workers)} worker(s): " + "; ".join(
            f"{w.worker} holds {held[w.worker]}, {status.lease_text(w.worker)}" for w in status.workers
        )
    if status.initial_load is not None:
        text += "\n" + load_text(report_of(status.initial_load, status.checked_at))
    return text


def load_text(report: LoadReport) -> str:
    """initial load load-...(scan): loading, 12,000 of about 50,000 item(s) (24%), 3/8 segment(s) done, ETA 5m"""
    of = f" of about {report.estimated_items:,}" if report.estimated_items else ""
    share = f" ({min(100, 100 * report.items // report.estimated_items)}%)" if report.estimated_items else ""
    text = (
        f"initial load {report.load_id} ({report.mode}): {report.phase}, {report.items:,}{of} item(s){share}, "
        f"{report.segments_done}/{report.segments} segment(s) done"
    )
    if report.phase == "loading":
        text += f", held by {report.owner or 'nobody'}"
        if report.eta_seconds is not None:
            text += f", ETA {age_text(report.eta_seconds)}"
    return text


def render_table(status: StreamStatus) -> str:
    """Aligned columns for a terminal; `-` where there is nothing, `?` where the backlog was not counted."""
    rows = [
        (
            s.shard.shard_id,
            s.shard.parent_shard_id or "-",
            s.state,
            (s.checkpoint.sequence_number if s.checkpoint else None) or "-",
            str(s.behind),
            age_text(status.age_seconds(s)),
            (s.checkpoint.owner if s.checkpoint else None) or "-",
            status.lease_text(s.checkpoint.owner if s.checkpoint and s.state != "done" else None),
            (s.checkpoint.updated_at if s.checkpoint else None) or "-",
        )
        for s in status.shards
    ]
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = [
        f"stream: {status.stream_arn}",
        f"consumer: {status.consumer_name} (checkpoint table {status.checkpoint_table})",
        "",
    ]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [COLUMNS, *rows]
    ]
    lines += ["", summary_text(status)]
    return "\n".join(lines) + "\n"


def status_document(status: StreamStatus) -> dict[str, Any]:
    """The same facts for scripts; times are ISO 8601 UTC, absent values null."""
    shards = []
    for s in status.shards:
        checkpoint = s.checkpoint
        made = s.last_record_at
        age = status.age_seconds(s)
        shards.append(
            {
                "shard_id": s.shard.shard_id,
                "parent_shard_id": s.shard.parent_shard_id,
                "state": s.state,
                "starting_sequence_number": s.shard.starting_sequence_number,
                "ending_sequence_number": s.shard.ending_sequence_number,
                "checkpoint_sequence_number": checkpoint.sequence_number if checkpoint else None,
                "records_behind": s.behind.count,
                "records_behind_at_least": s.behind.at_least,
                "records_trimmed": s.behind.trimmed,
                "last_record_at": None if made is None else made.isoformat(),
                "last_record_age_seconds": None if age is None else round(age, 3),
                "owner": checkpoint.owner if checkpoint else None,
                "owner_heartbeat_age_seconds": _rounded(status.heartbeat_age(checkpoint.owner if checkpoint else None)),
                "lease_epoch": checkpoint.lease_epoch if checkpoint else None,
                "checkpoint_updated_at": checkpoint.updated_at if checkpoint else None,
            }
        )
    oldest = status.oldest_unfinished
    return {
        "stream_arn": status.stream_arn,
        "consumer_name": status.consumer_name,
        "checkpoint_table": status.checkpoint_table,
        "checked_at": status.checked_at.isoformat(),
        "shards": shards,
        "summary": {
            "shards": len(status.shards),
            "open": status.count("open"),
            "closed": status.count("closed"),
            "done": status.count("done"),
            "oldest_unfinished": None if oldest is None else oldest.shard.shard_id,
            "checkpoints_of_gone_shards": status.gone_checkpoints,
        },
        "initial_load": None
        if status.initial_load is None
        else load_report_json(report_of(status.initial_load, status.checked_at)),
        "workers": [
            {
                "worker": w.worker,
                "heartbeat_at": w.heartbeat_at,
                "heartbeat_age_seconds": _rounded(status.heartbeat_age(w.worker)),
                "leases_held": w.held,
            }
            for w in status.workers
        ],
    }


def run_status(
    settings: Settings,
    *,
    as_json: bool = False,
    count_cap: int | None = None,
    clients: AwsClients | None = None,
    out: TextIO | None = None,
    region: str | None = None,
    endpoint_url: str | None = None,
) -> int:
    """The `streamsink status` command: 0 with the report, 1 when the stream or checkpoint table is missing.
    `region` and `endpoint_url` (the command's flags) override the config's source section."""
    out = out or sys.stdout
    settings = with_source_location(settings, region=region, endpoint_url=endpoint_url)
    try:
        status = collect_status(settings, clients, count_cap=count_cap)
    except (CheckpointTableMissingError, StreamNotFoundError, BotoCoreError) as exc:
        print(f"streamsink: status: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        error = exc.response.get("Error", {})
        print(f"streamsink: status: {error.get('Code', 'error')}: {error.get('Message', exc)}", file=sys.stderr)
        return 1
    out.write(json.dumps(status_document(status), indent=2) + "\n" if as_json else render_table(status))
    out.flush()
    return 0
