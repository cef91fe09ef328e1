"""Change -> sink latency under steady writes, and what idle shards cost in GetRecords calls, at default settings.

Both parts run the pipeline in a child process with the reader and batch settings left at their defaults
(pipeline/settings.py: `idle_poll_min_seconds` 0.25 doubling to `idle_poll_max_seconds` 10, `max_wait_seconds`
0.5, `max_records` 1000), the archive sink writing to a moto S3 and checkpoints in moto DynamoDB, reading a
simulated stream over HTTP from this process.

Latency: a writer thread here puts items at a steady rate into a stream of `--active-shards` shards, each item
stamped with the wall clock at the write (`written_at`; the simulator's ApproximateCreationDateTime is whole
seconds, too coarse). The child's sink wrapper records, for every item it is given, now - `written_at` when the
archive sink's `write()` returns: when the sink has taken it (the archive makes it durable at its next flush,
every 60 s by default; the checkpoint follows that). Several rates show how the idle back-off adds to it.

The goal is for active shards, so each shard's first change is reported apart: the shards sit idle from the
child's start until the writes begin, and that first change can find its shard backed off by up to
`idle_poll_max_seconds`. That is the price of polling an idle shard six times a minute rather than 240; the
"all p99" column includes it.

Polling cost: `--idle-shards` shards and no writes. After the back-off has reached its ceiling, the simulator's
request log gives GetRecords calls per shard per minute, against AWS Lambda's event source mapping, which polls
each shard four times a second.

Run from the repository root: ``python bench/latency_polling.py`` (``--quick`` for a smoke run). Prints figures;
never asserts timings.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from harness import (
    WARM_UP_SECONDS,
    MotoServer,
    PipelineChild,
    PollFigures,
    StreamHost,
    Trickle,
    checkpoint_version,
    child_spec,
    machine_line,
    percentile,
    poll_figures,
    table,
)

from pipeline.settings import BatchSettings, ReaderSettings
from pipeline.testing.simulated_stream import StreamSimulator

LAMBDA_POLLS_PER_SHARD_PER_MINUTE = 4 * 60
GOAL_P50, GOAL_P99, GOAL_IDLE_CALLS = 1.0, 2.0, 6.0


@dataclass(frozen=True)
class LatencyRun:
    writes_per_second: float
    shards: int
    written: int
    latencies: list[float]
    first_latencies: list[float]
    done: dict[str, Any]
    polls: PollFigures

    @property
    def active_latencies(self) -> list[float]:
        """Every change but each shard's first: that one can find its shard backed off from before the writes."""
        rest = list(self.latencies)
        for first in self.first_latencies:
            rest.remove(first)
        return rest


@dataclass(frozen=True)
class IdleRun:
    shards: int
    polls: PollFigures
    cpu_per_minute: float
    window_seconds: float


def _child(moto: MotoServer, host: StreamHost, stream_arn: str, seconds: float) -> PipelineChild:
    bucket = f"archive-{uuid.uuid4().hex[:10]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    return PipelineChild(child_spec(moto, host, stream_arn, sink="s3", bucket=bucket, max_seconds=seconds)).start()


def measure_latency(moto: MotoServer, shards: int, writes_per_second: float, seconds: float) -> LatencyRun:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    with StreamHost(simulator) as host:
        # The child stops a few seconds after the writer, so the last writes are still delivered.
        child = _child(moto, host, stream.arn, seconds + 5)
        try:
            started = child.wait_for("started", timeout=120)
            trickle = Trickle(stream, writes_per_second).start()
            time.sleep(seconds)
            trickle.stop()
            done = child.wait_for("done", timeout=120)
        finally:
            child.kill()
        polls = poll_figures(
            host.events, stream.open_shard_ids(), started=started["t"], steady_from=started["t"], ended=time.time()
        )
    return LatencyRun(
        writes_per_second, shards, trickle.written, list(done["latencies"]), list(done["first_latencies"]), done, polls
    )


def measure_idle(moto: MotoServer, shards: int, window_seconds: float) -> IdleRun:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    with StreamHost(simulator) as host:
        child = _child(moto, host, stream.arn, WARM_UP_SECONDS + window_seconds)
        try:
            started = child.wait_for("started", timeout=120)
            done = child.wait_for("done", timeout=WARM_UP_SECONDS + window_seconds + 120)
        finally:
            child.kill()
        ended = started["t"] + done["wall_seconds"]
        steady_from = started["t"] + WARM_UP_SECONDS
        polls = poll_figures(
            host.events, stream.open_shard_ids(), started=started["t"], steady_from=steady_from, ended=ended
        )
    cpu_per_minute = child.cpu_per_minute(after=started["t"] + WARM_UP_SECONDS)
    return IdleRun(shards, polls, cpu_per_minute, ended - started["t"] - WARM_UP_SECONDS)


def report(latency: list[LatencyRun], idle: IdleRun, args: argparse.Namespace) -> str:
    reader, batch = ReaderSettings(), BatchSettings()
    rows = []
    for run in latency:
        values = run.active_latencies
        p50, p99 = percentile(values, 50), percentile(values, 99)
        rows.append(
            [
                f"{run.writes_per_second:g}",
                f"{run.writes_per_second / run.shards:g}",
                f"{len(values):,}/{run.written:,}",
                f"{percentile(values, 10):.2f}",
                f"{p50:.2f}",
                f"{percentile(values, 90):.2f}",
                f"{p99:.2f}",
                f"{max(values) if values else float('nan'):.2f}",
                "met" if p50 < GOAL_P50 and p99 < GOAL_P99 else "missed",
                f"{max(run.first_latencies) if run.first_latencies else float('nan'):.2f}",
                f"{percentile(run.latencies, 99):.2f}",
                f"{run.polls.per_shard_per_minute:.0f}",
            ]
        )
    idle_calls = idle.polls.per_shard_per_minute
    return "\n".join(
        [
            f"Defaults: reader.idle_poll_min_seconds {reader.idle_poll_min_seconds}, idle_poll_max_seconds "
            f"{reader.idle_poll_max_seconds}, poll_workers {reader.poll_workers}; batch.max_wait_seconds "
            f"{batch.max_wait_seconds}, max_records {batch.max_records}; archive sink to moto S3",
            "",
            f"change -> sink latency, {args.active_shards} active shards, {args.seconds:g} s of steady writes "
            f"(goal p50 < {GOAL_P50:g} s, p99 < {GOAL_P99:g} s):",
            table(
                [
                    "writes/s",
                    "per shard",
                    "measured",
                    "p10 s",
                    "p50 s",
                    "p90 s",
                    "p99 s",
                    "max s",
                    "goal",
                    "first/shard max s",
                    "all p99 s",
                    "GetRecords/shard/min",
                ],
                rows,
            ),
            "latency: from the writer's clock at the write to the archive sink's write() returning with the record",
            "p10-max and goal: changes on active shards, i.e. every change but each shard's first; first/shard: the "
            "first change of each shard, which",
            "  can find the shard backed off from the idle time before the writes began (up to "
            "idle_poll_max_seconds); all p99: every change",
            "",
            f"idle polling: {idle.shards} shards, no writes, counted over {idle.window_seconds:.0f} s after "
            f"{WARM_UP_SECONDS:.0f} s of back-off:",
            table(
                [
                    "GetRecords/shard/min",
                    "all shards/min",
                    "max gap s",
                    "vs Lambda (240/shard/min)",
                    "other calls/min",
                    "CPU s/min",
                    "goal",
                ],
                [
                    [
                        f"{idle_calls:.2f}",
                        f"{idle_calls * idle.shards:.0f}",
                        f"{idle.polls.max_gap:.1f}",
                        f"1/{LAMBDA_POLLS_PER_SHARD_PER_MINUTE / idle_calls:.0f}",
                        ", ".join(f"{op} {n:.1f}" for op, n in idle.polls.other_calls_per_minute.items()) or "-",
                        f"{idle.cpu_per_minute:.1f}",
                        "met" if idle_calls <= GOAL_IDLE_CALLS else "missed",
                    ]
                ],
            ),
            f"goal: at most {GOAL_IDLE_CALLS:g} GetRecords per idle shard per minute; Lambda: 4 per second per shard",
            "",
            checkpoint_version(),
            machine_line(),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--active-shards", type=int, default=4, help="shards receiving writes (default 4)")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[200.0, 20.0, 4.0, 2.0], help="writes/s over all active shards"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="steady writes per rate (default 40)")
    parser.add_argument("--idle-shards", type=int, default=100, help="shards for the idle part (default 100)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window after warm-up (default 60)")
    parser.add_argument("--quick", action="store_true", help="one rate for 15 s, a 20-s idle window")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.seconds, args.idle_seconds = [20.0], 15.0, 20.0

    with MotoServer() as moto:
        latency = []
        for rate in args.rates:
            latency.append(measure_latency(moto, args.active_shards, rate, args.seconds))
            run = latency[-1]
            print(f"... {rate:g} writes/s: p50 {percentile(run.active_latencies, 50):.2f} s", file=sys.stderr)
        idle = measure_idle(moto, args.idle_shards, args.idle_seconds)
    print(report(latency, idle, args))


if __name__ == "__main__":
    main()
