"""Initial load: Scan throughput of the pipeline beside a bare boto3 parallel scan, and its memory against table size.

`[source] initial_load = "scan"` copies the whole table with a parallel Scan before (and while) the stream is read,
each item delivered as a SNAPSHOT record. The goals: items/s at 1, 4 and 8 segments within 1.5x of a plain boto3
parallel scan of the same table in the same run; peak RSS flat against table size (100,000 against 1,000,000 items
within 15%).

Layout, each part in a process of its own so that every figure is one process's: moto (the checkpoint table, the
table's empty stream); `scan_endpoint.py` (the synthetic table's Scan after `--latency-ms`, everything else forwarded
to moto after the same latency); `latency_endpoint.py` as the archive's S3 (bodies read and thrown away, so the
sink costs the pipeline its Parquet work and nothing grows anywhere); the bare scans and `streamsink run` as
children, measured from /proc (VmHWM, utime + stime).

1. Bare scans: one thread per segment sharing one boto3 client, each paging its `Segment` with ExclusiveStartKey
   and counting items. `boto3` is the plain client (botocore parses every attribute of every item: the goal's
   reference); `orjson` is the same client with botocore's Scan parse replaced by `orjson.loads` (a before-parse
   hook), what a reader that parses cheaply can reach on the same round trips.
2. The pipeline: `streamsink run --config <toml>` with `source.initial_load = "scan"`, `[initial_load] segments`,
   a fresh checkpoint table per run and one sink. Done when `streamsink status --config <toml> --json` prints
   `"initial_load": {"phase": "done", "items": N}`; then SIGTERM. Items/s counts from the first Scan the endpoint
   answered to the end of delivery (`finished_at`, else `done_at`, from the status when it gives them, else the
   start of the status call that first said done). Status is polled every 0.5 s only once every segment's last
   page has been served: each call is a Python start of about a second of CPU, on a 2-core machine.
3. Memory: the pipeline at `--memory-segments` over each of `--memory-items`, peak RSS, and the bare scan's.

Run from the repository root: ``python bench/initial_load.py`` (``--quick`` for a smoke run; ``--skip-pipeline``
for the baselines alone). Prints figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPOSITORY = HERE.parent.parent
REGION = "us-east-1"
TABLE = "bench-scan"
PARSES = ("boto3", "orjson")
STATUS_INTERVAL = 0.5


# --- the bare scan (in a child: `python bench/initial_load.py bare-scan ...`) ---------------------------------


def _orjson_scan(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """before-parse.dynamodb.Scan: the items by orjson.loads; botocore parses the rest (a few small fields)."""
    import orjson

    if response_dict.get("status_code", 500) >= 300:
        return
    parsed = orjson.loads(response_dict["body"])
    customized_response_dict["Items"] = parsed.pop("Items", [])
    response_dict["body"] = orjson.dumps(parsed)


def bare_scan(url: str, table: str, segments: int, parse: str) -> dict[str, Any]:
    """Every segment on a thread of its own, one client; items counted. Imports boto3 only, so that the child's
    RSS is a scan's."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "dynamodb", region_name=REGION, endpoint_url=url, config=Config(max_pool_connections=segments)
    )
    if parse == "orjson":
        client.meta.events.register("before-parse.dynamodb.Scan", _orjson_scan)
    client.describe_table(TableName=table)  # the client's first call builds its models: not timed
    items = [0] * segments
    pages = [0] * segments
    errors: list[BaseException] = []

    def scan(segment: int) -> None:
        start: dict[str, Any] | None = None
        try:
            while True:
                more = {"ExclusiveStartKey": start} if start else {}
                page = client.scan(TableName=table, Segment=segment, TotalSegments=segments, **more)
                items[segment] += len(page["Items"])
                pages[segment] += 1
                start = page.get("LastEvaluatedKey")
                if not start:
                    return
        except BaseException as exc:  # reported by the parent
            errors.append(exc)

    threads = [threading.Thread(target=scan, args=(n,), name=f"segment-{n}") for n in range(segments)]
    cpu_at, started = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_at
    with open("/proc/self/status", encoding="ascii") as status:
        kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in status) if k in ("VmHWM", "VmRSS")}
    return {
        "items": sum(items),
        "pages": sum(pages),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "hwm_kib": kib.get("VmHWM"),
        "error": repr(errors[0]) if errors else None,
    }


@dataclass(frozen=True)
class Run:
    """One measured run, bare or pipeline."""

    what: str
    segments: int
    items: int
    """Items counted (bare) or delivered (the pipeline's status)."""
    seconds: float
    cpu_seconds: float
    hwm_kib: int | None
    endpoint: dict[str, Any]
    """The scan endpoint's figures over the run."""
    moto_cpu_seconds: float = 0.0
    note: str = ""

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def _child_environment() -> dict[str, str]:
    """This environment with dummy credentials, the worktree's packages first, and no STREAMSINK_ overrides."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSINK_")}
    environment.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    environment.update({"AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION})
    environment["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])])
    return environment


def run_bare(endpoint: Any, moto: Any, segments: int, parse: str) -> Run:
    endpoint.reset()
    moto_cpu = moto.cpu_seconds()
    load = os.getloadavg()[0]
    command = [sys.executable, str(HERE), "bare-scan", endpoint.url, TABLE, str(segments), parse]
    done = subprocess.run(command, capture_output=True, text=True, env=_child_environment(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the bare scan failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["error"]:
        raise RuntimeError(f"the bare scan failed: {figures['error']}")
    return Run(
        what=f"bare {parse}",
        segments=segments,
        items=figures["items"],
        seconds=figures["seconds"],
        cpu_seconds=figures["cpu_seconds"],
        hwm_kib=figures["hwm_kib"],
        endpoint=endpoint.stats(),
        moto_cpu_seconds=moto.cpu_seconds() - moto_cpu,
        note=f"load {load:.1f}",
    )


# --- the pipeline --------------------------------------------------------------------------------------------


class PipelineMissing(Exception):
    """The pipeline side of the contract is not there (yet): one line saying what is missing."""


def pipeline_config(scan_url: str, sink_url: str, segments: int, sink: str) -> str:
    """A `streamsink run` config: the synthetic table through the scan endpoint, a fresh checkpoint table."""
    if sink == "archive":
        # A flush a second: the load is finished once its last items are flushed, and the default 60 s timer would
        # add up to a minute to every run's end (the 32 MiB buffer fills every ~20,000 items on its own).
        sink_entry = (
            f'type = "s3_parquet"\nbucket = "bench-archive"\nprefix = "load/"\nendpoint_url = "{sink_url}"\n'
            "buffer_max_seconds = 1.0"
        )
    else:
        sink_entry = 'type = "memory"'
    return f"""\
[source]
table_name = "{TABLE}"
region = "{REGION}"
endpoint_url = "{scan_url}"
initial_load = "scan"

[initial_load]
segments = {segments}

[checkpoint]
table_name = "bench-load-{uuid.uuid4().hex[:8]}"

[runtime]
log_level = "WARNING"
log_format = "json"

[[sinks]]
{sink_entry}
"""


def _streamsink() -> list[str]:
    """The venv's `streamsink` script beside this interpreter (the worktree's code comes first on PYTHONPATH)."""
    script = Path(sys.executable).parent / "streamsink"
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]
    )


def _status(config: Path, workdir: Path) -> tuple[dict[str, Any] | None, str, float]:
    """`streamsink status --json`'s initial_load object (or None and why), and the CPU seconds the call took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [*_streamsink(), "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=_child_environment(),
        cwd=workdir,
        check=False,
        timeout=120,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`streamsink status --json` printed no JSON (exit {done.returncode}): {last}", cpu
    if not isinstance(document, dict) or "initial_load" not in document:
        return None, '`streamsink status --json` has no "initial_load" object yet', cpu
    # null: the load has not recorded itself yet.
    return document["initial_load"] or {"phase": "not begun", "items": 0}, "", cpu


def _proc(pid: int) -> tuple[dict[str, int], float]:
    """VmHWM and VmRSS (KiB) and CPU seconds of a live process."""
    from harness import proc_status, process_cpu_seconds

    return proc_status(pid), process_cpu_seconds(pid)


def run_pipeline(endpoint: Any, moto: Any, sink_url: str, segments: int, sink: str, items: int, timeout: float) -> Run:
    """`streamsink run` over the whole table; raises PipelineMissing when the pipeline side is not there."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-initial-load-"))
    config = workdir / "streamsink.toml"
    config.write_text(pipeline_config(endpoint.url, sink_url, segments, sink), encoding="utf-8")
    checked = subprocess.run(
        [*_streamsink(), "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        env=_child_environment(),
        cwd=workdir,
        check=False,
    )
    if checked.returncode != 0:
        first = (checked.stderr.strip().splitlines() or ["no output"])[0]
        shutil.rmtree(workdir, ignore_errors=True)
        raise PipelineMissing(f"`streamsink validate` refuses the initial-load config: {first}")
    endpoint.reset()
    moto_cpu = moto.cpu_seconds()
    log = (workdir / "streamsink.log").open("w", encoding="utf-8")
    process = subprocess.Popen(
        [*_streamsink(), "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_child_environment(),
        cwd=workdir,
    )
    deadline = time.monotonic() + timeout
    status_calls = 0
    status_cpu = 0.0
    load = os.getloadavg()[0]
    try:
        # 1. Until the first Scan: then the load has begun (the pipeline's start is not counted).
        while (first_at := endpoint.stats()["scan"]["first_at"]) is None:
            _still_running(process, workdir, deadline)
            time.sleep(0.05)
        _, cpu_at_first = _proc(process.pid)
        # 2. Until every segment's last page has been served (or Scan has been quiet for 5 s), over HTTP: a status
        # call is a Python start (about a second of CPU), which would take a core's share from the pipeline.
        quiet_since = time.monotonic()
        pages = 0
        while True:
            scan = endpoint.stats()["scan"]
            if scan["segments_finished"] >= segments:
                break
            if scan["pages"] != pages:
                pages, quiet_since = scan["pages"], time.monotonic()
            elif time.monotonic() - quiet_since > 5:
                break
            _still_running(process, workdir, deadline)
            time.sleep(0.2)
        # 3. Status every 0.5 s until done.
        while True:
            _still_running(process, workdir, deadline)
            asked_at = time.time()
            state, why, cpu = _status(config, workdir)
            status_calls += 1
            status_cpu += cpu
            if state is None:
                scan = endpoint.stats()["scan"]
                read = scan["items"] / max((scan["last_at"] or first_at) - first_at, 1e-9)
                raise PipelineMissing(
                    f"{why} (the pipeline was served {scan['items']:,} items in {scan['pages']:,} pages by then, "
                    f"{read:,.0f} items/s read; delivery not confirmed)"
                )
            if state.get("phase") == "done":
                break
            time.sleep(STATUS_INTERVAL)
        # The end: when every item was delivered (`finished_at`), else when the load was done (`done_at`), else
        # the start of the status call that said done (the load was done by the time that call read it).
        ended = next((name for name in ("finished_at", "done_at") if state.get(name)), None)
        done_at = _epoch(state[ended]) if ended else asked_at
        kib, cpu_at_done = _proc(process.pid)
        stats = endpoint.stats()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
    delivered = int(state.get("items", -1))
    note = f"load {load:.1f}; to {ended or 'status call'}; {status_calls} status calls ({status_cpu:.1f} CPU-s)"
    if delivered != items:
        note += f"; delivered {delivered:,} of {items:,}"
    shutil.rmtree(workdir, ignore_errors=True)
    return Run(
        what=f"pipeline ({sink})",
        segments=segments,
        items=delivered,
        seconds=done_at - first_at,
        cpu_seconds=cpu_at_done - cpu_at_first,
        hwm_kib=kib.get("VmHWM"),
        endpoint=stats,
        moto_cpu_seconds=moto.cpu_seconds() - moto_cpu,
        note=note,
    )


def _epoch(value: Any) -> float:
    """`done_at` as epoch seconds: a number, or an ISO 8601 time with its offset (as status writes times)."""
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def _still_running(process: subprocess.Popen[bytes], workdir: Path, deadline: float) -> None:
    if process.poll() is not None:
        tail = (workdir / "streamsink.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise PipelineMissing(
            f"`streamsink run` exited ({process.returncode}) before the load was done: {' | '.join(tail)}"
        )
    if time.monotonic() > deadline:
        raise PipelineMissing("the load was not done before the timeout (--timeout)")


# --- reporting -----------------------------------------------------------------------------------------------


def _endpoint_figures(run: Run) -> tuple[str, str]:
    """The scan endpoint's CPU per page and its share of one core over the run."""
    stats = run.endpoint
    pages = stats["scan"]["pages"]
    per_page = stats["cpu_seconds"] / pages * 1e3 if pages else float("nan")
    return f"{per_page:.2f}", f"{stats['cpu_seconds'] / max(stats['elapsed_seconds'], 1e-9):.0%}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def _cores(run: Run) -> str:
    return f"{run.cpu_seconds / run.seconds:.2f}" if run.seconds > 0 else "-"


def runs_table(runs: Sequence[Run]) -> str:
    from harness import table

    rows = []
    for run in runs:
        per_page, share = _endpoint_figures(run)
        rows.append(
            [
                run.what,
                str(run.segments),
                f"{run.items:,}",
                f"{run.seconds:.1f}",
                f"{run.per_second:,.0f}",
                _cores(run),
                f"{run.cpu_seconds / max(run.items, 1) * 1e6:,.0f}",
                _mib(run.hwm_kib),
                f"{run.endpoint['scan']['pages']:,}",
                per_page,
                share,
                f"{run.moto_cpu_seconds / run.seconds:.0%}" if run.seconds > 0 else "-",
                run.note,
            ]
        )
    header = ["run", "segments", "items", "seconds", "items/s", "cores", "CPU us/item", "peak RSS MiB", "pages"]
    return table([*header, "endpoint ms CPU/page", "endpoint CPU", "moto CPU", "note"], rows)


def summary_table(bare: dict[tuple[str, int], Run], piped: dict[int, Run], segments: Sequence[int]) -> str:
    from harness import table

    rows = []
    for n in segments:
        pipeline = piped.get(n)
        row = [str(n)]
        for parse in PARSES:
            run = bare.get((parse, n))
            row.append("-" if run is None else f"{run.per_second:,.0f}")
        row.append("-" if pipeline is None else f"{pipeline.per_second:,.0f}")
        reference = bare.get(("boto3", n))
        if pipeline is None or reference is None:
            row.append("-")
        else:
            ratio = reference.per_second / pipeline.per_second
            row.append(f"{ratio:.2f}x {'met' if ratio <= 1.5 else 'MISSED'}")
        cheap = bare.get(("orjson", n))
        row.append("-" if pipeline is None or cheap is None else f"{cheap.per_second / pipeline.per_second:.2f}x")
        row.append("-" if reference is None else _cores(reference))
        row.append("-" if pipeline is None else _cores(pipeline))
        rows.append(row)
    header = ["segments", "bare boto3 items/s", "bare orjson items/s", "pipeline items/s"]
    return table(
        [*header, "boto3 / pipeline (goal <= 1.5x)", "orjson / pipeline", "bare cores", "pipeline cores"], rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="table size for the throughput runs (100,000)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="round trip of every call (20)")
    parser.add_argument("--segments", default="1,4,8", help="segment counts for the throughput runs (1,4,8)")
    parser.add_argument("--memory-items", default=None, help="table sizes for the memory runs (100000,1000000)")
    parser.add_argument("--memory-segments", type=int, default=4, help="segments of the memory runs (4)")
    parser.add_argument(
        "--baselines", default="boto3,orjson", help="bare scans for the throughput runs: boto3 (plain), orjson"
    )
    parser.add_argument(
        "--memory-baselines",
        default="orjson",
        help="bare scans at the memory sizes ('none' for none): the plain one takes ~6 min at 1,000,000 items",
    )
    parser.add_argument("--sink", choices=("archive", "memory"), default="archive", help="the pipeline's one sink")
    parser.add_argument("--skip-pipeline", action="store_true", help="the bare scans only")
    parser.add_argument("--skip-memory", action="store_true", help="the throughput runs only")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a pipeline run may take")
    parser.add_argument("--quick", action="store_true", help="defaults of 20,000 items; memory 20,000 and 100,000")
    args = parser.parse_args(argv)
    args.items = args.items or (20_000 if args.quick else 100_000)
    args.memory_items = args.memory_items or ("20000,100000" if args.quick else "100000,1000000")
    segment_counts = [int(n) for n in args.segments.split(",")]
    memory_sizes = [int(n) for n in args.memory_items.split(",")]
    baselines = [p for p in args.baselines.split(",") if p]
    memory_baselines = [p for p in args.memory_baselines.split(",") if p and p != "none"]
    for parse in (*baselines, *memory_baselines):
        if parse not in PARSES:
            parser.error(f"baselines are {', '.join(PARSES)}; got {parse!r}")

    from harness import MotoServer, machine_line
    from latency_endpoint import LatencyEndpoint
    from scan_endpoint import ScanEndpoint

    print(machine_line(), flush=True)
    print(f"{args.latency_ms:g} ms a call; items of ~1 KB (DynamoDB size), ~1,000 to a 1 MB page\n", flush=True)
    runs: list[Run] = []
    bare: dict[tuple[str, int], Run] = {}
    piped: dict[int, Run] = {}
    missing = ""

    def timeout_for(items: int) -> float:
        return args.timeout or 120 + items / 500

    def pipeline(segments: int, items: int) -> Run | None:
        nonlocal missing
        if args.skip_pipeline or missing:
            return None
        try:
            run = run_pipeline(endpoint, moto, sink.url, segments, args.sink, items, timeout_for(items))
        except PipelineMissing as exc:
            missing = str(exc)
            print(f"pipeline: not measured: {missing}", flush=True)
            return None
        print(f"  {run.what}, {segments} segments, {items:,} items: {run.per_second:,.0f} items/s", flush=True)
        runs.append(run)
        return run

    def bare_run(segments: int, parse: str) -> Run:
        run = run_bare(endpoint, moto, segments, parse)
        print(f"  {run.what}, {segments} segments, {run.items:,} items: {run.per_second:,.0f} items/s", flush=True)
        runs.append(run)
        return run

    with (
        MotoServer() as moto,
        LatencyEndpoint(latency_ms=args.latency_ms).start() as sink,
        ScanEndpoint(moto.url, table=TABLE, items=args.items, latency_ms=args.latency_ms).start() as endpoint,
    ):
        print(f"Throughput, {args.items:,} items:", flush=True)
        for segments in segment_counts:
            for parse in baselines:
                bare[(parse, segments)] = bare_run(segments, parse)
            if (run := pipeline(segments, args.items)) is not None:
                piped[segments] = run
        memory: dict[int, tuple[Run | None, dict[str, Run]]] = {}
        if not args.skip_memory:
            for items in memory_sizes:
                endpoint.set_items(items)
                print(f"Memory, {items:,} items, {args.memory_segments} segments:", flush=True)
                baseline_runs = {parse: bare_run(args.memory_segments, parse) for parse in memory_baselines}
                # The memory sink keeps every record: its RSS grows with the table whatever the load does.
                measured = pipeline(args.memory_segments, items) if args.sink == "archive" else None
                memory[items] = (measured, baseline_runs)

    print(
        f"\nEvery run ({args.latency_ms:g} ms a call; CPU of the measured process; endpoint and moto CPU as a share "
        "of one core over the run):"
    )
    print(runs_table(runs))
    print(f"\nThroughput, {args.items:,} items:")
    print(summary_table(bare, piped, segment_counts))
    if memory:
        print(f"\nMemory, {args.memory_segments} segments (peak RSS, VmHWM):")
        if args.sink == "memory":
            print("(no pipeline runs: the memory sink keeps every record, so its RSS grows with the table)")
        _print_memory(memory, memory_sizes, memory_baselines)
    if missing:
        print(f"\npipeline: not measured: {missing}")
    return 0


def _print_memory(
    memory: dict[int, tuple[Run | None, dict[str, Run]]], sizes: Sequence[int], baselines: Sequence[str]
) -> None:
    from harness import table

    rows = []
    for items in sizes:
        run, bare = memory[items]
        rows.append(
            [f"{items:,}", "-" if run is None else _mib(run.hwm_kib), *(_mib(bare[p].hwm_kib) for p in baselines)]
        )
    print(table(["items", "pipeline MiB", *(f"bare {p} MiB" for p in baselines)], rows))
    small, large = (memory[sizes[0]][0], memory[sizes[-1]][0]) if sizes else (None, None)
    if small is not None and large is not None and small.hwm_kib and large.hwm_kib:
        ratio = large.hwm_kib / small.hwm_kib
        verdict = "met" if ratio <= 1.15 else "MISSED"
        print(f"pipeline at {sizes[-1]:,} / at {sizes[0]:,}: {ratio:.3f}x (goal within 1.15x: {verdict})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare-scan"]:
        url, table_name, segments, parse = sys.argv[2:6]
        print(json.dumps(bare_scan(url, table_name, int(segments), parse)), flush=True)
    else:
        sys.exit(main())
