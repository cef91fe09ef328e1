"""Whole-pipeline throughput from a pre-loaded backlog, against the archive path's one-core figure.

The pipeline runs in a child process exactly as `streamsink run` would: shard readers on the poll scheduler read
the simulated DynamoDB Streams endpoint over HTTP (`pipeline.testing.simulated_stream_server`, served from this
process),
pages go through the bounded queue and the batcher to the S3 Parquet archive sink writing to a moto S3, and
checkpoints go to moto DynamoDB (moto runs in a process of its own). The stream holds `--records` changes of
about `--item-bytes` each, spread over `--shards` shards, before the pipeline starts; the clock runs from
`Pipeline.start()` until `Pipeline.stop()` has flushed the archive and written the last checkpoint.

In the same run, `bench/archive_path.py`'s `streamsink` path (GetRecords bytes -> ChangeRecords -> archive
table -> zstd Parquet, one core, no I/O) is timed twice: on its own seeded bodies (the figure in
bench/README.md) and on GetRecords bodies taken from the same simulator records the pipeline reads, which is
the fair ceiling. The pipeline child samples where its delivery thread and poll workers are and reads each
thread's CPU and run-queue time from /proc, so the gap can be explained rather than guessed.

Run from the repository root: ``python bench/pipeline_throughput.py`` (``--quick`` for a smoke run).
Prints figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from harness import (
    REPOSITORY,
    MotoServer,
    StreamHost,
    checkpoint_version,
    child_spec,
    drain,
    machine_line,
    mib,
    profile_report,
    table,
)

from pipeline.testing.simulated_stream import StreamSimulator

ARCHIVE_PATH = REPOSITORY / "bench" / "archive_path.py"


@dataclass(frozen=True)
class ArchivePathFigure:
    bodies: str
    records: int
    cpu_seconds: float
    wall_seconds: float

    @property
    def per_cpu_second(self) -> float:
        return self.records / self.cpu_seconds


@dataclass(frozen=True)
class PipelineRun:
    shards: int
    records: int
    done: dict[str, Any]
    moto_cpu_seconds: float
    host_cpu_seconds: float
    load: tuple[float, float, float]

    @property
    def wall_seconds(self) -> float:
        return float(self.done["total_wall_seconds"])

    @property
    def cpu_seconds(self) -> float:
        """The child's CPU time without what sampling its stacks cost."""
        return float(self.done["total_cpu_seconds"]) - float(self.done["sampler_cpu_seconds"])


def simulator_bodies(records: int, item_bytes: int) -> list[bytes]:
    """GetRecords response bodies exactly as the simulated endpoint serves the pipeline's records."""
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=1)
    stream.write_synthetic(records, item_bytes=item_bytes, track_items=False)
    (shard_id,) = stream.open_shard_ids()
    answer = simulator.handle(
        "GetShardIterator",
        orjson.dumps({"StreamArn": stream.arn, "ShardId": shard_id, "ShardIteratorType": "TRIM_HORIZON"}),
    )
    iterator = orjson.loads(answer.body)["ShardIterator"]
    bodies: list[bytes] = []
    while True:
        answer = simulator.handle("GetRecords", orjson.dumps({"ShardIterator": iterator, "Limit": 1000}))
        page = orjson.loads(answer.body)
        if not page["Records"]:
            return bodies
        bodies.append(answer.body)
        iterator = page["NextShardIterator"]


def archive_path_figure(label: str, extra: list[str]) -> ArchivePathFigure:
    """One `archive_path.py` child (pinned to one CPU, Arrow on one thread): its JSON result."""
    command = [sys.executable, str(ARCHIVE_PATH), "--only", "streamsink", "--runs", "1", *extra]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY)
    result = json.loads(done.stdout)
    return ArchivePathFigure(label, result["records"], result["best_seconds"], result["best_wall_seconds"])


def run_pipeline(moto: MotoServer, shards: int, records: int, item_bytes: int, sink: str) -> PipelineRun:
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=shards)
    stream.write_synthetic(records, item_bytes=item_bytes, track_items=False)
    bucket = f"archive-{uuid.uuid4().hex[:10]}"
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
            profile=True,
        )
        moto_cpu, host_cpu = moto.cpu_seconds(), time.process_time()
        done, _progress = drain(spec)
        moto_cpu, host_cpu = moto.cpu_seconds() - moto_cpu, time.process_time() - host_cpu
    return PipelineRun(shards, records, done, moto_cpu, host_cpu, os.getloadavg())


def report(runs: list[PipelineRun], figures: list[ArchivePathFigure], args: argparse.Namespace) -> str:
    same_bodies = next(f for f in figures if f.bodies == "simulator")
    lines = [
        f"Pipeline drain: {args.records:,} records of ~{args.item_bytes:,} B (NEW_AND_OLD_IMAGES INSERTs), "
        f"sink {args.sink!r}, default batch/reader settings",
        "",
    ]
    rows = []
    for run in runs:
        done = run.done
        rows.append(
            [
                str(run.shards),
                f"{run.wall_seconds:.1f}",
                f"{run.records / run.wall_seconds:,.0f}",
                f"{run.cpu_seconds:.1f}",
                f"{run.records / run.cpu_seconds:,.0f}",
                f"{run.cpu_seconds / run.wall_seconds:.2f}",
                f"{(run.records / run.cpu_seconds) / same_bodies.per_cpu_second:.0%}",
                f"{run.moto_cpu_seconds:.1f}",
                f"{run.host_cpu_seconds:.1f}",
                f"{done['checkpoints_written']}",
                mib(done["hwm_kib"]),
                f"{run.load[0]:.1f}",
            ]
        )
    lines.append(
        table(
            [
                "shards",
                "wall s",
                "records/s",
                "pipeline CPU s",
                "records/CPU-s",
                "cores",
                "vs archive path",
                "moto CPU s",
                "stream CPU s",
                "commits",
                "peak RSS MiB",
                "load",
            ],
            rows,
        )
    )
    lines += [
        "",
        "wall s: Pipeline.start() until stop() returned with the archive flushed and the checkpoints written",
        "pipeline CPU s: the child process's CPU time (all threads), less the stack sampler's own",
        "records/CPU-s: records over pipeline CPU s; cores: pipeline CPU s / wall s",
        "vs archive path: records/CPU-s over the archive path's on the same simulator bodies (below)",
        "moto CPU s / stream CPU s: the moto server process / this process serving the simulated stream",
        "",
        "archive path (bench/archive_path.py --only streamsink: parse, ChangeRecords, archive table, zstd "
        "Parquet in memory; one pinned core):",
        table(
            ["bodies", "records", "CPU s", "records/CPU-s", "wall records/s"],
            [
                [
                    f.bodies,
                    f"{f.records:,}",
                    f"{f.cpu_seconds:.2f}",
                    f"{f.per_cpu_second:,.0f}",
                    f"{f.records / f.wall_seconds:,.0f}",
                ]
                for f in figures
            ],
        ),
        "  simulator: GetRecords bodies of the same synthetic items the pipeline reads (the fair ceiling)",
        "  archive_path: its own seeded bodies, every attribute type (~60 values per record; bench/README.md)",
    ]
    for run in runs:
        lines += ["", f"--- where the time went, {run.shards} shards ---", profile_report(run.done)]
        per_record = {
            group: times["cpu_seconds"] / run.records * 1e6 for group, times in run.done["thread_times"].items()
        }
        shown = ", ".join(f"{g} {us:.0f}" for g, us in sorted(per_record.items(), key=lambda kv: -kv[1]) if us >= 1)
        lines.append(f"CPU per record (us): {shown}")
    lines += ["", checkpoint_version(), machine_line()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=200_000, help="backlog size (default 200000)")
    parser.add_argument("--shards", type=int, nargs="+", default=[8, 64], help="shard counts to run (8 64)")
    parser.add_argument("--item-bytes", type=int, default=1700, help="approximate item size (default 1700)")
    parser.add_argument(
        "--sink",
        choices=("s3", "local", "discard"),
        default="s3",
        help="'s3': the archive to moto S3 (default); 'local': the archive to a temporary directory; "
        "'discard': no sink work at all",
    )
    parser.add_argument("--archive-records", type=int, default=20_000, help="records for the archive path runs")
    parser.add_argument("--quick", action="store_true", help="20,000 records, 8 shards, 5,000 archive-path records")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.shards, args.archive_records = 20_000, [8], 5_000

    # The one-core reference first, while nothing else of this run competes for the CPU.
    figures = []
    with tempfile.TemporaryDirectory(prefix="streamsink-bench-") as tmp:
        bodies_file = os.path.join(tmp, "simulator.ndjson")
        with open(bodies_file, "wb") as file:
            file.writelines(b + b"\n" for b in simulator_bodies(args.archive_records, args.item_bytes))
        figures.append(archive_path_figure("simulator", ["--bodies", bodies_file]))
    figures.append(archive_path_figure("archive_path", ["--records", str(args.archive_records)]))

    runs = []
    with MotoServer() as moto:
        for shards in args.shards:
            runs.append(run_pipeline(moto, shards, args.records, args.item_bytes, args.sink))
            print(f"... {shards} shards: {args.records / runs[-1].wall_seconds:,.0f} records/s", file=sys.stderr)
    print(report(runs, figures, args))


if __name__ == "__main__":
    main()
