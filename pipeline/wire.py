"""GetRecords bodies decoded by msgspec into `WireRecord`s instead of by botocore's shape walker.

botocore parses a response value by value in Python against the service model. For a GetRecords page of
1000 NEW_AND_OLD_IMAGES records that is about half a second of CPU, and most of what it does (blobs to bytes,
the timestamp to a datetime) the pipeline undoes again for the archive. Even `orjson.loads` of the body builds a
dict for every attribute of every image, which most records never need: the archive's default encoding writes
the images as the service sent them.

`parse_get_records` runs on botocore's `before-parse` event. For a 2xx response it decodes the body with msgspec
against the GetRecords shape, keeping each image as the span of JSON text it occupies in the body (`msgspec.Raw`):
the images are checked to be complete JSON values (and the body to be UTF-8) but not turned into objects. The
records reach the caller through `customized_response_dict` (botocore merges that into its parsed response) as
`WireRecord`s, read-only mappings equal to the parsed JSON, and botocore's parser gets the body without them.
Everything else stays botocore's: signing, `ResponseMetadata`, and every non-2xx response, which is left
untouched so error codes parse exactly as before.

A body msgspec does not accept (a field this module does not know, say one the service adds later, or an image
that is null) is parsed with `orjson.loads` instead, so that no field is dropped; the records are then plain
dicts, and `pipeline.records` builds the same ChangeRecord from either. Either way the records stay in wire form:
binary as base64 text, `ApproximateCreationDateTime` as epoch seconds, numbers as the digit strings they always
were. `ChangeRecord.raw` is that wire form, as a Lambda consumer would see it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import orjson

from pipeline.records import LazyImage, WireRecord, WireStreamRecord

log = logging.getLogger(__name__)

GET_RECORDS_EVENT = "before-parse.dynamodb-streams.GetRecords"
_HANDLER_ID = "streamsink.wire.parse_get_records"

_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET


# The GetRecords shape. Unknown fields are refused rather than ignored, so that a record with more than this
# knows of goes the general way with nothing dropped.
class _Identity(msgspec.Struct, forbid_unknown_fields=True):
    Type: str
    PrincipalId: str


class _StreamRecord(msgspec.Struct, forbid_unknown_fields=True):
    SequenceNumber: str
    ApproximateCreationDateTime: int | float  # the service sends 1.71456789E9; moto and the simulator an int
    Keys: msgspec.Raw
    NewImage: msgspec.Raw | _Unset = _UNSET
    OldImage: msgspec.Raw | _Unset = _UNSET
    SizeBytes: int | _Unset = _UNSET
    StreamViewType: str | _Unset = _UNSET


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    eventID: str
    eventName: str
    dynamodb: _StreamRecord
    eventVersion: str | _Unset = _UNSET
    eventSource: str | _Unset = _UNSET
    awsRegion: str | _Unset = _UNSET
    userIdentity: _Identity | _Unset = _UNSET


class _Page(msgspec.Struct, forbid_unknown_fields=True):
    Records: list[_Record] = msgspec.field(default_factory=list)
    NextShardIterator: str | _Unset | None = _UNSET


_PAGE_DECODER = msgspec.json.Decoder(_Page)
_general_parse_logged = False


class _NotWireShaped(Exception):
    """A value the Structs accept but a WireRecord cannot stand for as a parser's dict would."""


def _image(raw: msgspec.Raw | _Unset, event_id: str, name: str) -> LazyImage | None:
    if raw is _UNSET:
        return None
    text = bytes(raw)
    if text == b"null":
        raise _NotWireShaped(f"{name} of record {event_id} is null")  # present but None: the general path says so
    return LazyImage(text, event_id, name)


def _wire_record(record: _Record) -> WireRecord:
    stream = record.dynamodb
    event_id = record.eventID
    identity = record.userIdentity
    return WireRecord(
        event_id=event_id,
        event_name=record.eventName,
        dynamodb=WireStreamRecord(
            sequence_number=stream.SequenceNumber,
            creation_time=stream.ApproximateCreationDateTime,
            key_image=LazyImage(bytes(stream.Keys), event_id, "Keys"),
            new_image=_image(stream.NewImage, event_id, "NewImage"),
            old_image=_image(stream.OldImage, event_id, "OldImage"),
            size_bytes=None if stream.SizeBytes is _UNSET else stream.SizeBytes,
            view_type=None if stream.StreamViewType is _UNSET else stream.StreamViewType,
        ),
        event_version=None if record.eventVersion is _UNSET else record.eventVersion,
        event_source=None if record.eventSource is _UNSET else record.eventSource,
        aws_region=None if record.awsRegion is _UNSET else record.awsRegion,
        user_identity=None
        if isinstance(identity, _Unset)
        else {"PrincipalId": identity.PrincipalId, "Type": identity.Type},
    )


def _successful_body(response_dict: dict[str, Any]) -> bytes | bytearray | None:
    """The body of a 2xx answer that has one; None leaves the answer (an error's above all) to botocore."""
    if response_dict.get("status_code", 500) >= 300:
        return None
    body = response_dict.get("body")
    return body if isinstance(body, bytes | bytearray) and body else None


def parse_get_records(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """The `before-parse` handler. Anything it does not recognise it leaves for botocore to parse as usual."""
    body = _successful_body(response_dict)
    if body is None:
        return
    try:
        # msgspec checks UTF-8 in the strings it decodes but not inside a Raw span; this is what orjson would refuse.
        body.decode("utf-8")
        page = _PAGE_DECODER.decode(body)
        records = [_wire_record(record) for record in page.Records]
    except (UnicodeDecodeError, msgspec.DecodeError, _NotWireShaped) as error:
        _parse_general(response_dict, customized_response_dict, body, error)
        return
    customized_response_dict["Records"] = records
    if isinstance(page.NextShardIterator, str):
        customized_response_dict["NextShardIterator"] = page.NextShardIterator
        response_dict["body"] = b"{}"
    else:
        # null or absent (a closed shard's last page): botocore says so its own way.
        response_dict["body"] = orjson.dumps({} if page.NextShardIterator is _UNSET else {"NextShardIterator": None})


def _parse_general(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], body: bytes | bytearray, why: Exception
) -> None:
    """orjson.loads of the whole body: every field kept, every image parsed."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return  # botocore's parser reports a malformed body its own way
    if not isinstance(parsed, dict) or not isinstance(parsed.get("Records", []), list):
        return
    global _general_parse_logged
    if not _general_parse_logged:
        _general_parse_logged = True
        log.info("GetRecords: %s; such pages are parsed in full (slower, nothing dropped)", why)
    if "Records" in parsed:
        customized_response_dict["Records"] = parsed.pop("Records")
    if isinstance(parsed.get("NextShardIterator"), str):
        customized_response_dict["NextShardIterator"] = parsed.pop("NextShardIterator")
    # Whatever else the body holds is still botocore's to parse.
    response_dict["body"] = orjson.dumps(parsed)


def install_fast_get_records(client: Any) -> None:
    """Have a `dynamodbstreams` client parse GetRecords with `parse_get_records`; idempotent.

    Each boto3 client has its own copy of the event hooks, so other clients of the same session keep
    botocore's parser.
    """
    client.meta.events.register(GET_RECORDS_EVENT, parse_get_records, unique_id=_HANDLER_ID)


# -- Scan (an initial load) ------------------------------------------------------------------------------------

SCAN_EVENT = "before-parse.dynamodb.Scan"
_SCAN_HANDLER_ID = "streamsink.wire.parse_scan"


class _ScanPage(msgspec.Struct):
    Items: list[msgspec.Raw] = msgspec.field(default_factory=list)
    LastEvaluatedKey: msgspec.Raw | _Unset = _UNSET
    ConsumedCapacity: msgspec.Raw | _Unset = _UNSET
    Count: int | _Unset = _UNSET
    ScannedCount: int | _Unset = _UNSET


_SCAN_DECODER = msgspec.json.Decoder(_ScanPage)


def parse_scan(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """The Scan `before-parse` handler: each item stays the span of JSON text it occupies in the body (bytes), so a
    1 MB page costs one pass of msgspec instead of botocore's walk over every value, and its items about the
    memory of their text instead of ten times that as objects. LastEvaluatedKey and ConsumedCapacity are left to
    botocore (a key goes back as ExclusiveStartKey, binary values as bytes)."""
    body = _successful_body(response_dict)
    if body is None:
        return
    try:
        body.decode("utf-8")
        page = _SCAN_DECODER.decode(body)
    except (UnicodeDecodeError, msgspec.DecodeError):
        return  # botocore parses it as usual: items as dicts
    customized_response_dict["Items"] = [bytes(item) for item in page.Items]
    rest = [
        b'"%s":%s' % (name.encode(), bytes(value))
        for name, value in (("LastEvaluatedKey", page.LastEvaluatedKey), ("ConsumedCapacity", page.ConsumedCapacity))
        if not isinstance(value, _Unset)
    ]
    rest += [
        b'"%s":%d' % (name.encode(), value)
        for name, value in (("Count", page.Count), ("ScannedCount", page.ScannedCount))
        if not isinstance(value, _Unset)
    ]
    response_dict["body"] = b"{" + b",".join(rest) + b"}"


def install_fast_scan(client: Any) -> None:
    """Have a `dynamodb` client parse Scan with `parse_scan` (its items then come back as JSON text); idempotent.
    Only for a client of its own: any other caller of its Scan would get text where it expects dicts."""
    client.meta.events.register(SCAN_EVENT, parse_scan, unique_id=_SCAN_HANDLER_ID)
