"""CheckpointStore: how far each shard has been delivered, in a DynamoDB table.

Key: partition `stream` = "<consumer name>|<stream ARN>", sort `shard_id`, so one table serves many streams and
many consumers of the same stream. Items also carry `owner` and `lease_expires_at`, unused by a single worker,
so that leases can be added without migrating the table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)


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
                return found
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def save(
        self,
        positions: Mapping[str, str],
        finished: frozenset[str] | set[str] = frozenset(),
        record_times: Mapping[str, datetime] | None = None,
    ) -> None:
        """Record delivered positions, shards whose last record is delivered, and when those records were made."""
        now = datetime.now(UTC).isoformat()
        record_times = record_times or {}
        for shard_id in sorted(set(positions) | set(finished)):
            sets = ["updated_at = :u"]
            values: dict[str, Any] = {":u": {"S": now}}
            if shard_id in positions:
                sets.append("sequence_number = :q")
                values[":q"] = {"S": positions[shard_id]}
            if shard_id in record_times:
                sets.append("last_record_at = :t")
                values[":t"] = {"S": record_times[shard_id].astimezone(UTC).isoformat()}
            if shard_id in finished:
                sets.append("finished = :f")
                values[":f"] = {"BOOL": True}
            if self._owner is not None:
                sets.append("#o = :o")
                values[":o"] = {"S": self._owner}
            request: dict[str, Any] = {
                "TableName": self._table,
                "Key": {"stream": {"S": self._partition}, "shard_id": {"S": shard_id}},
                "UpdateExpression": "SET " + ", ".join(sets),
                "ExpressionAttributeValues": values,
            }
            if self._owner is not None:
                request["ExpressionAttributeNames"] = {"#o": "owner"}
            self._retry.call("UpdateItem (checkpoint)", self._ddb.update_item, **request)


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
