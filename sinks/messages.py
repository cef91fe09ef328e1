"""What the SQS and SNS sinks send, and how a write becomes batch calls: shared by both, since the two services
take the same message shape (a text body, String attributes, FIFO group and deduplication ids) under the same
limits (10 entries and 256 KiB per call, 256 KiB per message).

Two body formats:
- `change`: plain JSON of the unmarshalled change, numbers exact (every digit DynamoDB sent, never a float),
  binary as base64, sets as sorted arrays.
- `dynamodb`: the stream record exactly as AWS Lambda delivers it in a DynamoDB event, so a consumer that
  already parses `{"Records": [...]}` events (powertools' `DynamoDBStreamEvent`, or its strict pydantic
  `DynamoDBStreamModel`, which requires every field Lambda sends) can read each body as one record. GetRecords
  does not repeat the stream ARN in each record; the pipeline puts it on the record (`ChangeRecord.stream_arn`)
  and it becomes Lambda's `eventSourceARN`.

FIFO ordering: a message group is one item (table + key), so changes to one item arrive in stream order. A
batch call carries at most one message per group, and a group whose message was not taken holds back the rest
of that group for the write. SQS and SNS may accept later entries of a call even when an earlier one fails, so
two messages of one group in one call could land out of order on a retry; one per call rules that out, at the
cost of more calls only when a write holds several changes to the same item.
"""

from __future__ import annotations

import base64
import hashlib
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from pipeline.aws import AwsClients, region_of_arn
from pipeline.errors import is_retryable
from pipeline.records import Batch, ChangeRecord, to_json_bytes
from sinks.base import (
    CallRefusedError,
    DestinationUnusableError,
    NotAttemptedError,
    PermanentSinkError,
    RetryableSinkError,
    Sink,
    SinkError,
    SinkSettings,
    WriteResult,
)

BodyFormat = Literal["change", "dynamodb"]

MAX_MESSAGE_BYTES = 256 * 1024
"""Per message, body plus attributes; also the most one batch call may carry in total."""
MAX_BATCH_ENTRIES = 10
MAX_FIFO_ID_LENGTH = 128

_MISSING_DESTINATION_CODES = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound", "NotFoundException"}
)
# The caller may not use the destination at all (call-level answers, never per-entry ones): its policy, or the
# KMS key of a queue or topic with server-side encryption.
_FORBIDDEN_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "KmsAccessDenied",
        "KMS.AccessDeniedException",
        "KMSAccessDenied",
        "KmsDisabled",
        "KMS.DisabledException",
        "KMSDisabled",
        "KmsNotFound",
        "KMS.NotFoundException",
        "KMSNotFound",
        "KmsInvalidState",
        "KMS.KMSInvalidStateException",
        "KMSInvalidState",
    }
)
# Throttling codes of SQS, SNS and their KMS calls that pipeline.retry's shared list does not know.
_THROTTLING_CODES = frozenset(
    {"RequestThrottled", "AWS.SimpleQueueService.RequestThrottled", "Throttled", "KmsThrottled", "KMSThrottling"}
)


def change_body(record: ChangeRecord) -> dict[str, Any]:
    """The `change` format; encode with `to_json_bytes` to keep numbers exact."""
    return {
        "eventID": record.event_id,
        "eventName": record.event_name,
        "table": record.table,
        "keys": record.keys,
        "newImage": record.new_image,
        "oldImage": record.old_image,
        "sequenceNumber": record.sequence_number,
        "approximateCreationDateTime": record.approximate_creation_time.astimezone(UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "shardId": record.shard_id,
    }


def lambda_record(record: ChangeRecord) -> dict[str, Any]:
    """The `dynamodb` format: one element of a Lambda DynamoDB event's `Records`, in wire form.

    `record.raw` may come from boto3 (binary as bytes, the creation time as a datetime) or be wire JSON already
    (base64 text, epoch seconds); both give the same output.
    """
    raw = record.raw
    source = raw["dynamodb"]
    stream_record: dict[str, Any] = {
        "ApproximateCreationDateTime": _epoch_seconds(source["ApproximateCreationDateTime"]),
        "Keys": _wire_image(source.get("Keys", {})),
    }
    for image in ("NewImage", "OldImage"):
        if image in source:
            stream_record[image] = _wire_image(source[image])
    stream_record["SequenceNumber"] = source["SequenceNumber"]
    stream_record["SizeBytes"] = int(source.get("SizeBytes", record.size_bytes))
    if "StreamViewType" in source:
        stream_record["StreamViewType"] = source["StreamViewType"]
    event: dict[str, Any] = {
        "eventID": record.event_id,
        "eventName": record.event_name,
        "eventVersion": raw.get("eventVersion", "1.1"),
        "eventSource": "aws:dynamodb",
    }
    region = raw.get("awsRegion") or region_of_arn(record.stream_arn)
    if region:
        event["awsRegion"] = region
    event["dynamodb"] = stream_record
    if record.stream_arn is not None:
        event["eventSourceARN"] = record.stream_arn
    if record.user_identity is not None:
        # Lambda spells these in camel case; GetRecords says Type / PrincipalId.
        event["userIdentity"] = {"type": record.user_identity.type, "principalId": record.user_identity.principal_id}
    return event


def _epoch_seconds(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(moment.timestamp()) if moment.microsecond == 0 else moment.timestamp()
    return value


def _wire_image(image: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _wire_value(value) for name, value in image.items()}


def _wire_value(value: Mapping[str, Any]) -> dict[str, Any]:
    ((tag, payload),) = value.items()
    if tag == "B":
        return {"B": _base64(payload)}
    if tag == "BS":
        return {"BS": [_base64(item) for item in payload]}
    if tag == "M":
        return {"M": _wire_image(payload)}
    if tag == "L":
        return {"L": [_wire_value(item) for item in payload]}
    return {tag: payload}


def _base64(payload: Any) -> Any:
    if isinstance(payload, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(payload)).decode("ascii")
    return payload  # wire JSON: already base64 text


def message_body(record: ChangeRecord, body_format: BodyFormat) -> str:
    body = change_body(record) if body_format == "change" else lambda_record(record)
    return to_json_bytes(body).decode("utf-8")


def message_attributes(record: ChangeRecord) -> dict[str, dict[str, str]]:
    """Attributes subscribers can filter on (SNS filter policies, SQS consumers) without parsing the body."""
    return {
        "event_name": {"DataType": "String", "StringValue": record.event_name},
        "table": {"DataType": "String", "StringValue": record.table},
    }


def message_group_id(record: ChangeRecord) -> str:
    """One group per item: the table and the key attributes, by name, so every change to an item shares it.

    Group ids allow 128 characters of printable ASCII without spaces; longer or other keys are hashed.
    """
    keys = {name: record.keys[name] for name in sorted(record.keys)}
    return _fifo_id(f"{record.table}:" + to_json_bytes(keys).decode("utf-8"))


def deduplication_id(record: ChangeRecord) -> str:
    """The event id: a record sent again (a retry, a replay after a crash) is dropped by the service."""
    return _fifo_id(record.event_id)


def _fifo_id(text: str) -> str:
    if len(text) <= MAX_FIFO_ID_LENGTH and all("!" <= char <= "~" for char in text):
        return text
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One record as a message; `size` is what counts against the limits (body plus attribute names, types,
    values)."""

    record: ChangeRecord
    body: str
    attributes: Mapping[str, Mapping[str, str]]
    group_id: str | None
    deduplication_id: str | None
    size: int


def build_message(record: ChangeRecord, body_format: BodyFormat, *, fifo: bool) -> OutgoingMessage:
    body = message_body(record, body_format)
    attributes = message_attributes(record)
    size = len(body.encode("utf-8")) + sum(
        len(name.encode("utf-8")) + sum(len(part.encode("utf-8")) for part in attribute.values())
        for name, attribute in attributes.items()
    )
    return OutgoingMessage(
        record=record,
        body=body,
        attributes=attributes,
        group_id=message_group_id(record) if fifo else None,
        deduplication_id=deduplication_id(record) if fifo else None,
        size=size,
    )


@dataclass(frozen=True, slots=True)
class EntryFailure:
    """One entry of a batch call that the service did not take (`Failed` in the response)."""

    code: str
    message: str
    sender_fault: bool


SendCall = Callable[[Sequence[OutgoingMessage]], Mapping[int, EntryFailure]]
"""Sends one batch call; returns the failed entries by their position in the call."""


def batch_entries(call: Sequence[OutgoingMessage], body_key: Literal["MessageBody", "Message"]) -> list[dict[str, Any]]:
    """SendMessageBatch / PublishBatch entries; each `Id` is the message's position in the call."""
    entries = []
    for position, message in enumerate(call):
        entry: dict[str, Any] = {"Id": str(position), body_key: message.body, "MessageAttributes": message.attributes}
        if message.group_id is not None:
            entry["MessageGroupId"] = message.group_id
        if message.deduplication_id is not None:
            entry["MessageDeduplicationId"] = message.deduplication_id
        entries.append(entry)
    return entries


def failures_by_position(response: Mapping[str, Any]) -> dict[int, EntryFailure]:
    """The `Failed` list of a SendMessageBatch / PublishBatch response, keyed like `batch_entries` numbered it."""
    return {
        int(failure["Id"]): EntryFailure(
            code=str(failure.get("Code", "")),
            message=str(failure.get("Message", "")),
            sender_fault=bool(failure.get("SenderFault", False)),
        )
        for failure in response.get("Failed", [])
    }


class MessageSinkSettings(SinkSettings):
    """Fields the SQS and SNS sink configs share."""

    body_format: BodyFormat = Field(
        default="change",
        description="'change': plain JSON of the change, numbers exact; 'dynamodb': the stream record as AWS "
        "Lambda delivers it in a DynamoDB event.",
    )

    @property
    def address(self) -> str:
        """The queue URL or topic ARN."""
        raise NotImplementedError

    @property
    def fifo(self) -> bool:
        """FIFO queue and topic names end in `.fifo`."""
        return self.address.endswith(".fifo")


SettingsT = TypeVar("SettingsT", bound=MessageSinkSettings)


class MessageSink(Sink, Generic[SettingsT]):
    """What the SQS and SNS sinks share: a client made at `open()`, one message per record, batch calls.

    A subclass names its service, checks its destination exists and makes one batch call.
    """

    service: str
    """The boto3 service name, also the sink's name unless the config gives one."""
    kind: str
    """What the destination is called in errors and logs: 'SQS queue', 'SNS topic'."""
    default_concurrency = 16
    takes_snapshots = False
    """Queue and topic consumers usually want changes only; `initial_load = true` on the entry sends the load's
    items too, as messages with eventName SNAPSHOT."""
    """Ten messages a call: 16 calls in flight carry 8,000 a second at a 20 ms round trip and 3,200 at 50 ms, more
    than one process builds and sends (its CPU, not the round trip, is then the bound); more lanes only add GIL
    contention."""
    call_size = MAX_BATCH_ENTRIES

    def __init__(self, settings: SettingsT, *, region: str, endpoint_url: str | None, client: Any = None) -> None:
        super().__init__(settings.name or self.service)
        self.settings = settings
        # A FIFO destination keeps each item's changes in order; a standard one promises no order at all.
        self.ordering = "key" if settings.fifo else "any"
        self.destination = f"{self.kind} {settings.address}"
        self._region = region
        self._endpoint_url = endpoint_url
        self._client = client

    @property
    def client(self) -> Any:
        return self._client

    def open(self) -> None:
        if self._client is None:
            self._client = AwsClients(self._region, self._endpoint_url, max_pool_connections=256).client(self.service)
        with mapped_errors(self.destination):
            self._check_destination()

    def write(self, batch: Batch) -> WriteResult:
        fifo = self.settings.fifo
        messages = [build_message(record, self.settings.body_format, fifo=fifo) for record in batch.records]
        return send_in_calls(messages, self._send, fifo=fifo, what=self.destination)

    @abstractmethod
    def _check_destination(self) -> None:
        """Raise a client error when the destination is missing or not allowed."""

    @abstractmethod
    def _send(self, call: Sequence[OutgoingMessage]) -> Mapping[int, EntryFailure]:
        """One batch call; see `SendCall`."""


def send_in_calls(messages: Sequence[OutgoingMessage], send: SendCall, *, fifo: bool, what: str) -> WriteResult:
    """Send `messages` in as few batch calls as the limits allow, in order; report per-record outcomes.

    A message over the size limit is refused for good. Once a message is not taken, the later messages of its
    item (its FIFO group) in this write are held back (`NotAttemptedError`): a FIFO destination must receive an
    item's changes in order, and a pipeline that stops at a refusal must not send the item's next change. A call
    that fails as a whole raises when nothing of the write has been taken yet; after that its messages carry the
    call's error (`CallRefusedError` when it was refused for good, so that they are bisected) and the unsent rest
    is held back.
    """
    failed: dict[str, SinkError] = {}
    holding_back: dict[Hashable, str] = {}  # item (FIFO group) -> event id of the record it waits for
    pending: list[OutgoingMessage] = []
    for message in messages:
        item = _item_of(message) if holding_back else None
        if item is not None and item in holding_back:
            failed[message.record.event_id] = _held_back(message, holding_back[item], what)
        elif message.size > MAX_MESSAGE_BYTES:
            failed[message.record.event_id] = PermanentSinkError(
                f"{what}: the message for record {message.record.event_id} is {message.size} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte limit"
            )
            holding_back[_item_of(message)] = message.record.event_id
        else:
            pending.append(message)
    taken_any = False
    while pending:
        call, pending = _next_call(pending, fifo=fifo)
        try:
            with mapped_errors(what):
                entry_failures = send(call)
        except SinkError as error:
            if not taken_any:
                raise
            own: SinkError = (
                error
                if isinstance(error, RetryableSinkError)
                else CallRefusedError(f"{error} (a call of {len(call)} after others were taken)", detail=error.detail)
            )
            for message in call:
                failed[message.record.event_id] = own
            for message in pending:
                failed[message.record.event_id] = NotAttemptedError(
                    f"{what}: record {message.record.event_id} not sent: an earlier call of the write failed ({error})"
                )
            break
        for position, message in enumerate(call):
            entry_failure = entry_failures.get(position)
            if entry_failure is None:
                taken_any = True
                continue
            failed[message.record.event_id] = entry_error(entry_failure, what, message.record.event_id)
            holding_back[_item_of(message)] = message.record.event_id
        if holding_back:
            pending = _hold_back(pending, holding_back, failed, what)
    return WriteResult(failed=failed)


def _item_of(message: OutgoingMessage) -> Hashable:
    """The FIFO group; on a standard destination the item's key (equal keys meet, as on the lanes)."""
    return message.group_id if message.group_id is not None else message.record.item_key


def _held_back(message: OutgoingMessage, waits_for: str, what: str) -> NotAttemptedError:
    return NotAttemptedError(
        f"{what}: record {message.record.event_id} held back: record {waits_for}, an earlier change of the same "
        "item, was not taken"
    )


def _next_call(
    pending: Sequence[OutgoingMessage], *, fifo: bool
) -> tuple[list[OutgoingMessage], list[OutgoingMessage]]:
    """The next call's messages, and what is left, both in order: the earliest waiting message of each item (FIFO
    group) while they fit; an item whose next message does not fit sits this call out. One change per item per
    call, so that a change the service refuses in a call cannot have the item's next change taken beside it."""
    call: list[OutgoingMessage] = []
    rest: list[OutgoingMessage] = []
    call_bytes = 0
    items_seen: set[Hashable] = set()
    for index, message in enumerate(pending):
        if len(call) == MAX_BATCH_ENTRIES:
            rest.extend(pending[index:])
            break
        item = _item_of(message)
        if call_bytes + message.size <= MAX_MESSAGE_BYTES and item not in items_seen:
            call.append(message)
            call_bytes += message.size
        else:
            rest.append(message)
        items_seen.add(item)
    return call, rest


def _hold_back(
    pending: list[OutgoingMessage], holding_back: Mapping[Hashable, str], failed: dict[str, SinkError], what: str
) -> list[OutgoingMessage]:
    still: list[OutgoingMessage] = []
    for message in pending:
        waits_for = holding_back.get(_item_of(message))
        if waits_for is None:
            still.append(message)
        else:
            failed[message.record.event_id] = _held_back(message, waits_for, what)
    return still


def entry_error(failure: EntryFailure, what: str, event_id: str) -> SinkError:
    """A sender fault (invalid or too large) fails again if resent; anything else is the service's to retry."""
    text = f"{what} refused record {event_id}: {failure.code}"
    error_kind = PermanentSinkError if failure.sender_fault else RetryableSinkError
    return error_kind(text, detail=failure.message or None)


@contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """The one place where SQS and SNS client errors become the sink's two error kinds."""
    try:
        yield
    except SinkError:
        raise
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        detail = str(error.get("Message", "")) or None
        if code in _MISSING_DESTINATION_CODES:
            raise DestinationUnusableError(
                f"{what} does not exist or is not visible to these credentials ({code})"
            ) from exc
        if code in _FORBIDDEN_CODES:
            raise DestinationUnusableError(
                f"{what}: these credentials may not write to it ({code}); grant the permission named in the "
                "IAM section of the README",
                detail=detail,
            ) from exc
        if code in _THROTTLING_CODES or is_retryable(exc):
            raise RetryableSinkError(f"{what}: {code}", detail=detail) from exc
        raise PermanentSinkError(f"{what}: {code}", detail=detail) from exc  # access denied, validation, KMS ...
    except BotoCoreError as exc:
        if is_retryable(exc):  # connection resets, timeouts
            raise RetryableSinkError(f"{what}: {type(exc).__name__}", detail=str(exc)) from exc
        raise PermanentSinkError(f"{what}: {type(exc).__name__}", detail=str(exc)) from exc
