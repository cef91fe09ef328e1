"""A local endpoint that answers the sinks' SQS, SNS, DynamoDB and S3 calls after a set round trip.

Why: moto answers correctly but spends milliseconds of CPU on every call, so against it each sink runs at moto's
speed and sending calls concurrently shows nothing (`bench/sink_throughput.py`). This endpoint spends 0.15-0.5 ms of
CPU on a call (mostly aiohttp's HTTP handling), then waits `latency_ms` on an asyncio timer before it answers, so a
sink's rate against it is bounded by the sink's own CPU and by how many calls it keeps in flight, as against AWS.
It is a measuring instrument, not a stand-in for correctness tests: it keeps nothing (a message sent is not stored,
an object written cannot be read back), does not check signatures, and answers only the calls the sinks make.

What it speaks, as botocore 1.43 sends it (the service is told from the SigV4 credential scope of each request):

- SQS, JSON 1.0 (`X-Amz-Target: AmazonSQS.*`): GetQueueAttributes, SendMessage, SendMessageBatch. MD5OfMessageBody
  and MD5OfMessageAttributes are computed as SQS does, although this botocore no longer checks them.
- SNS, query (form-encoded POST, XML answers): GetTopicAttributes, Publish, PublishBatch.
- DynamoDB, JSON 1.0 (`X-Amz-Target: DynamoDB_20120810.*`): DescribeTable (key schema from `key_schema`, ACTIVE),
  PutItem, DeleteItem, BatchWriteItem. Every answer carries a correct `x-amz-crc32` (botocore treats a mismatch as
  a reason to retry, so a client that makes one attempt, as the sinks' do, would not notice a wrong one).
- S3, REST, path-style (botocore's choice for an endpoint_url that is an IP address): HeadBucket, PutObject,
  CreateMultipartUpload, UploadPart, CompleteMultipartUpload, AbortMultipartUpload, DeleteObject; HeadObject and
  GetObject answer 404, ListObjectsV2 an empty listing. Bodies are read and thrown away. `pq.write_table` through
  s3fs makes one PutObject for a file under s3fs's block size (50 MiB), the multipart calls above it.
- Anything else: 400 naming the operation, counted under `unsupported`, so a benchmark notices.

Failures on demand (`entry_failure_rate`, drawn from a generator seeded with `seed`, reset by `/_reset`): that
fraction of SendMessageBatch / PublishBatch entries comes back Failed (SenderFault false, InternalError), of
PutItem / DeleteItem calls fails with ProvisionedThroughputExceededException, of BatchWriteItem items comes back
unprocessed, of SendMessage / Publish calls fails with a 500. `condition_failure_rate`: that fraction of
conditional PutItem / DeleteItem calls fails with ConditionalCheckFailedException. The draws follow the order the
calls arrive in, so they repeat exactly for calls made one at a time. S3 calls never fail on demand. What SQS and
SNS refuse whatever the rate (an empty batch, more than 10 entries, duplicate ids, a FIFO entry without a group
id) is refused here too, and counted as `refused`.

Control, JSON on the same port: `GET /_stats` (per service and operation: calls, entries, bytes received, calls
and entries failed on demand, requests refused; calls in flight now, at most and on average since the last reset;
elapsed seconds and the endpoint's own CPU seconds), `GET|POST /_config`, `POST /_reset` (zeroes the figures).

Run from the repository root:
    python bench/latency_endpoint.py --port 0 --latency-ms 20   # prints "listening http://127.0.0.1:PORT"
    python bench/latency_endpoint.py --self-check               # the four real sinks against it; exit 1 if wrong
    python bench/latency_endpoint.py --capacity                 # calls/s it serves, and its CPU per call
From a benchmark in bench/:
    with LatencyEndpoint(latency_ms=20).start() as endpoint:    # a child process: its CPU is not the pipeline's
        ... endpoint_url=endpoint.url ...; endpoint.stats(); endpoint.set(entry_failure_rate=0.1); endpoint.reset()
Prints figures; the self-check asserts what was answered, never timings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import unquote_plus
from xml.sax.saxutils import escape

import orjson
from aiohttp import web

if TYPE_CHECKING:  # the endpoint process imports none of the pipeline: the self-check and capacity runs do
    from pipeline.records import Batch
    from sinks.base import Sink, WriteResult

HERE = Path(__file__).resolve()
REGION = "us-east-1"
ACCOUNT = "123456789012"
DEFAULT_KEY_SCHEMA = "pk:S,sk:S"
SERVICES = ("sqs", "sns", "dynamodb", "s3")

_SNS_NAMESPACE = "http://sns.amazonaws.com/doc/2010-03-31/"
_S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
_JSON = "application/x-amz-json-1.0"
_XML = "text/xml"
_SQS_PREFIXED = frozenset({"TooManyEntriesInBatchRequest", "BatchEntryIdsNotDistinct", "EmptyBatchRequest"})
_ON_DEMAND = "failed on demand by the latency endpoint (entry_failure_rate)"

_Answer = tuple[int, bytes, dict[str, str]]
"""HTTP status, body, headers."""


# --- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What the endpoint answers, changed while it runs by `POST /_config`."""

    latency_ms: float = 0.0
    """Added before every answer: the round trip to the service."""
    entry_failure_rate: float = 0.0
    condition_failure_rate: float = 0.0
    seed: int = 0
    key_schema: str = DEFAULT_KEY_SCHEMA
    """DescribeTable's key: `name:type` of the hash key, then optionally `,name:type` of the range key (S, N, B)."""

    def updated(self, changes: Mapping[str, Any]) -> Config:
        """A copy with `changes` applied; ValueError names a key that is unknown or a value out of range."""
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(kinds))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(kinds)}")
        casts: dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "str": str}
        try:
            values = {name: casts[str(kinds[name])](value) for name, value in changes.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config values must be numbers (key_schema a string): {exc}") from None
        new = dataclasses.replace(self, **values)
        if not new.latency_ms >= 0:  # NaN too
            raise ValueError("latency_ms must be at least 0")
        for name in ("entry_failure_rate", "condition_failure_rate"):
            if not 0.0 <= getattr(new, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        key_schema(new.key_schema)
        return new


def key_schema(text: str) -> list[tuple[str, str]]:
    """`pk:S,sk:S` -> [("pk", "S"), ("sk", "S")]: the hash key, then the range key if any."""
    parts = [part.strip().split(":") for part in text.split(",") if part.strip()]
    if not 1 <= len(parts) <= 2 or any(len(p) != 2 or not p[0] or p[1] not in ("S", "N", "B") for p in parts):
        raise ValueError(f"key_schema must be 'name:type' or 'name:type,name:type' with types S, N or B; got {text!r}")
    return [(name, kind) for name, kind in parts]


# --- figures -------------------------------------------------------------------------------------------------


class Gauge:
    """Calls in flight: now, the most at once, and the count integrated over time (its mean since `since`)."""

    __slots__ = ("area", "changed", "current", "peak", "since")

    def __init__(self, now: float) -> None:
        self.current = self.peak = 0
        self.area = 0.0
        self.since = self.changed = now

    def add(self, delta: int, now: float) -> None:
        self.area += self.current * (now - self.changed)
        self.changed = now
        self.current += delta
        if self.current > self.peak:
            self.peak = self.current

    def restart(self, now: float) -> None:
        """Zero the peak and the mean, keeping the calls still in flight (they will leave)."""
        self.area = 0.0
        self.peak = self.current
        self.since = self.changed = now

    def mean(self, now: float) -> float:
        return (self.area + self.current * (now - self.changed)) / max(now - self.since, 1e-9)


@dataclass(slots=True)
class _Counts:
    """One operation's figures."""

    calls: int = 0
    entries: int = 0
    """Messages of a batch call, items of a BatchWriteItem, 1 for single-item calls."""
    bytes_received: int = 0
    failed_calls: int = 0
    """Whole calls failed on demand: throttled or condition-failed PutItem / DeleteItem, SendMessage / Publish."""
    failed_entries: int = 0
    """Entries failed on demand, for the sender to retry: Failed batch entries, unprocessed items, throttled or
    failed single-item calls. A failed condition is not one (the replica counts it as taken)."""
    refused: int = 0
    """Requests the service itself would refuse (no entries or more than 10, duplicate ids, no FIFO group id), or
    that could not be read."""


class _Stats:
    """Everything `/_stats` reports; a call costs a few attribute updates."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.overall = Gauge(now)
        self.gauges = {service: Gauge(now) for service in SERVICES}
        self.reset(now)

    def reset(self, now: float) -> None:
        self.since = now
        self.cpu_at = time.process_time()
        self.overall.restart(now)
        for gauge in self.gauges.values():
            gauge.restart(now)
        self.counts: dict[str, dict[str, _Counts]] = {service: {} for service in self.gauges}
        self.unsupported: dict[str, int] = {}

    def enter(self, service: str) -> None:
        now = time.monotonic()
        self.overall.add(1, now)
        gauge = self.gauges.get(service)
        if gauge is None:
            gauge = self.gauges[service] = Gauge(now)
            self.counts[service] = {}
        gauge.add(1, now)

    def leave(self, service: str) -> None:
        now = time.monotonic()
        self.overall.add(-1, now)
        self.gauges[service].add(-1, now)

    def counts_for(self, service: str, operation: str) -> _Counts:
        operations = self.counts[service]
        counts = operations.get(operation)
        if counts is None:
            counts = operations[operation] = _Counts()
        return counts

    def report(self, config: Config) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = now - self.since
        services: dict[str, Any] = {}
        for service, gauge in self.gauges.items():
            operations = {name: dataclasses.asdict(counts) for name, counts in sorted(self.counts[service].items())}
            services[service] = {
                "calls": sum(c["calls"] for c in operations.values()),
                "in_flight": gauge.current,
                "max_in_flight": gauge.peak,
                "mean_in_flight": gauge.mean(now),
                "operations": operations,
            }
        calls = sum(s["calls"] for s in services.values()) + sum(self.unsupported.values())
        return {
            "elapsed_seconds": elapsed,
            "cpu_seconds": time.process_time() - self.cpu_at,
            "calls": calls,
            "calls_per_second": calls / max(elapsed, 1e-9),
            "in_flight": self.overall.current,
            "max_in_flight": self.overall.peak,
            "mean_in_flight": self.overall.mean(now),
            "services": services,
            "unsupported": dict(self.unsupported),
            "config": dataclasses.asdict(config),
        }


# --- the endpoint --------------------------------------------------------------------------------------------


def sqs_attributes_md5(attributes: Mapping[str, Mapping[str, Any]]) -> str:
    """MD5OfMessageAttributes as SQS computes it: per attribute in name order, length-prefixed name, data type,
    a transport byte (1 string, 2 binary) and the length-prefixed value."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(attributes):  # code point order is UTF-8 byte order, which SQS sorts by
        attribute = attributes[name]
        if "BinaryValue" in attribute:
            transport, value = b"\x02", base64.b64decode(attribute["BinaryValue"])
        else:
            transport, value = b"\x01", str(attribute.get("StringValue", "")).encode()
        for part in (name.encode(), str(attribute.get("DataType", "")).encode()):
            digest.update(struct.pack("!I", len(part)) + part)
        digest.update(transport + struct.pack("!I", len(value)) + value)
    return digest.hexdigest()


def service_of(request: web.BaseRequest) -> str:
    """The service of a SigV4-signed request: `Credential=<key>/<date>/<region>/<service>/aws4_request`."""
    authorization = request.headers.get("Authorization", "")
    start = authorization.find("Credential=")
    if start >= 0:
        scope = authorization[start + 11 :].split(",", 1)[0].split("/")
        if len(scope) == 5:
            return scope[3]
    target = request.headers.get("X-Amz-Target", "")
    if target.startswith("AmazonSQS."):
        return "sqs"
    if target.startswith("DynamoDB_"):
        return "dynamodb"
    return "unsigned"


def _s3_operation(method: str, key: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The S3 operation of a path-style request, by method, key and query, as botocore's REST model maps them."""
    if not key:
        if method == "HEAD":
            return "HeadBucket"
        if method == "GET":
            return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
        return f"{method} bucket"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "UploadPartCopy" if "uploadId" in query else "CopyObject"
        return "UploadPart" if "uploadId" in query else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in query else "POST object"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    return f"{method} object"


def _form(body: bytes) -> dict[bytes, bytes]:
    """A form body's fields, still quoted: only the few that are read get unquoted (messages are most bytes)."""
    fields: dict[bytes, bytes] = {}
    for pair in body.split(b"&"):
        name, _, value = pair.partition(b"=")
        fields[name] = value
    return fields


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    value = fields.get(name)
    return None if value is None else unquote_plus(value.decode("ascii", "replace"))


@dataclass(slots=True)
class _Call:
    """One request as a handler sees it."""

    request: web.BaseRequest
    operation: str
    body: bytes
    counts: _Counts
    form: dict[bytes, bytes] = field(default_factory=dict)


class Endpoint:
    """The request handler and the figures: everything but the socket."""

    def __init__(self, config: Config, region: str = REGION) -> None:
        self.config = config
        self.region = region
        self.stats = _Stats()
        self._random = random.Random(config.seed)
        self._latency = config.latency_ms / 1000
        self._ids = itertools.count(1)
        self._boot = random.getrandbits(32)
        self._attribute_digests: dict[bytes, str] = {}
        self._handlers: dict[tuple[str, str], Callable[[_Call], _Answer]] = {
            ("sqs", "GetQueueAttributes"): self._get_queue_attributes,
            ("sqs", "SendMessage"): self._send_message,
            ("sqs", "SendMessageBatch"): self._send_message_batch,
            ("sns", "GetTopicAttributes"): self._get_topic_attributes,
            ("sns", "Publish"): self._publish,
            ("sns", "PublishBatch"): self._publish_batch,
            ("dynamodb", "DescribeTable"): self._describe_table,
            ("dynamodb", "PutItem"): self._write_item,
            ("dynamodb", "DeleteItem"): self._write_item,
            ("dynamodb", "BatchWriteItem"): self._batch_write_item,
            ("s3", "HeadBucket"): self._head_bucket,
            ("s3", "ListObjectsV2"): self._list_objects_v2,
            ("s3", "HeadObject"): self._no_such_key,
            ("s3", "GetObject"): self._no_such_key,
            ("s3", "PutObject"): self._put_object,
            ("s3", "UploadPart"): self._put_object,
            ("s3", "CreateMultipartUpload"): self._create_multipart_upload,
            ("s3", "CompleteMultipartUpload"): self._complete_multipart_upload,
            ("s3", "AbortMultipartUpload"): self._no_content,
            ("s3", "DeleteObject"): self._no_content,
        }
        self._errors: dict[str, Callable[[str, str, int], _Answer]] = {
            "sqs": self._sqs_error,
            "sns": self._sns_error,
            "dynamodb": self._dynamodb_error,
            "s3": self._s3_error,
        }

    def configure(self, changes: Mapping[str, Any]) -> None:
        self.config = self.config.updated(changes)
        self._latency = self.config.latency_ms / 1000
        if "seed" in changes:
            self._random.seed(self.config.seed)

    def reset(self) -> None:
        self.stats.reset(time.monotonic())
        self._random.seed(self.config.seed)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/_"):  # no bucket name starts with "_"
            return await self._control(request)
        service = service_of(request)
        self.stats.enter(service)
        try:
            status, body, headers = await self._answer(service, request)
            if self._latency > 0:
                await asyncio.sleep(self._latency)
        finally:
            self.stats.leave(service)
        return web.Response(status=status, body=body, headers=headers)

    async def _answer(self, service: str, request: web.BaseRequest) -> _Answer:
        if request.headers.get("Expect", "").lower() == "100-continue":  # as aiohttp's router would answer
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        form: dict[bytes, bytes] = {}
        if service == "s3":
            bucket, _, key = request.path[1:].partition("/")
            operation = _s3_operation(request.method, key, request.query, request.headers) if bucket else "ListBuckets"
            body = b""  # read and thrown away: an UploadPart is 5 MiB or more
            size = 0
            while chunk := await request.content.readany():
                size += len(chunk)
        else:
            body = await request.content.read()
            size = len(body)
            if service == "sns":
                form = _form(body)
                operation = _text(form, b"Action") or "(no Action)"
            else:
                operation = request.headers.get("X-Amz-Target", "").partition(".")[2] or "(no X-Amz-Target)"
        handler = self._handlers.get((service, operation))
        if handler is None:
            name = f"{service} {operation}"
            self.stats.unsupported[name] = self.stats.unsupported.get(name, 0) + 1
            message = f"the latency endpoint does not answer {name} ({request.method} {request.path})"
            # What each protocol's services answer for an operation they do not know.
            code = {"sqs": "UnknownOperationException", "dynamodb": "UnknownOperationException", "sns": "InvalidAction"}
            return self._errors.get(service, self._s3_error)(code.get(service, "NotImplemented"), message, 400)
        counts = self.stats.counts_for(service, operation)
        counts.calls += 1
        counts.bytes_received += size
        try:
            return handler(_Call(request, operation, body, counts, form))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a body not in the shape botocore sends
            counts.refused += 1
            message = f"the latency endpoint could not read this {service} {operation} request: {exc!r}"
            return self._errors[service]("SerializationException", message, 400)

    def _fails(self, rate: float) -> bool:
        return rate > 0.0 and self._random.random() < rate

    def _id(self) -> str:
        return f"{self._boot:08x}-0000-4000-8000-{next(self._ids):012x}"

    def _sequence(self) -> str:
        return f"{next(self._ids):020d}"

    # -- SQS (JSON 1.0) --

    def _sqs_json(self, document: Any) -> _Answer:
        return 200, orjson.dumps(document), {"Content-Type": _JSON, "x-amzn-RequestId": self._id()}

    def _sqs_error(self, code: str, message: str, status: int) -> _Answer:
        body = orjson.dumps({"__type": f"com.amazonaws.sqs#{code}", "message": message})
        # The query-compatible code botocore prefers for SQS (awsQueryCompatible), as SQS spells it.
        prefix = "AWS.SimpleQueueService." if code in _SQS_PREFIXED else ""
        query_error = f"{prefix}{code};{'Sender' if status < 500 else 'Receiver'}"
        return status, body, {"Content-Type": _JSON, "x-amzn-query-error": query_error, "x-amzn-RequestId": self._id()}

    def _get_queue_attributes(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        path = str(orjson.loads(call.body).get("QueueUrl", "")).rstrip("/").split("/")  # .../<account>/<name>
        name = path[-1]
        account = path[-2] if len(path) > 1 and path[-2].isdigit() else ACCOUNT
        attributes = {"QueueArn": f"arn:aws:sqs:{self.region}:{account}:{name}"}
        if name.endswith(".fifo"):
            attributes["FifoQueue"] = "true"
        return self._sqs_json({"Attributes": attributes})

    def _sqs_entry(self, entry: Mapping[str, Any], fifo: bool) -> dict[str, Any]:
        answer = {
            "Id": entry["Id"],
            "MessageId": self._id(),
            "MD5OfMessageBody": hashlib.md5(
                str(entry.get("MessageBody", "")).encode(), usedforsecurity=False
            ).hexdigest(),
        }
        attributes = entry.get("MessageAttributes")
        if attributes:
            # The sinks send a handful of distinct attribute sets: the digest is looked up, not recomputed (4 us).
            cache_key = orjson.dumps(attributes)
            digest = self._attribute_digests.get(cache_key)
            if digest is None:
                if len(self._attribute_digests) >= 4096:
                    self._attribute_digests.clear()
                digest = self._attribute_digests[cache_key] = sqs_attributes_md5(attributes)
            answer["MD5OfMessageAttributes"] = digest
        if fifo:
            answer["SequenceNumber"] = self._sequence()
        return answer

    def _send_message(self, call: _Call) -> _Answer:
        request = orjson.loads(call.body)
        call.counts.entries += 1
        fifo = str(request.get("QueueUrl", "")).endswith(".fifo")
        if fifo and not request.get("MessageGroupId"):
            call.counts.refused += 1
            return self._sqs_error("MissingParameter", "The request must contain the parameter MessageGroupId.", 400)
        if self._fails(self.config.entry_failure_rate):
            call.counts.failed_calls += 1
            call.counts.failed_entries += 1
            return self._sqs_error("InternalError", _ON_DEMAND, 500)
        answer = self._sqs_entry({**request, "Id": ""}, fifo)
        del answer["Id"]
        return self._sqs_json(answer)

    def _send_message_batch(self, call: _Call) -> _Answer:
        request = orjson.loads(call.body)
        entries: list[dict[str, Any]] = request.get("Entries") or []
        fifo = str(request.get("QueueUrl", "")).endswith(".fifo")
        refusal = _batch_refusal([e.get("Id") for e in entries], fifo, [bool(e.get("MessageGroupId")) for e in entries])
        if refusal is not None:
            call.counts.refused += 1
            return self._sqs_error(*refusal, 400)
        call.counts.entries += len(entries)
        successful, failed = [], []
        rate = self.config.entry_failure_rate
        for entry in entries:
            if self._fails(rate):
                failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError", "Message": _ON_DEMAND})
            else:
                successful.append(self._sqs_entry(entry, fifo))
        call.counts.failed_entries += len(failed)
        return self._sqs_json({"Successful": successful, "Failed": failed})

    # -- SNS (query: form in, XML out) --

    def _sns_xml(self, operation: str, result: str) -> _Answer:
        body = (
            f'<{operation}Response xmlns="{_SNS_NAMESPACE}"><{operation}Result>{result}</{operation}Result>'
            f"<ResponseMetadata><RequestId>{self._id()}</RequestId></ResponseMetadata></{operation}Response>"
        )
        return 200, body.encode(), {"Content-Type": _XML}

    def _sns_error(self, code: str, message: str, status: int) -> _Answer:
        party = "Sender" if status < 500 else "Receiver"
        body = (
            f'<ErrorResponse xmlns="{_SNS_NAMESPACE}"><Error><Type>{party}</Type><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message></Error><RequestId>{self._id()}</RequestId></ErrorResponse>"
        )
        return status, body.encode(), {"Content-Type": _XML}

    def _get_topic_attributes(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        arn = _text(call.form, b"TopicArn") or ""
        attributes = {"TopicArn": arn, "Owner": ACCOUNT, "DisplayName": "", "SubscriptionsConfirmed": "0"}
        if arn.endswith(".fifo"):
            attributes["FifoTopic"] = "true"
        entries = "".join(
            f"<entry><key>{name}</key><value>{escape(value)}</value></entry>" for name, value in attributes.items()
        )
        return self._sns_xml("GetTopicAttributes", f"<Attributes>{entries}</Attributes>")

    def _publish(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        fifo = (_text(call.form, b"TopicArn") or "").endswith(".fifo")
        if fifo and b"MessageGroupId" not in call.form:
            call.counts.refused += 1
            return self._sns_error("InvalidParameter", "The MessageGroupId parameter is required for FIFO topics", 400)
        if self._fails(self.config.entry_failure_rate):
            call.counts.failed_calls += 1
            call.counts.failed_entries += 1
            return self._sns_error("InternalError", _ON_DEMAND, 500)
        sequence = f"<SequenceNumber>{self._sequence()}</SequenceNumber>" if fifo else ""
        return self._sns_xml("Publish", f"<MessageId>{self._id()}</MessageId>{sequence}")

    def _publish_batch(self, call: _Call) -> _Answer:
        form = call.form
        fifo = (_text(form, b"TopicArn") or "").endswith(".fifo")
        ids: list[str | None] = []
        grouped: list[bool] = []
        for n in itertools.count(1):
            member = b"PublishBatchRequestEntries.member.%d." % n
            entry_id = _text(form, member + b"Id")
            if entry_id is None and member + b"Message" not in form:
                break
            ids.append(entry_id)
            grouped.append(member + b"MessageGroupId" in form)
        refusal = _batch_refusal(ids, fifo, grouped)
        if refusal is not None:
            call.counts.refused += 1
            return self._sns_error(*refusal, 400)
        call.counts.entries += len(ids)
        successful, failed = [], []
        rate = self.config.entry_failure_rate
        for entry_id in ids:
            name = escape(entry_id or "")
            if self._fails(rate):
                failed.append(
                    f"<member><Id>{name}</Id><Code>InternalError</Code><Message>{_ON_DEMAND}</Message>"
                    "<SenderFault>false</SenderFault></member>"
                )
            else:
                sequence = f"<SequenceNumber>{self._sequence()}</SequenceNumber>" if fifo else ""
                successful.append(f"<member><Id>{name}</Id><MessageId>{self._id()}</MessageId>{sequence}</member>")
        call.counts.failed_entries += len(failed)
        return self._sns_xml(
            "PublishBatch", f"<Successful>{''.join(successful)}</Successful><Failed>{''.join(failed)}</Failed>"
        )

    # -- DynamoDB (JSON 1.0, with the CRC32 botocore checks) --

    def _dynamodb_json(self, status: int, document: Any) -> _Answer:
        body = orjson.dumps(document)
        headers = {"Content-Type": _JSON, "x-amz-crc32": str(zlib.crc32(body)), "x-amzn-RequestId": self._id()}
        return status, body, headers

    def _dynamodb_error(self, code: str, message: str, status: int) -> _Answer:
        return self._dynamodb_json(status, {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message})

    def _describe_table(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        name = str(orjson.loads(call.body).get("TableName", "")).rpartition("/")[2]  # a name or an ARN
        schema = key_schema(self.config.key_schema)
        table = {
            "TableName": name,
            "TableArn": f"arn:aws:dynamodb:{self.region}:{ACCOUNT}:table/{name}",
            "TableId": self._id(),
            "TableStatus": "ACTIVE",
            "KeySchema": [
                {"AttributeName": attribute, "KeyType": "HASH" if n == 0 else "RANGE"}
                for n, (attribute, _) in enumerate(schema)
            ],
            "AttributeDefinitions": [{"AttributeName": attribute, "AttributeType": kind} for attribute, kind in schema],
            "CreationDateTime": 1_700_000_000.0,
            "ItemCount": 0,
            "TableSizeBytes": 0,
            "BillingModeSummary": {"BillingMode": "PAY_PER_REQUEST"},
            "ProvisionedThroughput": {"NumberOfDecreasesToday": 0, "ReadCapacityUnits": 0, "WriteCapacityUnits": 0},
        }
        return self._dynamodb_json(200, {"Table": table})

    def _write_item(self, call: _Call) -> _Answer:
        """PutItem and DeleteItem: the body is not parsed, only searched for a condition."""
        counts = call.counts
        counts.entries += 1
        if self._fails(self.config.entry_failure_rate):
            counts.failed_calls += 1
            counts.failed_entries += 1
            return self._dynamodb_error(
                "ProvisionedThroughputExceededException",
                "The level of configured provisioned throughput for the table was exceeded (on demand, "
                "entry_failure_rate)",
                400,
            )
        if b'"ConditionExpression"' in call.body and self._fails(self.config.condition_failure_rate):
            counts.failed_calls += 1
            return self._dynamodb_error("ConditionalCheckFailedException", "The conditional request failed", 400)
        return self._dynamodb_json(200, {})

    def _batch_write_item(self, call: _Call) -> _Answer:
        requests: dict[str, list[Any]] = orjson.loads(call.body).get("RequestItems") or {}
        items = sum(len(writes) for writes in requests.values())
        if not 1 <= items <= 25:
            call.counts.refused += 1
            return self._dynamodb_error(
                "ValidationException", f"BatchWriteItem takes 1 to 25 requests; this one has {items}", 400
            )
        call.counts.entries += items
        unprocessed: dict[str, list[Any]] = {}
        rate = self.config.entry_failure_rate
        for table, writes in requests.items():
            left = [write for write in writes if self._fails(rate)]
            if left:
                unprocessed[table] = left
                call.counts.failed_entries += len(left)
        return self._dynamodb_json(200, {"UnprocessedItems": unprocessed})

    # -- S3 (REST, path-style) --

    def _s3_headers(self, **more: str) -> dict[str, str]:
        return {"x-amz-request-id": f"{next(self._ids):016X}", "x-amz-id-2": "latency-endpoint", **more}

    def _s3_error(self, code: str, message: str, status: int) -> _Answer:
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{escape(message)}</Message>'
        body += "</Error>"
        return status, body.encode(), self._s3_headers(**{"Content-Type": "application/xml"})

    def _s3_xml(self, element: str, inner: str) -> _Answer:
        body = f'<?xml version="1.0" encoding="UTF-8"?><{element} xmlns="{_S3_NAMESPACE}">{inner}</{element}>'
        return 200, body.encode(), self._s3_headers(**{"Content-Type": "application/xml"})

    @staticmethod
    def _location(call: _Call) -> tuple[str, str]:
        bucket, _, key = call.request.path[1:].partition("/")
        return escape(bucket), escape(key)

    def _etag(self) -> str:
        return f'"{next(self._ids):032x}"'

    def _head_bucket(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        return 200, b"", self._s3_headers(**{"x-amz-bucket-region": self.region})

    def _list_objects_v2(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        bucket, _ = self._location(call)
        prefix = escape(call.request.query.get("prefix", ""))
        inner = f"<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
        return self._s3_xml("ListBucketResult", inner + "<IsTruncated>false</IsTruncated>")

    def _no_such_key(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        if call.request.method == "HEAD":
            return 404, b"", self._s3_headers()
        return self._s3_error(
            "NoSuchKey", "The specified key does not exist (the latency endpoint keeps nothing).", 404
        )

    def _put_object(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        return 200, b"", self._s3_headers(ETag=self._etag())

    def _create_multipart_upload(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        bucket, key = self._location(call)
        upload_id = f"{self._boot:08x}{next(self._ids):024x}"
        return self._s3_xml(
            "InitiateMultipartUploadResult",
            f"<Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{upload_id}</UploadId>",
        )

    def _complete_multipart_upload(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        bucket, key = self._location(call)
        location = escape(f"{call.request.scheme}://{call.request.host}{call.request.path}")
        inner = f"<Location>{location}</Location><Bucket>{bucket}</Bucket><Key>{key}</Key><ETag>{self._etag()}</ETag>"
        return self._s3_xml("CompleteMultipartUploadResult", inner)

    def _no_content(self, call: _Call) -> _Answer:
        call.counts.entries += 1
        return 204, b"", self._s3_headers()

    # -- control --

    async def _control(self, request: web.BaseRequest) -> web.Response:
        route = (request.method, request.path)
        try:
            if route == ("GET", "/_stats"):
                document: Any = self.stats.report(self.config)
            elif route in (("GET", "/_config"), ("POST", "/_config")):
                if request.method == "POST":
                    self.configure(json.loads(await request.read() or b"{}"))
                document = dataclasses.asdict(self.config)
            elif route == ("POST", "/_reset"):
                self.reset()
                document = {"reset": True}
            else:
                return web.json_response({"error": f"no control path {request.method} {request.path}"}, status=404)
        except (ValueError, AttributeError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(document)


def _batch_refusal(ids: Sequence[str | None], fifo: bool, grouped: Sequence[bool]) -> tuple[str, str] | None:
    """What SQS and SNS refuse a batch call for (code, message), checked as cheaply as they are stated."""
    if not ids:
        return "EmptyBatchRequest", "There should be at least one entry in the request."
    if len(ids) > 10:
        return "TooManyEntriesInBatchRequest", f"Maximum number of entries per request are 10; got {len(ids)}."
    if None in ids or len(set(ids)) != len(ids):
        return "BatchEntryIdsNotDistinct", "Two or more batch entries in the request have the same Id (or none)."
    if fifo and not all(grouped):
        return "MissingParameter", "The request must contain the parameter MessageGroupId."
    return None


async def serve(config: Config, host: str, port: int, *, region: str = REGION, stop_on_stdin_eof: bool = False) -> None:
    """Serve until SIGTERM / SIGINT (or, for `LatencyEndpoint`, until the parent closes stdin)."""
    await serve_handler(Endpoint(config, region).handle, host, port, stop_on_stdin_eof=stop_on_stdin_eof)


async def serve_handler(
    handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    host: str,
    port: int,
    *,
    stop_on_stdin_eof: bool = False,
) -> None:
    """Serve `handle` on aiohttp's low-level server, print "listening http://HOST:PORT", and return on SIGTERM /
    SIGINT, or when stdin reaches its end with `stop_on_stdin_eof` (how an `EndpointProcess` child follows its
    parent). Shared by the endpoints in bench/."""
    # The low-level server: no router, no access log; a call costs the HTTP parse (C) and the handler.
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"listening http://{bound_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    if stop_on_stdin_eof:  # read by the loop itself: a thread blocked on stdin would trouble the exit

        def on_stdin() -> None:
            if not os.read(0, 4096):
                loop.remove_reader(0)
                stop.set()

        loop.add_reader(0, on_stdin)
    await stop.wait()
    await runner.cleanup()


# --- the Python API: the endpoint in a child process ---------------------------------------------------------


class EndpointProcess:
    """An endpoint script of bench/ in a child process of its own, so its CPU does not compete with the measured
    process's GIL, and its JSON control API. `start()` returns once the child printed "listening URL"; `url` is
    the endpoint_url to give the clients. Subclasses say how the child is started (`command`)."""

    name = "endpoint"

    def __init__(self) -> None:
        self.url = ""
        self._process: subprocess.Popen[str] | None = None
        # Never through a proxy from the environment: the endpoint is local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def pid(self) -> int:
        assert self._process is not None, f"the {self.name} is not running"
        return self._process.pid

    def command(self) -> list[str]:
        """The child's command line; the child must serve with `serve_handler(..., stop_on_stdin_eof=True)`."""
        raise NotImplementedError

    def start(self) -> Self:
        self._process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # "" if the child failed before listening
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the {self.name} did not start (it printed {line!r})")
        self.url = line.split()[1]
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def _call(self, method: str, path: str, document: Mapping[str, Any] | None = None) -> dict[str, Any]:
        data = None if document is None else json.dumps(document).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        try:
            with self._opener.open(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{self.name} {method} {path}: {exc.read().decode(errors='replace')}") from None
        return answer

    def __enter__(self) -> Self:
        return self if self._process is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LatencyEndpoint(EndpointProcess):
    """The endpoint in a child process of its own, so its CPU does not compete with the pipeline's GIL, and its
    control API. `start()` returns once it listens; `url` is the endpoint_url to give the sinks."""

    name = "latency endpoint"

    def __init__(
        self,
        latency_ms: float = 0.0,
        *,
        entry_failure_rate: float = 0.0,
        condition_failure_rate: float = 0.0,
        seed: int = 0,
        key_schema: str = DEFAULT_KEY_SCHEMA,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__()
        self.config = Config(latency_ms, entry_failure_rate, condition_failure_rate, seed, key_schema)
        self.config.updated({})  # a bad value fails here, not in the child
        self._address = (host, port)

    def command(self) -> list[str]:
        options = {"--host": self._address[0], "--port": self._address[1], "--region": REGION}
        options.update(
            {"--" + name.replace("_", "-"): value for name, value in dataclasses.asdict(self.config).items()}
        )
        command = [sys.executable, str(HERE), *(str(part) for option in options.items() for part in option)]
        command.append("--stop-on-stdin-eof")  # a parent that dies without stop() takes the endpoint with it
        return command

    def stats(self) -> dict[str, Any]:
        """Figures since the last reset; see the module docstring."""
        return self._call("GET", "/_stats")

    def reset(self) -> None:
        """Zero the figures and restart the failure draws from `seed`."""
        self._call("POST", "/_reset", {})

    def set(self, **changes: Any) -> dict[str, Any]:
        """Change `Config` fields (latency_ms, entry_failure_rate, condition_failure_rate, seed, key_schema)."""
        config = self._call("POST", "/_config", changes)
        self.config = Config(**config)
        return config


def operations_table(stats: Mapping[str, Any]) -> str:
    """The per-operation figures of a `stats()` answer as a plain-text table."""
    from harness import table  # lazily: the endpoint process itself needs none of boto3 and the pipeline

    rows = []
    for service, figures in stats["services"].items():
        for operation, counts in figures["operations"].items():
            rows.append(
                [
                    f"{service} {operation}",
                    f"{counts['calls']:,}",
                    f"{counts['entries']:,}",
                    f"{counts['bytes_received'] / 1024:,.1f}",
                    f"{counts['failed_calls']:,}",
                    f"{counts['failed_entries']:,}",
                    f"{counts['refused']:,}",
                    f"{figures['max_in_flight']}",
                    f"{figures['mean_in_flight']:.2f}",
                ]
            )
    rows.extend(
        [f"unsupported: {name}", f"{n:,}", "-", "-", "-", "-", "-", "-", "-"]
        for name, n in stats["unsupported"].items()
    )
    header = [
        "operation",
        "calls",
        "entries",
        "KiB in",
        "failed calls",
        "failed entries",
        "refused",
        "max in flight (service)",
        "mean",
    ]
    return table(header, rows)


# --- the self-check: the four real sinks against the endpoint ------------------------------------------------


def synthetic_batch(count: int, *, keys: int, shards: int, payload_bytes: int = 1500) -> Batch:
    """`count` changes to `keys` items (INSERT, MODIFY, MODIFY, REMOVE in turn per item) over `shards` shards,
    about 1.7 KB each, as ChangeRecords built from GetRecords-shaped stream records."""
    from pipeline.records import Batch, change_record_from_stream

    cycle = ("INSERT", "MODIFY", "MODIFY", "REMOVE")
    start = datetime(2024, 1, 1, 12, tzinfo=UTC)
    records = []
    for n in range(count):
        item = n % keys
        event_name = cycle[(n // keys) % len(cycle)]
        key = {"pk": {"S": f"item-{item:05d}"}, "sk": {"S": "v"}}
        image = {**key, "version": {"N": str(n // keys)}, "payload": {"S": "x" * payload_bytes}}
        stream: dict[str, Any] = {
            "ApproximateCreationDateTime": start + timedelta(seconds=n),
            "Keys": key,
            "SequenceNumber": f"{10**20 + n}",
            "SizeBytes": payload_bytes + 60,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
        if event_name != "REMOVE":
            stream["NewImage"] = image
        if event_name != "INSERT":
            stream["OldImage"] = {**image, "version": {"N": str(n // keys - 1)}}
        raw = {
            "eventID": f"{n:032x}",
            "eventName": event_name,
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": REGION,
            "dynamodb": stream,
        }
        shard_id = f"shardId-{item % shards:020d}-0000beef"
        records.append(change_record_from_stream(raw, table="orders", shard_id=shard_id))
    return Batch(records=tuple(records), size_bytes=sum(r.size_bytes for r in records))


def _use_dummy_credentials() -> None:
    """The clients sign with these, as against moto (harness.MotoServer); the endpoint checks no signature."""
    from pipeline.testing.emulator import DUMMY_CREDENTIALS

    for name, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(name, value)


def _operations(stats: Mapping[str, Any], service: str) -> dict[str, dict[str, int]]:
    operations: dict[str, dict[str, int]] = stats["services"][service]["operations"]
    return operations


def _written(sink: Sink, batch: Batch) -> tuple[WriteResult, float]:
    """open, write, flush, close, as the pipeline calls them; the result and the wall seconds it took."""
    started = time.perf_counter()
    sink.open()
    try:
        result = sink.write(batch)
        sink.flush()
    finally:
        sink.close()
    return result, time.perf_counter() - started


def _on_threads(work: Sequence[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=job) for job in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass(frozen=True)
class _Case:
    """One sink of the self-check."""

    name: str
    make: Callable[[], Sink]
    service: str
    opening: str
    """The call `open()` makes to check the destination."""
    carriers: tuple[str, ...]
    """The calls that carry the records."""


class _SelfCheck:
    """The self-check's sections: one endpoint, one batch, and the checks made so far (printed as they are made;
    timings are shown, never checked)."""

    def __init__(self, endpoint: LatencyEndpoint, count: int, latency_ms: float) -> None:
        from sinks.dynamodb_table import DynamoDbTableSink, DynamoDbTableSinkSettings
        from sinks.s3_parquet import S3ParquetSink, S3ParquetSinkSettings
        from sinks.sns import SnsSink, SnsSinkSettings
        from sinks.sqs import SqsSink, SqsSinkSettings

        self.endpoint = endpoint
        self.count = count
        self.latency_ms = latency_ms
        self.keys = max(1, count * 3 // 10)
        self.batch = synthetic_batch(count, keys=self.keys, shards=4)
        self.failures: list[str] = []
        url = endpoint.url
        self.queue_url = f"{url}/{ACCOUNT}/bench-changes"
        self.topic_arn = f"arn:aws:sns:{REGION}:{ACCOUNT}:bench-changes"
        where: dict[str, Any] = {"region": REGION, "endpoint_url": url}
        sqs = SqsSinkSettings(type="sqs", queue_url=self.queue_url)
        sqs_fifo = SqsSinkSettings(type="sqs", queue_url=self.queue_url + ".fifo")
        sns = SnsSinkSettings(type="sns", topic_arn=self.topic_arn)
        sns_fifo = SnsSinkSettings(type="sns", topic_arn=self.topic_arn + ".fifo")
        replica = DynamoDbTableSinkSettings(type="dynamodb_table", table_name="bench-replica")
        archive = S3ParquetSinkSettings(type="s3_parquet", bucket="bench-archive")
        self.cases = [
            _Case("SQS standard", lambda: SqsSink(sqs, **where), "sqs", "GetQueueAttributes", ("SendMessageBatch",)),
            _Case("SQS FIFO", lambda: SqsSink(sqs_fifo, **where), "sqs", "GetQueueAttributes", ("SendMessageBatch",)),
            _Case("SNS standard", lambda: SnsSink(sns, **where), "sns", "GetTopicAttributes", ("PublishBatch",)),
            _Case("SNS FIFO", lambda: SnsSink(sns_fifo, **where), "sns", "GetTopicAttributes", ("PublishBatch",)),
            _Case(
                "DynamoDB replica",
                lambda: DynamoDbTableSink(replica, **where),
                "dynamodb",
                "DescribeTable",
                ("PutItem", "DeleteItem"),
            ),
            _Case("S3 Parquet archive", lambda: S3ParquetSink(archive, **where), "s3", "HeadBucket", ("PutObject",)),
        ]

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}")
        if not ok:
            self.failures.append(what)

    def sinks(self) -> None:
        """Each sink alone: every record taken; then with failures on demand, the failed ones retryable."""
        from harness import table

        rows: list[list[str]] = []
        for name, config, services in [
            ("no failures", {"entry_failure_rate": 0.0, "condition_failure_rate": 0.0}, SERVICES),
            ("entry_failure_rate 0.2", {"entry_failure_rate": 0.2, "condition_failure_rate": 0.0}, SERVICES[:3]),
            ("condition_failure_rate 0.5", {"entry_failure_rate": 0.0, "condition_failure_rate": 0.5}, ("dynamodb",)),
        ]:
            self.endpoint.set(**config)
            print(f"\n{name}:")
            rows.extend(self._sink(case, name) for case in self.cases if case.service in services)
        self.endpoint.set(entry_failure_rate=0.0, condition_failure_rate=0.0)
        header = ["sink, round", "open", "calls", "entries", "failed at endpoint", "WriteResult.failed"]
        print(f"\n{table([*header, 'max in flight', 'mean', 'wall s'], rows)}")

    def _sink(self, case: _Case, round_name: str) -> list[str]:
        from sinks.base import RetryableSinkError
        from sinks.s3_parquet import partition_of

        self.endpoint.reset()
        sink = case.make()
        result, seconds = _written(sink, self.batch)
        stats = self.endpoint.stats()
        operations = _operations(stats, case.service)
        carried = [operations.get(name, {}) for name in case.carriers]
        calls, entries, failed_entries, failed_calls = (
            sum(c.get(figure, 0) for c in carried) for figure in ("calls", "entries", "failed_entries", "failed_calls")
        )
        failed = len(result.failed)
        retryable = sum(isinstance(e, RetryableSinkError) for e in result.failed.values())
        what = case.name
        self.check(operations.get(case.opening, {}).get("calls") == 1, f"{what}: one {case.opening} at open()")
        self.check(not stats["unsupported"], f"{what}: no unsupported call ({stats['unsupported'] or 'none'})")
        if case.service == "s3":
            parts = len({(partition_of(r), r.shard_id) for r in self.batch.records})
            written = getattr(sink, "objects_written", None)
            self.check(not failed, f"{what}: every record taken")
            self.check(calls == parts == written, f"{what}: one PutObject per (hour, shard): {calls} for {parts}")
        elif round_name == "no failures":
            self.check(not failed, f"{what}: every record taken ({failed} failed)")
            self.check(entries == self.count, f"{what}: every record sent once ({entries} entries for {self.count})")
        elif round_name.startswith("condition"):
            self.check(failed_calls > 0, f"{what}: {failed_calls} writes answered ConditionalCheckFailedException")
            self.check(not failed, f"{what}: a failed condition counts as taken ({failed} failed)")
        else:
            self.check(0 < failed == retryable, f"{what}: {failed} records failed, all retryable")
            if case.name.endswith("standard"):
                self.check(
                    failed == failed_entries and entries == self.count,
                    f"{what}: the failed records are exactly the {failed_entries} entries answered Failed",
                )
            else:  # FIFO groups and replica keys hold back the changes after a failed one
                self.check(
                    failed >= failed_entries > 0,
                    f"{what}: {failed_entries} answered Failed, {failed - failed_entries} held back behind them",
                )
        figures = stats["services"][case.service]
        return [
            f"{case.name}, {round_name}",
            f"{operations.get(case.opening, {}).get('calls', 0)} {case.opening}",
            f"{calls:,} {'/'.join(case.carriers)}",
            f"{entries:,}",
            f"{failed_entries:,}",
            f"{failed:,} ({retryable:,} retryable)",
            str(figures["max_in_flight"]),
            f"{figures['mean_in_flight']:.2f}",
            f"{seconds:.2f}",
        ]

    def all_at_once(self) -> None:
        """All sinks on threads of their own: the figures are kept apart per service."""
        from sinks.base import WriteResult

        print("\nAll six sinks at once, each on a thread of its own, as concurrent delivery would run them:")
        self.endpoint.reset()
        outcomes: dict[str, WriteResult | BaseException] = {}

        def deliver(case: _Case) -> None:
            try:
                outcomes[case.name] = _written(case.make(), self.batch)[0]
            except Exception as exc:  # reported below: a sink that raised took nothing
                outcomes[case.name] = exc

        _on_threads([functools.partial(deliver, case) for case in self.cases])
        stats = self.endpoint.stats()
        print(operations_table(stats))
        print(f"all services: max in flight {stats['max_in_flight']}, mean {stats['mean_in_flight']:.2f}")
        taken = [name for name, o in outcomes.items() if isinstance(o, WriteResult) and not o.failed]
        self.check(len(taken) == len(self.cases), f"every record taken by {len(taken)} of {len(self.cases)} sinks")
        sent = _operations(stats, "sqs").get("SendMessageBatch", {}).get("entries")
        self.check(sent == 2 * self.count, f"the two queues got {sent} entries for 2 x {self.count} records")

    def multipart(self) -> None:
        """A file over s3fs's block size goes up in parts, and the parts add up to the file."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        import s3fs

        print("\nS3 multipart (pq.write_table through s3fs with 5 MiB blocks, 12 MiB of incompressible data):")
        self.endpoint.reset()
        filesystem = s3fs.S3FileSystem(
            endpoint_url=self.endpoint.url,
            client_kwargs={"region_name": REGION},
            default_block_size=5 * 2**20,
            skip_instance_cache=True,
        )
        data = pa.table({"blob": pa.array([os.urandom(4096) for _ in range(3072)], pa.binary())})
        pq.write_table(data, "bench-archive/multipart/check.parquet", filesystem=filesystem, compression="none")
        local = pa.BufferOutputStream()
        pq.write_table(data, local, compression="none")  # the same bytes: what the parts must add up to
        operations = _operations(self.endpoint.stats(), "s3")
        uploaded = operations.get("UploadPart", {}).get("bytes_received", 0)
        parts = operations.get("UploadPart", {}).get("calls", 0)
        print("  " + ", ".join(f"{name} {c['calls']}" for name, c in operations.items()) + f"; {uploaded:,} bytes")
        self.check(
            set(operations) == {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"}
            and operations["CreateMultipartUpload"]["calls"] == operations["CompleteMultipartUpload"]["calls"] == 1
            and parts >= 2,
            f"one multipart upload of {parts} parts, and no other call",
        )
        self.check(uploaded == local.tell(), f"the parts carry the whole file ({uploaded:,} of {local.tell():,} bytes)")

    def answers(self) -> None:
        """What botocore checks in the answers; an unsupported call; the single-message calls."""
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import ClientError

        from pipeline.aws import AwsClients

        print("\nWhat botocore checks in the answers, and an unsupported call:")
        self.endpoint.reset()
        url = self.endpoint.url
        # botocore checks x-amz-crc32 only as a reason to retry (the sinks' clients make one attempt, so they would
        # let a mismatch through): a client that retries shows a bad checksum as RetryAttempts.
        retrying = BotoConfig(retries={"total_max_attempts": 3, "mode": "standard"})
        dynamodb = boto3.session.Session().client("dynamodb", region_name=REGION, endpoint_url=url, config=retrying)
        described = dynamodb.describe_table(TableName="bench-replica")
        self.check(
            described["ResponseMetadata"]["RetryAttempts"] == 0
            and [k["KeyType"] for k in described["Table"]["KeySchema"]] == ["HASH", "RANGE"],
            "DynamoDB: x-amz-crc32 matches (no retry for a checksum mismatch); the key is pk HASH + sk RANGE",
        )
        clients = AwsClients(REGION, url)
        try:
            clients.client("sqs").receive_message(QueueUrl=self.queue_url)
            refusal = ""
        except ClientError as exc:
            refusal = str(exc)
        self.check(
            "ReceiveMessage" in refusal and self.endpoint.stats()["unsupported"] == {"sqs ReceiveMessage": 1},
            f"an unsupported call is refused by name and counted:\n          {refusal}",
        )
        sent = clients.client("sqs").send_message(QueueUrl=self.queue_url, MessageBody="one")
        published = clients.client("sns").publish(TopicArn=self.topic_arn, Message="one")
        self.check(
            bool(sent.get("MessageId") and published.get("MessageId")), "SQS SendMessage and SNS Publish answered"
        )

    def concurrency(self, threads: int) -> None:
        """N threads calling one client: the endpoint sees about N calls in flight, and never more."""
        from pipeline.aws import AwsClients

        print(
            f"\nConcurrency: threads calling one SQS client (SendMessageBatch of 10), {self.latency_ms:g} ms per call:"
        )
        client = AwsClients(REGION, self.endpoint.url, max_pool_connections=threads).client("sqs")
        entries = [{"Id": str(n), "MessageBody": "x" * 100} for n in range(10)]
        client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)  # built before the threads share it
        for n in (1, threads):
            self.endpoint.reset()
            start = threading.Barrier(n)

            def work(start: threading.Barrier = start) -> None:
                start.wait()
                for _ in range(20):
                    client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)

            _on_threads([work] * n)
            figures = self.endpoint.stats()["services"]["sqs"]
            peak = figures["max_in_flight"]
            print(f"  {n:>3} threads: max in flight {peak}, mean {figures['mean_in_flight']:.2f}")
            self.check(figures["calls"] == 20 * n, f"{n} threads: {20 * n} calls counted")
            if n == 1:
                self.check(peak == 1, "one thread never has two calls in flight")
            else:
                self.check(n // 2 <= peak <= n, f"{n} threads: max in flight {peak}, about {n} and at most {n}")


def self_check(latency_ms: float, count: int, threads: int) -> int:
    """Drive the real sinks against the endpoint; 0 when every call was answered as the sinks expect."""
    from harness import machine_line

    _use_dummy_credentials()
    with LatencyEndpoint(latency_ms=latency_ms, seed=7).start() as endpoint:
        run = _SelfCheck(endpoint, count, latency_ms)
        print(f"{machine_line()}\nself-check: {count} changes to {run.keys} items on 4 shards, {latency_ms:g} ms/call")
        run.sinks()
        run.all_at_once()
        run.multipart()
        run.answers()
        run.concurrency(threads)
    if run.failures:
        print(f"\nself-check FAILED: {len(run.failures)} checks:\n  " + "\n  ".join(run.failures))
        return 1
    print("\nself-check passed")
    return 0


# --- capacity: how many calls a second it answers, and its CPU per call --------------------------------------


def _raw_call(operation: str) -> tuple[str, bytes, dict[str, str]]:
    """A request as botocore would send it, prebuilt, so the client spends little CPU per call."""
    payload = "x" * 1500
    if operation == "SendMessageBatch":
        service, target = "sqs", "AmazonSQS.SendMessageBatch"
        attributes = {"event_name": {"DataType": "String", "StringValue": "MODIFY"}}
        entries = [{"Id": str(n), "MessageBody": payload, "MessageAttributes": attributes} for n in range(10)]
        document: dict[str, Any] = {"QueueUrl": f"http://x/{ACCOUNT}/q", "Entries": entries}
    else:
        service, target = "dynamodb", "DynamoDB_20120810.PutItem"
        item = {"pk": {"S": "item"}, "sk": {"S": "v"}, "payload": {"S": payload}}
        document = {"TableName": "t", "Item": item, "ConditionExpression": "attribute_not_exists(#s) OR #s < :s"}
    headers = {
        "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20240101/{REGION}/{service}/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={'0' * 64}",
        "X-Amz-Target": target,
        "Content-Type": _JSON,
    }
    return service, orjson.dumps(document), headers


async def _aiohttp_load(url: str, operation: str, connections: int, seconds: float) -> int:
    import aiohttp

    _, body, headers = _raw_call(operation)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    calls = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker() -> None:
            nonlocal calls
            while loop.time() < deadline:
                async with session.post(url + "/", data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{operation}: HTTP {response.status}")
                calls += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return calls


def _run_aiohttp_load(url: str, operation: str, connections: int, seconds: float) -> int:
    return asyncio.run(_aiohttp_load(url, operation, connections, seconds))


def _boto3_load(url: str, threads: int, seconds: float) -> int:
    from pipeline.aws import AwsClients

    client = AwsClients(REGION, url, max_pool_connections=threads).client("sqs")
    entries = [{"Id": str(n), "MessageBody": "x" * 1500} for n in range(10)]
    queue = f"{url}/{ACCOUNT}/bench-changes"
    client.send_message_batch(QueueUrl=queue, Entries=entries)
    deadline = time.monotonic() + seconds
    counts = [0] * threads

    def work(index: int) -> None:
        while time.monotonic() < deadline:
            client.send_message_batch(QueueUrl=queue, Entries=entries)
            counts[index] += 1

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts)


def capacity(seconds: float, connections: Sequence[int], latencies: Sequence[float], threads: int) -> None:
    """Calls/s the endpoint answered and the CPU it spent per call, under two clients: botocore on threads (what
    the benchmarks will do) and an aiohttp client sending prebuilt requests (cheaper per call, so it loads the
    endpoint harder). The endpoint's CPU per call is the figure that carries over to other machines and loads."""
    from harness import machine_line, table

    _use_dummy_credentials()
    rows = []
    with LatencyEndpoint().start() as endpoint:
        loads: list[tuple[str, int, Callable[[], int]]] = [
            ("boto3 SendMessageBatch", threads, functools.partial(_boto3_load, endpoint.url, threads, seconds))
        ]
        for operation, n in itertools.product(("SendMessageBatch", "PutItem"), connections):
            run = functools.partial(_run_aiohttp_load, endpoint.url, operation, n, seconds)
            loads.append((f"aiohttp {operation}", n, run))
        for latency, (client, concurrency, load) in itertools.product(latencies, loads):
            endpoint.set(latency_ms=latency)
            endpoint.reset()
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            calls = load()
            client_cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
            stats = endpoint.stats()
            rows.append(
                [
                    client,
                    str(concurrency),
                    f"{latency:g}",
                    f"{calls / wall:,.0f}",
                    f"{stats['cpu_seconds'] / stats['elapsed_seconds']:.0%}",
                    f"{stats['cpu_seconds'] / max(stats['calls'], 1) * 1e6:,.0f}",
                    f"{stats['mean_in_flight']:.1f}",
                    f"{client_cpu / wall:.0%}",
                ]
            )
            print(f"  {client} x{concurrency}, {latency:g} ms: {calls / wall:,.0f} calls/s", flush=True)
    print(machine_line())
    print(f"{seconds:g} s per run; CPU as a share of one core (the endpoint is one asyncio thread)\n")
    header = [
        "client",
        "in parallel",
        "latency ms",
        "calls/s",
        "endpoint CPU",
        "endpoint us/call",
        "mean in flight",
        "client CPU",
    ]
    print(table(header, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local SQS/SNS/DynamoDB/S3 endpoint answering after a set latency.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument(
        "--latency-ms", type=float, default=None, help="round trip per call (default 0; 20 in --self-check)"
    )
    parser.add_argument("--entry-failure-rate", type=float, default=0.0)
    parser.add_argument("--condition-failure-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key-schema", default=DEFAULT_KEY_SCHEMA, help="DescribeTable's key, e.g. pk:S,sk:S or id:N")
    parser.add_argument("--region", default=REGION)
    parser.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--self-check", action="store_true", help="drive the real sinks against it; exit 1 if wrong")
    mode.add_argument("--capacity", action="store_true", help="measure calls/s and CPU per call")
    parser.add_argument("--records", type=int, default=400, help="--self-check: changes per sink")
    parser.add_argument("--threads", type=int, default=None, help="client threads (--self-check 16, --capacity 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="--capacity: seconds per run")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 256], help="--capacity: aiohttp clients")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 20.0], help="--capacity: ms")
    args = parser.parse_args(argv)
    if args.self_check:
        return self_check(20.0 if args.latency_ms is None else args.latency_ms, args.records, args.threads or 16)
    if args.capacity:
        capacity(args.seconds, args.connections, args.latencies, args.threads or 32)
        return 0
    try:
        config = Config().updated(
            {
                "latency_ms": args.latency_ms or 0.0,
                "entry_failure_rate": args.entry_failure_rate,
                "condition_failure_rate": args.condition_failure_rate,
                "seed": args.seed,
                "key_schema": args.key_schema,
            }
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(config, args.host, args.port, region=args.region, stop_on_stdin_eof=args.stop_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
