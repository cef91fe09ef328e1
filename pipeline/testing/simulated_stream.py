"""A DynamoDB Streams endpoint held in memory, faithful where stream consumers usually break.

moto's streams have one shard that never closes, iterators that never expire, no retention, no page caps, no
throttling, and answer HTTP 500 to a bad iterator. A consumer that passes against moto can still lose the records
at the end of a closed shard, read a child before its parent, stick on an expired iterator or skip trimmed data
without a word. This module models what real streams do there:

- shards with lineage: roll-over into one child (every `rollover_seconds`, about four hours on AWS), splits into
  two children (on demand, or after `auto_split_records`), closed shards with an EndingSequenceNumber whose last
  page carries no NextShardIterator; parents are listed until they age out, children keep their ParentShardId;
- sequence numbers as decimal strings of 21 digits or more, growing in uneven steps, children above parents;
- iterators that expire `iterator_ttl_seconds` (15 minutes) after they were issued, and a retention
  (`retention_seconds`, 24 hours) after which records are trimmed and iterators into them refused;
- GetRecords pages capped at 1000 records (and `Limit`) and 1 MB, DescribeStream pages capped at 100 shards;
- the real error codes, HTTP statuses and JSON bodies, and a seeded `FaultSchedule` for throttling, 5xx,
  expiry and empty pages, reproducible whatever the thread interleaving;
- a stream disabled and enabled again, which moto refuses: `SimulatedStream.disable()` closes every open shard
  (each then ends as a closed shard does) and DescribeStream says DISABLED, while what the stream holds stays
  readable until the retention trims it; `StreamSimulator.create_stream` for the same table then gives its next
  stream, with a new ARN and label, over the same table items;
- DynamoDB's DescribeTable for the simulated tables, with the `LatestStreamArn` and `StreamSpecification` a
  consumer resolves its stream from (StreamEnabled false, the ARN kept, once the newest stream is disabled).

Time comes from an injectable clock (`ManualClock` moves only when told), so expiry and trimming are tested in
milliseconds. The real boto3 client talks to the model at the wire level: `StreamSimulator.attach(client)` answers
a `dynamodbstreams` client's requests in-process from a botocore `before-send` hook, `attach_tables(client)` does
the same for DescribeTable of the simulated tables on a `dynamodb` client (letting every other request go out),
and `pipeline.testing.simulated_stream_server` serves the same model over HTTP for another process. Either way
boto3 serializes, parses, raises and retries exactly as it does against AWS.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import collections
import dataclasses
import hashlib
import hmac
import itertools
import math
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol

import orjson

STREAMS_TARGET_PREFIX = "DynamoDBStreams_20120810."
"""The X-Amz-Target prefix of every DynamoDB Streams request (JSON 1.0 protocol)."""
DYNAMODB_TARGET_PREFIX = "DynamoDB_20120810."
"""The X-Amz-Target prefix of every DynamoDB request (JSON 1.0 protocol); the simulator answers DescribeTable."""
OPERATIONS = frozenset({"DescribeStream", "GetShardIterator", "GetRecords", "ListStreams"})

ITERATOR_TTL_SECONDS = 15 * 60
RETENTION_SECONDS = 24 * 3600
ROLLOVER_SECONDS = 4 * 3600
MAX_RECORDS_PER_PAGE = 1000
MAX_PAGE_BYTES = 1024 * 1024
MAX_SHARDS_PER_PAGE = 100
MAX_STREAMS_PER_PAGE = 100
MAX_ITEM_BYTES = 400 * 1024
FIRST_SEQUENCE_NUMBER = 10**20
"""The smallest 21-digit number: the shortest sequence number the API allows."""

StreamViewType = Literal["KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES"]
AttributeValue = Mapping[str, Any]
Item = Mapping[str, AttributeValue]

_ERROR_TYPE_PREFIX = "com.amazonaws.dynamodb.v20120810#"
_CONTENT_TYPE = "application/x-amz-json-1.0"
_HASH_SPACE = 2**64
_TTL_IDENTITY = {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}
# Room left in a 1 MB GetRecords answer for everything around the records (the next iterator is <= 2048 chars).
_PAGE_ENVELOPE_BYTES = 4096
_HTTP_STATUS = {
    "InternalServerError": 500,
}


# -- time ------------------------------------------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class WallClock:
    """Real time: iterators expire and records age out as they would on AWS."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """Time that moves only when told, so a test sees 15 minutes or 24 hours pass at once. Thread-safe."""

    def __init__(self, start: float | datetime | None = None) -> None:
        if isinstance(start, datetime):
            start = start.timestamp()
        self._now = time.time() if start is None else float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move forward (never back: sequence numbers and record times only grow); returns the new time."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._now += seconds
            return self._now


# -- errors and faults -----------------------------------------------------------------------------------------


class StreamServiceError(Exception):
    """An error the service answers with: its code, HTTP status and message, as on the wire."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else _HTTP_STATUS.get(code, 400)


def _throttled(subject: str) -> StreamServiceError:
    return StreamServiceError(
        "LimitExceededException", f"Rate exceeded for shard {subject}" if subject else "Rate exceeded"
    )


def _internal_error() -> StreamServiceError:
    return StreamServiceError("InternalServerError", "Internal server error")


def _expired() -> StreamServiceError:
    return StreamServiceError("ExpiredIteratorException", "The provided iterator exceeds the maximum age allowed.")


def _trimmed() -> StreamServiceError:
    return StreamServiceError("TrimmedDataAccessException", "The data you are trying to access has been trimmed.")


class StreamDisabledError(ValueError):
    """A write to a stream that was disabled: the table's changes no longer reach it.

    Raised by the test-facing methods of `SimulatedStream`, never answered on the wire (the stream stays readable).
    """


def _validation(message: str) -> StreamServiceError:
    return StreamServiceError("ValidationException", message)


def _not_found(message: str) -> StreamServiceError:
    return StreamServiceError("ResourceNotFoundException", message)


FaultKind = Literal["LimitExceededException", "InternalServerError", "ExpiredIteratorException", "EmptyPage"]


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Which calls fail, drawn from `seed`: the same seed gives the same faults on every run.

    Each call's fate depends only on the seed, the operation, what it addresses (the shard, or the stream for
    DescribeStream) and how many such calls came before, never on how threads interleave, so a failing run can be
    replayed. Rates are fractions of calls:

    - `throttle_rate`: LimitExceededException (HTTP 400), as when a shard's read rate is exceeded;
    - `error_rate`: InternalServerError (HTTP 500);
    - `expire_rate` (GetRecords only): ExpiredIteratorException, as if the consumer had paused past the TTL;
    - `empty_rate` (GetRecords only): an empty page with a NextShardIterator at the same position although
      records wait, which the real service answers while it walks a shard ("it might take multiple calls").
    """

    seed: int = 0
    throttle_rate: float = 0.0
    error_rate: float = 0.0
    expire_rate: float = 0.0
    empty_rate: float = 0.0
    operations: frozenset[str] = OPERATIONS

    def __post_init__(self) -> None:
        rates = (self.throttle_rate, self.error_rate, self.expire_rate, self.empty_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        unknown = set(self.operations) - OPERATIONS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}; known: {sorted(OPERATIONS)}")

    def fault_for(self, operation: str, subject: str, call_number: int) -> FaultKind | None:
        """The fault for the `call_number`-th (from 0) call of `operation` on `subject`, or None."""
        if operation not in self.operations:
            return None
        digest = hashlib.blake2b(f"{self.seed}|{operation}|{subject}|{call_number}".encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        for kind, rate in (
            ("LimitExceededException", self.throttle_rate),
            ("InternalServerError", self.error_rate),
            ("ExpiredIteratorException", self.expire_rate if operation == "GetRecords" else 0.0),
            ("EmptyPage", self.empty_rate if operation == "GetRecords" else 0.0),
        ):
            if draw < rate:
                return kind  # type: ignore[return-value]
            draw -= rate
        return None


# -- what was served -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServedCall:
    """One request the simulator answered, for tests to assert on (`StreamSimulator.calls`)."""

    operation: str
    status: int
    error_code: str | None = None
    stream_arn: str | None = None
    shard_id: str | None = None
    iterator_type: str | None = None
    """GetShardIterator: the ShardIteratorType asked for."""
    sequence_number: str | None = None
    """GetShardIterator: the SequenceNumber asked for. GetRecords: the last record returned."""
    records: int = 0
    body_bytes: int = 0
    end_of_shard: bool = False
    client: str | None = None
    """The caller's User-Agent (streamsink's names its worker)."""
    at: float = 0.0
    """When it was answered (time.monotonic of the simulator's process)."""
    """GetRecords: the answer carried no NextShardIterator (the closed shard is read to its end)."""
    injected: bool = False
    """The error came from the fault schedule or `fail_next`, not from the model."""


@dataclass(frozen=True, slots=True)
class WireResponse:
    """An HTTP answer exactly as the service would send it."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class ShardState:
    """A shard as the model holds it (`SimulatedStream.shards`)."""

    shard_id: str
    parent_shard_id: str | None
    starting_sequence_number: str
    ending_sequence_number: str | None
    records: int
    """Records still kept (not trimmed)."""
    trimmed: int
    """Records removed by retention."""
    last_sequence_number: str | None
    """The newest record ever written to the shard, trimmed or not."""

    @property
    def closed(self) -> bool:
        return self.ending_sequence_number is not None


# -- DynamoDB JSON helpers -------------------------------------------------------------------------------------


def _wire_default(value: Any) -> Any:
    """orjson fallback: binary as base64 (the JSON protocol's blob form), sets as lists."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} in DynamoDB JSON")


def attribute_size(value: AttributeValue) -> int:
    """DynamoDB's size of one attribute value, by the rules it bills and caps items with."""
    ((kind, data),) = value.items()
    if kind == "S":
        return len(data.encode("utf-8"))
    if kind == "N":
        return _number_size(data)
    if kind == "B":
        return len(data)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode("utf-8")) for s in data)
    if kind == "NS":
        return sum(_number_size(n) for n in data)
    if kind == "BS":
        return sum(len(b) for b in data)
    if kind == "L":
        return 3 + sum(attribute_size(v) + 1 for v in data)
    if kind == "M":
        return 3 + sum(len(k.encode("utf-8")) + attribute_size(v) + 1 for k, v in data.items())
    raise ValueError(f"unknown attribute type {kind!r}")


def item_size(item: Item) -> int:
    """DynamoDB's size of an item: attribute names plus values."""
    return sum(len(name.encode("utf-8")) + attribute_size(value) for name, value in item.items())


def _number_size(text: str) -> int:
    digits = text.lstrip("-").replace(".", "").split("e")[0].split("E")[0].strip("0")
    return (len(digits) + 1) // 2 + 1


def _key_part(value: AttributeValue, name: str) -> tuple[str, Any]:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ValueError(f"key attribute {name!r} must be one DynamoDB JSON value like {{'S': 'x'}}")
    ((kind, data),) = value.items()
    if kind == "S" and isinstance(data, str) and data:
        return ("S", data)
    if kind == "N" and isinstance(data, str):
        try:
            return ("N", str(Decimal(data).normalize()))
        except InvalidOperation:
            raise ValueError(f"key attribute {name!r}: {data!r} is not a number") from None
    if kind == "B" and isinstance(data, bytes | bytearray) and data:
        return ("B", bytes(data))
    raise ValueError(f"key attribute {name!r} must be a non-empty S, N or B value (got {kind!r})")


def _key_hash(part: tuple[str, Any]) -> int:
    kind, data = part
    raw = data if isinstance(data, bytes) else str(data).encode("utf-8")
    return int.from_bytes(hashlib.md5(kind.encode() + b":" + raw, usedforsecurity=False).digest()[:8], "big")


# -- the model -------------------------------------------------------------------------------------------------


class _Shard:
    __slots__ = (
        "appended",
        "closed_at",
        "created_at",
        "end_seq",
        "hash_hi",
        "hash_lo",
        "last_seq",
        "parent_id",
        "read_times",
        "records",
        "seqs",
        "shard_id",
        "start_seq",
        "times",
        "trimmed",
        "trimmed_through",
    )

    def __init__(
        self, shard_id: str, parent_id: str | None, start_seq: int, hash_lo: int, hash_hi: int, created_at: float
    ) -> None:
        self.shard_id = shard_id
        self.parent_id = parent_id
        self.start_seq = start_seq
        self.end_seq: int | None = None
        self.hash_lo = hash_lo
        self.hash_hi = hash_hi
        self.created_at = created_at
        self.closed_at: float | None = None
        # Parallel lists, oldest first: sequence numbers, record times, and each record's wire JSON.
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.records: list[bytes] = []
        self.trimmed_through: int | None = None  # every record at or below this sequence number is gone
        self.trimmed = 0
        self.appended = 0
        self.last_seq: int | None = None
        self.read_times: collections.deque[float] = collections.deque()

    @property
    def closed(self) -> bool:
        return self.end_seq is not None

    def describe(self) -> dict[str, Any]:
        numbers: dict[str, str] = {"StartingSequenceNumber": str(self.start_seq)}
        if self.end_seq is not None:
            numbers["EndingSequenceNumber"] = str(self.end_seq)
        shard: dict[str, Any] = {"ShardId": self.shard_id, "SequenceNumberRange": numbers}
        if self.parent_id is not None:
            shard["ParentShardId"] = self.parent_id
        return shard

    def state(self) -> ShardState:
        return ShardState(
            shard_id=self.shard_id,
            parent_shard_id=self.parent_id,
            starting_sequence_number=str(self.start_seq),
            ending_sequence_number=None if self.end_seq is None else str(self.end_seq),
            records=len(self.seqs),
            trimmed=self.trimmed,
            last_sequence_number=None if self.last_seq is None else str(self.last_seq),
        )


@dataclass(frozen=True, slots=True)
class _Iterator:
    stream_arn: str
    shard_id: str
    after: int
    """The iterator reads records with sequence numbers above this."""
    issued_at_ms: int


class SimulatedStream:
    """One table and its stream. Made by `StreamSimulator.create_stream`; every method is thread-safe.

    Writes take DynamoDB JSON items (as boto3's low-level client does: `{"pk": {"S": "a"}, "n": {"N": "1"}}`,
    binary values as bytes) and append the stream record the service would, to the open shard that owns the
    item's partition key. A write that changes nothing appends nothing, as on AWS.

    After `disable()` the object stands for a disabled stream only: it refuses writes (`StreamDisabledError`) and
    keeps answering reads. The table lives on in the next stream `create_stream` makes for it, which starts from
    this one's items, so a write there of a key written here is a MODIFY with its old image.
    """

    def __init__(
        self,
        simulator: StreamSimulator,
        table_name: str,
        *,
        key_schema: Sequence[tuple[str, Literal["HASH", "RANGE"]]],
        view_type: StreamViewType,
        shards: int,
        auto_split_records: int | None,
        first_sequence_number: int,
        seed: int,
        previous: SimulatedStream | None = None,
    ) -> None:
        """`previous` is the table's stream before this one (disabled): its items, key schema and label carry on."""
        if shards < 1:
            raise ValueError("a stream has at least one shard")
        if first_sequence_number < FIRST_SEQUENCE_NUMBER:
            raise ValueError(f"sequence numbers have at least 21 digits (>= {FIRST_SEQUENCE_NUMBER})")
        hash_keys = [name for name, kind in key_schema if kind == "HASH"]
        if len(hash_keys) != 1 or len(key_schema) > 2:
            raise ValueError("key_schema is one HASH attribute and at most one RANGE attribute")
        self._sim = simulator
        self._lock = simulator._lock
        self.table_name = table_name
        self.key_schema: tuple[tuple[str, Literal["HASH", "RANGE"]], ...] = tuple((n, k) for n, k in key_schema)
        self.partition_key = hash_keys[0]
        self.key_names = tuple(name for name, _ in sorted(self.key_schema, key=lambda nk: nk[1] != "HASH"))
        self.view_type = view_type
        self.region = simulator.region
        if previous is not None and previous.key_schema != self.key_schema:
            raise ValueError(
                f"table {table_name!r} is keyed {list(previous.key_schema)}: a table's key schema cannot change"
            )
        now = simulator.clock.now()
        self.created_at = now
        self.table_created_at: float = previous.table_created_at if previous is not None else now
        """When the table was made: its first stream's creation (DescribeTable's CreationDateTime)."""
        stamp = datetime.fromtimestamp(now, UTC)
        stamp -= timedelta(microseconds=stamp.microsecond % 1000)  # labels have milliseconds
        if previous is not None and stamp <= previous._label_time:
            # The label is all that tells the ARNs of one table's streams apart: a clock that did not move (a
            # ManualClock) or went back (the wall clock) must not give the new stream the old one's ARN.
            stamp = previous._label_time + timedelta(milliseconds=1)
        self._label_time: datetime = stamp
        self.label = stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        self.table_arn = f"arn:aws:dynamodb:{self.region}:{simulator.account_id}:table/{table_name}"
        self.arn = f"{self.table_arn}/stream/{self.label}"
        # A later stream of the table draws its own shard ids and event ids, not the first stream's again.
        self._rng = random.Random(seed if previous is None else f"{seed}|{self.arn}")
        self._disabled_at: float | None = None
        self._auto_split_records = auto_split_records
        self._seq = first_sequence_number - 1
        self._last_shard_ms = 0
        self._shards: dict[str, _Shard] = {}
        self._open: list[_Shard] = []
        self._open_lows: list[int] = []
        self._items: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = (
            dict(previous._items) if previous is not None else {}
        )
        self._due = math.inf
        self.records_written = 0
        width = _HASH_SPACE // shards
        for n in range(shards):
            hi = _HASH_SPACE if n == shards - 1 else (n + 1) * width
            self._add_shard(None, n * width, hi, now)

    # -- writes ------------------------------------------------------------------------------------------------

    def put_item(self, item: Item) -> str | None:
        """Create or replace an item (INSERT or MODIFY); returns the record's sequence number, None if unchanged."""
        key = self._key_of(item)
        new = dict(item)
        size = item_size(new)
        if size > MAX_ITEM_BYTES:
            raise ValueError(f"item size {size} has exceeded the maximum allowed size of {MAX_ITEM_BYTES}")
        with self._lock:
            self._maintain(self._sim.clock.now())
            self._check_enabled()
            old = self._items.get(key)
            if old == new:
                return None
            self._items[key] = new
            return self._append("MODIFY" if old is not None else "INSERT", key, new, old, None)

    def delete_item(self, key: Item, *, by_ttl: bool = False) -> str | None:
        """Delete an item (REMOVE); `by_ttl` marks it as TTL expiry. None if there was no such item."""
        key_tuple = self._key_of(key)
        with self._lock:
            self._maintain(self._sim.clock.now())
            self._check_enabled()
            old = self._items.pop(key_tuple, None)
            if old is None:
                return None
            return self._append("REMOVE", key_tuple, None, old, _TTL_IDENTITY if by_ttl else None)

    def write_synthetic(
        self,
        count: int,
        *,
        item_bytes: int = 1700,
        key_prefix: str = "item",
        first: int = 0,
        track_items: bool = True,
    ) -> int:
        """Write `count` changes of realistic size quickly, for benchmarks; returns how many records were added.

        Items are keyed `pk = f"{key_prefix}-{n:09d}"` (`sk = "v"` when the table has a sort key) for n from
        `first`, so they spread over the open shards by hash as real keys do; each carries a few small attributes
        and a text payload that brings it to about `item_bytes`. A key written before becomes a MODIFY with its old
        image. All records are added under one lock and serialized once, so the cost per record stays a few
        microseconds. `track_items=False` keeps no table state (to hold millions of records in less memory).
        """
        if item_bytes > MAX_ITEM_BYTES:
            raise ValueError(f"item_bytes is at most {MAX_ITEM_BYTES}")
        sort_key = next((name for name, kind in self.key_schema if kind == "RANGE"), None)
        payloads = [_payload(self._rng, max(1, item_bytes - 120)) for _ in range(8)]
        statuses = ("NEW", "PAID", "SHIPPED", "DELIVERED")
        # New keys take a pre-built JSON template (one string format per record instead of building and
        # serializing nested dicts); keys written before, or view types without a new image, take `_append`.
        template = self._synthetic_template(sort_key) if self._has_new_image() else None
        payload_json = [orjson.dumps(p).decode("utf-8") for p in payloads]
        written = 0
        with self._lock:
            now = self._sim.clock.now()
            self._maintain(now)
            self._check_enabled()
            stamp = datetime.fromtimestamp(now, UTC).isoformat()
            for n in range(first, first + count):
                pk = f"{key_prefix}-{n:09d}"
                partition = ("S", pk)
                key = (partition, ("S", "v")) if sort_key is not None else (partition,)
                status = statuses[n % 4]
                amount = f"{(n * 7919) % 100000}.{n % 100:02d}"
                payload = n % len(payloads)
                old = self._items.get(key) if track_items else None
                item: dict[str, Any] | None = None
                if track_items or old is not None or template is None:
                    item = {self.partition_key: {"S": pk}}
                    if sort_key is not None:
                        item[sort_key] = {"S": "v"}
                    item["status"] = {"S": status}
                    item["amount"] = {"N": amount}
                    item["updated_at"] = {"S": stamp}
                    item["version"] = {"N": str(n)}
                    item["payload"] = {"S": payloads[payload]}
                    if track_items:
                        self._items[key] = item
                if old is not None or template is None:
                    assert item is not None
                    self._append("MODIFY" if old is not None else "INSERT", key, item, old, None, now=now)
                else:
                    shard, sequence = self._next_record(partition)
                    key_size = len(self.partition_key) + len(pk) + (len(sort_key) + 1 if sort_key else 0)
                    new_size = (
                        key_size
                        + 6 + len(status)
                        + 6 + _number_size(amount)
                        + 10 + len(stamp)
                        + 7 + _number_size(str(n))
                        + 7 + len(payloads[payload])
                    )  # fmt: skip
                    body = template % {
                        "time": int(now),
                        "pk": orjson.dumps(pk).decode("utf-8"),
                        "status": status,
                        "amount": amount,
                        "stamp": stamp,
                        "version": n,
                        "payload": payload_json[payload],
                        "sequence": sequence,
                        "size": key_size + new_size,
                        "event_id": self._rng.getrandbits(128),
                    }
                    self._store(shard, sequence, now, body.encode("utf-8"))
                written += 1
        return written

    def _has_new_image(self) -> bool:
        return self.view_type in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES")

    def _synthetic_template(self, sort_key: str | None) -> str:
        """The wire JSON of an INSERT of a synthetic item, as a %-template of what varies per record."""

        def literal(value: str) -> str:
            return orjson.dumps(value).decode("utf-8").replace("%", "%%")

        keys = literal(self.partition_key) + ':{"S":%(pk)s}'
        if sort_key is not None:
            keys += "," + literal(sort_key) + ':{"S":"v"}'
        image = (
            keys + ',"status":{"S":"%(status)s"},"amount":{"N":"%(amount)s"},"updated_at":{"S":"%(stamp)s"}'
            ',"version":{"N":"%(version)d"},"payload":{"S":%(payload)s}'
        )
        return (
            '{"awsRegion":' + literal(self.region) + ',"dynamodb":{"ApproximateCreationDateTime":%(time)d,'
            '"Keys":{' + keys + '},"NewImage":{' + image + '},"SequenceNumber":"%(sequence)d",'
            '"SizeBytes":%(size)d,"StreamViewType":"' + self.view_type + '"},"eventID":"%(event_id)032x",'
            '"eventName":"INSERT","eventSource":"aws:dynamodb","eventVersion":"1.1"}'
        )

    def _key_of(self, item: Item) -> tuple[tuple[str, Any], ...]:
        parts = []
        for name in self.key_names:
            if name not in item:
                raise ValueError(f"the item has no key attribute {name!r} (key schema: {', '.join(self.key_names)})")
            parts.append(_key_part(item[name], name))
        return tuple(parts)

    def _append(
        self,
        event_name: str,
        key: tuple[tuple[str, Any], ...],
        new: dict[str, Any] | None,
        old: dict[str, Any] | None,
        identity: dict[str, str] | None,
        now: float | None = None,
    ) -> str:
        if now is None:
            now = self._sim.clock.now()
        shard, sequence = self._next_record(key[0])
        image = new if new is not None else old
        assert image is not None
        keys = {name: image[name] for name in self.key_names}
        body: dict[str, Any] = {
            "ApproximateCreationDateTime": int(now),
            "Keys": keys,
            "SequenceNumber": str(sequence),
            "StreamViewType": self.view_type,
        }
        size = item_size(keys)
        if new is not None and self._has_new_image():
            body["NewImage"] = new
            size += item_size(new)
        if old is not None and self.view_type in ("OLD_IMAGE", "NEW_AND_OLD_IMAGES"):
            body["OldImage"] = old
            size += item_size(old)
        body["SizeBytes"] = size
        record: dict[str, Any] = {
            "awsRegion": self.region,
            "dynamodb": body,
            "eventID": f"{self._rng.getrandbits(128):032x}",
            "eventName": event_name,
            "eventSource": "aws:dynamodb",
            "eventVersion": "1.1",
        }
        if identity is not None:
            record["userIdentity"] = identity
        return self._store(shard, sequence, now, orjson.dumps(record, default=_wire_default))

    def _next_record(self, partition: tuple[str, Any]) -> tuple[_Shard, int]:
        """The open shard owning this partition key, and the next sequence number."""
        shard = self._open[bisect.bisect_right(self._open_lows, _key_hash(partition)) - 1]
        self._seq += 1 + self._rng.getrandbits(6)
        return shard, self._seq

    def _store(self, shard: _Shard, sequence: int, now: float, body: bytes) -> str:
        if not shard.seqs:
            self._due = min(self._due, now + self._sim.retention_seconds)
        shard.seqs.append(sequence)
        shard.times.append(now)
        shard.records.append(body)
        shard.appended += 1
        shard.last_seq = sequence
        self.records_written += 1
        if self._auto_split_records is not None and shard.appended >= self._auto_split_records:
            self._close(shard, split=True, at=now)
        return str(sequence)

    # -- shards ------------------------------------------------------------------------------------------------

    def split_shard(self, shard_id: str | None = None) -> tuple[str, str]:
        """Close an open shard (the oldest when not named) and open two children, each owning half its keys."""
        with self._lock:
            now = self._sim.clock.now()
            self._maintain(now)
            self._check_enabled()
            low, high = self._close(self._open_shard(shard_id), split=True, at=now)
            return low.shard_id, high.shard_id

    def roll_over_shard(self, shard_id: str | None = None) -> str:
        """Close an open shard (the oldest when not named) and open one child owning all its keys."""
        with self._lock:
            now = self._sim.clock.now()
            self._maintain(now)
            self._check_enabled()
            (child,) = self._close(self._open_shard(shard_id), split=False, at=now)
            return child.shard_id

    def roll_over_all(self) -> list[str]:
        """Roll every open shard over at once, as the service's periodic roll-over does; returns the children."""
        with self._lock:
            now = self._sim.clock.now()
            self._maintain(now)
            self._check_enabled()
            return [self._close(s, split=False, at=now)[0].shard_id for s in list(self._open)]

    def disable(self) -> None:
        """Disable the stream, as UpdateTable with StreamEnabled false does.

        Every open shard closes where it is (an EndingSequenceNumber; the page with its last record carries no
        NextShardIterator), DescribeStream says DISABLED and writes are refused from now on. Records stay
        readable until the retention trims them, as on AWS. The table's next stream, with a new ARN, comes from
        `StreamSimulator.create_stream`. A second `disable()` is refused: it would mean the test lost track of
        which of the table's streams it holds.
        """
        with self._lock:
            now = self._sim.clock.now()
            self._maintain(now)  # roll-overs due before now happen first, as they would have
            if self._disabled_at is not None:
                raise ValueError(f"stream {self.arn} is disabled already")
            for shard in list(self._open):
                self._end(shard, now)
            self._disabled_at = now

    @property
    def enabled(self) -> bool:
        """False once `disable()` was called."""
        with self._lock:
            return self._disabled_at is None

    def shards(self) -> list[ShardState]:
        """Every shard still listed (closed ones age out after the retention), oldest first."""
        with self._lock:
            self._maintain(self._sim.clock.now())
            return [s.state() for s in self._shards.values()]

    def open_shard_ids(self) -> list[str]:
        with self._lock:
            self._maintain(self._sim.clock.now())
            return [s.shard_id for s in sorted(self._open, key=lambda s: s.shard_id)]

    def shard_for(self, key: Item) -> str:
        """The open shard a write of this key would go to now."""
        part = self._key_of(key)[0]
        with self._lock:
            self._maintain(self._sim.clock.now())
            self._check_enabled()
            return self._open[bisect.bisect_right(self._open_lows, _key_hash(part)) - 1].shard_id

    def records(self, shard_id: str | None = None) -> list[dict[str, Any]]:
        """Records still kept, as wire JSON (one shard, or all in shard order): the ground truth for a test."""
        with self._lock:
            self._maintain(self._sim.clock.now())
            shards = [self._shard(shard_id)] if shard_id is not None else list(self._shards.values())
            return [orjson.loads(body) for s in shards for body in s.records]

    def items(self) -> list[dict[str, Any]]:
        """The table as it is now (DynamoDB JSON), in key order: what a replica should equal."""
        with self._lock:
            return [dict(self._items[k]) for k in sorted(self._items, key=repr)]

    def get_item(self, key: Item) -> dict[str, Any] | None:
        key_tuple = self._key_of(key)
        with self._lock:
            found = self._items.get(key_tuple)
            return None if found is None else dict(found)

    def _check_enabled(self) -> None:
        if self._disabled_at is not None:
            raise StreamDisabledError(
                f"stream {self.arn} is disabled: changes to table {self.table_name!r} no longer reach it "
                f"(StreamSimulator.create_stream({self.table_name!r}) enables the table's next stream)"
            )

    def _open_shard(self, shard_id: str | None) -> _Shard:
        if shard_id is None:
            return min(self._open, key=lambda s: s.shard_id)
        shard = self._shard(shard_id)
        if shard.closed:
            raise ValueError(f"shard {shard_id} is closed")
        return shard

    def _shard(self, shard_id: str) -> _Shard:
        try:
            return self._shards[shard_id]
        except KeyError:
            raise KeyError(f"no shard {shard_id} in {self.arn}") from None

    def _next_shard_id(self, at: float) -> str:
        # Creation time in ms, kept strictly increasing so that ids sort in creation order, as DescribeStream lists.
        self._last_shard_ms = max(self._last_shard_ms + 1, int(at * 1000))
        return f"shardId-{self._last_shard_ms:020d}-{self._rng.getrandbits(32):08x}"

    def _add_shard(self, parent: _Shard | None, lo: int, hi: int, at: float) -> _Shard:
        self._seq += 1 + self._rng.getrandbits(6)
        shard = _Shard(self._next_shard_id(at), None if parent is None else parent.shard_id, self._seq, lo, hi, at)
        self._shards[shard.shard_id] = shard
        index = bisect.bisect_left(self._open_lows, lo)
        self._open.insert(index, shard)
        self._open_lows.insert(index, lo)
        if self._sim.rollover_seconds is not None:
            self._due = min(self._due, at + self._sim.rollover_seconds)
        return shard

    def _close(self, shard: _Shard, *, split: bool, at: float) -> list[_Shard]:
        """Close an open shard and open its children: one (a roll-over) or two (a split)."""
        if split and shard.hash_hi - shard.hash_lo < 2:
            raise ValueError(f"shard {shard.shard_id} owns too few keys to split")
        self._end(shard, at)
        if not split:
            return [self._add_shard(shard, shard.hash_lo, shard.hash_hi, at)]
        middle = (shard.hash_lo + shard.hash_hi) // 2
        return [self._add_shard(shard, shard.hash_lo, middle, at), self._add_shard(shard, middle, shard.hash_hi, at)]

    def _end(self, shard: _Shard, at: float) -> None:
        """Close an open shard, with no child (a disabled stream's shards end so)."""
        self._seq += 1 + self._rng.getrandbits(6)
        shard.end_seq = self._seq
        shard.closed_at = at
        index = self._open.index(shard)
        del self._open[index]
        del self._open_lows[index]
        self._due = min(self._due, at + self._sim.retention_seconds)

    def _maintain(self, now: float) -> None:
        """Apply what time does: roll-overs that fell due, trimming, and removal of aged-out closed shards.

        Runs lazily, before every read and write, and only when something fell due; `_due` keeps the earliest time
        anything will, so the usual cost is one comparison."""
        if now < self._due:
            return
        sim = self._sim
        rollover = sim.rollover_seconds
        if rollover is not None:
            for shard in list(self._open):
                current = shard
                while current.created_at + rollover <= now:
                    current = self._close(current, split=False, at=current.created_at + rollover)[0]
        cutoff = now - sim.retention_seconds
        for shard in list(self._shards.values()):
            if shard.times and shard.times[0] <= cutoff:
                gone = bisect.bisect_right(shard.times, cutoff)
                shard.trimmed_through = shard.seqs[gone - 1]
                shard.trimmed += gone
                del shard.seqs[:gone], shard.times[:gone], shard.records[:gone]
            if shard.closed_at is not None and shard.closed_at <= cutoff:
                del self._shards[shard.shard_id]
        due = math.inf
        for shard in self._shards.values():
            if shard.times:
                due = min(due, shard.times[0] + sim.retention_seconds)
            if shard.closed_at is not None:
                due = min(due, shard.closed_at + sim.retention_seconds)
            elif rollover is not None:
                due = min(due, shard.created_at + rollover)
        self._due = due

    # -- the API -----------------------------------------------------------------------------------------------

    def _describe(self, request: Mapping[str, Any]) -> dict[str, Any]:
        limit = _limit(request, MAX_SHARDS_PER_PAGE)
        listed: Iterable[_Shard] = self._shards.values()
        shard_filter = request.get("ShardFilter")
        if shard_filter is not None:
            if shard_filter.get("Type") != "CHILD_SHARDS" or not shard_filter.get("ShardId"):
                raise _validation("ShardFilter needs Type CHILD_SHARDS and a ShardId")
            parent = shard_filter["ShardId"]
            listed = [s for s in listed if s.parent_id == parent]
        start = request.get("ExclusiveStartShardId")
        if start is not None:
            listed = [s for s in listed if s.shard_id > start]
        page = list(itertools.islice(listed, limit))
        description: dict[str, Any] = {
            "StreamArn": self.arn,
            "StreamLabel": self.label,
            "StreamStatus": "ENABLED" if self._disabled_at is None else "DISABLED",
            "StreamViewType": self.view_type,
            "CreationRequestDateTime": self.created_at,
            "TableName": self.table_name,
            "KeySchema": [{"AttributeName": n, "KeyType": k} for n, k in self.key_schema],
            "Shards": [s.describe() for s in page],
        }
        if len(page) == limit:
            # Like the service: a full page names where it stopped even when nothing follows.
            description["LastEvaluatedShardId"] = page[-1].shard_id
        return {"StreamDescription": description}

    def _describe_table(self) -> dict[str, Any]:
        """DescribeTable's answer for the table while this is its newest stream: what a consumer resolves from."""
        table: dict[str, Any] = {
            "TableName": self.table_name,
            "TableArn": self.table_arn,
            "TableId": str(uuid.uuid5(uuid.NAMESPACE_URL, self.table_arn)),
            "TableStatus": "ACTIVE",
            "CreationDateTime": self.table_created_at,
            "KeySchema": [{"AttributeName": n, "KeyType": k} for n, k in self.key_schema],
            # The model keeps no attribute types (keys may be S, N or B); S stands for each.
            "AttributeDefinitions": [{"AttributeName": n, "AttributeType": "S"} for n, _ in self.key_schema],
            "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
            "ProvisionedThroughput": {"NumberOfDecreasesToday": 0, "ReadCapacityUnits": 0, "WriteCapacityUnits": 0},
            # Disabled: the service says only StreamEnabled false, and goes on naming the stream it had.
            "StreamSpecification": (
                {"StreamEnabled": True, "StreamViewType": self.view_type}
                if self._disabled_at is None
                else {"StreamEnabled": False}
            ),
            "LatestStreamArn": self.arn,
            "LatestStreamLabel": self.label,
        }
        return {"Table": table}

    def _shard_iterator(self, request: Mapping[str, Any], now: float) -> tuple[str, _Shard]:
        shard = self._shards.get(request["ShardId"])
        if shard is None:
            raise _not_found(f"Requested resource not found: Shard does not exist: {request['ShardId']}")
        kind = request["ShardIteratorType"]
        floor = shard.trimmed_through if shard.trimmed_through is not None else shard.start_seq
        if kind == "TRIM_HORIZON":
            after = floor
        elif kind == "LATEST":
            after = shard.end_seq if shard.end_seq is not None else self._seq
        elif kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            text = request.get("SequenceNumber")
            if not isinstance(text, str) or not text.isdigit():
                raise _validation(f"SequenceNumber is required with {kind} and must be a decimal string")
            number = int(text)
            after = number - 1 if kind == "AT_SEQUENCE_NUMBER" else number
            # Outside the shard's range, or not given to any record yet.
            if number < shard.start_seq or number > (shard.end_seq if shard.end_seq is not None else self._seq):
                raise _validation(f"Invalid SequenceNumber {text} for shard {shard.shard_id}")
            if after < floor and shard.trimmed_through is not None:
                raise _trimmed()
        elif kind == "AT_TIMESTAMP":
            stamp = request.get("Timestamp")
            if not isinstance(stamp, int | float):
                raise _validation("Timestamp is required with AT_TIMESTAMP")
            if stamp > now:
                raise _validation("Timestamp is in the future")
            index = bisect.bisect_left(shard.times, float(stamp))
            after = shard.seqs[index - 1] if index > 0 else floor
        else:
            raise _validation(f"Invalid ShardIteratorType {kind!r}")
        return self._sim._encode_iterator(_Iterator(self.arn, shard.shard_id, after, int(now * 1000))), shard

    def _get_records(self, iterator: _Iterator, limit: int, now: float, empty: bool) -> tuple[bytes, ServedCall]:
        shard = self._shards.get(iterator.shard_id)
        if shard is None:
            raise _not_found("Invalid ShardId in ShardIterator")
        if now * 1000 - iterator.issued_at_ms >= self._sim.iterator_ttl_seconds * 1000:
            raise _expired()
        if shard.trimmed_through is not None and iterator.after < shard.trimmed_through:
            raise _trimmed()
        self._sim._check_read_rate(shard)
        start = bisect.bisect_right(shard.seqs, iterator.after)
        end = start
        if not empty:
            stop = min(len(shard.seqs), start + limit)
            budget = MAX_PAGE_BYTES - _PAGE_ENVELOPE_BYTES
            while end < stop and (end == start or len(shard.records[end]) + 1 <= budget):
                budget -= len(shard.records[end]) + 1
                end += 1
        after = shard.seqs[end - 1] if end > start else iterator.after
        at_end = shard.closed and not empty and end == len(shard.seqs)
        parts = [b'{"Records":[', b",".join(shard.records[start:end]), b"]"]
        if not at_end:
            token = self._sim._encode_iterator(_Iterator(self.arn, shard.shard_id, after, int(now * 1000)))
            parts.append(b',"NextShardIterator":' + orjson.dumps(token))
        parts.append(b"}")
        body = b"".join(parts)
        served = ServedCall(
            "GetRecords",
            200,
            stream_arn=self.arn,
            shard_id=shard.shard_id,
            sequence_number=str(after) if end > start else None,
            records=end - start,
            body_bytes=len(body),
            end_of_shard=at_end,
        )
        return body, served


def _payload(rng: random.Random, length: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    return "".join(rng.choice(alphabet) for _ in range(length))


def _parse_request(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        request = None
    if not isinstance(request, dict):
        raise StreamServiceError("SerializationException", "Start of structure or map found where not expected.")
    return request


def _limit(request: Mapping[str, Any], maximum: int) -> int:
    limit = request.get("Limit", maximum)
    if not isinstance(limit, int) or limit < 1 or limit > maximum:
        raise _validation(
            f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy constraint: "
            f"Member must have value less than or equal to {maximum}"
        )
    return limit


_SESSION_LOCK = threading.Lock()
_session: Any = None


def _target_and_body(request: Any) -> tuple[str, bytes]:
    """A botocore request's X-Amz-Target and body, as the bytes that would be sent."""
    target = request.headers.get("X-Amz-Target", "")
    if isinstance(target, bytes):
        target = target.decode("ascii")
    body = request.body
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8")
    elif not isinstance(body, bytes):
        body = body.read()
    return str(target), body


def _aws_response(request: Any, response: WireResponse) -> Any:
    """A botocore AWSResponse holding the answer, as if it had come back over the network."""
    from botocore.awsrequest import AWSResponse

    return AWSResponse(request.url, response.status, response.headers, _RawBody(response.body))


class _RawBody:
    """The `raw` of a botocore AWSResponse: something with `stream()`."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_kwargs: Any) -> Iterator[bytes]:
        yield self._body


class StreamSimulator:
    """The DynamoDB Streams service for any number of simulated streams, with one clock and one fault schedule.

    `iterator_ttl_seconds`, `retention_seconds` and `rollover_seconds` default to AWS's (15 minutes, 24 hours, about
    four hours; None never rolls over). `get_records_per_shard_per_second` throttles GetRecords on a shard beyond
    that rate (LimitExceededException), measured in real time. `faults` may be replaced at any time.
    """

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        account_id: str = "123456789012",
        clock: Clock | None = None,
        iterator_ttl_seconds: float = ITERATOR_TTL_SECONDS,
        retention_seconds: float = RETENTION_SECONDS,
        rollover_seconds: float | None = ROLLOVER_SECONDS,
        get_records_per_shard_per_second: float | None = None,
        faults: FaultSchedule | None = None,
        call_log_size: int = 100_000,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.clock: Clock = clock if clock is not None else WallClock()
        self.iterator_ttl_seconds = iterator_ttl_seconds
        self.retention_seconds = retention_seconds
        self.rollover_seconds = rollover_seconds
        self.get_records_per_shard_per_second = get_records_per_shard_per_second
        self.faults = faults or FaultSchedule()
        self._lock = threading.RLock()
        self._streams: dict[str, SimulatedStream] = {}
        self._latest: dict[str, SimulatedStream] = {}  # by table name: the table's newest stream
        self._secret = uuid.uuid4().bytes
        self._fault_calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._forced: dict[str, collections.deque[FaultKind]] = collections.defaultdict(collections.deque)
        self._calls: collections.deque[ServedCall] = collections.deque(maxlen=call_log_size)
        self._listeners: list[Callable[[ServedCall], None]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        """Calls by operation ("GetRecords") and by operation and error ("GetRecords:ExpiredIteratorException")."""

    # -- setting up --------------------------------------------------------------------------------------------

    def create_stream(
        self,
        table_name: str,
        *,
        key_schema: Sequence[tuple[str, Literal["HASH", "RANGE"]]] | None = None,
        view_type: StreamViewType = "NEW_AND_OLD_IMAGES",
        shards: int = 1,
        auto_split_records: int | None = None,
        first_sequence_number: int = FIRST_SEQUENCE_NUMBER,
        seed: int = 0,
    ) -> SimulatedStream:
        """A table with a stream of `shards` open shards. `auto_split_records` splits a shard once it has had that
        many records (as heavy writes make the service split); `seed` fixes ids and sequence-number steps.

        For a table whose stream was disabled this enables the table's next stream, as UpdateTable does: a new
        ARN (its label at least a millisecond after the last one's, even if the clock did not move), the table's
        items and key schema carried on (`key_schema` defaults to it, and may not differ), the old stream left
        readable. A table has one enabled stream at a time, so while its newest one is enabled this is refused.
        `key_schema` defaults to ("pk" HASH, "sk" RANGE) for a new table."""
        with self._lock:
            previous = self._latest.get(table_name)
            if previous is not None and previous.enabled:
                raise ValueError(
                    f"table {table_name!r} has an enabled stream {previous.arn}; disable() it first "
                    "(a table has one stream at a time)"
                )
            if key_schema is None:
                key_schema = previous.key_schema if previous is not None else (("pk", "HASH"), ("sk", "RANGE"))
            stream = SimulatedStream(
                self,
                table_name,
                key_schema=key_schema,
                view_type=view_type,
                shards=shards,
                auto_split_records=auto_split_records,
                first_sequence_number=first_sequence_number,
                seed=seed,
                previous=previous,
            )
            if stream.arn in self._streams:
                raise ValueError(f"a stream {stream.arn} exists already")
            self._streams[stream.arn] = stream
            self._latest[table_name] = stream
            return stream

    def stream(self, stream_arn: str) -> SimulatedStream:
        with self._lock:
            return self._streams[stream_arn]

    def latest_stream(self, table_name: str) -> SimulatedStream | None:
        """The table's newest stream (enabled or disabled), the one DescribeTable names; None for a table never
        made here."""
        with self._lock:
            return self._latest.get(table_name)

    def fail_next(self, operation: str, fault: FaultKind, times: int = 1) -> None:
        """Answer the next `times` calls of `operation` with `fault`, whatever they address (before the schedule)."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        with self._lock:
            self._forced[operation].extend([fault] * times)

    def clear_faults(self, operation: str | None = None) -> None:
        """Forget the faults `fail_next` queued (for `operation`, or all): the outage is over."""
        with self._lock:
            if operation is None:
                self._forced.clear()
            else:
                self._forced.pop(operation, None)

    def on_call(self, listener: Callable[[ServedCall], None]) -> Callable[[], None]:
        """Call `listener` after every answered request, outside the simulator's lock (so it may write, split or
        move the clock); returns a function that removes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                self._listeners.remove(listener)

        return remove

    def calls(self, operation: str | None = None) -> list[ServedCall]:
        """Answered requests, oldest first (the last `call_log_size`)."""
        with self._lock:
            return [c for c in self._calls if operation is None or c.operation == operation]

    # -- transports --------------------------------------------------------------------------------------------

    def attach(self, client: Any) -> None:
        """Answer this boto3 `dynamodbstreams` client's requests in-process: no socket, the same bytes."""
        client.meta.events.register(
            "before-send.dynamodb-streams.*", self._before_send, unique_id=f"stream-simulator-{id(self)}"
        )

    def detach(self, client: Any) -> None:
        client.meta.events.unregister("before-send.dynamodb-streams.*", unique_id=f"stream-simulator-{id(self)}")

    def attach_tables(self, client: Any) -> None:
        """Answer this boto3 `dynamodb` client's DescribeTable of the simulated tables in-process (`handle_dynamodb`);
        every other request goes out to the client's endpoint as before."""
        client.meta.events.register(
            "before-send.dynamodb.DescribeTable",
            self._before_send_table,
            unique_id=f"stream-simulator-tables-{id(self)}",
        )

    def detach_tables(self, client: Any) -> None:
        client.meta.events.unregister(
            "before-send.dynamodb.DescribeTable", unique_id=f"stream-simulator-tables-{id(self)}"
        )

    def client(self, *, config: Any = None) -> Any:
        """A new boto3 `dynamodbstreams` client answered by this simulator."""
        with _SESSION_LOCK:  # one session: its loader caches the service model that every new client reads
            global _session
            if _session is None:
                import boto3

                _session = boto3.session.Session()
            client = _session.client(
                "dynamodbstreams",
                region_name=self.region,
                # Never reached: every request is answered before it is sent. A refused local port, not AWS, in case.
                endpoint_url="http://127.0.0.1:1",
                aws_access_key_id="simulated",
                aws_secret_access_key="simulated",
                config=config,
            )
            self.attach(client)
            return client

    def _before_send(self, request: Any, **_kwargs: Any) -> Any:
        target, body = _target_and_body(request)
        agent = request.headers.get("User-Agent")
        client = agent.decode() if isinstance(agent, bytes) else agent
        return _aws_response(request, self.handle(target.removeprefix(STREAMS_TARGET_PREFIX), body, client))

    def _before_send_table(self, request: Any, **_kwargs: Any) -> Any:
        target, body = _target_and_body(request)
        if not target.startswith(DYNAMODB_TARGET_PREFIX):
            return None
        response = self.handle_dynamodb(target.removeprefix(DYNAMODB_TARGET_PREFIX), body)
        return None if response is None else _aws_response(request, response)  # None: botocore sends it

    # -- the wire ----------------------------------------------------------------------------------------------

    def handle(self, operation: str, body: bytes, client: str | None = None) -> WireResponse:
        """Answer one request: `operation` is the X-Amz-Target's part after the dot, `body` the JSON sent,
        `client` the caller's User-Agent (kept in the call log)."""
        served: ServedCall
        try:
            request = _parse_request(body)
            with self._lock:
                payload, served = self._dispatch(operation, request)
            response = self._respond(200, payload)
        except _CallFailed as injected:
            served = injected.served
            response = self._error(injected.error)
        except StreamServiceError as error:
            served = ServedCall(operation, error.status, error.code)
            response = self._error(error)
        self._served(dataclasses.replace(served, client=client, at=time.monotonic()), response)
        return response

    def handle_dynamodb(self, operation: str, body: bytes) -> WireResponse | None:
        """Answer a DynamoDB request (not Streams) if it is about a simulated table, else None.

        Only DescribeTable of a table with a simulated stream (`TableName` its name or its ARN) is answered, from
        its newest stream. Anything else (another operation, another table, a body it cannot read) is None, to go
        on to the real backend, which answers it and its errors, ResourceNotFoundException included: a simulated
        table exists, so the simulator has no DynamoDB error of its own to give.
        """
        if operation != "DescribeTable":
            return None
        try:
            request = _parse_request(body)
        except StreamServiceError:
            return None
        with self._lock:
            stream = self._latest.get(self._table_named(request.get("TableName")))
            if stream is None:
                return None
            payload = orjson.dumps(stream._describe_table())
        response = self._respond(200, payload)
        self._served(ServedCall(operation, 200, stream_arn=stream.arn), response)
        return response

    def _table_named(self, name: Any) -> str:
        """The table name a DescribeTable's TableName means (it may be the table's ARN); "" for none of ours."""
        if not isinstance(name, str):
            return ""
        prefix = f"arn:aws:dynamodb:{self.region}:{self.account_id}:table/"
        if name.startswith("arn:"):
            return name.removeprefix(prefix) if name.startswith(prefix) else ""
        return name

    def _served(self, served: ServedCall, response: WireResponse) -> None:
        """Log an answered call, count it and tell the listeners."""
        with self._lock:
            served = _with_status(served, response.status, len(response.body))
            self._calls.append(served)
            self.counts[served.operation] += 1
            if served.error_code is not None:
                self.counts[f"{served.operation}:{served.error_code}"] += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener(served)

    def _dispatch(self, operation: str, request: dict[str, Any]) -> tuple[bytes, ServedCall]:
        now = self.clock.now()
        if operation == "ListStreams":
            self._inject(operation, "", ServedCall(operation, 0))
            return orjson.dumps(self._list_streams(request)), ServedCall(operation, 200)
        if operation == "DescribeStream":
            stream = self._stream_for(request.get("StreamArn"), now)
            self._inject(operation, stream.arn, ServedCall(operation, 0, stream_arn=stream.arn))
            return orjson.dumps(stream._describe(request)), ServedCall(operation, 200, stream_arn=stream.arn)
        if operation == "GetShardIterator":
            stream = self._stream_for(request.get("StreamArn"), now)
            for name in ("ShardId", "ShardIteratorType"):
                if not request.get(name):
                    raise _validation(f"{name} is required")
            served = ServedCall(
                operation,
                0,
                stream_arn=stream.arn,
                shard_id=request["ShardId"],
                iterator_type=request["ShardIteratorType"],
                sequence_number=request.get("SequenceNumber"),
            )
            self._inject(operation, request["ShardId"], served)
            try:
                token, _shard = stream._shard_iterator(request, now)
            except StreamServiceError as error:
                raise _CallFailed(error, served, injected=False) from None
            return orjson.dumps({"ShardIterator": token}), served
        if operation == "GetRecords":
            iterator = self._decode_iterator(request.get("ShardIterator"))
            stream = self._stream_for(iterator.stream_arn, now)
            limit = _limit(request, MAX_RECORDS_PER_PAGE)
            served = ServedCall(operation, 0, stream_arn=stream.arn, shard_id=iterator.shard_id)
            fault = self._inject(operation, iterator.shard_id, served)
            try:
                return stream._get_records(iterator, limit, now, empty=fault == "EmptyPage")
            except StreamServiceError as error:
                raise _CallFailed(error, served, injected=False) from None
        raise StreamServiceError("UnknownOperationException", f"Unknown operation {operation!r}")

    def _inject(self, operation: str, subject: str, served: ServedCall) -> FaultKind | None:
        """Raise the fault forced or scheduled for this call, if any; an EmptyPage fault is returned instead."""
        forced = self._forced.get(operation)
        if forced:
            fault: FaultKind | None = forced.popleft()
        else:
            number = self._fault_calls[(operation, subject)]
            self._fault_calls[(operation, subject)] = number + 1
            fault = self.faults.fault_for(operation, subject, number)
        if fault is None or fault == "EmptyPage":
            return fault
        error = {
            "LimitExceededException": lambda: _throttled(subject if subject.startswith("shardId-") else ""),
            "InternalServerError": _internal_error,
            "ExpiredIteratorException": _expired,
        }[fault]()
        raise _CallFailed(error, served, injected=True)

    def _stream_for(self, arn: Any, now: float) -> SimulatedStream:
        if not isinstance(arn, str) or not arn:
            raise _validation("StreamArn is required")
        stream = self._streams.get(arn)
        if stream is None:
            raise _not_found(f"Requested resource not found: Stream: {arn} not found")
        stream._maintain(now)
        return stream

    def _list_streams(self, request: Mapping[str, Any]) -> dict[str, Any]:
        limit = _limit(request, MAX_STREAMS_PER_PAGE)
        table = request.get("TableName")
        start = request.get("ExclusiveStartStreamArn")
        listed = [
            s
            for arn, s in sorted(self._streams.items())
            if (table is None or s.table_name == table) and (start is None or arn > start)
        ]
        page = listed[:limit]
        answer: dict[str, Any] = {
            "Streams": [{"StreamArn": s.arn, "TableName": s.table_name, "StreamLabel": s.label} for s in page]
        }
        if len(listed) > limit:
            answer["LastEvaluatedStreamArn"] = page[-1].arn
        return answer

    def _check_read_rate(self, shard: _Shard) -> None:
        rate = self.get_records_per_shard_per_second
        if rate is None:
            return
        now = time.monotonic()
        while shard.read_times and shard.read_times[0] <= now - 1.0:
            shard.read_times.popleft()
        if len(shard.read_times) >= rate:
            raise _throttled(shard.shard_id)
        shard.read_times.append(now)

    # -- iterators: opaque, signed, stateless (any number may be outstanding) ---------------------------------

    def _encode_iterator(self, iterator: _Iterator) -> str:
        state = f"{iterator.shard_id}|{iterator.after}|{iterator.issued_at_ms}".encode()
        mac = hmac.new(self._secret, iterator.stream_arn.encode() + b"|" + state, hashlib.sha256).digest()[:12]
        return f"{iterator.stream_arn}|1|{base64.b64encode(mac + state).decode('ascii')}"

    def _decode_iterator(self, token: Any) -> _Iterator:
        invalid = _validation("Invalid ShardIterator")
        if not isinstance(token, str) or token.count("|") < 2:
            raise invalid
        arn, version, blob = token.rsplit("|", 2)
        try:
            raw = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise invalid from None
        mac, state = raw[:12], raw[12:]
        expected = hmac.new(self._secret, arn.encode() + b"|" + state, hashlib.sha256).digest()[:12]
        if version != "1" or not hmac.compare_digest(mac, expected):
            raise invalid
        shard_id, after, issued = state.decode().split("|")
        return _Iterator(arn, shard_id, int(after), int(issued))

    # -- answers -----------------------------------------------------------------------------------------------

    def _respond(self, status: int, body: bytes) -> WireResponse:
        headers = {
            "Content-Type": _CONTENT_TYPE,
            "Content-Length": str(len(body)),
            "x-amzn-RequestId": uuid.uuid4().hex.upper(),
            "x-amz-crc32": str(zlib.crc32(body)),
            "Date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(self.clock.now())),  # the service's clock
        }
        return WireResponse(status, headers, body)

    def _error(self, error: StreamServiceError) -> WireResponse:
        body = orjson.dumps({"__type": _ERROR_TYPE_PREFIX + error.code, "message": error.message})
        return self._respond(error.status, body)


class _CallFailed(Exception):
    """An error answer together with what the call addressed, for the call log."""

    def __init__(self, error: StreamServiceError, served: ServedCall, *, injected: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.served = ServedCall(
            served.operation,
            error.status,
            error.code,
            stream_arn=served.stream_arn,
            shard_id=served.shard_id,
            iterator_type=served.iterator_type,
            sequence_number=served.sequence_number,
            injected=injected,
        )


def _with_status(served: ServedCall, status: int, body_bytes: int) -> ServedCall:
    return dataclasses.replace(served, status=status, body_bytes=body_bytes)


__all__ = [
    "DYNAMODB_TARGET_PREFIX",
    "FIRST_SEQUENCE_NUMBER",
    "ITERATOR_TTL_SECONDS",
    "MAX_PAGE_BYTES",
    "RETENTION_SECONDS",
    "ROLLOVER_SECONDS",
    "STREAMS_TARGET_PREFIX",
    "Clock",
    "FaultSchedule",
    "ManualClock",
    "ServedCall",
    "ShardState",
    "SimulatedStream",
    "StreamDisabledError",
    "StreamServiceError",
    "StreamSimulator",
    "WallClock",
    "WireResponse",
    "attribute_size",
    "item_size",
]
