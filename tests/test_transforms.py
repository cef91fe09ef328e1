"""Per-sink record_transform and projection: resolution at config time, what a sink is given, and `raw` kept in
step with the images so that sinks forwarding the stream record never carry what was removed."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from boto3.dynamodb.types import TypeSerializer

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery, DeliveryBlockedError
from pipeline.delivery.feed import SinkFeed
from pipeline.delivery.filters import FilterSettings, compile_filter, parse_filter
from pipeline.delivery.transforms import TransformError, apply_transform, project
from pipeline.records import Batch, ChangeRecord, change_record_from_stream
from pipeline.retry import RetryPolicy
from pipeline.settings import ConfigError, RetrySettings, load_settings
from sinks.memory import MemorySink
from sinks.s3_parquet import archive_table
from tests.factories import change_record

_SERIALIZER = TypeSerializer()
HERE = "tests.test_transforms"


def _typed(image: dict[str, Any]) -> dict[str, Any]:
    return {name: _SERIALIZER.serialize(value) for name, value in image.items()}


def customer(event: str = "MODIFY", *, n: int = 1, **new: Any) -> ChangeRecord:
    keys = {"pk": f"customer#{n}", "sk": "profile"}
    image = {**keys, "email": f"c{n}@example.com", "status": "paid", "total": Decimal("12.50"), **new}
    return change_record(
        sequence=n,
        event_id=f"e{n}",
        event_name=event,  # type: ignore[arg-type]
        keys=_typed(keys),
        new_image=_typed(image),
        old_image=_typed({**image, "status": "new"}),
    )


# Transforms referenced by "tests.test_transforms:<name>", as a config file would.


def mask_email(record: ChangeRecord) -> ChangeRecord:
    assert record.new_image is not None
    return dataclasses.replace(record, new_image={**record.new_image, "email": "***"})


def drop_unpaid(record: ChangeRecord) -> ChangeRecord | None:
    return record if record.new_image and record.new_image.get("status") == "paid" else None


def explode(record: ChangeRecord) -> ChangeRecord:
    raise KeyError("email")


def as_dict(record: ChangeRecord) -> dict[str, Any]:
    return {"pk": record.keys["pk"]}


def add_float(record: ChangeRecord) -> ChangeRecord:
    return dataclasses.replace(record, new_image={**(record.new_image or {}), "ratio": 0.5})


def own_raw(record: ChangeRecord) -> ChangeRecord:
    return dataclasses.replace(record, new_image={}, raw={"eventID": record.event_id, "dynamodb": {}})


NOT_A_FUNCTION = 42


class Holder:
    @staticmethod
    def nested(record: ChangeRecord) -> ChangeRecord:
        return record


# -- config ---------------------------------------------------------------------------------------------------


def test_a_valid_transform_and_projection_load_and_resolve() -> None:
    loaded = load_settings(
        source={"table_name": "t"},
        sinks=[{"type": "memory", "record_transform": f"{HERE}:Holder.nested", "project": ["status"]}],
    )
    sink = loaded.sinks[0]
    assert sink.record_transform == f"{HERE}:Holder.nested" and sink.project == ["status"]
    feed = SinkFeed.of(sink)
    assert feed.transform is Holder.nested
    assert feed.keep == frozenset({"status"})


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("tests.test_transforms", 'must be "package.module:function", e.g. "myapp.masking:mask_email"'),
        ("no_such_package.masking:mask", "module 'no_such_package.masking' cannot be imported (ModuleNotFoundError"),
        (f"{HERE}:mask_emails", f"module '{HERE}' has no 'mask_emails'; define a function taking a ChangeRecord"),
        (f"{HERE}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function; name a function taking a ChangeRecord"),
    ],
)
def test_a_bad_transform_reference_is_one_line_naming_the_key_and_the_fix(reference: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(
            source={"table_name": "t"},
            sinks=[{"type": "memory"}, {"type": "memory", "record_transform": reference}],
        )
    assert len(raised.value.lines) == 1, raised.value.lines
    assert raised.value.lines[0].startswith(f"sinks[1].record_transform: {expected}")
    assert raised.value.lines[0].endswith(f"(got {reference!r})")


def test_a_transform_whose_module_fails_on_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_masking.py").write_text("import nothing_called_this\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        load_settings(source={"table_name": "t"}, sinks=[{"type": "memory", "record_transform": "broken_masking:f"}])
    assert "No module named 'nothing_called_this'" in raised.value.lines[0]


@pytest.mark.parametrize(
    ("project_value", "expected"),
    [([], "sinks[0].project: List should have at least 1 item"), (["a", ""], "sinks[0].project[1]: String should")],
)
def test_a_bad_projection_names_the_key(project_value: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(source={"table_name": "t"}, sinks=[{"type": "memory", "project": project_value}])
    assert raised.value.lines[0].startswith(expected)


# -- transforms -----------------------------------------------------------------------------------------------


def test_a_transform_that_masks_an_attribute_rewrites_raw_to_match() -> None:
    original = customer()
    masked = apply_transform(mask_email, original)
    assert masked is not None
    assert masked.new_image is not None and masked.new_image["email"] == "***"
    assert masked.raw["dynamodb"]["NewImage"]["email"] == {"S": "***"}
    # What a consumer of the forwarded stream record would unmarshal is exactly the transformed record.
    reread = change_record_from_stream(masked.raw, table=original.table, shard_id=original.shard_id)
    assert reread.new_image == masked.new_image
    assert reread.old_image == original.old_image
    # Untouched parts keep their typed form from the stream record; the original record is left alone.
    assert masked.raw["dynamodb"]["OldImage"] is original.raw["dynamodb"]["OldImage"]
    assert masked.raw["dynamodb"]["NewImage"]["total"] is original.raw["dynamodb"]["NewImage"]["total"]
    assert original.raw["dynamodb"]["NewImage"]["email"] == {"S": "c1@example.com"}


def test_a_transform_may_drop_a_record_or_keep_it_unchanged() -> None:
    paid, unpaid = customer(), customer(status="new")
    assert apply_transform(drop_unpaid, paid) is paid
    assert apply_transform(drop_unpaid, unpaid) is None


def test_a_transform_that_writes_its_own_raw_keeps_it() -> None:
    result = apply_transform(own_raw, customer())
    assert result is not None and result.raw == {"eventID": "e1", "dynamodb": {}}


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (explode, "record_transform raised KeyError"),
        (as_dict, "record_transform returned a dict; return a ChangeRecord"),
        (add_float, "record_transform returned a new_image DynamoDB cannot hold (TypeError)"),
    ],
)
def test_a_failing_transform_is_a_transform_error(transform: Any, message: str) -> None:
    with pytest.raises(TransformError) as raised:
        apply_transform(transform, customer())
    assert message in str(raised.value)


# -- projection -----------------------------------------------------------------------------------------------


def test_projection_keeps_the_listed_attributes_and_the_keys_in_both_images_and_raw() -> None:
    original = customer()
    kept = project(original, ["status", "absent"])
    expected_new = {"pk": "customer#1", "sk": "profile", "status": "paid"}
    assert kept.new_image == expected_new
    assert kept.old_image == {**expected_new, "status": "new"}
    assert set(kept.raw["dynamodb"]["NewImage"]) == set(kept.raw["dynamodb"]["OldImage"]) == set(expected_new)
    assert kept.keys == original.keys
    # The archive's dynamodb_json encoding reads raw: the dropped attributes are gone there too.
    row = archive_table([kept], "dynamodb_json").to_pylist()[0]
    assert set(json.loads(row["new_image"])) == {"pk", "sk", "status"}


def test_projection_returns_the_record_itself_when_nothing_is_cut() -> None:
    original = customer()
    assert project(original, ["email", "status", "total"]) is original
    insert = customer("INSERT")
    assert insert.old_image is None
    assert project(insert, ["status"]).old_image is None


# -- what a sink is given ---------------------------------------------------------------------------------------


def _feed(**fields: Any) -> SinkFeed:
    return SinkFeed.of(load_settings(source={"table_name": "t"}, sinks=[{"type": "memory", **fields}]).sinks[0])


def _batch(*records: ChangeRecord) -> Batch:
    return Batch(records, sum(r.size_bytes for r in records))


def test_filter_then_transform_then_projection() -> None:
    # The filter tests `email`, which the projection removes; the transform sees `email` too.
    feed = _feed(
        filter={"attributes": {"email": {"prefix": "c"}}},
        record_transform=f"{HERE}:mask_email",
        project=["email"],
    )
    outsider = customer(n=2, email="x@example.com")
    prepared = feed.prepare(_batch(customer(n=1), outsider, customer(n=3)))
    assert [r.event_id for r in prepared.batch.records] == ["e1", "e3"]
    assert prepared.filtered == 1
    for given in prepared.batch.records:
        assert given.new_image == {"pk": given.keys["pk"], "sk": "profile", "email": "***"}
        assert set(given.raw["dynamodb"]["NewImage"]) == {"pk", "sk", "email"}
    assert prepared.batch.size_bytes == sum(r.size_bytes for r in prepared.batch.records)


def test_records_a_transform_drops_count_as_filtered_and_failures_keep_the_record_as_it_came() -> None:
    dropping = _feed(record_transform=f"{HERE}:drop_unpaid").prepare(_batch(customer(n=1), customer(n=2, status="x")))
    assert [r.event_id for r in dropping.batch.records] == ["e1"]
    assert (dropping.filtered, dropping.failed) == (1, ())
    original = customer()
    failing = _feed(record_transform=f"{HERE}:explode").prepare(_batch(original))
    assert failing.batch.records == ()
    assert [(r, str(e)) for r, e in failing.failed] == [(original, "record_transform raised KeyError")]


def test_a_feed_without_settings_passes_the_batch_through() -> None:
    batch = _batch(customer())
    assert _feed().prepare(batch).batch is batch


# -- in Delivery --------------------------------------------------------------------------------------------------


def _delivery(sinks: list[MemorySink], feeds: list[SinkFeed], tmp_path: Path, on_failure: str) -> Delivery:
    policy = RetryPolicy(
        RetrySettings(max_attempts=2, initial_delay_seconds=0, max_delay_seconds=0), sleep=lambda _s: None
    )
    return Delivery(
        sinks,
        retry=policy,
        dead_letters=JsonlDeadLetters(tmp_path / "dead.jsonl"),
        on_failure=on_failure,
        feeds=feeds,
    )


def test_delivery_gives_each_sink_its_own_records_and_counts_what_it_filtered(tmp_path: Path) -> None:
    everything, inserts, masked = MemorySink("everything"), MemorySink("inserts"), MemorySink("masked")
    delivery = _delivery(
        [everything, inserts, masked],
        [SinkFeed(), _feed(filter={"event_names": ["INSERT"]}), _feed(record_transform=f"{HERE}:mask_email")],
        tmp_path,
        "dead_letter",
    )
    records = (customer("INSERT", n=1), customer(n=2), customer("INSERT", n=3))
    delivery.deliver(_batch(*records))
    assert everything.records == list(records)
    assert [r.event_id for r in inserts.records] == ["e1", "e3"]
    assert [r.new_image["email"] for r in masked.records if r.new_image] == ["***"] * 3
    assert delivery.stats.filtered == {"everything": 0, "inserts": 1, "masked": 0}
    assert delivery.stats.delivered == {"everything": 3, "inserts": 2, "masked": 3}
    assert delivery.stats.dead_lettered == {}


def test_a_failing_transform_dead_letters_the_original_record_for_that_sink_only(tmp_path: Path) -> None:
    healthy, broken = MemorySink("healthy"), MemorySink("broken")
    delivery = _delivery(
        [healthy, broken], [SinkFeed(), _feed(record_transform=f"{HERE}:explode")], tmp_path, "dead_letter"
    )
    original = customer()
    delivery.deliver(_batch(original))
    assert healthy.records == [original] and broken.records == []
    assert delivery.stats.dead_lettered == {"broken": 1}
    assert delivery.stats.delivered == {"healthy": 1, "broken": 0}
    (entry,) = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert entry["sink"] == "broken" and entry["event_id"] == "e1"
    assert entry["error"] == "sink broken: record_transform raised KeyError"
    # The transform may be the masking step: its refusal keeps the keys and the position, not the images.
    assert entry["record"] is None and "images_withheld" in entry
    assert entry["keys"] == original.raw["dynamodb"]["Keys"]
    assert entry["sequence_number"] == original.sequence_number
    assert b"c1@example.com" not in (tmp_path / "dead.jsonl").read_bytes()


def test_a_failing_transform_stops_the_pipeline_when_nothing_may_be_skipped(tmp_path: Path) -> None:
    delivery = _delivery([MemorySink("broken")], [_feed(record_transform=f"{HERE}:explode")], tmp_path, "block")
    with pytest.raises(DeliveryBlockedError, match="record_transform raised KeyError"):
        delivery.deliver(_batch(customer()))


def test_a_filter_from_the_command_line_form_works_as_a_feed() -> None:
    feed = SinkFeed(compile_filter(parse_filter("event=INSERT")))
    assert feed.prepare(_batch(customer(), customer("INSERT", n=2))).filtered == 1
    assert SinkFeed(compile_filter(FilterSettings())).prepare(_batch(customer())).filtered == 0
