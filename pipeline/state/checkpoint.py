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

Leases (the KCL 2.x protocol, with liveness per worker instead of per lease): a shard row also names the worker
that holds its lease (`owner`) and an epoch that moves on at every take and release; every checkpoint write is
conditional on both, so only the holder moves a shard forward. Each worker keeps one heartbeat row
(`#lease#worker#<id>`, a counter it moves on every `lease.heartbeat_seconds`) instead of renewing every lease it
holds: steady-state lease writes grow with workers, not shards. `#lease#changes` is a counter a worker bumps when
it releases leases or joins, so peers look at once instead of at their next pass (`pipeline.state.leases`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
LEASE_ROW_PREFIX = "#lease#"
WORKER_ROW_PREFIX = LEASE_ROW_PREFIX + "worker#"
CHANGES_ROW = LEASE_ROW_PREFIX + "changes"
WRITE_CONCURRENCY = 8
"""Conditional writes of one commit in flight at once: one round trip each, and a commit may cover many shards."""

StartingPosition = Literal["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    shard_id: str
    sequence_number: str | None
    finished: bool
    owner: str | None = None
    """The worker holding the shard's lease, or None (never taken, or released)."""
    lease_epoch: int = 0
    """Moves on at every take and release: a checkpoint write names the epoch it holds, so a lease taken away and
    given back in between still refuses the writer that lost it."""
    lease_taken_at: str | None = None
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
class WorkerBeat:
    """One worker's heartbeat row. `beat` moves on at every heartbeat: a peer judges liveness by seeing it move on
    its own monotonic clock, never by comparing wall clocks across machines."""

    worker: str
    beat: int
    held: int
    heartbeat_at: str
    pid: int | None = None
    identity: str | None = None
    shedding: int = 0
    """Leases it is giving up (draining before the release): not a sign of a worker stuck above its share."""
    load_ended: str | None = None
    """The initial load this worker has seen finish and has nothing in flight from any more (its replica writes no
    tombstones): the load's owner cleans up once every live worker says so."""


@dataclass(frozen=True, slots=True)
class StoredState:
    checkpoints: dict[str, Checkpoint]
    start: StreamStart | None
    workers: dict[str, WorkerBeat] = field(default_factory=dict)
    changes: int = 0


class CheckpointStore:
    def __init__(
        self,
        dynamodb: Any,
        *,
        table_name: str,
        stream_arn: str,
        consumer_name: str,
        retry: RetryPolicy,
        worker: str | None = None,
    ) -> None:
        """`worker`: this worker's id, the owner its leases carry; None for a store that only reads (status)."""
        self._ddb = dynamodb
        self._table = table_name
        self._consumer = consumer_name
        self._partition = f"{consumer_name}|{stream_arn}"
        self._retry = retry
        self._worker = worker
        self._held: dict[str, int] = {}
        """Shard -> the lease epoch this store took it at: what its checkpoint writes are conditional on. Kept apart
        from the rows it reads, so a fresh read of a row never lends a write an epoch it did not take."""
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._known: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()  # commits (delivery) and registration (discovery) come from two threads
        self.failing_since: float | None = None
        """Wall-clock time since which commits have been failing (the table is unreachable), or None."""
        self.last_error: str | None = None

    @property
    def table_name(self) -> str:
        return self._table

    @property
    def partition(self) -> str:
        """The partition key of this stream and consumer's rows (the initial load's row lives there too)."""
        return self._partition

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
        workers: dict[str, WorkerBeat] = {}
        changes = 0
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
                elif item["shard_id"]["S"].startswith(LEASE_ROW_PREFIX):
                    changes = _read_coordination_item(item, workers, changes)
                elif not item["shard_id"]["S"].startswith("#"):
                    checkpoint = _from_item(item)
                    found[checkpoint.shard_id] = checkpoint
            if "LastEvaluatedKey" not in page:
                with self._lock:
                    self._known = dict(found)
                return StoredState(found, start, workers, changes)
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
        """Give each (shard id, parent id) without a row one, holding no position and no owner; `finished` are
        written as finished (shards a LATEST first start skips). `overwrite` rewrites rows that hold no position
        and no owner (a first start tried again).

        Each put is conditional: another worker may have created the row, taken it and moved it forward since
        this one last read the table, and a blind put would move that checkpoint back."""
        done = set(finished)
        known = self.known()
        new = [
            Checkpoint(shard_id, None, shard_id in done, parent_shard_id=parent)
            for shard_id, parent in shards
            if overwrite or shard_id not in known
        ]
        condition = (
            "attribute_not_exists(shard_id) OR (attribute_not_exists(sequence_number) AND attribute_not_exists(#o))"
            if overwrite
            else "attribute_not_exists(shard_id)"
        )

        def put(checkpoint: Checkpoint) -> None:
            try:
                self._retry.call(
                    f"PutItem (register shard {checkpoint.shard_id})",
                    self._ddb.put_item,
                    TableName=self._table,
                    Item=self._to_item(checkpoint),
                    ConditionExpression=condition,
                    **({"ExpressionAttributeNames": {"#o": "owner"}} if overwrite else {}),
                )
            except ClientError as exc:
                if error_code(exc) != "ConditionalCheckFailedException":
                    raise
                self.refresh(checkpoint.shard_id)  # someone else's row holds: learn it
                return
            with self._lock:
                self._known[checkpoint.shard_id] = checkpoint

        self._each(put, new)

    def refresh(self, shard_id: str) -> Checkpoint | None:
        """Read one shard's row again (strongly consistent)."""
        stored = self._retry.call(
            f"GetItem (shard {shard_id})",
            self._ddb.get_item,
            TableName=self._table,
            Key=self._key(shard_id),
            ConsistentRead=True,
        )
        item = stored.get("Item")
        with self._lock:
            if item is None:
                self._known.pop(shard_id, None)
                return None
            row = self._known[shard_id] = _from_item(item)
            return row

    def save(
        self,
        positions: Mapping[str, str],
        finished: frozenset[str] | set[str] = frozenset(),
        record_times: Mapping[str, datetime] | None = None,
    ) -> dict[str, int | None]:
        """Record delivered positions, shards whose last record is delivered, and when those records were made;
        returns the shards whose lease this worker does not hold (nothing was written for them), each with the
        epoch that was refused (None: not held at all).

        Every write is conditional on the lease this worker holds (owner and epoch): a worker that lost a lease
        while paused, partitioned or slow can never move that shard's checkpoint. Conditions need one UpdateItem
        per shard (BatchWriteItem takes none), so the writes of one commit go out several at a time.

        A table that cannot be reached is waited out, like a sink outage: the commit is retried until it is
        written or the pipeline is stopped hard (`failing_since` tells health how long it has been).
        """
        now = datetime.now(UTC).isoformat()
        record_times = record_times or {}
        known = self.known()
        with self._lock:
            held = dict(self._held)
        lost: dict[str, int | None] = {}
        writes: list[Checkpoint] = []
        for shard_id in sorted(set(positions) | set(finished)):
            before = known.get(shard_id)
            epoch = held.get(shard_id)
            if before is None or self._worker is None or epoch is None:
                lost[shard_id] = None
                continue
            when = record_times.get(shard_id)
            sequence = positions.get(shard_id)
            if sequence is not None and before.sequence_number is not None:
                sequence = max(sequence, before.sequence_number, key=int)  # never backwards, compared as numbers
            writes.append(
                replace(
                    before,
                    owner=self._worker,
                    lease_epoch=epoch,
                    sequence_number=sequence or before.sequence_number,
                    finished=before.finished or shard_id in finished,
                    updated_at=now,
                    last_record_at=when.astimezone(UTC).isoformat() if when is not None else before.last_record_at,
                )
            )

        def write(checkpoint: Checkpoint) -> None:
            if not self._update_held(checkpoint):
                lost[checkpoint.shard_id] = checkpoint.lease_epoch

        self._each(write, writes)
        return lost

    def _update_held(self, checkpoint: Checkpoint) -> bool:
        """One fenced checkpoint write, retried until it is written or refused; False if the lease is gone."""
        values: dict[str, Any] = {
            ":me": {"S": self._worker},
            ":epoch": {"N": str(checkpoint.lease_epoch)},
            ":finished": {"BOOL": checkpoint.finished},
            ":updated": {"S": checkpoint.updated_at},
        }
        sets = ["finished = :finished", "updated_at = :updated"]
        for name in ("sequence_number", "last_record_at"):
            value = getattr(checkpoint, name)
            if value is not None:
                values[f":{name}"] = {"S": value}
                sets.append(f"{name} = :{name}")
        try:
            self._retry_forever(
                f"UpdateItem (checkpoint of {checkpoint.shard_id})",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(checkpoint.shard_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="#o = :me AND lease_epoch = :epoch",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            with self._lock:
                if self._held.get(checkpoint.shard_id) == checkpoint.lease_epoch:
                    del self._held[checkpoint.shard_id]
            self.refresh(checkpoint.shard_id)
            return False
        with self._lock:
            self._known[checkpoint.shard_id] = checkpoint
        return True

    def prune(self, shard_ids: Iterable[str]) -> None:
        """Delete the rows of shards nothing needs any more (finished, aged out, no unfinished child)."""
        gone = sorted(set(shard_ids) & set(self.known()))
        for start in range(0, len(gone), BATCH_WRITE_MAX_ITEMS):
            chunk = gone[start : start + BATCH_WRITE_MAX_ITEMS]
            requests = [{"DeleteRequest": {"Key": self._key(shard_id)}} for shard_id in chunk]
            self._write_requests(requests, forever=True)
            with self._lock:
                for shard_id in chunk:
                    self._known.pop(shard_id, None)

    # -- leases ------------------------------------------------------------------------------------------------

    @property
    def worker(self) -> str | None:
        return self._worker

    def held(self) -> dict[str, int]:
        """Shards this store holds the lease of, and the epoch it took each at."""
        with self._lock:
            return dict(self._held)

    def take_all(self, rows: list[Checkpoint]) -> list[Checkpoint | None]:
        """`take` for every row, several at a time (a pass may take a thousand leases: one round trip each)."""
        taken: dict[str, Checkpoint | None] = {}

        def one(row: Checkpoint) -> None:
            taken[row.shard_id] = self.take(row)

        self._each(one, rows)
        return [taken[row.shard_id] for row in rows]

    def take(self, row: Checkpoint) -> Checkpoint | None:
        """Take a shard's lease from whoever `row` says holds it (nobody, an expired worker, or a peer above its
        share); returns the row now held, or None if the row changed since it was read (another worker won)."""
        assert self._worker is not None
        now = datetime.now(UTC).isoformat()
        if row.owner is None:
            condition = "attribute_exists(shard_id) AND attribute_not_exists(#o) AND " + (
                "lease_epoch = :epoch" if row.lease_epoch else "attribute_not_exists(lease_epoch)"
            )
        else:
            condition = "#o = :owner AND lease_epoch = :epoch"
        values: dict[str, Any] = {
            ":me": {"S": self._worker},
            ":next": {"N": str(row.lease_epoch + 1)},
            ":now": {"S": now},
        }
        if row.lease_epoch or row.owner is not None:
            values[":epoch"] = {"N": str(row.lease_epoch)}
        if row.owner is not None:
            values[":owner"] = {"S": row.owner}
        try:
            answer = self._retry.call(
                f"UpdateItem (take lease of {row.shard_id})",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(row.shard_id),
                UpdateExpression="SET #o = :me, lease_epoch = :next, lease_taken_at = :now",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            # A retry after an answer that was lost finds its own write: the condition no longer holds, but the
            # lease is ours.
            current = self.refresh(row.shard_id)
            if current is not None and current.owner == self._worker and current.lease_epoch == row.lease_epoch + 1:
                with self._lock:
                    self._held[row.shard_id] = current.lease_epoch
                return current
            return None
        taken = _from_item(answer["Attributes"])
        with self._lock:
            self._known[row.shard_id] = taken
            self._held[row.shard_id] = taken.lease_epoch
        return taken

    def release(self, shard_ids: Iterable[str]) -> None:
        """Give leases up (owner removed, epoch moved on) so a peer takes them on its next pass instead of waiting
        out the failover time; a lease already gone is left as it is."""
        held = self.held()
        known = self.known()
        rows = [replace(known[s], lease_epoch=held[s]) for s in shard_ids if s in held and s in known]

        def give_up(row: Checkpoint) -> None:
            with self._lock:
                self._held.pop(row.shard_id, None)  # from here on no checkpoint of ours may be written
            try:
                self._give_up(row)
            except Exception:
                with self._lock:
                    self._held[row.shard_id] = row.lease_epoch  # not released: still ours
                raise

        self._each(give_up, rows)

    def _give_up(self, row: Checkpoint) -> None:
        try:
            answer = self._retry.call(
                f"UpdateItem (release lease of {row.shard_id})",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(row.shard_id),
                UpdateExpression="REMOVE #o SET lease_epoch = :next",
                ConditionExpression="#o = :me AND lease_epoch = :epoch",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={
                    ":me": {"S": self._worker},
                    ":epoch": {"N": str(row.lease_epoch)},
                    ":next": {"N": str(row.lease_epoch + 1)},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            self.refresh(row.shard_id)  # already given up (an answer lost), or taken: either way not ours
            return
        with self._lock:
            self._known[row.shard_id] = _from_item(answer["Attributes"])

    def finish_unread(self, row: Checkpoint) -> bool:
        """Mark a shard that aged out of the stream unread as finished, if its row is still as it was read (held
        by nobody, or by a worker that is gone): its children can be read."""
        values: dict[str, Any] = {":t": {"BOOL": True}, ":now": {"S": datetime.now(UTC).isoformat()}}
        if row.owner is None:
            condition = "attribute_not_exists(#o)"
        else:
            condition = "#o = :owner AND lease_epoch = :epoch"
            values[":owner"] = {"S": row.owner}
            values[":epoch"] = {"N": str(row.lease_epoch)}
        try:
            self._retry_forever(
                f"UpdateItem (finish {row.shard_id})",
                self._ddb.update_item,
                TableName=self._table,
                Key=self._key(row.shard_id),
                UpdateExpression="SET finished = :t, updated_at = :now",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise
            self.refresh(row.shard_id)
            return False
        self.refresh(row.shard_id)
        return True

    def heartbeat(
        self, beat: int, held: int, identity: str | None, shedding: int = 0, load_ended: str | None = None
    ) -> None:
        """This worker's sign of life: one small write per worker, however many shards it holds."""
        assert self._worker is not None
        item: dict[str, Any] = {
            **self._key(WORKER_ROW_PREFIX + self._worker),
            "worker": {"S": self._worker},
            "beat": {"N": str(beat)},
            "held": {"N": str(held)},
            "shedding": {"N": str(shedding)},
            "heartbeat_at": {"S": datetime.now(UTC).isoformat()},
            "pid": {"N": str(os.getpid())},
        }
        if identity is not None:
            item["identity"] = {"S": identity}
        if load_ended is not None:
            item["load_ended"] = {"S": load_ended}
        # One attempt: a heartbeat that fails is simply the next one's to write, and a retried one could land after
        # the stop deleted the row (a ghost worker peers would count as live for the failover time).
        self._ddb.put_item(TableName=self._table, Item=item)

    def leave(self) -> None:
        """Delete this worker's heartbeat: peers count it out at once."""
        assert self._worker is not None
        self._retry.call(
            "DeleteItem (heartbeat)",
            self._ddb.delete_item,
            TableName=self._table,
            Key=self._key(WORKER_ROW_PREFIX + self._worker),
        )

    def announce(self) -> None:
        """Tell peers the leases changed (some were released, or a worker joined), so they look now rather than at
        their next pass."""
        self._retry.call(
            "UpdateItem (lease changes)",
            self._ddb.update_item,
            TableName=self._table,
            Key=self._key(CHANGES_ROW),
            UpdateExpression="ADD changes :one",
            ExpressionAttributeValues={":one": {"N": "1"}},
        )

    def coordination(self) -> tuple[dict[str, WorkerBeat], int]:
        """The workers' heartbeats and the lease-change counter: a small read, done at every heartbeat."""
        workers: dict[str, WorkerBeat] = {}
        changes = 0
        request: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "#s = :s AND begins_with(shard_id, :p)",
            "ExpressionAttributeNames": {"#s": "stream"},
            "ExpressionAttributeValues": {":s": {"S": self._partition}, ":p": {"S": LEASE_ROW_PREFIX}},
            "ConsistentRead": True,
        }
        while True:
            page = self._retry.call("Query (workers)", self._ddb.query, **request)
            for item in page.get("Items", []):
                changes = _read_coordination_item(item, workers, changes)
            if "LastEvaluatedKey" not in page:
                return workers, changes
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _key(self, sort: str) -> dict[str, Any]:
        return {"stream": {"S": self._partition}, "shard_id": {"S": sort}}

    def _each(self, fn: Callable[[Checkpoint], None], rows: list[Checkpoint]) -> None:
        """`fn` for every row, several at a time when there are many (each is a round trip)."""
        if len(rows) <= 1:
            for row in rows:
                fn(row)
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WRITE_CONCURRENCY, thread_name_prefix="checkpoint")
            pool = self._pool
        for future in [pool.submit(fn, row) for row in rows]:
            future.result()

    def _retry_forever(self, what: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        """A checkpoint-table write that waits out an unreachable table, noting how long it has been failing."""
        for attempt in self._retry.retrying(what, stop=tenacity.stop_never):
            with attempt:
                try:
                    answer = fn(**kwargs)
                except ClientError as exc:
                    if error_code(exc) == "ConditionalCheckFailedException":
                        self.failing_since = self.last_error = None
                        raise
                    self._note_failure(exc)
                    raise
                except Exception as exc:
                    self._note_failure(exc)
                    raise
                self.failing_since = self.last_error = None
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_failure(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
        self.last_error = f"{type(exc).__name__}: {error_text(exc)}"

    def _write_requests(self, requests: list[dict[str, Any]], *, forever: bool) -> None:
        pending = requests
        stop = tenacity.stop_never if forever else None
        try:
            for attempt in self._retry.retrying(f"BatchWriteItem (checkpoint table {self._table})", stop=stop):
                with attempt:
                    try:
                        response = self._ddb.batch_write_item(RequestItems={self._table: pending})
                    except Exception as exc:
                        self._note_failure(exc)
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
            **self._key(checkpoint.shard_id),
            "finished": {"BOOL": checkpoint.finished},
        }
        for name in ("sequence_number", "owner", "updated_at", "last_record_at", "parent_shard_id", "lease_taken_at"):
            value = getattr(checkpoint, name)
            if value is not None:
                item[name] = {"S": value}
        if checkpoint.lease_epoch:
            item["lease_epoch"] = {"N": str(checkpoint.lease_epoch)}
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

    epoch = item.get("lease_epoch")
    return Checkpoint(
        shard_id=item["shard_id"]["S"],
        sequence_number=text("sequence_number"),
        finished=bool(item.get("finished", {}).get("BOOL", False)),
        owner=text("owner"),
        lease_epoch=0 if epoch is None else int(epoch["N"]),
        lease_taken_at=text("lease_taken_at"),
        updated_at=text("updated_at"),
        last_record_at=text("last_record_at"),
        parent_shard_id=text("parent_shard_id"),
    )


def _read_coordination_item(item: dict[str, Any], workers: dict[str, WorkerBeat], changes: int) -> int:
    """Fold a `#lease#` row into `workers`; returns the lease-change counter (updated if this row is it)."""
    sort = item["shard_id"]["S"]
    if sort == CHANGES_ROW:
        return int(item.get("changes", {}).get("N", "0"))
    if sort.startswith(WORKER_ROW_PREFIX):
        pid = item.get("pid")
        identity = item.get("identity")
        beat = WorkerBeat(
            worker=sort[len(WORKER_ROW_PREFIX) :],
            beat=int(item["beat"]["N"]),
            held=int(item.get("held", {}).get("N", "0")),
            heartbeat_at=item.get("heartbeat_at", {}).get("S", ""),
            pid=None if pid is None else int(pid["N"]),
            identity=None if identity is None else str(identity["S"]),
            shedding=int(item.get("shedding", {}).get("N", "0")),
            load_ended=item["load_ended"]["S"] if "load_ended" in item else None,
        )
        workers[beat.worker] = beat
    return changes


def _start_from_item(item: dict[str, Any]) -> StreamStart:
    since = item.get("since")
    position: Any = item["starting_position"]["S"]
    return StreamStart(position, None if since is None else int(since["N"]), item["recorded_at"]["S"])
