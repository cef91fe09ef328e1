"""CheckpointStore: how far each shard has been delivered, and what the first start fixed, in a DynamoDB table.

Key: partition `stream` = "<consumer name>|<stream ARN>", sort `shard_id`, so one table serves many streams and
many consumers of the same stream. Three kinds of row share a partition:

- one row per shard the pipeline has seen, written when the shard is first discovered (no sequence number yet),
  then moved forward by commits: `sequence_number`, `finished`, `last_record_at`, `parent_shard_id`. A shard that
  has a row was seen; a shard without one was not, which is how a parent that came and aged out while the
  pipeline was down is told apart from one that aged out before the first start.
- `#start`: what the first start on this stream meant (`starting_position`, `since`), written before anything is
  read, so "LATEST" keeps meaning "changes made after the first start" across every restart.
- in the table's own partition ("<consumer name>|<table ARN>", sort `#stream`): the stream ARN the consumer reads,
  so a stream that was disabled and enabled again (a new ARN) is noticed instead of silently started afresh.

Rows of shards long finished are pruned: once a finished shard has aged out of the stream and none of its children
is unfinished, nothing needs it, so `load()` reads a bounded partition however long the pipeline runs.
Items also carry `owner` and `lease_expires_at`, unused by a single worker, so that leases can be added without
migrating the table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import tenacity
from botocore.exceptions import ClientError

from pipeline.errors import RetryableError, error_code
from pipeline.retry import RetryPolicy

log = logging.getLogger(__name__)

BATCH_WRITE_MAX_ITEMS = 25
START_ROW = "#start"
STREAM_POINTER_ROW = "#stream"

StartingPosition = Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"]


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
    parent_shard_id: str | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    """What the first start on a stream fixed: where a shard without a checkpoint begins, on every later start.

    `since` (epoch seconds, whole) is the earliest creation time delivered from such a shard: the moment of the
    first start for LATEST, the configured time for AT_TIMESTAMP, None for TRIM_HORIZON (everything kept).
    DynamoDB rounds creation times down to the second, so `since` is rounded down too: a change made in the
    second of the first start is delivered even if it came a moment before.
    """

    starting_position: StartingPosition
    since: int | None
    recorded_at: str


@dataclass(frozen=True, slots=True)
class StoredState:
    checkpoints: dict[str, Checkpoint]
    start: StreamStart | None


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
        self._consumer = consumer_name
        self._partition = f"{consumer_name}|{stream_arn}"
        self._retry = retry
        self._owner = owner
        self._known: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()  # commits (delivery) and registration (discovery) come from two threads
        self.failing_since: float | None = None
        """Wall-clock time since which commits have been failing (the table is unreachable), or None."""
        self.last_error: str | None = None

    @property
    def table_name(self) -> str:
        return self._table

    def ensure_table(self, create: bool) -> None:
        try:
            status = self._retry.call("DescribeTable", self._ddb.describe_table, TableName=self._table)
            if status["Table"]["TableStatus"] == "ACTIVE":
                return
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
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
                if error_code(race) != "ResourceInUseException":
                    raise
        waiter = self._ddb.get_waiter("table_exists")
        waiter.wait(TableName=self._table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})

    # -- reading -----------------------------------------------------------------------------------------------

    def load_state(self) -> StoredState:
        """Every shard row of this stream and consumer, and the record of the first start (None before it)."""
        found: dict[str, Checkpoint] = {}
        start: StreamStart | None = None
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
                if item["shard_id"]["S"] == START_ROW:
                    start = _start_from_item(item)
                elif not item["shard_id"]["S"].startswith("#"):
                    checkpoint = _from_item(item)
                    found[checkpoint.shard_id] = checkpoint
            if "LastEvaluatedKey" not in page:
                with self._lock:
                    self._known = dict(found)
                return StoredState(found, start)
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def load(self) -> dict[str, Checkpoint]:
        """Every shard row of this stream and consumer, by shard id."""
        return self.load_state().checkpoints

    def known(self) -> dict[str, Checkpoint]:
        """The rows as last read or written by this store."""
        with self._lock:
            return dict(self._known)

    def checkpoint(self, shard_id: str) -> Checkpoint | None:
        with self._lock:
            return self._known.get(shard_id)

    # -- the first start and the stream in use -------------------------------------------------------------------

    def record_start(self, start: StreamStart) -> StreamStart:
        """Write the first start's record unless one exists; returns the record that holds (ours or the first)."""
        item = {
            "stream": {"S": self._partition},
            "shard_id": {"S": START_ROW},
            "starting_position": {"S": start.starting_position},
            "recorded_at": {"S": start.recorded_at},
        }
        if start.since is not None:
            item["since"] = {"N": str(start.since)}
        try:
            self._retry.call(
                "PutItem (first start)",
                self._ddb.put_item,
                TableName=self._table,
                Item=item,
                ConditionExpression="attribute_not_exists(shard_id)",
            )
            return start
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
        stored = self._retry.call(
            "GetItem (first start)",
            self._ddb.get_item,
            TableName=self._table,
            Key={"stream": {"S": self._partition}, "shard_id": {"S": START_ROW}},
            ConsistentRead=True,
        )
        return _start_from_item(stored["Item"])

    def stream_in_use(self, table_arn: str) -> str | None:
        """The stream ARN this consumer last read for the table, or None if it never read one by table name."""
        stored = self._retry.call(
            "GetItem (stream in use)",
            self._ddb.get_item,
            TableName=self._table,
            Key=self._pointer_key(table_arn),
            ConsistentRead=True,
        )
        item = stored.get("Item")
        return None if item is None else str(item["stream_arn"]["S"])

    def use_stream(self, table_arn: str, stream_arn: str) -> None:
        self._retry.call(
            "PutItem (stream in use)",
            self._ddb.put_item,
            TableName=self._table,
            Item={
                **self._pointer_key(table_arn),
                "stream_arn": {"S": stream_arn},
                "updated_at": {"S": datetime.now(UTC).isoformat()},
            },
        )

    def _pointer_key(self, table_arn: str) -> dict[str, Any]:
        return {"stream": {"S": f"{self._consumer}|{table_arn}"}, "shard_id": {"S": STREAM_POINTER_ROW}}

    # -- writing -----------------------------------------------------------------------------------------------

    def register(
        self, shards: Iterable[tuple[str, str | None]], finished: Iterable[str] = (), *, overwrite: bool = False
    ) -> None:
        """Give each (shard id, parent id) without a row one, holding no position yet; `finished` are written
        as finished (shards a LATEST first start skips). `overwrite` rewrites rows that exist (a first start
        tried again: its earlier rows hold no position)."""
        done = set(finished)
        known = self.known()
        new = [
            Checkpoint(shard_id, None, shard_id in done, parent_shard_id=parent)
            for shard_id, parent in shards
            if overwrite or shard_id not in known
        ]
        if new:
            self._put(new, forever=False)

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

        A table that cannot be reached is waited out, like a sink outage: the commit is retried until it is
        written or the pipeline is stopped hard (`failing_since` tells health how long it has been).
        """
        now = datetime.now(UTC).isoformat()
        record_times = record_times or {}
        merged: list[Checkpoint] = []
        known = self.known()
        for shard_id in sorted(set(positions) | set(finished)):
            before = known.get(shard_id) or Checkpoint(shard_id, None, False)
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
        self._put(merged, forever=True)

    def prune(self, shard_ids: Iterable[str]) -> None:
        """Delete the rows of shards nothing needs any more (finished, aged out, no unfinished child)."""
        gone = sorted(set(shard_ids) & set(self.known()))
        for start in range(0, len(gone), BATCH_WRITE_MAX_ITEMS):
            chunk = gone[start : start + BATCH_WRITE_MAX_ITEMS]
            requests = [
                {"DeleteRequest": {"Key": {"stream": {"S": self._partition}, "shard_id": {"S": shard_id}}}}
                for shard_id in chunk
            ]
            self._write_requests(requests, forever=True)
            with self._lock:
                for shard_id in chunk:
                    self._known.pop(shard_id, None)

    def _put(self, checkpoints: list[Checkpoint], *, forever: bool) -> None:
        for start in range(0, len(checkpoints), BATCH_WRITE_MAX_ITEMS):
            chunk = checkpoints[start : start + BATCH_WRITE_MAX_ITEMS]
            self._write_requests([{"PutRequest": {"Item": self._to_item(c)}} for c in chunk], forever=forever)
            with self._lock:
                self._known.update((checkpoint.shard_id, checkpoint) for checkpoint in chunk)

    def _write_requests(self, requests: list[dict[str, Any]], *, forever: bool) -> None:
        pending = requests
        stop = tenacity.stop_never if forever else None
        try:
            for attempt in self._retry.retrying(f"BatchWriteItem (checkpoint table {self._table})", stop=stop):
                with attempt:
                    try:
                        response = self._ddb.batch_write_item(RequestItems={self._table: pending})
                    except Exception as exc:
                        if self.failing_since is None:
                            self.failing_since = time.time()
                        self.last_error = f"{type(exc).__name__}: {error_text(exc)}"
                        raise
                    pending = response.get("UnprocessedItems", {}).get(self._table, [])
                    if pending:
                        if self.failing_since is None:
                            self.failing_since = time.time()
                        self.last_error = f"{len(pending)} write(s) left unprocessed (throttled)"
                        raise _UnprocessedCheckpoints(f"{len(pending)} checkpoint(s) left unprocessed (throttled)")
        finally:
            if not pending:
                self.failing_since = None
                self.last_error = None

    def _to_item(self, checkpoint: Checkpoint) -> dict[str, Any]:
        item: dict[str, Any] = {
            "stream": {"S": self._partition},
            "shard_id": {"S": checkpoint.shard_id},
            "finished": {"BOOL": checkpoint.finished},
        }
        for name in ("sequence_number", "owner", "updated_at", "last_record_at", "parent_shard_id"):
            value = getattr(checkpoint, name)
            if value is not None:
                item[name] = {"S": value}
        if checkpoint.lease_expires_at is not None:
            item["lease_expires_at"] = {"N": repr(checkpoint.lease_expires_at)}
        return item


class _UnprocessedCheckpoints(RetryableError):
    """BatchWriteItem returned UnprocessedItems: write those again after a back-off."""


def error_text(exc: BaseException) -> str:
    """A client error's code, or the exception's own text: what a checkpoint-table failure is called in logs."""
    if isinstance(exc, ClientError):
        return error_code(exc) or str(exc)
    return str(exc)


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
        parent_shard_id=text("parent_shard_id"),
    )


def _start_from_item(item: dict[str, Any]) -> StreamStart:
    since = item.get("since")
    position: Any = item["starting_position"]["S"]
    return StreamStart(position, None if since is None else int(since["N"]), item["recorded_at"]["S"])
