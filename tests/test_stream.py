"""Shard discovery and lineage. DescribeStream is stubbed with botocore's Stubber: no server, no network."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.source.stream import (
    ShardInfo,
    ShardLineage,
    StreamNotFoundError,
    describe_shards,
    resolve_stream_arn,
    table_name_of,
)

STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-01-01T00:00:00.000"


def shard(shard_id: str, *, parent: str | None = None, start: str = "100", end: str | None = None) -> ShardInfo:
    return ShardInfo(
        shard_id=shard_id, parent_shard_id=parent, starting_sequence_number=start, ending_sequence_number=end
    )


def readable_ids(lineage: ShardLineage, exclude: tuple[str, ...] = ()) -> list[str]:
    return [s.shard_id for s in lineage.readable(exclude=exclude)]


# --- ShardInfo and ARNs ------------------------------------------------------------------------------------


def test_shard_info_from_a_closed_shard() -> None:
    info = ShardInfo.from_api(
        {
            "ShardId": "shardId-2",
            "ParentShardId": "shardId-1",
            "SequenceNumberRange": {"StartingSequenceNumber": "200", "EndingSequenceNumber": "299"},
        }
    )
    assert info == shard("shardId-2", parent="shardId-1", start="200", end="299")
    assert info.closed


def test_shard_info_from_an_open_root_shard() -> None:
    info = ShardInfo.from_api({"ShardId": "shardId-1", "SequenceNumberRange": {"StartingSequenceNumber": "7"}})
    assert info == shard("shardId-1", start="7")
    assert not info.closed


def test_shard_info_without_a_sequence_range_starts_at_zero() -> None:
    info = ShardInfo.from_api({"ShardId": "shardId-1"})
    assert info.starting_sequence_number == "0"
    assert not info.closed


@pytest.mark.parametrize(
    ("arn", "table"),
    [
        (STREAM_ARN, "orders"),
        (
            "arn:aws:dynamodb:eu-west-1:000000000000:table/my.table-v2_x/stream/2024-06-30T12:34:56.789",
            "my.table-v2_x",
        ),
        ("arn:aws-cn:dynamodb:cn-north-1:123456789012:table/t/stream/label", "t"),
    ],
)
def test_table_name_of_a_stream_arn(arn: str, table: str) -> None:
    assert table_name_of(arn) == table


# --- ShardLineage.readable ----------------------------------------------------------------------------------


def test_root_shards_are_readable_oldest_first_comparing_sequences_as_numbers() -> None:
    lineage = ShardLineage()
    lineage.update([shard("late", start="1000"), shard("early", start="900"), shard("middle", start="950")])
    # As text "1000" sorts before "900".
    assert readable_ids(lineage) == ["early", "middle", "late"]


def test_a_child_waits_until_its_parent_is_finished() -> None:
    lineage = ShardLineage()
    lineage.update([shard("parent", start="100", end="199"), shard("child", parent="parent", start="200")])
    assert readable_ids(lineage) == ["parent"]
    # Being read is not finished: the child still waits.
    assert readable_ids(lineage, exclude=("parent",)) == []

    lineage.mark_finished(["parent"])
    assert lineage.is_finished("parent")
    assert readable_ids(lineage) == ["child"]


def test_a_child_whose_parent_aged_out_of_the_stream_is_readable() -> None:
    lineage = ShardLineage()
    lineage.update([shard("child", parent="trimmed-parent", start="200")])
    assert readable_ids(lineage) == ["child"]


def test_a_parent_that_drops_out_of_a_fresh_description_releases_its_child() -> None:
    lineage = ShardLineage()
    lineage.update([shard("parent", start="100", end="199"), shard("child", parent="parent", start="200")])
    assert readable_ids(lineage) == ["parent"]
    lineage.update([shard("child", parent="parent", start="200")])
    assert readable_ids(lineage) == ["child"]
    assert [s.shard_id for s in lineage.shards()] == ["child"]


def test_a_three_generation_lineage_is_read_one_generation_at_a_time() -> None:
    lineage = ShardLineage()
    lineage.update(
        [
            shard("grandchild", parent="child", start="300"),
            shard("child", parent="root", start="200", end="299"),
            shard("root", start="100", end="199"),
        ]
    )
    assert readable_ids(lineage) == ["root"]
    lineage.mark_finished(["root"])
    assert readable_ids(lineage) == ["child"]
    lineage.mark_finished(["child"])
    assert readable_ids(lineage) == ["grandchild"]


def test_split_children_become_readable_together_in_sequence_order() -> None:
    lineage = ShardLineage()
    lineage.update(
        [
            shard("parent", start="100", end="199"),
            shard("right", parent="parent", start="1250"),
            shard("left", parent="parent", start="250"),
            shard("other-root", start="50"),
        ]
    )
    assert readable_ids(lineage) == ["other-root", "parent"]
    lineage.mark_finished(["parent"])
    assert readable_ids(lineage) == ["other-root", "left", "right"]


def test_exclude_and_finished_shards_are_not_readable() -> None:
    lineage = ShardLineage()
    lineage.update([shard("a", start="1"), shard("b", start="2"), shard("c", start="3")])
    lineage.mark_finished(["b"])
    assert readable_ids(lineage) == ["a", "c"]
    assert readable_ids(lineage, exclude=("a",)) == ["c"]
    assert readable_ids(lineage, exclude=("a", "c", "unknown")) == []
    assert not lineage.is_finished("a")


# --- DescribeStream / DescribeTable through Stubber ---------------------------------------------------------


@pytest.fixture
def retry() -> RetryPolicy:
    return RetryPolicy(
        RetrySettings(max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0), sleep=lambda _s: None
    )


def _client(service: str) -> Any:
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def streams() -> Iterator[tuple[Any, Stubber]]:
    client = _client("dynamodbstreams")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def dynamodb() -> Iterator[tuple[Any, Stubber]]:
    client = _client("dynamodb")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _api_shard(shard_id: str, start: str, *, parent: str | None = None, end: str | None = None) -> dict[str, Any]:
    numbers = {"StartingSequenceNumber": start}
    if end is not None:
        numbers["EndingSequenceNumber"] = end
    described: dict[str, Any] = {"ShardId": shard_id, "SequenceNumberRange": numbers}
    if parent is not None:
        described["ParentShardId"] = parent
    return described


def _description(shards: list[dict[str, Any]], last: str | None = None) -> dict[str, Any]:
    description: dict[str, Any] = {
        "StreamArn": STREAM_ARN,
        "StreamStatus": "ENABLED",
        "StreamViewType": "NEW_AND_OLD_IMAGES",
        "TableName": "orders",
        "Shards": shards,
    }
    if last is not None:
        description["LastEvaluatedShardId"] = last
    return {"StreamDescription": description}


# The service's shapes: shard ids of 28+ characters, sequence numbers of 21+ digits.
SHARD_1 = "shardId-00000001704067200000-0aa1b2c3"
SHARD_2 = "shardId-00000001704070800000-1bb2c3d4"
SHARD_3 = "shardId-00000001704074400000-2cc3d4e5"


def seq(n: int) -> str:
    return str(10**20 + n)


def test_describe_shards_follows_pagination_to_the_end(streams: tuple[Any, Stubber], retry: RetryPolicy) -> None:
    client, stubber = streams
    stubber.add_response(
        "describe_stream",
        _description(
            [_api_shard(SHARD_1, seq(100), end=seq(199)), _api_shard(SHARD_2, seq(200), parent=SHARD_1)],
            last=SHARD_2,
        ),
        {"StreamArn": STREAM_ARN},
    )
    stubber.add_response(
        "describe_stream",
        _description([_api_shard(SHARD_3, seq(300))]),
        {"StreamArn": STREAM_ARN, "ExclusiveStartShardId": SHARD_2},
    )
    assert describe_shards(client, STREAM_ARN, retry) == [
        shard(SHARD_1, start=seq(100), end=seq(199)),
        shard(SHARD_2, parent=SHARD_1, start=seq(200)),
        shard(SHARD_3, start=seq(300)),
    ]


def test_describe_shards_of_a_single_page(streams: tuple[Any, Stubber], retry: RetryPolicy) -> None:
    client, stubber = streams
    stubber.add_response("describe_stream", _description([]), {"StreamArn": STREAM_ARN})
    assert describe_shards(client, STREAM_ARN, retry) == []


def test_describe_shards_retries_throttling(streams: tuple[Any, Stubber], retry: RetryPolicy) -> None:
    client, stubber = streams
    stubber.add_client_error("describe_stream", "LimitExceededException", http_status_code=400)
    stubber.add_response("describe_stream", _description([_api_shard(SHARD_1, seq(1))]), {"StreamArn": STREAM_ARN})
    assert describe_shards(client, STREAM_ARN, retry) == [shard(SHARD_1, start=seq(1))]


def test_describe_shards_does_not_retry_a_missing_stream(streams: tuple[Any, Stubber], retry: RetryPolicy) -> None:
    client, stubber = streams
    stubber.add_client_error("describe_stream", "ResourceNotFoundException", http_status_code=400)
    with pytest.raises(StreamNotFoundError) as raised:
        describe_shards(client, STREAM_ARN, retry)
    # One line naming the stream and where it was looked for, not botocore's "(reached max retries: 0)".
    assert str(raised.value) == (
        f"stream {STREAM_ARN} not found in region us-east-1 at https://streams.dynamodb.us-east-1.amazonaws.com; "
        "check the stream ARN, the region and the endpoint"
    )


def test_resolve_stream_arn_of_a_table_with_a_stream(dynamodb: tuple[Any, Stubber], retry: RetryPolicy) -> None:
    client, stubber = dynamodb
    stubber.add_response(
        "describe_table",
        {
            "Table": {
                "TableName": "orders",
                "LatestStreamArn": STREAM_ARN,
                "StreamSpecification": {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
            }
        },
        {"TableName": "orders"},
    )
    assert resolve_stream_arn(client, "orders", retry) == STREAM_ARN


@pytest.mark.parametrize(
    "table",
    [
        {"TableName": "orders"},
        # A stream that was switched off leaves its ARN behind.
        {
            "TableName": "orders",
            "LatestStreamArn": STREAM_ARN,
            "StreamSpecification": {"StreamEnabled": False},
        },
    ],
)
def test_resolve_stream_arn_of_a_table_without_a_stream(
    dynamodb: tuple[Any, Stubber], retry: RetryPolicy, table: dict[str, Any]
) -> None:
    client, stubber = dynamodb
    stubber.add_response("describe_table", {"Table": table}, {"TableName": "orders"})
    with pytest.raises(StreamNotFoundError, match="orders"):
        resolve_stream_arn(client, "orders", retry)
