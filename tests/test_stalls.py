"""Nothing stalls silently, and health raises no false alarm.

- Discovery failing across a roll-over leaves no shard being read: `/healthz` says so once `stall_seconds` pass.
- A checkpoint table that is down is waited out like a sink outage (delivery waits, nothing is lost), and
  `/healthz` names it.
- A buffering sink whose `buffer_max_seconds` is longer than `stall_seconds` is not a stall.
- A sink past its byte limit flushes (and the checkpoint follows) without waiting for the other sinks to be due.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.ops.demo import _item
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import ManualClock, StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from sinks.memory import MemorySink
from tests.conftest import GateSink, read_archive, stream_records, unique, wait_until
from tests.fault_proxy import Fault, FaultProxy, amz_target

STALL = {"stall_seconds": 1.0}
QUICK_RETRY = {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05}


def item(key: str, version: int) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}}


def test_discovery_failing_across_a_roll_over_is_unhealthy_and_a_child_listed_before_is_read(
    aws: EmbeddedAws, make_settings: Callable[..., Settings]
) -> None:
    """Lineage and leases need no DescribeStream once the child is listed: it is read while discovery is down."""
    simulator = StreamSimulator(clock=ManualClock(), rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=1)
    (parent,) = stream.open_shard_ids()
    stream.put_item(item("a", 1))
    settings = make_settings(
        source={"table_name": None, "stream_arn": stream.arn},
        metrics=STALL,
        retry=QUICK_RETRY,
        reader={"discovery_interval_seconds": 0.2},
    )
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    sink = GateSink()
    pipeline = Pipeline(settings, sinks=[sink], clients=clients)
    pipeline.start()
    try:
        child = stream.roll_over_shard(parent)
        stream.put_item(item("a", 2))
        wait_until(lambda: any(s.shard_id == child for s in pipeline.lineage.shards()), what="the child listed")
        simulator.fail_next("DescribeStream", "InternalServerError", times=10**6)  # DescribeStream goes down
        sink.up.set()  # the parent can finish now, and its child is next

        def reasons() -> str:
            return "\n".join(pipeline.metrics.health().reasons)

        wait_until(lambda: "shard discovery (DescribeStream) failing" in reasons(), timeout=10, what="health")
        wait_until(lambda: len(sink.records) == 2, what="the child's change")
    finally:
        pipeline.stop(timeout=5)
    assert [int(r.new_image["version"]) for r in sink.records] == [1, 2]


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


def test_a_checkpoint_table_outage_is_waited_out_named_by_health_and_loses_nothing(
    aws: EmbeddedAws, proxy: FaultProxy, make_settings: Callable[..., Settings]
) -> None:
    """The stream is the simulated one (over HTTP); the checkpoint table is moto behind the fault proxy."""
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders", shards=2)
    with SimulatedStreamsServer(simulator, backend_url=proxy.endpoint_url) as server:
        settings = make_settings(
            source={"table_name": None, "stream_arn": stream.arn, "endpoint_url": server.endpoint_url},
            metrics=STALL,
            retry=QUICK_RETRY,
        )
        sink = MemorySink()
        pipeline = Pipeline(settings, sinks=[sink], clients=AwsClients(aws.region, server.endpoint_url))
        pipeline.start()
        try:
            stream.write_synthetic(20, item_bytes=200)
            wait_until(lambda: len(pipeline.stats.committed) == 2, what="both shards checkpointed")
            outage = proxy.inject(
                amz_target("DynamoDB_20120810.UpdateItem"), Fault("status", 500, "InternalServerError")
            )
            stream.write_synthetic(50, item_bytes=200, first=20)
            wait_until(
                lambda: any("checkpoint table" in reason for reason in pipeline.metrics.health().reasons),
                timeout=10,
                what="health to name the checkpoint table",
            )
            time.sleep(1.0)
            assert pipeline.fatal is None, pipeline.fatal
            assert proxy.faults["status"] > 3 * QUICK_RETRY["max_attempts"]
            proxy.clear(outage)
            last = {s.shard_id: s.last_sequence_number for s in stream.shards()}
            wait_until(lambda: pipeline.stats.committed == last, timeout=30, what="the checkpoints to catch up")
            assert pipeline.metrics.health().healthy
        finally:
            proxy.clear()
            assert pipeline.stop() is True
    assert sorted(r.event_id for r in sink.records) == sorted(r["eventID"] for r in stream.records())


def test_nothing_read_while_shards_are_unfinished_is_said(
    aws: EmbeddedAws, proxy: FaultProxy, make_settings: Callable[..., Settings]
) -> None:
    """The parent is read to its end, but neither its finish nor its child's lease can be written: no shard is
    read while two are unfinished, and health says so beside the checkpoint table."""
    simulator = StreamSimulator(clock=ManualClock(), rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=1)
    (parent,) = stream.open_shard_ids()
    stream.put_item(item("a", 1))
    with SimulatedStreamsServer(simulator, backend_url=proxy.endpoint_url) as server:
        settings = make_settings(
            source={"table_name": None, "stream_arn": stream.arn, "endpoint_url": server.endpoint_url},
            metrics=STALL,
            retry=QUICK_RETRY,
            reader={"discovery_interval_seconds": 0.2},
        )
        sink = GateSink()
        pipeline = Pipeline(settings, sinks=[sink], clients=AwsClients(aws.region, server.endpoint_url))
        pipeline.start()
        try:
            child = stream.roll_over_shard(parent)
            stream.put_item(item("a", 2))
            wait_until(lambda: any(s.shard_id == child for s in pipeline.lineage.shards()), what="the child listed")
            proxy.inject(amz_target("DynamoDB_20120810.UpdateItem"), Fault("status", 500, "InternalServerError"))
            sink.up.set()

            def reasons() -> str:
                return "\n".join(pipeline.metrics.health().reasons)

            wait_until(
                lambda: "no shard has been read" in reasons() and "checkpoint table" in reasons(),
                timeout=10,
                what="health to say both",
            )
            assert pipeline.scheduler.active_shard_ids() == set()
            proxy.clear()
            wait_until(lambda: len(sink.records) == 2, what="the child's change, once the table is back")
        finally:
            proxy.clear()
            pipeline.stop(timeout=5)
    assert [int(r.new_image["version"]) for r in sink.records] == [1, 2]


def test_a_sink_buffering_longer_than_stall_seconds_is_not_a_stall(
    dynamodb: Any, table: str, bucket: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        metrics=STALL,
        sinks=[{"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 4.0}],
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        for n in range(5):
            dynamodb.put_item(TableName=table, Item=_item(n))
        wait_until(lambda: pipeline.stats.records_read == 5, what="the changes read")
        observed = []
        deadline = time.monotonic() + 3.0  # three stall periods inside one buffer period
        while time.monotonic() < deadline:
            observed.append(pipeline.metrics.health())
            time.sleep(0.2)
        assert pipeline.stats.committed == {}, "the archive flushed early: the test shows nothing"
        assert all(h.healthy for h in observed), next(h.reasons for h in observed if not h.healthy)
        wait_until(lambda: bool(pipeline.stats.committed), timeout=10, what="the buffer's flush")
    finally:
        assert pipeline.stop() is True


def test_a_sink_past_its_byte_limit_flushes_without_waiting_for_the_others(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    s3 = aws.client("s3")
    small, large = unique("small"), unique("large")
    for name in (small, large):
        s3.create_bucket(Bucket=name)
    settings = make_settings(
        sinks=[
            {
                "type": "s3_parquet",
                "name": "small",
                "bucket": small,
                "buffer_max_bytes": 1024,
                "buffer_max_seconds": 900,
            },
            {"type": "s3_parquet", "name": "large", "bucket": large},
        ]
    )
    # Written before the start, so the pipeline reads the 20 in one page and one batch: written while it ran,
    # on a loaded machine they came in batches of a few, and what came after the last flush could stay under
    # the 1024 bytes, held for the 900 s of its buffer.
    for n in range(20):
        dynamodb.put_item(TableName=table, Item=_item(n))
    last = max((r["dynamodb"]["SequenceNumber"] for r in stream_records(aws, table)), key=int)
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        wait_until(lambda: list(pipeline.stats.committed.values()) == [last], timeout=30, what="a flush and checkpoint")
        assert read_archive(aws, small, prefix="").num_rows == 20
        assert read_archive(aws, large, prefix="").num_rows == 20  # flushed with it: the checkpoint needs both
    finally:
        assert pipeline.stop() is True


def _reasons(pipeline: Pipeline) -> str:
    return "\n".join(pipeline.metrics.health().reasons)


def test_a_sink_down_from_the_start_is_unhealthy_however_steady_the_trickle_of_changes(
    aws: EmbeddedAws, make_settings: Callable[..., Settings]
) -> None:
    """A shard that never committed in this process, and keeps getting new records, is still stalled: the clock
    runs from the oldest record read and not checkpointed, not from the newest page."""
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders", shards=1)
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn}, metrics=STALL)
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    pipeline = Pipeline(settings, sinks=[GateSink()], clients=clients)
    pipeline.start()
    try:
        deadline = time.monotonic() + 6
        n = 0
        while time.monotonic() < deadline and "nothing checkpointed" not in _reasons(pipeline):
            stream.put_item(item(f"k{n}", 1))
            n += 1
            time.sleep(0.3)
        reasons = _reasons(pipeline)
        assert "nothing checkpointed" in reasons and "sink gate: writes failing" in reasons
    finally:
        pipeline.stop(timeout=1)


def test_a_sink_down_while_a_shard_ends_is_unhealthy_after_its_reader_retired(
    aws: EmbeddedAws, make_settings: Callable[..., Settings]
) -> None:
    """The shard's last page is queued and its reader gone; the other shard is idle and read. Only the delivery
    side knows it is stuck: health names the failing sink."""
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=2)
    a, _b = stream.open_shard_ids()
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn}, metrics=STALL)
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    sink = GateSink()
    sink.up.set()
    pipeline = Pipeline(settings, sinks=[sink], clients=clients)
    pipeline.start()
    try:
        key = next(f"k{n}" for n in range(1000) if stream.shard_for(item(f"k{n}", 0)) == a)
        stream.put_item(item(key, 1))
        wait_until(lambda: a in pipeline.stats.committed, what="a first commit")
        sink.up.clear()
        stream.put_item(item(key, 2))
        stream.roll_over_shard(a)
        wait_until(lambda: a not in pipeline.scheduler.progress, what="A's reader to retire")
        wait_until(lambda: "sink gate: writes failing" in _reasons(pipeline), timeout=10, what="health to notice")
    finally:
        sink.up.set()
        pipeline.stop(timeout=2)
