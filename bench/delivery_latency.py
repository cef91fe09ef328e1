"""Delivery at real AWS round trips: each sink alone, and all four on one pipeline, at 0, 5, 20 and 50 ms.

moto spends milliseconds of CPU per call, so against it no sink shows what keeping calls in flight is worth. Here
the sinks' real boto3/s3fs/pyarrow clients talk to `bench/latency_endpoint.py` (its own process), which answers
every call correctly after the round trip it is set to. The pipeline runs in a child process as `streamsink run`
builds it (sinks from `[[sinks]]` entries, each with its lanes), reading a simulated stream of `--shards` shards
holding `--records` changes of about `--item-bytes` (the simulated DynamoDB Streams over HTTP, served from this
process), with checkpoints in moto DynamoDB (moto in a process of its own).

For every sink and round trip it prints:
- records/s: changes every sink has taken, from the pipeline's start to the last one;
- calls in flight at the endpoint (most at once, and the mean over the run) and entries per call;
- the pipeline child's CPU per record;
- the serial bound: entries per call / round trip, what one call at a time can carry whatever the CPU;
- the Lambda-equivalent figure: one serial consumer per shard (an event source mapping with
  ParallelizationFactor 1 runs one batch per shard at a time), `shards x` the serial bound;
- the same pipeline with `max_concurrency = 1` (one call in flight per sink, as before the lanes) beside it, for
  the sinks whose calls wait on the round trip.

Run from the repository root: ``python bench/delivery_latency.py`` (``--quick`` for a smoke run). Prints
figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from harness import MotoServer, StreamHost, child_spec, drain, machine_line, profile_report, table
from latency_endpoint import LatencyEndpoint

from pipeline.testing.simulated_stream import StreamSimulator

QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/changes"
TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:changes"
SINKS = ("sqs", "sns", "dynamodb_table", "s3_parquet", "all four")
ENTRIES_PER_CALL = {"sqs": 10, "sns": 10, "dynamodb_table": 1}


def entries(which: str, endpoint_url: str, concurrency: int | None) -> list[dict[str, Any]]:
    chosen = ("sqs", "sns", "dynamodb_table", "s3_parquet") if which == "all four" else (which,)
    made: list[dict[str, Any]] = []
    for kind in chosen:
        entry: dict[str, Any] = {"type": kind, "endpoint_url": endpoint_url}
        if kind == "sqs":
            entry["queue_url"] = QUEUE_URL
        elif kind == "sns":
            entry["topic_arn"] = TOPIC_ARN
        elif kind == "dynamodb_table":
            entry["table_name"] = "replica"
        else:
            entry.update(bucket="archive", prefix="orders/", buffer_max_seconds=5)
        if concurrency is not None and kind != "s3_parquet":
            entry["max_concurrency"] = concurrency
        made.append(entry)
    return made


@dataclass(frozen=True)
class Run:
    sink: str
    latency_ms: int
    concurrency: str
    records: int
    seconds: float
    cpu_seconds: float
    endpoint: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def calls(self, services: tuple[str, ...] = ("sqs", "sns", "dynamodb", "s3")) -> int:
        return sum(self.endpoint["services"].get(s, {}).get("calls", 0) for s in services)

    def entries_per_call(self) -> float | None:
        services = self.endpoint["services"]
        calls = entries_ = 0
        for service in ("sqs", "sns", "dynamodb"):
            for name, counts in services.get(service, {}).get("operations", {}).items():
                if name in ("SendMessageBatch", "PublishBatch", "PutItem", "DeleteItem"):
                    calls += counts["calls"]
                    entries_ += counts["entries"]
        return entries_ / calls if calls else None


def run_once(
    moto: MotoServer,
    endpoint: LatencyEndpoint,
    *,
    sink: str,
    latency_ms: int,
    concurrency: int | None,
    shards: int,
    records: int,
    item_bytes: int,
    profile: bool = False,
) -> Run:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    stream.write_synthetic(records, item_bytes=item_bytes, track_items=False, key_prefix=uuid.uuid4().hex[:6])
    endpoint.set(latency_ms=latency_ms)
    endpoint.reset()
    with StreamHost(simulator) as host:
        spec = child_spec(
            moto,
            host,
            stream.arn,
            sink_entries=entries(sink, endpoint.url, concurrency),
            stop_after_records=records,
            max_seconds=1800,
            profile=profile,
        )
        done, _ = drain(spec, timeout=1800)
    if profile:
        print(profile_report(done), flush=True)
    reached = done["reached"]
    return Run(
        sink=sink,
        latency_ms=latency_ms,
        concurrency="default" if concurrency is None else str(concurrency),
        records=records,
        seconds=float(reached["seconds"]) - float(done["start_seconds"]),
        cpu_seconds=float(reached["cpu_seconds"]),
        endpoint=endpoint.stats(),
    )


def serial_bound(sink: str, latency_ms: int) -> float | None:
    """Entries per call / round trip, for one call at a time. The archive buffers and uploads per flush: none."""
    if latency_ms == 0:
        return None
    per_call = [ENTRIES_PER_CALL[s] for s in ("sqs", "sns", "dynamodb_table") if sink in (s, "all four")]
    if not per_call:
        return None
    # All four on one pipeline: every change goes to each sink, so the slowest serial sink bounds it.
    return min(per_call) / (latency_ms / 1000)


def report(runs: list[Run], shards: int) -> str:
    rows = []
    zero = {r.sink: r.rate for r in runs if r.latency_ms == 0 and r.concurrency == "default"}
    for r in runs:
        bound = serial_bound(r.sink, r.latency_ms)
        per_call = r.entries_per_call()
        rows.append(
            [
                r.sink,
                f"{r.latency_ms} ms",
                r.concurrency,
                f"{r.rate:,.0f}",
                f"{r.rate / zero[r.sink]:.0%}" if r.sink in zero and r.concurrency == "default" else "-",
                f"{r.endpoint['max_in_flight']} / {r.endpoint['mean_in_flight']:.1f}",
                "-" if per_call is None else f"{per_call:.1f}",
                f"{r.cpu_seconds / r.records * 1e6:,.0f} us",
                "-" if bound is None else f"{bound:,.0f}",
                "-" if bound is None else f"{bound * shards:,.0f}",
            ]
        )
    header = [
        "sink",
        "round trip",
        "max_concurrency",
        "records/s",
        "vs 0 ms",
        "in flight max / mean",
        "entries/call",
        "CPU/record",
        "serial bound",
        f"Lambda-equivalent ({shards} shards)",
    ]
    return table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--serial-records", type=int, default=2_000, help="records for max_concurrency = 1 runs")
    parser.add_argument("--item-bytes", type=int, default=1000)
    parser.add_argument("--latencies", type=int, nargs="+", default=[0, 5, 20, 50])
    parser.add_argument("--sinks", nargs="+", default=list(SINKS), choices=SINKS)
    parser.add_argument("--no-serial", action="store_true", help="skip the max_concurrency = 1 runs")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="max_concurrency for every sink (default: theirs)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 records, 0 and 20 ms")
    parser.add_argument("--profile", action="store_true", help="sample the child's threads: where the CPU goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.serial_records, args.latencies = 2_000, 400, [0, 20]
    print(machine_line())
    runs: list[Run] = []
    with MotoServer() as moto, LatencyEndpoint(latency_ms=0).start() as endpoint:
        for latency_ms in args.latencies:
            for sink in args.sinks:
                common = {
                    "sink": sink,
                    "latency_ms": latency_ms,
                    "shards": args.shards,
                    "item_bytes": args.item_bytes,
                    "profile": args.profile,
                }
                run = run_once(moto, endpoint, concurrency=args.concurrency, records=args.records, **common)
                runs.append(run)
                print(
                    f"  {sink:>14} {latency_ms:>2} ms default: {run.rate:8,.0f} records/s, "
                    f"{run.endpoint['max_in_flight']} in flight at most, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if not args.no_serial and latency_ms > 0 and sink != "s3_parquet":
                    serial = run_once(moto, endpoint, concurrency=1, records=args.serial_records, **common)
                    runs.append(serial)
                    print(f"  {sink:>14} {latency_ms:>2} ms serial:  {serial.rate:8,.0f} records/s", flush=True)
    print()
    print(report(runs, args.shards))
    print(f"\n{machine_line()} (at the end); {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
