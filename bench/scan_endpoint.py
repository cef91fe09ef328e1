"""A local DynamoDB endpoint whose one synthetic table answers Scan after a set round trip; the rest goes to moto.

Why: an initial load is a parallel Scan. Against moto every Scan page costs moto tens of milliseconds of CPU on
items it holds in memory (a million items of 1 KB is gigabytes there), so a load would run at moto's speed and
show nothing about the pipeline. This endpoint makes a table of `items` items up on the fly, deterministically
and without holding them (item i is built from its number and one of `_TEMPLATES` prebuilt attribute texts), and
answers each call after `latency_ms` on an asyncio timer, so a reader's rate against it is bounded by the
reader's own CPU and by how many segments it scans at once, as against DynamoDB.

What it answers itself, as DynamoDB would (JSON 1.0, `X-Amz-Target: DynamoDB_20120810.*`):

- Scan of the synthetic table: `Segment` / `TotalSegments` (item i is in segment i % TotalSegments, in the order
  of i), `Limit`, `ExclusiveStartKey` / `LastEvaluatedKey` (a page stops once the items read reach 1 MB, counted
  as DynamoDB sizes items: attribute names plus values), `ReturnConsumedCapacity` (TOTAL, INDEXES: the page's
  size rounded up to 4 KB, one unit per 4 KB for `ConsistentRead`, half a unit otherwise), `ConsistentRead`.
  `ProjectionExpression` and `ExpressionAttributeNames` are ignored (every attribute is returned); a filter, an
  index, `Select` other than ALL_ATTRIBUTES, a key from another segment are refused (400, counted as `refused`),
  so a reader that asks for something this table does not do sees it.
- DescribeTable of the synthetic table: moto's answer (the table is created in moto at start, with a stream, so
  its ARN, key schema and stream are moto's), with `ItemCount` and `TableSizeBytes` set to the synthetic ones.

Everything else (the checkpoint table's calls, DynamoDB Streams' DescribeStream / GetShardIterator / GetRecords
on the table's empty stream, S3, SQS, ...) is forwarded to the `upstream` moto server after the same latency, so a
whole pipeline runs against this one endpoint_url. Every answer it makes itself has a correct `x-amz-crc32`.

Control, JSON on the same port: `GET /_stats` (per operation: calls, items, bytes sent; pages, items and bytes of
Scan; the first and last Scan's wall-clock time; calls in flight now, at most and on average; elapsed and the
endpoint's own CPU seconds), `POST /_reset` (zeroes them), `GET /_config`.

Run from the repository root:
    python bench/scan_endpoint.py --upstream http://127.0.0.1:5000 --items 1000000   # "listening http://..."
    python bench/scan_endpoint.py --self-check     # boto3 against it: every item once, in any segmentation; ~15 s
    python bench/scan_endpoint.py --capacity       # pages/s it serves and its CPU per page; ~1 min
From a benchmark in bench/:
    with ScanEndpoint(moto.url, items=100_000, latency_ms=20).start() as endpoint:   # a child process
        ... endpoint_url=endpoint.url ...; endpoint.stats(); endpoint.reset()
Prints figures; the self-check asserts what was answered, never timings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from latency_endpoint import EndpointProcess, Gauge, serve_handler, service_of

HERE = Path(__file__).resolve()
REGION = "us-east-1"
DEFAULT_TABLE = "bench-scan"
PAGE_LIMIT_BYTES = 1024 * 1024
"""DynamoDB stops a Scan page once the items it read reach 1 MB."""
_TEMPLATES = 1024
"""Distinct attribute sets: item i carries template i % 1024, so items differ but each text is encoded once."""
_JSON = "application/x-amz-json-1.0"
_TARGET = "DynamoDB_20120810."
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect", "date", "server"}
)

_Answer = tuple[int, bytes, dict[str, str]]


# --- the synthetic table -------------------------------------------------------------------------------------


def _number_size(text: str) -> int:
    """DynamoDB's size of a number: about one byte per two significant digits, plus one."""
    digits = text.lstrip("-").replace(".", "").strip("0") or "0"
    return (len(digits) + 1) // 2 + 1


def _value_size(value: Mapping[str, Any]) -> int:
    """DynamoDB's size of an attribute value (the name is counted by the caller)."""
    (kind, inner), *_ = value.items()
    if kind == "S":
        return len(inner.encode())
    if kind == "N":
        return _number_size(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "L":
        return 3 + sum(1 + _value_size(v) for v in inner)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + _value_size(v) for k, v in inner.items())
    raise ValueError(f"no size for attribute type {kind}")


def item_size(item: Mapping[str, Mapping[str, Any]]) -> int:
    """An item's size as DynamoDB counts it for the 1 MB page limit and for read units: names plus values."""
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


def _attributes(rng: random.Random, n: int) -> dict[str, Any]:
    """One template's attributes, about 1 KB as DynamoDB sizes them: every type a table commonly holds."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]
    city = rng.choice(["Lisbon", "Oslo", "Kyoto", "Quito", "Accra", "Perth", "Tromsø", "Zürich"])
    attributes: dict[str, Any] = {
        "kind": {"S": rng.choice(["order", "customer", "invoice", "shipment"])},
        "status": {"S": rng.choice(["NEW", "PAID", "SHIPPED", "DELIVERED", "RETURNED"])},
        "version": {"N": str(rng.randrange(1, 50))},
        "price": {"N": f"{rng.uniform(1, 5000):.2f}"},
        "quantity": {"N": str(rng.randrange(1, 100))},
        "ratio": {"N": f"{rng.random():.12f}"},
        "active": {"BOOL": rng.random() < 0.5},
        "archived": {"NULL": True} if n % 7 == 0 else {"BOOL": False},
        "created_at": {"S": f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T12:{n % 60:02d}:00Z"},
        "address": {
            "M": {
                "street": {"S": f"{rng.randrange(1, 999)} {rng.choice(words).title()} Street"},
                "city": {"S": city},
                "zip": {"S": f"{rng.randrange(10000, 99999)}"},
                "geo": {
                    "M": {"lat": {"N": f"{rng.uniform(-90, 90):.6f}"}, "lon": {"N": f"{rng.uniform(-180, 180):.6f}"}}
                },
            }
        },
        "tags": {"L": [{"S": rng.choice(words)} for _ in range(rng.randrange(2, 7))]},
        "scores": {"L": [{"N": str(rng.randrange(0, 1000))} for _ in range(rng.randrange(3, 9))]},
        "lines": {
            "L": [
                {
                    "M": {
                        "sku": {"S": f"SKU-{rng.randrange(10**6):06d}"},
                        "qty": {"N": str(rng.randrange(1, 10))},
                        "gift": {"BOOL": rng.random() < 0.1},
                    }
                }
                for _ in range(rng.randrange(1, 5))
            ]
        },
    }
    # Text fills the item up to between 900 and 1,100 bytes (the key adds 16).
    target = rng.randrange(900, 1100) - 16
    filler = target - item_size(attributes) - len("notes")
    sentence = " ".join(rng.choice(words) for _ in range(400))
    attributes["notes"] = {"S": sentence[: max(filler, 1)]}
    return attributes


_KEY_HEAD = b'{"pk":{"S":"item-'
"""An item's text is `_KEY_HEAD`, its number in nine digits, then its template's tail (from `"},` on)."""


class SyntheticTable:
    """`items` items, `pk` = "item-000000123", made up from their number: item i is its key and template
    i % 1024, so a page is built by joining prebuilt texts (0.5 ms for a 1 MB page) and nothing is held per item."""

    def __init__(self, name: str, items: int, seed: int = 0) -> None:
        if items < 0:
            raise ValueError("items must be at least 0")
        self.name = name
        rng = random.Random(seed)
        templates = [_attributes(rng, n) for n in range(_TEMPLATES)]
        self._tails = [b'"},' + orjson.dumps(t)[1:] for t in templates]
        self._sizes = [item_size({"pk": {"S": "item-000000000"}, **t}) for t in templates]
        self.resize(items)

    def resize(self, items: int) -> None:
        """Serve the first `items` items from now on."""
        self.items = items
        whole, part = divmod(items, _TEMPLATES)
        self.table_size_bytes = whole * sum(self._sizes) + sum(self._sizes[:part])

    def item_text(self, index: int) -> bytes:
        return _KEY_HEAD + b"%09d" % index + self._tails[index % _TEMPLATES]

    def item(self, index: int) -> dict[str, Any]:
        """Item `index` as a document (for checks; the endpoint serves the texts)."""
        document: dict[str, Any] = orjson.loads(self.item_text(index))
        return document

    def item_size(self, index: int) -> int:
        return self._sizes[index % _TEMPLATES]

    @staticmethod
    def key(index: int) -> dict[str, Any]:
        return {"pk": {"S": f"item-{index:09d}"}}

    @staticmethod
    def index_of(key: Mapping[str, Any]) -> int:
        """The item number of a key this table gave; ValueError for any other."""
        text = key.get("pk", {}).get("S", "")
        if set(key) != {"pk"} or not text.startswith("item-") or not text[5:].isdigit():
            raise ValueError(f"not a key of this table: {dict(key)}")
        return int(text[5:])

    def page(self, segment: int, total: int, after: int | None, limit: int | None) -> tuple[list[bytes], int, int, int]:
        """One Scan page of `segment` of `total`, after item `after` (None: from the segment's start), at most
        `limit` items: the items' texts as parts to join (commas included), how many, their DynamoDB size, and
        the last item's number (-1: none)."""
        tails = self._tails
        sizes = self._sizes
        start = segment if after is None else after + total
        stop = self.items if limit is None else min(self.items, start + limit * total)
        parts: list[bytes] = []
        size = 0
        last = -1
        head = _KEY_HEAD
        for index in range(start, stop, total):
            template = index % _TEMPLATES
            parts += (head, b"%09d" % index, tails[template])
            head = b"," + _KEY_HEAD
            size += sizes[template]
            last = index
            if size >= PAGE_LIMIT_BYTES:
                break
        return parts, len(parts) // 3, size, last


# --- the endpoint --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the endpoint serves."""

    upstream: str
    """moto's URL: everything but the synthetic table's Scan and DescribeTable goes there ("": nowhere, 503)."""
    table: str = DEFAULT_TABLE
    items: int = 1_000_000
    latency_ms: float = 20.0
    """Added before every answer, its own or forwarded: the round trip to the service."""
    seed: int = 0
    region: str = REGION


@dataclass(slots=True)
class _Counts:
    """One operation's figures."""

    calls: int = 0
    items: int = 0
    """Scan: items answered."""
    bytes_received: int = 0
    bytes_sent: int = 0
    refused: int = 0
    """Scan calls refused (a filter, an index, a key of another segment, a body not in Scan's shape)."""
    failed: int = 0
    """Forwarded calls moto answered with a status of 400 or more, or could not be reached for."""


class _ScanFigures:
    """What the synthetic table's Scan served since the last reset."""

    def __init__(self) -> None:
        self.pages = self.items = self.size_bytes = self.last_pages = self.consistent_pages = 0
        self.read_units = 0.0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.cpu_seconds = 0.0
        self.limits: dict[str, int] = {}
        self.capacity_asked: dict[str, int] = {}
        self.total_segments: dict[str, int] = {}

    def report(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "items": self.items,
            "size_bytes": self.size_bytes,
            "read_units": self.read_units,
            "segments_finished": self.last_pages,
            "consistent_pages": self.consistent_pages,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "cpu_seconds": self.cpu_seconds,
            "limits": dict(self.limits),
            "return_consumed_capacity": dict(self.capacity_asked),
            "total_segments": dict(self.total_segments),
        }


def _bump(counter: dict[str, int], key: Any) -> None:
    counter[str(key)] = counter.get(str(key), 0) + 1


def _operation(request: web.BaseRequest) -> tuple[str, str]:
    """(service, operation): from X-Amz-Target (DynamoDB and Streams both sign as "dynamodb"), else the SigV4
    scope and the HTTP method (S3)."""
    target = request.headers.get("X-Amz-Target", "")
    if target:
        prefix, _, operation = target.partition(".")
        if prefix.startswith("DynamoDBStreams_"):
            return "dynamodbstreams", operation
        return service_of(request), operation
    return service_of(request), request.method


def _dynamodb_answer(status: int, document: Any, request_id: str) -> _Answer:
    body = orjson.dumps(document)
    return status, body, {"Content-Type": _JSON, "x-amz-crc32": str(zlib.crc32(body)), "x-amzn-RequestId": request_id}


class _Refused(Exception):
    """A Scan this table does not answer: a ValidationException naming why."""


class Endpoint:
    """The request handler and the figures: everything but the socket."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.table = SyntheticTable(options.table, options.items, options.seed)
        self._latency = options.latency_ms / 1000
        self._upstream = options.upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._boot = random.getrandbits(32)
        self.gauge = Gauge(time.monotonic())
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.cpu_at = time.process_time()
        self.gauge.restart(self.since)
        self.counts: dict[str, _Counts] = {}
        self.scan = _ScanFigures()

    async def open(self) -> None:
        """The upstream session, and the synthetic table in moto (with its stream) unless it is there."""
        # auto_decompress off: a forwarded body goes back as moto sent it, with its Content-Encoding.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        definition = {
            "TableName": self.table.name,
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
            "BillingMode": "PAY_PER_REQUEST",
            "StreamSpecification": {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        }
        headers = {
            "X-Amz-Target": f"{_TARGET}CreateTable",
            "Content-Type": _JSON,
            "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20240101/{self.options.region}/dynamodb/"
            f"aws4_request, SignedHeaders=host, Signature={'0' * 64}",
        }
        if not self._upstream:  # --capacity: Scan only
            return
        async with self._session.post(self._upstream + "/", data=orjson.dumps(definition), headers=headers) as answer:
            body = await answer.read()
        if answer.status != 200 and b"ResourceInUseException" not in body:
            raise RuntimeError(f"could not create {self.table.name!r} at {self._upstream}: {answer.status} {body!r}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def configure(self, changes: Mapping[str, Any]) -> None:
        """`latency_ms` and `items` can change while it runs (the same templates: item i stays the same item)."""
        if set(changes) - {"latency_ms", "items"}:
            raise ValueError(
                f"only latency_ms and items can change, not {sorted(set(changes) - {'latency_ms', 'items'})}"
            )
        latency = float(changes.get("latency_ms", self.options.latency_ms))
        items = int(changes.get("items", self.options.items))
        if not latency >= 0 or items < 0:
            raise ValueError("latency_ms and items must be at least 0")
        self.options = dataclasses.replace(self.options, latency_ms=latency, items=items)
        self._latency = latency / 1000
        self.table.resize(items)

    def _id(self) -> str:
        return f"{self._boot:08x}-0000-4000-8000-{next(self._ids):012x}"

    def _counts(self, name: str) -> _Counts:
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = _Counts()
        return counts

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/_"):
            return await self._control(request)
        if request.headers.get("Expect", "").lower() == "100-continue":  # as aiohttp's router would answer
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        self.gauge.add(1, time.monotonic())
        try:
            body = await request.read()
            service, operation = _operation(request)
            own = service == "dynamodb" and operation in ("Scan", "DescribeTable") and self._ours(body)
            counts = self._counts(f"{service} {operation}" if own else f"forwarded {service} {operation}")
            counts.calls += 1
            counts.bytes_received += len(body)
            if own and operation == "Scan":
                status, answer, headers = self._scan(body, counts)
            elif own:
                status, answer, headers = await self._describe_table(request, body)
            else:
                status, answer, headers = await self._forward(request, body)
                counts.failed += status >= 400
            counts.bytes_sent += len(answer)
            if self._latency > 0:
                await asyncio.sleep(self._latency)
        finally:
            self.gauge.add(-1, time.monotonic())
        return web.Response(status=status, body=answer if request.method != "HEAD" else None, headers=headers)

    def _ours(self, body: bytes) -> bool:
        try:
            name = orjson.loads(body).get("TableName", "")
        except (orjson.JSONDecodeError, AttributeError):
            return False
        return isinstance(name, str) and name.rpartition("/")[2] == self.table.name  # a name or an ARN

    # -- Scan --

    def _scan(self, body: bytes, counts: _Counts) -> _Answer:
        cpu_at = time.process_time()
        try:
            answer = self._scan_page(orjson.loads(body), counts)
        except (_Refused, ValueError, KeyError, TypeError, AttributeError) as exc:
            counts.refused += 1
            message = str(exc) if isinstance(exc, _Refused) else f"the scan endpoint could not read this Scan: {exc!r}"
            answer = _dynamodb_answer(
                400, {"__type": "com.amazonaws.dynamodb.v20120810#ValidationException", "message": message}, self._id()
            )
        self.scan.cpu_seconds += time.process_time() - cpu_at
        return answer

    def _scan_page(self, request: Mapping[str, Any], counts: _Counts) -> _Answer:
        for name in ("FilterExpression", "ScanFilter", "IndexName", "ConditionalOperator"):
            if name in request:
                raise _Refused(f"the scan endpoint does not answer a Scan with {name}")
        if request.get("Select", "ALL_ATTRIBUTES") != "ALL_ATTRIBUTES":
            raise _Refused(f"the scan endpoint answers Select = ALL_ATTRIBUTES only, not {request['Select']!r}")
        if ("Segment" in request) != ("TotalSegments" in request):
            raise _Refused("Segment and TotalSegments must be given together")
        total = int(request.get("TotalSegments", 1))
        segment = int(request.get("Segment", 0))
        if not 1 <= total <= 1_000_000 or not 0 <= segment < total:
            raise _Refused(f"Segment {segment} of TotalSegments {total}: need 0 <= Segment < TotalSegments <= 1000000")
        limit = request.get("Limit")
        if limit is not None and int(limit) < 1:
            raise _Refused("Limit must be at least 1")
        start = request.get("ExclusiveStartKey")
        after = None
        if start is not None:
            after = self.table.index_of(start)
            if after % total != segment:
                raise _Refused(f"The provided starting key is invalid: {start} is not in segment {segment} of {total}")
        parts, count, size, last = self.table.page(segment, total, after, None if limit is None else int(limit))
        consistent = bool(request.get("ConsistentRead", False))
        units = max(1, math.ceil(size / 4096)) * (1.0 if consistent else 0.5)
        tail: dict[str, Any] = {"Count": count, "ScannedCount": count}
        more = count > 0 and last + total < self.table.items
        if more:
            tail["LastEvaluatedKey"] = self.table.key(last)
        asked = request.get("ReturnConsumedCapacity", "NONE")
        if asked in ("TOTAL", "INDEXES"):
            consumed: dict[str, Any] = {
                "TableName": self.table.name,
                "CapacityUnits": units,
                "ReadCapacityUnits": units,
            }
            if asked == "INDEXES":
                consumed["Table"] = {"CapacityUnits": units, "ReadCapacityUnits": units}
            tail["ConsumedCapacity"] = consumed
        body = b"".join([b'{"Items":[', *parts, b"],", orjson.dumps(tail)[1:]])
        counts.items += count
        scan = self.scan
        now = time.time()
        scan.first_at = scan.first_at or now
        scan.last_at = now
        scan.pages += 1
        scan.items += count
        scan.size_bytes += size
        scan.read_units += units
        scan.last_pages += not more
        scan.consistent_pages += consistent
        _bump(scan.limits, limit)
        _bump(scan.capacity_asked, asked)
        _bump(scan.total_segments, total)
        headers = {"Content-Type": _JSON, "x-amz-crc32": str(zlib.crc32(body)), "x-amzn-RequestId": self._id()}
        return 200, body, headers

    # -- DescribeTable: moto's, with the synthetic table's size --

    async def _describe_table(self, request: web.BaseRequest, body: bytes) -> _Answer:
        status, answer, headers = await self._forward(request, body)
        if status != 200:
            return status, answer, headers
        document = orjson.loads(answer)
        document["Table"]["ItemCount"] = self.table.items
        document["Table"]["TableSizeBytes"] = self.table.table_size_bytes
        return _dynamodb_answer(200, document, headers.get("x-amzn-RequestId") or self._id())

    # -- everything else: moto --

    async def _forward(self, request: web.BaseRequest, body: bytes) -> _Answer:
        assert self._session is not None, "open() first"
        if not self._upstream:
            return 503, b'{"__type":"ServiceUnavailable","message":"no upstream"}', {"Content-Type": _JSON}
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_BY_HOP}
        try:
            async with self._session.request(
                request.method, self._upstream + request.path_qs, data=body, headers=headers
            ) as response:
                answer = await response.read()
                back = {name: value for name, value in response.headers.items() if name.lower() not in _HOP_BY_HOP}
                if request.method == "HEAD" and "Content-Length" in response.headers:
                    back["Content-Length"] = response.headers["Content-Length"]
                return response.status, answer, back
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"the scan endpoint could not reach its upstream {self._upstream}: {exc!r}"
            return 503, orjson.dumps({"__type": "ServiceUnavailable", "message": message}), {"Content-Type": _JSON}

    # -- control --

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        elapsed = now - self.since
        return {
            "elapsed_seconds": elapsed,
            "cpu_seconds": time.process_time() - self.cpu_at,
            "in_flight": self.gauge.current,
            "max_in_flight": self.gauge.peak,
            "mean_in_flight": self.gauge.mean(now),
            "operations": {name: dataclasses.asdict(c) for name, c in sorted(self.counts.items())},
            "scan": self.scan.report(),
            "table": {"name": self.table.name, "items": self.table.items, "size_bytes": self.table.table_size_bytes},
            "options": dataclasses.asdict(self.options),
        }

    async def _control(self, request: web.BaseRequest) -> web.Response:
        route = (request.method, request.path)
        if route == ("GET", "/_stats"):
            return web.json_response(self.report())
        if route == ("POST", "/_reset"):
            self.reset()
            return web.json_response({"reset": True})
        if route == ("POST", "/_config"):
            try:
                self.configure(json.loads(await request.read() or b"{}"))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        if route in (("GET", "/_config"), ("POST", "/_config")):
            return web.json_response(dataclasses.asdict(self.options))
        return web.json_response({"error": f"no control path {request.method} {request.path}"}, status=404)


async def serve(options: Options, host: str, port: int, *, stop_on_stdin_eof: bool = False) -> None:
    """Serve until SIGTERM / SIGINT (or, for `ScanEndpoint`, until the parent closes stdin)."""
    endpoint = Endpoint(options)
    await endpoint.open()
    try:
        await serve_handler(endpoint.handle, host, port, stop_on_stdin_eof=stop_on_stdin_eof)
    finally:
        await endpoint.close()


# --- the Python API: the endpoint in a child process ---------------------------------------------------------


class ScanEndpoint(EndpointProcess):
    """The endpoint in a child process of its own (its CPU is not the reader's), and its control API."""

    name = "scan endpoint"

    def __init__(
        self,
        upstream: str,
        *,
        table: str = DEFAULT_TABLE,
        items: int = 1_000_000,
        latency_ms: float = 20.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__()
        self.options = Options(upstream, table, items, latency_ms, seed)
        self._address = (host, port)

    def command(self) -> list[str]:
        o = self.options
        return [
            sys.executable,
            str(HERE),
            *("--host", self._address[0], "--port", str(self._address[1])),
            *(("--upstream", o.upstream) if o.upstream else ("--scan-only",)),
            *("--table", o.table, "--items", str(o.items), "--latency-ms", str(o.latency_ms)),
            *("--seed", str(o.seed), "--region", o.region, "--stop-on-stdin-eof"),
        ]

    def stats(self) -> dict[str, Any]:
        """Figures since the last reset; see the module docstring."""
        return self._call("GET", "/_stats")

    def reset(self) -> None:
        """Zero the figures."""
        self._call("POST", "/_reset", {})

    def set_latency(self, latency_ms: float) -> None:
        self.options = Options(**self._call("POST", "/_config", {"latency_ms": latency_ms}))

    def set_items(self, items: int) -> None:
        """The table holds `items` items from now on (moto's table, its stream and the checkpoints stay)."""
        self.options = Options(**self._call("POST", "/_config", {"items": items}))


def operations_table(stats: Mapping[str, Any]) -> str:
    """The per-operation figures of a `stats()` answer as a plain-text table."""
    from harness import table  # lazily: the endpoint process itself needs none of boto3 and the pipeline

    rows = [
        [
            name,
            f"{c['calls']:,}",
            f"{c['items']:,}",
            f"{c['bytes_received'] / 1024:,.1f}",
            f"{c['bytes_sent'] / 1024:,.1f}",
            f"{c['refused']:,}",
            f"{c['failed']:,}",
        ]
        for name, c in stats["operations"].items()
    ]
    return table(["operation", "calls", "items", "KiB in", "KiB out", "refused", "failed upstream"], rows)


# --- the self-check: boto3 against it ------------------------------------------------------------------------


def _boto3_client(service: str, url: str, **config: Any) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    # Retries on: a wrong x-amz-crc32 shows as RetryAttempts (botocore retries a mismatch, it does not raise).
    retrying = BotoConfig(retries={"total_max_attempts": 3, "mode": "standard"}, **config)
    return boto3.session.Session().client(service, region_name=REGION, endpoint_url=url, config=retrying)


def _scan_all(client: Any, table: str, total: int, **extra: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every segment paged to its end, one after another: the items, and each page's answer without them."""
    items: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    for segment in range(total):
        start: dict[str, Any] | None = None
        while True:
            more = {"ExclusiveStartKey": start} if start else {}
            page = client.scan(TableName=table, Segment=segment, TotalSegments=total, **extra, **more)
            items.extend(page["Items"])
            pages.append({k: v for k, v in page.items() if k != "Items"} | {"segment": segment})
            start = page.get("LastEvaluatedKey")
            if not start:
                break
    return items, pages


def self_check(items: int) -> int:
    """boto3 against the endpoint (and moto behind it): 0 when every answer is what DynamoDB would give."""
    from botocore.exceptions import ClientError
    from harness import MotoServer, machine_line

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}")
        if not ok:
            failures.append(what)

    print(machine_line())
    with MotoServer() as moto, ScanEndpoint(moto.url, items=items, latency_ms=2).start() as endpoint:
        table = SyntheticTable(DEFAULT_TABLE, items)
        dynamodb = _boto3_client("dynamodb", endpoint.url)
        print(f"\nDescribeTable, {items:,} items:")
        described = dynamodb.describe_table(TableName=DEFAULT_TABLE)
        check(described["ResponseMetadata"]["RetryAttempts"] == 0, "x-amz-crc32 matches (no retry for a mismatch)")
        check(
            described["Table"]["ItemCount"] == items
            and described["Table"]["TableSizeBytes"] == table.table_size_bytes
            and described["Table"]["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
            and bool(described["Table"].get("LatestStreamArn")),
            f"ItemCount {described['Table']['ItemCount']:,}, TableSizeBytes "
            f"{described['Table']['TableSizeBytes']:,}, pk HASH, stream {described['Table'].get('LatestStreamArn')}",
        )
        print("\nScan, each segmentation paged to its end:")
        expected = [table.item(i) for i in range(items)]
        for total in (1, 3, 8):
            found, pages = _scan_all(dynamodb, DEFAULT_TABLE, total)
            keys = [item["pk"]["S"] for item in found]
            check(
                len(found) == items and len(set(keys)) == items,
                f"{total} segments: {len(found):,} items in {len(pages)} pages, {len(set(keys)):,} distinct",
            )
            by_key = {item["pk"]["S"]: item for item in found}
            check(
                all(by_key.get(e["pk"]["S"]) == e for e in expected),
                f"{total} segments: every item as generated (S, N, BOOL, NULL, M, L)",
            )
            check(
                all(p["ResponseMetadata"]["RetryAttempts"] == 0 for p in pages),
                f"{total} segments: no retry for a checksum on any page",
            )
            sizes = [sum(table.item_size(table.index_of({"pk": i["pk"]})) for i in found)]
            check(sizes[0] == table.table_size_bytes, f"{total} segments: sizes add up to TableSizeBytes")
        first = dynamodb.scan(TableName=DEFAULT_TABLE)
        size = sum(table.item_size(table.index_of({"pk": i["pk"]})) for i in first["Items"])
        last_size = table.item_size(table.index_of({"pk": first["Items"][-1]["pk"]}))
        check(
            "LastEvaluatedKey" in first and size >= PAGE_LIMIT_BYTES > size - last_size,
            f"a page stops at 1 MB: {first['Count']:,} items, {size:,} bytes as DynamoDB counts them",
        )
        found, pages = _scan_all(dynamodb, DEFAULT_TABLE, 2, Limit=7)
        check(
            len(found) == items and max(p["Count"] for p in pages) == 7,
            f"Limit 7: {len(found):,} items in pages of at most {max(p['Count'] for p in pages)}",
        )
        eventual = dynamodb.scan(TableName=DEFAULT_TABLE, ReturnConsumedCapacity="TOTAL", Limit=100)
        consistent = dynamodb.scan(
            TableName=DEFAULT_TABLE, ReturnConsumedCapacity="INDEXES", Limit=100, ConsistentRead=True
        )
        hundred = sum(table.item_size(i) for i in range(100))
        check(
            eventual["ConsumedCapacity"]["CapacityUnits"] == math.ceil(hundred / 4096) / 2
            and consistent["ConsumedCapacity"]["Table"]["CapacityUnits"] == math.ceil(hundred / 4096),
            f"100 items, {hundred:,} bytes: {eventual['ConsumedCapacity']['CapacityUnits']} units eventual, "
            f"{consistent['ConsumedCapacity']['CapacityUnits']} consistent",
        )
        for what, call in [
            ("a key of another segment", {"Segment": 1, "TotalSegments": 4, "ExclusiveStartKey": table.key(4)}),
            ("a filter", {"FilterExpression": "attribute_exists(pk)"}),
        ]:
            try:
                dynamodb.scan(TableName=DEFAULT_TABLE, **call)
                refusal = ""
            except ClientError as exc:
                refusal = str(exc)
            check("ValidationException" in refusal, f"{what} is refused: {refusal}")
        print("\nForwarded to moto:")
        arn = described["Table"]["LatestStreamArn"]
        streams = _boto3_client("dynamodbstreams", endpoint.url)
        shards = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
        check(len(shards) >= 1, f"DynamoDB Streams DescribeStream: {len(shards)} shard(s) of the table's stream")
        dynamodb.create_table(
            TableName="bench-other",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        dynamodb.put_item(TableName="bench-other", Item={"k": {"S": "a"}, "v": {"N": "1"}})
        got = dynamodb.get_item(TableName="bench-other", Key={"k": {"S": "a"}}).get("Item")
        other = dynamodb.scan(TableName="bench-other")["Items"]
        check(got == {"k": {"S": "a"}, "v": {"N": "1"}} and other == [got], "another table: PutItem, GetItem, Scan")
        s3 = _boto3_client("s3", endpoint.url, s3={"addressing_style": "path"})
        s3.create_bucket(Bucket="bench-bucket")
        s3.put_object(Bucket="bench-bucket", Key="a/b.bin", Body=b"x" * 5000)
        head = s3.head_object(Bucket="bench-bucket", Key="a/b.bin")
        body = s3.get_object(Bucket="bench-bucket", Key="a/b.bin")["Body"].read()
        check(head["ContentLength"] == 5000 and body == b"x" * 5000, "S3: PutObject, HeadObject (length), GetObject")
        stats = endpoint.stats()
        print(operations_table(stats))
        check(stats["operations"]["dynamodb Scan"]["refused"] == 2, "the two refusals counted")
        check(stats["scan"]["consistent_pages"] == 1, "one ConsistentRead page counted")
    if failures:
        print(f"\nself-check FAILED: {len(failures)} checks:\n  " + "\n  ".join(failures))
        return 1
    print("\nself-check passed")
    return 0


# --- capacity: pages a second it serves, and its CPU per page ------------------------------------------------


def _scan_requests(items: int, count: int) -> list[bytes]:
    """`count` Scan bodies that each ask for a full 1 MB page, spread over the table."""
    step = max(1, items // count)
    bodies = []
    for n in range(count):
        request: dict[str, Any] = {"TableName": DEFAULT_TABLE, "ReturnConsumedCapacity": "TOTAL"}
        if n:
            request["ExclusiveStartKey"] = SyntheticTable.key(n * step)
        bodies.append(orjson.dumps(request))
    return bodies


async def _aiohttp_scans(url: str, bodies: Sequence[bytes], connections: int, seconds: float) -> tuple[int, int]:
    headers = {
        "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20240101/{REGION}/dynamodb/aws4_request, "
        f"SignedHeaders=host, Signature={'0' * 64}",
        "X-Amz-Target": f"{_TARGET}Scan",
        "Content-Type": _JSON,
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pages = received = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker(first: int) -> None:
            nonlocal pages, received
            for n in itertools.count(first):
                if loop.time() >= deadline:
                    return
                async with session.post(url + "/", data=bodies[n % len(bodies)], headers=headers) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"Scan: HTTP {response.status}: {body[:200]!r}")
                pages += 1
                received += len(body)

        await asyncio.gather(*(worker(n * 7) for n in range(connections)))
    return pages, received


def _boto3_scans(url: str, threads: int, seconds: float) -> tuple[int, int]:
    """What the benchmark's baseline does: botocore parsing every page, `threads` segments at once."""
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.session.Session().client(
        "dynamodb", region_name=REGION, endpoint_url=url, config=BotoConfig(max_pool_connections=threads)
    )
    deadline = time.monotonic() + seconds
    pages = [0] * threads

    def work(segment: int) -> None:
        start: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            more = {"ExclusiveStartKey": start} if start else {}
            page = client.scan(TableName=DEFAULT_TABLE, Segment=segment, TotalSegments=threads, **more)
            start = page.get("LastEvaluatedKey")
            pages[segment] += 1

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(pages), 0


def capacity(seconds: float, connections: Sequence[int], latencies: Sequence[float], threads: int) -> None:
    """Pages/s the endpoint served and its CPU per page, under an aiohttp client sending prebuilt Scan requests
    (cheap per call, so it loads the endpoint hard) and under boto3 on threads (what the baseline does)."""
    from harness import machine_line, table

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    rows = []
    items = 10_000_000  # never read to the end in a run
    with ScanEndpoint("", items=items, latency_ms=0).start() as endpoint:
        bodies = _scan_requests(items, 64)
        for latency in latencies:
            loads: list[tuple[str, int, Any]] = [
                (
                    f"aiohttp, {n} connections",
                    n,
                    lambda n=n: asyncio.run(_aiohttp_scans(endpoint.url, bodies, n, seconds)),
                )
                for n in connections
            ]
            loads.append((f"boto3, {threads} threads", threads, lambda: _boto3_scans(endpoint.url, threads, seconds)))
            for client, _n, load in loads:
                endpoint.set_latency(latency)
                endpoint.reset()
                cpu_before, wall_before = time.process_time(), time.perf_counter()
                pages, _ = load()
                client_cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
                stats = endpoint.stats()
                scan = stats["scan"]
                rows.append(
                    [
                        client,
                        f"{latency:g}",
                        f"{pages / wall:,.0f}",
                        f"{scan['items'] / wall:,.0f}",
                        f"{stats['operations']['dynamodb Scan']['bytes_sent'] / wall / 2**20:,.0f}",
                        f"{stats['cpu_seconds'] / stats['elapsed_seconds']:.0%}",
                        f"{stats['cpu_seconds'] / max(scan['pages'], 1) * 1e3:.2f}",
                        f"{scan['cpu_seconds'] / max(scan['pages'], 1) * 1e3:.2f}",
                        f"{stats['mean_in_flight']:.1f}",
                        f"{client_cpu / wall:.0%}",
                    ]
                )
                print(f"  {client}, {latency:g} ms: {pages / wall:,.0f} pages/s", flush=True)
    print(machine_line())
    print(f"{seconds:g} s per run; pages of 1 MB (~1,000 items); CPU as a share of one core\n")
    header = ["client", "latency ms", "pages/s", "items/s", "MiB/s out", "endpoint CPU", "ms CPU/page"]
    print(table([*header, "of it building", "mean in flight", "client CPU"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A synthetic DynamoDB table's Scan after a set latency; the rest to moto."
    )
    parser.add_argument("--upstream", default="", help="moto server URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--scan-only", action="store_true", help="no upstream: answer Scan only, 503 to the rest")
    parser.add_argument("--table", default=DEFAULT_TABLE)
    parser.add_argument(
        "--items", type=int, default=None, help="items in the table (default 1,000,000; 2,500 in --self-check)"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="round trip per call (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--region", default=REGION)
    parser.add_argument("--stop-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--self-check", action="store_true", help="boto3 and moto against it; exit 1 if wrong")
    mode.add_argument("--capacity", action="store_true", help="measure pages/s and CPU per page")
    parser.add_argument("--seconds", type=float, default=5.0, help="--capacity: seconds per run")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 32], help="--capacity: aiohttp clients")
    parser.add_argument("--threads", type=int, default=8, help="--capacity: boto3 threads (segments)")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 20.0], help="--capacity: ms")
    args = parser.parse_args(argv)
    if args.self_check:
        return self_check(args.items or 2_500)
    if args.capacity:
        capacity(args.seconds, args.connections, args.latencies, args.threads)
        return 0
    if not args.upstream and not args.scan_only:
        parser.error("--upstream is required (a moto server: everything but the table's Scan goes there)")
    options = Options(
        args.upstream,
        args.table,
        1_000_000 if args.items is None else args.items,
        args.latency_ms,
        args.seed,
        args.region,
    )
    asyncio.run(serve(options, args.host, args.port, stop_on_stdin_eof=args.stop_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
