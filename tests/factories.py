"""Factories for stream records in the shapes the pipeline sees them: boto3's GetRecords element, a ShardPage,
and the unmarshalled ChangeRecord (and an initial load's SNAPSHOT record). Everything is keyword-driven with defaults
that make a valid record."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.records import ChangeRecord, EventName, change_record_from_stream, snapshot_record
from pipeline.source.reader import RECORD_OVERHEAD_BYTES, ShardPage

BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
STREAM_VIEW_TYPES = ("KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES")


def stream_record(
    *,
    sequence: int | str = 1,
    event_name: EventName = "INSERT",
    event_id: str | None = None,
    keys: Mapping[str, Any] | None = None,
    new_image: Mapping[str, Any] | None = None,
    old_image: Mapping[str, Any] | None = None,
    created: datetime | None = None,
    size_bytes: int = 100,
    view_type: str = "NEW_AND_OLD_IMAGES",
    region: str = "us-east-1",
    user_identity: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One element of GetRecords' `Records`, as boto3 returns it (images in DynamoDB JSON).

    Images that `event_name` and `view_type` call for and that are not given are derived from `keys` plus a
    `version` attribute; images the view type leaves out are never present. `event_id` defaults to a fresh
    random id, `created` to BASE_TIME plus `sequence` seconds (modulo a million).
    """
    keys = dict(keys) if keys is not None else {"pk": {"S": f"item-{sequence}"}}
    dynamodb: dict[str, Any] = {
        "ApproximateCreationDateTime": created or BASE_TIME + timedelta(seconds=int(sequence) % 1_000_000),
        "Keys": keys,
        "SequenceNumber": str(sequence),
        "SizeBytes": size_bytes,
        "StreamViewType": view_type,
    }
    if event_name != "REMOVE" and view_type in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES"):
        dynamodb["NewImage"] = dict(new_image) if new_image is not None else {**keys, "version": {"N": "2"}}
    if event_name != "INSERT" and view_type in ("OLD_IMAGE", "NEW_AND_OLD_IMAGES"):
        dynamodb["OldImage"] = dict(old_image) if old_image is not None else {**keys, "version": {"N": "1"}}
    record: dict[str, Any] = {
        "eventID": event_id or uuid.uuid4().hex,
        "eventName": event_name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": region,
        "dynamodb": dynamodb,
    }
    if user_identity is not None:
        record["userIdentity"] = dict(user_identity)
    return record


def ttl_identity() -> dict[str, str]:
    """The userIdentity DynamoDB puts on a delete made by TTL expiry."""
    return {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}


def page(
    shard_id: str,
    records: Sequence[dict[str, Any]],
    end_of_shard: bool = False,
    *,
    size_bytes: int | None = None,
) -> ShardPage:
    """A ShardPage sized the way the reader sizes it, unless `size_bytes` is given."""
    if size_bytes is None:
        size_bytes = sum(int(r["dynamodb"].get("SizeBytes", 0)) + RECORD_OVERHEAD_BYTES for r in records)
    return ShardPage(shard_id, tuple(records), size_bytes, end_of_shard)


def stream_arn_of(table: str, region: str = "us-east-1") -> str:
    """A stream ARN of `table`, as DescribeTable's LatestStreamArn names it."""
    return f"arn:aws:dynamodb:{region}:123456789012:table/{table}/stream/2024-01-01T00:00:00.000"


def change_record(*, table: str = "orders", shard_id: str = "shardId-0001", **fields: Any) -> ChangeRecord:
    """An unmarshalled record read from `table`'s stream; `fields` are stream_record's keyword arguments."""
    return change_record_from_stream(
        stream_record(**fields), table=table, shard_id=shard_id, stream_arn=stream_arn_of(table)
    )


def snapshot_change(
    item: Mapping[str, Any],
    *,
    load_id: str = "load-1",
    index: int = 0,
    segment: int = 0,
    page: int = 0,
    key_names: tuple[str, ...] = ("pk", "sk"),
    table: str = "orders",
    size_bytes: int = 100,
) -> ChangeRecord:
    """An item (DynamoDB JSON) as an initial load of `table` hands it on: a SNAPSHOT record of `load_id`."""
    return snapshot_record(
        item,
        key_names=key_names,
        load_id=load_id,
        table=table,
        segment=segment,
        page=page,
        index=index,
        read_at=BASE_TIME.timestamp(),
        size_bytes=size_bytes,
    )
