"""Past one process: throughput of 1 against 2 worker processes, failover time, and what leases cost in writes.

Workers are pipeline children (`bench/harness.py child`) with their own worker ids and one checkpoint table,
reading a simulated stream served from this process; DynamoDB (the checkpoint and lease table) is moto in a
process of its own, reached through a counting proxy so that every request the workers make is counted by
operation.

1. Throughput: the archive sink (to local files), `--shards` shards holding `--records` changes of 1 KB, written
   once every worker has started: records/s from the write to the last change taken, 1 worker and 2.
2. Failover: two workers on 8 shards with a trickle of writes; one is killed (SIGKILL, reaped: a process on the
   same host that is gone) or paused (SIGSTOP: what a dead worker on another host looks like, its heartbeat
   frozen); the seconds from the signal to the first GetRecords of each orphaned shard by the survivor, at the
   default lease settings (failover 10 s, heartbeat 3.3 s, pass 20 s).
3. Lease cost: write requests per minute to the lease table at steady state (an idle stream: no checkpoint
   writes), for 100 and 1,000 shards on 2 and 4 workers, beside what KCL's renewal of every lease every
   failover / 3 would write on the same shards, and what that costs per month at on-demand prices.

Run from the repository root: ``python bench/workers.py`` (``--quick`` for a smoke run). Prints figures;
never asserts timings.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import multiprocessing
import os
import signal
import socketserver
import tempfile
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from harness import (
    MotoServer,
    PipelineChild,
    StreamHost,
    child_spec,
    machine_line,
    percentile,
    process_cpu_seconds,
    table,
)

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.simulated_stream import StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer

WRITE_OPERATIONS = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
WRITE_PRICE_PER_MILLION = 0.625  # on-demand write request units, us-east-1
READ_PRICE_PER_MILLION = 0.125
MINUTES_PER_MONTH = 60 * 24 * 30


class CountingProxy:
    """Forwards every request to moto and counts them by X-Amz-Target operation (and read units asked for)."""

    def __init__(self, backend: str) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        host, port = backend.removeprefix("http://").split(":")
        counts = self.counts

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                target = self.headers.get("X-Amz-Target", "")
                counts[target.rsplit(".", 1)[-1] or self.command] += 1
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_POST = do_GET = do_PUT = do_HEAD = do_DELETE = _relay

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def writes(self) -> int:
        return sum(n for op, n in self.counts.items() if op in WRITE_OPERATIONS)

    def stop(self) -> None:
        self._server.shutdown()


def workers(
    moto_url: str, host: StreamHost, stream_arn: str, count: int, lease: dict[str, float], **options: Any
) -> tuple[list[PipelineChild], str]:
    """`count` workers sharing one new checkpoint table (returned with them), every one started."""
    checkpoints = f"checkpoints-{uuid.uuid4().hex[:8]}"
    spawned = []
    for n in range(count):
        sections = {"checkpoint": {"table_name": checkpoints}, "lease": {"worker_id": f"w{n}", **lease}}
        spec = child_spec(_Url(moto_url), host, stream_arn, sections=sections, **options)
        spawned.append(PipelineChild(spec).start())
    for child in spawned:
        child.wait_for("started", timeout=300)
    return spawned, checkpoints


class _Url:
    """What child_spec reads of a MotoServer: its URL (here the counting proxy's)."""

    def __init__(self, url: str) -> None:
        self.url = url


def owners(moto: MotoServer, table_name: str, stream_arn: str) -> dict[str, set[str]]:
    """Unfinished shards by the worker holding their lease, from the lease rows."""
    store = CheckpointStore(
        moto.client("dynamodb"),
        table_name=table_name,
        stream_arn=stream_arn,
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    )
    held: dict[str, set[str]] = collections.defaultdict(set)
    for shard_id, row in store.load().items():
        if row.owner is not None and not row.finished:
            held[row.owner].add(shard_id)
    return held


def _serve_stream(connection: Connection, shards: int) -> None:
    """In a process of its own: the simulated stream over HTTP, so that serving it shares no GIL with anything
    measured; writes a backlog when told to."""
    simulator = StreamSimulator(call_log_size=10, rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=shards)
    server = SimulatedStreamsServer(simulator).start()
    connection.send((server.endpoint_url, stream.arn))
    while (command := connection.recv()) != "stop":
        stream.write_synthetic(int(command), item_bytes=1000, track_items=False)
        connection.send("written")
    server.stop()


def throughput(moto: MotoServer, shards: int, records: int) -> list[tuple[int, float, float, float, float]]:
    """Per run (1 and 2 workers): workers, records/s, the workers' CPU milliseconds per 1,000 records, and the
    cores the workers and the rest of the machine (the stream's server, moto) used meanwhile."""
    found = []
    for count in (1, 2):
        ours, theirs = multiprocessing.Pipe()
        serving = multiprocessing.get_context("spawn").Process(target=_serve_stream, args=(theirs, shards))
        serving.start()
        url, stream_arn = ours.recv()
        assert serving.pid is not None
        with tempfile.TemporaryDirectory(prefix="streamsink-bench-") as local_dir:
            spawned, _ = workers(
                moto.url,
                _Url(url),
                stream_arn,
                count,
                {"failover_seconds": 10.0},
                sink="local",
                local_dir=local_dir,
                progress_seconds=0.2,
            )
            time.sleep(2.0)  # every worker has joined and the leases are spread
            host_cpu, moto_cpu = process_cpu_seconds(serving.pid), moto.cpu_seconds()
            worker_cpu = sum(c.progress[-1]["cpu_seconds"] if c.progress else 0.0 for c in spawned)
            written_at = time.time()
            ours.send(str(records))
            ours.recv()
            deadline = time.monotonic() + 600
            while sum(c.progress[-1]["taken"] if c.progress else 0 for c in spawned) < records:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not take every record")
                time.sleep(0.05)
            done_at = time.time()
            cpu = sum(c.progress[-1]["cpu_seconds"] for c in spawned) - worker_cpu
            others = process_cpu_seconds(serving.pid) - host_cpu + moto.cpu_seconds() - moto_cpu
            for child in spawned:
                child.finish()
        ours.send("stop")
        serving.join(30)
        wall = done_at - written_at
        found.append((count, records / wall, cpu / records * 1_000_000, cpu / wall, others / wall))
    return found


def failover(moto: MotoServer, how: str, rounds: int) -> list[float]:
    """Seconds from SIGKILL/SIGSTOP of one of two workers to the first GetRecords of each shard it held."""
    seconds: list[float] = []
    for _ in range(rounds):
        simulator = StreamSimulator(call_log_size=10, rollover_seconds=None)
        stream = simulator.create_stream("orders", shards=8)
        with StreamHost(simulator) as host:
            spawned, checkpoints = workers(moto.url, host, stream.arn, 2, {}, sink="discard", progress_seconds=1.0)
            victim, survivor = spawned
            deadline = time.monotonic() + 120
            while sorted(len(s) for s in owners(moto, checkpoints, stream.arn).values()) != [4, 4]:
                if time.monotonic() > deadline:
                    raise RuntimeError("the two workers did not balance")
                time.sleep(0.5)
            held = owners(moto, checkpoints, stream.arn)["w0"]
            signalled = time.time()
            os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            deadline = time.monotonic() + 60
            firsts: dict[str, float] = {}
            while len(firsts) < len(held) and time.monotonic() < deadline:
                for event in list(host.events):
                    if event.operation == "GetRecords" and event.shard_id in held and event.at > signalled:
                        firsts.setdefault(event.shard_id or "", event.at - signalled)
                time.sleep(0.1)
            seconds.extend(firsts.values())
            if how == "pause":
                os.kill(victim.pid, signal.SIGCONT)
            victim.kill()
            survivor.finish()
    return seconds


def lease_cost(moto: MotoServer, shards: int, count: int, window: float) -> tuple[float, float, str]:
    """Write and read requests per minute to the lease table at steady state (nothing written to the stream)."""
    proxy = CountingProxy(moto.url)
    simulator = StreamSimulator(call_log_size=10, rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=shards)
    try:
        with StreamHost(simulator) as host:
            spawned, checkpoints = workers(proxy.url, host, stream.arn, count, {}, sink="discard", progress_seconds=5.0)
            share = -(-shards // count)
            deadline = time.monotonic() + 300
            while max((len(s) for s in owners(moto, checkpoints, stream.arn).values()), default=shards) > share:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not balance")
                time.sleep(1.0)
            time.sleep(10.0)
            before_writes, before = proxy.writes(), dict(proxy.counts)
            time.sleep(window)
            writes = (proxy.writes() - before_writes) / window * 60
            reads = sum(proxy.counts[op] - before.get(op, 0) for op in ("Query", "GetItem")) / window * 60
            by_operation = ", ".join(
                f"{op} {(n - before.get(op, 0)) / window * 60:,.0f}"
                for op, n in sorted(proxy.counts.items())
                if n > before.get(op, 0)
            )
            for child in spawned:
                child.finish()
    finally:
        proxy.stop()
    return writes, reads, by_operation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small figures, minutes less")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument(
        "--parts", default="1,2,3", help="which measurements: 1 throughput, 2 failover, 3 lease upkeep (default all)"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    records = 40_000 if args.quick else args.records
    print(machine_line())
    with MotoServer() as moto:
        if "1" in parts:
            print(f"\n1. throughput, archive sink to local files, {args.shards} shards, {records:,} changes of 1 KB")
            rows = throughput(moto, args.shards, records)
            one = rows[0][1]
            print(
                table(
                    ["workers", "records/s", "vs 1 worker", "CPU ms / 1k records", "workers' cores", "other cores"],
                    [
                        [str(n), f"{rate:,.0f}", f"{rate / one:.2f}x", f"{cpu:.1f}", f"{used:.2f}", f"{rest:.2f}"]
                        for n, rate, cpu, used, rest in rows
                    ],
                )
            )
            print("other cores: the simulated stream's server (a process of its own, writing the backlog) and moto")
        if "2" in parts:
            failovers(moto, 1 if args.quick else 2)
        if "3" in parts:
            upkeep(moto, args.quick)


def failovers(moto: MotoServer, rounds: int) -> None:
    print("\n2. failover at the default lease settings (failover 10 s, heartbeat 3.3 s, pass 20 s), 2 workers")
    found = []
    for how in ("kill", "pause"):
        seconds = failover(moto, how, rounds)
        label = "SIGKILL (same host)" if how == "kill" else "SIGSTOP (as seen of a dead host)"
        found.append(
            [
                label,
                str(len(seconds)),
                f"{min(seconds, default=float('nan')):.1f}",
                f"{percentile(seconds, 50) if seconds else float('nan'):.1f}",
                f"{max(seconds, default=float('nan')):.1f}",
            ]
        )
    print(table(["signal", "orphans", "min s", "p50 s", "max s"], found))


def upkeep(moto: MotoServer, quick: bool) -> None:
    print("\n3. lease upkeep at steady state (no changes flowing: every write is lease upkeep)")
    window = 30.0 if quick else 60.0
    cost_rows = []
    for shards, count in ((100, 2),) if quick else ((100, 2), (100, 4), (1000, 2), (1000, 4)):
        writes, reads, by_operation = lease_cost(moto, shards, count, window)
        print(f"  {shards} shards, {count} workers, requests per minute: {by_operation}")
        kcl = shards * 60 / (10.0 / 3)
        cost_rows.append(
            [
                str(shards),
                str(count),
                f"{writes:,.0f}",
                f"{writes / shards:.2f}",
                f"{kcl:,.0f}",
                f"${writes * MINUTES_PER_MONTH / 1e6 * WRITE_PRICE_PER_MILLION:,.2f}",
                f"${kcl * MINUTES_PER_MONTH / 1e6 * WRITE_PRICE_PER_MILLION:,.2f}",
                f"{reads:,.0f}",
            ]
        )
    headers = ["shards", "workers", "writes/min", "per shard", "KCL writes/min", "ours $/month", "KCL $/month"]
    print(table([*headers, "read calls/min"], cost_rows))
    print(
        f"writes priced at ${WRITE_PRICE_PER_MILLION}/million on-demand write units (1 KB items), reads at "
        f"${READ_PRICE_PER_MILLION}/million read units (a pass reads the whole partition: several units)"
    )


if __name__ == "__main__":
    main()
