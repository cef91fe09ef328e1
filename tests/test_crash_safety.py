"""`streamsink run` killed with SIGKILL again and again while changes keep coming loses nothing.

A writer thread keeps putting, updating and deleting items. The pipeline runs as the operator runs it (a
subprocess reading a TOML file) and is killed at seeded random moments: during start-up, just after it starts
reading, and in the middle of batches, flushes and checkpoints (it commits several times a second). After every
kill the checkpoint must not be ahead of the archive. At the end a last run drains on SIGTERM, and every change
in the stream must be in the archive with its values exact (duplicates are allowed: delivery is at least once),
and the replica table must equal the source table.

The scenario is written against `CrashSource` and runs twice: against a moto table (one shard that never
closes), and against the simulated DynamoDB Streams endpoint (pipeline.testing.simulated_stream) serving two shards that
split while the pipeline is being killed, so that kills also land while parents finish and children start.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import Checkpoint, CheckpointStore
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from pipeline.testing.simulated_stream import SimulatedStream, StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from tests.conftest import read_archive, unique, wait_until
from tests.fault_proxy import FaultProxy, latency, s3_bucket

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]
SEED = 20240611
KILLS = 10
SIMULATED_KILLS = 10
SPLIT_AFTER_RESTARTS = (1, 4, 7)
S3_LATENCY_SECONDS = 0.2
SHUTDOWN_TIMEOUT_SECONDS = 20.0
SEQUENCE_ATTRIBUTE = "_streamsink_sequence"


# -- running `streamsink run` as an operator does ---------------------------------------------------------


def write_config(path: Path, sections: Mapping[str, Any]) -> Path:
    """A TOML file from `{section: {key: value}}`; a list of tables becomes `[[section]]` entries."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        raise TypeError(f"no TOML form for {v!r}")

    def table(header: str, entries: Mapping[str, Any]) -> list[str]:
        return [header, *(f"{k} = {value(v)}" for k, v in entries.items()), ""]

    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for entry in body:
                lines += table(f"[[{name}]]", entry)
        else:
            lines += table(f"[{name}]", body)
    path.write_text("\n".join(lines))
    return path


class StreamsinkProcess:
    """One `streamsink run --config FILE`; its log goes to a file, so a chatty run can never block on a pipe."""

    started: ClassVar[list[StreamsinkProcess]] = []
    """Every run started, so that one a failed test left running is killed after it (conftest)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [*STREAMSINK, "run", "--config", str(config)], stdout=self._log_file, stderr=subprocess.STDOUT
        )
        StreamsinkProcess.started.append(self)

    @classmethod
    def kill_left_running(cls) -> None:
        """Kill the runs still alive: a test that failed while one ran (a wait timed out) never stopped it, and
        it would go on retrying against a moto server that is gone, taking CPU from every later test."""
        while cls.started:
            run = cls.started.pop()
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
            run._log_file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        wait_until(lambda: text in self.output() or self.process.poll() is not None, timeout=timeout, what=repr(text))
        assert text in self.output(), f"exited {self.process.returncode} before logging {text!r}:\n{self.output()}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log_file.close()

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait at most `timeout` (then SIGKILL); returns the exit code, None if it had to be
        killed, and the seconds from the signal to the exit."""
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code: int | None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.process.kill()
            self.process.wait()
        self._log_file.close()
        return code, time.monotonic() - signalled


def load_checkpoints(dynamodb: Any, table_name: str, stream_arn: str) -> dict[str, Checkpoint]:
    """The checkpoints as `streamsink run` left them; none while it has not created its table yet."""
    store = CheckpointStore(
        dynamodb,
        table_name=table_name,
        stream_arn=stream_arn,
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    )
    try:
        return store.load()
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return {}
        raise


class StreamTail:
    """Every record in a moto stream, per shard in stream order, as boto3 returns them (conftest's
    stream_records, keeping the shard). Each call reads on from where the last one ended: moto serialises
    GetRecords slowly, and re-reading the whole stream after every kill would dominate the test."""

    def __init__(self, aws: EmbeddedAws, stream_arn: str) -> None:
        self._streams = aws.client("dynamodbstreams")
        self._arn = stream_arn
        self._records: dict[str, list[dict[str, Any]]] = {}

    def __call__(self) -> dict[str, list[dict[str, Any]]]:
        for shard in self._streams.describe_stream(StreamArn=self._arn)["StreamDescription"]["Shards"]:
            records = self._records.setdefault(shard["ShardId"], [])
            position: dict[str, str] = {"ShardIteratorType": "TRIM_HORIZON"}
            if records:
                position = {
                    "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                    "SequenceNumber": records[-1]["dynamodb"]["SequenceNumber"],
                }
            iterator = self._streams.get_shard_iterator(StreamArn=self._arn, ShardId=shard["ShardId"], **position)[
                "ShardIterator"
            ]
            while iterator:
                page = self._streams.get_records(ShardIterator=iterator, Limit=1000)
                records.extend(page["Records"])
                if not page["Records"]:
                    break
                iterator = page.get("NextShardIterator")
        return {shard: list(records) for shard, records in self._records.items()}


@dataclass(frozen=True)
class ArchivedChange:
    shard_id: str
    event_id: str
    sequence: int


class ArchiveIndex:
    """What the archive holds, reading each object once (objects are only ever added or rewritten)."""

    def __init__(self, s3: Any, bucket: str, prefix: str) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix
        self._objects: dict[str, tuple[str, set[ArchivedChange]]] = {}

    def changes(self) -> set[ArchivedChange]:
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._prefix):
            for entry in page.get("Contents", []):
                key, etag = entry["Key"], entry["ETag"]
                if key not in self._objects or self._objects[key][0] != etag:
                    body = self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].read()
                    rows = pq.read_table(io.BytesIO(body), columns=["shard_id", "event_id", "sequence_number"])
                    self._objects[key] = (
                        etag,
                        {
                            ArchivedChange(r["shard_id"], r["event_id"], int(r["sequence_number"]))
                            for r in rows.to_pylist()
                        },
                    )
        return {change for _, changes in self._objects.values() for change in changes}


# -- the source the pipeline reads and the writer writes -------------------------------------------------


class TableWriter(Protocol):
    def put(self, item: dict[str, Any]) -> None: ...
    def update(self, key: dict[str, Any], attributes: dict[str, Any]) -> None: ...
    def delete(self, key: dict[str, Any]) -> None: ...


@dataclass
class CrashSource:
    """Where changes are written and read back from, for one run of the kill scenario."""

    source_config: dict[str, Any]
    """The [source] section (and the endpoint every AWS call of the pipeline goes to)."""
    stream_arn: str
    writer: TableWriter
    truth: Callable[[], dict[str, list[dict[str, Any]]]]
    """Every stream record, by shard, as boto3 returns them."""
    table_items: Callable[[], list[dict[str, Any]]]
    """The source table's items now, in DynamoDB JSON as boto3 returns them."""
    after_restart: Callable[[int], None] = field(default=lambda _restart: None)
    """Called after each restart with its number: a simulated stream splits shards here."""


class MotoTableWriter:
    def __init__(self, dynamodb: Any, table: str) -> None:
        self._ddb = dynamodb
        self._table = table

    def put(self, item: dict[str, Any]) -> None:
        self._ddb.put_item(TableName=self._table, Item=item)

    def update(self, key: dict[str, Any], attributes: dict[str, Any]) -> None:
        names = {f"#a{n}": name for n, name in enumerate(attributes)}
        values = {f":v{n}": value for n, value in enumerate(attributes.values())}
        self._ddb.update_item(
            TableName=self._table,
            Key=key,
            UpdateExpression="SET " + ", ".join(f"#a{n} = :v{n}" for n in range(len(attributes))),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def delete(self, key: dict[str, Any]) -> None:
        self._ddb.delete_item(TableName=self._table, Key=key)


class SimulatedTableWriter:
    """Writes to a simulated stream's table; an update is a put of the merged item, as the service records it."""

    def __init__(self, stream: SimulatedStream) -> None:
        self._stream = stream

    def put(self, item: dict[str, Any]) -> None:
        self._stream.put_item(item)

    def update(self, key: dict[str, Any], attributes: dict[str, Any]) -> None:
        current = self._stream.get_item(key)
        if current is not None:
            self._stream.put_item({**current, **attributes})

    def delete(self, key: dict[str, Any]) -> None:
        self._stream.delete_item(key)


def scan_items(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        items.extend(page["Items"])
    return items


class ChangeWriter(threading.Thread):
    """Puts, updates and deletes over a small key space, paced, until stopped; seeded, so runs repeat."""

    def __init__(self, writer: TableWriter, seed: int, keys: int = 30, pause_seconds: float = 0.05) -> None:
        super().__init__(name="change-writer", daemon=True)
        self._writer = writer
        self._rng = random.Random(seed)
        self._keys = keys
        self._pause = pause_seconds
        self._stop_requested = threading.Event()
        self.written: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stop_requested.set()
        self.join()
        assert self.error is None, self.error

    def run(self) -> None:
        present: set[int] = set()
        n = 0
        try:
            while not self._stop_requested.is_set():
                k = self._rng.randrange(self._keys)
                key = {"pk": {"S": f"customer#{k % 7}"}, "sk": {"S": f"order#{k:04d}"}}
                roll = self._rng.random()
                if k in present and roll < 0.2:
                    self._writer.delete(key)
                    present.discard(k)
                    self.written["delete"] += 1
                elif k in present and roll < 0.6:
                    self._writer.update(
                        key,
                        {
                            "status": {"S": self._rng.choice(["paid", "shipped", "returned"])},
                            "revision": {"N": str(n)},
                        },
                    )
                    self.written["update"] += 1
                else:
                    self._writer.put({**key, **_attributes(self._rng, n)})
                    present.add(k)
                    self.written["put"] += 1
                n += 1
                self._stop_requested.wait(self._pause)
        except BaseException as exc:
            self.error = exc


def _attributes(rng: random.Random, n: int) -> dict[str, Any]:
    """Every kind of attribute type, with a 38-digit number whose digits must survive exactly. Few of them:
    moto's response serialiser costs milliseconds per attribute, and it is the bottleneck here."""
    return {
        "precise": {"N": f"{rng.randrange(10**27, 10**28)}.{rng.randrange(10**10):010d}"},
        "paid": {"BOOL": rng.random() < 0.5},
        "blob": {"B": rng.randbytes(6)},
        "tags": {"SS": sorted({f"tag{rng.randrange(5)}", "new"})},
        "lines": {"L": [{"NULL": True}, {"M": {"qty": {"N": str(rng.randrange(1, 9))}}}]},
        "revision": {"N": str(n)},
    }


# -- the scenario ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    phase: str
    """Counted from: the spawn ('start-up'), the first 'reading shard' log line ('just started'), or the first
    checkpoint this run wrote ('mid-run': it is committing, several times a second)."""
    delay_seconds: float


def kill_points(rng: random.Random, kills: int) -> list[KillPoint]:
    phases = [("start-up", 0.05, 1.5), ("just started", 0.0, 0.3), ("mid-run", 0.0, 1.5)]
    chosen = [phases[n % len(phases)] for n in range(kills)]
    rng.shuffle(chosen)
    return [KillPoint(name, round(rng.uniform(low, high), 3)) for name, low, high in chosen]


@dataclass(frozen=True)
class KillOutcome:
    point: KillPoint
    checkpoint: str | None
    """The checkpoints the kill left behind, as shard@sequence."""
    archived_ahead: int
    """Records already in the archive but not checkpointed: the kill came between a flush and its checkpoint
    (they are read and archived again by the next run)."""


@dataclass
class CrashReport:
    kills: list[KillOutcome] = field(default_factory=list)
    writes: dict[str, int] = field(default_factory=dict)
    """Puts, updates and deletes the writer made (a put or update that changes nothing adds no record)."""
    changes: int = 0
    archived_rows: int = 0
    duplicates: int = 0
    drain_seconds: float = 0.0


def run_kill_scenario(
    source: CrashSource,
    *,
    aws: EmbeddedAws,
    bucket: str,
    replica: str,
    workdir: Path,
    kills: int,
    seed: int = SEED,
    max_concurrency: int | None = None,
) -> CrashReport:
    """Kill `streamsink run` at seeded points while `source` changes, then drain; returns what happened.
    `max_concurrency` sets the replica's lanes (its default when None).

    The archive is reached through a proxy that adds S3_LATENCY_SECONDS to every request, so that a good share
    of each run is spent inside a flush: kills land there, where a checkpoint written too early would show."""
    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.inject(s3_bucket(bucket), latency(S3_LATENCY_SECONDS))
        return _run_kill_scenario(
            source, aws, bucket, replica, workdir, proxy.endpoint_url, seed, kills, max_concurrency
        )


def _run_kill_scenario(
    source: CrashSource,
    aws: EmbeddedAws,
    bucket: str,
    replica: str,
    workdir: Path,
    archive_endpoint: str,
    seed: int,
    kills: int,
    max_concurrency: int | None,
) -> CrashReport:
    rng = random.Random(seed)
    dynamodb = aws.client("dynamodb")
    checkpoint_table = unique("checkpoints")
    sinks: list[dict[str, Any]] = [
        {
            "type": "s3_parquet",
            "bucket": bucket,
            "prefix": "orders/",
            "buffer_max_seconds": 0.3,
            "image_encoding": "dynamodb_json",
            "endpoint_url": archive_endpoint,
        },
        {
            "type": "dynamodb_table",
            "table_name": replica,
            "sequence_attribute": SEQUENCE_ATTRIBUTE,
            "endpoint_url": aws.endpoint_url,
            **({} if max_concurrency is None else {"max_concurrency": max_concurrency}),
        },
    ]
    config = write_config(
        workdir / "crash.toml",
        {
            "source": source.source_config,
            "checkpoint": {"table_name": checkpoint_table},
            "batch": {"max_records": 20, "max_wait_seconds": 0.1},
            "reader": {
                "get_records_limit": 25,
                "idle_poll_min_seconds": 0.05,
                "idle_poll_max_seconds": 0.2,
                "discovery_interval_seconds": 0.5,
            },
            "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.2},
            # A refused record stops the run instead of being set aside: nothing may go missing quietly.
            "dead_letter": {"path": str(workdir / "dead-letters.jsonl"), "on_failure": "block"},
            "runtime": {"shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_SECONDS, "log_format": "text"},
            "sinks": sinks,
        },
    )
    archive = ArchiveIndex(aws.client("s3"), bucket, "orders/")

    def checkpoints_now() -> dict[str, Checkpoint]:
        return load_checkpoints(dynamodb, checkpoint_table, source.stream_arn)

    report = CrashReport()
    writer = ChangeWriter(source.writer, seed)
    writer.start()
    try:
        for number, point in enumerate(kill_points(rng, kills)):
            earlier = _updated(checkpoints_now())
            run = StreamsinkProcess(config, workdir / f"run-{number:02d}.log")
            source.after_restart(number)
            if point.phase == "just started":
                run.wait_for_output("reading shard")
            if point.phase == "mid-run":
                _wait_for_a_new_checkpoint(run, checkpoints_now, earlier)
            time.sleep(point.delay_seconds)
            assert run.process.poll() is None, f"run {number} exited by itself:\n{run.output()}"
            run.kill()
            checkpoints = checkpoints_now()
            archived = archive.changes()
            _assert_checkpoints_within_archive(checkpoints, source.truth(), {c.event_id for c in archived}, number)
            report.kills.append(KillOutcome(point, _describe(checkpoints), _ahead(archived, checkpoints)))
    finally:
        writer.stop()
    report.writes = dict(writer.written)

    last = StreamsinkProcess(config, workdir / "run-final.log")
    truth = source.truth()
    wanted = {shard: records[-1]["dynamodb"]["SequenceNumber"] for shard, records in truth.items() if records}
    wait_until(
        lambda: _checkpointed_sequences(checkpoints_now()) == wanted or last.process.poll() is not None,
        timeout=40,
        what="the last run to checkpoint every change",
        interval=0.2,
    )
    code, report.drain_seconds = last.terminate(timeout=SHUTDOWN_TIMEOUT_SECONDS + 10)
    assert code == 0, last.output()

    records = [record for shard in truth.values() for record in shard]
    rows = read_archive(aws, bucket).to_pylist()
    report.changes = len(records)
    report.archived_rows = len(rows)
    report.duplicates = _assert_archive_exact(records, rows)
    _assert_replica_equals_source(source.table_items(), scan_items(dynamodb, replica))
    return report


def _describe(checkpoints: Mapping[str, Checkpoint]) -> str | None:
    return ", ".join(f"{c.shard_id[-8:]}@{c.sequence_number}" for c in checkpoints.values()) or None


def _ahead(archived: set[ArchivedChange], checkpoints: Mapping[str, Checkpoint]) -> int:
    def checkpointed(shard_id: str) -> int:
        checkpoint = checkpoints.get(shard_id)
        return -1 if checkpoint is None or checkpoint.sequence_number is None else int(checkpoint.sequence_number)

    return sum(1 for change in archived if change.sequence > checkpointed(change.shard_id))


def _updated(checkpoints: Mapping[str, Checkpoint]) -> dict[str, str | None]:
    return {c.shard_id: c.updated_at for c in checkpoints.values()}


def _wait_for_a_new_checkpoint(
    run: StreamsinkProcess, load: Callable[[], dict[str, Checkpoint]], earlier: dict[str, str | None]
) -> None:
    wait_until(
        lambda: _updated(load()) != earlier or run.process.poll() is not None, timeout=30, what="a new checkpoint"
    )


def _checkpointed_sequences(checkpoints: Mapping[str, Checkpoint]) -> dict[str, str | None]:
    return {c.shard_id: c.sequence_number for c in checkpoints.values() if c.sequence_number is not None}


def _assert_checkpoints_within_archive(
    checkpoints: Mapping[str, Checkpoint],
    truth: Mapping[str, list[dict[str, Any]]],
    archived: set[str],
    kill: int,
) -> None:
    """A checkpoint at N promises every record up to N of that shard is durable in the archive."""
    for shard_id, checkpoint in checkpoints.items():
        if checkpoint.sequence_number is None:
            continue
        promised = [
            r["eventID"]
            for r in truth.get(shard_id, [])
            if int(r["dynamodb"]["SequenceNumber"]) <= int(checkpoint.sequence_number)
        ]
        missing = [event_id for event_id in promised if event_id not in archived]
        assert not missing, (
            f"after kill {kill}: shard {shard_id} checkpointed at {checkpoint.sequence_number}, but "
            f"{len(missing)} of the {len(promised)} records up to it are not in the archive"
        )


def _created(value: Any) -> datetime:
    """ApproximateCreationDateTime as boto3 parses it (a datetime) or as on the wire (epoch seconds)."""
    return value.astimezone(UTC) if isinstance(value, datetime) else datetime.fromtimestamp(float(value), UTC)


def _wire(value: Any) -> Any:
    """boto3's parsed attribute values -> DynamoDB JSON as on the wire (binary as base64 text)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


def _assert_archive_exact(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> int:
    """Every record archived with exact values; returns how many rows repeat an earlier one."""
    by_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_id[row["event_id"]].append(row)
    missing = [r["eventID"] for r in records if r["eventID"] not in by_id]
    assert not missing, f"{len(missing)} of {len(records)} changes never reached the archive: {missing[:5]}"
    assert set(by_id) == {r["eventID"] for r in records}, "the archive holds changes the stream does not"
    for record in records:
        copies = by_id[record["eventID"]]
        ddb = record["dynamodb"]
        for row in copies:
            assert row["event_name"] == record["eventName"]
            assert row["sequence_number"] == ddb["SequenceNumber"]
            assert row["approximate_creation_time"] == _created(ddb["ApproximateCreationDateTime"])
            for column, image in (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage")):
                expected = _wire(ddb[image]) if image in ddb else None
                assert (None if row[column] is None else json.loads(row[column])) == expected, (column, row)
        assert all(_comparable(copy) == _comparable(copies[0]) for copy in copies), "a replayed row differs"
    return len(rows) - len(by_id)


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("dt", "hour")}


def _assert_replica_equals_source(source: list[dict[str, Any]], replica: list[dict[str, Any]]) -> None:
    """Item for item and attribute for attribute, in DynamoDB JSON, less the sink's sequence attribute."""

    def keyed(items: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(i["pk"]["S"], i["sk"]["S"]): {k: v for k, v in i.items() if k != SEQUENCE_ATTRIBUTE} for i in items}

    expected, actual = keyed(source), keyed(replica)
    assert sorted(actual) == sorted(expected), "the replica holds other keys than the source"
    for key, item in expected.items():
        assert actual[key] == item, key


# -- the tests ---------------------------------------------------------------------------------------------


def _replica_table(dynamodb: Any) -> str:
    """An empty table with the source's key, for the dynamodb_table sink to keep equal to the source."""
    name = unique("replica")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
    )
    return name


def _assert_kills_exercised(report: CrashReport, kills: int) -> None:
    assert len(report.kills) == kills
    assert {kill.point.phase for kill in report.kills} == {"start-up", "just started", "mid-run"}


def _print_report(title: str, report: CrashReport) -> None:
    print(
        f"\n{title}, seed {SEED}: {len(report.kills)} kills, writes {report.writes}, {report.changes} changes, "
        f"{report.archived_rows} archived rows, {report.duplicates} duplicates, replica equal to the source, "
        f"last run exited {report.drain_seconds:.2f}s after SIGTERM"
    )
    for kill in report.kills:
        print(
            f"  kill {kill.point.phase:<12} +{kill.point.delay_seconds:.3f}s -> checkpoint {kill.checkpoint}, "
            f"{kill.archived_ahead} archived past it"
        )


@pytest.mark.slow
def test_sigkill_at_random_points_loses_no_change(aws: EmbeddedAws, bucket: str, tmp_path: Path) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("orders")
    stream_arn = create_stream_table(dynamodb, table)
    replica = _replica_table(dynamodb)
    source = CrashSource(
        source_config={"table_name": table, "region": aws.region, "endpoint_url": aws.endpoint_url},
        stream_arn=stream_arn,
        writer=MotoTableWriter(dynamodb, table),
        truth=StreamTail(aws, stream_arn),
        table_items=lambda: scan_items(dynamodb, table),
    )
    report = run_kill_scenario(source, aws=aws, bucket=bucket, replica=replica, workdir=tmp_path, kills=KILLS)
    _assert_kills_exercised(report, KILLS)
    _print_report("moto stream", report)


@pytest.mark.slow
@pytest.mark.parametrize("max_concurrency", [None, 128], ids=["default-lanes", "128-lanes"])
def test_sigkill_while_shards_split_loses_no_change(
    aws: EmbeddedAws, bucket: str, tmp_path: Path, max_concurrency: int | None
) -> None:
    """The simulated endpoint answers DynamoDB Streams and forwards everything else (checkpoints) to moto. The
    replica runs on its default lanes and on many more, so kills land while many writes are in flight."""
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream(unique("orders"), shards=2, seed=SEED)
    splits: list[tuple[str, str]] = []

    def split(restart: int) -> None:
        if restart in SPLIT_AFTER_RESTARTS:
            splits.append(stream.split_shard())

    replica = _replica_table(aws.client("dynamodb"))
    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as server:
        source = CrashSource(
            source_config={"stream_arn": stream.arn, "region": aws.region, "endpoint_url": server.endpoint_url},
            stream_arn=stream.arn,
            writer=SimulatedTableWriter(stream),
            truth=lambda: {shard.shard_id: stream.records(shard.shard_id) for shard in stream.shards()},
            table_items=stream.items,
            after_restart=split,
        )
        report = run_kill_scenario(
            source,
            aws=aws,
            bucket=bucket,
            replica=replica,
            workdir=tmp_path,
            kills=SIMULATED_KILLS,
            max_concurrency=max_concurrency,
        )
    _assert_kills_exercised(report, SIMULATED_KILLS)
    assert len(splits) == len(SPLIT_AFTER_RESTARTS)
    assert len(stream.shards()) == 2 + 2 * len(SPLIT_AFTER_RESTARTS)
    _print_report(f"simulated stream, {len(stream.shards())} shards after {len(splits)} splits", report)
