"""Filters end to end against a moto server: a pipeline-wide filter and two sinks with their own filters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings, load_settings
from pipeline.state.checkpoint import CheckpointStore
from sinks.memory import MemorySink
from tests.conftest import stream_records, wait_until


def _put(dynamodb: Any, table: str, pk: str, **attributes: str) -> None:
    item = {"pk": {"S": pk}, "sk": {"S": "profile"}, **{k: {"S": v} for k, v in attributes.items()}}
    dynamodb.put_item(TableName=table, Item=item)


def _set(dynamodb: Any, table: str, pk: str, name: str, value: str) -> None:
    dynamodb.update_item(
        TableName=table,
        Key={"pk": {"S": pk}, "sk": {"S": "profile"}},
        UpdateExpression="SET #n = :v",
        ExpressionAttributeNames={"#n": name},
        ExpressionAttributeValues={":v": {"S": value}},
    )


def _delete(dynamodb: Any, table: str, pk: str) -> None:
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": pk}, "sk": {"S": "profile"}})


def test_each_sink_gets_what_its_filter_admits_and_the_checkpoint_passes_filtered_records(
    dynamodb: Any, aws: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    sinks = [
        {
            "type": "memory",
            "name": "customer-status",
            "filter": {"keys": {"pk": {"prefix": "customer#"}}, "changed_attributes": ["status"]},
        },
        {"type": "memory", "name": "lifecycle", "filter": {"event_names": ["INSERT", "REMOVE"]}, "project": ["status"]},
    ]
    base = make_settings(sinks=sinks)
    # Test records never reach any sink.
    settings = load_settings(**{**base.model_dump(), "filter": {"exclude": [{"keys": {"pk": {"prefix": "test#"}}}]}})
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        _put(dynamodb, table, "customer#1", status="new", note="a")  # 0 INSERT
        _set(dynamodb, table, "customer#1", "note", "b")  # 1 MODIFY of `note` only
        _set(dynamodb, table, "customer#1", "status", "paid")  # 2 MODIFY of `status`
        _put(dynamodb, table, "order#1", status="open")  # 3 INSERT
        _put(dynamodb, table, "test#1", status="new")  # 4 INSERT, excluded pipeline-wide
        _delete(dynamodb, table, "customer#1")  # 5 REMOVE
        _delete(dynamodb, table, "test#1")  # 6 REMOVE, excluded pipeline-wide: the last record of the shard
        wait_until(
            lambda: sum(pipeline.stats.events.values()) >= 7 or pipeline.fatal is not None, what="7 changes handled"
        )
    finally:
        assert pipeline.stop() is True, pipeline.fatal

    truth = stream_records(aws, table)
    assert [(r["eventName"], r["dynamodb"]["Keys"]["pk"]["S"]) for r in truth] == [
        ("INSERT", "customer#1"),
        ("MODIFY", "customer#1"),
        ("MODIFY", "customer#1"),
        ("INSERT", "order#1"),
        ("INSERT", "test#1"),
        ("REMOVE", "customer#1"),
        ("REMOVE", "test#1"),
    ]
    ids = [r["eventID"] for r in truth]
    customer_status, lifecycle = pipeline.sinks
    assert isinstance(customer_status, MemorySink) and isinstance(lifecycle, MemorySink)

    # The MODIFY that touched only `note` is dropped; the one that changed `status` is kept.
    assert [r.event_id for r in customer_status.records] == [ids[0], ids[2], ids[5]]
    assert [r.event_id for r in lifecycle.records] == [ids[0], ids[3], ids[5]]
    # The projection keeps `status` and the keys, in the images and in the stream record alike.
    for given in lifecycle.records:
        image = given.new_image if given.event_name == "INSERT" else given.old_image
        assert image is not None and set(image) == {"pk", "sk", "status"}
        assert set(given.raw["dynamodb"]["NewImage" if given.event_name == "INSERT" else "OldImage"]) == set(image)
    assert customer_status.records[0].new_image == {"pk": "customer#1", "sk": "profile", "status": "new", "note": "a"}

    assert pipeline.stats.filtered == 2
    assert pipeline.delivery.stats.filtered == {"customer-status": 2, "lifecycle": 2}
    assert pipeline.delivery.stats.delivered == {"customer-status": 3, "lifecycle": 3}
    assert pipeline.delivery.stats.dead_lettered == {}

    # The checkpoint covers the last record even though no sink took it: a restart does not read it again.
    store = CheckpointStore(
        dynamodb,
        table_name=settings.checkpoint.table_name,
        stream_arn=dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"],
        consumer_name=settings.checkpoint.consumer_name,
        retry=RetryPolicy(RetrySettings()),
    )
    assert [c.sequence_number for c in store.load().values()] == [truth[-1]["dynamodb"]["SequenceNumber"]]
