"""The SQS sink against a real moto server: standard and FIFO queues, both body formats, partial failure."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import pytest
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBStreamEvent
from aws_lambda_powertools.utilities.parser.models import DynamoDBStreamModel
from botocore.exceptions import ClientError

from pipeline.aws import AwsClients
from pipeline.ops.demo import _item
from pipeline.records import Batch, ChangeRecord
from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import DestinationUnusableError, NotAttemptedError, PermanentSinkError, RetryableSinkError
from sinks.messages import MAX_MESSAGE_BYTES, message_group_id
from sinks.sqs import SqsSink, SqsSinkSettings
from tests.conftest import stream_records, unique, wait_until
from tests.factories import change_record, stream_arn_of, ttl_identity

PRECISE = Decimal("1234567890123456789012345678.9012345678")


class FaultInjectingClient:
    """A real boto3 client whose batch call can have chosen entries fail before, or at, the server.

    `fail` picks entries to answer as the service does for an internal per-entry failure (`SenderFault` false)
    without sending them; `alter` rewrites an entry before it is sent, so the server itself refuses it;
    `raise_on_call` makes the n-th batch call (1-based) raise the given error. Every other call goes to the real
    client unchanged.
    """

    def __init__(
        self,
        real: Any,
        *,
        batch_method: str,
        entries_key: str,
        fail: Callable[[Mapping[str, Any]], bool] = lambda _entry: False,
        alter: Callable[[dict[str, Any]], dict[str, Any]] = lambda entry: entry,
        raise_on_call: Mapping[int, Exception] | None = None,
    ) -> None:
        self._real = real
        self._batch_method = batch_method
        self._entries_key = entries_key
        self._fail = fail
        self._alter = alter
        self._raise_on_call = dict(raise_on_call or {})
        self.calls: list[list[dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name == self._batch_method:
            return self._batch
        return getattr(self._real, name)

    def _batch(self, **kwargs: Any) -> dict[str, Any]:
        entries: list[dict[str, Any]] = kwargs[self._entries_key]
        self.calls.append(entries)
        error = self._raise_on_call.get(len(self.calls))
        if error is not None:
            raise error
        injected = [
            {"Id": e["Id"], "SenderFault": False, "Code": "InternalError", "Message": "injected internal failure"}
            for e in entries
            if self._fail(e)
        ]
        forwarded = [self._alter(dict(e)) for e in entries if not self._fail(e)]
        response: dict[str, Any] = {"Successful": [], "Failed": []}
        if forwarded:
            response = getattr(self._real, self._batch_method)(**{**kwargs, self._entries_key: forwarded})
        response["Failed"] = [*response.get("Failed", []), *injected]
        return response


def body_event_id(entry: Mapping[str, Any], body_key: str = "MessageBody") -> str:
    event_id: str = json.loads(entry[body_key])["eventID"]
    return event_id


@pytest.fixture
def fifo_queue_url(sqs: Any) -> str:
    url: str = sqs.create_queue(QueueName=unique("changes") + ".fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    return url


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every message on the queue, in the order received, deleting each batch so FIFO groups move on."""
    received: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            WaitTimeSeconds=0,
        ).get("Messages", [])
        if not messages:
            return received
        received.extend(messages)
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        )


def make_sink(aws: EmbeddedAws, url: str, body_format: str = "change", client: Any = None) -> SqsSink:
    settings = SqsSinkSettings(type="sqs", queue_url=url, body_format=body_format)  # type: ignore[arg-type]
    sink = SqsSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=client)
    sink.open()
    return sink


def pipeline_client(aws: EmbeddedAws, service: str) -> Any:
    """A client configured as the pipeline configures its own (botocore retries off)."""
    return AwsClients(aws.region, aws.endpoint_url).client(service)


def batch_of(records: Sequence[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))


def order_changes(count: int) -> list[ChangeRecord]:
    """Inserts, updates and deletes of items using every attribute type; one delete is a TTL expiry."""
    records = []
    for n in range(count):
        item = _item(n)
        keys = {"pk": item["pk"], "sk": item["sk"]}
        event_name = ("INSERT", "MODIFY", "REMOVE")[n % 3]
        identity = ttl_identity() if n == 2 else None
        records.append(
            change_record(
                sequence=5000 + n,
                event_name=event_name,
                keys=keys,
                new_image=item,
                old_image={**item, "paid": {"BOOL": n % 2 == 1}},
                user_identity=identity,
            )
        )
    return records


def decoded(value: Mapping[str, Any], sets: Callable[[list[Any]], Any] = list) -> Any:
    """Typed DynamoDB JSON (as boto3 returns it) -> plain values: exact Decimals, binary as base64 text, sets
    in value order passed through `sets`."""
    ((tag, payload),) = value.items()
    if tag in ("S", "BOOL"):
        return payload
    if tag == "NULL":
        return None
    if tag == "N":
        return Decimal(payload)
    if tag == "B":
        return base64.b64encode(payload).decode()
    if tag in ("SS", "NS", "BS"):
        element = tag[0]
        ordered = sorted(set(payload), key=Decimal if element == "N" else None)
        return sets([decoded({element: v}) for v in ordered])
    if tag == "M":
        return {k: decoded(v, sets) for k, v in payload.items()}
    if tag == "L":
        return [decoded(v, sets) for v in payload]
    raise AssertionError(tag)


def plain(value: Mapping[str, Any]) -> Any:
    """What the `change` body holds for a typed value: sets as sorted arrays."""
    return decoded(value)


def consumer_view(value: Mapping[str, Any]) -> Any:
    """What powertools yields from a Lambda event for a typed value: sets as sets, binary as the base64 text
    Lambda events carry."""
    return decoded(value, set)


def wire(image: Mapping[str, Any]) -> Any:
    """Typed DynamoDB JSON with binary as base64 text, as Lambda events carry it."""
    return json.loads(json.dumps(image, default=lambda b: base64.b64encode(b).decode()))


def assert_parses_with_powertools(bodies: Sequence[dict[str, Any]], sources: Sequence[Mapping[str, Any]]) -> None:
    """Each body, read as a Lambda event record, yields the source stream record's keys and images unchanged,
    through powertools' lenient data class and through its strict pydantic model (every field Lambda sends)."""
    by_id = {source["eventID"]: source["dynamodb"] for source in sources}
    strict = DynamoDBStreamModel.model_validate({"Records": list(bodies)})
    assert sorted(r.eventID for r in strict.Records) == sorted(by_id)
    for model in strict.Records:
        assert model.dynamodb.Keys == {k: consumer_view(v) for k, v in by_id[model.eventID]["Keys"].items()}
    parsed_records = list(DynamoDBStreamEvent({"Records": list(bodies)}).records)
    assert len(parsed_records) == len(sources)
    for parsed in parsed_records:
        source = by_id[parsed.event_id or ""]
        stream = parsed.dynamodb
        assert stream is not None
        assert stream.sequence_number == source["SequenceNumber"]
        assert stream.keys == {k: consumer_view(v) for k, v in source["Keys"].items()}
        assert stream.new_image == {k: consumer_view(v) for k, v in source.get("NewImage", {}).items()}
        assert stream.old_image == {k: consumer_view(v) for k, v in source.get("OldImage", {}).items()}
        if "NewImage" in source:
            assert str(stream.new_image["precise"]) == str(PRECISE)


def test_change_bodies_arrive_exactly_once_with_exact_values(aws: EmbeddedAws, sqs: Any, queue_url: str) -> None:
    records = order_changes(25)
    result = make_sink(aws, queue_url).write(batch_of(records))
    assert result.ok

    received = receive_all(sqs, queue_url)
    bodies = {m["MessageId"]: json.loads(m["Body"], parse_float=Decimal) for m in received}
    by_event = {b["eventID"]: b for b in bodies.values()}
    assert len(received) == len(by_event) == 25
    assert set(by_event) == {r.event_id for r in records}
    for message in received:
        body = json.loads(message["Body"], parse_float=Decimal)
        assert message["MessageAttributes"] == {
            "event_name": {"DataType": "String", "StringValue": body["eventName"]},
            "table": {"DataType": "String", "StringValue": "orders"},
        }
        assert '"precise":1234567890123456789012345678.9012345678' in message["Body"] or body["newImage"] is None
    for record in records:
        body = by_event[record.event_id]
        ddb = record.raw["dynamodb"]
        assert body["eventName"] == record.event_name
        assert body["sequenceNumber"] == ddb["SequenceNumber"]
        assert body["shardId"] == record.shard_id and body["table"] == "orders"
        assert body["approximateCreationDateTime"] == ddb["ApproximateCreationDateTime"].strftime("%Y-%m-%dT%H:%M:%SZ")
        assert body["keys"] == {k: plain(v) for k, v in ddb["Keys"].items()}
        for field, image in (("newImage", "NewImage"), ("oldImage", "OldImage")):
            expected = None if image not in ddb else {k: plain(v) for k, v in ddb[image].items()}
            assert body[field] == expected


def test_dynamodb_bodies_arrive_as_lambda_records_and_parse_with_powertools(
    aws: EmbeddedAws, sqs: Any, queue_url: str
) -> None:
    records = order_changes(14)
    assert make_sink(aws, queue_url, "dynamodb").write(batch_of(records)).ok

    bodies = [json.loads(m["Body"]) for m in receive_all(sqs, queue_url)]
    assert sorted(b["eventID"] for b in bodies) == sorted(r.event_id for r in records)
    by_id = {b["eventID"]: b for b in bodies}
    for record in records:
        body = by_id[record.event_id]
        ddb = record.raw["dynamodb"]
        expected_stream = {
            "ApproximateCreationDateTime": int(ddb["ApproximateCreationDateTime"].timestamp()),
            "Keys": wire(ddb["Keys"]),
            "SequenceNumber": ddb["SequenceNumber"],
            "SizeBytes": ddb["SizeBytes"],
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
        for image in ("NewImage", "OldImage"):
            if image in ddb:
                expected_stream[image] = wire(ddb[image])
        expected = {
            "eventID": record.event_id,
            "eventName": record.event_name,
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1",
            "dynamodb": expected_stream,
            "eventSourceARN": stream_arn_of("orders"),
        }
        if record.user_identity is not None:
            expected["userIdentity"] = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
        assert body == expected
    assert_parses_with_powertools(bodies, [r.raw for r in records])


def test_fifo_sets_group_and_dedup_ids_keeps_item_order_and_drops_resends(
    aws: EmbeddedAws, sqs: Any, fifo_queue_url: str
) -> None:
    # three items, four changes each, interleaved as a stream would interleave them
    records = [
        change_record(sequence=100 + n, event_name="MODIFY", keys={"pk": {"S": f"item-{n % 3}"}}, event_id=f"e{n:03d}")
        for n in range(12)
    ]
    sink = make_sink(aws, fifo_queue_url)
    assert sink.write(batch_of(records)).ok
    assert sink.write(batch_of(records)).ok  # a replay: same event ids, dropped by deduplication

    received = receive_all(sqs, fifo_queue_url)
    assert len(received) == 12
    by_group: dict[str, list[str]] = {}
    for message in received:
        body = json.loads(message["Body"])
        attributes = message["Attributes"]
        assert attributes["MessageDeduplicationId"] == body["eventID"]
        assert attributes["MessageGroupId"] == f'orders:{{"pk":"{body["keys"]["pk"]}"}}'
        by_group.setdefault(attributes["MessageGroupId"], []).append(body["sequenceNumber"])
    assert len(by_group) == 3
    for sequences in by_group.values():
        assert sequences == sorted(sequences, key=int) and len(sequences) == 4


def test_an_entry_the_queue_refuses_is_reported_permanent_and_the_others_are_taken(
    aws: EmbeddedAws, sqs: Any, queue_url: str
) -> None:
    records = order_changes(12)
    refused = records[4].event_id

    def invalid_delay(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "DelaySeconds": 901} if body_event_id(entry) == refused else entry

    client = FaultInjectingClient(
        pipeline_client(aws, "sqs"), batch_method="send_message_batch", entries_key="Entries", alter=invalid_delay
    )
    result = make_sink(aws, queue_url, client=client).write(batch_of(records))

    assert list(result.failed) == [refused]
    error = result.failed[refused]
    assert isinstance(error, PermanentSinkError)
    assert "InvalidParameterValue" in str(error) and "DelaySeconds" in error.full_text()
    delivered = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue_url)]
    assert sorted(delivered) == sorted(r.event_id for r in records if r.event_id != refused)


def test_a_message_over_the_size_limit_is_refused_for_that_record_only(
    aws: EmbeddedAws, sqs: Any, queue_url: str
) -> None:
    records = order_changes(5)
    big = change_record(sequence=9000, new_image={"pk": {"S": "item-0"}, "blob": {"S": "x" * MAX_MESSAGE_BYTES}})
    records.insert(2, big)
    result = make_sink(aws, queue_url).write(batch_of(records))
    assert list(result.failed) == [big.event_id]
    assert isinstance(result.failed[big.event_id], PermanentSinkError)
    assert "byte limit" in str(result.failed[big.event_id])
    delivered = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue_url)]
    assert sorted(delivered) == sorted(r.event_id for r in records if r is not big)


def test_fifo_retryable_entry_failures_hold_back_later_changes_to_the_same_item(
    aws: EmbeddedAws, sqs: Any, fifo_queue_url: str
) -> None:
    # item a: 4 changes, item b: 3 changes, interleaved
    names = ["a", "b", "a", "b", "a", "a", "b"]
    records = [
        change_record(sequence=200 + n, event_name="MODIFY", keys={"pk": {"S": name}}, event_id=f"{name}{n}")
        for n, name in enumerate(names)
    ]
    first_of_a = records[0].event_id
    failing = {first_of_a}
    client = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        fail=lambda entry: body_event_id(entry) in failing,
    )
    sink = make_sink(aws, fifo_queue_url, client=client)
    result = sink.write(batch_of(records))

    a_ids = [r.event_id for r in records if r.keys["pk"] == "a"]
    assert sorted(result.failed) == sorted(a_ids)
    assert all(isinstance(e, RetryableSinkError) for e in result.failed.values())
    assert "InternalError" in str(result.failed[first_of_a])
    for later in a_ids[1:]:
        reason = str(result.failed[later])
        assert "held back" in reason and first_of_a in reason
    sent = [body_event_id(e) for call in client.calls for e in call]
    assert sent.count(first_of_a) == 1 and not set(a_ids[1:]) & set(sent)
    b_group = message_group_id(records[1])
    received = receive_all(sqs, fifo_queue_url)
    assert [json.loads(m["Body"])["eventID"] for m in received] == ["b1", "b3", "b6"]
    assert {m["Attributes"]["MessageGroupId"] for m in received} == {b_group}

    # What the pipeline does next: write the refused records again; once taken, item a arrives in order.
    failing.clear()
    retried = [r for r in records if r.event_id in result.failed]
    assert sink.write(batch_of(retried)).ok
    assert [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, fifo_queue_url)] == a_ids


def test_standard_queue_failure_holds_back_only_its_items_later_changes(
    aws: EmbeddedAws, sqs: Any, queue_url: str
) -> None:
    """One change per item per call, and an item's later changes wait behind one not taken (a pipeline in block
    mode must not send them); other items go on."""
    records = [change_record(sequence=300 + n, keys={"pk": {"S": "a"}}, event_id=f"s{n}") for n in range(4)]
    records.append(change_record(sequence=310, keys={"pk": {"S": "b"}}, event_id="t0"))
    client = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        fail=lambda entry: body_event_id(entry) == "s0",
    )
    result = make_sink(aws, queue_url, client=client).write(batch_of(records))
    assert sorted(result.failed) == ["s0", "s1", "s2", "s3"]
    assert isinstance(result.failed["s0"], RetryableSinkError) and not isinstance(
        result.failed["s0"], NotAttemptedError
    )
    assert all(isinstance(result.failed[e], NotAttemptedError) for e in ("s1", "s2", "s3"))
    assert sorted(json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue_url)) == ["t0"]


def _client_error(code: str, status: int, operation: str = "SendMessageBatch") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def test_throttled_calls_fail_the_write_or_only_what_was_not_sent(aws: EmbeddedAws, sqs: Any, queue_url: str) -> None:
    records = order_changes(25)
    throttled_first = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        raise_on_call={1: _client_error("ThrottlingException", 400)},
    )
    with pytest.raises(RetryableSinkError, match="ThrottlingException"):
        make_sink(aws, queue_url, client=throttled_first).write(batch_of(records))
    assert receive_all(sqs, queue_url) == []

    throttled_second = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        raise_on_call={2: _client_error("ServiceUnavailable", 503)},
    )
    result = make_sink(aws, queue_url, client=throttled_second).write(batch_of(records))
    assert sorted(result.failed) == sorted(r.event_id for r in records[10:])
    assert all(isinstance(e, RetryableSinkError) for e in result.failed.values())
    delivered = sorted(json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue_url))
    assert delivered == sorted(r.event_id for r in records[:10])


def test_access_denied_for_the_call_is_the_destination_unusable_not_a_refusal(aws: EmbeddedAws, queue_url: str) -> None:
    denied = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        raise_on_call={1: _client_error("AccessDenied", 403)},
    )
    with pytest.raises(DestinationUnusableError, match="AccessDenied"):
        make_sink(aws, queue_url, client=denied).write(batch_of(order_changes(3)))


def test_open_names_a_queue_that_does_not_exist(aws: EmbeddedAws, queue_url: str) -> None:
    missing = queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    with pytest.raises(DestinationUnusableError) as raised:
        make_sink(aws, missing)
    assert str(raised.value).startswith(f"SQS queue {missing} does not exist")


@pytest.mark.parametrize(
    ("sink", "line"),
    [
        ({"type": "sqs", "queue_url": "changes"}, "queue_url must be a queue URL"),
        ({"type": "sqs", "queue_url": "arn:aws:sqs:us-east-1:123456789012:changes"}, "not the ARN"),
        ({"type": "sqs"}, "sinks[0].queue_url: required key is missing"),
        (
            {"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/q", "body_format": "xml"},
            "sinks[0].body_format",
        ),
        (
            {"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/q", "queue": "x"},
            "sinks[0].queue: unknown key",
        ),
    ],
)
def test_config_errors_name_the_key(sink: dict[str, Any], line: str) -> None:
    assert_config_error(sink, line)


def assert_config_error(sink: dict[str, Any], line: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(source={"table_name": "orders"}, sinks=[sink])
    assert any(line in text for text in raised.value.lines), raised.value.lines


def test_the_pipeline_delivers_every_change_and_dead_letters_the_one_too_big(
    aws: EmbeddedAws,
    dynamodb: Any,
    sqs: Any,
    table: str,
    queue_url: str,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(sinks=[{"type": "sqs", "queue_url": queue_url, "body_format": "dynamodb"}])
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        for n in range(12):
            dynamodb.put_item(TableName=table, Item=_item(n))
        oversized = {**_item(99), "notes": {"S": "x" * 300_000}}
        dynamodb.put_item(TableName=table, Item=oversized)
        for n in range(12, 15):
            dynamodb.put_item(TableName=table, Item=_item(n))
        dynamodb.delete_item(TableName=table, Key={"pk": _item(3)["pk"], "sk": _item(3)["sk"]})
        truth = stream_records(aws, table)
        last = max(truth, key=lambda r: int(r["dynamodb"]["SequenceNumber"]))["dynamodb"]["SequenceNumber"]
        wait_until(
            lambda: list(pipeline.stats.committed.values()) == [last] or pipeline.fatal is not None,
            what="checkpoint at the last change",
        )
        assert pipeline.fatal is None, pipeline.fatal
    finally:
        assert pipeline.stop() is True

    too_big = next(r for r in truth if "notes" in r["dynamodb"].get("NewImage", {}))
    with open(settings.dead_letter.path) as lines:
        letters = [json.loads(line) for line in lines]
    assert [letter["event_id"] for letter in letters] == [too_big["eventID"]]
    assert letters[0]["sink"] == "sqs" and "byte limit" in letters[0]["error"]
    assert len(letters[0]["record"]["dynamodb"]["NewImage"]["notes"]["S"]) == 300_000

    bodies = [json.loads(m["Body"]) for m in receive_all(sqs, queue_url)]
    expected_ids = sorted(r["eventID"] for r in truth if r is not too_big)
    assert sorted(b["eventID"] for b in bodies) == expected_ids and len(bodies) == len(truth) - 1 == 16
    assert [b["eventName"] for b in bodies].count("REMOVE") == 1
    # The stream the pipeline read, as Lambda names it in every record.
    stream_arn = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    assert {b["eventSourceARN"] for b in bodies} == {stream_arn}

    assert_parses_with_powertools(bodies, [r for r in truth if r is not too_big])
