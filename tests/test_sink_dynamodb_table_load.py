"""The replica sink while an initial load runs, against the moto replica table: a load's copy of an item never
overwrites a stream change, in whichever order the two arrive, never brings back a deleted item, and overwrites
what was written before the load; tombstones exist only while the load runs and its clean-up removes exactly them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer

from pipeline.records import Batch, ChangeRecord, EventName
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.dynamodb_table import SEQUENCE_WIDTH, SNAPSHOT_SEQUENCE, DynamoDbTableSink, DynamoDbTableSinkSettings
from tests.factories import change_record, snapshot_change

SEQUENCE = "_streamsink_sequence"
LOAD = "_streamsink_load"
DELETED = "_streamsink_deleted"
THIS_LOAD = "load-2"
EARLIER_LOAD = "load-1"
Key = tuple[str, str]


def _key(n: int) -> dict[str, Any]:
    return {"pk": {"S": f"customer#{n}"}, "sk": {"S": f"order#{n}"}}


def _seq(n: int) -> str:
    """A stream sequence number of 21 digits; larger `n`, later change."""
    return f"{10**20 + n}"


def _change(n: int, event_name: EventName, sequence: int, value: str = "") -> ChangeRecord:
    keys = _key(n)
    return change_record(
        sequence=_seq(sequence), event_name=event_name, keys=keys, new_image={**keys, "v": {"S": value}}
    )


def _snapshot(n: int, value: str, *, load_id: str = THIS_LOAD, extra: dict[str, Any] | None = None) -> ChangeRecord:
    return snapshot_change({**_key(n), "v": {"S": value}, **(extra or {})}, load_id=load_id, segment=1, index=n)


def _batch(*records: ChangeRecord) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))


def _stored(dynamodb: Any, table: str) -> dict[Key, dict[str, Any]]:
    """Every item with every attribute (the sink's own included), as Python values, by key."""
    deserialize = TypeDeserializer().deserialize
    items: dict[Key, dict[str, Any]] = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True):
        for raw in page["Items"]:
            item = {name: deserialize(value) for name, value in raw.items()}
            items[(item["pk"], item["sk"])] = item
    return items


def _k(n: int) -> Key:
    return (f"customer#{n}", f"order#{n}")


def _tombstone(n: int, sequence: int, load_id: str = THIS_LOAD) -> dict[str, Any]:
    pk, sk = _k(n)
    return {"pk": pk, "sk": sk, SEQUENCE: _seq(sequence).zfill(SEQUENCE_WIDTH), LOAD: load_id, DELETED: True}


def _copied(n: int, value: str) -> dict[str, Any]:
    """The item as this load's copy of it leaves it."""
    pk, sk = _k(n)
    return {"pk": pk, "sk": sk, "v": value, SEQUENCE: SNAPSHOT_SEQUENCE, LOAD: THIS_LOAD}


def _taken(sink: DynamoDbTableSink, *records: ChangeRecord) -> None:
    """Write one batch; every record must be taken (a write skipped by its condition is taken, not failed)."""
    result = sink.write(_batch(*records))
    assert result.failed == {}


@pytest.fixture
def make_sink(aws: EmbeddedAws, dynamodb: Any) -> Iterator[Callable[..., DynamoDbTableSink]]:
    """Opened sinks on the test's client (one boto3 client less to build per sink); closed afterwards."""
    opened: list[DynamoDbTableSink] = []

    def build(table: str, *, client: Any = None, **options: Any) -> DynamoDbTableSink:
        settings = DynamoDbTableSinkSettings(type="dynamodb_table", table_name=table, **options)
        sink = DynamoDbTableSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=client or dynamodb)
        sink.open()
        opened.append(sink)
        return sink

    yield build
    for sink in opened:
        sink.close()


@pytest.fixture
def sink(replica: str, make_sink: Callable[..., DynamoDbTableSink]) -> DynamoDbTableSink:
    return make_sink(replica)


# --- a copy against the stream's changes ------------------------------------------------------------------


def test_a_remove_during_the_load_leaves_a_tombstone_that_an_older_copy_does_not_bring_back(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _change(1, "REMOVE", sequence=5))
    assert _stored(dynamodb, replica) == {_k(1): _tombstone(1, 5)}

    _taken(sink, _snapshot(1, "read before the delete"))
    assert _stored(dynamodb, replica) == {_k(1): _tombstone(1, 5)}


def test_a_modify_after_the_copy_overwrites_it(dynamodb: Any, replica: str, sink: DynamoDbTableSink) -> None:
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _snapshot(1, "copy"))
    assert _stored(dynamodb, replica)[_k(1)] == _copied(1, "copy")

    _taken(sink, _change(1, "MODIFY", sequence=5, value="changed"))
    stored = _stored(dynamodb, replica)[_k(1)]
    assert (stored["v"], stored[SEQUENCE], stored[LOAD]) == ("changed", _seq(5).zfill(SEQUENCE_WIDTH), THIS_LOAD)


def test_a_copy_arriving_after_a_modify_is_skipped_and_counts_as_taken(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _change(1, "MODIFY", sequence=5, value="changed"))
    before = _stored(dynamodb, replica)

    result = sink.write(_batch(_snapshot(1, "read before the change")))
    assert result.ok and result.failed == {}
    assert _stored(dynamodb, replica) == before
    assert before[_k(1)]["v"] == "changed"


def _written_by_stream_before_the_load(sink: DynamoDbTableSink) -> None:
    _taken(sink, _change(1, "MODIFY", sequence=9, value="before"))


def _written_during_an_earlier_load(sink: DynamoDbTableSink) -> None:
    sink.begin_initial_load(EARLIER_LOAD)
    _taken(sink, _change(1, "MODIFY", sequence=9, value="before"))
    sink.end_initial_load(EARLIER_LOAD)


def _copied_by_an_earlier_load(sink: DynamoDbTableSink) -> None:
    sink.begin_initial_load(EARLIER_LOAD)
    _taken(sink, _snapshot(1, "before", load_id=EARLIER_LOAD))
    sink.end_initial_load(EARLIER_LOAD)


def _deleted_during_an_earlier_load_not_cleaned_up(sink: DynamoDbTableSink) -> None:
    sink.begin_initial_load(EARLIER_LOAD)
    _taken(sink, _change(1, "REMOVE", sequence=9))
    sink.end_initial_load(EARLIER_LOAD)


@pytest.mark.parametrize(
    "written_before",
    [
        _written_by_stream_before_the_load,
        _written_during_an_earlier_load,
        _copied_by_an_earlier_load,
        _deleted_during_an_earlier_load_not_cleaned_up,
    ],
)
def test_what_was_written_before_this_load_is_overwritten_by_its_copy(
    dynamodb: Any,
    replica: str,
    sink: DynamoDbTableSink,
    written_before: Callable[[DynamoDbTableSink], None],
) -> None:
    written_before(sink)
    assert _k(1) in _stored(dynamodb, replica)

    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _snapshot(1, "copy"))
    assert _stored(dynamodb, replica)[_k(1)] == _copied(1, "copy")


def test_a_replayed_copy_after_a_modify_is_skipped(dynamodb: Any, replica: str, sink: DynamoDbTableSink) -> None:
    sink.begin_initial_load(THIS_LOAD)
    copy = _snapshot(1, "copy")
    _taken(sink, copy)
    _taken(sink, _change(1, "MODIFY", sequence=5, value="changed"))

    _taken(sink, copy)  # the same record again, as after a crash before its page was committed
    stored = _stored(dynamodb, replica)[_k(1)]
    assert (stored["v"], stored[SEQUENCE]) == ("changed", _seq(5).zfill(SEQUENCE_WIDTH))


@pytest.mark.parametrize("copy_first", [True, False], ids=["copy-then-remove", "remove-then-copy"])
def test_a_copy_and_a_remove_of_one_item_in_one_batch_end_deleted(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink, copy_first: bool
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    copy, remove = _snapshot(1, "copy"), _change(1, "REMOVE", sequence=5)
    _taken(sink, *((copy, remove) if copy_first else (remove, copy)))
    assert _stored(dynamodb, replica) == {_k(1): _tombstone(1, 5)}


def test_a_copy_the_table_refuses_is_failed_for_that_record_naming_the_put(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    refused = _snapshot(2, "copy", extra={"sk": {"N": "2"}})  # the replica's sort key is a string
    result = sink.write(_batch(_snapshot(1, "copy"), refused))

    assert set(result.failed) == {refused.event_id}
    error = result.failed[refused.event_id]
    assert isinstance(error, PermanentSinkError)
    assert str(error).startswith(f"PutItem of event {refused.event_id} into {replica!r}: ValidationException")
    assert set(_stored(dynamodb, replica)) == {_k(1)}


# --- while the load runs, and after -------------------------------------------------------------------------


def test_stream_writes_carry_the_load_while_it_runs_and_not_after(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _change(1, "INSERT", sequence=1, value="during"), _change(2, "INSERT", sequence=2))
    assert {key: item.get(LOAD) for key, item in _stored(dynamodb, replica).items()} == {
        _k(1): THIS_LOAD,
        _k(2): THIS_LOAD,
    }

    sink.end_initial_load(THIS_LOAD)
    _taken(sink, _change(1, "MODIFY", sequence=3, value="after"), _change(3, "INSERT", sequence=4))
    stored = _stored(dynamodb, replica)
    assert stored[_k(1)]["v"] == "after"
    assert LOAD not in stored[_k(1)] and LOAD not in stored[_k(3)]


def test_after_the_load_a_remove_deletes_and_leaves_no_tombstone(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _change(1, "INSERT", sequence=1), _change(2, "INSERT", sequence=2))
    sink.end_initial_load("another-load")  # not the one under way: it goes on
    _taken(sink, _change(1, "REMOVE", sequence=3))
    assert _stored(dynamodb, replica)[_k(1)] == _tombstone(1, 3)

    sink.end_initial_load(THIS_LOAD)
    _taken(sink, _change(2, "REMOVE", sequence=4))
    assert set(_stored(dynamodb, replica)) == {_k(1)}


# --- clean-up ---------------------------------------------------------------------------------------------


def test_clean_up_removes_exactly_this_loads_tombstones_and_counts_them(
    dynamodb: Any, replica: str, sink: DynamoDbTableSink
) -> None:
    _taken(sink, _change(4, "INSERT", sequence=1, value="ordinary"))
    sink.begin_initial_load(EARLIER_LOAD)
    _taken(sink, _change(3, "REMOVE", sequence=2))  # another load's tombstone
    sink.end_initial_load(EARLIER_LOAD)

    sink.begin_initial_load(THIS_LOAD)
    _taken(
        sink,
        _change(1, "REMOVE", sequence=10),
        _change(2, "REMOVE", sequence=11),
        _change(2, "INSERT", sequence=12, value="back"),  # replaces its tombstone
        _change(6, "REMOVE", sequence=13),
        _snapshot(5, "copy"),
    )
    sink.end_initial_load(THIS_LOAD)
    before = _stored(dynamodb, replica)
    assert before[_k(1)] == _tombstone(1, 10) and before[_k(6)] == _tombstone(6, 13)

    assert sink.clean_up_initial_load(THIS_LOAD) == 2
    after = _stored(dynamodb, replica)
    assert after == {key: item for key, item in before.items() if key not in (_k(1), _k(6))}
    assert after[_k(3)] == _tombstone(3, 2, EARLIER_LOAD)
    assert after[_k(2)]["v"] == "back" and DELETED not in after[_k(2)]
    assert sink.clean_up_initial_load(THIS_LOAD) == 0


class _ChangeBeforeDelete:
    """The real client; before its first DeleteItem, `change()` runs: a change of the item made after the clean-up's
    Scan read the tombstone."""

    def __init__(self, client: Any, change: Callable[[], None]) -> None:
        self._client = client
        self._change: Callable[[], None] | None = change

    def __getattr__(self, operation: str) -> Any:
        method = getattr(self._client, operation)
        if operation != "delete_item":
            return method

        def call(**params: Any) -> Any:
            change, self._change = self._change, None
            if change is not None:
                change()
            return method(**params)

        return call


def test_clean_up_leaves_a_tombstone_replaced_after_its_scan_read_it(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    writer = make_sink(replica)
    writer.begin_initial_load(THIS_LOAD)
    _taken(writer, _change(1, "REMOVE", sequence=10))
    cleaner = make_sink(
        replica,
        client=_ChangeBeforeDelete(dynamodb, lambda: _taken(writer, _change(1, "INSERT", sequence=11, value="back"))),
    )

    assert cleaner.clean_up_initial_load(THIS_LOAD) == 0
    stored = _stored(dynamodb, replica)[_k(1)]
    assert stored["v"] == "back" and DELETED not in stored


# --- shaping -------------------------------------------------------------------------------------------------


def test_rename_applies_to_copies(dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]) -> None:
    sink = make_sink(replica, rename={"amount": "total"})
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _snapshot(1, "copy", extra={"amount": {"N": "12.50"}}))
    stored = _stored(dynamodb, replica)[_k(1)]
    assert stored["total"] == Decimal("12.50") and "amount" not in stored
    assert (stored[SEQUENCE], stored[LOAD]) == (SNAPSHOT_SEQUENCE, THIS_LOAD)


def with_amount_in_cents(record: ChangeRecord) -> dict[str, Any] | None:
    """A transform, imported by path: the item with `amount` as whole cents."""
    assert record.new_image is not None
    item = dict(record.new_image)
    item["cents"] = int(item.pop("amount") * 100)
    return item


def test_a_transform_applies_to_copies_and_a_later_change_still_wins(
    dynamodb: Any, replica: str, make_sink: Callable[..., DynamoDbTableSink]
) -> None:
    sink = make_sink(replica, transform=f"{__name__}:with_amount_in_cents")
    sink.begin_initial_load(THIS_LOAD)
    _taken(sink, _snapshot(1, "copy", extra={"amount": {"N": "12.50"}}))
    stored = _stored(dynamodb, replica)[_k(1)]
    assert (stored["cents"], stored["v"]) == (1250, "copy") and "amount" not in stored

    later = change_record(
        sequence=_seq(5), event_name="MODIFY", keys=_key(1), new_image={**_key(1), "amount": {"N": "1"}}
    )
    _taken(sink, later)
    _taken(sink, _snapshot(1, "copy", extra={"amount": {"N": "12.50"}}))
    assert _stored(dynamodb, replica)[_k(1)]["cents"] == 100
