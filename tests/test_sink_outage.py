"""The S3 archive goes down while changes keep coming: readers wait at the bounded queue, checkpoints stay at
what is durable, and once S3 is back every change is archived exactly once.

The archive sink reaches moto through `FaultProxy`, which answers S3 with errors while the test says so; the
source and the checkpoint table talk to moto directly and keep working throughout.
"""

from __future__ import annotations

import collections
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.ops.demo import _item, write_changes
from pipeline.records import Batch
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import RetryableSinkError
from sinks.s3_parquet import S3ParquetSink, S3ParquetSinkSettings
from tests.conftest import read_archive, stream_records, wait_until
from tests.factories import change_record
from tests.fault_proxy import INTERNAL_ERROR, RESET, RESET_AFTER_FORWARD, SLOW_DOWN, Fault, FaultProxy, s3_bucket

QUEUE_CAPACITY = 60
PAGE = 20


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


def _settings_through(proxy: FaultProxy, bucket: str, make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        batch={"queue_capacity": QUEUE_CAPACITY, "max_records": PAGE, "max_wait_seconds": 0.1},
        reader={"get_records_limit": PAGE},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.05, "max_delay_seconds": 0.5},
        sinks=[
            {
                "type": "s3_parquet",
                "bucket": bucket,
                "prefix": "orders/",
                "buffer_max_seconds": 0.2,
                "endpoint_url": proxy.endpoint_url,
            }
        ],
    )


def _checkpoint(pipeline: Pipeline, dynamodb: Any) -> str | None:
    """The shard's checkpoint as stored in DynamoDB (moto's stream has one shard)."""
    store = CheckpointStore(
        dynamodb,
        table_name=pipeline.settings.checkpoint.table_name,
        stream_arn=pipeline.stream_arn,
        consumer_name=pipeline.settings.checkpoint.consumer_name,
        retry=RetryPolicy(RetrySettings()),
    )
    found = store.load()
    assert len(found) <= 1, found
    return next(iter(found.values())).sequence_number if found else None


def _last_sequence(aws: EmbeddedAws, table: str) -> str:
    return max((r["dynamodb"]["SequenceNumber"] for r in stream_records(aws, table)), key=int)


def _memory() -> dict[str, int]:
    """This process's resident set now and at its peak, in MiB (the moto server shares the process)."""
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"rss_mib": rss_kib // 1024, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def test_an_s3_outage_holds_readers_at_the_queue_and_loses_nothing(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    bucket: str,
    proxy: FaultProxy,
    make_settings: Callable[..., Settings],
) -> None:
    pipeline = Pipeline(_settings_through(proxy, bucket, make_settings))
    pipeline.start()
    try:
        for n in range(20):
            dynamodb.put_item(TableName=table, Item=_item(100_000 + n))
        before_outage = _last_sequence(aws, table)
        wait_until(lambda: _checkpoint(pipeline, dynamodb) == before_outage, what="the first changes checkpointed")
        memory = {"before": _memory()}

        outage = proxy.inject(s3_bucket(bucket), SLOW_DOWN)
        written = write_changes(dynamodb, table, 110)  # 187 changes: three times what the queue holds
        wait_until(lambda: pipeline.queue.depth[0] > QUEUE_CAPACITY - PAGE, what="the queue to fill")
        time.sleep(0.5)  # a poll already in flight when the queue filled still counts
        polls_when_full = pipeline.scheduler.polls
        read_when_full = pipeline.stats.records_read
        time.sleep(1.5)  # many idle-poll intervals (0.2 s): a reader that were not waiting would poll again
        memory["during"] = _memory()
        archive = pipeline.sinks[0]
        assert isinstance(archive, S3ParquetSink)
        held = {"queue_bytes": pipeline.queue.depth[1], "archive_buffer_bytes": archive.buffered_bytes}

        assert pipeline.scheduler.polls == polls_when_full, "a reader polled while the queue was full"
        assert pipeline.stats.records_read == read_when_full
        assert pipeline.queue.peak_records <= QUEUE_CAPACITY
        assert proxy.faults["status"] > 0, "the outage never reached the archive sink"
        # Nothing became durable during the outage, so nothing may be checkpointed past the first changes.
        assert _checkpoint(pipeline, dynamodb) == before_outage
        assert pipeline.stats.committed == {pipeline.lineage.shards()[0].shard_id: before_outage}
        assert read_archive(aws, bucket).num_rows == 20
        assert pipeline.fatal is None

        proxy.clear(outage)
        last = _last_sequence(aws, table)
        wait_until(lambda: _checkpoint(pipeline, dynamodb) == last, timeout=60, what="everything checkpointed")
        memory["after"] = _memory()
    finally:
        proxy.clear()
        clean = pipeline.stop()
    assert clean

    truth = stream_records(aws, table)
    rows = read_archive(aws, bucket).select(["event_id", "sequence_number", "event_name"]).to_pylist()
    assert len(truth) == 20 + sum(written.values())
    assert sorted(r["event_id"] for r in rows) == sorted(r["eventID"] for r in truth)  # each exactly once
    by_id = {r["event_id"]: r for r in rows}
    assert all(by_id[r["eventID"]]["sequence_number"] == r["dynamodb"]["SequenceNumber"] for r in truth)
    assert collections.Counter(r["event_name"] for r in rows) == written + collections.Counter(INSERT=20)
    print(
        f"\nS3 outage: {proxy.faults['status']} requests refused, queue peak {pipeline.queue.peak_records} of "
        f"{QUEUE_CAPACITY} records, held while down {held}, memory {memory}"
    )


@pytest.mark.parametrize(
    ("fault", "times"),
    [(INTERNAL_ERROR, 6), (RESET, 6), (RESET_AFTER_FORWARD, 3)],
    ids=["500-internal-error", "connection-reset", "reset-after-the-write-happened"],
)
def test_s3_failures_during_traffic_leave_every_change_archived_exactly_once(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    bucket: str,
    proxy: FaultProxy,
    make_settings: Callable[..., Settings],
    fault: Fault,
    times: int,
) -> None:
    """Including writes whose answer is lost after S3 stored them: the retry rewrites the same object name."""
    pipeline = Pipeline(_settings_through(proxy, bucket, make_settings))
    pipeline.start()
    try:
        for n in range(20):
            dynamodb.put_item(TableName=table, Item=_item(n))
        proxy.inject(s3_bucket(bucket), fault, times=times)
        for n in range(20, 50):
            dynamodb.put_item(TableName=table, Item=_item(n))
        last = _last_sequence(aws, table)
        wait_until(lambda: _checkpoint(pipeline, dynamodb) == last, timeout=60, what="everything checkpointed")
    finally:
        proxy.clear()
        clean = pipeline.stop()
    assert clean
    assert proxy.faults[fault.kind] == times
    ids = read_archive(aws, bucket).column("event_id").to_pylist()
    assert sorted(ids) == sorted(r["eventID"] for r in stream_records(aws, table))
    assert len(ids) == 50


def test_one_failed_s3_request_reaches_the_pipelines_retry_policy(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy
) -> None:
    """One 503 reaches the pipeline at once: the sink's clients do not retry underneath the retry policy."""
    sink = S3ParquetSink(
        S3ParquetSinkSettings(type="s3_parquet", bucket=bucket), region=aws.region, endpoint_url=proxy.endpoint_url
    )
    sink.open()
    record = change_record(sequence=7)
    sink.write(Batch((record,), record.size_bytes))
    proxy.inject(s3_bucket(bucket), SLOW_DOWN, times=1)
    with pytest.raises(RetryableSinkError):
        sink.flush()
