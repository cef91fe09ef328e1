"""Shared fixtures: one real moto server per test session, reached over HTTP like AWS."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import s3fs

from pipeline.aws import AwsClients
from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.records import Batch
from pipeline.runner import Pipeline
from pipeline.settings import Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from sinks.base import RetryableSinkError, Sink, WriteResult
from sinks.memory import MemorySink

# A region, as a configured AWS CLI gives one, so that configs which leave source.region unset load here as they
# would on an operator's machine (subprocesses inherit it). Tests of region resolution set their own environment.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def aws() -> Iterator[EmbeddedAws]:
    with EmbeddedAws() as server:
        yield server


@pytest.fixture
def dynamodb(aws: EmbeddedAws) -> Any:
    return aws.client("dynamodb")


@pytest.fixture
def s3(aws: EmbeddedAws) -> Any:
    return aws.client("s3")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def table(dynamodb: Any) -> str:
    """A fresh table with a NEW_AND_OLD_IMAGES stream."""
    name = unique("orders")
    create_stream_table(dynamodb, name)
    return name


@pytest.fixture
def bucket(s3: Any) -> str:
    name = unique("archive")
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_settings(aws: EmbeddedAws, table: str, bucket: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for the test's table and bucket, tuned to react in tenths of a second."""
    checkpoint_table = unique("checkpoints")

    def build(**sections: Any) -> Settings:
        values: dict[str, Any] = {
            "source": {"table_name": table, "region": aws.region, "endpoint_url": aws.endpoint_url},
            "checkpoint": {"table_name": checkpoint_table},
            "batch": {"max_wait_seconds": 0.2},
            "reader": {
                "idle_poll_min_seconds": 0.05,
                "idle_poll_max_seconds": 0.2,
                "discovery_interval_seconds": 1,
            },
            "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.1},
            "dead_letter": {"path": str(tmp_path / "dead-letters.jsonl")},
            "sinks": [{"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.5}],
        }
        for section, value in sections.items():
            values[section] = {**values.get(section, {}), **value} if isinstance(value, dict) else value
        return load_settings(**values)

    return build


def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> None:
    """Poll `predicate` every `interval` seconds until it holds. A predicate that queries moto costs the server
    (in the test's own process) tens of milliseconds a call: waits of many seconds on one poll less often, so
    the pipeline under test, talking to the same server, is not slowed by the test watching it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_archive(aws: EmbeddedAws, bucket: str, prefix: str = "orders/") -> pa.Table:
    """The archive as a reader would see it: pyarrow.dataset over s3fs, Hive partitions included."""
    fs = s3fs.S3FileSystem(endpoint_url=aws.endpoint_url, skip_instance_cache=True)
    if not fs.exists(f"{bucket}/{prefix}"):
        return pa.table({"event_id": pa.array([], pa.string())})
    return ds.dataset(f"{bucket}/{prefix}", format="parquet", partitioning="hive", filesystem=fs).to_table()


def stream_records(aws: EmbeddedAws, table: str) -> list[dict[str, Any]]:
    """Every record currently in the table's stream, read directly: the ground truth for a test."""
    return read_stream(aws.client("dynamodb"), aws.client("dynamodbstreams"), table)


def read_stream(dynamodb: Any, streams: Any, table: str) -> list[dict[str, Any]]:
    """`stream_records` through the clients given (a test with its own endpoint or credentials)."""
    arn = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    found: list[dict[str, Any]] = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        iterator = streams.get_shard_iterator(
            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            page = streams.get_records(ShardIterator=iterator)
            found.extend(page["Records"])
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return found


@pytest.fixture(autouse=True, scope="session")
def _quiet_server_logs() -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """`main()` sets up the root logger on the test's captured stderr, which pytest closes after the test: a later
    test's log line would go to that closed stream ("--- Logging error ---" on the next test's stderr)."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_streamsink_run_left_behind() -> Iterator[None]:
    """A `streamsink run` subprocess a failed test did not stop is killed when the test ends: left alone it outlives
    the test session, retrying against a moto server that is gone and taking CPU from every test after it."""
    yield
    crash_safety = sys.modules.get("tests.test_crash_safety")  # where StreamsinkProcess lives; no runs without it
    if crash_safety is not None:
        crash_safety.StreamsinkProcess.kill_left_running()


@pytest.fixture
def dead_letters(tmp_path: Path) -> JsonlDeadLetters:
    """A JSONL dead-letter file in the test's directory (test files with other needs define their own)."""
    return JsonlDeadLetters(tmp_path / "dead.jsonl")


@pytest.fixture
def sqs(aws: EmbeddedAws) -> Any:
    return aws.client("sqs")


@pytest.fixture
def queue_url(sqs: Any) -> str:
    """A fresh standard queue."""
    url: str = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    return url


@pytest.fixture
def replica(dynamodb: Any) -> str:
    """An empty replica table keyed pk (hash) and sk (range), as the source tables of these tests."""
    name = unique("replica")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk")],
    )
    return name


class GateSink(MemorySink):
    """Down (every write retryable) until `up` is set."""

    def __init__(self, name: str = "gate") -> None:
        super().__init__(name)
        self.up = threading.Event()

    def write(self, batch: Batch) -> WriteResult:
        if not self.up.is_set():
            raise RetryableSinkError("destination down")
        return super().write(batch)


@pytest.fixture
def started(aws: EmbeddedAws) -> Iterator[Callable[[Pipeline], Pipeline]]:
    """Start pipelines built in the test; every one is stopped at the end."""
    running: list[Pipeline] = []

    def start(pipeline: Pipeline) -> Pipeline:
        pipeline.start()
        running.append(pipeline)
        return pipeline

    yield start
    for pipeline in running:
        pipeline.stop(timeout=5)


@pytest.fixture
def on_simulator(
    aws: EmbeddedAws, simulator: Any, make_settings: Callable[..., Settings]
) -> Iterator[Callable[..., Pipeline]]:
    """Pipelines reading a stream of the test module's `simulator` fixture (a StreamSimulator, answering in-process)
    and writing to moto; every one is stopped at the end. `given_sinks` are passed to the pipeline as they are
    (else the settings' own `sinks`); `source` and the other sections override make_settings'."""
    made: list[Pipeline] = []

    def build(stream: Any, *, given_sinks: Sequence[Sink] | None = None, **sections: Any) -> Pipeline:
        source = {"table_name": None, "stream_arn": stream.arn, **sections.pop("source", {})}
        settings = make_settings(source=source, **sections)
        clients = AwsClients(aws.region, aws.endpoint_url)
        simulator.attach(clients.client("dynamodbstreams"))
        made.append(Pipeline(settings, sinks=given_sinks, clients=clients))
        return made[-1]

    yield build
    for running in made:
        running.stop(timeout=2)
