"""A simulated day and more: the pipeline's memory and checkpoint rows should not grow with time or shards seen.

The stream simulator runs on a `ManualClock` that starts at the current wall time and is moved one simulated
minute per step, paced so that a simulated hour takes `--seconds-per-hour` real seconds. Every step writes a
steady trickle of changes (`--writes-per-minute`, spread over the open shards by key hash). The simulator's own
defaults do the rest on its clock: every open shard rolls over into a child every 4 hours, records are trimmed
after 24 hours, a closed shard leaves the stream's listing 24 hours after it closed, iterators expire after 15
minutes. So the number of shards ever created climbs by `--shards` every 4 hours (700 after a day at 100 shards),
while the number the stream lists stops at 700 from hour 24 on: the first generation leaves the listing at hour 28
(closed at 4 h, listed 24 h more) as the eighth arrives. From then on the pipeline has to prune checkpoint rows and
in-memory state of shards it will never see again; the default `--hours` (34) takes it through two such prunings
(at 28 h and 32 h).

The pipeline runs in a child process with default settings (archive sink to moto S3 by default, checkpoints in
moto DynamoDB, moto in a process of its own) and reads the simulated stream over HTTP from this process. At every
simulated hour this samples the child's VmRSS, VmHWM and threads from /proc, counts the consumer's rows in the
checkpoint table (a Query of its partition, bookkeeping rows starting with '#' left out), and takes from the
child's last progress report what it has read, what the sink has taken and what it holds per shard. The records
written but not yet read, the queue depth and how far the newest checkpoint trails the writes (in simulated
time) show whether the pipeline kept up: if it had not, the figures would measure a backlog, not growth.

Run from the repository root: ``python bench/memory_day.py`` (``--quick`` for a smoke run). Prints figures;
never asserts.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from harness import (
    MotoServer,
    PipelineChild,
    StreamHost,
    child_spec,
    machine_line,
    mib,
    proc_status,
    process_cpu_seconds,
    table,
)

from pipeline.testing.simulated_stream import ManualClock, SimulatedStream, StreamSimulator

GOAL = 0.05
"""RSS at the last hour within 5% of the first hour after warm-up."""
FIRST_ROLLOVER_HOUR = 4
"""The simulator's default roll-over: every open shard closes and its child opens 4 simulated hours in."""
STEP_SECONDS = 60.0
"""Simulated seconds per step: writes happen once a simulated minute."""
CONSUMER = "streamsink"
"""checkpoint.consumer_name (the default): the first part of the checkpoint table's partition key."""


@dataclass(frozen=True)
class Hour:
    """What one simulated hour ended with."""

    hour: int
    real_seconds: float
    """Wall time this simulated hour took (the pace: it should be about --seconds-per-hour)."""
    listed: int
    open_shards: int
    ever: int
    rows: int
    rows_unlisted: int
    """Checkpoint rows of shards the stream no longer lists (finished ones wait for the next pruning)."""
    rss_kib: int
    hwm_kib: int
    threads: int
    written: int
    read: int
    unread: int
    """Written but not yet read by the pipeline, at the time of its last progress report."""
    taken: int
    queue: int
    checkpoint_lag_minutes: float | None
    """Simulated minutes from the newest checkpointed record (`last_record_at`) to the simulator's clock."""
    child: dict[str, Any]
    calls: dict[str, int]
    """Simulator calls during the hour, by operation (and operation:error)."""
    child_cpu: float
    moto_cpu: float
    own_cpu: float
    memory: dict[str, Any] | None = None
    """With --diagnose: the child's `MemoryProbe` report at the hour."""


class CheckpointRows:
    """The consumer's rows in the checkpoint table, counted from this process with a Query of its partition."""

    def __init__(self, dynamodb: Any, table_name: str, stream_arn: str) -> None:
        self._ddb = dynamodb
        self._table = table_name
        self._partition = f"{CONSUMER}|{stream_arn}"

    def read(self) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "#s = :s",
            "ExpressionAttributeNames": {"#s": "stream"},
            "ExpressionAttributeValues": {":s": {"S": self._partition}},
            "ProjectionExpression": "shard_id, last_record_at",
            "ConsistentRead": True,
        }
        rows: list[dict[str, Any]] = []
        while True:
            try:
                page = self._ddb.query(**request)
            except self._ddb.exceptions.ResourceNotFoundException:
                return []  # before the child has created the table
            rows.extend(item for item in page.get("Items", []) if not item["shard_id"]["S"].startswith("#"))
            if "LastEvaluatedKey" not in page:
                return rows
            request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _checkpoint_lag(rows: list[dict[str, Any]], now: float) -> float | None:
    times = [datetime.fromisoformat(r["last_record_at"]["S"]).timestamp() for r in rows if "last_record_at" in r]
    return None if not times else (now - max(times)) / 60


def run(args: argparse.Namespace) -> tuple[list[Hour], dict[str, Any]]:
    clock = ManualClock(time.time())
    simulator = StreamSimulator(clock=clock, call_log_size=10)  # AWS's roll-over, retention and iterator expiry
    stream = simulator.create_stream("orders", shards=args.shards)
    bucket = f"archive-{uuid.uuid4().hex[:10]}"
    hours: list[Hour] = []
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="streamsink-bench-") as local_dir:
        if args.sink == "s3":
            moto.client("s3").create_bucket(Bucket=bucket)
        with StreamHost(simulator) as host:
            spec = child_spec(
                moto,
                host,
                stream.arn,
                sink=args.sink,
                bucket=bucket,
                local_dir=local_dir,
                max_seconds=args.hours * args.seconds_per_hour * 2 + 600,
                progress_seconds=0.5,
                tracemalloc_frames=args.tracemalloc,
            )
            rows = CheckpointRows(moto.client("dynamodb"), spec.sections["checkpoint"]["table_name"], stream.arn)
            child = PipelineChild(spec).start()
            try:
                started = child.wait_for("started", timeout=300)
                hours = _simulate(args, clock, simulator, stream, host, child, moto, rows, started)
                done = child.finish(timeout=300)
            finally:
                child.kill()
    return hours, done


def _simulate(
    args: argparse.Namespace,
    clock: ManualClock,
    simulator: StreamSimulator,
    stream: SimulatedStream,
    host: StreamHost,
    child: PipelineChild,
    moto: MotoServer,
    rows: CheckpointRows,
    started: dict[str, Any],
) -> list[Hour]:
    steps_per_hour = round(3600 / STEP_SECONDS)
    step_real = args.seconds_per_hour / steps_per_hour
    ever: set[str] = set()
    written = 0
    # (wall time, records written by then): what had been written when the child sent a progress report.
    written_at: list[tuple[float, int]] = [(started["t"], 0)]
    hours: list[Hour] = []
    calls_before: dict[str, int] = {}
    cpu_before = (process_cpu_seconds(child.pid), moto.cpu_seconds(), time.process_time())
    began = hour_began = time.monotonic()

    def sample(hour: int) -> Hour:
        nonlocal calls_before, cpu_before, hour_began
        status = proc_status(child.pid)
        shards = stream.shards()
        ever.update(s.shard_id for s in shards)
        listed = {s.shard_id for s in shards}
        found = rows.read()
        report = child.progress[-1] if child.progress else {}
        index = bisect.bisect_right(written_at, (report.get("t", started["t"]), sys.maxsize)) - 1
        read = int(report.get("records_read", 0))
        calls = dict(simulator.counts)
        cpu = (process_cpu_seconds(child.pid), moto.cpu_seconds(), time.process_time())
        now = time.monotonic()
        figures = Hour(
            hour=hour,
            real_seconds=now - hour_began,
            listed=len(shards),
            open_shards=sum(1 for s in shards if not s.closed),
            ever=len(ever),
            rows=len(found),
            rows_unlisted=sum(1 for r in found if r["shard_id"]["S"] not in listed),
            rss_kib=status.get("VmRSS", 0),
            hwm_kib=status.get("VmHWM", 0),
            threads=status.get("Threads", 0),
            written=written,
            read=read,
            unread=written_at[index][1] - read,
            taken=int(report.get("taken", 0)),
            queue=int(report.get("queue_records", 0)),
            checkpoint_lag_minutes=_checkpoint_lag(found, clock.now()),
            child={k: report.get(k) for k in ("shards_reading", "shards_known", "rows_known", "checkpoints_written")},
            calls={k: v - calls_before.get(k, 0) for k, v in calls.items()},
            child_cpu=cpu[0] - cpu_before[0],
            moto_cpu=cpu[1] - cpu_before[1],
            own_cpu=cpu[2] - cpu_before[2],
        )
        calls_before, cpu_before, hour_began = calls, cpu, now
        if args.diagnose:
            # After the figures: the report walks every object in the child and must not be in them.
            # The same warm-up rule as `warm_baseline`, applied as the hours come.
            warm = bool(hours) and bool(hours[-1].child.get("checkpoints_written")) and hour > FIRST_ROLLOVER_HOUR
            first_warm = warm and not any(h.memory and h.memory["baseline"] for h in hours)
            options = ["baseline"] * first_warm + ["trim"] * (hour == args.hours)
            figures = replace(figures, memory={**child.memory(*options), "baseline": first_warm})
        return figures

    hours.append(sample(0))
    for step in range(args.hours * steps_per_hour):
        # On a fixed schedule: a slow step (a Query, a busy machine) is made up by the next ones.
        delay = began + step * step_real - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        written += stream.write_synthetic(
            args.writes_per_minute, item_bytes=args.item_bytes, key_prefix="day", first=written, track_items=False
        )
        written_at.append((time.time(), written))
        clock.advance(STEP_SECONDS)
        host.events.clear()  # the timestamped request log is not used here: keep this process's memory flat
        if (step + 1) % steps_per_hour == 0:
            hours.append(sample((step + 1) // steps_per_hour))
            h = hours[-1]
            print(
                f"... hour {h.hour}: {h.listed} shards listed, {h.ever} ever, {h.rows} rows, RSS {mib(h.rss_kib)} MiB, "
                f"unread {h.unread:,}, queue {h.queue:,}, {h.real_seconds:.1f} s",
                file=sys.stderr,
            )
    return hours


def warm_baseline(hours: list[Hour]) -> Hour:
    """The first hour mark by which every code path has run once: a roll-over has been followed into the children,
    and the archive has flushed and a checkpoint was written (both lazy: the Parquet writer, s3fs and the upload
    threads are first loaded then). Hour 1 comes before both at any pace where an hour is under a minute."""
    for previous, hour in itertools.pairwise(hours):
        if hour.hour > FIRST_ROLLOVER_HOUR and (previous.child.get("checkpoints_written") or 0) > 0:
            return hour
    return hours[-1]


def cycle_lows(hours: list[Hour], start: int) -> list[str]:
    """The lowest RSS of each whole roll-over cycle from `start`: free of the saw-tooth the archive's buffer draws
    (a cycle cut short at the end is left out: its lowest hour may not have come)."""
    cycles: dict[int, list[int]] = {}
    for h in hours:
        if h.hour >= start:
            cycles.setdefault((h.hour - start) // FIRST_ROLLOVER_HOUR, []).append(h.rss_kib)
    return [mib(min(rss)) for _cycle, rss in sorted(cycles.items()) if len(rss) == FIRST_ROLLOVER_HOUR]


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}"


def report(hours: list[Hour], done: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for h in hours:
        lag = "-" if h.checkpoint_lag_minutes is None else f"{h.checkpoint_lag_minutes:.0f}"
        rows.append(
            [
                str(h.hour),
                f"{h.listed:,}",
                f"{h.open_shards:,}",
                f"{h.ever:,}",
                f"{h.rows:,}",
                f"{h.rows_unlisted:,}",
                mib(h.rss_kib),
                mib(h.hwm_kib),
                str(h.threads),
                f"{h.written:,}",
                f"{h.read:,}",
                f"{h.taken:,}",
                f"{h.unread:,}",
                f"{h.queue:,}",
                lag,
                f"{h.calls.get('GetRecords', 0):,}",
                f"{h.calls.get('GetRecords:ExpiredIteratorException', 0):,}",
                f"{h.child_cpu:.1f}",
                f"{h.moto_cpu:.1f}",
                f"{h.own_cpu:.1f}",
                f"{h.real_seconds:.1f}",
            ]
        )
    last = hours[-1]
    first = warm_baseline(hours)
    change = (last.rss_kib - first.rss_kib) / first.rss_kib
    verdict = "met" if abs(change) <= GOAL else "missed"
    hour_one = hours[min(1, len(hours) - 1)]
    # Once the stream lists as many shards as it ever will, nothing more should be added.
    full = max(h.listed for h in hours)
    plateau = next(h for h in hours if h.listed == full)
    steady = [h for h in hours if h.hour >= plateau.hour]
    busy = hours[1:] or hours
    gone = sum(h.calls.get("GetRecords:TrimmedDataAccessException", 0) for h in hours)
    lines = [
        f"A simulated day on {args.shards} shards: ManualClock moved a minute per step, {args.seconds_per_hour:g} real "
        f"s per simulated hour; {args.writes_per_minute} writes of ~{args.item_bytes} B a simulated minute; roll-over "
        f"every 4 h, retention 24 h, iterators expire after 15 min (simulated); default pipeline settings, archive "
        f"sink {args.sink!r}, checkpoints in moto DynamoDB",
        "",
        table(
            [
                "hour",
                "listed",
                "open",
                "ever",
                "ckpt rows",
                "rows unlisted",
                "RSS MiB",
                "HWM MiB",
                "threads",
                "written",
                "read",
                "sink took",
                "unread",
                "queue",
                "ckpt lag min",
                "GetRecords",
                "expired",
                "CPU s",
                "moto CPU s",
                "bench CPU s",
                "real s",
            ],
            rows,
        ),
        "",
        "listed / open: shards DescribeStream lists at the hour, and how many are open; ever: shards created so far",
        "ckpt rows: the consumer's shard rows in the checkpoint table; rows unlisted: of those, shards the stream no "
        "longer lists",
        "RSS / HWM / threads: the pipeline child's VmRSS, VmHWM and Threads from /proc at the hour",
        "written: changes written so far; read / sink took: records the pipeline had read and the sink had taken at "
        "its last progress report (<= 0.5 s before); unread: written by then but not read; queue: records queued",
        "ckpt lag min: simulated minutes from the newest checkpointed record's creation to the clock (the archive "
        "buffers up to 60 real s, a few simulated hours at this pace, before a flush and a checkpoint)",
        "GetRecords / expired: calls during the hour, and those answered ExpiredIteratorException; CPU s / moto CPU "
        "s / bench CPU s: CPU seconds the pipeline child, the moto server and this process (the simulator and its "
        "HTTP server) used during the hour; real s: wall time of the hour",
        "",
        f"RSS at hour {last.hour} against hour {first.hour}, the first after warm-up (the first roll-over and the "
        f"first archive flush and checkpoint): {mib(last.rss_kib)} / {mib(first.rss_kib)} MiB, {change:+.1%} (goal: "
        f"within {GOAL:.0%}): {verdict}",
        f"lowest RSS in each {FIRST_ROLLOVER_HOUR}-hour roll-over cycle from hour {first.hour} (the archive's buffer "
        f"makes a saw-tooth within one): {', '.join(cycle_lows(hours, first.hour)) or 'no whole cycle'} MiB",
        f"against hour {hour_one.hour} (before the first flush loaded the Parquet writer and started the upload "
        f"threads): {mib(hour_one.rss_kib)} MiB, {_change(hour_one.rss_kib, last.rss_kib)}",
        f"RSS once the stream listed its most shards ({full:,}, from hour {plateau.hour}): {mib(plateau.rss_kib)} MiB "
        f"then, {mib(last.rss_kib)} MiB at hour {last.hour} ({_change(plateau.rss_kib, last.rss_kib)}); "
        f"{mib(min(h.rss_kib for h in steady))}-{mib(max(h.rss_kib for h in steady))} MiB over hours {plateau.hour}-"
        f"{last.hour}; peak (VmHWM) {mib(last.hwm_kib)} MiB",
        f"checkpoint rows at hour {first.hour}: {first.rows:,} ({first.listed:,} shards listed); at hour {last.hour}: "
        f"{last.rows:,} ({last.listed:,} listed, {last.ever:,} ever created): {last.rows / last.listed:.2f} rows per "
        f"listed shard; most rows at any hour {max(h.rows for h in hours):,}",
        f"kept up: at most {max(h.unread for h in busy):,} records unread and {max(h.queue for h in busy):,} queued "
        f"at an hour mark; {sum(h.calls.get('GetRecords:ExpiredIteratorException', 0) for h in hours):,} expired "
        f"iterators, {gone:,} GetRecords into trimmed data; threads {min(h.threads for h in busy)}-"
        f"{max(h.threads for h in busy)}",
        f"the child's own view at hour {last.hour}: {last.child}",
        f"stop: clean {done['clean']}, fatal {done['fatal']}; {hours[-1].written:,} written, {done['records_read']:,} "
        f"read, {done['taken']:,} taken by the sink, {done['checkpoints_written']:,} checkpoints written",
        "",
        machine_line(),
    ]
    return "\n".join(lines)


def diagnosis(hours: list[Hour]) -> str:
    """What the child said its memory was made of, hour by hour, and what grew from the warm baseline to the end."""
    reports = [(h, h.memory) for h in hours if h.memory is not None]
    held_names = list(reports[0][1]["held"])
    rows = []
    for h, m in reports:
        arrow = m.get("arrow", {}).get("allocated")
        traced = m.get("traced", {}).get("current")
        rows.append(
            [
                f"{h.hour}{'*' if m['baseline'] else ''}",
                mib(h.rss_kib),
                f"{m['allocated_blocks']:,}",
                "-" if arrow is None else f"{arrow / 2**20:.1f}",
                "-" if traced is None else f"{traced / 2**20:.1f}",
                *("-" if m["held"].get(k) is None else f"{m['held'][k]:,}" for k in held_names),
            ]
        )
    lines = [
        "What the child holds at each hour (* the baseline for the comparisons below):",
        "",
        table(["hour", "RSS MiB", "pymalloc blocks", "Arrow MiB", "traced MiB", *held_names], rows),
    ]
    baseline = next((m for _h, m in reports if m["baseline"]), reports[0][1])
    last_hour, last = reports[-1]
    types = [
        (name, last["types"].get(name, 0) - baseline["types"].get(name, 0))
        for name in set(last["types"]) | set(baseline["types"])
    ]
    types.sort(key=lambda nd: -abs(nd[1]))
    lines += [
        "",
        f"Python objects (gc-tracked, after a collection) whose count changed most, baseline -> hour {last_hour.hour}:",
    ]
    lines += [
        f"  {diff:+8,}  {name} ({baseline['types'].get(name, 0):,} -> {last['types'].get(name, 0):,})"
        for name, diff in types[:15]
    ]
    if "grown" in last:
        lines += ["", f"tracemalloc: allocation sites grown most, baseline -> hour {last_hour.hour}:"]
        for stat in last["grown"][:12]:
            lines.append(
                f"  {stat['size_diff'] / 1024:+10,.1f} KiB ({stat['count_diff']:+,} blocks), "
                f"now {stat['size'] / 1024:,.1f} KiB"
            )
            lines += [f"      {frame}" for frame in stat["trace"][-6:]]
    if "rss_after_trim_kib" in last:
        lines.append(
            f"\nat hour {last_hour.hour}, after a collection and malloc_trim(0): RSS "
            f"{mib(last['rss_after_trim_kib'])} MiB (from {mib(last['rss_kib'])} MiB)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hours", type=int, default=34, help="simulated hours (default 34; at least 25)")
    parser.add_argument("--shards", type=int, default=100, help="open shards (default 100)")
    parser.add_argument(
        "--seconds-per-hour", type=float, default=15.0, help="real seconds per simulated hour (default 15)"
    )
    parser.add_argument("--writes-per-minute", type=int, help="changes per simulated minute (default: one per shard)")
    parser.add_argument("--item-bytes", type=int, default=300, help="approximate item size (default 300)")
    parser.add_argument("--sink", choices=("s3", "local"), default="s3", help="archive to moto S3 (default) or local")
    parser.add_argument("--quick", action="store_true", help="6 simulated hours on 20 shards, 5 s an hour")
    parser.add_argument(
        "--diagnose", action="store_true", help="ask the child every hour what its memory is made of (slower)"
    )
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES", help="with --diagnose: trace allocations (0: off)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.hours, args.shards, args.seconds_per_hour = 6, 20, 5.0
    elif args.hours < 25:
        parser.error("--hours: at least 25, so that a simulated day passes (--quick for a smoke run)")
    if args.writes_per_minute is None:
        args.writes_per_minute = args.shards
    if args.tracemalloc:
        args.diagnose = True
    hours, done = run(args)
    print(report(hours, done, args))
    if args.diagnose:
        print("\n" + diagnosis(hours))


if __name__ == "__main__":
    main()
