"""Peak memory of a pipeline draining a backlog ten times larger: it should not grow with the backlog.

The bounded queue (`batch.queue_capacity` records, `batch.queue_max_bytes`) makes readers wait while delivery
catches up, and a sink's buffer is bounded by its own settings, so the pipeline should hold the same amount of
data whether the stream holds 100,000 records or 1,000,000. Each size is drained by a pipeline in its own child
process (default settings, 8 shards), reading the simulated stream over HTTP from this process; its VmRSS is
sampled every second and its VmHWM read at the end.

The sink is the real S3 Parquet archive sink (default buffer: 32 MiB or 60 s) writing to a temporary local
directory through fsspec (`--sink local`, the default): moto's S3 would keep a million records' objects in its
own memory and take several times longer. `--sink s3` uses moto S3 anyway; `--sink discard` no sink at all.

Run from the repository root: ``python bench/backlog_memory.py`` (``--quick`` for a smoke run). Prints figures;
never asserts timings.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from harness import (
    MotoServer,
    StreamHost,
    checkpoint_version,
    child_spec,
    drain,
    machine_line,
    mib,
    table,
)

from pipeline.testing.simulated_stream import StreamSimulator

GOAL = 1.15


@dataclass(frozen=True)
class Drain:
    records: int
    load_seconds: float
    done: dict[str, Any]
    progress: list[dict[str, Any]]

    @property
    def hwm_kib(self) -> int:
        return int(self.done["hwm_kib"])

    def rss_at(self, fraction: float) -> int | None:
        """VmRSS sampled when the sink had taken this fraction of the backlog (first sample at or past it)."""
        wanted = fraction * self.records
        return next((int(p["rss_kib"]) for p in self.progress if p["taken"] >= wanted), None)


def drain_backlog(moto: MotoServer, records: int, shards: int, item_bytes: int, sink: str) -> Drain:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    loading = time.perf_counter()
    stream.write_synthetic(records, item_bytes=item_bytes, track_items=False)
    load_seconds = time.perf_counter() - loading
    bucket = f"archive-{uuid.uuid4().hex[:10]}"
    if sink == "s3":
        moto.client("s3").create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="streamsink-bench-") as local_dir, StreamHost(simulator) as host:
        spec = child_spec(
            moto,
            host,
            stream.arn,
            sink=sink,
            bucket=bucket,
            local_dir=local_dir,
            stop_after_records=records,
            max_seconds=7200,
        )
        done, progress = drain(spec)
    return Drain(records, load_seconds, done, progress)


def report(drains: list[Drain], args: argparse.Namespace) -> str:
    small, large = drains[0], drains[-1]
    rows = []
    for d in drains:
        wall = float(d.done["total_wall_seconds"])
        rows.append(
            [
                f"{d.records:,}",
                f"{wall:.0f}",
                f"{d.records / wall:,.0f}",
                mib(d.rss_at(0.25)),
                mib(d.rss_at(0.5)),
                mib(d.rss_at(0.75)),
                mib(d.rss_at(1.0)),
                mib(d.hwm_kib),
                f"{d.done['queue_peak_records']:,}",
                str(d.done["peak_threads"]),
            ]
        )
    ratio = large.hwm_kib / small.hwm_kib
    verdict = "met" if ratio <= GOAL else "missed"
    return "\n".join(
        [
            f"Draining a backlog of ~{args.item_bytes:,}-B records over {args.shards} shards, default settings, "
            f"sink {args.sink!r}",
            "",
            table(
                [
                    "backlog",
                    "drain s",
                    "records/s",
                    "RSS @25% MiB",
                    "@50%",
                    "@75%",
                    "@100%",
                    "peak RSS MiB",
                    "queue peak",
                    "threads",
                ],
                rows,
            ),
            "",
            f"peak RSS {large.records:,} / {small.records:,}: {ratio:.3f} (goal <= {GOAL:.2f}: {verdict})",
            "RSS @N%: VmRSS sampled when the sink had taken N% of the backlog; peak RSS: the child's VmHWM",
            "queue peak: most records the bounded queue held at once (batch.queue_capacity is 10,000)",
            f"the backlog itself lives in the benchmark process (the simulator): "
            f"{', '.join(f'{d.records:,} written in {d.load_seconds:.0f} s' for d in drains)}",
            "",
            checkpoint_version(),
            machine_line(),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000, help="the smaller backlog (default 100000)")
    parser.add_argument("--ratio", type=int, default=10, help="the larger backlog is this many times bigger (10)")
    parser.add_argument("--shards", type=int, default=8, help="shards (default 8)")
    parser.add_argument("--item-bytes", type=int, default=1700, help="approximate item size (default 1700)")
    parser.add_argument("--sink", choices=("local", "s3", "discard"), default="local", help="default 'local'")
    parser.add_argument("--quick", action="store_true", help="20,000 and 200,000 records")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = 20_000

    drains = []
    with MotoServer() as moto:
        for records in (args.records, args.records * args.ratio):
            drains.append(drain_backlog(moto, records, args.shards, args.item_bytes, args.sink))
            gc.collect()  # the previous backlog's simulator is garbage now: give its memory back before the next
            print(f"... {records:,}: peak RSS {mib(drains[-1].hwm_kib)} MiB", file=sys.stderr)
    print(report(drains, args))


if __name__ == "__main__":
    main()
