"""Shard discovery and lineage: which shards exist, and which may be read now.

A child shard holds changes that happened after everything in its parent. Reading it before the parent is fully
delivered would deliver a newer change to an item before an older one, so a child becomes readable only once its
parent is finished (its last page delivered and checkpointed) or has aged out of the stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from pipeline.errors import error_code
from pipeline.retry import RetryPolicy


class StreamNotFoundError(Exception):
    """The table has no stream enabled, or the table or the stream does not exist."""


def _where(client: Any) -> str:
    """Where a client looked: "region eu-west-1 at https://dynamodb.eu-west-1.amazonaws.com"."""
    return f"region {client.meta.region_name} at {client.meta.endpoint_url}"


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard_id: str
    parent_shard_id: str | None
    starting_sequence_number: str
    ending_sequence_number: str | None

    @property
    def closed(self) -> bool:
        return self.ending_sequence_number is not None

    @classmethod
    def from_api(cls, shard: dict[str, Any]) -> ShardInfo:
        numbers = shard.get("SequenceNumberRange", {})
        return cls(
            shard_id=shard["ShardId"],
            parent_shard_id=shard.get("ParentShardId"),
            starting_sequence_number=numbers.get("StartingSequenceNumber", "0"),
            ending_sequence_number=numbers.get("EndingSequenceNumber"),
        )


def table_name_of(stream_arn: str) -> str:
    """arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL -> NAME"""
    return stream_arn.split(":table/", 1)[1].split("/stream/", 1)[0]


def resolve_stream_arn(dynamodb: Any, table_name: str, retry: RetryPolicy) -> str:
    """The table's latest stream; `StreamNotFoundError` naming the table and where it was looked for when the
    table does not exist there (most often the wrong region or endpoint) or has no stream enabled."""
    try:
        table = retry.call("DescribeTable", dynamodb.describe_table, TableName=table_name)["Table"]
    except ClientError as exc:
        if error_code(exc) != "ResourceNotFoundException":
            raise
        raise StreamNotFoundError(
            f"table {table_name!r} not found in {_where(dynamodb)}; check the table name, the region and the endpoint"
        ) from None
    arn = table.get("LatestStreamArn")
    enabled = table.get("StreamSpecification", {}).get("StreamEnabled", arn is not None)
    if not arn or not enabled:
        raise StreamNotFoundError(
            f"table {table_name!r} has no stream enabled; enable one with StreamViewType NEW_AND_OLD_IMAGES"
        )
    return str(arn)


def describe_shards(streams: Any, stream_arn: str, retry: RetryPolicy) -> list[ShardInfo]:
    """All shards of the stream, following DescribeStream's pagination to the end."""
    shards: list[ShardInfo] = []
    request: dict[str, Any] = {"StreamArn": stream_arn}
    while True:
        try:
            description = retry.call("DescribeStream", streams.describe_stream, **request)["StreamDescription"]
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise
            raise StreamNotFoundError(
                f"stream {stream_arn} not found in {_where(streams)}; check the stream ARN, the region and the endpoint"
            ) from None
        shards.extend(ShardInfo.from_api(s) for s in description.get("Shards", []))
        last = description.get("LastEvaluatedShardId")
        if not last:
            return shards
        request["ExclusiveStartShardId"] = last


class ShardLineage:
    """What is known of the stream's shards and which are finished. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[str, ShardInfo] = {}
        self._finished: set[str] = set()

    def update(self, shards: Iterable[ShardInfo]) -> None:
        """Replace the known shard set with a fresh DescribeStream result.

        Finished shards are remembered only while the stream lists them or a listed shard names them as its
        parent: the set stays as large as the stream, not as large as every shard ever seen."""
        with self._lock:
            self._shards = {s.shard_id: s for s in shards}
            needed = set(self._shards) | {s.parent_shard_id for s in self._shards.values() if s.parent_shard_id}
            self._finished &= needed

    def mark_finished(self, shard_ids: Iterable[str]) -> None:
        with self._lock:
            self._finished.update(shard_ids)

    def is_finished(self, shard_id: str) -> bool:
        with self._lock:
            return shard_id in self._finished

    def shards(self) -> list[ShardInfo]:
        with self._lock:
            return list(self._shards.values())

    def unfinished(self) -> list[ShardInfo]:
        with self._lock:
            return [s for s in self._shards.values() if s.shard_id not in self._finished]

    def readable(self, exclude: Iterable[str] = ()) -> list[ShardInfo]:
        """Unfinished shards whose parent is finished or gone, parents first; `exclude` are being read.

        A parent being read holds its children back even once the stream no longer lists it (it aged out while
        a long outage held its reader): its reader meets the trimmed records and says so."""
        skip = set(exclude)
        with self._lock:
            ready = [
                s
                for s in self._shards.values()
                if s.shard_id not in self._finished
                and s.shard_id not in skip
                and (
                    s.parent_shard_id is None
                    or s.parent_shard_id in self._finished
                    or (s.parent_shard_id not in self._shards and s.parent_shard_id not in skip)
                )
            ]
        return sorted(ready, key=lambda s: int(s.starting_sequence_number))
