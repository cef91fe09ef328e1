"""A fault-injecting HTTP proxy in front of the moto server, switchable while traffic flows through it.

moto answers every request it can; it never throttles, never fails and never drops a connection. Outages are
shown here instead, on the wire, so the real clients (boto3, s3fs/aiobotocore, pyarrow) meet them exactly as
they meet AWS: point a client's `endpoint_url` at `FaultProxy.endpoint_url`, then `inject` a fault for the
requests a matcher picks (a service, an S3 bucket, an `X-Amz-Target`), and `clear` it when the outage is over.

    with FaultProxy(aws.endpoint_url) as proxy:
        outage = proxy.inject(s3_bucket("archive"), SLOW_DOWN)
        ...
        proxy.clear(outage)
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal

FaultKind = Literal["status", "reset", "reset_after_forward", "delay"]

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding"}
)
_CREDENTIAL_SERVICE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/")


@dataclass(frozen=True, slots=True)
class Fault:
    """What the proxy does with a request a rule matches.

    - `status`: answer `status` with an error body carrying `code`, never reaching moto (nothing happened).
    - `reset`: read the request, then reset the connection (RST) without forwarding it.
    - `reset_after_forward`: forward the request (moto acts on it), then reset instead of answering: the
      client cannot tell whether its write happened, which is what makes idempotent writes matter.
    - `delay`: wait `delay_seconds`, then forward normally (a slow destination).
    """

    kind: FaultKind
    status: int = 0
    code: str = ""
    delay_seconds: float = 0.0
    message: str = ""
    """The error's message (`status` faults); the code when empty. Services quote values in some messages."""


SLOW_DOWN = Fault("status", 503, "SlowDown")
INTERNAL_ERROR = Fault("status", 500, "InternalError")
RESET = Fault("reset")
RESET_AFTER_FORWARD = Fault("reset_after_forward")


def latency(seconds: float) -> Fault:
    return Fault("delay", delay_seconds=seconds)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a matcher sees of a request."""

    method: str
    path: str
    host: str
    service: str
    """The signing service from the Authorization header: "s3", "dynamodb", "dynamodb" (streams sign as
    dynamodb too; tell them apart by `target`), or "" when unsigned."""
    target: str
    """`X-Amz-Target` for JSON-protocol services, e.g. "DynamoDBStreams_20120810.GetRecords"; else ""."""
    bucket: str
    """The S3 bucket, path-style or virtual-hosted; "" for other services."""


Matcher = Callable[[RequestInfo], bool]


def any_request(_request: RequestInfo) -> bool:
    return True


def s3_bucket(name: str) -> Matcher:
    return lambda request: request.service == "s3" and request.bucket == name


def amz_target(prefix: str) -> Matcher:
    """Requests whose `X-Amz-Target` starts with `prefix`: "DynamoDB_20120810.", "DynamoDBStreams_20120810."."""
    return lambda request: request.target.startswith(prefix)


@dataclass(slots=True)
class _Rule:
    rule_id: int
    match: Matcher
    fault: Fault
    remaining: int | None


class FaultProxy:
    """A threaded HTTP proxy on a free loopback port; every request goes to `upstream` unless a rule says not."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname is None or parsed.port is None:
            raise ValueError(f"upstream must look like http://HOST:PORT, got {upstream!r}")
        self.upstream_host: str = parsed.hostname
        self.upstream_port: int = parsed.port
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._ids = itertools.count(1)
        self.requests: collections.Counter[str] = collections.Counter()
        """Requests seen, by service (S3) or X-Amz-Target operation."""
        self.faults: collections.Counter[str] = collections.Counter()
        """Faults applied, by fault kind."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._upstream = threading.local()
        self.endpoint_url = ""

    # -- control -----------------------------------------------------------------------------------------

    def inject(self, match: Matcher, fault: Fault, *, times: int | None = None) -> int:
        """Apply `fault` to matching requests from now on (to the next `times` of them only, if given);
        returns the rule's id for `clear`."""
        with self._lock:
            rule = _Rule(next(self._ids), match, fault, times)
            self._rules.append(rule)
            return rule.rule_id

    def clear(self, rule_id: int | None = None) -> None:
        """Remove one rule, or every rule: matching requests are forwarded again."""
        with self._lock:
            self._rules = [r for r in self._rules if rule_id is not None and r.rule_id != rule_id]

    @contextmanager
    def injecting(self, match: Matcher, fault: Fault, *, times: int | None = None) -> Iterator[None]:
        rule_id = self.inject(match, fault, times=times)
        try:
            yield
        finally:
            self.clear(rule_id)

    def count(self, key: str) -> int:
        with self._lock:
            return self.requests[key]

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        server = _QuietServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self.endpoint_url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- used by the handler -----------------------------------------------------------------------------

    def _fault_for(self, request: RequestInfo) -> Fault | None:
        with self._lock:
            self.requests[request.target.split(".")[-1] if request.target else request.service or "unsigned"] += 1
            for rule in self._rules:
                if rule.match(request):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining == 0:
                            self._rules.remove(rule)
                    self.faults[rule.fault.kind] += 1
                    return rule.fault
            return None

    def _forward(
        self, method: str, path: str, headers: Message, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request to moto on this thread's kept-alive connection; one reconnect if it went stale."""
        for attempt in (1, 2):
            connection: http.client.HTTPConnection | None = getattr(self._upstream, "connection", None)
            fresh = connection is None
            if connection is None:
                connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
                self._upstream.connection = connection
            try:
                connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        connection.putheader(name, value)
                if body or method in ("PUT", "POST"):
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body or None)
                response = connection.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                connection.close()
                self._upstream.connection = None
                if fresh or attempt == 2:
                    raise
                continue
            if response.will_close:
                connection.close()
                self._upstream.connection = None
            return response.status, response.getheaders(), payload
        raise AssertionError("unreachable")


class _QuietServer(ThreadingHTTPServer):
    """A client that goes away mid-answer (a killed `streamsink run`) is what the tests do on purpose."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pools expect

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass

    @property
    def _proxy(self) -> FaultProxy:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        return proxy

    def _handle(self) -> None:
        body = self._read_body()
        request = self._describe()
        fault = self._proxy._fault_for(request)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay_seconds)
        if fault is not None and fault.kind == "reset":
            self._reset()
            return
        if fault is not None and fault.kind == "status":
            self._send_error(fault, request)
            return
        try:
            status, headers, payload = self._proxy._forward(self.command, self.path, self.headers, body)
        except (http.client.HTTPException, OSError):
            self._reset()  # moto unreachable: the client sees what it would see of a dead endpoint
            return
        if fault is not None and fault.kind == "reset_after_forward":
            self._reset()
            return
        self.send_response_only(status)
        length = None
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "content-length":
                length = value
                continue
            self.send_header(name, value)
        # HEAD answers carry the length of the body they do not send.
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _describe(self) -> RequestInfo:
        host = self.headers.get("Host", "")
        target = self.headers.get("X-Amz-Target", "")
        found = _CREDENTIAL_SERVICE.search(self.headers.get("Authorization", ""))
        service = found.group(1) if found else ""
        bucket = ""
        if service == "s3":
            hostname = host.split(":")[0]
            if hostname.count(".") >= 1 and not hostname.replace(".", "").isdigit() and hostname != "localhost":
                bucket = hostname.split(".")[0]  # virtual-hosted style
            else:
                bucket = urllib.parse.urlsplit(self.path).path.lstrip("/").split("/")[0]
        return RequestInfo(self.command, self.path, host, service, target, bucket)

    def _send_error(self, fault: Fault, request: RequestInfo) -> None:
        if request.target:
            message = fault.message or fault.code
            body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{fault.code}", "message": message})
            content_type = "application/x-amz-json-1.0"
        else:
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{fault.code}</Code><Message>{fault.message or f'injected {fault.code}'}</Message>"
                "<RequestId>fault-proxy</RequestId></Error>"
            )
            content_type = "application/xml"
        payload = body.encode()
        self.send_response_only(fault.status)
        self.send_header("Content-Type", content_type)
        self.send_header("x-amzn-ErrorType", fault.code)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the peer gets an RST ("connection reset by peer"), not a clean close."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
