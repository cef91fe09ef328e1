"""CheckpointStore: how far each shard has been delivered, in a DynamoDB table.

Key: partition `stream` = "<consumer name>|<stream ARN>", sort `shard_id`, so one table serves many streams and
many consumers of the same stream. Items also carry `owner` and `lease_expires_at`, unused by a single worker,
so that leases can be added without migrating the table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from pipeline.errors import RetryableError
from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)

BATCH_WRITE_MAX_ITEMS = 25


@dataclass(frozen=True, slots=True)
class Checkpoint:
    shard_id: str
    sequence_number: str | None
    finished: bool
    owner: str | None = None
    lease_expires_at: float | None = None
    updated_at: str | None = None
    last_record_at: str | None = None
    """ApproximateCreationDateTime (ISO, UTC) of the last delivered record: how old the delivered data is."""


class CheckpointStore:
    def __init__(
        self,
        dynamodb: Any,
        *,
        table_name: str,
        stream_arn: str,
        consumer_name: str,
        retry: RetryPolicy,
        owner: str | None = None,
    ) -> None:
        self._ddb = dynamodb
        self._table = table_name
        self._partition = f"{consumer_name}|{stream_arn}"
        self._retry = retry
        self._owner = owner
        self._known: dict[str, Checkpoint] = {}

    def ensure_table(self, create: bool) -> None:
        try:
            status = self._retry.call("DescribeTable", self._ddb.describe_table, TableName=self._table)
            if status["Table"]["TableStatus"] == "ACTIVE":
                return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            if not create:
                raise RuntimeError(
                    f"checkpoint table {self._table!r} does not exist; create it or set checkpoint.create_table"
                ) from exc
            log.info("creating checkpoint table %s", self._table)
            try:
                self._retry.call(
                    "CreateTable",
                    self._ddb.create_table,
                    TableName=self._table,
                    BillingMode="PAY_PER_REQUEST",
                    KeySchema=[
                        {"AttributeName": "stream", "KeyType": "HASH"},
                        {"AttributeName": "shard_id", "KeyType": "RANGE"},
                    ],
                    AttributeDefinitions=[
                        {"AttributeName": "stream", "AttributeType": "S"},
                        {"AttributeName": "shard_id", "AttributeType": "S"},
                    ],
                )
            except ClientError as race:
                if race.response["Error"]["Code"] != "ResourceInUseException":
                    raise
        waiter = self._ddb.get_waiter("table_exists")
        waiter.wait(TableName=self._table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})

    def load(self) -> dict[str, Checkpoint]:
        """Every checkpoint of this stream and consumer, by shard id."""
        found: dict[str, Checkpoint] = {}
        request: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "#s = :s",
            "ExpressionAttributeNames": {"#s": "stream"},
            "ExpressionAttributeValues": {":s": {"S": self._partition}},
            "ConsistentRead": True,
        }
        while True:
            page = self._retry.call("Query", self._ddb.query, **request)
            for item in page.get("Items", []):
                checkpoint = _from_item(item)
                found[checkpoint.shard_id] = checkpoint
            if "LastEvaluatedKey" not in page:
                self._known.update(found)
                return found
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def save(
        self,
        positions: Mapping[str, str],
        finished: frozenset[str] | set[str] = frozenset(),
        record_times: Mapping[str, datetime] | None = None,
    ) -> None:
        """Record delivered positions, shards whose last record is delivered, and when those records were made.

        Whole items are written with BatchWriteItem, 25 shards per call: with a thousand active shards, one
        UpdateItem per shard per commit would cost a thousand round trips. A put replaces the item, so the
        store keeps what it last read or wrote for each shard and writes the merged state. That is safe
        because one pipeline owns a consumer's checkpoints; leases would need conditional writes instead.
        """
        now = datetime.now(UTC).isoformat()
        record_times = record_times or {}
        merged: list[Checkpoint] = []
        for shard_id in sorted(set(positions) | set(finished)):
            before = self._known.get(shard_id) or Checkpoint(shard_id, None, False)
            when = record_times.get(shard_id)
            merged.append(
                replace(
                    before,
                    sequence_number=positions.get(shard_id, before.sequence_number),
                    finished=before.finished or shard_id in finished,
                    owner=self._owner if self._owner is not None else before.owner,
                    updated_at=now,
                    last_record_at=when.astimezone(UTC).isoformat() if when is not None else before.last_record_at,
                )
            )
        for start in range(0, len(merged), BATCH_WRITE_MAX_ITEMS):
            chunk = merged[start : start + BATCH_WRITE_MAX_ITEMS]
            self._write_items([self._to_item(checkpoint) for checkpoint in chunk])
            self._known.update((checkpoint.shard_id, checkpoint) for checkpoint in chunk)

    def _write_items(self, items: list[dict[str, Any]]) -> None:
        pending: list[dict[str, Any]] = [{"PutRequest": {"Item": item}} for item in items]
        for attempt in self._retry.retrying("BatchWriteItem (checkpoints)"):
            with attempt:
                response = self._ddb.batch_write_item(RequestItems={self._table: pending})
                pending = response.get("UnprocessedItems", {}).get(self._table, [])
                if pending:
                    raise _UnprocessedCheckpoints(f"{len(pending)} checkpoint(s) left unprocessed (throttled)")

    def _to_item(self, checkpoint: Checkpoint) -> dict[str, Any]:
        item: dict[str, Any] = {
            "stream": {"S": self._partition},
            "shard_id": {"S": checkpoint.shard_id},
            "finished": {"BOOL": checkpoint.finished},
        }
        for name in ("sequence_number", "owner", "updated_at", "last_record_at"):
            value = getattr(checkpoint, name)
            if value is not None:
                item[name] = {"S": value}
        if checkpoint.lease_expires_at is not None:
            item["lease_expires_at"] = {"N": repr(checkpoint.lease_expires_at)}
        return item


class _UnprocessedCheckpoints(RetryableError):
    """BatchWriteItem returned UnprocessedItems: write those again after a back-off."""


def _from_item(item: dict[str, Any]) -> Checkpoint:
    def text(name: str) -> str | None:
        value = item.get(name)
        return None if value is None else str(value["S"])

    lease = item.get("lease_expires_at")
    return Checkpoint(
        shard_id=item["shard_id"]["S"],
        sequence_number=text("sequence_number"),
        finished=bool(item.get("finished", {}).get("BOOL", False)),
        owner=text("owner"),
        lease_expires_at=None if lease is None else float(lease["N"]),
        updated_at=text("updated_at"),
        last_record_at=text("last_record_at"),
    )
