"""The DynamoDB replica sink against a real moto server: the replica equals the source, replays change nothing,
and refusals and throttling come back per record."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import ClientError, EndpointConnectionError

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery
from pipeline.delivery.feed import SinkFeed, SinkFeedSettings
from pipeline.ops.demo import _item, write_changes
from pipeline.records import Batch, ChangeRecord, change_record_from_stream
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, RetrySettings, Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError, RetryableSinkError
from sinks.dynamodb_table import SEQUENCE_WIDTH, DynamoDbTableSink, DynamoDbTableSinkSettings, padded_sequence
from tests.conftest import stream_records, unique, wait_until
from tests.factories import change_record

SEQUENCE = "_streamsink_sequence"
Key = tuple[Any, ...]
NOT_CALLABLE = 42  # a transform target that is not a function, for the config test
_NO_WAIT = RetryPolicy(
    RetrySettings(max_attempts=5, initial_delay_seconds=0, max_delay_seconds=0), sleep=lambda _: None
)

# --- transforms, imported by path as a user's would be -------------------------------------------------------


def order_summary(record: ChangeRecord) -> dict[str, Any] | None:
    """A view keyed (customer, order); changes of customer#3 are left out, deletes included."""
    if record.keys["pk"] == "customer#3":
        return None
    key = {"customer": record.keys["pk"], "order": record.keys["sk"]}
    if record.new_image is None:
        return key
    image = record.new_image
    return {**key, "total": image["amount"], "city": image["address"]["city"], "labels": set(image["tags"])}


def with_tag_count(record: ChangeRecord) -> dict[str, Any] | None:
    """The whole image plus a derived attribute; for a delete, nothing, so the key comes from the record."""
    if record.new_image is None:
        return {}
    return {**record.new_image, "tag_count": len(record.new_image["tags"])}


def unusable_for_some(record: ChangeRecord) -> dict[str, Any] | None:
    """Refusals of three kinds, picked by the order's sort key; every other change passes through."""
    assert record.new_image is not None
    sort_key = record.keys["sk"]
    if sort_key == "no-key":
        return {"pk": record.keys["pk"], "amount": Decimal(1)}
    if sort_key == "float":
        return {**record.new_image, "ratio": 0.5}
    if sort_key == "raises":
        raise KeyError("discount")
    return dict(record.new_image)


# --- helpers ---------------------------------------------------------------------------------------------------


def _create_table(dynamodb: Any, key: Sequence[str] = ("pk", "sk")) -> str:
    name = unique("replica")
    kinds = ("HASH", "RANGE")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": a, "KeyType": k} for a, k in zip(key, kinds, strict=False)],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in key],
    )
    return name


def _scan(
    dynamodb: Any, table: str, key: Sequence[str] = ("pk", "sk"), keep_sequence: bool = False
) -> dict[Key, dict[str, Any]]:
    """Every item as Python values, by key; the sink's sequence attribute left out unless asked for."""
    deserialize = TypeDeserializer().deserialize
    items: dict[Key, dict[str, Any]] = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table):
        for raw in page["Items"]:
            item = {n: deserialize(v) for n, v in raw.items() if keep_sequence or n != SEQUENCE}
            items[tuple(item[k] for k in key)] = item
    return items


def _changes(aws: EmbeddedAws, table: str) -> list[ChangeRecord]:
    """The source table's stream, read directly, as the pipeline would hand it to the sink."""
    return [change_record_from_stream(r, table=table, shard_id="shardId-1") for r in stream_records(aws, table)]


def _batch(records: Sequence[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))


def _churn(dynamodb: Any, table: str) -> int:
    """Deletes followed by re-inserts and updates of the same keys: the orders a replica most easily gets wrong.
    Returns the number of changes made."""
    changes = 0
    for n in (1, 2, 3):
        key = {"pk": {"S": f"customer#{n % 17}"}, "sk": {"S": f"order#{n:05d}"}}
        dynamodb.delete_item(TableName=table, Key=key)
        dynamodb.put_item(TableName=table, Item={**_item(n), "amount": {"N": "999.99"}})
        dynamodb.update_item(
            TableName=table,
            Key=key,
            UpdateExpression="SET coupon = :c",
            ExpressionAttributeValues={":c": {"S": "SPRING"}},
        )
        changes += 3
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "customer#4"}, "sk": {"S": "order#00004"}})
    return changes + 1


def _last_sequences(records: Sequence[ChangeRecord]) -> dict[Key, str]:
    last: dict[Key, str] = {}
    for record in records:
        last[(record.keys["pk"], record.keys["sk"])] = record.sequence_number
    return last


def _replicate(settings: Settings, make_changes: Callable[[], int]) -> int:
    """Start a pipeline, make changes, wait until it has delivered that many, stop it (even on failure).
    Returns how many changes there were."""
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        total = make_changes()
        wait_until(lambda: sum(pipeline.stats.events.values()) >= total or pipeline.fatal is not None, what="delivery")
    finally:
        clean = pipeline.stop()
    assert clean and pipeline.fatal is None, pipeline.fatal
    assert pipeline.delivery.stats.dead_lettered == {}
    return total


@pytest.fixture
def replica(dynamodb: Any) -> str:
    return _create_table(dynamodb)


@pytest.fixture
def make_sink(aws: EmbeddedAws) -> Iterator[Callable[..., DynamoDbTableSink]]:
    """Opened sinks for the test's moto server; closed afterwards."""
    opened: list[DynamoDbTableSink] = []

    def build(table: str, *, client: Any = None, **options: Any) -> DynamoDbTableSink:
        settings = DynamoDbTableSinkSettings(type="dynamodb_table", table_name=table, **options)
        sink = DynamoDbTableSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=client)
        sink.open()
        opened.append(sink)
        return sink

    yield build
    for sink in opened:
        sink.close()


class FaultyClient:
    """The real boto3 client, except for the calls `fault(operation, params)` picks: those raise its error.

    moto never throttles and never fails; this shows those answers to the sink exactly as botocore raises them.
    """

    def __init__(self, client: Any, fault: Callable[[str, Mapping[str, Any]], Exception | None]) -> None:
        self._client = client
        self._fault = fault
        self._lock = threading.Lock()
        self.calls: list[str] = []

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self._client, operation)

        def call(**params: Any) -> Any:
            with self._lock:
                self.calls.append(operation)
            error = self._fault(operation, params)
            if error is not None:
                raise error
            return method(**params)

        return call


def _client_error(code: str, status: int, operation: str = "PutItem") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def _sort_key(params: Mapping[str, Any]) -> str:
    return str((params.get("Item") or params.get("Key") or {}).get("sk", {}).get("S", ""))


# --- the replica equals the source -----------------------------------------------------------------------------


def test_after_a_pipeline_run_and_a_full_replay_the_replica_equals_the_source(
    aws: EmbeddedAws, dynamodb: Any, table: str, replica: str, make_settings: Callable[..., Settings]
) -> None:
    sinks = [{"type": "dynamodb_table", "table_name": replica}]
    total = _replicate(
        make_settings(sinks=sinks),
        lambda: sum(write_changes(dynamodb, table, 24).values()) + _churn(dynamodb, table),
    )

    source = _scan(dynamodb, table)
    assert len(source) == 24 - 5 - 1  # write_changes deletes every fifth order, _churn one more
    assert _scan(dynamodb, replica) == source
    # Every item carries the sequence of the last change to its key, padded to a fixed width.
    last = _last_sequences(_changes(aws, table))
    stored = {key: item[SEQUENCE] for key, item in _scan(dynamodb, replica, keep_sequence=True).items()}
    assert stored == {key: last[key].zfill(SEQUENCE_WIDTH) for key in source}

    # A second consumer has no checkpoints: it replays the whole stream into the same replica.
    _replicate(make_settings(sinks=sinks, checkpoint={"consumer_name": "replay"}), lambda: total)
    assert _scan(dynamodb, replica) == source
    assert {key: item[SEQUENCE] for key, item in _scan(dynamodb, replica, keep_sequence=True).items()} == stored


def test_replayed_duplicated_and_late_changes_leave_the_replica_equal_to_the_source(
    aws: EmbeddedAws, dynamodb: Any, table: str, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    write_changes(dynamodb, table, 20)
    _churn(dynamodb, table)
    changes = _changes(aws, table)
    source = _scan(dynamodb, table)
    sink = make_sink(replica)

    assert sink.write(_batch(changes)).ok
    assert _scan(dynamodb, replica) == source
    assert sink.write(_batch(changes)).ok  # the same batch again: every write is a duplicate
    assert _scan(dynamodb, replica) == source
    for start in (len(changes) // 3, len(changes) // 2):  # replay from a checkpoint in the middle
        assert sink.write(_batch(changes[start:])).ok
        assert _scan(dynamodb, replica) == source

    # Older changes after newer ones, one write each, newest first: none overwrites what is there.
    live = [r for r in changes if r.event_name != "REMOVE" and (r.keys["pk"], r.keys["sk"]) in source]
    for record in reversed(live):
        assert sink.write(_batch([record])).ok
    assert _scan(dynamodb, replica) == source


def test_sequence_numbers_of_different_lengths_compare_as_numbers(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    keys = {"pk": {"S": "customer#1"}, "sk": {"S": "order#1"}}
    older = "9" * 21  # as text, "999..." sorts after the newer "1000..."
    newer = "1" + "0" * 21
    newest = "9" * 40

    def change(sequence: str, version: str) -> ChangeRecord:
        return change_record(sequence=sequence, event_name="MODIFY", keys=keys, new_image={**keys, "v": {"S": version}})

    sink = make_sink(replica)
    assert sink.write(_batch([change(newer, "newer")])).ok
    assert sink.write(_batch([change(older, "older")])).ok  # taken: a newer change is already there
    assert _scan(dynamodb, replica, keep_sequence=True)[("customer#1", "order#1")] == {
        "pk": "customer#1",
        "sk": "order#1",
        "v": "newer",
        SEQUENCE: "0" * 18 + newer,
    }
    assert sink.write(_batch([change(newest, "newest")])).ok
    assert _scan(dynamodb, replica)[("customer#1", "order#1")]["v"] == "newest"
    assert padded_sequence(newest) == newest


def test_an_older_insert_after_a_remove_is_undone_when_the_remove_is_replayed(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    """The reasoning in the module docstring, shown: a delete leaves no sequence behind, so an older INSERT
    arriving alone brings the item back; replay from a checkpoint always carries the later REMOVE with it."""
    keys = {"pk": {"S": "customer#1"}, "sk": {"S": "order#1"}}
    insert = change_record(sequence="100000000000000000000", event_name="INSERT", keys=keys)
    remove = change_record(sequence="200000000000000000000", event_name="REMOVE", keys=keys)
    sink = make_sink(replica)

    assert sink.write(_batch([insert, remove])).ok
    assert _scan(dynamodb, replica) == {}
    assert sink.write(_batch([insert])).ok  # outside stream order: the item is back ...
    assert set(_scan(dynamodb, replica)) == {("customer#1", "order#1")}
    assert sink.write(_batch([insert, remove])).ok  # ... until the replay reaches the REMOVE
    assert _scan(dynamodb, replica) == {}
    assert sink.write(_batch([remove, insert])).ok  # one write applies a key's changes in sequence order
    assert _scan(dynamodb, replica) == {}


# --- projection, rename, transform ------------------------------------------------------------------------


def test_the_pipelines_projection_and_this_sinks_rename_shape_the_replica(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    replica: str,
    make_sink: Callable[..., DynamoDbTableSink],
    tmp_path: Path,
) -> None:
    write_changes(dynamodb, table, 12)
    _churn(dynamodb, table)
    sink = make_sink(replica, rename={"amount": "total"})
    feed = SinkFeed.of(SinkFeedSettings(project=["amount", "tags", "no_such_attribute"]))
    delivery = Delivery([sink], retry=_NO_WAIT, dead_letters=JsonlDeadLetters(tmp_path / "dead.jsonl"), feeds=[feed])
    delivery.deliver(_batch(_changes(aws, table)))

    assert delivery.stats.dead_lettered == {}
    expected = {
        key: {"pk": item["pk"], "sk": item["sk"], "total": item["amount"], "tags": item["tags"]}
        for key, item in _scan(dynamodb, table).items()
    }
    assert _scan(dynamodb, replica) == expected


def test_rename_maps_attributes_and_a_key_attribute_onto_the_target_tables_key(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    write_changes(dynamodb, table, 12)
    _churn(dynamodb, table)
    target = _create_table(dynamodb, key=("customer", "sk"))
    sink = make_sink(target, rename={"pk": "customer", "amount": "total"})
    assert sink.write(_batch(_changes(aws, table))).ok

    renames = {"pk": "customer", "amount": "total"}
    expected = {key: {renames.get(n, n): v for n, v in item.items()} for key, item in _scan(dynamodb, table).items()}
    assert _scan(dynamodb, target, key=("customer", "sk")) == expected


def test_renaming_a_key_attribute_to_a_name_outside_the_tables_key_fails_at_open(
    aws: EmbeddedAws, replica: str
) -> None:
    settings = DynamoDbTableSinkSettings(type="dynamodb_table", table_name=replica, rename={"sk": "order"})
    sink = DynamoDbTableSink(settings, region=aws.region, endpoint_url=aws.endpoint_url)
    with pytest.raises(PermanentSinkError, match=r"rename 'sk' -> 'order' would remove key attribute 'sk'"):
        sink.open()


def test_open_fails_clearly_when_the_table_does_not_exist(aws: EmbeddedAws) -> None:
    settings = DynamoDbTableSinkSettings(type="dynamodb_table", table_name="no-such-replica")
    sink = DynamoDbTableSink(settings, region=aws.region, endpoint_url=aws.endpoint_url)
    with pytest.raises(PermanentSinkError, match=r"table 'no-such-replica' does not exist in us-east-1"):
        sink.open()


def test_a_transform_builds_a_view_skips_changes_and_deletes_by_the_key_it_returns(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    write_changes(dynamodb, table, 40)  # includes deletes, some of them of customer#3
    changes = _changes(aws, table)
    assert any(r.event_name == "REMOVE" and r.keys["pk"] == "customer#3" for r in changes)
    view = _create_table(dynamodb, key=("customer", "order"))
    sink = make_sink(view, transform="tests.test_sink_dynamodb_table:order_summary")
    assert sink.write(_batch(changes)).ok

    expected = {
        key: {
            "customer": item["pk"],
            "order": item["sk"],
            "total": item["amount"],
            "city": item["address"]["city"],
            "labels": item["tags"],
        }
        for key, item in _scan(dynamodb, table).items()
        if item["pk"] != "customer#3"
    }
    assert expected
    assert _scan(dynamodb, view, key=("customer", "order")) == expected


def test_a_transform_returning_no_key_for_a_delete_deletes_by_the_records_keys(
    aws: EmbeddedAws, dynamodb: Any, table: str, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    write_changes(dynamodb, table, 15)
    _churn(dynamodb, table)
    sink = make_sink(replica, transform="tests.test_sink_dynamodb_table:with_tag_count")
    assert sink.write(_batch(_changes(aws, table))).ok
    expected = {key: {**item, "tag_count": len(item["tags"])} for key, item in _scan(dynamodb, table).items()}
    assert _scan(dynamodb, replica) == expected


def test_images_in_wire_form_are_written_with_binary_decoded_once(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    keys = {"pk": {"S": "customer#1"}, "sk": {"S": "order#1"}}
    image = {
        **keys,
        "blob": {"B": base64.b64encode(b"\x00\xff").decode()},
        "chunks": {"BS": [base64.b64encode(b"\x01").decode()]},
        "nested": {"M": {"inner": {"L": [{"B": base64.b64encode(b"\x02").decode()}]}}},
        "precise": {"N": "1234567890123456789012345678.9012345678"},
    }
    sink = make_sink(replica)
    assert sink.write(_batch([change_record(sequence="100000000000000000001", keys=keys, new_image=image)])).ok
    item = _scan(dynamodb, replica)[("customer#1", "order#1")]
    assert item["blob"] == b"\x00\xff"
    assert item["chunks"] == {b"\x01"}
    assert item["nested"]["inner"][0] == b"\x02"
    assert str(item["precise"]) == "1234567890123456789012345678.9012345678"


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ("tests.no_such_module:f", "module 'tests.no_such_module' cannot be imported"),
        ("tests.test_sink_dynamodb_table:no_such_function", "has no 'no_such_function'; define"),
        ("tests.test_sink_dynamodb_table:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
        ("tests.test_sink_dynamodb_table.order_summary", 'must be "package.module:function"'),
    ],
)
def test_a_bad_transform_path_is_a_config_error_naming_the_key_and_the_fix(transform: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(
            source={"table_name": "orders"},
            sinks=[{"type": "memory"}, {"type": "dynamodb_table", "table_name": "replica", "transform": transform}],
        )
    assert len(error.value.lines) == 1
    assert error.value.lines[0].startswith("sinks[1].transform: ")
    assert message in error.value.lines[0]


def test_rename_to_one_name_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"sinks\[0\]: rename: several attributes renamed to \['total'\]"):
        load_settings(
            source={"table_name": "orders"},
            sinks=[{"type": "dynamodb_table", "table_name": "replica", "rename": {"amount": "total", "sum": "total"}}],
        )


# --- refusals and throttling, per record ----------------------------------------------------------------------


def test_items_dynamodb_refuses_are_failed_per_record_and_the_rest_are_taken(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    def keys(sort_key: str) -> dict[str, Any]:
        return {"pk": {"S": "customer#1"}, "sk": {"S": sort_key}}

    good = [change_record(sequence=10**20 + n, keys=keys(f"order#{n}")) for n in range(3)]
    too_large = change_record(
        sequence=10**20 + 10, keys=keys("huge"), new_image={**keys("huge"), "blob": {"S": "x" * 410_000}}
    )
    keys_only = change_record(sequence=10**20 + 11, keys=keys("keys-only"), view_type="KEYS_ONLY")
    sink = make_sink(replica)

    result = sink.write(_batch([good[0], too_large, good[1], keys_only, good[2]]))
    assert set(result.failed) == {too_large.event_id, keys_only.event_id}
    assert isinstance(result.failed[too_large.event_id], PermanentSinkError)
    assert "ValidationException" in str(result.failed[too_large.event_id])
    assert "Item size has exceeded the maximum allowed size" in result.failed[too_large.event_id].full_text()
    assert isinstance(result.failed[keys_only.event_id], PermanentSinkError)
    assert "carries no NewImage" in str(result.failed[keys_only.event_id])
    assert set(_scan(dynamodb, replica)) == {("customer#1", f"order#{n}") for n in range(3)}


def test_a_transform_result_that_cannot_be_written_is_failed_per_record_with_the_reason(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    def record(sort_key: str, sequence: int) -> ChangeRecord:
        return change_record(sequence=10**20 + sequence, keys={"pk": {"S": "c"}, "sk": {"S": sort_key}})

    refused = {"no-key": record("no-key", 1), "float": record("float", 2), "raises": record("raises", 3)}
    taken = [record("order#1", 4), record("order#2", 5)]
    sink = make_sink(replica, transform="tests.test_sink_dynamodb_table:unusable_for_some")

    result = sink.write(_batch([*refused.values(), *taken]))
    reasons = {name: str(result.failed[r.event_id]) for name, r in refused.items()}
    assert set(result.failed) == {r.event_id for r in refused.values()}
    assert all(isinstance(e, PermanentSinkError) for e in result.failed.values())
    assert "has no key attribute 'sk'" in reasons["no-key"]
    assert "the transform must return them" in reasons["no-key"]
    assert "cannot store" in reasons["float"] and "(TypeError)" in reasons["float"]
    assert "Float types are not supported" in result.failed[refused["float"].event_id].full_text()
    assert "raised KeyError" in reasons["raises"]
    assert set(_scan(dynamodb, replica)) == {("c", "order#1"), ("c", "order#2")}


@pytest.mark.parametrize(
    "error",
    [
        _client_error("ProvisionedThroughputExceededException", 400),
        _client_error("ThrottlingException", 400),
        _client_error("InternalServerError", 500),
        _client_error("ServiceUnavailable", 503),
        EndpointConnectionError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com"),
    ],
    ids=["provisioned-throughput", "throttling", "500", "503", "connection"],
)
def test_throttled_and_server_failed_writes_come_back_retryable_and_later_changes_to_the_key_wait(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink], error: Exception
) -> None:
    def keys(sort_key: str) -> dict[str, Any]:
        return {"pk": {"S": "customer#1"}, "sk": {"S": sort_key}}

    first = change_record(sequence=10**20 + 1, keys=keys("a"), new_image={**keys("a"), "version": {"N": "1"}})
    second = change_record(
        sequence=10**20 + 2, keys=keys("a"), event_name="MODIFY", new_image={**keys("a"), "version": {"N": "2"}}
    )
    other = change_record(sequence=10**20 + 3, keys=keys("b"))
    failing = {first.event_id}

    def fault(operation: str, params: Mapping[str, Any]) -> Exception | None:
        sequence = params.get("ExpressionAttributeValues", {}).get(":seq", {}).get("S", "")
        return error if sequence == first.sequence_number.zfill(SEQUENCE_WIDTH) and failing else None

    sink = make_sink(replica, client=FaultyClient(dynamodb, fault))
    result = sink.write(_batch([first, second, other]))
    assert set(result.failed) == {first.event_id, second.event_id}
    assert all(isinstance(e, RetryableSinkError) for e in result.failed.values())
    assert f"held back: event {first.event_id}" in str(result.failed[second.event_id])
    assert set(_scan(dynamodb, replica)) == {("customer#1", "b")}  # the MODIFY did not go ahead alone

    failing.clear()  # the throttling is over; the pipeline writes the failed records again, in order
    assert sink.write(_batch([first, second])).ok
    assert _scan(dynamodb, replica)[("customer#1", "a")]["version"] == Decimal(2)


def test_delivery_retries_throttled_records_until_the_replica_is_complete(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink], tmp_path: Path
) -> None:
    records = [
        change_record(sequence=10**20 + n, keys={"pk": {"S": "c"}, "sk": {"S": f"order#{n % 4}"}}, event_name="MODIFY")
        for n in range(12)
    ]
    throttled: dict[str, int] = {}

    def fault(operation: str, params: Mapping[str, Any]) -> Exception | None:
        if operation != "put_item":
            return None
        sort_key = _sort_key(params)
        throttled[sort_key] = throttled.get(sort_key, 0) + 1
        # Each key's first two requests are throttled: the retries must get through, in order.
        return _client_error("ProvisionedThroughputExceededException", 400) if throttled[sort_key] <= 2 else None

    client = FaultyClient(dynamodb, fault)
    sink = make_sink(replica, client=client)
    delivery = Delivery([sink], retry=_NO_WAIT, dead_letters=JsonlDeadLetters(tmp_path / "dead.jsonl"))
    delivery.deliver(_batch(records))

    assert delivery.stats.dead_lettered == {}
    assert delivery.stats.delivered == {sink.name: 12}
    assert client.calls.count("put_item") > 12  # the faults really happened and were retried
    stored = _scan(dynamodb, replica, keep_sequence=True)
    assert {key[1]: item[SEQUENCE] for key, item in stored.items()} == {
        f"order#{n % 4}": str(10**20 + n).zfill(SEQUENCE_WIDTH) for n in range(8, 12)
    }


def test_permanent_client_errors_are_failed_per_record_not_retried(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    records = [change_record(sequence=10**20 + n, keys={"pk": {"S": "c"}, "sk": {"S": f"o{n}"}}) for n in range(3)]

    def fault(operation: str, params: Mapping[str, Any]) -> Exception | None:
        return _client_error("ValidationException", 400) if _sort_key(params) == "o1" else None

    sink = make_sink(replica, client=FaultyClient(dynamodb, fault))
    result = sink.write(_batch(records))
    assert list(result.failed) == [records[1].event_id]
    assert isinstance(result.failed[records[1].event_id], PermanentSinkError)
    assert "ValidationException" in str(result.failed[records[1].event_id])
    assert set(_scan(dynamodb, replica)) == {("c", "o0"), ("c", "o2")}


def test_one_keys_changes_are_applied_in_order_and_never_concurrently(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink], tmp_path: Path
) -> None:
    records = [
        change_record(
            sequence=10**20 + n,
            event_name="REMOVE" if n % 7 == 6 else "MODIFY",
            keys={"pk": {"S": "c"}, "sk": {"S": f"order#{n % 6}"}},
        )
        for n in range(48)
    ]
    lock = threading.Lock()
    in_flight: dict[str, int] = {}
    most_in_flight = 0
    overlaps: list[str] = []
    order: dict[str, list[str]] = {}
    overlapped = threading.Event()

    def watch(operation: str, params: Mapping[str, Any]) -> None:
        nonlocal most_in_flight
        sort_key = _sort_key(params)
        with lock:
            if in_flight.get(sort_key):
                overlaps.append(sort_key)
            in_flight[sort_key] = 1
            most_in_flight = max(most_in_flight, sum(in_flight.values()))
            if most_in_flight > 1:
                overlapped.set()
            order.setdefault(sort_key, []).append(params["ExpressionAttributeValues"][":seq"]["S"])
        # Hold the request open until another key's call is seen in flight too (or briefly, once one was):
        # overlapping calls are then seen however loaded the machine is.
        overlapped.wait(0.005 if overlapped.is_set() else 1.0)
        with lock:
            in_flight[sort_key] = 0

    def fault(operation: str, params: Mapping[str, Any]) -> Exception | None:
        if operation in ("put_item", "delete_item"):
            watch(operation, params)
        return None

    sink = make_sink(replica, client=FaultyClient(dynamodb, fault))
    dead_letters = JsonlDeadLetters(tmp_path / "dead.jsonl")
    delivery = Delivery([sink], retry=_NO_WAIT, dead_letters=dead_letters, concurrency=[6])
    delivery.deliver(_batch(list(reversed(records))))  # six lanes: different keys at once, one key on one lane
    assert delivery.stats.dead_lettered == {}

    assert overlaps == []
    assert most_in_flight > 1  # different keys did run at once
    for sort_key, sequences in order.items():
        assert sequences == sorted(sequences), sort_key
        assert len(sequences) == 8
    expected = {f"order#{n % 6}" for n in range(42, 48) if n % 7 != 6}
    assert {key[1] for key in _scan(dynamodb, replica)} == expected
