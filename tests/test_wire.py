"""GetRecords parsed by msgspec (pipeline.wire) against botocore's own parser: same records, same archive.

Responses come from the moto server, or, for what moto never sends (TTL deletes, the service's exponent
timestamps, error bodies), from a before-send hook on a real client: signing, retries, event hooks and
botocore's error handling all still run.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import wire
from pipeline.aws import AwsClients
from pipeline.ops.demo import write_changes
from pipeline.records import (
    ChangeRecord,
    LazyImage,
    UnmarshalError,
    WireRecord,
    change_record_from_stream,
    to_json_bytes,
)
from pipeline.testing.emulator import EmbeddedAws
from pipeline.wire import parse_get_records
from sinks.s3_parquet import archive_table

DIGITS_38 = "12345678901234567890123456789012345678"
IMAGE_COLUMNS = ("keys", "new_image", "old_image")
ITERATOR = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-05-01T00:00:00.000|1|AAAA"


# --- helpers -----------------------------------------------------------------------------------------------


def _streams_clients(aws: EmbeddedAws) -> tuple[Any, Any]:
    """(fast, botocore): the pipeline's dynamodbstreams client with and without the orjson parse."""
    fast = AwsClients(aws.region, aws.endpoint_url).client("dynamodbstreams")
    slow = AwsClients(aws.region, aws.endpoint_url, fast_get_records=False).client("dynamodbstreams")
    return fast, slow


class _CannedBody:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


class _CannedStreams:
    """Both clients, each GetRecords answered with the status and body last given to `answer`."""

    def __init__(self, aws: EmbeddedAws) -> None:
        self.fast, self.slow = _streams_clients(aws)
        self._status, self._body = 200, b"{}"
        for client in (self.fast, self.slow):
            client.meta.events.register("before-send.dynamodb-streams.GetRecords", self._respond)

    def _respond(self, request: Any, **_: Any) -> AWSResponse:
        headers = {
            "x-amzn-requestid": "REQ-0001",
            "content-type": "application/x-amz-json-1.0",
            "content-length": str(len(self._body)),
        }
        return AWSResponse(request.url, self._status, headers, _CannedBody(self._body))

    def answer(self, body: bytes, status: int = 200) -> None:
        self._status, self._body = status, body

    def get_records(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(fast response, botocore response) to the same answer."""
        return self.fast.get_records(ShardIterator=ITERATOR), self.slow.get_records(ShardIterator=ITERATOR)


@pytest.fixture(scope="module")
def canned(aws: EmbeddedAws) -> _CannedStreams:
    return _CannedStreams(aws)


def _without_raw(record: ChangeRecord) -> dict[str, Any]:
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    del fields["raw"]
    return fields


def _assert_same_archive(fast_raws: list[dict[str, Any]], slow_raws: list[dict[str, Any]]) -> None:
    """Same change records (every field but `raw`) and the same archive table in both image encodings."""
    fast = [change_record_from_stream(r, table="orders", shard_id="shardId-1") for r in fast_raws]
    slow = [change_record_from_stream(r, table="orders", shard_id="shardId-1") for r in slow_raws]
    assert [_without_raw(r) for r in fast] == [_without_raw(r) for r in slow]
    json_fast, json_slow = archive_table(fast, "json"), archive_table(slow, "json")
    assert json_fast.num_rows == len(fast_raws)
    assert json_fast.equals(json_slow), (json_fast.to_pylist(), json_slow.to_pylist())
    # dynamodb_json copies the service's own text from the fast parse, and encodes botocore's objects back: the
    # same JSON, though not always the same bytes (moto pads its JSON with spaces, the service does not).
    typed_fast, typed_slow = archive_table(fast).to_pylist(), archive_table(slow).to_pylist()
    assert [_parsed_images(row) for row in typed_fast] == [_parsed_images(row) for row in typed_slow]


def _parsed_images(row: dict[str, Any]) -> dict[str, Any]:
    return {
        name: orjson.loads(value) if name in IMAGE_COLUMNS and value is not None else value
        for name, value in row.items()
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _service_record(sequence: int, event_name: str, **dynamodb: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "awsRegion": "us-east-1",
        "dynamodb": {
            # As the service writes it: a Java double in exponent notation.
            "ApproximateCreationDateTime": orjson.Fragment(b"1.71456789E9"),
            "SequenceNumber": str(400_000_000_000_000_000_000 + sequence),
            "SizeBytes": 100 + sequence,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
            **dynamodb,
        },
        "eventID": f"event-{sequence}",
        "eventName": event_name,
        "eventSource": "aws:dynamodb",
        "eventVersion": "1.1",
    }
    return record


# --- against the moto server -------------------------------------------------------------------------------


def _read_shard(client: Any, dynamodb: Any, table: str) -> list[dict[str, Any]]:
    arn = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    records: list[dict[str, Any]] = []
    for shard in client.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        iterator = client.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")[
            "ShardIterator"
        ]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=25)
            assert page["ResponseMetadata"]["HTTPStatusCode"] == 200
            records.extend(page["Records"])
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return records


def test_moto_stream_reads_the_same_records_with_either_parser(aws: EmbeddedAws, dynamodb: Any, table: str) -> None:
    written = write_changes(dynamodb, table, 12)  # every attribute type, a 38-digit number, updates and deletes
    fast, slow = _streams_clients(aws)

    fast_raws, slow_raws = _read_shard(fast, dynamodb, table), _read_shard(slow, dynamodb, table)

    assert len(fast_raws) == len(slow_raws) == sum(written.values())
    _assert_same_archive(fast_raws, slow_raws)
    # The fast parse really ran: blobs are still base64 text and the time is still epoch seconds.
    first = fast_raws[0]["dynamodb"]
    assert isinstance(first["NewImage"]["blob"]["B"], str)
    assert isinstance(first["ApproximateCreationDateTime"], int | float)
    assert isinstance(slow_raws[0]["dynamodb"]["NewImage"]["blob"]["B"], bytes)


def test_error_responses_from_moto_are_botocores_own(aws: EmbeddedAws) -> None:
    fast, slow = _streams_clients(aws)
    errors = []
    for client in (fast, slow):
        with pytest.raises(ClientError) as caught:
            client.get_records(ShardIterator="not-an-iterator")  # moto answers 500
        errors.append(caught.value.response)
    assert errors[0]["Error"] == errors[1]["Error"]
    assert errors[0]["ResponseMetadata"]["HTTPStatusCode"] == 500


# --- service-shaped bodies moto does not produce -----------------------------------------------------------


def _service_page() -> list[dict[str, Any]]:
    image = {
        "pk": {"S": "customer#1"},
        "sk": {"S": "order#7"},
        "note": {"S": 'héllo "quoted" \\ {}[] ✓'},
        "ledger": {"N": DIGITS_38},
        "negative": {"N": f"-{DIGITS_38[:20]}.{DIGITS_38[20:]}"},
        "tiny": {"N": "1E-130"},
        "blob": {"B": _b64(bytes(range(256)))},
        "empty_blob": {"B": ""},
        "flags": {"BOOL": False},
        "nothing": {"NULL": True},
        "tags": {"SS": ["pear", "apple", "fig"]},
        "scores": {"NS": ["10", "9", "-1.5", "1E+2", DIGITS_38]},
        "chunks": {"BS": [_b64(b"\xff"), _b64(b"\x00\x01"), _b64(b"\x00")]},
        "lines": {"L": [{"M": {"sku": {"S": "a"}, "qty": {"N": "2"}}}, {"L": []}, {"NULL": True}]},
        "address": {"M": {"geo": {"M": {"lat": {"N": "47.6062"}, "empty": {"M": {}}}}, "S": {"S": "a tag as a name"}}},
    }
    keys = {"pk": image["pk"], "sk": image["sk"]}
    return [
        _service_record(1, "INSERT", Keys=keys, NewImage=image),
        _service_record(2, "MODIFY", Keys=keys, NewImage={**image, "ledger": {"N": "0"}}, OldImage=image),
        # A TTL expiry: deleted by the service itself.
        {
            **_service_record(3, "REMOVE", Keys=keys, OldImage=image),
            "userIdentity": {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"},
        },
    ]


def test_a_service_shaped_page_gives_the_same_archive(canned: _CannedStreams) -> None:
    canned.answer(orjson.dumps({"NextShardIterator": ITERATOR + "next", "Records": _service_page()}))

    fast, slow = canned.get_records()

    _assert_same_archive(fast["Records"], slow["Records"])
    assert fast["NextShardIterator"] == slow["NextShardIterator"] == ITERATOR + "next"
    assert fast["ResponseMetadata"]["RequestId"] == slow["ResponseMetadata"]["RequestId"] == "REQ-0001"
    ttl = change_record_from_stream(fast["Records"][2], table="orders", shard_id="shardId-1")
    assert ttl.user_identity is not None and ttl.user_identity.is_ttl_expiry
    assert ttl.old_image is not None and ttl.old_image["ledger"] == Decimal(DIGITS_38)
    row = archive_table([ttl], "json").to_pylist()[0]
    assert f'"ledger":{DIGITS_38}' in row["old_image"]
    assert row["user_identity"] == {"type": "Service", "principal_id": "dynamodb.amazonaws.com"}
    assert row["approximate_creation_time"].timestamp() == 1_714_567_890
    # The default encoding is the service's own text for each image, whichever parser read the page: botocore's
    # bytes for B and BS go back to the base64 the service sent.
    service = _service_page()
    for raws in (fast["Records"], slow["Records"]):
        records = [change_record_from_stream(r, table="orders", shard_id="shardId-1") for r in raws]
        for typed, row in zip(service, archive_table(records).to_pylist(), strict=True):
            for column, image in (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage")):
                wire = typed["dynamodb"].get(image)
                assert row[column] == (None if wire is None else orjson.dumps(wire).decode())


def test_the_last_page_of_a_closed_shard_has_no_next_iterator(canned: _CannedStreams) -> None:
    canned.answer(orjson.dumps({"Records": []}))

    fast, slow = canned.get_records()

    assert fast["Records"] == slow["Records"] == []
    assert "NextShardIterator" not in fast
    assert "NextShardIterator" not in slow


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ExpiredIteratorException"),
        (400, "TrimmedDataAccessException"),
        (400, "LimitExceededException"),
        (500, "InternalServerError"),
    ],
)
def test_error_bodies_raise_the_same_client_error(canned: _CannedStreams, status: int, code: str) -> None:
    canned.answer(orjson.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "it failed"}), status)

    errors = []
    for client in (canned.fast, canned.slow):
        with pytest.raises(ClientError) as caught:
            client.get_records(ShardIterator=ITERATOR)
        errors.append(caught.value.response)

    assert errors[0]["Error"] == errors[1]["Error"] == {"Code": code, "Message": "it failed"}
    assert errors[0]["ResponseMetadata"]["HTTPStatusCode"] == status


def test_a_truncated_success_body_is_left_to_botocore(canned: _CannedStreams) -> None:
    canned.answer(b'{"Records": [{"eventID": "e-1"}')

    fast, slow = canned.get_records()

    # botocore tolerates an unparseable body and returns no records rather than raising; so does the fast path.
    assert "Records" not in fast and "Records" not in slow
    assert fast["ResponseMetadata"]["HTTPStatusCode"] == slow["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_the_fast_parse_is_on_by_default_and_can_be_switched_off(canned: _CannedStreams) -> None:
    canned.answer(orjson.dumps({"Records": _service_page()[:1]}))

    fast, slow = canned.get_records()

    assert fast["Records"][0]["dynamodb"]["NewImage"]["blob"]["B"] == _b64(bytes(range(256)))
    assert fast["Records"][0]["dynamodb"]["ApproximateCreationDateTime"] == 1_714_567_890
    assert slow["Records"][0]["dynamodb"]["NewImage"]["blob"]["B"] == bytes(range(256))
    assert isinstance(slow["Records"][0]["dynamodb"]["ApproximateCreationDateTime"], datetime)


# --- the handler on its own --------------------------------------------------------------------------------


def test_the_handler_leaves_errors_and_unparseable_bodies_alone() -> None:
    for response in (
        {"status_code": 400, "body": b'{"Records": []}', "headers": {}},
        {"status_code": 200, "body": b"<html>", "headers": {}},
        {"status_code": 200, "body": b'{"Records": null}', "headers": {}},
        {"status_code": 200, "body": b"[]", "headers": {}},
        {"status_code": 200, "body": b"", "headers": {}},
    ):
        before = dict(response)
        customized: dict[str, Any] = {}
        parse_get_records(response_dict=response, customized_response_dict=customized)
        assert response == before
        assert customized == {}


def test_the_handler_leaves_botocore_whatever_it_does_not_take() -> None:
    response: dict[str, Any] = {
        "status_code": 200,
        "headers": {},
        "body": b'{"NextShardIterator": "it-2", "Records": [{"eventID": "e"}], "SomethingNew": {"a": 1}}',
    }
    customized: dict[str, Any] = {}
    parse_get_records(response_dict=response, customized_response_dict=customized)
    assert customized == {"NextShardIterator": "it-2", "Records": [{"eventID": "e"}]}
    assert orjson.loads(response["body"]) == {"SomethingNew": {"a": 1}}


# --- any image ---------------------------------------------------------------------------------------------


def _numbers() -> st.SearchStrategy[str]:
    """DynamoDB numbers: up to 38 significant digits, magnitude 1E-130 to 9.99E+125."""
    digits = st.integers(min_value=0, max_value=10**38 - 1)
    exponent = st.integers(min_value=-130, max_value=88)
    return st.builds(lambda d, e, neg: str(Decimal(f"{'-' if neg else ''}{d}E{e}")), digits, exponent, st.booleans())


_names = st.text(min_size=1, max_size=6)
_scalars = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=12)),
    st.builds(lambda n: {"N": n}, _numbers()),
    st.builds(lambda b: {"B": _b64(b)}, st.binary(max_size=12)),
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.just({"NULL": True}),
    st.builds(lambda s: {"SS": sorted(s, reverse=True)}, st.sets(st.text(max_size=5), min_size=1, max_size=4)),
    st.builds(
        lambda ns: {"NS": [str(n) for n in ns]},
        st.sets(_numbers().map(Decimal), min_size=1, max_size=4),
    ),
    st.builds(lambda bs: {"BS": [_b64(b) for b in bs]}, st.sets(st.binary(max_size=6), min_size=1, max_size=4)),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.builds(lambda items: {"L": items}, st.lists(inner, max_size=4)),
        st.builds(lambda fields: {"M": fields}, st.dictionaries(_names, inner, max_size=4)),
    ),
    max_leaves=12,
)
_images = st.dictionaries(_names, _values, max_size=6)


@settings(max_examples=60, deadline=None)
@given(new_image=_images, old_image=_images, ttl=st.booleans())
def test_any_image_gives_the_same_archive_with_either_parser(
    canned: _CannedStreams, new_image: dict[str, Any], old_image: dict[str, Any], ttl: bool
) -> None:
    keys = {"pk": {"S": "k"}}
    records = [
        _service_record(1, "MODIFY", Keys=keys, NewImage={**new_image, **keys}, OldImage={**old_image, **keys}),
        _service_record(2, "REMOVE", Keys=keys, OldImage={**old_image, **keys}),
    ]
    if ttl:
        records[1]["userIdentity"] = {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}
    canned.answer(orjson.dumps({"NextShardIterator": ITERATOR, "Records": records}))

    fast, slow = canned.get_records()

    _assert_same_archive(fast["Records"], slow["Records"])


# --- records decoded without parsing their images ----------------------------------------------------------


def test_records_are_wire_mappings_equal_to_the_parsed_json(canned: _CannedStreams) -> None:
    body = orjson.dumps({"NextShardIterator": ITERATOR, "Records": _service_page()})
    service = orjson.loads(body)["Records"]
    canned.answer(body)

    fast, _ = canned.get_records()

    raws = fast["Records"]
    assert all(isinstance(raw, WireRecord) for raw in raws)
    assert raws == service and service == raws  # either way round, nested mappings included
    assert [dict(raw) for raw in raws] == service
    assert [sorted(raw["dynamodb"]) for raw in raws] == [sorted(record["dynamodb"]) for record in service]
    assert (
        "NewImage" not in raws[2]["dynamodb"]
        and raws[2]["dynamodb"].get("OldImage") == service[2]["dynamodb"]["OldImage"]
    )
    # Encoding a record copies the images' text: the same bytes as the body carried.
    for raw, record in zip(raws, service, strict=True):
        encoded = to_json_bytes(raw)
        assert orjson.loads(encoded) == record
        for image in ("Keys", "NewImage", "OldImage"):
            if image in record["dynamodb"]:
                assert b'"%s":%s' % (image.encode(), orjson.dumps(record["dynamodb"][image])) in encoded


def test_the_default_archive_never_parses_an_image(canned: _CannedStreams) -> None:
    canned.answer(orjson.dumps({"NextShardIterator": ITERATOR, "Records": _service_page()}))
    raws = canned.get_records()[0]["Records"]
    records = [change_record_from_stream(raw, table="orders", shard_id="shardId-1") for raw in raws]
    images = [image for r in records for image in (r.new_image, r.old_image) if image is not None]
    assert images and all(isinstance(image, LazyImage) for image in images)

    archive_table(records)
    assert not any(image._typed is not None or image._values is not None for image in images)

    # Reading one image parses it once; the stream record and the change record then share that object.
    new_image = records[0].new_image
    assert isinstance(new_image, LazyImage)
    assert new_image["ledger"] == Decimal(DIGITS_38)
    assert raws[0]["dynamodb"]["NewImage"] is new_image.typed
    assert isinstance(records[1].old_image, LazyImage) and records[1].old_image._typed is None


def test_a_record_with_a_field_the_decoder_does_not_know_keeps_it(
    canned: _CannedStreams, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "_general_parse_logged", False)  # said once a process; this test wants to hear it
    future = _service_page()
    future[0]["recordFormat"] = "v2"
    future[1]["dynamodb"]["ApproximateCreationDateTimePrecision"] = "MICROSECOND"
    body = orjson.dumps({"NextShardIterator": ITERATOR, "Records": future})
    canned.answer(body)

    with caplog.at_level(logging.INFO, logger="pipeline.wire"):
        fast, slow = canned.get_records()

    assert fast["Records"] == orjson.loads(body)["Records"]  # nothing dropped: the page was parsed in full
    assert not any(isinstance(raw, WireRecord) for raw in fast["Records"])
    assert fast["NextShardIterator"] == ITERATOR
    _assert_same_archive(fast["Records"], slow["Records"])
    assert any("recordFormat" in message for message in caplog.messages)


def test_an_image_that_is_not_an_object_is_refused_when_read() -> None:
    response: dict[str, Any] = {
        "status_code": 200,
        "headers": {},
        "body": orjson.dumps({"Records": [{**_service_record(1, "INSERT", Keys={"pk": {"S": "a"}}, NewImage=[1, 2])}]}),
    }
    customized: dict[str, Any] = {}
    parse_get_records(response_dict=response, customized_response_dict=customized)
    record = change_record_from_stream(customized["Records"][0], table="orders", shard_id="shardId-1")

    with pytest.raises(UnmarshalError, match="NewImage of record event-1"):
        record.new_image.get("pk")  # type: ignore[union-attr]


def _handled(body: bytes) -> dict[str, Any]:
    response: dict[str, Any] = {"status_code": 200, "headers": {}, "body": body}
    customized: dict[str, Any] = {}
    parse_get_records(response_dict=response, customized_response_dict=customized)
    return customized


def test_a_null_image_takes_the_general_path_and_reads_as_none() -> None:
    record = _service_record(1, "INSERT", Keys={"pk": {"S": "a"}}, NewImage=None)
    customized = _handled(orjson.dumps({"Records": [record]}))

    (raw,) = customized["Records"]
    assert not isinstance(raw, WireRecord) and raw["dynamodb"]["NewImage"] is None
    assert change_record_from_stream(raw, table="orders", shard_id="shardId-1").new_image is None


def test_a_body_that_is_not_utf8_is_left_to_botocore() -> None:
    record = _service_record(1, "INSERT", Keys={"pk": {"S": "a"}}, NewImage={"pk": {"S": "a"}, "s": {"S": "é"}})
    body = orjson.dumps({"Records": [record]}).replace("é".encode(), b"\xff")
    assert _handled(body) == {}


def test_whole_second_timestamps_stay_integers() -> None:
    record = _service_record(1, "INSERT", Keys={"pk": {"S": "a"}})
    record["dynamodb"]["ApproximateCreationDateTime"] = 1_714_567_890  # as moto writes it
    (raw,) = _handled(orjson.dumps({"Records": [record]}))["Records"]
    assert isinstance(raw, WireRecord)
    assert type(raw["dynamodb"]["ApproximateCreationDateTime"]) is int
    assert b'"ApproximateCreationDateTime":1714567890,' in to_json_bytes(raw)


def test_an_unreadable_image_neither_breaks_repr_nor_membership() -> None:
    record = _service_record(1, "INSERT", Keys={"pk": {"S": "a"}}, NewImage=[1, 2])
    (raw,) = _handled(orjson.dumps({"Records": [record]}))["Records"]
    stream = raw["dynamodb"]

    assert "NewImage" in stream and "OldImage" not in stream and "dynamodb" in raw
    assert "[1,2]" in repr(raw) and "event-1" in repr(raw)
    assert "[1,2]" in repr(change_record_from_stream(raw, table="orders", shard_id="shardId-1"))
    with pytest.raises(UnmarshalError, match="NewImage of record event-1"):
        dict(stream)
    with pytest.raises(KeyError):
        stream.image_json("Image")
