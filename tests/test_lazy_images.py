"""Images unmarshalled on first access (LazyImage): the same values and bytes as eager dicts, the archive's
default `dynamodb_json` written from the stream record without reading them, and an unreadable image stopping
the pipeline with its record named instead of disappearing."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.aws import AwsClients
from pipeline.delivery.transforms import apply_transform, project
from pipeline.ops.demo import _item
from pipeline.ops.tail import render
from pipeline.records import (
    ChangeRecord,
    EventName,
    LazyImage,
    UnmarshalError,
    change_record_from_stream,
    to_json,
    to_json_bytes,
    unmarshal_image,
)
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import SimulatedStream, StreamSimulator
from sinks.messages import message_body
from sinks.s3_parquet import S3ParquetSinkSettings, archive_table
from tests.conftest import read_archive, wait_until
from tests.factories import change_record, stream_record

BAD_NUMBER = {"N": "twelve"}


def _wire(value: Any) -> Any:
    """Part of a boto3-parsed stream record as the wire carries it: binary as base64 text."""
    return orjson.loads(orjson.dumps(value, default=lambda b: base64.b64encode(b).decode("ascii")))


def _order(n: int, *, wire: bool = False, event_name: EventName = "MODIFY") -> ChangeRecord:
    """A record with every attribute type, its `raw` as boto3 returns it (bytes) or as the wire carries it."""
    item = _item(n)
    keys = {"pk": item["pk"], "sk": item["sk"]}
    old = {**item, "paid": {"BOOL": n % 2 == 1}}
    raw = stream_record(sequence=10**20 + n, event_name=event_name, keys=keys, new_image=item, old_image=old)
    if wire:
        raw["dynamodb"] = _wire({**raw["dynamodb"], "ApproximateCreationDateTime": 1_714_567_890})
    return change_record_from_stream(raw, table="orders", shard_id="shardId-1")


def _eager(record: ChangeRecord) -> ChangeRecord:
    """The same record with its images unmarshalled up front into dicts, as records were built before."""
    ddb = record.raw["dynamodb"]
    return dataclasses.replace(
        record,
        new_image=None if "NewImage" not in ddb else unmarshal_image(ddb["NewImage"]),
        old_image=None if "OldImage" not in ddb else unmarshal_image(ddb["OldImage"]),
    )


def _bad() -> ChangeRecord:
    keys = {"pk": {"S": "k"}}
    return change_record(sequence=7, event_id="e-bad", keys=keys, new_image={**keys, "count": BAD_NUMBER})


# --- the mapping ---------------------------------------------------------------------------------------------


def test_a_lazy_image_behaves_like_the_dict_it_stands_for() -> None:
    record = _order(3)
    image, expected = record.new_image, unmarshal_image(record.raw["dynamodb"]["NewImage"])
    assert isinstance(image, LazyImage)

    assert image == expected and expected == image and (image != expected) is False
    assert image == MappingProxyType(expected) and image == LazyImage(record.raw["dynamodb"]["NewImage"])
    assert image != {**expected, "paid": not expected["paid"]} and image != list(expected) and image != expected.items()
    assert dict(image) == {**image} == image.copy() == expected
    assert list(image) == list(image.keys()) == list(expected) == list(record.raw["dynamodb"]["NewImage"])
    assert list(image.items()) == list(expected.items()) and list(image.values()) == list(expected.values())
    assert len(image) == len(expected) and "precise" in image and "nope" not in image
    assert image["precise"] == image.get("precise") == Decimal("1234567890123456789012345678.9012345678")
    assert image.get("nope") is None and image.get("nope", 5) == 5
    with pytest.raises(KeyError):
        image["nope"]
    assert image | {"extra": 1} == {**expected, "extra": 1}
    assert {"pk": "x", "extra": 1} | image == {**expected, "extra": 1}
    assert repr(image) == repr(expected)
    with pytest.raises(TypeError, match="unhashable"):
        hash(image)
    with pytest.raises(TypeError):
        image["pk"] = "x"  # type: ignore[index]
    # A copy is the caller's: changing it leaves the record alone.
    copied = image.copy()
    copied["pk"] = "changed"
    assert image["pk"] == expected["pk"]
    assert image.typed is record.raw["dynamodb"]["NewImage"]


def test_an_image_is_unmarshalled_once_and_every_reader_sees_the_same_values() -> None:
    image = _order(4).new_image
    assert image is not None
    first = image["address"]
    assert image["address"] is first and dict(image)["address"] is first and image.get("address") is first

    # Readers on several threads at once still end up with one set of value objects.
    for _ in range(20):
        shared = LazyImage(_item(5))
        start = threading.Barrier(4)
        seen: list[Any] = []

        def read(image: LazyImage = shared, start: threading.Barrier = start, seen: list[Any] = seen) -> None:
            start.wait()
            seen.append(image["address"])

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(value is shared["address"] for value in seen)


def test_equal_records_stay_equal_and_replace_takes_a_plain_dict() -> None:
    record = _order(6)
    assert _eager(record) == record and record == _eager(record)
    masked = dataclasses.replace(record, new_image={**(record.new_image or {}), "pk": "***"})
    assert type(masked.new_image) is dict and masked.new_image["pk"] == "***"
    assert masked.old_image is record.old_image


# --- the same output as eager dicts ----------------------------------------------------------------------


@pytest.mark.parametrize("wire", [False, True], ids=["boto3", "wire"])
def test_message_bodies_and_tail_output_are_byte_identical_to_eager_images(wire: bool) -> None:
    for record in (
        _order(1, wire=wire),
        _order(2, wire=wire, event_name="INSERT"),
        _order(3, wire=wire, event_name="REMOVE"),
    ):
        eager = _eager(record)
        assert type(eager.new_image or {}) is dict
        for body_format in ("change", "dynamodb"):
            assert message_body(record, body_format) == message_body(eager, body_format)
        for fmt in ("json", "record", "summary"):
            assert render(record, fmt) == render(eager, fmt)
        assert to_json_bytes(record.new_image) == to_json_bytes(eager.new_image)
        assert to_json({"nested": [record.old_image]}) == to_json({"nested": [eager.old_image]})
    # Not merely equal to each other: the change body still has the exact digits and base64 binary.
    body = json.loads(message_body(_order(1, wire=wire), "change"), parse_float=Decimal)
    assert body["newImage"]["precise"] == Decimal("1234567890123456789012345678.9012345678")
    assert body["newImage"]["blob"] == base64.b64encode((1).to_bytes(4, "big")).decode()


_serializer = TypeSerializer()
_plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20).map(Decimal)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.frozensets(st.text(max_size=4), min_size=1, max_size=3)
    | st.frozensets(st.integers(-100, 100).map(Decimal), min_size=1, max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _plain_values, max_size=6))
def test_any_image_encodes_exactly_as_its_eager_dict(item: dict[str, Any]) -> None:
    typed = {name: _serializer.serialize(value) for name, value in item.items()}
    assert to_json_bytes(LazyImage(typed)) == to_json_bytes(unmarshal_image(typed))
    assert LazyImage(typed) == unmarshal_image(typed)


def test_transforms_and_projections_work_on_lazy_images() -> None:
    record = _order(8)

    def mask(given: ChangeRecord) -> ChangeRecord:
        return dataclasses.replace(given, new_image={**(given.new_image or {}), "pk": "***"})

    masked = apply_transform(mask, record)
    assert masked is not None and masked.raw["dynamodb"]["NewImage"]["pk"] == {"S": "***"}
    # Attributes passed on untouched keep their typed form (found by identity through the cached values).
    assert masked.raw["dynamodb"]["NewImage"]["blob"] is record.raw["dynamodb"]["NewImage"]["blob"]
    cut = project(record, ["amount"])
    assert cut.new_image == {name: record.new_image[name] for name in ("pk", "sk", "amount")}  # type: ignore[index]
    assert set(cut.raw["dynamodb"]["OldImage"]) == {"pk", "sk", "amount"}


# --- the archive -------------------------------------------------------------------------------------------


def test_dynamodb_json_is_the_default_image_encoding() -> None:
    assert S3ParquetSinkSettings(type="s3_parquet", bucket="archive").image_encoding == "dynamodb_json"
    record = _order(9, wire=True)
    assert archive_table([record]).equals(archive_table([record], "dynamodb_json"))


def test_dynamodb_json_rows_are_the_stream_records_text_whether_boto3_or_the_wire_parsed_them() -> None:
    boto3_parsed = [_order(n) for n in range(4)]
    wire_parsed = [_order(n, wire=True) for n in range(4)]
    assert isinstance(boto3_parsed[0].raw["dynamodb"]["NewImage"]["blob"]["B"], bytes)
    assert isinstance(wire_parsed[0].raw["dynamodb"]["NewImage"]["blob"]["B"], str)

    rows_boto3 = archive_table(boto3_parsed, "dynamodb_json").to_pylist()
    rows_wire = archive_table(wire_parsed, "dynamodb_json").to_pylist()

    for boto3_row, wire_row, record in zip(rows_boto3, rows_wire, wire_parsed, strict=True):
        for column, image in (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage")):
            assert boto3_row[column] == wire_row[column] == orjson.dumps(record.raw["dynamodb"][image]).decode()
    new_image = json.loads(rows_boto3[0]["new_image"])
    assert new_image["blob"] == {"B": base64.b64encode((0).to_bytes(4, "big")).decode()}
    assert new_image["chunks"] == {"BS": [base64.b64encode(b"\x00").decode()] * 2}
    assert new_image["precise"] == {"N": "1234567890123456789012345678.9012345678"}


def test_the_dynamodb_json_archive_never_reads_the_images() -> None:
    # An image no reader could unmarshal is still archived as the stream sent it: nothing unmarshalled it.
    bad = _bad()
    row = archive_table([bad]).to_pylist()[0]
    assert json.loads(row["new_image"])["count"] == BAD_NUMBER
    with pytest.raises(UnmarshalError, match="NewImage of record e-bad"):
        archive_table([bad], "json")


# --- an unreadable image -----------------------------------------------------------------------------------


def test_an_unreadable_image_raises_on_first_access_naming_its_record() -> None:
    bad = _bad()  # building the record does not read the image
    image = bad.new_image
    assert image is not None
    for read in (lambda: image["pk"], lambda: dict(image), lambda: len(image)):
        with pytest.raises(UnmarshalError, match=r"NewImage of record e-bad: InvalidOperation"):
            read()
    # Encoders say the same, not orjson's "Type is not JSON serializable".
    encoders: tuple[Callable[[], object], ...] = (
        lambda: message_body(bad, "change"),
        lambda: to_json(bad.new_image),
        lambda: render(bad, "json"),
    )
    for encode in encoders:
        with pytest.raises(UnmarshalError, match="NewImage of record e-bad"):
            encode()
    assert "unreadable" in repr(bad)  # logging the record must not raise
    assert message_body(bad, "dynamodb")  # the Lambda form forwards the stream record as it came
    tagged = change_record(keys={"pk": {"S": "k"}}, event_id="e-tag", old_image={"pk": {"X": "?"}}, event_name="REMOVE")
    with pytest.raises(
        UnmarshalError, match=r"OldImage of record e-tag: UnmarshalError: unknown DynamoDB type tag 'X'"
    ):
        tagged.old_image["pk"]  # type: ignore[index]


@pytest.fixture
def simulated(aws: EmbeddedAws) -> Iterator[Callable[..., Pipeline]]:
    """Start a Pipeline on a simulated stream (answered in-process at the wire level), everything else on moto."""
    started: list[Pipeline] = []

    def start(settings: Settings, simulator: StreamSimulator) -> Pipeline:
        clients = AwsClients(aws.region, aws.endpoint_url)
        simulator.attach(clients.client("dynamodbstreams"))
        pipeline = Pipeline(settings, clients=clients)
        pipeline.start()
        started.append(pipeline)
        return pipeline

    yield start
    for pipeline in started:
        pipeline.stop(timeout=5)


def _stream_with_a_bad_image() -> tuple[StreamSimulator, SimulatedStream, str]:
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders")
    for n in range(6):
        stream.put_item({"pk": {"S": f"k{n}"}, "sk": {"S": "a"}, "count": BAD_NUMBER if n == 3 else {"N": str(n)}})
    bad = next(r for r in stream.records() if r["dynamodb"]["NewImage"]["count"] == BAD_NUMBER)
    return simulator, stream, bad["eventID"]


def _stopped(pipeline: Pipeline) -> Pipeline:
    """`pipeline`, once it has stopped on an error of its own and been shut down."""
    wait_until(lambda: pipeline.fatal is not None, what="the pipeline to stop")
    pipeline.stop(timeout=5)
    return pipeline


def _archive_sink(bucket: str, **fields: Any) -> dict[str, Any]:
    return {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.2, **fields}


def test_a_sink_that_reads_an_unreadable_image_stops_the_pipeline_before_its_checkpoint(
    aws: EmbeddedAws, bucket: str, make_settings: Callable[..., Settings], simulated: Callable[..., Pipeline]
) -> None:
    simulator, stream, bad_id = _stream_with_a_bad_image()
    bad_sequence = int(next(r for r in stream.records() if r["eventID"] == bad_id)["dynamodb"]["SequenceNumber"])
    settings = make_settings(
        source={"table_name": None, "stream_arn": stream.arn},
        batch={"max_records": 2},
        sinks=[_archive_sink(bucket, image_encoding="json")],
    )

    for _run in range(2):  # a restart from the checkpoint stops at the same record: it is never skipped
        pipeline = _stopped(simulated(settings, simulator))
        assert isinstance(pipeline.fatal, UnmarshalError)
        assert f"NewImage of record {bad_id}" in str(pipeline.fatal)

        store = CheckpointStore(
            aws.client("dynamodb"),
            table_name=settings.checkpoint.table_name,
            stream_arn=stream.arn,
            consumer_name=settings.checkpoint.consumer_name,
            retry=RetryPolicy(RetrySettings()),
        )
        for checkpoint in store.load().values():
            assert checkpoint.sequence_number is None or int(checkpoint.sequence_number) < bad_sequence
        archived = read_archive(aws, bucket).column("event_id").to_pylist()
        assert bad_id not in archived
        before = {r["eventID"] for r in stream.records() if int(r["dynamodb"]["SequenceNumber"]) < bad_sequence}
        assert set(archived) <= before


def test_the_default_archive_keeps_an_unreadable_image_as_the_stream_sent_it(
    aws: EmbeddedAws, bucket: str, make_settings: Callable[..., Settings], simulated: Callable[..., Pipeline]
) -> None:
    simulator, stream, bad_id = _stream_with_a_bad_image()
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn}, sinks=[_archive_sink(bucket)])

    pipeline = simulated(settings, simulator)
    wait_until(lambda: pipeline.stats.checkpoints_written > 0 or pipeline.fatal is not None, what="a checkpoint")
    assert pipeline.stop(timeout=10) is True, pipeline.fatal

    rows = {row["event_id"]: row for row in read_archive(aws, bucket).to_pylist()}
    assert sorted(rows) == sorted(r["eventID"] for r in stream.records())
    for record in stream.records():
        assert rows[record["eventID"]]["new_image"] == orjson.dumps(record["dynamodb"]["NewImage"]).decode()
    assert json.loads(rows[bad_id]["new_image"])["count"] == BAD_NUMBER
