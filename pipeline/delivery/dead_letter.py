"""Where records go that a sink refused for good: each with its full payload, the sink and the reason.

AWS Lambda's on-failure destination keeps only the shard and sequence range, leaving the operator to fetch the
records before the stream trims them. A dead letter here carries the record itself, so it can be inspected and
replayed at any time.

Three destinations share one entry format (`dead_letter_entry`): a local JSONL file, an SQS queue (one message
per record) and S3 (one JSONL object per refusal). `put` returns only when the entries are durable, so the
checkpoint that follows never outruns them; if the destination stays down past the retry policy, `put` raises
and the pipeline stops without checkpointing: the records are read again on restart, never lost.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.aws import AwsClients
from pipeline.errors import RetryableError
from pipeline.records import ChangeRecord, to_json_bytes
from pipeline.retry import RetryPolicy
from pipeline.settings import DeadLetterSettings
from sinks.base import SinkError


def dead_letter_entry(record: ChangeRecord, sink_name: str, error: SinkError) -> dict[str, Any]:
    return {
        "sink": sink_name,
        "error": str(error),
        "error_kind": type(error).__name__,
        "failed_at": datetime.now(UTC).isoformat(),
        "event_id": record.event_id,
        "shard_id": record.shard_id,
        "sequence_number": record.sequence_number,
        "table": record.table,
        "record": record.raw,
    }


Refused = Sequence[tuple[ChangeRecord, SinkError]]

SQS_MAX_MESSAGE_BYTES = 256 * 1024
SQS_MAX_BATCH_ENTRIES = 10
_CALL_BUDGET = SQS_MAX_MESSAGE_BYTES - 2048  # bodies per call, leaving room for the attributes


class DeadLetters(Protocol):
    """A dead-letter destination. `location` names it for logs and status."""

    @property
    def location(self) -> str: ...

    def put(self, sink_name: str, refused: Refused) -> None: ...


class JsonlDeadLetters:
    """Appends one JSON object per line and fsyncs before returning, so a checkpoint never outruns it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0

    @property
    def location(self) -> str:
        return str(self.path)

    def put(self, sink_name: str, refused: Refused) -> None:
        if not refused:
            return
        self.append([dead_letter_entry(record, sink_name, error) for record, error in refused])

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        lines = b"".join(to_json_bytes(entry) + b"\n" for entry in entries)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as out:
                out.write(lines)
                out.flush()
                os.fsync(out.fileno())
            self.count += len(entries)


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
        return self._queue_url

    def put(self, sink_name: str, refused: Refused) -> None:
        entries = [dead_letter_entry(record, sink_name, error) for record, error in refused]
        bodies: list[tuple[dict[str, Any], bytes]] = []
        too_big: list[dict[str, Any]] = []
        for entry in entries:
            body = to_json_bytes(entry)
            if len(body) > SQS_MAX_MESSAGE_BYTES - 1024:
                too_big.append(entry)
                pointer = {k: v for k, v in entry.items() if k != "record"}
                pointer["record_stored_at"] = self._overflow.location
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
        for attempt in self._retry.retrying("dead letters to SQS"):
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
                    failed = response.get("Failed", [])
                    detail = "; ".join(f"{f.get('Code')}: {f.get('Message')}" for f in failed[:3])
                    raise _DeadLetterRetry(f"{len(pending)} dead letter(s) not accepted by SQS: {detail}")


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
        self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._retry = retry
        self.count = 0
        self.keys: list[str] = []

    @property
    def location(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    def put(self, sink_name: str, refused: Refused) -> None:
        if not refused:
            return
        entries = [dead_letter_entry(record, sink_name, error) for record, error in refused]
        first = refused[0][0]
        now = datetime.now(UTC)
        key = (
            f"{self._prefix}dt={now:%Y-%m-%d}/{sink_name}-{first.shard_id}-{first.sequence_number}-"
            f"{uuid.uuid4().hex[:8]}.jsonl"
        )
        body = b"".join(to_json_bytes(entry) + b"\n" for entry in entries)
        self._retry.call(
            "PutObject (dead letters)",
            self._s3.put_object,
            Bucket=self._bucket,
            Key=key,
            Body=body,
            ContentType="application/x-ndjson",
        )
        self.keys.append(key)
        self.count += len(entries)


class _DeadLetterRetry(RetryableError):
    """Some dead letters were not accepted; only those are sent again."""


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
