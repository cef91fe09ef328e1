"""SIGTERM while the queue is full and the archive is slow: `streamsink run` drains within the configured
`runtime.shutdown_timeout_seconds` and exits 0 with its checkpoints exactly at what the archive holds; when the
timeout is too short for the drain it exits 1, says that undelivered records will be read again, and the next
run delivers them.

The archive reaches moto through `FaultProxy`, which delays every S3 request: each flush, and so each
checkpoint, waits for it. A writer keeps changing the table throughout, shutdown included.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline.ops.demo import _item
from pipeline.state.checkpoint import Checkpoint
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from pipeline.testing.simulated_stream import StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from tests.conftest import read_archive, unique, wait_until
from tests.fault_proxy import FaultProxy, latency, s3_bucket
from tests.test_crash_safety import (
    ChangeWriter,
    MotoTableWriter,
    StreamsinkProcess,
    StreamTail,
    load_checkpoints,
    write_config,
)

BACKLOG = 250
SHUTDOWN_MARGIN_SECONDS = 3.0
"""Time allowed past the configured timeout: the sink write in flight when it expires (0.6 s here, it cannot be
cut short) and the process's own teardown."""


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


class Scenario:
    """A table with a backlog, a writer adding to it, and the config of a pipeline archiving through `proxy`."""

    def __init__(self, aws: EmbeddedAws, bucket: str, proxy: FaultProxy, workdir: Path) -> None:
        self.aws = aws
        self.dynamodb = aws.client("dynamodb")
        self.bucket = bucket
        self.workdir = workdir
        self.table = unique("orders")
        self.stream_arn = create_stream_table(self.dynamodb, self.table)
        self.checkpoint_table = unique("checkpoints")
        self.truth = StreamTail(aws, self.stream_arn)
        self.proxy_url = proxy.endpoint_url
        for n in range(BACKLOG):
            self.dynamodb.put_item(TableName=self.table, Item=_item(n))
        self.writer = ChangeWriter(MotoTableWriter(self.dynamodb, self.table), seed=7, pause_seconds=0.05)
        self._runs = 0

    def config(self, shutdown_timeout_seconds: float) -> Path:
        return write_config(
            self.workdir / f"shutdown-{shutdown_timeout_seconds}.toml",
            {
                "source": {"table_name": self.table, "region": self.aws.region, "endpoint_url": self.aws.endpoint_url},
                "checkpoint": {"table_name": self.checkpoint_table},
                # Pages of 10 and a flush per page: draining the queue takes 12 slow S3 writes.
                "batch": {"max_records": 10, "max_wait_seconds": 0.1, "queue_capacity": 120},
                "reader": {"get_records_limit": 10, "idle_poll_min_seconds": 0.05, "idle_poll_max_seconds": 0.2},
                "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.2},
                "dead_letter": {"path": str(self.workdir / "dead-letters.jsonl")},
                "runtime": {"shutdown_timeout_seconds": shutdown_timeout_seconds, "log_format": "text"},
                "sinks": [
                    {
                        "type": "s3_parquet",
                        "bucket": self.bucket,
                        "prefix": "orders/",
                        "buffer_max_seconds": 0.0,
                        "endpoint_url": self.proxy_url,
                    }
                ],
            },
        )

    def start(self, config: Path) -> StreamsinkProcess:
        self._runs += 1
        return StreamsinkProcess(config, self.workdir / f"run-{self._runs}.log")

    def checkpoints(self) -> dict[str, Checkpoint]:
        return load_checkpoints(self.dynamodb, self.checkpoint_table, self.stream_arn)

    def wait_for_checkpoints(self, count: int, run: StreamsinkProcess) -> None:
        """Until the running pipeline has checkpointed `count` records or more (its queue is full by then)."""

        def delivered() -> int:
            checkpointed = self.checkpoints()
            return sum(
                1
                for shard, records in self.truth().items()
                for r in records
                if shard in checkpointed
                and int(r["dynamodb"]["SequenceNumber"]) <= int(checkpointed[shard].sequence_number or 0)
            )

        wait_until(
            lambda: delivered() >= count or run.process.poll() is not None, timeout=40, what="checkpoints", interval=0.2
        )
        assert run.process.poll() is None, run.output()


def _sequences(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["dynamodb"]["SequenceNumber"]) for r in records]


def _archived_sequences(aws: EmbeddedAws, bucket: str) -> dict[str, list[int]]:
    by_shard: dict[str, list[int]] = collections.defaultdict(list)
    for row in read_archive(aws, bucket).select(["shard_id", "sequence_number"]).to_pylist():
        by_shard[row["shard_id"]].append(int(row["sequence_number"]))
    return by_shard


def _assert_checkpoints_at_archive(
    checkpoints: Mapping[str, Checkpoint], truth: Mapping[str, list[dict[str, Any]]], archived: Mapping[str, list[int]]
) -> None:
    """Each checkpoint promises every record of its shard up to it is archived; records archived past it are
    allowed only after a timed-out shutdown, and come again."""
    for shard_id, checkpoint in checkpoints.items():
        assert checkpoint.sequence_number is not None
        at = int(checkpoint.sequence_number)
        promised = {sequence for sequence in _sequences(truth[shard_id]) if sequence <= at}
        missing = promised - set(archived.get(shard_id, []))
        assert not missing, f"shard {shard_id} checkpointed at {at} but {len(missing)} records up to it are missing"


@pytest.mark.slow
def test_sigterm_under_load_drains_within_the_timeout_and_checkpoints_exactly_what_is_archived(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    scenario = Scenario(aws, bucket, proxy, tmp_path)
    proxy.inject(s3_bucket(bucket), latency(0.25))
    timeout = 20.0
    scenario.writer.start()
    run = scenario.start(scenario.config(timeout))
    try:
        scenario.wait_for_checkpoints(30, run)
        before = scenario.checkpoints()
        code, seconds = run.terminate(timeout=timeout + SHUTDOWN_MARGIN_SECONDS)
    finally:
        scenario.writer.stop()
    assert code is not None, f"still running {timeout + SHUTDOWN_MARGIN_SECONDS}s after SIGTERM:\n{run.output()}"
    assert code == 0, run.output()
    assert "SIGTERM received: draining" in run.output()
    assert "timed out" not in run.output()

    after = scenario.checkpoints()
    truth = scenario.truth()
    archived = _archived_sequences(aws, bucket)
    _assert_checkpoints_at_archive(after, truth, archived)
    for shard_id, checkpoint in after.items():
        # A clean drain leaves nothing archived past the checkpoint, and each record archived once.
        assert max(archived[shard_id]) == int(checkpoint.sequence_number or 0)
        assert len(archived[shard_id]) == len(set(archived[shard_id]))
    (shard_id,) = after  # moto's stream has one shard
    sequences = _sequences(truth[shard_id])
    at_sigterm, at_exit = int(before[shard_id].sequence_number or 0), int(after[shard_id].sequence_number or 0)
    drained = sum(1 for sequence in sequences if at_sigterm < sequence <= at_exit)
    assert drained > 0, "nothing was left to drain at SIGTERM: the shutdown was not under load"
    print(
        f"\nclean drain: {drained} records delivered after SIGTERM, exit 0 after {seconds:.2f}s (timeout "
        f"{timeout}s); {sum(1 for sequence in sequences if sequence > at_exit)} newer records left for the next run"
    )


@pytest.mark.slow
def test_a_shutdown_timeout_shorter_than_the_drain_exits_1_and_the_next_run_delivers_the_rest(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    scenario = Scenario(aws, bucket, proxy, tmp_path)
    slow = proxy.inject(s3_bucket(bucket), latency(0.6))
    timeout = 1.0
    scenario.writer.start()
    run = scenario.start(scenario.config(timeout))
    try:
        scenario.wait_for_checkpoints(30, run)
        code, seconds = run.terminate(timeout=timeout + SHUTDOWN_MARGIN_SECONDS)
    finally:
        scenario.writer.stop()
    assert code is not None, f"still running {timeout + SHUTDOWN_MARGIN_SECONDS}s after SIGTERM:\n{run.output()}"
    assert code == 1, run.output()
    assert "undelivered records will be read again" in run.output()
    interrupted = scenario.checkpoints()
    _assert_checkpoints_at_archive(interrupted, scenario.truth(), _archived_sequences(aws, bucket))

    proxy.clear(slow)
    rerun = scenario.start(scenario.config(20.0))
    truth = scenario.truth()
    last = {shard: records[-1]["dynamodb"]["SequenceNumber"] for shard, records in truth.items()}
    wait_until(
        lambda: (
            {s: c.sequence_number for s, c in scenario.checkpoints().items()} == last
            or rerun.process.poll() is not None
        ),
        timeout=40,
        what="the next run to deliver the rest",
        interval=0.2,
    )
    code_after, _ = rerun.terminate(timeout=20.0 + SHUTDOWN_MARGIN_SECONDS)
    assert code_after == 0, rerun.output()

    rows = read_archive(aws, bucket).select(["event_id"]).to_pylist()
    archived_ids = collections.Counter(r["event_id"] for r in rows)
    assert {r["eventID"] for records in truth.values() for r in records} == set(archived_ids)
    print(
        f"\ntimed-out shutdown: exit 1 {seconds:.2f}s after SIGTERM (timeout {timeout}s); the next run archived "
        f"the rest; {sum(archived_ids.values()) - len(archived_ids)} duplicates"
    )


@pytest.mark.slow
def test_sigterm_while_the_stream_throttles_is_not_held_by_getrecords_retries(
    aws: EmbeddedAws, bucket: str, tmp_path: Path
) -> None:
    """GetRecords throttled at SIGTERM, with the default retry policy (10 attempts, back-offs up to 20 s): the
    stop interrupts those back-offs at once, so the drain gets the shutdown budget and the run exits 0 with its
    checkpoints at what it delivered."""
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders", shards=2)
    stream.write_synthetic(60, item_bytes=300)
    timeout = 8.0
    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as server:
        checkpoint_table = unique("checkpoints")
        config = write_config(
            tmp_path / "throttled.toml",
            {
                "source": {"stream_arn": stream.arn, "region": aws.region, "endpoint_url": server.endpoint_url},
                "checkpoint": {"table_name": checkpoint_table},
                "batch": {"max_wait_seconds": 0.1},
                "reader": {"idle_poll_min_seconds": 0.05, "idle_poll_max_seconds": 0.2},
                "dead_letter": {"path": str(tmp_path / "dead-letters.jsonl")},
                "runtime": {"shutdown_timeout_seconds": timeout, "log_format": "text"},
                "sinks": [
                    {
                        "type": "s3_parquet",
                        "bucket": bucket,
                        "prefix": "orders/",
                        "buffer_max_seconds": 0.0,
                        "endpoint_url": aws.endpoint_url,
                    }
                ],
            },
        )
        last = {s.shard_id: s.last_sequence_number for s in stream.shards()}
        run = StreamsinkProcess(config, tmp_path / "throttled.log")

        def checkpointed() -> dict[str, str | None]:
            return {
                s: c.sequence_number
                for s, c in load_checkpoints(aws.client("dynamodb"), checkpoint_table, stream.arn).items()
            }

        wait_until(lambda: checkpointed() == last or run.process.poll() is not None, timeout=30, what="the backlog")
        simulator.fail_next("GetRecords", "LimitExceededException", times=10**6)
        wait_until(lambda: simulator.counts["GetRecords:LimitExceededException"] >= 4, what="readers backing off")
        code, seconds = run.terminate(timeout=timeout + SHUTDOWN_MARGIN_SECONDS)
    assert code == 0, f"exit {code} after {seconds:.1f}s:\n{run.output()}"
    assert seconds < timeout, run.output()
    assert "timed out" not in run.output()
    assert checkpointed() == last
    archived = read_archive(aws, bucket).column("event_id").to_pylist()
    assert sorted(set(archived)) == sorted(r["eventID"] for r in stream.records())
    print(f"\nthrottled stream at SIGTERM: exit 0 after {seconds:.2f}s (timeout {timeout}s)")
