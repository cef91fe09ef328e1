"""The stream simulator is faithful where it matters: checked through the real boto3 client, at the wire level.

Most tests run over both transports (the in-process botocore hook and the HTTP server), so the bytes, statuses
and errors a consumer meets are the same either way.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
import orjson
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from pipeline.aws import AwsClients
from pipeline.records import unmarshal_image
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from pipeline.testing.simulated_stream import (
    FIRST_SEQUENCE_NUMBER,
    MAX_PAGE_BYTES,
    FaultSchedule,
    ManualClock,
    SimulatedStream,
    StreamDisabledError,
    StreamSimulator,
    item_size,
)
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from sinks.memory import MemorySink
from tests.conftest import unique, wait_until

START = datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
SESSION = boto3.session.Session()  # one loader for every client: the service model is read once
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def simulator(clock: ManualClock) -> StreamSimulator:
    return StreamSimulator(clock=clock)


@pytest.fixture(params=["in_process", "http"])
def connect(request: pytest.FixtureRequest, simulator: StreamSimulator) -> Iterator[Callable[..., Any]]:
    """Make a boto3 `dynamodbstreams` client reaching `simulator` over one of the two transports."""
    if request.param == "in_process":
        yield lambda config=NO_RETRIES: simulator.client(config=config)
        return
    with SimulatedStreamsServer(simulator) as server:
        yield lambda config=NO_RETRIES: SESSION.client(
            "dynamodbstreams",
            region_name=simulator.region,
            endpoint_url=server.endpoint_url,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=config,
        )


@dataclass(frozen=True)
class Endpoints:
    """A `dynamodbstreams` and a `dynamodb` client over one transport, and the server if that is HTTP."""

    streams: Any
    dynamodb: Any
    server: SimulatedStreamsServer | None


@pytest.fixture(params=["in_process", "http"])
def endpoints(request: pytest.FixtureRequest, simulator: StreamSimulator, aws: EmbeddedAws) -> Iterator[Endpoints]:
    """Clients the simulator answers for its streams and its tables' DescribeTable, moto for everything else."""
    if request.param == "in_process":
        dynamodb = SESSION.client(
            "dynamodb",
            region_name=simulator.region,
            endpoint_url=aws.endpoint_url,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=NO_RETRIES,
        )
        simulator.attach_tables(dynamodb)
        yield Endpoints(simulator.client(config=NO_RETRIES), dynamodb, None)
        return
    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as server:

        def make(service: str) -> Any:
            return SESSION.client(
                service,
                region_name=simulator.region,
                endpoint_url=server.endpoint_url,
                aws_access_key_id="x",
                aws_secret_access_key="x",
                config=NO_RETRIES,
            )

        yield Endpoints(make("dynamodbstreams"), make("dynamodb"), server)


def item(pk: str, sk: str = "a", **attributes: dict[str, Any]) -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": sk}, **attributes}


def read_shard(
    client: Any, stream: SimulatedStream, shard_id: str, kind: str = "TRIM_HORIZON", **extra: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a shard until GetRecords stops handing out an iterator or returns an empty page: (records, pages)."""
    iterator = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard_id, ShardIteratorType=kind, **extra)[
        "ShardIterator"
    ]
    records: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    while iterator:
        page = client.get_records(ShardIterator=iterator)
        pages.append(page)
        records.extend(page["Records"])
        iterator = page.get("NextShardIterator")
        if not page["Records"]:
            break
    return records, pages


def error_of(call: Callable[[], Any]) -> tuple[str, int, str]:
    with pytest.raises(ClientError) as caught:
        call()
    response = caught.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Message"]


# -- shape of what the service says ----------------------------------------------------------------------------


def test_describe_and_list_streams_look_like_the_service(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders", shards=3)
    other = simulator.create_stream("customers", key_schema=[("id", "HASH")], view_type="KEYS_ONLY")
    client = connect()

    assert stream.arn == f"arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/{stream.label}"
    assert stream.label == "2025-03-01T12:00:00.250"
    description = client.describe_stream(StreamArn=stream.arn)["StreamDescription"]
    assert description["StreamStatus"] == "ENABLED"
    assert description["StreamViewType"] == "NEW_AND_OLD_IMAGES"
    assert description["TableName"] == "orders"
    assert description["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert description["CreationRequestDateTime"] == START
    shards = description["Shards"]
    assert len(shards) == 3 and "LastEvaluatedShardId" not in description
    for shard in shards:
        assert shard["ShardId"].startswith("shardId-") and 28 <= len(shard["ShardId"]) <= 65
        assert "ParentShardId" not in shard and "EndingSequenceNumber" not in shard["SequenceNumberRange"]
        assert int(shard["SequenceNumberRange"]["StartingSequenceNumber"]) >= FIRST_SEQUENCE_NUMBER

    everything = client.list_streams()["Streams"]
    assert {s["StreamArn"] for s in everything} == {stream.arn, other.arn}
    assert client.list_streams(TableName="customers")["Streams"] == [
        {"StreamArn": other.arn, "TableName": "customers", "StreamLabel": other.label}
    ]
    first = client.list_streams(Limit=1)
    second = client.list_streams(Limit=1, ExclusiveStartStreamArn=first["LastEvaluatedStreamArn"])
    assert {first["Streams"][0]["StreamArn"], second["Streams"][0]["StreamArn"]} == {stream.arn, other.arn}


def test_describe_stream_pages_by_shard_id_and_filters_children(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders", shards=3)
    low, high = stream.split_shard()
    client = connect()

    seen: list[dict[str, Any]] = []
    request: dict[str, Any] = {"StreamArn": stream.arn, "Limit": 2}
    pages = 0
    while True:
        description = client.describe_stream(**request)["StreamDescription"]
        pages += 1
        seen.extend(description["Shards"])
        if "LastEvaluatedShardId" not in description:
            break
        request["ExclusiveStartShardId"] = description["LastEvaluatedShardId"]
    # 5 shards, 2 a page: 3 pages; a full last page would name where it stopped and a 4th page would be empty.
    assert pages == 3
    assert [s["ShardId"] for s in seen] == [s.shard_id for s in stream.shards()]
    assert len({s["ShardId"] for s in seen}) == 5

    children = client.describe_stream(
        StreamArn=stream.arn, ShardFilter={"Type": "CHILD_SHARDS", "ShardId": seen[0]["ShardId"]}
    )["StreamDescription"]["Shards"]
    assert [c["ShardId"] for c in children] == [low, high]
    assert all(c["ParentShardId"] == seen[0]["ShardId"] for c in children)

    code, status, message = error_of(lambda: client.describe_stream(StreamArn=stream.arn, Limit=101))
    assert (code, status) == ("ValidationException", 400) and "less than or equal to 100" in message


def test_records_carry_what_dynamodb_writes(
    simulator: StreamSimulator, clock: ManualClock, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    first = stream.put_item(item("order-1", total={"N": "10.50"}, blob={"B": b"\x00\xff"}, tags={"SS": ["a", "b"]}))
    assert (
        stream.put_item(item("order-1", total={"N": "10.50"}, blob={"B": b"\x00\xff"}, tags={"SS": ["a", "b"]})) is None
    )
    clock.advance(1.9)
    second = stream.put_item(item("order-1", total={"N": "12"}))
    third = stream.delete_item({"pk": {"S": "order-1"}, "sk": {"S": "a"}})
    stream.put_item(item("session-9"))
    ttl = stream.delete_item({"pk": {"S": "session-9"}, "sk": {"S": "a"}}, by_ttl=True)
    assert stream.delete_item({"pk": {"S": "nothing"}, "sk": {"S": "a"}}) is None

    (shard,) = client.describe_stream(StreamArn=stream.arn)["StreamDescription"]["Shards"]
    records, _pages = read_shard(client, stream, shard["ShardId"])
    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY", "REMOVE", "INSERT", "REMOVE"]
    assert [r["dynamodb"]["SequenceNumber"] for r in records[:3]] == [first, second, third]
    numbers = [int(r["dynamodb"]["SequenceNumber"]) for r in records]
    assert numbers == sorted(numbers) and len(set(numbers)) == 5
    assert all(len(r["dynamodb"]["SequenceNumber"]) >= 21 for r in records)
    assert int(shard["SequenceNumberRange"]["StartingSequenceNumber"]) < numbers[0]

    insert, modify, remove, _, expired = records
    for record in records:
        assert record["eventVersion"] == "1.1" and record["eventSource"] == "aws:dynamodb"
        assert record["awsRegion"] == "us-east-1" and len(record["eventID"]) == 32
        assert record["dynamodb"]["StreamViewType"] == "NEW_AND_OLD_IMAGES"
    assert len({r["eventID"] for r in records}) == 5
    assert insert["dynamodb"]["Keys"] == {"pk": {"S": "order-1"}, "sk": {"S": "a"}}
    assert insert["dynamodb"]["NewImage"]["blob"] == {"B": b"\x00\xff"}  # base64 on the wire, bytes in boto3
    assert "OldImage" not in insert["dynamodb"]
    assert modify["dynamodb"]["OldImage"] == insert["dynamodb"]["NewImage"]
    assert modify["dynamodb"]["NewImage"] == item("order-1", total={"N": "12"})
    assert "NewImage" not in remove["dynamodb"] and remove["dynamodb"]["OldImage"] == modify["dynamodb"]["NewImage"]
    assert modify["dynamodb"]["SizeBytes"] == item_size(modify["dynamodb"]["Keys"]) + item_size(
        modify["dynamodb"]["NewImage"]
    ) + item_size(modify["dynamodb"]["OldImage"])
    # Rounded down to the second, as the service does.
    assert insert["dynamodb"]["ApproximateCreationDateTime"] == START.replace(microsecond=0)
    assert modify["dynamodb"]["ApproximateCreationDateTime"] == START.replace(second=2, microsecond=0)
    assert "userIdentity" not in remove
    assert expired["userIdentity"] == {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}
    assert stream.items() == []
    assert ttl is not None


def test_view_types_leave_out_the_images_they_do_not_carry(simulator: StreamSimulator) -> None:
    keys_only = simulator.create_stream("a", view_type="KEYS_ONLY")
    old_only = simulator.create_stream("b", view_type="OLD_IMAGE")
    for stream in (keys_only, old_only):
        stream.put_item(item("k", v={"N": "1"}))
        stream.put_item(item("k", v={"N": "2"}))
    assert [set(r["dynamodb"]) & {"NewImage", "OldImage"} for r in keys_only.records()] == [set(), set()]
    assert [set(r["dynamodb"]) & {"NewImage", "OldImage"} for r in old_only.records()] == [set(), {"OldImage"}]


def test_items_over_400_kb_are_refused_and_keys_are_checked(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("orders")
    with pytest.raises(ValueError, match="maximum allowed size"):
        stream.put_item(item("big", blob={"B": b"x" * 400 * 1024}))
    with pytest.raises(ValueError, match="no key attribute 'sk'"):
        stream.put_item({"pk": {"S": "k"}})
    assert stream.records() == []


# -- shards: lineage, closing, routing -------------------------------------------------------------------------


def test_a_split_closes_the_parent_after_its_last_record_and_children_take_the_keys(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    for n in range(30):
        stream.put_item(item(f"k{n}"))
    (parent,) = stream.open_shard_ids()
    low, high = stream.split_shard()
    for n in range(30):
        stream.put_item(item(f"k{n}", v={"N": "2"}))

    shards = {s["ShardId"]: s for s in client.describe_stream(StreamArn=stream.arn)["StreamDescription"]["Shards"]}
    assert set(shards) == {parent, low, high}
    ending = int(shards[parent]["SequenceNumberRange"]["EndingSequenceNumber"])
    for child in (low, high):
        assert shards[child]["ParentShardId"] == parent
        assert "EndingSequenceNumber" not in shards[child]["SequenceNumberRange"]
        assert int(shards[child]["SequenceNumberRange"]["StartingSequenceNumber"]) > ending

    parent_records, parent_pages = read_shard(client, stream, parent)
    assert len(parent_records) == 30 and int(parent_records[-1]["dynamodb"]["SequenceNumber"]) <= ending
    # The page that returned the last record has no NextShardIterator: the shard is read to its end.
    assert "NextShardIterator" not in parent_pages[-1] and parent_pages[-1]["Records"]
    low_records, low_pages = read_shard(client, stream, low)
    high_records, _ = read_shard(client, stream, high)
    assert len(low_records) + len(high_records) == 30 and low_records and high_records
    assert "NextShardIterator" in low_pages[-1]  # an open shard always hands out the next iterator
    low_keys = {r["dynamodb"]["Keys"]["pk"]["S"] for r in low_records}
    high_keys = {r["dynamodb"]["Keys"]["pk"]["S"] for r in high_records}
    assert not low_keys & high_keys
    assert all(stream.shard_for(item(k)) == low for k in low_keys)
    assert min(int(r["dynamodb"]["SequenceNumber"]) for r in low_records + high_records) > ending


def test_an_iterator_at_the_end_of_a_shard_that_then_closes_ends_without_records(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    stream.put_item(item("a"))
    (shard,) = stream.open_shard_ids()
    iterator = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    page = client.get_records(ShardIterator=iterator)
    assert len(page["Records"]) == 1
    empty = client.get_records(ShardIterator=page["NextShardIterator"])
    assert empty["Records"] == [] and "NextShardIterator" in empty
    stream.roll_over_shard(shard)
    last = client.get_records(ShardIterator=empty["NextShardIterator"])
    assert last["Records"] == [] and "NextShardIterator" not in last


def test_shards_roll_over_every_four_hours_and_split_under_load(simulator: StreamSimulator, clock: ManualClock) -> None:
    stream = simulator.create_stream("orders")
    (first,) = stream.open_shard_ids()
    clock.advance(4 * 3600 - 1)
    assert stream.open_shard_ids() == [first]
    clock.advance(1)
    (second,) = stream.open_shard_ids()
    states = {s.shard_id: s for s in stream.shards()}
    assert states[first].closed and states[second].parent_shard_id == first
    clock.advance(3 * 4 * 3600)  # three more periods at once: three more generations
    chain = [s for s in stream.shards() if s.shard_id not in (first, second)]
    assert [s.parent_shard_id for s in chain] == [second, chain[0].shard_id, chain[1].shard_id]

    busy = simulator.create_stream("busy", auto_split_records=50)
    busy.write_synthetic(120, item_bytes=200)
    lineage = busy.shards()
    assert len([s for s in lineage if not s.closed]) >= 2
    assert sum(s.records for s in lineage) == 120
    assert all(s.records <= 50 for s in lineage)


def test_sequence_numbers_grow_past_21_digits_and_stay_numeric(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("orders", first_sequence_number=10**21 - 500)
    for n in range(40):
        stream.put_item(item(f"k{n}"))
    numbers = [r["dynamodb"]["SequenceNumber"] for r in stream.records()]
    assert {len(n) for n in numbers} == {21, 22}
    assert [int(n) for n in numbers] == sorted(int(n) for n in numbers)
    assert numbers != sorted(numbers)  # as strings they do not sort: consumers must compare numbers


# -- GetRecords pages ------------------------------------------------------------------------------------------


def test_pages_stop_at_limit_at_1000_records_and_at_1_mb(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    small = simulator.create_stream("small")
    small.write_synthetic(2500, item_bytes=100)
    client = connect()
    (shard,) = small.open_shard_ids()
    iterator = client.get_shard_iterator(StreamArn=small.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    assert len(client.get_records(ShardIterator=iterator, Limit=7)["Records"]) == 7
    _, pages = read_shard(client, small, shard)
    assert [len(p["Records"]) for p in pages] == [1000, 1000, 500, 0]
    code, status, _ = error_of(lambda: client.get_records(ShardIterator=iterator, Limit=1001))
    assert (code, status) == ("ValidationException", 400)

    big = simulator.create_stream("big")
    for n in range(12):
        big.put_item(item(f"k{n}", blob={"B": bytes(200_000)}))  # 267 KB each as base64
    (big_shard,) = big.open_shard_ids()
    records, pages = read_shard(client, big, big_shard)
    assert len(records) == 12
    sizes = [c.body_bytes for c in simulator.calls("GetRecords") if c.shard_id == big_shard]
    assert max(sizes) <= MAX_PAGE_BYTES
    assert [len(p["Records"]) for p in pages if p["Records"]] == [3, 3, 3, 3]


def test_at_and_after_sequence_number_and_latest_and_timestamp(
    simulator: StreamSimulator, clock: ManualClock, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    numbers = []
    for n in range(5):
        numbers.append(stream.put_item(item(f"k{n}")))
        clock.advance(10)
    (shard,) = stream.open_shard_ids()

    def first_after(kind: str, **extra: Any) -> str | None:
        records, _ = read_shard(client, stream, shard, kind, **extra)
        return records[0]["dynamodb"]["SequenceNumber"] if records else None

    assert first_after("AT_SEQUENCE_NUMBER", SequenceNumber=numbers[2]) == numbers[2]
    assert first_after("AFTER_SEQUENCE_NUMBER", SequenceNumber=numbers[2]) == numbers[3]
    assert first_after("LATEST") is None
    assert first_after("AT_TIMESTAMP", Timestamp=START.timestamp() + 15) == numbers[2]
    code, _, _ = error_of(
        lambda: client.get_shard_iterator(
            StreamArn=stream.arn, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber="1" * 30
        )
    )
    assert code == "ValidationException"


# -- expiry, retention, errors ---------------------------------------------------------------------------------


def test_iterators_expire_after_15_minutes_and_each_page_hands_out_a_fresh_one(
    simulator: StreamSimulator, clock: ManualClock, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    stream.put_item(item("a"))
    (shard,) = stream.open_shard_ids()
    iterator = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    clock.advance(15 * 60 - 1)
    page = client.get_records(ShardIterator=iterator)
    assert len(page["Records"]) == 1
    clock.advance(1)
    code, status, message = error_of(lambda: client.get_records(ShardIterator=iterator))
    assert (code, status) == ("ExpiredIteratorException", 400) and "maximum age" in message
    with pytest.raises(client.exceptions.ExpiredIteratorException):
        client.get_records(ShardIterator=iterator)
    clock.advance(15 * 60 - 2)  # the page's iterator was issued 1 s before the first one expired
    assert client.get_records(ShardIterator=page["NextShardIterator"])["Records"] == []


def test_records_are_trimmed_after_24_hours_and_old_positions_are_refused(
    simulator: StreamSimulator, clock: ManualClock, connect: Callable[..., Any]
) -> None:
    simulator.rollover_seconds = None
    stream = simulator.create_stream("orders")
    client = connect()
    old = [stream.put_item(item(f"old{n}")) for n in range(5)]
    clock.advance(3600)
    kept = [stream.put_item(item(f"new{n}")) for n in range(3)]
    (shard,) = stream.open_shard_ids()
    clock.advance(23 * 3600 - 300)
    held = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    assert [s.trimmed for s in stream.shards()] == [0]
    clock.advance(300)  # the old records are 24 h old now, the held iterator 5 minutes
    assert [s.trimmed for s in stream.shards()] == [5]

    records, _ = read_shard(client, stream, shard)
    assert [r["dynamodb"]["SequenceNumber"] for r in records] == kept
    code, status, _ = error_of(lambda: client.get_records(ShardIterator=held))
    assert (code, status) == ("TrimmedDataAccessException", 400)
    code, _, _ = error_of(
        lambda: client.get_shard_iterator(
            StreamArn=stream.arn, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=old[1]
        )
    )
    assert code == "TrimmedDataAccessException"
    # After the last trimmed record is fine: nothing that position needs is gone.
    records, _ = read_shard(client, stream, shard, "AFTER_SEQUENCE_NUMBER", SequenceNumber=old[-1])
    assert [r["dynamodb"]["SequenceNumber"] for r in records] == kept


def test_closed_shards_age_out_and_children_keep_naming_their_parent(
    simulator: StreamSimulator, clock: ManualClock, connect: Callable[..., Any]
) -> None:
    simulator.rollover_seconds = None
    stream = simulator.create_stream("orders")
    client = connect()
    stream.put_item(item("a"))
    (parent,) = stream.open_shard_ids()
    child = stream.roll_over_shard()
    clock.advance(24 * 3600)
    (listed,) = client.describe_stream(StreamArn=stream.arn)["StreamDescription"]["Shards"]
    assert listed["ShardId"] == child and listed["ParentShardId"] == parent
    code, _, message = error_of(
        lambda: client.get_shard_iterator(StreamArn=stream.arn, ShardId=parent, ShardIteratorType="TRIM_HORIZON")
    )
    assert code == "ResourceNotFoundException" and "Shard does not exist" in message


def test_unknown_streams_bad_iterators_and_server_errors_answer_as_the_service_does(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    missing = stream.arn.replace("orders", "missing")
    assert error_of(lambda: client.describe_stream(StreamArn=missing))[:2] == ("ResourceNotFoundException", 400)
    assert error_of(lambda: client.get_records(ShardIterator="x" * 40))[:2] == ("ValidationException", 400)
    (shard,) = stream.open_shard_ids()
    iterator = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="LATEST")[
        "ShardIterator"
    ]
    assert iterator.startswith(stream.arn + "|") and len(iterator) <= 2048
    tampered = iterator[:-6] + ("AAAAAA" if not iterator.endswith("AAAAAA") else "BBBBBB")
    assert error_of(lambda: client.get_records(ShardIterator=tampered))[:2] == ("ValidationException", 400)

    simulator.fail_next("GetRecords", "InternalServerError")
    assert error_of(lambda: client.get_records(ShardIterator=iterator))[:2] == ("InternalServerError", 500)
    simulator.fail_next("GetRecords", "LimitExceededException")
    code, status, message = error_of(lambda: client.get_records(ShardIterator=iterator))
    assert (code, status) == ("LimitExceededException", 400) and shard in message
    assert simulator.counts["GetRecords:InternalServerError"] == 1


def test_boto3_retries_throttling_and_server_errors_itself(
    simulator: StreamSimulator, connect: Callable[..., Any]
) -> None:
    stream = simulator.create_stream("orders")
    stream.put_item(item("a"))
    client = connect(Config(retries={"total_max_attempts": 3, "mode": "standard"}))
    (shard,) = stream.open_shard_ids()
    simulator.fail_next("GetShardIterator", "LimitExceededException")
    simulator.fail_next("GetShardIterator", "InternalServerError")
    response = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")
    assert response["ResponseMetadata"]["RetryAttempts"] == 2
    outcomes = [c.error_code for c in simulator.calls("GetShardIterator")]
    assert outcomes == ["LimitExceededException", "InternalServerError", None]


def test_a_fault_schedule_is_the_same_on_every_run_and_close_to_its_rates() -> None:
    schedule = FaultSchedule(seed=42, throttle_rate=0.2, error_rate=0.1, expire_rate=0.05, empty_rate=0.05)
    draws = [schedule.fault_for("GetRecords", "shardId-1", n) for n in range(4000)]
    again = [FaultSchedule(seed=42, throttle_rate=0.2, error_rate=0.1, expire_rate=0.05, empty_rate=0.05).fault_for(
        "GetRecords", "shardId-1", n) for n in range(4000)]  # fmt: skip
    assert draws == again
    counts = collections.Counter(draws)
    assert 0.17 < counts["LimitExceededException"] / 4000 < 0.23
    assert 0.08 < counts["InternalServerError"] / 4000 < 0.12
    assert 0.03 < counts["ExpiredIteratorException"] / 4000 < 0.07
    assert 0.03 < counts["EmptyPage"] / 4000 < 0.07
    other_seed = [FaultSchedule(seed=43, throttle_rate=0.2).fault_for("GetRecords", "shardId-1", n) for n in range(50)]
    assert other_seed != draws[:50]
    assert {schedule.fault_for("DescribeStream", "arn", n) for n in range(500)} <= {
        None,
        "LimitExceededException",
        "InternalServerError",
    }
    with pytest.raises(ValueError):
        FaultSchedule(throttle_rate=0.7, error_rate=0.4)


def test_empty_page_faults_keep_the_position(simulator: StreamSimulator, connect: Callable[..., Any]) -> None:
    stream = simulator.create_stream("orders")
    client = connect()
    stream.put_item(item("a"))
    stream.roll_over_shard()
    shard = stream.shards()[0].shard_id
    iterator = client.get_shard_iterator(StreamArn=stream.arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    simulator.fail_next("GetRecords", "EmptyPage", times=2)
    for _ in range(2):
        page = client.get_records(ShardIterator=iterator)
        assert page["Records"] == [] and "NextShardIterator" in page  # closed, yet not at its end
        iterator = page["NextShardIterator"]
    last = client.get_records(ShardIterator=iterator)
    assert len(last["Records"]) == 1 and "NextShardIterator" not in last


def test_synthetic_load_is_realistic_and_the_table_follows(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("orders", shards=8)
    assert stream.write_synthetic(4000) == 4000
    assert stream.write_synthetic(100, first=0) == 100  # the same keys again: MODIFY with old images
    records = stream.records()
    assert collections.Counter(r["eventName"] for r in records) == {"INSERT": 4000, "MODIFY": 100}
    sizes = [r["dynamodb"]["SizeBytes"] for r in records if r["eventName"] == "INSERT"]
    assert min(sizes) >= 1650 and max(sizes) <= 1750
    for record in records[:50]:  # the fast path writes what the general one would
        image = record["dynamodb"].get("NewImage")
        expected = item_size(record["dynamodb"]["Keys"]) + item_size(image)
        expected += item_size(record["dynamodb"].get("OldImage", {}))
        assert record["dynamodb"]["SizeBytes"] == expected
    assert all(s.records > 300 for s in stream.shards())
    table = {orjson.dumps(i, option=orjson.OPT_SORT_KEYS) for i in stream.items()}
    assert len(table) == 4000
    latest: dict[str, Any] = {}
    for record in sorted(records, key=lambda r: int(r["dynamodb"]["SequenceNumber"])):
        latest[record["dynamodb"]["Keys"]["pk"]["S"]] = record["dynamodb"]["NewImage"]
    assert {orjson.dumps(i, option=orjson.OPT_SORT_KEYS) for i in latest.values()} == table
    assert unmarshal_image(records[0]["dynamodb"]["Keys"])["sk"] == "v"


# -- DescribeTable, and a stream disabled and enabled again ----------------------------------------------------


def test_describe_table_names_the_stream_of_a_simulated_table(simulator: StreamSimulator, endpoints: Endpoints) -> None:
    name = unique("orders")
    stream = simulator.create_stream(name, shards=2)
    other = simulator.create_stream(unique("customers"), key_schema=[("id", "HASH")], view_type="KEYS_ONLY")

    table = endpoints.dynamodb.describe_table(TableName=name)["Table"]
    assert table["TableName"] == name and table["TableStatus"] == "ACTIVE"
    assert table["TableArn"] == f"arn:aws:dynamodb:us-east-1:123456789012:table/{name}"
    assert table["CreationDateTime"] == START
    assert table["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert table["AttributeDefinitions"] == [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "S"},
    ]
    assert table["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    assert (table["LatestStreamArn"], table["LatestStreamLabel"]) == (stream.arn, stream.label)
    described = endpoints.streams.describe_stream(StreamArn=table["LatestStreamArn"])["StreamDescription"]
    assert described["TableName"] == name and len(described["Shards"]) == 2

    by_arn = endpoints.dynamodb.describe_table(TableName=table["TableArn"])["Table"]
    assert by_arn["LatestStreamArn"] == stream.arn
    keys_only = endpoints.dynamodb.describe_table(TableName=other.table_name)["Table"]
    assert keys_only["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert keys_only["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"}
    assert keys_only["LatestStreamArn"] == other.arn
    assert [c.stream_arn for c in simulator.calls("DescribeTable")] == [stream.arn, stream.arn, other.arn]
    if endpoints.server is not None:
        assert endpoints.server.forwarded == 0


def test_disabling_a_stream_closes_its_open_shards_and_the_table_says_so(
    simulator: StreamSimulator, clock: ManualClock, endpoints: Endpoints
) -> None:
    name = unique("orders")
    stream = simulator.create_stream(name, shards=2)
    for n in range(20):
        stream.put_item(item(f"k{n}"))
    shard_ids = stream.open_shard_ids()
    tailing = endpoints.streams.get_shard_iterator(
        StreamArn=stream.arn, ShardId=shard_ids[0], ShardIteratorType="LATEST"
    )["ShardIterator"]
    assert "NextShardIterator" in endpoints.streams.get_records(ShardIterator=tailing)

    stream.disable()
    assert not stream.enabled and stream.open_shard_ids() == []
    description = endpoints.streams.describe_stream(StreamArn=stream.arn)["StreamDescription"]
    assert description["StreamStatus"] == "DISABLED"
    assert [s["ShardId"] for s in description["Shards"]] == shard_ids  # closed where they were: no children
    read = 0
    for shard in description["Shards"]:
        ending = int(shard["SequenceNumberRange"]["EndingSequenceNumber"])
        records, pages = read_shard(endpoints.streams, stream, shard["ShardId"])
        assert records and int(records[-1]["dynamodb"]["SequenceNumber"]) <= ending
        assert "NextShardIterator" not in pages[-1] and pages[-1]["Records"]  # read to its end
        read += len(records)
    assert read == 20
    # A consumer waiting at the end of an open shard learns it ended: no records, no next iterator.
    last = endpoints.streams.get_records(ShardIterator=tailing)
    assert last["Records"] == [] and "NextShardIterator" not in last

    table = endpoints.dynamodb.describe_table(TableName=name)["Table"]
    assert table["StreamSpecification"] == {"StreamEnabled": False}
    assert (table["LatestStreamArn"], table["LatestStreamLabel"]) == (stream.arn, stream.label)

    for write in (
        lambda: stream.put_item(item("late")),
        lambda: stream.delete_item(item("k1")),
        lambda: stream.write_synthetic(1),
        stream.split_shard,
        stream.roll_over_all,
    ):
        with pytest.raises(StreamDisabledError, match="is disabled"):
            write()
    with pytest.raises(ValueError, match="disabled already"):
        stream.disable()
    assert len(stream.records()) == 20 and len(stream.items()) == 20

    clock.advance(5 * 3600)  # past a roll-over period: a disabled stream opens no shards
    description = endpoints.streams.describe_stream(StreamArn=stream.arn)["StreamDescription"]
    assert [s["ShardId"] for s in description["Shards"]] == shard_ids
    assert sum(len(read_shard(endpoints.streams, stream, s)[0]) for s in shard_ids) == 20


def test_enabling_the_stream_again_gives_a_new_arn_and_the_old_stream_reads_to_its_end(
    simulator: StreamSimulator, clock: ManualClock, endpoints: Endpoints
) -> None:
    name = unique("orders")
    old = simulator.create_stream(name)
    for n in range(5):
        old.put_item(item(f"k{n}", v={"N": "1"}))
    with pytest.raises(ValueError, match="has an enabled stream"):
        simulator.create_stream(name)
    old.disable()
    new = simulator.create_stream(name)  # the clock has not moved: the label still must
    assert simulator.latest_stream(name) is new and simulator.latest_stream(unique("nothing")) is None
    assert (old.label, new.label) == ("2025-03-01T12:00:00.250", "2025-03-01T12:00:00.251")
    assert new.arn == old.arn.replace(old.label, new.label) != old.arn

    table = endpoints.dynamodb.describe_table(TableName=name)["Table"]
    assert (table["LatestStreamArn"], table["LatestStreamLabel"]) == (new.arn, new.label)
    assert table["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    assert table["CreationDateTime"] == START
    listed = endpoints.streams.list_streams(TableName=name)["Streams"]
    assert sorted(s["StreamArn"] for s in listed) == [old.arn, new.arn]
    statuses = {
        arn: endpoints.streams.describe_stream(StreamArn=arn)["StreamDescription"]["StreamStatus"]
        for arn in (old.arn, new.arn)
    }
    assert statuses == {old.arn: "DISABLED", new.arn: "ENABLED"}

    # The table went on: a key written before is a MODIFY on the new stream, with its old image.
    clock.advance(1)
    new.put_item(item("k0", v={"N": "2"}))
    (modify,) = new.records()
    assert modify["eventName"] == "MODIFY" and modify["dynamodb"]["OldImage"] == item("k0", v={"N": "1"})
    assert len(new.items()) == 5

    (old_shard,) = endpoints.streams.describe_stream(StreamArn=old.arn)["StreamDescription"]["Shards"]
    records, pages = read_shard(endpoints.streams, old, old_shard["ShardId"])
    assert [r["eventID"] for r in records] == [r["eventID"] for r in old.records()] and len(records) == 5
    assert "NextShardIterator" not in pages[-1]
    # The new stream's shards and records are its own, not the old stream's again.
    assert old_shard["ShardId"] not in new.open_shard_ids()
    assert modify["eventID"] not in {r["eventID"] for r in records}

    clock.advance(24 * 3600)  # the retention: the disabled stream holds nothing any more
    assert endpoints.streams.describe_stream(StreamArn=old.arn)["StreamDescription"]["Shards"] == []
    assert endpoints.dynamodb.describe_table(TableName=name)["Table"]["LatestStreamArn"] == new.arn


def test_a_tables_next_stream_keeps_its_key_schema(simulator: StreamSimulator) -> None:
    customers = simulator.create_stream("customers", key_schema=[("id", "HASH")])
    customers.put_item({"id": {"N": "7"}})
    customers.disable()
    with pytest.raises(ValueError, match="cannot change"):
        simulator.create_stream("customers", key_schema=[("pk", "HASH"), ("sk", "RANGE")])
    again = simulator.create_stream("customers", view_type="KEYS_ONLY")
    assert again.key_schema == (("id", "HASH"),) and again.items() == [{"id": {"N": "7"}}]
    assert again.delete_item({"id": {"N": "7"}}) is not None


def test_describe_table_of_a_table_the_simulator_does_not_know_reaches_moto(
    simulator: StreamSimulator, aws: EmbeddedAws, endpoints: Endpoints
) -> None:
    simulator.create_stream(unique("orders"))
    name = unique("in-moto")
    moto_arn = create_stream_table(aws.client("dynamodb"), name)

    table = endpoints.dynamodb.describe_table(TableName=name)["Table"]
    assert table["TableName"] == name and table["LatestStreamArn"] == moto_arn
    code, status, _ = error_of(lambda: endpoints.dynamodb.describe_table(TableName=unique("missing")))
    assert (code, status) == ("ResourceNotFoundException", 400)  # moto's answer, as DynamoDB's
    assert simulator.calls("DescribeTable") == []
    if endpoints.server is not None:
        assert endpoints.server.forwarded == 2


# -- the HTTP server in front of moto --------------------------------------------------------------------------


def test_the_server_forwards_everything_else_to_the_backend_so_one_endpoint_serves_a_pipeline(
    aws: EmbeddedAws, make_settings: Callable[..., Settings]
) -> None:
    simulator = StreamSimulator()
    stream = simulator.create_stream(unique("orders"), shards=2)
    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as server:
        dynamodb = boto3.client("dynamodb", region_name=aws.region, endpoint_url=server.endpoint_url)
        s3 = boto3.client("s3", region_name=aws.region, endpoint_url=server.endpoint_url)
        bucket = unique("through")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="k", Body=b"forwarded")
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"forwarded"
        assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == 9
        assert aws.client("s3").get_object(Bucket=bucket, Key="k")["Body"].read() == b"forwarded"
        assert "TableNames" in dynamodb.list_tables()

        settings = make_settings(
            source={"table_name": None, "stream_arn": stream.arn, "endpoint_url": server.endpoint_url}
        )
        sink = MemorySink()
        pipeline = Pipeline(settings, sinks=[sink], clients=AwsClients(aws.region, server.endpoint_url))
        pipeline.start()
        try:
            stream.write_synthetic(300, item_bytes=500)
            wait_until(lambda: len(sink.records) >= 300 or pipeline.fatal is not None, what="300 records")
        finally:
            assert pipeline.stop() is True
        assert sorted(r.event_id for r in sink.records) == sorted(r["eventID"] for r in stream.records())
        assert server.forwarded > 0  # the checkpoint table went to moto through the same endpoint
        checkpoints = aws.client("dynamodb").scan(TableName=settings.checkpoint.table_name)["Items"]
        assert {c["shard_id"]["S"] for c in checkpoints if c["shard_id"]["S"].startswith("shardId")} == set(
            stream.open_shard_ids()
        )
