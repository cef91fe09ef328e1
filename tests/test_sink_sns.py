"""The SNS sink against a real moto server, delivering through real SNS -> SQS subscriptions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest

from pipeline.records import ChangeRecord
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import DestinationUnusableError, PermanentSinkError, RetryableSinkError
from sinks.messages import MAX_MESSAGE_BYTES, message_group_id
from sinks.sns import SnsSink, SnsSinkSettings
from tests.conftest import unique
from tests.factories import change_record
from tests.test_sink_sqs import (
    FaultInjectingClient,
    assert_config_error,
    assert_parses_with_powertools,
    batch_of,
    order_changes,
    pipeline_client,
    plain,
    receive_all,
)


@pytest.fixture
def sns(aws: EmbeddedAws) -> Any:
    return aws.client("sns")


@pytest.fixture
def sqs(aws: EmbeddedAws) -> Any:
    return aws.client("sqs")


def make_topic(sns: Any, *, fifo: bool = False) -> str:
    if fifo:
        name = unique("changes") + ".fifo"
        arn: str = sns.create_topic(Name=name, Attributes={"FifoTopic": "true"})["TopicArn"]
    else:
        arn = sns.create_topic(Name=unique("changes"))["TopicArn"]
    return arn


def subscribe_queue(
    sns: Any, sqs: Any, topic_arn: str, *, raw: bool, filter_policy: dict[str, Any] | None = None
) -> str:
    """A new queue subscribed to the topic (FIFO when the topic is); returns the queue URL."""
    fifo = topic_arn.endswith(".fifo")
    name = unique("subscriber") + (".fifo" if fifo else "")
    url: str = sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true"} if fifo else {})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    attributes: dict[str, str] = {}
    if raw:
        attributes["RawMessageDelivery"] = "true"
    if filter_policy is not None:
        attributes["FilterPolicy"] = json.dumps(filter_policy)
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn, Attributes=attributes)
    return url


def make_sink(aws: EmbeddedAws, topic_arn: str, body_format: str = "change", client: Any = None) -> SnsSink:
    settings = SnsSinkSettings(type="sns", topic_arn=topic_arn, body_format=body_format)  # type: ignore[arg-type]
    sink = SnsSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=client)
    sink.open()
    return sink


def faulty_sns(aws: EmbeddedAws, **faults: Any) -> FaultInjectingClient:
    return FaultInjectingClient(
        pipeline_client(aws, "sns"), batch_method="publish_batch", entries_key="PublishBatchRequestEntries", **faults
    )


def event_id_of(entry: dict[str, Any]) -> str:
    event_id: str = json.loads(entry["Message"])["eventID"]
    return event_id


def assert_exact_change_bodies(bodies: Sequence[dict[str, Any]], records: Sequence[ChangeRecord]) -> None:
    by_id = {r.event_id: r for r in records}
    assert len(bodies) == len({b["eventID"] for b in bodies}) == len(records)
    for body in bodies:
        ddb = by_id[body["eventID"]].raw["dynamodb"]
        assert body["sequenceNumber"] == ddb["SequenceNumber"]
        assert body["keys"] == {k: plain(v) for k, v in ddb["Keys"].items()}
        for field, image in (("newImage", "NewImage"), ("oldImage", "OldImage")):
            assert body[field] == (None if image not in ddb else {k: plain(v) for k, v in ddb[image].items()})


def test_a_filtered_raw_subscription_receives_exactly_the_matching_changes(
    aws: EmbeddedAws, sns: Any, sqs: Any
) -> None:
    topic = make_topic(sns)
    removes = subscribe_queue(sns, sqs, topic, raw=True, filter_policy={"event_name": ["REMOVE"]})
    everything = subscribe_queue(sns, sqs, topic, raw=True)
    records = order_changes(21)
    assert make_sink(aws, topic).write(batch_of(records)).ok

    removed = receive_all(sqs, removes)
    expected = [r for r in records if r.event_name == "REMOVE"]
    bodies = [json.loads(m["Body"], parse_float=Decimal) for m in removed]
    assert sorted(b["eventID"] for b in bodies) == sorted(r.event_id for r in expected) and len(expected) == 7
    assert_exact_change_bodies(bodies, expected)
    for message in removed:
        assert message["MessageAttributes"]["event_name"] == {"DataType": "String", "StringValue": "REMOVE"}
        assert message["MessageAttributes"]["table"] == {"DataType": "String", "StringValue": "orders"}

    all_bodies = [json.loads(m["Body"], parse_float=Decimal) for m in receive_all(sqs, everything)]
    assert_exact_change_bodies(all_bodies, records)


def test_an_enveloped_subscription_carries_the_body_and_attributes_in_the_sns_envelope(
    aws: EmbeddedAws, sns: Any, sqs: Any
) -> None:
    topic = make_topic(sns)
    inserts = subscribe_queue(sns, sqs, topic, raw=False, filter_policy={"event_name": ["INSERT"]})
    records = order_changes(9)
    assert make_sink(aws, topic).write(batch_of(records)).ok

    envelopes = [json.loads(m["Body"]) for m in receive_all(sqs, inserts)]
    assert {e["Type"] for e in envelopes} == {"Notification"}
    assert {e["TopicArn"] for e in envelopes} == {topic}
    assert all(e["MessageAttributes"]["event_name"] == {"Type": "String", "Value": "INSERT"} for e in envelopes)
    bodies = [json.loads(e["Message"], parse_float=Decimal) for e in envelopes]
    assert_exact_change_bodies(bodies, [r for r in records if r.event_name == "INSERT"])


def test_dynamodb_bodies_through_sns_parse_with_powertools(aws: EmbeddedAws, sns: Any, sqs: Any) -> None:
    topic = make_topic(sns)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    records = order_changes(12)
    assert make_sink(aws, topic, "dynamodb").write(batch_of(records)).ok
    bodies = [json.loads(m["Body"]) for m in receive_all(sqs, queue)]
    assert_parses_with_powertools(bodies, [r.raw for r in records])


def test_calls_stay_within_ten_entries_and_256_kib(aws: EmbeddedAws, sns: Any, sqs: Any) -> None:
    topic = make_topic(sns)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    small = [change_record(sequence=n, keys={"pk": {"S": f"s{n}"}}) for n in range(13)]
    large = [
        change_record(sequence=100 + n, new_image={"pk": {"S": f"l{n}"}, "pad": {"S": "x" * 60_000}}) for n in range(9)
    ]
    client = faulty_sns(aws)
    assert make_sink(aws, topic, client=client).write(batch_of(small + large)).ok
    sizes = [sum(len(e["Message"].encode()) for e in call) for call in client.calls]
    assert [len(call) for call in client.calls] == [10, 7, 4, 1]
    assert all(size <= MAX_MESSAGE_BYTES for size in sizes)
    delivered = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue)]
    assert sorted(delivered) == sorted(r.event_id for r in small + large)


def test_fifo_topic_to_fifo_queue_keeps_item_order_with_group_and_dedup_ids(
    aws: EmbeddedAws, sns: Any, sqs: Any
) -> None:
    topic = make_topic(sns, fifo=True)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    records = [
        change_record(sequence=100 + n, event_name="MODIFY", keys={"pk": {"S": f"item-{n % 3}"}}, event_id=f"e{n:03d}")
        for n in range(12)
    ]
    assert make_sink(aws, topic).write(batch_of(records)).ok

    received = receive_all(sqs, queue)
    assert len(received) == 12
    by_group: dict[str, list[str]] = {}
    for message in received:
        body = json.loads(message["Body"])
        assert message["Attributes"]["MessageDeduplicationId"] == body["eventID"]
        by_group.setdefault(message["Attributes"]["MessageGroupId"], []).append(body["eventID"])
    assert by_group == {
        message_group_id(records[k]): [r.event_id for r in records if r.keys == records[k].keys] for k in range(3)
    }


def test_an_entry_the_topic_refuses_is_reported_permanent_and_the_others_are_published(
    aws: EmbeddedAws, sns: Any, sqs: Any
) -> None:
    topic = make_topic(sns)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    records = order_changes(8)
    refused = records[5].event_id

    def invalid_structure(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "MessageStructure": "xml"} if event_id_of(entry) == refused else entry

    result = make_sink(aws, topic, client=faulty_sns(aws, alter=invalid_structure)).write(batch_of(records))
    assert list(result.failed) == [refused]
    assert isinstance(result.failed[refused], PermanentSinkError)
    assert "InvalidParameter" in str(result.failed[refused])
    delivered = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue)]
    assert sorted(delivered) == sorted(r.event_id for r in records if r.event_id != refused)


def test_a_message_over_the_size_limit_is_refused_for_that_record_only(aws: EmbeddedAws, sns: Any, sqs: Any) -> None:
    topic = make_topic(sns)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    records = order_changes(4)
    big = change_record(sequence=9000, new_image={"pk": {"S": "big"}, "pad": {"S": "x" * MAX_MESSAGE_BYTES}})
    result = make_sink(aws, topic).write(batch_of([*records, big]))
    assert list(result.failed) == [big.event_id]
    assert isinstance(result.failed[big.event_id], PermanentSinkError)
    delivered = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue)]
    assert sorted(delivered) == sorted(r.event_id for r in records)


def test_fifo_retryable_entry_failures_hold_back_later_changes_to_the_same_item(
    aws: EmbeddedAws, sns: Any, sqs: Any
) -> None:
    topic = make_topic(sns, fifo=True)
    queue = subscribe_queue(sns, sqs, topic, raw=True)
    names = ["a", "b", "a", "a", "b"]
    records = [
        change_record(sequence=200 + n, event_name="MODIFY", keys={"pk": {"S": name}}, event_id=f"{name}{n}")
        for n, name in enumerate(names)
    ]
    failing = {"a0"}
    sink = make_sink(aws, topic, client=faulty_sns(aws, fail=lambda entry: event_id_of(entry) in failing))
    result = sink.write(batch_of(records))
    assert sorted(result.failed) == ["a0", "a2", "a3"]
    assert all(isinstance(e, RetryableSinkError) for e in result.failed.values())
    assert all("held back" in str(result.failed[e]) for e in ("a2", "a3"))
    assert [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue)] == ["b1", "b4"]

    failing.clear()
    assert sink.write(batch_of([r for r in records if r.event_id in result.failed])).ok
    assert [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue)] == ["a0", "a2", "a3"]


def test_open_names_a_topic_that_does_not_exist(aws: EmbeddedAws, sns: Any) -> None:
    missing = make_topic(sns) + "-gone"
    with pytest.raises(DestinationUnusableError) as raised:
        make_sink(aws, missing)
    assert str(raised.value).startswith(f"SNS topic {missing} does not exist")


@pytest.mark.parametrize(
    ("sink", "line"),
    [
        ({"type": "sns", "topic_arn": "changes"}, "topic_arn must be a topic ARN"),
        ({"type": "sns", "topic_arn": "https://sqs.us-east-1.amazonaws.com/123456789012/q"}, "not the name"),
        ({"type": "sns"}, "sinks[0].topic_arn: required key is missing"),
        ({"type": "sns", "topic_arn": "arn:aws:sns:us-east-1:123456789012:t", "fifo": True}, "sinks[0].fifo"),
    ],
)
def test_config_errors_name_the_key(sink: dict[str, Any], line: str) -> None:
    assert_config_error(sink, line)
