"""The whole pipeline against a real moto server: DynamoDB, Streams and S3 over HTTP."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from typing import Any

import orjson
from boto3.dynamodb.types import TypeDeserializer

from pipeline.ops.demo import _item, write_changes
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.memory import FlakySink, MemorySink
from tests.conftest import read_archive, stream_records, wait_until


def _plain(value: Any) -> Any:
    """TypeDeserializer output -> the archive's JSON form (exact numbers, base64 binary, sorted sets)."""
    return json.loads(orjson.dumps(_sets_sorted(value), default=_default), parse_float=Decimal)


def _sets_sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sets_sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sets_sorted(v) for v in value]
    if isinstance(value, set):
        return sorted(value, key=lambda v: v.value if hasattr(v, "value") else v)
    return value


def _default(value: Any) -> Any:
    import base64

    from boto3.dynamodb.types import Binary

    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    if isinstance(value, Binary):
        return base64.b64encode(value.value).decode()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(type(value))


def _run_until_delivered(pipeline: Pipeline, expected: int) -> None:
    wait_until(
        lambda: sum(pipeline.stats.events.values()) >= expected or pipeline.fatal is not None,
        what=f"{expected} changes delivered",
    )
    assert pipeline.fatal is None, pipeline.fatal


def test_archive_holds_every_change_exactly_once_with_exact_values(
    aws: EmbeddedAws, dynamodb: Any, table: str, bucket: str, make_settings: Callable[..., Settings]
) -> None:
    # Plain-JSON images, compared value by value below (the default, dynamodb_json, is tests/test_lazy_images.py's).
    archive = {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.5}
    pipeline = Pipeline(make_settings(sinks=[{**archive, "image_encoding": "json"}]))
    pipeline.start()
    written = write_changes(dynamodb, table, 40)
    _run_until_delivered(pipeline, sum(written.values()))
    assert pipeline.stop() is True

    truth = stream_records(aws, table)
    archive = read_archive(aws, bucket)
    rows = archive.to_pylist()
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(truth) == sum(written.values())
    assert collections.Counter(r["event_name"] for r in rows) == written

    by_id = {r["event_id"]: r for r in rows}
    deserialize = TypeDeserializer().deserialize
    for record in truth:
        row = by_id[record["eventID"]]
        ddb = record["dynamodb"]
        assert row["sequence_number"] == ddb["SequenceNumber"]
        assert row["event_name"] == record["eventName"]
        assert row["table"] == table
        assert row["approximate_creation_time"] == ddb["ApproximateCreationDateTime"].astimezone(UTC)
        time = row["approximate_creation_time"]
        assert (row["dt"], int(row["hour"])) == (f"{time:%Y-%m-%d}", time.hour)
        for column, image in (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage")):
            if image not in ddb:
                assert row[column] is None
                continue
            expected = _plain({k: deserialize(v) for k, v in ddb[image].items()})
            assert json.loads(row[column], parse_float=Decimal) == expected
    # 38 significant digits survive as the exact digit string, not via a float.
    insert = next(r for r in rows if r["event_name"] == "INSERT")
    assert '"precise":1234567890123456789012345678.9012345678' in insert["new_image"]

    store = CheckpointStore(
        dynamodb,
        table_name=pipeline.settings.checkpoint.table_name,
        stream_arn=pipeline.stream_arn,
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    )
    checkpoints = store.load()
    last = max(truth, key=lambda r: int(r["dynamodb"]["SequenceNumber"]))
    assert [c.sequence_number for c in checkpoints.values()] == [last["dynamodb"]["SequenceNumber"]]


def test_restart_resumes_after_the_checkpoint_with_nothing_lost_or_repeated(
    aws: EmbeddedAws, dynamodb: Any, table: str, bucket: str, make_settings: Callable[..., Settings]
) -> None:
    first = Pipeline(make_settings())
    first.start()
    for n in range(15):
        dynamodb.put_item(TableName=table, Item=_item(n))
    _run_until_delivered(first, 15)
    assert first.stop() is True

    for n in range(15, 35):  # written while nothing runs
        dynamodb.put_item(TableName=table, Item=_item(n))

    second = Pipeline(make_settings())
    second.start()
    _run_until_delivered(second, 20)
    assert second.stop() is True
    assert sum(second.stats.events.values()) == 20

    ids = read_archive(aws, bucket).column("event_id").to_pylist()
    assert sorted(ids) == sorted(r["eventID"] for r in stream_records(aws, table))
    assert len(ids) == len(set(ids)) == 35


def test_latest_skips_history_and_reads_what_follows(
    dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    for n in range(5):
        dynamodb.put_item(TableName=table, Item=_item(n))
    sink = MemorySink()
    pipeline = Pipeline(make_settings(source={"starting_position": "LATEST"}), sinks=[sink])
    pipeline.start()
    for n in range(100, 103):
        dynamodb.put_item(TableName=table, Item=_item(n))
    wait_until(lambda: len(sink.records) >= 3, what="3 new changes")
    assert pipeline.stop() is True
    assert sorted(r.keys["sk"] for r in sink.records) == ["order#00100", "order#00101", "order#00102"]


def test_refused_records_are_dead_lettered_and_the_shard_moves_on(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    poison = {"order#00003", "order#00007"}

    def refuse(record: Any) -> PermanentSinkError | None:
        return PermanentSinkError("item too large for the destination") if record.keys["sk"] in poison else None

    sink = FlakySink(refuse=refuse)
    settings = make_settings()
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    for n in range(10):
        dynamodb.put_item(TableName=table, Item=_item(n))
    wait_until(lambda: pipeline.dead_letters.count >= 2 and len(sink.records) >= 8, what="delivery")
    assert pipeline.stop() is True

    expected = [f"order#{n:05d}" for n in range(10) if n not in (3, 7)]
    assert sorted(r.keys["sk"] for r in sink.records) == expected
    with open(settings.dead_letter.path) as lines:
        letters = [json.loads(line) for line in lines]
    assert sorted(letter["record"]["dynamodb"]["Keys"]["sk"]["S"] for letter in letters) == sorted(poison)
    assert {letter["sink"] for letter in letters} == {"flaky"}
    assert all("too large" in letter["error"] for letter in letters)
    last = max(stream_records(aws, table), key=lambda r: int(r["dynamodb"]["SequenceNumber"]))
    assert list(pipeline.stats.committed.values()) == [last["dynamodb"]["SequenceNumber"]]


def test_readers_wait_at_the_bounded_queue_and_nothing_is_lost(
    dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    for n in range(60):
        dynamodb.put_item(TableName=table, Item=_item(n))
    sink = MemorySink()
    settings = make_settings(batch={"queue_capacity": 10, "max_records": 4}, reader={"get_records_limit": 5})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    wait_until(lambda: len(sink.records) >= 60, what="60 changes")
    assert pipeline.stop() is True
    assert pipeline.queue.peak_records <= 10
    assert [r.keys["sk"] for r in sink.records] == [f"order#{n:05d}" for n in range(60)]
