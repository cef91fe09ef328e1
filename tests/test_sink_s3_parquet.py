"""The archive sink's objects: one per (hour, shard), rows in stream order; a flush that fails part-way has still
written every part it could and keeps exactly the ones it could not, and reports a refusal before an outage.

The sink writes to the moto server through s3fs and pyarrow; failures come from `FaultProxy` on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.records import Batch, ChangeRecord
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.s3_parquet import S3ParquetSink, S3ParquetSinkSettings
from tests.factories import change_record
from tests.fault_proxy import RESET_AFTER_FORWARD, SLOW_DOWN, Fault, FaultProxy, RequestInfo

HOUR_END = datetime(2026, 5, 27, 10, 59, 58, tzinfo=UTC)


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


def _sink(aws: EmbeddedAws, bucket: str, endpoint_url: str | None = None) -> S3ParquetSink:
    sink = S3ParquetSink(
        S3ParquetSinkSettings(type="s3_parquet", bucket=bucket, prefix="orders"),
        region=aws.region,
        endpoint_url=endpoint_url or aws.endpoint_url,
    )
    sink.open()
    return sink


def _record(shard: str, sequence: int, created: datetime) -> ChangeRecord:
    return change_record(shard_id=shard, sequence=sequence, created=created, event_id=f"{shard}-{sequence}")


def _objects(aws: EmbeddedAws, bucket: str) -> dict[str, list[str]]:
    """Object key (below the bucket) -> the event ids it holds, in row order."""
    fs = s3fs.S3FileSystem(endpoint_url=aws.endpoint_url, skip_instance_cache=True)
    found: dict[str, list[str]] = {}
    for path in sorted(fs.find(bucket)):
        with fs.open(path, "rb") as file:
            found[path.removeprefix(f"{bucket}/")] = pq.read_table(file).column("event_id").to_pylist()
    return found


def test_rows_go_to_one_object_per_hour_and_shard_in_stream_order(aws: EmbeddedAws, bucket: str) -> None:
    sink = _sink(aws, bucket)
    # Two shards interleaved, each crossing 11:00 in the middle of a batch, over two batches.
    seconds = [0, 1, 2, 3, 4, 5]  # 10:59:58, 10:59:59, 11:00:00, ...
    first = [
        _record(shard, 100 + i, HOUR_END + timedelta(seconds=s)) for i, s in enumerate(seconds[:3]) for shard in "ab"
    ]
    second = [
        _record(shard, 100 + i, HOUR_END + timedelta(seconds=s))
        for i, s in enumerate(seconds)
        if i >= 3
        for shard in "ab"
    ]
    for batch in (first, second):
        assert sink.write(Batch(tuple(batch), sum(r.size_bytes for r in batch))).failed == {}
    sink.flush()
    sink.close()

    assert _objects(aws, bucket) == {
        "orders/dt=2026-05-27/hour=10/a-100-101.parquet": ["a-100", "a-101"],
        "orders/dt=2026-05-27/hour=10/b-100-101.parquet": ["b-100", "b-101"],
        "orders/dt=2026-05-27/hour=11/a-102-105.parquet": ["a-102", "a-103", "a-104", "a-105"],
        "orders/dt=2026-05-27/hour=11/b-102-105.parquet": ["b-102", "b-103", "b-104", "b-105"],
    }
    assert sink.buffered_bytes == 0


def test_a_flush_that_fails_part_way_keeps_only_the_unwritten_parts(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy
) -> None:
    sink = _sink(aws, bucket, proxy.endpoint_url)
    shards = [f"shard{n:02d}" for n in range(20)]  # more parts than upload threads
    records = [_record(shard, 7, HOUR_END) for shard in shards]
    sink.write(Batch(tuple(records), sum(r.size_bytes for r in records)))
    one_part = sink.buffered_bytes // len(shards)

    def three_shards(request: RequestInfo) -> bool:
        return request.method == "PUT" and any(
            f"/{shard}-7-7" in request.path for shard in ("shard03", "shard11", "shard17")
        )

    proxy.inject(three_shards, SLOW_DOWN)
    with pytest.raises(RetryableSinkError, match=r"SlowDown|503"):
        sink.flush()
    written = _objects(aws, bucket)
    assert sorted(written) == sorted(
        f"orders/dt=2026-05-27/hour=10/{shard}-7-7.parquet"
        for shard in shards
        if shard not in ("shard03", "shard11", "shard17")
    )
    assert sink.buffered_bytes == pytest.approx(3 * one_part, rel=0.2)
    assert not sink.flush_due(float("-inf"))  # still holding rows: not "nothing to flush"

    proxy.clear()
    sink.flush()
    sink.close()
    final = _objects(aws, bucket)
    assert len(final) == len(shards)
    assert {ids[0] for ids in final.values()} == {f"{shard}-7" for shard in shards}
    assert sink.buffered_bytes == 0 and sink.flush_due(0.0)


def test_rows_written_while_a_failed_flush_waits_for_its_retry_do_not_rename_its_objects(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy
) -> None:
    """The lanes go on writing between a failed flush and its retry. An upload whose answer was lost may have been
    stored: the retry must write the same object name, or the rows it holds would be archived twice."""
    sink = _sink(aws, bucket, proxy.endpoint_url)
    first = _record("shard00", 7, HOUR_END)
    sink.write(Batch((first,), first.size_bytes))
    proxy.inject(lambda request: request.method == "PUT", RESET_AFTER_FORWARD)
    with pytest.raises(RetryableSinkError):
        sink.flush()
    assert sorted(_objects(aws, bucket)) == ["orders/dt=2026-05-27/hour=10/shard00-7-7.parquet"]  # stored anyway
    later = _record("shard00", 8, HOUR_END)
    sink.write(Batch((later,), later.size_bytes))
    proxy.clear()
    sink.flush()
    sink.close()
    assert _objects(aws, bucket) == {
        "orders/dt=2026-05-27/hour=10/shard00-7-7.parquet": ["shard00-7"],
        "orders/dt=2026-05-27/hour=10/shard00-8-8.parquet": ["shard00-8"],
    }
    assert sink.buffered_bytes == 0 and sink.flush_due(0.0)


def test_flush_with_nothing_buffered_writes_nothing(aws: EmbeddedAws, bucket: str) -> None:
    sink = _sink(aws, bucket)
    sink.flush()
    sink.close()
    assert _objects(aws, bucket) == {}


def test_a_refused_part_outranks_an_outage_in_what_flush_raises(
    aws: EmbeddedAws, bucket: str, proxy: FaultProxy
) -> None:
    sink = _sink(aws, bucket, proxy.endpoint_url)
    records = [_record(shard, 7, HOUR_END) for shard in ("a", "b", "c")]
    sink.write(Batch(tuple(records), sum(r.size_bytes for r in records)))

    def shard(name: str) -> Callable[[RequestInfo], bool]:
        return lambda request: request.method == "PUT" and f"/{name}-7-7" in request.path

    proxy.inject(shard("a"), SLOW_DOWN)  # first in buffer order
    proxy.inject(shard("c"), Fault("status", 403, "AccessDenied"))
    with pytest.raises(PermanentSinkError, match="c-7-7"):
        sink.flush()
    assert list(_objects(aws, bucket)) == ["orders/dt=2026-05-27/hour=10/b-7-7.parquet"]
    sink.close()


def test_a_record_whose_stream_position_cannot_name_an_object_is_refused_not_written_elsewhere(
    aws: EmbeddedAws, bucket: str
) -> None:
    sink = _sink(aws, bucket)
    good = _record("shardId-00000001-aa", 7, HOUR_END)
    escaping = change_record(shard_id="../../elsewhere", sequence=8, event_id="escaping")
    odd_sequence = change_record(shard_id="shardId-00000001-aa", sequence=9, event_id="odd")
    odd_sequence = replace(odd_sequence, sequence_number="9/../../x")
    result = sink.write(Batch((good, escaping, odd_sequence), 3))
    assert set(result.failed) == {"escaping", "odd"}
    assert all(isinstance(e, PermanentSinkError) for e in result.failed.values())
    assert "shard id" in str(result.failed["escaping"]) and "sequence number" in str(result.failed["odd"])
    sink.flush()
    sink.close()
    assert list(_objects(aws, bucket)) == ["orders/dt=2026-05-27/hour=10/shardId-00000001-aa-7-7.parquet"]
