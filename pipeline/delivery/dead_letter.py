"""Where records go that a sink refused for good: each with its full payload, the sink and the reason.

AWS Lambda's on-failure destination keeps only the shard and sequence range, leaving the operator to fetch the
records before the stream trims them. A dead letter here carries the record itself, so it can be inspected and
replayed at any time.

Three destinations share one entry format (`dead_letter_entry`): a local JSONL file, an SQS queue (one message
per record) and S3 (one JSONL object per refusal). `open()` checks the destination at start, like a sink. `put`
returns only when the entries are durable, so the checkpoint that follows never outruns them; a destination that
is down is waited out like a sink outage (retried until it answers or the pipeline is stopped hard), and one that
refuses for good (missing, access denied) stops the pipeline without checkpointing: the records are read again
on restart, never lost. Every error names the dead-letter destination, so it is never mistaken for a sink's.

A record refused by its sink's `record_transform` is written without its images: that transform may be the
masking step, and the images are what it was to mask. Such an entry keeps the keys, the position, the sink and
the error's kind; a sink's refusal keeps the full record and the full reason.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import tenacity
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.aws import AwsClients
from pipeline.errors import RetryableError, error_code
from pipeline.object_names import key_segment, normalized_prefix
from pipeline.records import ChangeRecord, to_json_bytes
from pipeline.retry import RetryPolicy
from pipeline.settings import DeadLetterSettings
from sinks.base import PermanentSinkError, SinkError


class WithheldImagesError(PermanentSinkError):
    """A refusal whose dead letter must not carry the record's images (a failed `record_transform`)."""


class DeadLetterError(Exception):
    """The dead-letter destination refused for good (missing, access denied, not writable)."""


def dead_letter_entry(record: ChangeRecord, sink_name: str, error: SinkError) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "sink": sink_name,
        "error": error.full_text() if not isinstance(error, WithheldImagesError) else str(error),
        "error_kind": type(error).__name__,
        "failed_at": datetime.now(UTC).isoformat(),
        "event_id": record.event_id,
        "shard_id": record.shard_id,
        "sequence_number": record.sequence_number,
        "table": record.table,
    }
    if isinstance(error, WithheldImagesError):
        entry["keys"] = record.raw.get("dynamodb", {}).get("Keys")
        entry["record"] = None
        entry["images_withheld"] = "the sink's record_transform failed; the images it was to rewrite are not kept"
    else:
        entry["record"] = record.raw
    return entry


Refused = Sequence[tuple[ChangeRecord, SinkError]]

SQS_MAX_MESSAGE_BYTES = 256 * 1024
SQS_MAX_BATCH_ENTRIES = 10
_CALL_BUDGET = SQS_MAX_MESSAGE_BYTES - 2048  # bodies per call, leaving room for the attributes


class DeadLetters(Protocol):
    """A dead-letter destination. `location` names it for logs and status."""

    @property
    def location(self) -> str: ...

    def open(self) -> None:
        """Check the destination can take entries; raise DeadLetterError naming it if not."""

    def put(self, sink_name: str, refused: Refused) -> None: ...


class JsonlDeadLetters:
    """Appends one JSON object per line and fsyncs before returning, so a checkpoint never outruns it.

    Dead letters hold item data: a file it creates is readable by its owner only (0600), and so are the
    directories it creates for it (0700)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    @property
    def location(self) -> str:
        return f"dead-letter file {self.path}"

    def open(self) -> None:
        try:
            self._append(b"")
        except OSError as exc:
            raise DeadLetterError(
                f"dead-letter file {self.path} cannot be written ({type(exc).__name__}: {exc.strerror or exc}); "
                "fix dead_letter.path or its directory's permissions"
            ) from exc

    def put(self, sink_name: str, refused: Refused) -> None:
        if not refused:
            return
        self.append([dead_letter_entry(record, sink_name, error) for record, error in refused])

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        lines = b"".join(to_json_bytes(entry) + b"\n" for entry in entries)
        try:
            self._append(lines)
        except OSError as exc:
            raise DeadLetterError(f"dead-letter file {self.path}: {type(exc).__name__}: {exc.strerror or exc}") from exc
        self.count += len(entries)

    def _append(self, lines: bytes) -> None:
        with self._lock:
            _make_private_dirs(self.path.parent)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "ab") as out:
                out.write(lines)
                out.flush()
                os.fsync(out.fileno())


def _make_private_dirs(directory: Path) -> None:
    """Like `mkdir(parents=True)`, each directory it creates 0700; existing ones are left as they are."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        with suppress(FileExistsError):
            created.mkdir(mode=0o700)


class SqsDeadLetters:
    """One SQS message per refused record, with attributes `sink` and `error_kind` for routing and alarms.

    An entry over SQS's 256 KiB limit (a record too big for an SQS sink is a common reason to be here) goes to
    the JSONL `overflow` file in full, and the queue gets the same entry without the record and a pointer to
    the file, so the queue still shows every refusal.
    """

    def __init__(self, sqs: Any, queue_url: str, *, retry: RetryPolicy, overflow: JsonlDeadLetters) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._retry = retry
        self._overflow = overflow
        self.count = 0

    @property
    def location(self) -> str:
        return f"dead-letter SQS queue {self._queue_url}"

    def open(self) -> None:
        with _named(self.location):
            self._retry.call(
                f"GetQueueAttributes ({self.location})",
                self._sqs.get_queue_attributes,
                QueueUrl=self._queue_url,
                AttributeNames=["QueueArn"],
            )
        self._overflow.open()

    def put(self, sink_name: str, refused: Refused) -> None:
        entries = [dead_letter_entry(record, sink_name, error) for record, error in refused]
        bodies: list[tuple[dict[str, Any], bytes]] = []
        too_big: list[dict[str, Any]] = []
        for entry in entries:
            body = to_json_bytes(entry)
            if len(body) > SQS_MAX_MESSAGE_BYTES - 1024:
                too_big.append(entry)
                pointer = {k: v for k, v in entry.items() if k != "record"}
                pointer["record_stored_at"] = str(self._overflow.path)
                body = to_json_bytes(pointer)
            bodies.append((entry, body))
        if too_big:
            self._overflow.append(too_big)
        for call in _calls(bodies):
            self._send(call)
        self.count += len(entries)

    def _send(self, chunk: list[tuple[dict[str, Any], bytes]]) -> None:
        pending = {
            str(n): {
                "Id": str(n),
                "MessageBody": body.decode("utf-8"),
                "MessageAttributes": {
                    "sink": {"DataType": "String", "StringValue": entry["sink"]},
                    "error_kind": {"DataType": "String", "StringValue": entry["error_kind"]},
                },
            }
            for n, (entry, body) in enumerate(chunk)
        }
        with _named(self.location):
            self._send_until_taken(chunk, pending)

    def _send_until_taken(self, chunk: list[tuple[dict[str, Any], bytes]], pending: dict[str, Any]) -> None:
        for attempt in self._retry.retrying(f"SendMessageBatch ({self.location})", stop=tenacity.stop_never):
            with attempt:
                response = self._sqs.send_message_batch(QueueUrl=self._queue_url, Entries=list(pending.values()))
                for ok in response.get("Successful", []):
                    pending.pop(ok["Id"], None)
                refused = [f for f in response.get("Failed", []) if f.get("SenderFault") and f["Id"] in pending]
                if refused:
                    # The queue will never take these: keep them whole in the file instead of retrying forever.
                    self._overflow.append([chunk[int(f["Id"])][0] for f in refused])
                    for failure in refused:
                        pending.pop(failure["Id"])
                if pending:
                    codes = sorted({str(f.get("Code")) for f in response.get("Failed", [])})
                    raise _DeadLetterRetry(f"{len(pending)} dead letter(s) not accepted by SQS: {', '.join(codes)}")


def _calls(bodies: list[tuple[dict[str, Any], bytes]]) -> list[list[tuple[dict[str, Any], bytes]]]:
    """Pack messages in order into SendMessageBatch calls of at most 10 entries and 256 KiB in total."""
    calls: list[list[tuple[dict[str, Any], bytes]]] = []
    size = 0
    for entry in bodies:
        if not calls or len(calls[-1]) == SQS_MAX_BATCH_ENTRIES or size + len(entry[1]) > _CALL_BUDGET:
            calls.append([])
            size = 0
        calls[-1].append(entry)
        size += len(entry[1])
    return calls


class S3DeadLetters:
    """One JSONL object per refusal under `<prefix>dt=YYYY-MM-DD/`, named by sink, shard and first sequence."""

    def __init__(self, s3: Any, bucket: str, prefix: str, *, retry: RetryPolicy) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._prefix = normalized_prefix(prefix)
        self._retry = retry
        self.count = 0
        self.last_key: str | None = None

    @property
    def location(self) -> str:
        return f"dead-letter bucket s3://{self._bucket}/{self._prefix}"

    def open(self) -> None:
        with _named(self.location):
            self._retry.call(f"HeadBucket ({self.location})", self._s3.head_bucket, Bucket=self._bucket)

    def put(self, sink_name: str, refused: Refused) -> None:
        if not refused:
            return
        entries = [dead_letter_entry(record, sink_name, error) for record, error in refused]
        first = refused[0][0]
        now = datetime.now(UTC)
        key = (
            f"{self._prefix}dt={now:%Y-%m-%d}/{key_segment(sink_name)}-{key_segment(first.shard_id)}-"
            f"{key_segment(first.sequence_number)}-{uuid.uuid4().hex[:8]}.jsonl"
        )
        body = b"".join(to_json_bytes(entry) + b"\n" for entry in entries)
        with _named(self.location):
            for attempt in self._retry.retrying(f"PutObject ({self.location})", stop=tenacity.stop_never):
                with attempt:
                    self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/x-ndjson")
        self.last_key = key
        self.count += len(entries)


class _DeadLetterRetry(RetryableError):
    """Some dead letters were not accepted; only those are sent again."""


@contextmanager
def _named(location: str) -> Iterator[None]:
    """A refusal for good becomes a DeadLetterError that names the destination (retryable errors are retried
    inside, until the destination answers)."""
    try:
        yield
    except ClientError as exc:
        raise DeadLetterError(f"{location}: {error_code(exc) or exc}") from exc
    except BotoCoreError as exc:
        raise DeadLetterError(f"{location}: {type(exc).__name__}") from exc


def build_dead_letters(settings: DeadLetterSettings, clients: AwsClients, retry: RetryPolicy) -> DeadLetters:
    """The destination `[dead_letter]` names; clients default to the source's region and endpoint."""
    jsonl = JsonlDeadLetters(settings.path)
    if settings.destination == "sqs":
        assert settings.queue_url is not None
        sqs = clients.client("sqs", settings.region, settings.endpoint_url)
        return SqsDeadLetters(sqs, settings.queue_url, retry=retry, overflow=jsonl)
    if settings.destination == "s3":
        assert settings.bucket is not None
        s3 = clients.client("s3", settings.region, settings.endpoint_url)
        return S3DeadLetters(s3, settings.bucket, settings.prefix, retry=retry)
    return jsonl
