"""The Lambda handler, driven with events in Lambda's exact format, against a moto server over HTTP.

Events come from real stream records read from moto and from the simulated stream (converted as Lambda converts
GetRecords records: camelCase `eventSourceARN`, epoch-second creation times, binary as base64), from the sample
event in AWS's Lambda documentation, and from factory-built records where a test needs many changes of a few
items.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aws_lambda_powertools.utilities.parser.models import DynamoDBStreamModel

from pipeline import lambda_handler
from pipeline.lambda_handler import SHARD_ID, LambdaEventError, LambdaPipeline, decode_event, handler
from pipeline.records import change_record_from_stream
from pipeline.settings import ConfigError, Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from sinks.base import PermanentSinkError, Sink
from sinks.memory import FlakySink, MemorySink, refuse_event_ids
from sinks.messages import lambda_record
from tests.conftest import read_archive, stream_records, unique
from tests.factories import change_record
from tests.fault_proxy import SLOW_DOWN, FaultProxy, RequestInfo

TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "lambda-sam.yaml"

# The example event of "Using AWS Lambda with Amazon DynamoDB" in the AWS Lambda Developer Guide, as published.
AWS_SAMPLE_EVENT: dict[str, Any] = {
    "Records": [
        {
            "eventID": "1",
            "eventVersion": "1.0",
            "dynamodb": {
                "Keys": {"Id": {"N": "101"}},
                "NewImage": {"Message": {"S": "New item!"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
                "SequenceNumber": "111",
                "SizeBytes": 26,
            },
            "awsRegion": "us-west-2",
            "eventName": "INSERT",
            "eventSourceARN": "arn:aws:dynamodb:us-east-2:123456789012:table/my-table/stream/2023-06-10T19:26:16.525",
            "eventSource": "aws:dynamodb",
        },
        {
            "eventID": "2",
            "eventVersion": "1.0",
            "dynamodb": {
                "OldImage": {"Message": {"S": "New item!"}, "Id": {"N": "101"}},
                "SequenceNumber": "222",
                "Keys": {"Id": {"N": "101"}},
                "SizeBytes": 59,
                "NewImage": {"Message": {"S": "This item has changed"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
            },
            "awsRegion": "us-west-2",
            "eventName": "MODIFY",
            "eventSourceARN": "arn:aws:dynamodb:us-east-2:123456789012:table/my-table/stream/2023-06-10T19:26:16.525",
            "eventSource": "aws:dynamodb",
        },
        {
            "eventID": "3",
            "eventVersion": "1.0",
            "dynamodb": {
                "Keys": {"Id": {"N": "101"}},
                "SizeBytes": 38,
                "SequenceNumber": "333",
                "OldImage": {"Message": {"S": "This item has changed"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
            },
            "awsRegion": "us-west-2",
            "eventName": "REMOVE",
            "eventSourceARN": "arn:aws:dynamodb:us-east-2:123456789012:table/my-table/stream/2023-06-10T19:26:16.525",
            "eventSource": "aws:dynamodb",
        },
    ]
}


class FakeContext:
    """Lambda's context as far as the handler reads it: the time left, counting down."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._end - time.monotonic()) * 1000))


# --- destinations ---------------------------------------------------------------------------------------------


@pytest.fixture
def topic_queue(aws: EmbeddedAws, sqs: Any) -> tuple[str, str]:
    """An SNS topic and the URL of a queue subscribed to it (raw delivery)."""
    sns = aws.client("sns")
    topic: str = sns.create_topic(Name=unique("changes"))["TopicArn"]
    url: str = sqs.create_queue(QueueName=unique("subscriber"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
    return topic, url


@pytest.fixture
def dead_letter_bucket(s3: Any) -> str:
    name = unique("dead-letters")
    s3.create_bucket(Bucket=name)
    return name


def received_event_ids(sqs: Any, url: str) -> list[str]:
    ids: list[str] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not messages:
            return ids
        ids.extend(json.loads(m["Body"])["eventID"] for m in messages)
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        )


def dead_letters_in(s3: Any, bucket: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        entries.extend(orjson.loads(line) for line in body.splitlines())
    return entries


def settings_for(aws: EmbeddedAws, sinks: list[dict[str, Any]], **sections: Any) -> Settings:
    values: dict[str, Any] = {
        "source": {"region": aws.region, "endpoint_url": aws.endpoint_url, "stream_arn": STREAM_ARN},
        "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05},
        "dead_letter": {"on_failure": "block"},
        "sinks": sinks,
        **sections,
    }
    return load_settings(**values)


# --- events -----------------------------------------------------------------------------------------------------

STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-01-01T00:00:00.000"


def lambda_event(records: Sequence[Any]) -> dict[str, Any]:
    """A DynamoDB event as Lambda delivers it: each record through JSON, checked against powertools' strict
    model of Lambda's event (every field Lambda sends)."""
    event = orjson.loads(orjson.dumps({"Records": [lambda_record(r) for r in records]}))
    DynamoDBStreamModel.model_validate(event)
    return dict(event)


def item_changes(items: int, changes: int) -> list[Any]:
    """`changes` changes of each of `items` items, interleaved in stream order (item k: records k, k+items, ...)."""
    sequence = itertools.count(1)
    records = []
    for round_ in range(changes):
        for item in range(items):
            n = next(sequence)
            records.append(
                change_record(
                    table="orders",
                    sequence=n,
                    event_id=f"e{n}",
                    event_name="INSERT" if round_ == 0 else "MODIFY",
                    keys={"pk": {"S": f"item-{item}"}, "sk": {"S": "a"}},
                    new_image={"pk": {"S": f"item-{item}"}, "sk": {"S": "a"}, "round": {"N": str(round_)}},
                )
            )
    return records


def sequences(event: dict[str, Any]) -> list[str]:
    return [r["dynamodb"]["SequenceNumber"] for r in event["Records"]]


def assert_once_each_in_item_order(
    delivered: Sequence[tuple[str, str]], expected: Sequence[str], resent_from: int
) -> None:
    """`delivered` is (item, sequence) in delivery order: every expected record at least once, a record more than
    once only from the re-sent span on, and each item's changes never going back before a change it already had
    (a re-send repeats only the item's changes from the span)."""
    counts: dict[str, int] = {}
    for _item, sequence in delivered:
        counts[sequence] = counts.get(sequence, 0) + 1
    assert sorted(counts, key=int) == list(expected)
    assert all(int(s) >= resent_from for s, n in counts.items() if n > 1), counts
    by_item: dict[str, list[int]] = {}
    for item, sequence in delivered:
        by_item.setdefault(item, []).append(int(sequence))
    for item, seen in by_item.items():
        assert seen == sorted(seen), f"item {item} out of order: {seen}"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths (block mode's unused dead-letter file, opened at start) land in the test's directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fresh_container(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No pipeline cached from an earlier test: the next `handler` call is a cold start."""
    monkeypatch.setattr(lambda_handler, "_pipeline", None)
    yield
    if lambda_handler._pipeline is not None:
        lambda_handler._pipeline.close()


# --- every sink gets the records ---------------------------------------------------------------------------------


def test_records_read_from_a_moto_stream_reach_every_sink_and_the_container_keeps_its_sinks(
    aws: EmbeddedAws,
    table: str,
    bucket: str,
    replica: str,
    sqs: Any,
    queue_url: str,
    topic_queue: tuple[str, str],
    dead_letter_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_container: None,
) -> None:
    """Changes made in moto, read from its stream and converted as Lambda converts them, go through
    `handler` (configured by a bundled TOML file) to the archive, a queue, a topic and a replica table; the
    second invocation reuses the container's pipeline."""
    dynamodb = aws.client("dynamodb")
    for n in range(3):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": f"o{n}"}, "sk": {"S": "a"}, "blob": {"B": b"\x00\xff"}})
    dynamodb.update_item(
        TableName=table,
        Key={"pk": {"S": "o1"}, "sk": {"S": "a"}},
        UpdateExpression="SET amount = :t",
        ExpressionAttributeValues={":t": {"N": "12.50"}},
    )
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "o2"}, "sk": {"S": "a"}})
    arn = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    raw = stream_records(aws, table)
    assert len(raw) == 5
    records = [change_record_from_stream(r, table=table, shard_id="shardId-1", stream_arn=arn) for r in raw]
    event = lambda_event(records)
    topic, topic_url = topic_queue
    config = tmp_path / "streamsink.toml"
    config.write_text(
        f"""
[source]
region = "{aws.region}"
endpoint_url = "{aws.endpoint_url}"

[retry]
max_attempts = 3
initial_delay_seconds = 0.01
max_delay_seconds = 0.05

[dead_letter]
destination = "s3"
bucket = "{dead_letter_bucket}"

[[sinks]]
type = "s3_parquet"
bucket = "{bucket}"
prefix = "orders/"

[[sinks]]
type = "sqs"
queue_url = "{queue_url}"
body_format = "dynamodb"

[[sinks]]
type = "sns"
topic_arn = "{topic}"

[[sinks]]
type = "dynamodb_table"
table_name = "{replica}"
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))  # streamsink.toml beside the code: the default file

    assert handler({"Records": event["Records"][:3]}, FakeContext(20)) == {"batchItemFailures": []}
    first = lambda_handler._pipeline
    assert handler({"Records": event["Records"][3:]}, FakeContext(20)) == {"batchItemFailures": []}
    assert lambda_handler._pipeline is first  # built and opened once per container

    ids = [r["eventID"] for r in event["Records"]]
    archived = read_archive(aws, bucket).to_pydict()
    assert sorted(archived["event_id"]) == sorted(ids)
    assert set(archived["shard_id"]) == {SHARD_ID}
    assert sorted(received_event_ids(sqs, queue_url)) == sorted(ids)
    assert sorted(received_event_ids(sqs, topic_url)) == sorted(ids)
    items = dynamodb.scan(TableName=replica)["Items"]
    assert sorted(i["pk"]["S"] for i in items) == ["o0", "o1"]
    assert next(i for i in items if i["pk"]["S"] == "o1")["amount"] == {"N": "12.50"}  # the digits as sent
    assert next(i for i in items if i["pk"]["S"] == "o0")["blob"] == {"B": b"\x00\xff"}


def test_the_sample_event_of_the_aws_documentation_reaches_every_sink(
    aws: EmbeddedAws,
    bucket: str,
    sqs: Any,
    queue_url: str,
    topic_queue: tuple[str, str],
    dead_letter_bucket: str,
) -> None:
    """AWS's published sample (INSERT, MODIFY, REMOVE of Id 101; no creation times) in two invocations: the replica
    holds the modified item after the first and none after the second; archive, queue and topic get all three."""
    dynamodb = aws.client("dynamodb")
    replica = unique("my-table-replica")
    dynamodb.create_table(
        TableName=replica,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "Id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "Id", "AttributeType": "N"}],
    )
    topic, topic_url = topic_queue
    settings = settings_for(
        aws,
        [
            {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/"},
            {"type": "sqs", "queue_url": queue_url},
            {"type": "sns", "topic_arn": topic},
            {"type": "dynamodb_table", "table_name": replica},
        ],
        source={"region": aws.region, "endpoint_url": aws.endpoint_url, "table_name": "my-table"},
        dead_letter={"destination": "s3", "bucket": dead_letter_bucket},
    )
    event = copy.deepcopy(AWS_SAMPLE_EVENT)
    decoded = decode_event(event)
    assert [(r.event_name, r.sequence_number, dict(r.keys)) for r in decoded] == [
        ("INSERT", "111", {"Id": 101}),
        ("MODIFY", "222", {"Id": 101}),
        ("REMOVE", "333", {"Id": 101}),
    ]
    assert decoded[1].new_image == {"Message": "This item has changed", "Id": 101}
    assert decoded[0].raw is event["Records"][0]  # dead letters carry the record as Lambda sent it

    pipeline = LambdaPipeline(settings)
    pipeline.open(FakeContext(20))
    assert pipeline.handle({"Records": event["Records"][:2]}, FakeContext(20)) == {"batchItemFailures": []}
    assert dynamodb.get_item(TableName=replica, Key={"Id": {"N": "101"}})["Item"]["Message"] == {
        "S": "This item has changed"
    }
    assert pipeline.handle({"Records": event["Records"][2:]}, FakeContext(20)) == {"batchItemFailures": []}
    assert "Item" not in dynamodb.get_item(TableName=replica, Key={"Id": {"N": "101"}})
    assert sorted(read_archive(aws, bucket).to_pydict()["sequence_number"]) == ["111", "222", "333"]
    assert sorted(received_event_ids(sqs, queue_url)) == ["1", "2", "3"]
    assert sorted(received_event_ids(sqs, topic_url)) == ["1", "2", "3"]
    pipeline.close()


def test_records_of_a_simulated_stream_across_a_split_reach_the_replica_and_the_archive_shard_by_shard(
    aws: EmbeddedAws, bucket: str, replica: str
) -> None:
    """The simulated stream's records (21+ digit sequence numbers, a split, deletes), read shard by shard with a
    real boto3 client and converted as Lambda converts them, one invocation per shard and parents first as an event
    source mapping sends them: the replica ends equal to the table, the archive holds every change once."""
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=1, key_schema=[("pk", "HASH"), ("sk", "RANGE")])
    for n in range(12):
        stream.put_item({"pk": {"S": f"k{n % 5}"}, "sk": {"S": "a"}, "v": {"N": str(n)}})
    stream.split_shard()
    for n in range(12, 30):
        if n % 7 == 0:
            stream.delete_item({"pk": {"S": f"k{n % 5}"}, "sk": {"S": "a"}})
        else:
            stream.put_item({"pk": {"S": f"k{n % 5}"}, "sk": {"S": "a"}, "v": {"N": str(n)}})
    streams = aws.client("dynamodbstreams")
    simulator.attach(streams)
    settings = settings_for(
        aws,
        [
            {"type": "dynamodb_table", "table_name": replica},
            {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/"},
        ],
        source={"region": aws.region, "endpoint_url": aws.endpoint_url, "stream_arn": stream.arn},
    )
    pipeline = LambdaPipeline(settings)
    pipeline.open(FakeContext(20))
    every: list[str] = []
    for shard in stream.shards():  # parents first
        iterator = streams.get_shard_iterator(
            StreamArn=stream.arn, ShardId=shard.shard_id, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        raw: list[Any] = []
        while iterator:  # a closed shard to its end (no NextShardIterator), an open one to its first empty page
            page = streams.get_records(ShardIterator=iterator)
            raw.extend(page["Records"])
            closed = shard.ending_sequence_number is not None
            iterator = page.get("NextShardIterator") if closed or page["Records"] else None
        records = [
            change_record_from_stream(r, table="orders", shard_id=shard.shard_id, stream_arn=stream.arn) for r in raw
        ]
        if records:
            event = lambda_event(records)
            assert len(event["Records"][0]["dynamodb"]["SequenceNumber"]) >= 21
            assert pipeline.handle(event, FakeContext(20)) == {"batchItemFailures": []}
            every.extend(r.event_id for r in records)
    pipeline.close()
    assert len(every) == 30
    items = aws.client("dynamodb").scan(TableName=replica, ConsistentRead=True)["Items"]
    replicated = sorted(({k: v for k, v in i.items() if k != "_streamsink_sequence"} for i in items), key=repr)
    assert replicated == sorted(stream.items(), key=repr)
    assert sorted(read_archive(aws, bucket).to_pydict()["event_id"]) == sorted(every)


# --- the failure contract ---------------------------------------------------------------------------------------


def sqs_calls_fail_from(call: int) -> Callable[[RequestInfo], bool]:
    """A proxy matcher: SendMessageBatch calls from the `call`-th on (1-based) fail; the earlier ones pass."""
    counter = itertools.count(1)
    return lambda request: request.target.endswith("SendMessageBatch") and next(counter) >= call


def test_an_outage_mid_batch_reports_exactly_the_first_untaken_record_and_a_redelivery_completes_it(
    aws: EmbeddedAws, bucket: str, sqs: Any, queue_url: str
) -> None:
    """A queue that takes two calls (records 1-20) and then is down: the response names record 21 alone, after
    retrying until the invocation's time was nearly up; the archive and a mirror took everything. Lambda then sends
    the batch again from record 21, the queue is back, and every sink ends with every record, a record twice only
    from 21 on, each item's changes in order."""
    records = item_changes(items=10, changes=3)  # a call carries one change per item: 10 records a call
    event = lambda_event(records)
    with FaultProxy(aws.endpoint_url) as proxy:
        proxy.inject(sqs_calls_fail_from(3), SLOW_DOWN)
        settings = settings_for(
            aws,
            [
                {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/"},
                {"type": "sqs", "queue_url": queue_url, "endpoint_url": proxy.endpoint_url, "max_concurrency": 1},
                {"type": "memory", "name": "mirror"},
            ],
        )
        pipeline = LambdaPipeline(settings)
        pipeline.open(FakeContext(20))
        context = FakeContext(8.0)  # retries stop at 6 s: the archive's flush has 2 s, room on a loaded machine
        response = pipeline.handle(event, context)
        assert context.get_remaining_time_in_millis() > 0  # answered in time, the archive flushed
        assert response == {"batchItemFailures": [{"itemIdentifier": "21"}]}
        assert proxy.faults["status"] > 1  # retried within the invocation before reporting

        proxy.clear()
        resent = {"Records": [r for r in event["Records"] if int(r["dynamodb"]["SequenceNumber"]) >= 21]}
        assert pipeline.handle(resent, FakeContext(20)) == {"batchItemFailures": []}
    pipeline.close()

    expected = sequences(event)
    by_id = {r.event_id: r for r in records}
    mirror = next(s for s in pipeline.sinks if isinstance(s, MemorySink))
    assert_once_each_in_item_order([(r.keys["pk"], r.sequence_number) for r in mirror.records], expected, 21)
    queued = received_event_ids(sqs, queue_url)
    assert_once_each_in_item_order([(by_id[i].keys["pk"], by_id[i].sequence_number) for i in queued], expected, 21)
    archived = read_archive(aws, bucket).to_pydict()
    rows = sorted(zip(archived["sequence_number"], archived["event_id"], strict=True), key=lambda r: int(r[0]))
    assert_once_each_in_item_order([(by_id[i].keys["pk"], s) for s, i in rows], expected, 21)


def test_a_record_filtered_out_for_the_failing_sink_counts_as_taken_by_it(
    aws: EmbeddedAws, sqs: Any, queue_url: str
) -> None:
    """The queue (down for the whole invocation) gets only REMOVEs: the first record it lacks is the first REMOVE,
    so that is the one reported, not the first record of the batch."""
    records = [
        change_record(table="orders", sequence=1, event_id="e1", event_name="INSERT"),
        change_record(table="orders", sequence=2, event_id="e2", event_name="MODIFY"),
        change_record(table="orders", sequence=3, event_id="e3", event_name="REMOVE"),
        change_record(table="orders", sequence=4, event_id="e4", event_name="INSERT"),
    ]
    with FaultProxy(aws.endpoint_url) as proxy:
        settings = settings_for(
            aws,
            [
                {
                    "type": "sqs",
                    "queue_url": queue_url,
                    "endpoint_url": proxy.endpoint_url,
                    "filter": {"event_names": ["REMOVE"]},
                },
                {"type": "memory", "name": "mirror"},
            ],
        )
        pipeline = LambdaPipeline(settings)
        pipeline.open(FakeContext(20))
        proxy.inject(sqs_calls_fail_from(1), SLOW_DOWN)
        assert pipeline.handle(lambda_event(records), FakeContext(1.0)) == {
            "batchItemFailures": [{"itemIdentifier": "3"}]
        }
    pipeline.close()


def test_a_refused_record_goes_to_the_dead_letter_destination_with_its_payload_and_the_rest_succeed(
    aws: EmbeddedAws, s3: Any, dead_letter_bucket: str
) -> None:
    records = [change_record(table="orders", sequence=n, event_id=f"e{n}") for n in range(1, 7)]
    event = lambda_event(records)
    refusing = FlakySink("refusing", refuse=refuse_event_ids({"e3"}, "ValidationException"))
    mirror = MemorySink("mirror")
    settings = settings_for(aws, [{"type": "memory"}], dead_letter={"destination": "s3", "bucket": dead_letter_bucket})
    pipeline = LambdaPipeline(settings, sinks=[refusing, mirror])
    pipeline.open(FakeContext(20))
    assert pipeline.handle(event, FakeContext(20)) == {"batchItemFailures": []}
    assert [r.event_id for r in refusing.records] == ["e1", "e2", "e4", "e5", "e6"]
    assert [r.event_id for r in mirror.records] == [f"e{n}" for n in range(1, 7)]
    (entry,) = dead_letters_in(s3, dead_letter_bucket)
    assert (entry["sink"], entry["event_id"], entry["shard_id"]) == ("refusing", "e3", SHARD_ID)
    assert entry["record"] == event["Records"][2]  # the payload, exactly as Lambda delivered it
    assert "ValidationException" in entry["error"]


def test_in_block_mode_a_refused_record_is_reported_instead(aws: EmbeddedAws) -> None:
    records = [change_record(table="orders", sequence=n, event_id=f"e{n}") for n in range(1, 7)]
    refusing = FlakySink("refusing", refuse=refuse_event_ids({"e3"}))
    pipeline = LambdaPipeline(settings_for(aws, [{"type": "memory"}]), sinks=[refusing])
    pipeline.open(FakeContext(20))
    assert pipeline.handle(lambda_event(records), FakeContext(20)) == {"batchItemFailures": [{"itemIdentifier": "3"}]}
    assert "e3" not in [r.event_id for r in refusing.records]  # other items' changes of the write were taken


def test_a_near_deadline_stops_the_retries_and_reports_the_first_record(aws: EmbeddedAws) -> None:
    """A sink down for good and 0.8 s left: the handler answers in time, naming the first record."""
    records = [change_record(table="orders", sequence=n, event_id=f"e{n}") for n in range(1, 4)]
    down = FlakySink("down", fail_writes=10**9)
    pipeline = LambdaPipeline(
        settings_for(aws, [{"type": "memory"}], retry={"initial_delay_seconds": 0.05, "max_delay_seconds": 0.2}),
        sinks=[down],
    )
    started = time.monotonic()
    response = pipeline.handle(lambda_event(records), FakeContext(0.8))
    elapsed = time.monotonic() - started
    assert response == {"batchItemFailures": [{"itemIdentifier": "1"}]}
    assert elapsed < 0.8
    assert down.attempts > 1  # retried until the deadline was near, not given up at once


class FailingFlush(MemorySink):
    """Takes every record into a buffer whose flush fails: nothing it took is durable."""

    @property
    def max_buffer_seconds(self) -> float:
        return 60.0

    def flush(self) -> None:
        raise PermanentSinkError("simulated: the buffer cannot be written")


def test_records_a_buffering_sink_could_not_flush_are_reported_and_the_container_rebuilds(
    aws: EmbeddedAws, monkeypatch: pytest.MonkeyPatch, fresh_container: None
) -> None:
    records = [change_record(table="orders", sequence=n, event_id=f"e{n}") for n in range(1, 4)]
    built: list[LambdaPipeline] = []

    def cold_start(event: Any, context: Any) -> LambdaPipeline:
        sinks: list[Sink] = [MemorySink("mirror"), FailingFlush("archive")]
        pipeline = LambdaPipeline(settings_for(aws, [{"type": "memory"}]), sinks=sinks)
        built.append(pipeline)
        return pipeline

    monkeypatch.setattr(lambda_handler, "_cold_start", cold_start)
    assert handler(lambda_event(records), FakeContext(5)) == {"batchItemFailures": [{"itemIdentifier": "1"}]}
    assert lambda_handler._pipeline is None  # its buffer held records reported as failed: built afresh next time
    handler(lambda_event(records), FakeContext(5))
    assert len(built) == 2


# --- configuration ----------------------------------------------------------------------------------------------


def test_environment_variables_alone_configure_the_function_and_the_stream_comes_from_the_event(
    aws: EmbeddedAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_container: None
) -> None:
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))  # no streamsink.toml there
    monkeypatch.delenv("STREAMSINK_CONFIG", raising=False)
    monkeypatch.setenv("STREAMSINK_SOURCE__ENDPOINT_URL", aws.endpoint_url)
    monkeypatch.setenv("STREAMSINK_SINKS", '[{"type": "memory", "name": "mirror"}]')
    monkeypatch.setenv("STREAMSINK_DEAD_LETTER__ON_FAILURE", "block")
    records = [change_record(table="orders", sequence=1, event_id="e1")]
    assert handler(lambda_event(records), FakeContext(5)) == {"batchItemFailures": []}
    pipeline = lambda_handler._pipeline
    assert pipeline is not None
    assert pipeline.settings.source.stream_arn == records[0].stream_arn
    (mirror,) = pipeline.sinks
    assert isinstance(mirror, MemorySink) and [r.event_id for r in mirror.records] == ["e1"]


def test_a_local_dead_letter_file_is_refused_under_lambda(aws: EmbeddedAws) -> None:
    with pytest.raises(ConfigError, match="'jsonl' writes a file in the function's container"):
        LambdaPipeline(settings_for(aws, [{"type": "memory"}], dead_letter={"on_failure": "dead_letter"}))


def test_a_config_naming_a_table_refuses_events_from_another(aws: EmbeddedAws) -> None:
    settings = settings_for(
        aws, [{"type": "memory"}], source={"region": aws.region, "endpoint_url": aws.endpoint_url, "table_name": "x"}
    )
    pipeline = LambdaPipeline(settings)
    with pytest.raises(LambdaEventError, match=r"source\.table_name is 'x'"):
        pipeline.handle(lambda_event([change_record(table="orders")]), FakeContext(5))


def test_a_ttl_delete_keeps_its_user_identity_in_lambdas_spelling() -> None:
    record = change_record(
        table="orders",
        event_name="REMOVE",
        user_identity={"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"},
    )
    event = lambda_event([record])
    assert event["Records"][0]["userIdentity"] == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    (decoded,) = decode_event(event)
    assert decoded.user_identity is not None and decoded.user_identity.is_ttl_expiry
    assert decoded.shard_id == SHARD_ID and decoded.table == "orders"


# --- the SAM template -------------------------------------------------------------------------------------------


def test_the_sam_template_maps_the_stream_with_the_settings_the_failure_contract_needs() -> None:
    """Written in CloudFormation's long forms (`Ref`, `Fn::GetAtt`), so a plain YAML parser reads it."""
    template = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    function = template["Resources"]["StreamsinkFunction"]
    assert function["Type"] == "AWS::Serverless::Function"
    properties = function["Properties"]
    assert properties["Handler"] == lambda_handler.HANDLER == "pipeline.lambda_handler.handler"
    assert properties["Environment"]["Variables"]["STREAMSINK_CONFIG"] == "streamsink.toml"
    (stream,) = properties["Events"].values()
    assert stream["Type"] == "DynamoDB"
    mapping = stream["Properties"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BisectBatchOnFunctionError"] is True
    assert 0 <= mapping["MaximumRetryAttempts"] <= 10_000  # finite: -1 would retry until the record expires
    assert 60 <= mapping["MaximumRecordAgeInSeconds"] <= 86_400  # within the stream's 24-hour retention
    assert mapping["StartingPosition"] in ("TRIM_HORIZON", "LATEST")
    assert 1 <= mapping["BatchSize"] <= 10_000
    assert mapping["ParallelizationFactor"] == 1
    assert mapping["DestinationConfig"]["OnFailure"]["Destination"] == {"Fn::GetAtt": ["StreamFailures", "Arn"]}
    actions = {
        action
        for policy in properties["Policies"]
        for statement in policy["Statement"]
        for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
    }
    assert {"dynamodb:GetRecords", "dynamodb:GetShardIterator", "dynamodb:DescribeStream", "dynamodb:ListStreams"} <= (
        actions
    )
    assert {"s3:PutObject", "sqs:SendMessage", "sns:Publish", "dynamodb:PutItem", "dynamodb:DeleteItem"} <= actions
    assert not any(a.startswith("dynamodb:") and "Checkpoint" in a for a in actions)


def test_an_initial_load_is_refused_under_lambda_in_one_line(
    aws: EmbeddedAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_container: None
) -> None:
    """The handler only delivers what the event source mapping gives it: a config asking for a copy of the table
    is an error naming the key and where loads run, not a load silently never made."""
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))
    monkeypatch.delenv("STREAMSINK_CONFIG", raising=False)
    monkeypatch.setenv("STREAMSINK_SOURCE__ENDPOINT_URL", aws.endpoint_url)
    monkeypatch.setenv("STREAMSINK_SOURCE__INITIAL_LOAD", "scan")
    monkeypatch.setenv("STREAMSINK_SINKS", '[{"type": "memory", "name": "mirror"}]')
    records = [change_record(table="orders", sequence=1, event_id="e1")]
    with pytest.raises(ConfigError) as raised:
        handler(lambda_event(records), FakeContext(5))
    (line,) = raised.value.lines
    assert "source.initial_load" in line and "streamsink run" in line and "\n" not in line
