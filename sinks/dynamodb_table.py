"""A second DynamoDB table kept equal to the source: a replica, or a materialised view of it.

INSERT and MODIFY put the new image, REMOVE deletes the item. Every write is conditional on a sequence number
stored in the item, so that a change read twice, or late, never overwrites a newer one.

Sequence numbers
    Stream sequence numbers are decimal strings of 21 to 40 digits. An N attribute keeps 38 digits, so the
    sequence is stored as a string zero-padded to 40 characters (`sequence_attribute`, default
    `_streamsink_sequence`): for equal-length digit strings, DynamoDB's byte-wise string order is numeric order.
    The condition is `attribute_not_exists(seq) OR seq < :this`. When it fails, the item already holds this
    change or a newer one, so the record counts as taken, not failed. Replaying a change therefore does nothing.
    This relies on a key's later changes carrying larger sequence numbers. DynamoDB Streams shows a key's
    changes in the order they were made, and reads them from parent shards before children; that the numbers
    also keep growing across a shard split is what the service does in practice, not something moto can
    show. Numbers from different streams do not compare, so one replica must be fed from one source table, and a
    `transform` must map each source item to its own target item: several source items folded into one target
    item would compare sequence numbers of unrelated changes.

Deletes
    A delete removes the stored sequence along with the item. An older INSERT or MODIFY that arrives after
    the REMOVE then finds no sequence to compare with, and puts the item back. In this pipeline a replay
    cannot leave it that way. After a crash, reading starts again at the checkpoint and goes forward in stream
    order. So if a replay re-applies an INSERT, the REMOVE that followed it in the stream comes later in the
    same replay and deletes the item again: the table converges. Within one write, a key's changes are applied
    in sequence order, so a batch that holds both ends with the item deleted, whatever order it lists them
    in. When a key's change fails, its later changes in that write are held back (`NotAttemptedError`); the
    pipeline writes them again in order, so a REMOVE is never applied before the INSERT it
    follows. An older change fed to the sink on its own, outside stream order (the pipeline never does
    this), can bring back a deleted item until the REMOVE is applied again. Tombstones would close that gap,
    but they would leave items in the replica that the source does not have, so they are kept only while an
    initial load runs (below): its copies are exactly such older writes outside stream order.

Initial load
    SNAPSHOT records (items an initial load read) must never overwrite a stream change, in whatever order the
    two arrive, and never bring back an item the stream deleted after the load read it. While a load is under
    way (`begin_initial_load`), every stream write also stores the load's id (`load_attribute`), and a REMOVE
    leaves a tombstone (the key, the sequence, the load's id and `tombstone_attribute` = true) instead of
    deleting. A snapshot write is conditional on the item holding no change of this load:
    `attribute_not_exists(seq) OR attribute_not_exists(load) OR load <> :this load`, and stores the sequence
    `000...0`, below every stream change. So a stream change made after the load read an item wins whether it
    is applied before or after the snapshot write, a deleted item stays deleted, and an item a stream change
    wrote before the load began (or an earlier load) is overwritten by the copy, which is newer. Once every
    SNAPSHOT record is written and no write from the load's time can still be in flight, the pipeline calls
    `clean_up_initial_load`: one Scan of this table for the load's tombstones, each deleted on condition that it
    is still that tombstone. Until then readers of the table see tombstones as items holding only the key and
    those three attributes. A copy is applied only while its load is under way in this sink (between
    `begin_initial_load` and `end_initial_load` of that load): one arriving later comes from a worker that lost the
    load, and would undo changes. The copy overwrites what it reads; an item the target holds that the source does
    not is not removed, so a load goes into an empty target, or one only this pipeline wrote.

Writes
    BatchWriteItem cannot be conditional, so the choice was between one conditional PutItem/DeleteItem per
    change on a small thread pool and TransactWriteItems (up to 100 writes, all or nothing). This sink uses
    per-item writes; the pipeline's lanes write different keys at once, and each key's changes run one after
    another on one lane, in sequence order.
    Measured with `bench/replica_writes.py` (records/s, fresh table / same batches replayed) against a moto
    server in its own process, on a shared 2-vCPU VM (load average 3-5, so expect +-30% between runs):

                                                   600 changes, no added latency   400 changes, +10 ms per call
        naive put_item, sequential, unconditional            150 / 145                       50 / 53
        per-item conditional, 1 thread                       130 / 114                       48 / 45
        per-item conditional, 8 threads                      137 / 137                      148 / 121
        per-item conditional, 16 threads                         -                          154 / 137
        TransactWriteItems, up to 100 per call                43 / 24                        42 / 33

    The condition itself costs little (1 thread vs naive). With no latency the moto server's CPU is the limit
    and threads do not help; once each call waits for a round trip, as it does against AWS, 8 threads write
    three times as fast as one (16 barely more: moto is saturated again). Transactions are slowest here,
    but that is mostly moto: to be able to roll back, it deep-copies the whole table once per item of every
    TransactWriteItems call, so their rate falls as the table grows. With 100 changes (61 items) they were the
    fastest, at 163 records/s against 105 for naive and 135 for 8 threads: 8 calls instead of 100 do pay.
    On DynamoDB the rate of either would be bounded by the table's write capacity, and transactions
    lose on what matters for a replica:
    - every transactional write consumes two write units, so the same stream costs twice as much to replicate;
    - one oversized item, or two writes to the same key, fails the whole call with a ValidationException that
      does not say which item is at fault, so the sink would need bisection or pre-splitting to report per
      record;
    - one throttled or conflicting item cancels the other 99, and a replay cancels transactions on stale
      conditions, which adds round trips (33 calls instead of 19 on replay above);
    - a transaction competes with the application's own writes (TransactionConflictException).
    Per-item writes get each record's outcome directly, and their throughput grows with the lanes the pipeline
    runs for this sink (`max_concurrency`, `pipeline.delivery.lanes`: one key's changes always on one lane, in
    order) until the table's write capacity, or this process's CPU, is the limit.

Errors
    Throttling, 5xx responses and transport errors become a RetryableSinkError for the record. Validation
    errors (item over 400 KB, missing or mistyped key attribute, empty set) and transform failures become a
    PermanentSinkError for the record. Either way they are reported in `WriteResult.failed`; `_classified` is
    the one place where this mapping is done.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ParamValidationError,
    ReadTimeoutError,
)
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.aws import AwsClients
from pipeline.records import Batch, ChangeRecord
from pipeline.user_code import import_callable
from sinks.base import (
    DestinationUnusableError,
    NotAttemptedError,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkError,
    SinkSettings,
    WriteResult,
)

SEQUENCE_WIDTH = 40
"""Characters of the stored sequence: the longest DynamoDB Streams sequence number."""

NEWER_WINS_CONDITION = "attribute_not_exists(#seq) OR #seq < :seq"
"""Write only if the item is absent, carries no sequence, or holds an older change."""

SNAPSHOT_CONDITION = "attribute_not_exists(#seq) OR attribute_not_exists(#load) OR #load <> :load"
"""A load's copy of an item is written only if the item holds no change (nor tombstone) made during this load."""

SNAPSHOT_SEQUENCE = "0" * SEQUENCE_WIDTH
"""The sequence stored with a copied item: below every stream change, so any change of the item wins."""

ItemTransform = Callable[[ChangeRecord], Mapping[str, Any] | None]
"""A `transform`: the item to put for a change (plain Python values), or None to skip the change."""

_UNUSABLE_CODES = frozenset({"ResourceNotFoundException", "AccessDeniedException"})
"""The table is gone, or these credentials may not write to it: stopping loses nothing, while dead-lettering
would send the whole stream there and let the replica fall behind for good. (A policy that denies some items only,
`dynamodb:LeadingKeys`, stops the pipeline at the first denied item, naming it.)"""

_RETRYABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "TransactionConflictException",
        "InternalServerError",
        "ServiceUnavailable",
        "RequestTimeout",
    }
)
_TRANSPORT_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
    HTTPClientError,
)


_EXPECTED = "a function taking a ChangeRecord and returning a dict of attributes or None"


def resolve_item_transform(reference: str) -> ItemTransform:
    """Import a `transform` setting; a ValueError says what is wrong and how to fix it."""
    function: ItemTransform = import_callable(reference, expected=_EXPECTED)
    return function


class DynamoDbTableSinkSettings(SinkSettings):
    """`[[sinks]] type = "dynamodb_table"`: a replica or materialised view in another DynamoDB table.

    Without `rename` or `transform`, the stream's NewImage is written exactly as it arrived. The pipeline
    applies the settings every sink has first (`filter`, `record_transform`, then `project`, which keeps the
    listed attributes and the key and rewrites the stream record to match); then this sink runs `transform`,
    then `rename`.
    """

    type: Literal["dynamodb_table"]
    table_name: str = Field(min_length=3, max_length=1024, description="Existing table (name or ARN) to write to.")
    sequence_attribute: str = Field(
        default="_streamsink_sequence",
        min_length=1,
        max_length=255,
        description="Attribute holding the change's sequence number, zero-padded to 40 digits, in every item.",
    )
    load_attribute: str = Field(
        default="_streamsink_load",
        min_length=1,
        max_length=255,
        description="Attribute naming the initial load a write was made during (source.initial_load).",
    )
    tombstone_attribute: str = Field(
        default="_streamsink_deleted",
        min_length=1,
        max_length=255,
        description="Attribute marking a tombstone: an item deleted while an initial load ran, kept until the "
        "load is done so that the load's copy of it cannot bring it back.",
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="Attribute name in the source -> name in the target table. A key attribute may be renamed "
        "only to a name that is part of the target table's key.",
    )
    transform: str | None = Field(
        default=None,
        description="'package.module:function' called with each ChangeRecord; returns the item to put (plain "
        "Python values: str, Decimal, int, bytes, bool, None, list, dict, set) or None to skip the change. For "
        "a REMOVE, the key comes from the returned item, or from the record's keys when the item lacks it.",
    )

    @field_validator("transform")
    @classmethod
    def _importable(cls, path: str | None) -> str | None:
        if path is not None:
            try:
                resolve_item_transform(path)
            except ValueError as exc:
                raise PydanticCustomError("transform", "{reason}", {"reason": str(exc)}) from None
        return path

    @model_validator(mode="after")
    def _names_consistent(self) -> DynamoDbTableSinkSettings:
        targets = list(self.rename.values())
        clashing = sorted({name for name in targets if targets.count(name) > 1})
        if clashing:
            problem = f"rename: several attributes renamed to {clashing}; each new name must be distinct"
        elif any(not name for pair in self.rename.items() for name in pair):
            problem = "rename: attribute names must not be empty"
        elif self.sequence_attribute in self.rename or self.sequence_attribute in targets:
            problem = (
                f"rename: {self.sequence_attribute!r} is the sequence_attribute; choose another "
                "sequence_attribute or leave it out of rename"
            )
        elif len({self.sequence_attribute, self.load_attribute, self.tombstone_attribute}) < 3:
            problem = "sequence_attribute, load_attribute and tombstone_attribute must be three different names"
        else:
            return self
        raise PydanticCustomError("rename", "{reason}", {"reason": problem})


def padded_sequence(sequence_number: str) -> str:
    """The stored form of a sequence number: the same digits, zero-padded so that string order is numeric."""
    if not (sequence_number.isascii() and sequence_number.isdigit()) or len(sequence_number) > SEQUENCE_WIDTH:
        raise PermanentSinkError(
            f"sequence number {sequence_number!r} is not a decimal string of at most {SEQUENCE_WIDTH} digits"
        )
    return sequence_number.zfill(SEQUENCE_WIDTH)


@dataclass(frozen=True, slots=True)
class _Write:
    """One conditional request: a put of `attributes` as the item, or a delete of `attributes` as the key."""

    record: ChangeRecord
    kind: Literal["put", "delete", "snapshot"]
    attributes: Mapping[str, Any]
    key: tuple[tuple[str, Any], ...]
    sequence: str


class DynamoDbTableSink(Sink):
    default_concurrency = 32
    """A conditional write is one item a call: 32 in flight write about 1,600 items a second at a 20 ms round trip."""

    def __init__(
        self,
        settings: DynamoDbTableSinkSettings,
        *,
        region: str,
        endpoint_url: str | None,
        client: Any = None,
    ) -> None:
        super().__init__(settings.name or settings.type)
        self._settings = settings
        self._region = region
        self._endpoint_url = endpoint_url
        self._client = client
        self._transform = None if settings.transform is None else resolve_item_transform(settings.transform)
        self._serializer = TypeSerializer()
        self._key_names: tuple[str, ...] = ()
        self._key_description = ""
        self._opened = False
        self._loading: str | None = None
        """The initial load under way: stream writes carry its id, and deletes leave tombstones."""

    @property
    def key_names(self) -> tuple[str, ...]:
        """The target table's key attributes (hash first), as read by `open()`."""
        return self._key_names

    def open(self) -> None:
        settings = self._settings
        if self._client is None:
            self._client = AwsClients(self._region, self._endpoint_url, max_pool_connections=256).client("dynamodb")
        try:
            table = self._client.describe_table(TableName=settings.table_name)["Table"]
        except (ClientError, BotoCoreError) as exc:
            error = _classified(f"table {settings.table_name!r}", exc)
            if isinstance(exc, ClientError) and _code(exc) == "ResourceNotFoundException":
                error = PermanentSinkError(
                    f"table {settings.table_name!r} does not exist in {self._region} (endpoint "
                    f"{self._endpoint_url or 'AWS'}); create it with the key the replica should have"
                )
            raise error or PermanentSinkError(f"table {settings.table_name!r}: {type(exc).__name__}") from exc
        schema = sorted(table["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
        self._key_names = tuple(k["AttributeName"] for k in schema)
        self._key_description = ", ".join(f"{k['AttributeName']} {k['KeyType']}" for k in schema)
        if settings.sequence_attribute in self._key_names:
            raise PermanentSinkError(
                f"sequence_attribute {settings.sequence_attribute!r} is part of table {settings.table_name!r}'s "
                f"key ({self._key_description}); choose another name"
            )
        renamed_to = set(settings.rename.values())
        for old, new in settings.rename.items():
            if old in self._key_names and new not in self._key_names and old not in renamed_to:
                raise PermanentSinkError(
                    f"rename {old!r} -> {new!r} would remove key attribute {old!r} of table "
                    f"{settings.table_name!r} ({self._key_description}); a key attribute may only be renamed "
                    "to a name in the table's key"
                )
        self._opened = True

    def begin_initial_load(self, load_id: str) -> None:
        self._loading = load_id

    def end_initial_load(self, load_id: str) -> None:
        if self._loading == load_id:
            self._loading = None

    def clean_up_initial_load(self, load_id: str) -> int:
        """Delete the load's tombstones: each only if it is still that tombstone (a later change replaced it)."""
        if not self._opened:
            raise RuntimeError(f"sink {self.name}: clean_up_initial_load() before open()")
        settings = self._settings
        names = {"#del": settings.tombstone_attribute, "#load": settings.load_attribute}
        names.update({f"#k{i}": key for i, key in enumerate(self._key_names)})
        names["#seq"] = settings.sequence_attribute
        request: dict[str, Any] = {
            "TableName": settings.table_name,
            "FilterExpression": "#del = :true AND #load = :load",
            "ProjectionExpression": ", ".join([*(f"#k{i}" for i in range(len(self._key_names))), "#seq"]),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": {":true": {"BOOL": True}, ":load": {"S": load_id}},
        }
        removed = 0
        while True:
            try:
                page = self._client.scan(**request)
            except (ClientError, BotoCoreError) as exc:
                raise _classified(f"Scan of {settings.table_name!r} for tombstones", exc) or PermanentSinkError(
                    f"Scan of {settings.table_name!r} for tombstones: {type(exc).__name__}"
                ) from exc
            for item in page.get("Items", []):
                key = {name: item[name] for name in self._key_names}
                try:
                    self._client.delete_item(
                        TableName=settings.table_name,
                        Key=key,
                        ConditionExpression="#del = :true AND #seq = :seq",
                        ExpressionAttributeNames={
                            "#del": settings.tombstone_attribute,
                            "#seq": settings.sequence_attribute,
                        },
                        ExpressionAttributeValues={":true": {"BOOL": True}, ":seq": item[settings.sequence_attribute]},
                    )
                    removed += 1
                except (ClientError, BotoCoreError) as exc:
                    error = _classified(f"DeleteItem of a tombstone in {settings.table_name!r}", exc)
                    if error is not None:
                        raise error from exc
            if "LastEvaluatedKey" not in page:
                return removed
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def write(self, batch: Batch) -> WriteResult:
        """One key's changes one after another, in sequence order; the pipeline's lanes write other keys at once."""
        if not self._opened:
            raise RuntimeError(f"sink {self.name}: write() before open()")
        failed: dict[str, SinkError] = {}
        by_key: dict[tuple[tuple[str, Any], ...], list[_Write]] = {}
        unplanned: dict[frozenset[tuple[str, Any]], str] = {}  # source item -> the change that could not be planned
        for record in batch.records:
            item = record.item_key
            if item in unplanned:  # its earlier change is refused: a pipeline in block mode must not apply this one
                failed[record.event_id] = NotAttemptedError(
                    f"event {record.event_id} held back: event {unplanned[item]}, an earlier change to the same "
                    "item, was refused"
                )
                continue
            try:
                write = self._planned(record)
            except PermanentSinkError as error:
                failed[record.event_id] = error
                unplanned[item] = record.event_id
                continue
            if write is not None:
                by_key.setdefault(write.key, []).append(write)
        for writes in by_key.values():
            # A load's copy first: stream changes win over it anyway, and its number is no stream sequence number.
            failed.update(self._applied(sorted(writes, key=lambda w: (w.kind != "snapshot", w.record.sequence))))
        return WriteResult(failed=failed)

    # -- one record -> one request -----------------------------------------------------------------------

    def _planned(self, record: ChangeRecord) -> _Write | None:
        """The request for `record`, or None when the transform skips it. Raises PermanentSinkError."""
        if record.load_id is not None and record.load_id != self._loading:
            # A copy of a load this sink is not in (it finished, or was never begun here): a late copy from a worker
            # that lost the load, which would overwrite what changes wrote since. Taken, never written.
            return None
        sequence = SNAPSHOT_SEQUENCE if record.load_id is not None else padded_sequence(record.sequence_number)
        ddb = record.raw["dynamodb"]
        removing = record.event_name == "REMOVE"
        if self._transform is not None:
            image = self._transformed(record)
            if image is None:
                return None
        elif removing:
            image = _blobs_as_bytes(ddb.get("Keys", {}))
        else:
            new_image = ddb.get("NewImage")
            if new_image is None:
                raise PermanentSinkError(
                    f"{record.event_name} event {record.event_id} carries no NewImage: the source stream's view "
                    "type must be NEW_IMAGE or NEW_AND_OLD_IMAGES (or set a transform that builds the item)"
                )
            image = _blobs_as_bytes(new_image)
        image = self._shaped(record, image)
        settings = self._settings
        if removing:
            if not all(name in image for name in self._key_names):
                image = self._shaped(record, _blobs_as_bytes(ddb.get("Keys", {})))
            key = self._key_of(record, image)
            loading = self._loading
            if loading is None:
                return _Write(record, "delete", key, _identity(record, key), sequence)
            tombstone = {
                **key,
                settings.sequence_attribute: {"S": sequence},
                settings.load_attribute: {"S": loading},
                settings.tombstone_attribute: {"BOOL": True},
            }
            return _Write(record, "put", tombstone, _identity(record, key), sequence)
        if record.load_id is not None:
            item = {
                **image,
                settings.sequence_attribute: {"S": SNAPSHOT_SEQUENCE},
                settings.load_attribute: {"S": record.load_id},
            }
            return _Write(record, "snapshot", item, _identity(record, self._key_of(record, item)), SNAPSHOT_SEQUENCE)
        item = {**image, settings.sequence_attribute: {"S": sequence}}
        loading = self._loading
        if loading is not None:
            item[settings.load_attribute] = {"S": loading}
        return _Write(record, "put", item, _identity(record, self._key_of(record, item)), sequence)

    def _transformed(self, record: ChangeRecord) -> dict[str, Any] | None:
        assert self._transform is not None
        path = self._settings.transform
        try:
            result = self._transform(record)
        except Exception as exc:
            raise PermanentSinkError(
                f"transform {path!r} raised {type(exc).__name__} for event {record.event_id}", detail=str(exc)
            ) from exc
        if result is None:
            return None
        if not isinstance(result, Mapping):
            raise PermanentSinkError(
                f"transform {path!r} returned a {type(result).__name__} for event {record.event_id}; "
                "expected a dict of attributes or None"
            )
        try:
            return {_attribute_name(name): self._serializer.serialize(value) for name, value in result.items()}
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise PermanentSinkError(
                f"transform {path!r} returned a value DynamoDB cannot store for event {record.event_id} "
                f"({type(exc).__name__})",
                detail=str(exc),
            ) from exc

    def _shaped(self, record: ChangeRecord, image: Mapping[str, Any]) -> dict[str, Any]:
        """Renaming, on DynamoDB JSON: no value is converted."""
        rename = self._settings.rename
        if not rename:
            return dict(image)
        shaped = {name: value for name, value in image.items() if name not in rename}
        for old, new in rename.items():
            if old not in image:
                continue
            if old in record.keys and new not in self._key_names:
                raise PermanentSinkError(
                    f"rename {old!r} -> {new!r}: {old!r} is a key attribute of the source, and table "
                    f"{self._settings.table_name!r}'s key ({self._key_description}) has no {new!r}"
                )
            shaped[new] = image[old]
        return shaped

    def _key_of(self, record: ChangeRecord, image: Mapping[str, Any]) -> dict[str, Any]:
        missing = [name for name in self._key_names if name not in image]
        if missing:
            fix = "the transform must return them" if self._transform else "map them with rename"
            raise PermanentSinkError(
                f"item for event {record.event_id} has no key attribute {', '.join(map(repr, missing))} of table "
                f"{self._settings.table_name!r} ({self._key_description}); {fix}"
            )
        return {name: image[name] for name in self._key_names}

    # -- requests ----------------------------------------------------------------------------------------

    def _applied(self, chain: Sequence[_Write]) -> dict[str, SinkError]:
        """Apply one key's writes in order. After a failure the rest wait (a retry must keep their order, and a
        pipeline that stops at a refusal must not apply the item's next change); they are written again."""
        failed: dict[str, SinkError] = {}
        for index, write in enumerate(chain):
            error = self._sent(write)
            if error is None:
                continue
            failed[write.record.event_id] = error
            for later in chain[index + 1 :]:
                failed[later.record.event_id] = NotAttemptedError(
                    f"event {later.record.event_id} held back: event {write.record.event_id}, an earlier "
                    f"change to the same item, was not applied ({error})"
                )
            break
        return failed

    def _sent(self, write: _Write) -> SinkError | None:
        condition: dict[str, Any] = {
            "ConditionExpression": NEWER_WINS_CONDITION,
            "ExpressionAttributeNames": {"#seq": self._settings.sequence_attribute},
            "ExpressionAttributeValues": {":seq": {"S": write.sequence}},
        }
        if write.kind == "snapshot":
            assert write.record.load_id is not None
            condition = {
                "ConditionExpression": SNAPSHOT_CONDITION,
                "ExpressionAttributeNames": {
                    "#seq": self._settings.sequence_attribute,
                    "#load": self._settings.load_attribute,
                },
                "ExpressionAttributeValues": {":load": {"S": write.record.load_id}},
            }
        table = self._settings.table_name
        try:
            if write.kind in ("put", "snapshot"):
                self._client.put_item(TableName=table, Item=write.attributes, **condition)
            else:
                self._client.delete_item(TableName=table, Key=write.attributes, **condition)
        except (ClientError, BotoCoreError) as exc:
            operation = "DeleteItem" if write.kind == "delete" else "PutItem"
            return _classified(f"{operation} of event {write.record.event_id} into {table!r}", exc)
        return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _classified(what: str, exc: ClientError | BotoCoreError) -> SinkError | None:
    """The one place where botocore errors become the sink's two error kinds.

    None means the write's condition failed: the item already holds this change or a newer one, so the record
    is taken. The service's own message goes to `detail` (it may quote a value), the code to the message."""
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code == "ConditionalCheckFailedException":
            return None
        if code in _UNUSABLE_CODES:
            return DestinationUnusableError(
                f"{what}: {code}; the table is gone or these credentials may not write to it"
            )
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return RetryableSinkError(f"{what}: {code or status}", detail=message)
        return PermanentSinkError(f"{what}: {code or status}", detail=message)
    if isinstance(exc, _TRANSPORT_ERRORS):
        return RetryableSinkError(f"{what}: {type(exc).__name__}", detail=str(exc))
    if isinstance(exc, ParamValidationError):
        return PermanentSinkError(f"{what}: the request is not valid (ParamValidationError)", detail=str(exc))
    return PermanentSinkError(f"{what}: {type(exc).__name__}", detail=str(exc))


def _attribute_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"attribute names must be strings, got {name!r}")
    return name


def _identity(record: ChangeRecord, key: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable form of a key: equal numbers written differently ("1", "1.0") are the same item."""
    parts: list[tuple[str, Any]] = []
    for name, value in key.items():
        ((tag, payload),) = value.items()
        if tag not in ("S", "N", "B"):
            raise PermanentSinkError(
                f"item for event {record.event_id}: key attribute {name!r} is of type {tag}; keys are S, N or B"
            )
        parts.append((name, Decimal(payload) if tag == "N" else payload))
    return tuple(parts)


def _blobs_as_bytes(image: Mapping[str, Any]) -> dict[str, Any]:
    """Binary values as bytes. Records read in wire form (the pipeline's GetRecords parsing, a Lambda event, a
    dead letter) carry them as base64 text, which boto3 would encode a second time; botocore's parser gives
    bytes already."""
    return {name: _value_blobs_as_bytes(value) for name, value in image.items()}


def _value_blobs_as_bytes(value: Mapping[str, Any]) -> Mapping[str, Any]:
    ((tag, payload),) = value.items()
    if tag == "B" and isinstance(payload, str):
        return {"B": base64.b64decode(payload)}
    if tag == "BS":
        return {"BS": [base64.b64decode(b) if isinstance(b, str) else b for b in payload]}
    if tag == "M":
        return {"M": _blobs_as_bytes(payload)}
    if tag == "L":
        return {"L": [_value_blobs_as_bytes(v) for v in payload]}
    return value
