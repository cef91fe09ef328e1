"""The stream simulator over HTTP, in front of a backend: one endpoint_url for a whole pipeline process.

A `streamsink run` in another process reaches AWS through one `source.endpoint_url`. This server answers the
DynamoDB Streams requests in it (X-Amz-Target `DynamoDBStreams_20120810.*`) and DescribeTable of the simulated
tables (`DynamoDB_20120810.DescribeTable`, see `StreamSimulator.handle_dynamodb`) from a `StreamSimulator`, and
forwards every other request unchanged (DynamoDB for the checkpoint table and for tables it does not simulate, S3
for a sink, ...) to `backend_url`, typically the moto server. The pipeline then sets `source.stream_arn` to the
simulated stream's ARN, or `source.table_name` to the simulated table, whose stream it resolves as on AWS.

    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as server:
        ... source.endpoint_url = server.endpoint_url ...
"""

from __future__ import annotations

import http.client
import logging
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from pipeline.testing.simulated_stream import (
    DYNAMODB_TARGET_PREFIX,
    STREAMS_TARGET_PREFIX,
    StreamSimulator,
    WireResponse,
)

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
)


class SimulatedStreamsServer:
    """A threaded HTTP server on a free loopback port (`port=0`) for one simulator; start/stop or `with`."""

    def __init__(
        self,
        simulator: StreamSimulator,
        *,
        backend_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.simulator = simulator
        self.backend_url = backend_url
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.forwarded = 0
        """Requests passed to the backend."""

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> SimulatedStreamsServer:
        handler = type("_BoundHandler", (_Handler,), {"owner": self})
        self._server = _QuietServer(self._address, handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long `stop` waits for the loop to notice
            name="simulated-streams",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> SimulatedStreamsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    """A client that disconnects mid-request (a killed pipeline, a closed pool) is normal here, not a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: SimulatedStreamsServer
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses connections as it does with AWS

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        body = self._read_body()
        target = self.headers.get("X-Amz-Target", "")
        simulator = self.owner.simulator
        answer: WireResponse | None = None
        try:
            if self.command == "POST" and target.startswith(STREAMS_TARGET_PREFIX):
                answer = simulator.handle(
                    target.removeprefix(STREAMS_TARGET_PREFIX), body, self.headers.get("User-Agent")
                )
            elif self.command == "POST" and target.startswith(DYNAMODB_TARGET_PREFIX):
                answer = simulator.handle_dynamodb(target.removeprefix(DYNAMODB_TARGET_PREFIX), body)
        except Exception:
            log.exception("the simulator failed on %s", target)
            self._send(500, [("Content-Type", "text/plain")], b"simulator error")
            return
        if answer is None:  # not for the simulator: another service, or a table it does not simulate
            self._forward(body)
            return
        self._send(answer.status, list(answer.headers.items()), answer.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> None:
        backend = self.owner.backend_url
        if backend is None:
            self._send(502, [("Content-Type", "text/plain")], b"no backend for requests other than DynamoDB Streams")
            return
        url = urllib.parse.urlsplit(backend)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=60)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            status, reply_headers = response.status, response.getheaders()
        except OSError as exc:
            self._send(502, [("Content-Type", "text/plain")], f"backend unreachable: {exc}".encode())
            return
        finally:
            connection.close()
        self.owner.forwarded += 1
        kept = [(k, v) for k, v in reply_headers if k.lower() not in _HOP_BY_HOP]
        # A HEAD answer has no body but tells the length of the one a GET would get: pass that on.
        length = next((v for k, v in reply_headers if k.lower() == "content-length"), None)
        self._send(status, kept, payload, content_length=length if self.command == "HEAD" else None)

    def _send(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, content_length: str | None = None
    ) -> None:
        self.send_response(status)  # adds Date and Server
        for name, value in headers:
            if name.lower() not in ("content-length", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", content_length if content_length is not None else str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


__all__ = ["SimulatedStreamsServer"]
