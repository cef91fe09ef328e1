"""The change record model and lossless unmarshalling of DynamoDB JSON.

DynamoDB numbers carry up to 38 significant digits; a float keeps 15-17. Every number therefore becomes a
`decimal.Decimal` built from the digits DynamoDB sent, and is written back out (JSON, Parquet) from that same
digit string, never through a float.

A record's images are unmarshalled when something first reads them (`LazyImage`), not when the record is built:
unmarshalling is most of what a record costs, and the paths that carry the most records (the archive's default
`dynamodb_json` encoding, `dynamodb`-format messages, dead letters) write the typed form from `raw` and never read
the images at all. Keys are small and read by almost everything (FIFO group ids, summaries, filters), so they are
unmarshalled at once.

Records decoded by `pipeline.wire` go one step further: their images are not even parsed. `WireRecord` is the
stream record as a read-only mapping whose images are still the JSON text the service sent; an image is parsed
when something reads it, and the archive copies the text as it is.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
import orjson

EventName = Literal["INSERT", "MODIFY", "REMOVE", "SNAPSHOT"]
"""SNAPSHOT: an item as an initial load read it from the table (`snapshot_record`), not a change."""
Image = Mapping[str, Any]

TTL_PRINCIPAL = "dynamodb.amazonaws.com"


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """Present only on deletes made by DynamoDB itself (TTL expiry)."""

    type: str
    principal_id: str

    @property
    def is_ttl_expiry(self) -> bool:
        return self.type == "Service" and self.principal_id == TTL_PRINCIPAL


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One item-level change, unmarshalled.

    `raw` keeps the stream record exactly as the service delivered it (DynamoDB JSON), so a sink can forward
    it unchanged to consumers that already parse Lambda-style stream events.
    """

    event_id: str
    event_name: EventName
    table: str
    shard_id: str
    sequence_number: str
    approximate_creation_time: datetime
    keys: Image
    new_image: Image | None
    """A `LazyImage` when built from the stream; any mapping a transform puts here (e.g. a dict) works too."""
    old_image: Image | None
    size_bytes: int
    user_identity: UserIdentity | None
    raw: Mapping[str, Any]
    stream_arn: str | None = None
    """The stream the record was read from (GetRecords does not repeat it in each record); Lambda's
    `eventSourceARN`. None for a record built without one (a test's, a user's)."""
    load_id: str | None = None
    """For a SNAPSHOT record: the initial load that read it. None for every change read from the stream."""

    @property
    def sequence(self) -> int:
        """Sequence numbers are decimal strings of varying length: compare them as integers."""
        return int(self.sequence_number)

    @property
    def is_snapshot(self) -> bool:
        return self.load_id is not None

    @property
    def item_key(self) -> frozenset[tuple[str, Any]]:
        """Which item the change is of, hashable: equal keys meet (and equal numbers, "1" and "1.0"), so every
        change of one item gets the same lane, message group and hold-back."""
        return frozenset(self.keys.items())


@dataclass(frozen=True, slots=True)
class Batch:
    """Records handed to the sinks together. Order within one shard is the stream's order."""

    records: tuple[ChangeRecord, ...]
    size_bytes: int

    def __len__(self) -> int:
        return len(self.records)


class UnmarshalError(ValueError):
    """A DynamoDB JSON value that does not follow the attribute-value grammar."""


def unmarshal_value(value: Mapping[str, Any]) -> Any:
    """One typed attribute value -> Python: N as Decimal, B as bytes, SS/NS/BS as frozensets."""
    if len(value) != 1:
        raise UnmarshalError(f"an attribute value has exactly one type tag, got {sorted(value)!r}")
    ((tag, payload),) = value.items()
    decode = _DECODERS.get(tag)
    if decode is None:
        raise UnmarshalError(f"unknown DynamoDB type tag {tag!r}")
    return decode(payload)


def unmarshal_image(image: Mapping[str, Any]) -> dict[str, Any]:
    # The common tags skip unmarshal_value's generic dispatch: this runs for every attribute of every record.
    unmarshalled: dict[str, Any] = {}
    for name, value in image.items():
        if type(value) is dict and len(value) == 1:
            if "S" in value:
                unmarshalled[name] = value["S"]
                continue
            if "N" in value:
                unmarshalled[name] = Decimal(value["N"])
                continue
            if "M" in value:
                unmarshalled[name] = unmarshal_image(value["M"])
                continue
            if "L" in value:
                unmarshalled[name] = _unmarshal_list(value["L"])
                continue
        unmarshalled[name] = unmarshal_value(value)
    return unmarshalled


_FIRST_USE = threading.Lock()


class LazyImage(Mapping[str, Any]):
    """A read-only image, unmarshalled from its DynamoDB JSON on first access and kept.

    The DynamoDB JSON is either a mapping or its text as the service sent it (records from `pipeline.wire`);
    text is parsed on first use too, and text that is not a JSON object raises `UnmarshalError` then.

    It compares equal to the dict it stands for (either way round) and works wherever a mapping does: `dict(image)`,
    `{**image}`, `image.get(name)`, `image | {...}`; `to_json` writes it as that dict. A value outside the
    attribute-value grammar raises `UnmarshalError` naming the record, on first access rather than when the record
    was read from the stream.
    """

    __slots__ = ("_event_id", "_name", "_text", "_typed", "_values")

    def __init__(self, typed: Mapping[str, Any] | bytes, event_id: str = "", name: str = "image") -> None:
        # Either the typed mapping, or its JSON text as the service sent it (parsed on first use).
        self._typed: Mapping[str, Any] | None = None
        self._text: bytes | None = None
        if isinstance(typed, bytes):
            self._text = typed
        else:
            self._typed = typed
        self._values: dict[str, Any] | None = None
        # Only for the error message; kept apart so that building a record formats no text.
        self._event_id = event_id
        self._name = name

    @property
    def typed(self) -> Mapping[str, Any]:
        """The image in DynamoDB JSON, as the stream delivered it (the same object as in `ChangeRecord.raw`)."""
        typed = self._typed
        if typed is not None:
            return typed
        try:
            parsed = orjson.loads(self._text or b"")
        except orjson.JSONDecodeError as exc:
            raise UnmarshalError(f"{self._where()}: {exc}") from exc
        if not isinstance(parsed, dict):
            raise UnmarshalError(f"{self._where()}: an image is a JSON object, got {type(parsed).__name__}")
        with _FIRST_USE:  # one parsed object for every reader, as for the unmarshalled values below
            typed = self._typed
            if typed is None:
                typed = self._typed = parsed
        return typed

    @property
    def typed_json(self) -> bytes:
        """The image as DynamoDB JSON text: the service's own text when there is one, else `typed` encoded."""
        if self._text is not None:
            return self._text
        return to_json_bytes(self.typed)

    def _where(self) -> str:
        return f"{self._name} of record {self._event_id}" if self._event_id else self._name

    def _unmarshalled(self) -> dict[str, Any]:
        values = self._values
        if values is not None:
            return values
        typed = self.typed
        try:
            unmarshalled = unmarshal_image(typed)
        except Exception as exc:  # a bad number, bad base64 or a wrong shape is as unreadable as a bad tag
            raise UnmarshalError(f"{self._where()}: {type(exc).__name__}: {exc}") from exc
        # The first result wins, so every reader (on any thread) sees the same value objects: a transform's
        # "passed on unchanged" test is by identity.
        with _FIRST_USE:
            values = self._values
            if values is None:
                values = self._values = unmarshalled
        return values

    def __getitem__(self, name: str) -> Any:
        return self._unmarshalled()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._unmarshalled())

    def __len__(self) -> int:
        return len(self._unmarshalled())

    def __contains__(self, name: object) -> bool:
        return name in self._unmarshalled()

    def get(self, name: str, default: Any = None) -> Any:
        return self._unmarshalled().get(name, default)

    def keys(self) -> KeysView[str]:
        return self._unmarshalled().keys()

    def items(self) -> ItemsView[str, Any]:
        return self._unmarshalled().items()

    def values(self) -> ValuesView[Any]:
        return self._unmarshalled().values()

    def copy(self) -> dict[str, Any]:
        """A mutable dict of the image, as `dict.copy` gave when images were dicts."""
        return dict(self._unmarshalled())

    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**self._unmarshalled(), **other}

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return {**other, **self._unmarshalled()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyImage):
            return self._unmarshalled() == other._unmarshalled()
        if isinstance(other, dict):
            return self._unmarshalled() == other
        if isinstance(other, Mapping):
            return self._unmarshalled() == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        try:
            return repr(self._unmarshalled())
        except UnmarshalError as error:
            # repr must not raise: records are logged, and this is the record the log is about.
            return f"<{type(self).__name__} unreadable: {error}>"


_ABSENT: Any = object()


class _WireMapping(Mapping[str, Any]):
    """A read-only mapping over fields, some of which may be absent (`_value` returns `_ABSENT`)."""

    __slots__ = ()

    def _value(self, name: str) -> Any:
        raise NotImplementedError

    def __getitem__(self, name: str) -> Any:
        value = self._value(name)
        if value is _ABSENT:
            raise KeyError(name)
        return value

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name in tuple(self)  # without parsing an image, as Mapping's own would

    def to_json_value(self) -> dict[str, Any]:
        """This mapping for orjson, each image as its text (orjson.Fragment): encoding parses nothing."""
        return {name: self._json_value(name) for name in self}

    def _json_value(self, name: str) -> Any:
        return self._value(name)

    def __repr__(self) -> str:
        # From the images' text: repr must not raise, and records are logged when an image is unreadable.
        return f"{type(self).__name__}({to_json(self)})"


class WireStreamRecord(_WireMapping):
    """The `dynamodb` part of a `WireRecord`: a read-only mapping with the keys GetRecords sent.

    Reading `SequenceNumber` or `SizeBytes` (as the reader does for every record) parses nothing; reading an image
    parses that image's text once, and the result is the object the record's `LazyImage.typed` also returns.
    (Not a dataclass: orjson would encode a dataclass's fields rather than the mapping.)
    """

    # `key_image`, not `keys`: that is Mapping.keys().
    __slots__ = ("creation_time", "key_image", "new_image", "old_image", "sequence_number", "size_bytes", "view_type")

    def __init__(
        self,
        *,
        sequence_number: str,
        creation_time: float,
        key_image: LazyImage,
        new_image: LazyImage | None = None,
        old_image: LazyImage | None = None,
        size_bytes: int | None = None,
        view_type: str | None = None,
    ) -> None:
        self.sequence_number = sequence_number
        self.creation_time = creation_time
        self.key_image = key_image
        self.new_image = new_image
        self.old_image = old_image
        self.size_bytes = size_bytes
        self.view_type = view_type

    def _value(self, name: str) -> Any:
        if name == "SequenceNumber":
            return self.sequence_number
        if name == "SizeBytes":
            return _ABSENT if self.size_bytes is None else self.size_bytes
        if name == "ApproximateCreationDateTime":
            return self.creation_time
        if name == "Keys":
            return self.key_image.typed
        if name == "NewImage":
            return _ABSENT if self.new_image is None else self.new_image.typed
        if name == "OldImage":
            return _ABSENT if self.old_image is None else self.old_image.typed
        if name == "StreamViewType":
            return _ABSENT if self.view_type is None else self.view_type
        return _ABSENT

    def __iter__(self) -> Iterator[str]:
        # The order of the service's documentation examples.
        yield "ApproximateCreationDateTime"
        yield "Keys"
        if self.new_image is not None:
            yield "NewImage"
        if self.old_image is not None:
            yield "OldImage"
        yield "SequenceNumber"
        if self.size_bytes is not None:
            yield "SizeBytes"
        if self.view_type is not None:
            yield "StreamViewType"

    def image_json(self, name: str) -> bytes | None:
        """`Keys`, `NewImage` or `OldImage` as DynamoDB JSON text, without parsing it; None when absent."""
        images = {"Keys": self.key_image, "NewImage": self.new_image, "OldImage": self.old_image}
        image = images[name]
        return None if image is None else image.typed_json

    def _json_value(self, name: str) -> Any:
        if name in ("Keys", "NewImage", "OldImage"):
            return orjson.Fragment(self.image_json(name) or b"null")
        return self._value(name)


class WireRecord(_WireMapping):
    """One element of GetRecords' `Records` as `pipeline.wire` decoded it: a read-only mapping equal to the dict
    a JSON parser would give (binary as base64 text, the creation time as epoch seconds), built without parsing
    the images."""

    __slots__ = ("aws_region", "dynamodb", "event_id", "event_name", "event_source", "event_version", "user_identity")

    def __init__(
        self,
        *,
        event_id: str,
        event_name: str,
        dynamodb: WireStreamRecord,
        event_version: str | None = None,
        event_source: str | None = None,
        aws_region: str | None = None,
        user_identity: dict[str, str] | None = None,
    ) -> None:
        self.event_id = event_id
        self.event_name = event_name
        self.dynamodb = dynamodb
        self.event_version = event_version
        self.event_source = event_source
        self.aws_region = aws_region
        self.user_identity = user_identity

    def _fields(self) -> dict[str, Any]:
        """Every field by its GetRecords name, in the service's order; None where the record has none."""
        return {
            "eventID": self.event_id,
            "eventName": self.event_name,
            "eventVersion": self.event_version,
            "eventSource": self.event_source,
            "awsRegion": self.aws_region,
            "dynamodb": self.dynamodb,
            "userIdentity": self.user_identity,
        }

    def _value(self, name: str) -> Any:
        if name == "dynamodb":  # read for every record (sequence numbers, sizes)
            return self.dynamodb
        value = self._fields().get(name)
        return _ABSENT if value is None else value

    def __iter__(self) -> Iterator[str]:
        return (name for name, value in self._fields().items() if value is not None)


def _as_bytes(payload: Any) -> bytes:
    # boto3 has already base64-decoded blobs; raw wire JSON still carries them as base64 text.
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return base64.b64decode(payload)


def _unmarshal_list(payload: Any) -> list[Any]:
    unmarshalled: list[Any] = []
    for value in payload:
        if type(value) is dict and len(value) == 1:
            if "S" in value:
                unmarshalled.append(value["S"])
                continue
            if "N" in value:
                unmarshalled.append(Decimal(value["N"]))
                continue
            if "M" in value:
                unmarshalled.append(unmarshal_image(value["M"]))
                continue
        unmarshalled.append(unmarshal_value(value))
    return unmarshalled


def _unmarshal_null(payload: Any) -> None:
    return None


def _unmarshal_string(payload: Any) -> Any:
    return payload


def _number_set(payload: Any) -> frozenset[Decimal]:
    return frozenset(map(Decimal, payload))


def _binary_set(payload: Any) -> frozenset[bytes]:
    return frozenset(map(_as_bytes, payload))


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "S": _unmarshal_string,
    "N": Decimal,
    "M": unmarshal_image,
    "L": _unmarshal_list,
    "BOOL": bool,
    "NULL": _unmarshal_null,
    "B": _as_bytes,
    "SS": frozenset,
    "NS": _number_set,
    "BS": _binary_set,
}


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)


def change_record_from_stream(
    raw: Mapping[str, Any], *, table: str, shard_id: str, stream_arn: str | None = None
) -> ChangeRecord:
    """Build a ChangeRecord from one element of GetRecords' `Records` list, read from `stream_arn` (or of a Lambda
    DynamoDB event's `Records`, which differ only in the spelling of `userIdentity` and in adding
    `eventSourceARN`)."""
    if type(raw) is WireRecord:
        return _change_record_from_wire(raw, table, shard_id, stream_arn)
    ddb = raw["dynamodb"]
    new_image = ddb.get("NewImage")
    old_image = ddb.get("OldImage")
    identity = raw.get("userIdentity")
    event_id = raw["eventID"]
    return ChangeRecord(
        event_id=event_id,
        event_name=raw["eventName"],
        table=table,
        shard_id=shard_id,
        sequence_number=ddb["SequenceNumber"],
        approximate_creation_time=_as_utc(ddb["ApproximateCreationDateTime"]),
        keys=unmarshal_image(ddb.get("Keys", {})),
        new_image=None if new_image is None else LazyImage(new_image, event_id, "NewImage"),
        old_image=None if old_image is None else LazyImage(old_image, event_id, "OldImage"),
        size_bytes=int(ddb.get("SizeBytes", 0)),
        user_identity=None if identity is None else _user_identity(identity),
        raw=raw,
        stream_arn=stream_arn,
    )


def _user_identity(identity: Mapping[str, str]) -> UserIdentity:
    """GetRecords spells the fields `Type` and `PrincipalId`; Lambda's DynamoDB events `type` and `principalId`."""
    if "Type" in identity:
        return UserIdentity(type=identity["Type"], principal_id=identity["PrincipalId"])
    return UserIdentity(type=identity["type"], principal_id=identity["principalId"])


def _change_record_from_wire(raw: WireRecord, table: str, shard_id: str, stream_arn: str | None) -> ChangeRecord:
    stream = raw.dynamodb
    identity = raw.user_identity
    return ChangeRecord(
        event_id=raw.event_id,
        event_name=raw.event_name,  # type: ignore[arg-type]  # as unchecked as the dict path's
        table=table,
        shard_id=shard_id,
        sequence_number=stream.sequence_number,
        approximate_creation_time=datetime.fromtimestamp(stream.creation_time, UTC),
        keys=unmarshal_image(stream.key_image.typed),
        new_image=stream.new_image,
        old_image=stream.old_image,
        size_bytes=stream.size_bytes or 0,
        user_identity=None
        if identity is None
        else UserIdentity(type=identity["Type"], principal_id=identity["PrincipalId"]),
        raw=raw,
        stream_arn=stream_arn,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # The exact digits, as a JSON number token: no float ever sees them.
        return orjson.Fragment(str(value))
    if isinstance(value, LazyImage):
        return value._unmarshalled()
    if isinstance(value, _WireMapping):
        return value.to_json_value()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, frozenset | set):
        # Numbers are encoded here rather than by one more call back per element.
        return [orjson.Fragment(str(v)) if type(v) is Decimal else v for v in sorted(value)]
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def to_json(value: Any) -> str:
    """Plain JSON for an unmarshalled value: numbers exact, binary as base64, sets as sorted arrays."""
    return to_json_bytes(value).decode("utf-8")


def to_json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_json_default)
    except TypeError as error:
        # orjson reports whatever `default` raised as "not JSON serializable"; an unreadable image should say so.
        if isinstance(error.__cause__, UnmarshalError):
            raise error.__cause__ from None
        raise


SNAPSHOT_SEQUENCE_DIGITS = (7, 10, 7)
"""Segment, page and index digits of a snapshot record's sequence number: unique within its load, in reading order."""


def snapshot_record(
    item: Mapping[str, Any] | bytes,
    *,
    key_names: tuple[str, ...],
    load_id: str,
    table: str,
    segment: int,
    page: int,
    index: int,
    read_at: float,
    size_bytes: int,
    stream_arn: str | None = None,
    region: str | None = None,
) -> ChangeRecord:
    """An item an initial load read, as a record every sink takes: shaped like a stream record in wire form
    (`WireRecord`) with event name SNAPSHOT, the whole item as NewImage, and a sequence number that names its place
    in the load (not a stream sequence number: it compares with none; sinks that order by sequence treat SNAPSHOT
    records apart). `item` is DynamoDB JSON: its text as the service sent it (kept unparsed until a sink reads it;
    the archive copies it as it is), or a mapping."""
    seg_digits, page_digits, index_digits = SNAPSHOT_SEQUENCE_DIGITS
    sequence = f"{segment:0{seg_digits}d}{page:0{page_digits}d}{index:0{index_digits}d}"
    event_id = f"{load_id}-{sequence}"
    if isinstance(item, bytes):
        keys = _key_attributes(item, key_names, event_id)
        new_image = LazyImage(item, event_id, "NewImage")
    else:
        keys = {name: item[name] for name in key_names if name in item}
        new_image = LazyImage(item, event_id, "NewImage")
    raw = WireRecord(
        event_id=event_id,
        event_name="SNAPSHOT",
        dynamodb=WireStreamRecord(
            sequence_number=sequence,
            creation_time=read_at,
            key_image=LazyImage(keys, event_id, "Keys"),
            new_image=new_image,
            size_bytes=size_bytes,
            view_type="NEW_IMAGE",
        ),
        event_version="1.1",
        event_source="aws:dynamodb",
        aws_region=region,
    )
    return ChangeRecord(
        event_id=event_id,
        event_name="SNAPSHOT",
        table=table,
        shard_id=f"segment-{segment:05d}",
        sequence_number=sequence,
        approximate_creation_time=datetime.fromtimestamp(read_at, UTC),
        keys=unmarshal_image(keys),
        new_image=new_image,
        old_image=None,
        size_bytes=size_bytes,
        user_identity=None,
        raw=raw,
        stream_arn=stream_arn,
        load_id=load_id,
    )


_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _key_attributes(item: bytes, key_names: tuple[str, ...], event_id: str) -> dict[str, Any]:
    """The key attributes of an item's JSON text, parsing only them (the rest stays text)."""
    try:
        attributes = _TOP_LEVEL.decode(item)
        return {name: orjson.loads(bytes(attributes[name])) for name in key_names if name in attributes}
    except (msgspec.DecodeError, orjson.JSONDecodeError) as exc:
        raise UnmarshalError(f"item of record {event_id}: {exc}") from exc
