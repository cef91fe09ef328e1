"""A thousand open shards in one process, against a process per shard.

streamsink polls every shard from a fixed pool of threads (`reader.poll_workers`), backing idle shards off to
`reader.idle_poll_max_seconds`. This runs the pipeline (archive sink to a moto S3, checkpoints in moto DynamoDB)
in a child process on a simulated stream of `--shards` open shards with a trickle of writes, and reports:

- the child's peak RSS (VmHWM) and its thread count (/proc Threads, threading.active_count), sampled every
  second, for each shard count, so growth with shards shows;
- from the simulator's timestamped request log: how long until every shard had its first GetRecords, the
  longest gap between two polls of one shard once idle shards have backed off, and GetRecords per shard per
  minute.

In the same run it starts the naive alternative at `--naive-shards` shards: one OS process per shard, each with
its own boto3 client looping on GetRecords (one second's sleep after an empty page), as the first consumer
scripts did, and sums its processes' RSS, PSS (shared pages split between the processes that map them) and
threads.

Run from the repository root: ``python bench/many_shards.py`` (``--quick`` for a smoke run). Prints figures;
never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import boto3
from harness import (
    REGION,
    WARM_UP_SECONDS,
    MotoServer,
    PipelineChild,
    PollFigures,
    StreamHost,
    Trickle,
    checkpoint_version,
    child_spec,
    machine_line,
    mib,
    percentile,
    poll_figures,
    proc_status,
    process_cpu_seconds,
    pss_kib,
    table,
)

from pipeline.testing.emulator import DUMMY_CREDENTIALS
from pipeline.testing.simulated_stream import StreamSimulator


@dataclass(frozen=True)
class Footprint:
    approach: str
    shards: int
    processes: int
    threads: int
    rss_kib: int
    hwm_kib: int
    pss_kib: int | None
    cpu_per_minute: float
    """CPU seconds per minute of wall time while idle-polling: the cost of just watching."""
    polls: PollFigures
    extra: dict[str, Any]


def run_streamsink(moto: MotoServer, shards: int, seconds: float, writes_per_second: float) -> Footprint:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    bucket = f"archive-{uuid.uuid4().hex[:10]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    with StreamHost(simulator) as host:
        child = PipelineChild(child_spec(moto, host, stream.arn, sink="s3", bucket=bucket, max_seconds=seconds)).start()
        trickle = Trickle(stream, writes_per_second).start()
        try:
            started = child.wait_for("started", timeout=300)
            done = child.wait_for("done", timeout=seconds + 300)
        finally:
            trickle.stop()
            child.kill()
        ended = started["t"] + done["wall_seconds"]
        steady_from = started["t"] + WARM_UP_SECONDS
        polls = poll_figures(
            host.events, stream.open_shard_ids(), started=started["t"], steady_from=steady_from, ended=ended
        )
    cpu_per_minute = child.cpu_per_minute(after=started["t"] + WARM_UP_SECONDS)
    return Footprint(
        approach="streamsink, one process",
        shards=shards,
        processes=1,
        threads=int(done["peak_threads"]),
        rss_kib=max(int(p["rss_kib"]) for p in child.progress),
        hwm_kib=int(done["hwm_kib"]),
        pss_kib=None,
        cpu_per_minute=cpu_per_minute,
        polls=polls,
        extra={
            "active_count": done["peak_active_count"],
            "start_seconds": done["start_seconds"],
            "written": trickle.written,
            "taken": done["taken"],
            "threads_over_time": sorted({int(p["threads"]) for p in child.progress}),
            "latencies": done["latencies"],
        },
    )


def run_naive(shards: int, settle_seconds: float, writes_per_second: float) -> Footprint:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    shard_ids = stream.open_shard_ids()
    processes: list[subprocess.Popen[bytes]] = []
    with StreamHost(simulator) as host:
        trickle = Trickle(stream, writes_per_second).start()
        started = time.time()
        try:
            for shard_id in shard_ids:
                command = [sys.executable, os.path.abspath(__file__), "--naive-shard", host.url, stream.arn, shard_id]
                processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
            # Wait until every process polls, then let them settle into their loop before measuring.
            deadline = time.monotonic() + 600
            while len({e.shard_id for e in host.events if e.operation == "GetRecords"}) < shards:
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    raise RuntimeError("the per-shard processes did not all start polling")
                time.sleep(0.5)
            all_polled = time.time()
            cpu_before = sum(process_cpu_seconds(p.pid) for p in processes)
            time.sleep(settle_seconds)
            cpu_after = sum(process_cpu_seconds(p.pid) for p in processes)
            statuses = [proc_status(p.pid) for p in processes]
            pss = [pss_kib(p.pid) for p in processes]
            ended = time.time()
        finally:
            trickle.stop()
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
        # The naive loop does not back off: the steady window starts once every process polls.
        polls = poll_figures(host.events, shard_ids, started=started, steady_from=all_polled, ended=ended)
    return Footprint(
        approach="process per shard",
        shards=shards,
        processes=len(processes),
        threads=sum(s.get("Threads", 0) for s in statuses),
        rss_kib=sum(s.get("VmRSS", 0) for s in statuses),
        hwm_kib=sum(s.get("VmHWM", 0) for s in statuses),
        pss_kib=sum(p for p in pss if p is not None),
        cpu_per_minute=(cpu_after - cpu_before) / settle_seconds * 60,
        polls=polls,
        extra={"written": trickle.written},
    )


def naive_shard(endpoint_url: str, stream_arn: str, shard_id: str) -> None:
    """The per-shard script: its own client, GetRecords in a loop, a second's sleep when nothing came back."""
    for name, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    client = boto3.client("dynamodbstreams", region_name=REGION, endpoint_url=endpoint_url)
    iterator = client.get_shard_iterator(StreamArn=stream_arn, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    seen = 0
    while iterator:
        page = client.get_records(ShardIterator=iterator)
        seen += len(page["Records"])
        iterator = page.get("NextShardIterator")
        if not page["Records"]:
            time.sleep(1.0)


def report(footprints: list[Footprint], args: argparse.Namespace) -> str:
    rows = []
    for f in footprints:
        rows.append(
            [
                f.approach,
                f"{f.shards:,}",
                str(f.processes),
                str(f.threads),
                mib(f.hwm_kib),
                mib(f.rss_kib),
                mib(f.pss_kib),
                f"{f.hwm_kib / 1024 / f.shards:.2f}",
                "-" if f.polls.all_polled_after is None else f"{f.polls.all_polled_after:.1f}",
                f"{f.polls.max_gap:.1f}",
                f"{f.polls.per_shard_per_minute:.1f}",
                f"{f.cpu_per_minute:.1f}",
            ]
        )
    lines = [
        f"Open shards, a trickle of {args.writes_per_second:g} writes/s spread over them; streamsink with default "
        f"settings (poll_workers 8, idle back-off 0.25 s -> 10 s), archive sink to moto S3",
        "",
        table(
            [
                "approach",
                "shards",
                "procs",
                "threads",
                "peak RSS MiB",
                "RSS MiB",
                "PSS MiB",
                "peak MiB/shard",
                "all polled s",
                "max gap s",
                "GetRecords/shard/min",
                "CPU s/min",
            ],
            rows,
        ),
        "",
        "peak RSS: VmHWM of the pipeline process; for the process per shard, the sum of every process's VmHWM",
        "RSS: the highest VmRSS sampled (streamsink) or the sum of VmRSS (per shard); PSS: shared pages split "
        "between the processes mapping them (per shard only)",
        "threads: /proc Threads, the highest sampled (streamsink) or the sum over processes (per shard)",
        "all polled s: from start until the last shard's first GetRecords (per shard: from the first process "
        "started, imports included)",
        f"max gap s / GetRecords/shard/min: after {WARM_UP_SECONDS:.0f} s of warm-up, the longest time any shard "
        "went unpolled, and the call rate",
        "CPU s/min: CPU seconds the pipeline (all per-shard processes) used per minute of wall time, warmed up",
    ]
    for f in footprints:
        if f.approach.startswith("streamsink"):
            lines.append(
                f"streamsink at {f.shards:,} shards: threads sampled {f.extra['threads_over_time']} (active_count "
                f"peak {f.extra['active_count']}), start-up {f.extra['start_seconds']:.1f} s, other calls/min: "
                f"{', '.join(f'{op} {n:.1f}' for op, n in f.polls.other_calls_per_minute.items()) or 'none'}; "
                f"{f.extra['taken']}/{f.extra['written']} trickled changes "
                f"delivered, change -> sink p50 {percentile(f.extra['latencies'], 50):.2f} s / p99 "
                f"{percentile(f.extra['latencies'], 99):.2f} s"
            )
    ours = next((f for f in footprints if f.approach.startswith("streamsink") and f.shards == args.naive_shards), None)
    naive = next((f for f in footprints if f.approach == "process per shard"), None)
    if ours and naive:
        lines.append(
            f"at {naive.shards} shards the process per shard takes {naive.hwm_kib / ours.hwm_kib:.0f}x the peak RSS "
            f"({(naive.pss_kib or 0) / ours.hwm_kib:.0f}x counting shared pages once), {naive.threads} threads "
            f"against {ours.threads}, and {naive.polls.per_shard_per_minute / ours.polls.per_shard_per_minute:.0f}x "
            "the GetRecords calls"
        )
    lines += ["", checkpoint_version(), machine_line()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["--naive-shard"]:
        naive_shard(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000], help="streamsink runs (100 1000)")
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each streamsink run (default 90)")
    parser.add_argument("--naive-shards", type=int, default=100, help="processes for the naive run (default 100)")
    parser.add_argument("--naive-seconds", type=float, default=30.0, help="naive run after all poll (default 30)")
    parser.add_argument("--writes-per-second", type=float, default=10.0, help="trickle over all shards (10)")
    parser.add_argument("--quick", action="store_true", help="10 and 200 shards for 45 s, 10 naive processes")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.seconds, args.naive_shards, args.naive_seconds = [10, 200], 45.0, 10, 15.0
    if args.seconds <= WARM_UP_SECONDS:
        parser.error(f"--seconds must be more than the {WARM_UP_SECONDS:.0f}-s warm-up")

    footprints = []
    with MotoServer() as moto:
        for shards in args.shards:
            footprints.append(run_streamsink(moto, shards, args.seconds, args.writes_per_second))
            print(f"... streamsink, {shards} shards: {mib(footprints[-1].hwm_kib)} MiB", file=sys.stderr)
    if args.naive_shards:
        footprints.append(run_naive(args.naive_shards, args.naive_seconds, args.writes_per_second))
        print(f"... process per shard, {args.naive_shards}: {mib(footprints[-1].hwm_kib)} MiB", file=sys.stderr)
    print(report(footprints, args))


if __name__ == "__main__":
    main()
