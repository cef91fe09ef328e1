"""Message bodies, attributes, FIFO ids and the batch-call logic shared by the SQS and SNS sinks."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBStreamEvent
from aws_lambda_powertools.utilities.parser.models import DynamoDBStreamModel, DynamoDBStreamRecordModel
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

from pipeline.ops.demo import _item
from pipeline.records import ChangeRecord, change_record_from_stream
from sinks.base import (
    CallRefusedError,
    DestinationUnusableError,
    NotAttemptedError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from sinks.messages import (
    MAX_BATCH_ENTRIES,
    MAX_MESSAGE_BYTES,
    EntryFailure,
    OutgoingMessage,
    build_message,
    deduplication_id,
    lambda_record,
    mapped_errors,
    message_attributes,
    message_body,
    message_group_id,
    send_in_calls,
)
from tests.factories import change_record, stream_arn_of, stream_record, ttl_identity

PRECISE = Decimal("1234567890123456789012345678.9012345678")


def _order_record(n: int, event_name: str = "MODIFY", **fields: Any) -> ChangeRecord:
    item = _item(n)
    keys = {"pk": item["pk"], "sk": item["sk"]}
    old = {**item, "paid": {"BOOL": False}}
    return change_record(sequence=1000 + n, event_name=event_name, keys=keys, new_image=item, old_image=old, **fields)


def _wire_json(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The same stream record as DynamoDB Streams sends it over HTTP: base64 text, epoch seconds."""

    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return base64.b64encode(value).decode()
        if isinstance(value, datetime):
            return int(value.timestamp())
        raise TypeError(type(value))

    wire: dict[str, Any] = json.loads(json.dumps(raw, default=default))
    return wire


def _as_lambda_consumers_see(value: Any) -> Any:
    """An unmarshalled value as powertools' deserializer yields it from a Lambda event: binary stays base64 text
    (as in Lambda's own events), sets are sets."""
    if isinstance(value, dict):
        return {k: _as_lambda_consumers_see(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_lambda_consumers_see(v) for v in value]
    if isinstance(value, frozenset):
        return {_as_lambda_consumers_see(v) for v in value}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def test_change_body_keeps_every_digit_and_encodes_binary_and_sets() -> None:
    record = _order_record(7)
    body = message_body(record, "change")
    assert '"precise":1234567890123456789012345678.9012345678' in body
    parsed = json.loads(body, parse_float=Decimal)
    assert set(parsed) == {
        "eventID",
        "eventName",
        "table",
        "keys",
        "newImage",
        "oldImage",
        "sequenceNumber",
        "approximateCreationDateTime",
        "shardId",
    }
    assert parsed["eventID"] == record.event_id
    assert parsed["eventName"] == "MODIFY"
    assert parsed["table"] == "orders"
    assert parsed["shardId"] == "shardId-0001"
    assert parsed["sequenceNumber"] == "1007"
    assert parsed["keys"] == {"pk": "customer#7", "sk": "order#00007"}
    new = parsed["newImage"]
    assert new["precise"] == PRECISE
    assert new["amount"] == Decimal("7.07")
    assert base64.b64decode(new["blob"]) == (7).to_bytes(4, "big")
    assert sorted(new["tags"]) == ["new", "tag2"]
    assert sorted(Decimal(str(n)) for n in new["scores"]) == [Decimal("0.5"), Decimal(7)]
    assert sorted(base64.b64decode(b) for b in new["chunks"]) == [b"\x00", b"\x07"]
    assert new["lines"] == ["widget", 2, {"sku": "sku-7"}]
    assert new["coupon"] is None
    assert parsed["oldImage"]["paid"] is False
    created = datetime.fromisoformat(parsed["approximateCreationDateTime"])
    assert parsed["approximateCreationDateTime"].endswith("Z")
    assert created == record.approximate_creation_time


def test_change_body_has_null_images_the_event_does_not_carry() -> None:
    inserted = json.loads(message_body(change_record(event_name="INSERT"), "change"))
    removed = json.loads(message_body(change_record(event_name="REMOVE"), "change"))
    assert inserted["oldImage"] is None and inserted["newImage"] is not None
    assert removed["newImage"] is None and removed["oldImage"] is not None


def test_dynamodb_body_is_the_wire_form_whether_raw_came_from_boto3_or_wire_json() -> None:
    parsed_by_boto3 = _order_record(3)
    raw = parsed_by_boto3.raw
    from_wire = change_record_from_stream(
        _wire_json(raw), table="orders", shard_id="shardId-0001", stream_arn=stream_arn_of("orders")
    )
    assert isinstance(raw["dynamodb"]["NewImage"]["blob"]["B"], bytes)
    assert isinstance(from_wire.raw["dynamodb"]["NewImage"]["blob"]["B"], str)

    body = message_body(parsed_by_boto3, "dynamodb")
    assert body == message_body(from_wire, "dynamodb")
    event = json.loads(body)
    assert event == {
        "eventID": parsed_by_boto3.event_id,
        "eventName": "MODIFY",
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": int(raw["dynamodb"]["ApproximateCreationDateTime"].timestamp()),
            "Keys": raw["dynamodb"]["Keys"],
            "NewImage": _wire_json(raw)["dynamodb"]["NewImage"],
            "OldImage": _wire_json(raw)["dynamodb"]["OldImage"],
            "SequenceNumber": "1003",
            "SizeBytes": 100,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
        "eventSourceARN": stream_arn_of("orders"),
    }
    assert event["dynamodb"]["NewImage"]["chunks"] == {"BS": ["AA==", "Aw=="]}
    assert event["dynamodb"]["NewImage"]["precise"] == {"N": str(PRECISE)}


def test_dynamodb_body_keeps_a_sub_second_creation_time() -> None:
    created = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    event = lambda_record(change_record(created=created))
    assert event["dynamodb"]["ApproximateCreationDateTime"] == created.timestamp()


def test_dynamodb_body_parses_unchanged_with_powertools() -> None:
    records = [_order_record(11, "INSERT"), _order_record(12, "MODIFY"), _order_record(13, "REMOVE")]
    bodies = [json.loads(message_body(r, "dynamodb")) for r in records]
    event = DynamoDBStreamEvent({"Records": bodies})
    parsed = list(event.records)
    assert [p.event_id for p in parsed] == [r.event_id for r in records]
    for record, parsed_record in zip(records, parsed, strict=True):
        stream = parsed_record.dynamodb
        assert stream is not None
        assert parsed_record.event_name is not None and parsed_record.event_name.name == record.event_name
        assert parsed_record.event_source == "aws:dynamodb"
        assert parsed_record.aws_region == "us-east-1"
        assert stream.sequence_number == record.sequence_number
        assert stream.approximate_creation_date_time == int(record.approximate_creation_time.timestamp())
        assert stream.keys == _as_lambda_consumers_see(dict(record.keys))
        if record.new_image is None:
            assert stream.new_image == {}
        else:
            assert stream.new_image == _as_lambda_consumers_see(dict(record.new_image))
            assert stream.new_image["precise"] == PRECISE
            assert str(stream.new_image["precise"]) == str(PRECISE)
        if record.old_image is not None:
            assert stream.old_image == _as_lambda_consumers_see(dict(record.old_image))


def test_dynamodb_body_validates_with_powertools_strict_pydantic_model() -> None:
    """powertools' parser models require every field Lambda sends (eventSourceARN, awsRegion, a numeric
    eventVersion, SizeBytes, StreamViewType): each body, and an event of bodies, validates and reads back."""
    records = [
        _order_record(21, "INSERT"),
        _order_record(22, "MODIFY"),
        _order_record(23, "REMOVE"),
        change_record(event_name="REMOVE", user_identity=ttl_identity(), sequence=24),
    ]
    bodies = [message_body(r, "dynamodb") for r in records]
    for record, body in zip(records, bodies, strict=True):
        parsed = DynamoDBStreamRecordModel.model_validate_json(body)
        assert parsed.eventID == record.event_id and parsed.eventName == record.event_name
        assert parsed.eventSourceARN == stream_arn_of("orders")
        assert parsed.awsRegion == "us-east-1"
        assert parsed.dynamodb.SequenceNumber == record.sequence_number
        assert parsed.dynamodb.Keys == _as_lambda_consumers_see(dict(record.keys))
        if record.new_image is not None:
            assert parsed.dynamodb.NewImage == _as_lambda_consumers_see(dict(record.new_image))
    event = DynamoDBStreamModel.model_validate({"Records": [json.loads(body) for body in bodies]})
    assert [r.eventID for r in event.Records] == [r.event_id for r in records]
    assert event.Records[-1].userIdentity is not None
    assert event.Records[-1].userIdentity.principalId == "dynamodb.amazonaws.com"


def test_dynamodb_body_takes_the_region_from_the_stream_arn_when_the_record_has_none() -> None:
    raw = stream_record(event_name="INSERT")
    del raw["awsRegion"]
    record = change_record_from_stream(
        raw, table="orders", shard_id="s", stream_arn=stream_arn_of("orders", "eu-west-3")
    )
    assert DynamoDBStreamRecordModel.model_validate_json(message_body(record, "dynamodb")).awsRegion == "eu-west-3"


def test_ttl_deletes_carry_user_identity_as_lambda_spells_it() -> None:
    expired = change_record(event_name="REMOVE", user_identity=ttl_identity())
    event = lambda_record(expired)
    assert event["userIdentity"] == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    parsed = next(DynamoDBStreamEvent({"Records": [event]}).records)
    assert parsed.user_identity == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    assert "userIdentity" not in lambda_record(change_record(event_name="REMOVE"))


def test_attributes_name_the_event_and_the_table() -> None:
    record = change_record(table="orders", event_name="REMOVE")
    assert message_attributes(record) == {
        "event_name": {"DataType": "String", "StringValue": "REMOVE"},
        "table": {"DataType": "String", "StringValue": "orders"},
    }


def test_group_id_is_one_per_item_whatever_the_key_order() -> None:
    first = change_record(keys={"pk": {"S": "a"}, "sk": {"N": "1"}}, sequence=1)
    again = change_record(keys={"sk": {"N": "1"}, "pk": {"S": "a"}}, sequence=2, event_name="MODIFY")
    other = change_record(keys={"pk": {"S": "a"}, "sk": {"N": "2"}}, sequence=3)
    other_table = change_record(table="invoices", keys={"pk": {"S": "a"}, "sk": {"N": "1"}}, sequence=4)
    assert message_group_id(first) == message_group_id(again) == 'orders:{"pk":"a","sk":1}'
    assert len({message_group_id(r) for r in (first, other, other_table)}) == 3


@pytest.mark.parametrize(
    "key",
    ["x" * 200, "café au lait", "with space"],
    ids=["long", "non-ascii", "space"],
)
def test_group_ids_outside_the_allowed_shape_are_hashed(key: str) -> None:
    record = change_record(keys={"pk": {"S": key}})
    group = message_group_id(record)
    assert len(group) <= 128 and all("!" <= c <= "~" for c in group)
    assert group == message_group_id(change_record(keys={"pk": {"S": key}}, sequence=9))
    assert group != message_group_id(change_record(keys={"pk": {"S": key + "!"}}))


def test_deduplication_id_is_the_event_id() -> None:
    record = change_record(event_id="a1b2c3d4e5f60718293a4b5c6d7e8f90")
    assert deduplication_id(record) == "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def test_message_size_counts_body_and_attributes() -> None:
    record = change_record(table="orders", event_name="INSERT")
    message = build_message(record, "change", fifo=False)
    attributes = len("event_name") + len("String") + len("INSERT") + len("table") + len("String") + len("orders")
    assert message.size == len(message.body.encode()) + attributes
    assert message.group_id is None and message.deduplication_id is None
    fifo = build_message(record, "change", fifo=True)
    assert fifo.group_id == message_group_id(record) and fifo.deduplication_id == record.event_id


class _RecordingCalls:
    """A batch call that records what it was given and fails the entries `fail` picks."""

    def __init__(
        self,
        fail: Mapping[str, EntryFailure] | None = None,
        raise_on_call: int | None = None,
        raise_error: ClientError | None = None,
    ) -> None:
        self.calls: list[list[OutgoingMessage]] = []
        self._fail = fail or {}
        self._raise_on_call = raise_on_call
        self._raise_error = raise_error or ClientError(
            {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "SendMessageBatch"
        )

    def __call__(self, call: Sequence[OutgoingMessage]) -> Mapping[int, EntryFailure]:
        self.calls.append(list(call))
        if self._raise_on_call == len(self.calls):
            raise self._raise_error
        return {i: self._fail[m.record.event_id] for i, m in enumerate(call) if m.record.event_id in self._fail}

    def event_ids(self) -> list[list[str]]:
        return [[m.record.event_id for m in call] for call in self.calls]


def _messages(records: Sequence[ChangeRecord], *, fifo: bool) -> list[OutgoingMessage]:
    return [build_message(r, "change", fifo=fifo) for r in records]


def _padded(n: int, padding: int, item: str | None = None) -> ChangeRecord:
    key = item or f"item-{n}"
    return change_record(
        sequence=n,
        event_id=f"e{n:03d}",
        keys={"pk": {"S": key}},
        new_image={"pk": {"S": key}, "pad": {"S": "x" * padding}},
    )


def test_standard_calls_pack_in_order_within_entry_and_byte_limits() -> None:
    records = [_padded(n, 100) for n in range(23)] + [_padded(n, 100_000) for n in range(23, 29)]
    calls = _RecordingCalls()
    result = send_in_calls(_messages(records, fifo=False), calls, fifo=False, what="queue q")
    assert result.ok
    flat = [event_id for call in calls.event_ids() for event_id in call]
    assert flat == [r.event_id for r in records]
    assert [len(c) for c in calls.calls] == [10, 10, 5, 2, 2]  # 3 small + 2 large fill the third call
    assert all(sum(m.size for m in call) <= MAX_MESSAGE_BYTES for call in calls.calls)
    assert all(len(call) <= MAX_BATCH_ENTRIES for call in calls.calls)


def test_fifo_calls_carry_one_message_per_item_in_stream_order() -> None:
    # item a changes 4 times, b twice, then 12 single-change items
    records = [
        _padded(0, 10, "a"),
        _padded(1, 10, "b"),
        _padded(2, 10, "a"),
        _padded(3, 10, "a"),
        _padded(4, 10, "b"),
        _padded(5, 10, "a"),
    ] + [_padded(n, 10) for n in range(6, 18)]
    calls = _RecordingCalls()
    assert send_in_calls(_messages(records, fifo=True), calls, fifo=True, what="queue q.fifo").ok
    for call in calls.calls:
        groups = [m.group_id for m in call]
        assert len(groups) == len(set(groups))
    order = [m.record.event_id for call in calls.calls for m in call]
    assert sorted(order) == sorted(r.event_id for r in records)
    for item in ("a", "b"):
        mine = [r.event_id for r in records if r.keys["pk"] == item]
        assert [e for e in order if e in mine] == mine


def test_oversized_messages_are_refused_for_good_and_never_sent() -> None:
    records = [_padded(0, 10), _padded(1, MAX_MESSAGE_BYTES), _padded(2, 10)]
    calls = _RecordingCalls()
    result = send_in_calls(_messages(records, fifo=False), calls, fifo=False, what="queue q")
    assert list(result.failed) == ["e001"]
    assert isinstance(result.failed["e001"], PermanentSinkError)
    assert f"over the {MAX_MESSAGE_BYTES}-byte limit" in str(result.failed["e001"])
    assert calls.event_ids() == [["e000", "e002"]]


def test_entry_failures_map_sender_faults_to_permanent_and_the_rest_to_retryable() -> None:
    records = [_padded(n, 10) for n in range(4)]
    calls = _RecordingCalls(
        fail={
            "e001": EntryFailure("InvalidParameterValue", "bad delay", sender_fault=True),
            "e002": EntryFailure("InternalError", "try again", sender_fault=False),
        }
    )
    result = send_in_calls(_messages(records, fifo=False), calls, fifo=False, what="queue q")
    assert set(result.failed) == {"e001", "e002"}
    assert isinstance(result.failed["e001"], PermanentSinkError)
    assert "InvalidParameterValue: bad delay" in result.failed["e001"].full_text()
    assert "bad delay" not in str(result.failed["e001"])  # the service's words go to the dead letter only
    assert isinstance(result.failed["e002"], RetryableSinkError)


def test_fifo_retryable_failure_holds_back_the_rest_of_its_group_only() -> None:
    records = [_padded(0, 10, "a"), _padded(1, 10, "b"), _padded(2, 10, "a"), _padded(3, 10, "b"), _padded(4, 10, "a")]
    calls = _RecordingCalls(fail={"e000": EntryFailure("InternalError", "try again", sender_fault=False)})
    result = send_in_calls(_messages(records, fifo=True), calls, fifo=True, what="queue q.fifo")
    assert set(result.failed) == {"e000", "e002", "e004"}
    assert all(isinstance(result.failed[e], RetryableSinkError) for e in ("e000", "e002", "e004"))
    assert "held back" in str(result.failed["e002"]) and "e000" in str(result.failed["e002"])
    sent = [e for call in calls.event_ids() for e in call]
    assert sent == ["e000", "e001", "e003"]


def test_a_refusal_holds_back_its_items_later_changes_without_blaming_them() -> None:
    """A pipeline in block mode must stop before the refused item's next change is sent; in dead-letter mode the
    writer sends it again at once (NotAttemptedError is never counted against retry.max_attempts)."""
    records = [_padded(0, 10, "a"), _padded(1, 10, "a"), _padded(2, 10, "b")]
    calls = _RecordingCalls(fail={"e000": EntryFailure("InvalidParameterValue", "no", sender_fault=True)})
    result = send_in_calls(_messages(records, fifo=True), calls, fifo=True, what="queue q.fifo")
    assert isinstance(result.failed["e000"], PermanentSinkError)
    assert isinstance(result.failed["e001"], NotAttemptedError)
    assert set(result.failed) == {"e000", "e001"}
    assert [e for call in calls.event_ids() for e in call] == ["e000", "e002"]

    standard = [_padded(0, 10, "a"), _padded(1, 10, "a"), _padded(2, 10, "b")]
    too_big = _messages(standard, fifo=False)
    too_big[0] = dataclasses.replace(too_big[0], size=MAX_MESSAGE_BYTES + 1)
    calls = _RecordingCalls()
    result = send_in_calls(too_big, calls, fifo=False, what="queue q")
    assert isinstance(result.failed["e000"], PermanentSinkError)
    assert isinstance(result.failed["e001"], NotAttemptedError), "the same item's next change was sent"
    assert calls.event_ids() == [["e002"]]


def test_a_call_refused_whole_after_others_were_taken_marks_its_records_for_bisection() -> None:
    records = [_padded(n, 10) for n in range(25)]
    calls = _RecordingCalls(
        raise_on_call=2,
        raise_error=ClientError(
            {"Error": {"Code": "InvalidParameterValue", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
            "SendMessageBatch",
        ),
    )
    result = send_in_calls(_messages(records, fifo=False), calls, fifo=False, what="queue q")
    assert all(isinstance(result.failed[r.event_id], CallRefusedError) for r in records[10:20])
    assert all(isinstance(result.failed[r.event_id], NotAttemptedError) for r in records[20:])


def test_a_failed_first_call_fails_the_write_and_a_later_one_fails_only_the_rest() -> None:
    records = [_padded(n, 10) for n in range(25)]
    with pytest.raises(RetryableSinkError, match="ThrottlingException"):
        send_in_calls(_messages(records, fifo=False), _RecordingCalls(raise_on_call=1), fifo=False, what="queue q")

    calls = _RecordingCalls(raise_on_call=2)
    result = send_in_calls(_messages(records, fifo=False), calls, fifo=False, what="queue q")
    assert sorted(result.failed) == [r.event_id for r in records[10:]]
    assert all(isinstance(e, RetryableSinkError) for e in result.failed.values())
    assert len(calls.calls) == 2


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "SendMessageBatch"
    )


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (_client_error("ThrottlingException", 400), RetryableSinkError, "ThrottlingException"),
        (_client_error("RequestThrottled", 403), RetryableSinkError, "RequestThrottled"),
        (_client_error("InternalError", 500), RetryableSinkError, "InternalError"),
        (_client_error("AccessDenied", 403), DestinationUnusableError, "AccessDenied"),
        (_client_error("AWS.SimpleQueueService.NonExistentQueue", 400), DestinationUnusableError, "does not exist"),
        (_client_error("NotFound", 404), DestinationUnusableError, "does not exist"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), RetryableSinkError, "EndpointConnectionError"),
        (ParamValidationError(report="bad entry"), PermanentSinkError, "ParamValidationError"),
    ],
    ids=["throttling", "sqs-throttled", "5xx", "access-denied", "no-queue", "no-topic", "connection", "validation"],
)
def test_client_errors_map_to_the_two_kinds(error: Exception, kind: type[Exception], words: str) -> None:
    with pytest.raises(kind, match=words) as raised, mapped_errors("SQS queue q"):
        raise error
    assert "SQS queue q" in str(raised.value)
    assert isinstance(raised.value, SinkError)
    # The service's own words (which may quote a value) are kept apart, for the dead-letter destination only.
    if "does not exist" not in str(raised.value):
        assert raised.value.detail == ("m" if isinstance(error, ClientError) else str(error))
