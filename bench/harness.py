"""What the pipeline benchmarks share: a moto server, the simulated stream over HTTP, a pipeline in a child process.

The layout keeps each process's figures its own. The benchmark process holds the `StreamSimulator` (with its
backlog, which can be gigabytes) and serves it over HTTP with `SimulatedStreamsServer`; a moto server in a
process of its own keeps checkpoints and sink destinations; the pipeline runs in a child process
(`PipelineChild`) that reaches the simulated stream at its endpoint and everything else at moto's, over HTTP
as `streamsink run` talks to AWS. So the child's peak RSS, threads and CPU time are
the pipeline's alone, and the simulator's call log (kept in the parent) says which shard was polled when.

The child reports JSON lines on stdout: `started`, `progress` (every `progress_seconds`), `reached` (when the
sink has taken `stop_after_records`) and `done` (after a clean `Pipeline.stop()`). It stops on reaching the
target, on `stop` written to its stdin, or after `max_seconds`.

Run as a script only by `PipelineChild` (`python bench/harness.py child`). Prints figures; never asserts timings.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import platform
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import boto3
import botocore

from pipeline.aws import AwsClients
from pipeline.records import Batch, ChangeRecord, WireStreamRecord
from pipeline.testing.emulator import DUMMY_CREDENTIALS
from pipeline.testing.simulated_stream import SimulatedStream, StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from sinks.base import Sink, WriteResult

REGION = "us-east-1"
HERE = Path(__file__).resolve()
REPOSITORY = HERE.parent.parent
_PROJECT_DIRS = (str(REPOSITORY / "pipeline") + os.sep, str(REPOSITORY / "sinks") + os.sep)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- /proc ---------------------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS (KiB) and Threads of a process, from /proc/<pid>/status ({} once it has gone)."""
    wanted = ("VmHWM", "VmRSS", "Threads")
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in wanted:
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


def pss_kib(pid: int | str = "self") -> int | None:
    """Proportional set size: shared pages (the interpreter, libraries) split among the processes mapping them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def process_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU of a whole process (all its threads, living or gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class ThreadTimes:
    """Nanoseconds a group of threads spent on a CPU and runnable but waiting for one (/proc/.../schedstat)."""

    threads: int
    cpu_ns: int
    runqueue_ns: int


def thread_times() -> dict[str, ThreadTimes]:
    """This process's threads grouped by role (`thread_group`), from schedstat, keyed by group name.

    schedstat separates time on a CPU from time spent runnable in the kernel's run queue (the machine is busy).
    A thread waiting for the GIL is blocked, not runnable, so it shows in neither.
    """
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for entry in os.scandir("/proc/self/task"):
        try:
            with open(f"{entry.path}/schedstat", encoding="ascii") as schedstat:
                cpu, runqueue, _slices = (int(v) for v in schedstat.read().split())
        except (OSError, ValueError):
            continue
        group = thread_group(names.get(int(entry.name), "native (Arrow, C libraries)"))
        totals[group][0] += 1
        totals[group][1] += cpu
        totals[group][2] += runqueue
    return {name: ThreadTimes(*values) for name, values in totals.items()}


def thread_group(name: str) -> str:
    if re.fullmatch(r"poll-\d+", name):
        return "poll workers"
    if name == "MainThread":
        return "main (benchmark loop)"
    return name


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


_LOAD_AT_START = os.getloadavg()


def machine_line() -> str:
    """The code and the machine the figures belong to; the load average when the benchmark started and now."""
    start, now = ("/".join(f"{v:.1f}" for v in load) for load in (_LOAD_AT_START, load_average()))
    return (
        f"{source_state()}\nload average (1/5/15 min) at start {start}, at end {now}; {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, boto3 {boto3.__version__}, botocore {botocore.__version__}; "
        f"{platform.platform()}"
    )


def source_state() -> str:
    """The commit measured, and which pipeline/ or sinks/ files differed from it: figures belong to code."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True, cwd=REPOSITORY
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline", "sinks"],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "source: not a git checkout"
    files = sorted(line[3:] for line in changed if line.strip())
    return f"source: commit {head}" + (f", with local changes to {', '.join(files)}" if files else "")


def checkpoint_version() -> str:
    """Which checkpoint writer this run measured: its git blob id and the call it writes with."""
    path = REPOSITORY / "pipeline" / "state" / "checkpoint.py"
    text = path.read_text(encoding="utf-8")
    call = "BatchWriteItem" if "batch_write_item" in text else "UpdateItem per shard"
    try:
        blob = subprocess.run(
            ["git", "hash-object", str(path)], check=True, capture_output=True, text=True, cwd=REPOSITORY
        ).stdout.strip()[:12]
    except (OSError, subprocess.CalledProcessError):
        blob = "unknown"
    return f"pipeline/state/checkpoint.py blob {blob} ({call})"


# --- the moto server -----------------------------------------------------------------------------------------


class MotoServer:
    """A moto server in a process of its own, so its CPU is not the pipeline's (and can be measured apart)."""

    def __init__(self) -> None:
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def start(self) -> MotoServer:
        for name, value in DUMMY_CREDENTIALS.items():
            os.environ.setdefault(name, value)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:  # werkzeug may be busy with a request: stop it hard
            self._process.kill()
            self._process.wait()
        self._process = None

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.url)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- the simulated stream, served to a child process ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PollEvent:
    """One answered request, stamped with the wall clock (the simulator's call log has no times)."""

    at: float
    operation: str
    shard_id: str | None
    records: int


class StreamHost:
    """A simulator served over HTTP, with a timestamped log of every request it answered."""

    def __init__(self, simulator: StreamSimulator | None = None) -> None:
        self.simulator = simulator or StreamSimulator(call_log_size=10)
        self.events: list[PollEvent] = []
        self._server = SimulatedStreamsServer(self.simulator)
        self._remove_listener: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        return self._server.endpoint_url

    def start(self) -> StreamHost:
        # list.append is atomic: the server's threads may call this concurrently.
        self._remove_listener = self.simulator.on_call(
            lambda c: self.events.append(PollEvent(time.time(), c.operation, c.shard_id, c.records))
        )
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None

    def __enter__(self) -> StreamHost:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Trickle:
    """Writes items to a simulated stream at a steady rate on a thread, each stamped `written_at` (epoch seconds)
    so the sink side can measure change -> sink latency below the simulator's one-second creation times."""

    def __init__(self, stream: SimulatedStream, per_second: float, *, payload_bytes: int = 200) -> None:
        self._stream = stream
        self._interval = 1.0 / per_second
        self._payload = "x" * payload_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)
        self.written = 0

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            # On a fixed schedule, not "sleep after each write": the rate holds however long a write takes.
            if self._stop.wait(max(0.0, started + self.written * self._interval - time.monotonic())):
                return
            self._stream.put_item(
                {
                    "pk": {"S": f"trickle-{self.written:09d}"},
                    "sk": {"S": "v"},
                    "written_at": {"N": f"{time.time():.6f}"},
                    "payload": {"S": self._payload},
                }
            )
            self.written += 1


# Idle shards reach the back-off ceiling (0.25 s doubling to 10 s) after about 16 s: calls are counted after this.
WARM_UP_SECONDS = 30.0


@dataclass(frozen=True)
class PollFigures:
    """How a set of shards was polled, from the simulator's timestamped request log."""

    shards: int
    polled: int
    """Shards with at least one GetRecords."""
    all_polled_after: float | None
    """Seconds from `started` until the last shard's first GetRecords; None if some shard never had one."""
    max_gap: float
    """Longest time any shard went without a GetRecords in the steady window (to its end included)."""
    p99_gap: float
    per_shard_per_minute: float
    """GetRecords per shard per minute in the steady window."""
    other_calls_per_minute: dict[str, float]


def poll_figures(
    events: list[PollEvent], shard_ids: list[str], *, started: float, steady_from: float, ended: float
) -> PollFigures:
    """Polling of `shard_ids` from `started`; gaps and rates over the steady window [`steady_from`, `ended`]."""
    get_records = [e for e in events if e.operation == "GetRecords" and e.shard_id is not None]
    by_shard: dict[str, list[float]] = collections.defaultdict(list)
    for event in get_records:
        by_shard[event.shard_id or ""].append(event.at)
    firsts = [min(by_shard[s]) for s in shard_ids if by_shard.get(s)]
    gaps: list[float] = []
    for shard in shard_ids:
        inside = sorted(t for t in by_shard.get(shard, []) if steady_from <= t <= ended)
        # The window's edges count as gaps too: a shard polled once, early, must not look fine.
        points = [steady_from, *inside, ended]
        gaps.extend(b - a for a, b in itertools.pairwise(points))
    window_minutes = max(1e-9, (ended - steady_from) / 60)
    steady_calls = [e for e in get_records if steady_from <= e.at <= ended]
    others: collections.Counter[str] = collections.Counter(
        e.operation for e in events if e.operation != "GetRecords" and steady_from <= e.at <= ended
    )
    return PollFigures(
        shards=len(shard_ids),
        polled=len(firsts),
        all_polled_after=max(firsts) - started if len(firsts) == len(shard_ids) else None,
        max_gap=max(gaps) if gaps else float("nan"),
        p99_gap=percentile(gaps, 99),
        per_shard_per_minute=len(steady_calls) / len(shard_ids) / window_minutes,
        other_calls_per_minute={op: n / window_minutes for op, n in sorted(others.items())},
    )


# --- the pipeline in a child process -------------------------------------------------------------------------


@dataclass
class ChildSpec:
    """Everything the child needs; sent as JSON on its stdin."""

    moto_url: str
    streams_url: str
    stream_arn: str
    sink: str = "discard"
    """'s3' (the archive sink to moto S3), 'local' (the archive sink writing to `local_dir`), 'discard'."""
    sink_entries: list[dict[str, Any]] | None = None
    """`[[sinks]]` entries: the pipeline builds its sinks from them as `streamsink run` does (per-sink
    max_concurrency and filters apply), instead of the one observed sink above; `taken` is then what every one
    of them has taken."""
    bucket: str | None = None
    local_dir: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    """Settings sections (batch, reader, checkpoint, ...) over the defaults."""
    stop_after_records: int | None = None
    max_seconds: float = 600.0
    progress_seconds: float = 1.0
    profile: bool = False
    """Sample the delivery and poll threads' stacks (sys._current_frames) every `profile_interval` seconds."""
    profile_interval: float = 0.005
    tracemalloc_frames: int = 0
    """Trace Python allocations with this many frames each (0: off), for `PipelineChild.memory` to say where the
    traced memory grew since its baseline. Costs CPU and memory of its own: for finding a leak, not for figures."""


class PipelineChild:
    """`python bench/harness.py child`, fed a ChildSpec; its JSON lines are read on a thread."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.progress: list[dict[str, Any]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> PipelineChild:
        self._process = subprocess.Popen(
            [sys.executable, str(HERE), "child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPOSITORY,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(self.spec.__dict__) + "\n")
        self._process.stdin.flush()
        self._reader = threading.Thread(target=self._read, name="child-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            message = json.loads(line)
            if message["event"] == "progress":
                self.progress.append(message)
            self.lines.put(message)
        self.lines.put({"event": "exited", "code": self._process.wait()})

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """The next message named `event` (progress lines are kept in `progress` on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the pipeline child sent no {event!r} within {timeout:.0f}s") from None
            if message["event"] == event:
                return message
            if message["event"] == "exited":
                raise RuntimeError(f"the pipeline child exited with {message['code']} before {event!r}")

    def request_stop(self) -> None:
        self._send("stop")

    def memory(self, *options: str, timeout: float = 120.0) -> dict[str, Any]:
        """What the child's memory is made of now (see `MemoryProbe.report`); options "baseline" (later reports
        compare with this one) and "trim" (then give free heap back to the OS and read RSS again)."""
        self._send(" ".join(("memory", *options)))
        return self.wait_for("memory", timeout)

    def _send(self, command: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Ask the child to stop (if it has not) and return its `done` report."""
        self.request_stop()
        done = self.wait_for("done", timeout)
        assert self._process is not None
        self._process.wait(30)
        return done

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def cpu_per_minute(self, after: float) -> float:
        """CPU seconds the child used per minute of wall time, over its progress reports from `after` (epoch)."""
        steady = [p for p in self.progress if p["t"] >= after]
        if len(steady) < 2:
            return math.nan
        return float((steady[-1]["cpu_seconds"] - steady[0]["cpu_seconds"]) / (steady[-1]["t"] - steady[0]["t"]) * 60)


def child_spec(moto: MotoServer, host: StreamHost, stream_arn: str, **options: Any) -> ChildSpec:
    """A ChildSpec for this moto server and simulated stream, with a checkpoint table of its own."""
    sections = {"checkpoint": {"table_name": f"checkpoints-{uuid.uuid4().hex[:8]}"}, **options.pop("sections", {})}
    return ChildSpec(moto_url=moto.url, streams_url=host.url, stream_arn=stream_arn, sections=sections, **options)


def drain(spec: ChildSpec, timeout: float = 7200.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a child until its sink has taken `spec.stop_after_records`, then stop it: its `done` report and its
    progress reports. Raises unless every record was taken and the stop was clean."""
    child = PipelineChild(spec).start()
    try:
        child.wait_for("reached", timeout=timeout)
        done = child.finish()
    finally:
        child.kill()
    wanted = spec.stop_after_records or 0
    if not done["clean"] or done["taken"] < wanted:
        raise RuntimeError(f"the pipeline did not drain cleanly: {done['taken']} of {wanted}, {done['fatal']}")
    return done, list(child.progress)


def _written_at(record: ChangeRecord) -> Any:
    """The item's `written_at`, without unmarshalling an image that has none: the observer must not add to the
    delivery thread's work what the archive sink itself never does."""
    stream = record.raw.get("dynamodb")
    if type(stream) is WireStreamRecord:
        text = stream.image_json("NewImage")
        if text is None or b'"written_at"' not in text:
            return None
    return record.new_image.get("written_at") if record.new_image is not None else None


class ObservedSink(Sink):
    """Counts what the wrapped sink took, and for items carrying `written_at` (epoch seconds), how long after.

    `written_at` is the writer's wall clock at the write: the simulator's ApproximateCreationDateTime is whole
    seconds, too coarse for sub-second latency.
    """

    def __init__(self, inner: Sink | None) -> None:
        super().__init__(inner.name if inner is not None else "discard")
        self.inner = inner
        self.taken = 0
        self.latencies: list[float] = []
        # The first change each shard delivers: it may have found the shard backed off (idle before the writes).
        self.first_by_shard: dict[str, tuple[float, float]] = {}

    def open(self) -> None:
        if self.inner is not None:
            self.inner.open()

    def write(self, batch: Batch) -> WriteResult:
        result = self.inner.write(batch) if self.inner is not None else WriteResult()
        now = time.time()
        self.taken += len(batch) - len(result.failed)
        for record in batch.records:
            written = _written_at(record)
            if written is not None and record.event_id not in result.failed:
                latency = now - float(written)
                self.latencies.append(latency)
                first = self.first_by_shard.get(record.shard_id)
                if first is None or float(written) < first[0]:
                    self.first_by_shard[record.shard_id] = (float(written), latency)
        return result

    def flush_due(self, now: float) -> bool:
        return self.inner.flush_due(now) if self.inner is not None else True

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class _TakenByAll:
    """For a pipeline that built its own sinks: what every one of them has taken (or refused), read from its
    delivery counters; no latencies (the items carry no `written_at` here)."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self.inner = None
        self.latencies: list[float] = []
        self.first_by_shard: dict[str, tuple[float, float]] = {}

    @property
    def taken(self) -> int:
        stats = self._pipeline.delivery.stats
        return min(
            (stats.delivered.get(s.name, 0) + stats.dead_lettered.get(s.name, 0) for s in self._pipeline.sinks),
            default=0,
        )


class _RoutedClients(AwsClients):
    """DynamoDB Streams from the simulated endpoint, every other service from moto."""

    def __init__(self, moto_url: str, streams_url: str, max_pool_connections: int) -> None:
        super().__init__(REGION, moto_url, max_pool_connections=max_pool_connections)
        self._streams_url = streams_url

    def client(self, service: str, region: str | None = None, endpoint_url: str | None = None) -> Any:
        if service == "dynamodbstreams" and endpoint_url is None:
            endpoint_url = self._streams_url
        return super().client(service, region, endpoint_url)


class StackSampler:
    """Where the pipeline's threads are, and where their CPU goes, sampled on a thread of its own.

    Every `interval` the sampler reads each wanted thread's stack (sys._current_frames) and its CPU clock
    (pthread_getcpuclockid). A sample is labelled with the innermost frame in pipeline/ or sinks/ and, when the
    thread is deeper inside a library, that library; a thread blocked in a wait (a condition, a socket) is marked
    so. The label gets one count (wall time) and the CPU the thread used since the previous sample (CPU time).
    The sampler needs the GIL to look, so counts lean towards moments when the GIL is free (C code that released
    it, waits). The CPU weights are approximate too: CPU a thread used since the last sample goes to where it is
    seen now, so a long C call that holds the GIL is charged to the line after it, and a burst that ended in a
    wait is charged to the wait (reported apart).
    """

    def __init__(self, interval: float, wanted: Callable[[str], bool]) -> None:
        self._interval = interval
        self._wanted = wanted
        self.samples: dict[str, dict[str, list[int]]] = collections.defaultdict(
            lambda: collections.defaultdict(lambda: [0, 0])
        )
        self.own_cpu_seconds = 0.0
        """CPU the sampling itself cost, to take out of the pipeline's figures."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> StackSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._sample()
        finally:
            self.own_cpu_seconds = time.thread_time()

    def _sample(self) -> None:
        last_cpu: dict[int, int] = {}
        while not self._stop.wait(self._interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                name = names.get(ident)
                if name is None or not self._wanted(name):
                    continue
                try:
                    cpu = time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
                except OSError:  # the thread ended in between
                    continue
                entry = self.samples[thread_group(name)][_label(frame)]
                entry[0] += 1
                entry[1] += cpu - last_cpu.get(ident, cpu)
                last_cpu[ident] = cpu


_WAITS = {
    ("threading.py", "wait"),
    ("selectors.py", "select"),
    ("socket.py", "readinto"),
    ("ssl.py", "recv_into"),
    ("threading.py", "_wait_for_tstate_lock"),
}


def _library(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    return os.path.basename(filename).removesuffix(".py")


def _label(frame: FrameType) -> str:
    leaf = frame
    waiting = (os.path.basename(leaf.f_code.co_filename), leaf.f_code.co_name) in _WAITS
    library = None
    current: FrameType | None = frame
    while current is not None:
        filename = current.f_code.co_filename
        if filename.startswith(_PROJECT_DIRS):
            module = os.path.basename(filename).removesuffix(".py")
            where = f"{module}.{current.f_code.co_qualname}"
            break
        if library is None:
            library = _library(filename)
        current = current.f_back
    else:
        where = "(outside pipeline/ and sinks/)"
    if waiting:
        return f"{where} [waiting]"
    return f"{where} > {library}" if library else where


def _child_sink(spec: ChildSpec) -> Sink | None:
    if spec.sink == "discard":
        return None
    from sinks.s3_parquet import S3ParquetSink, S3ParquetSinkSettings

    if spec.sink == "s3":
        settings = S3ParquetSinkSettings(type="s3_parquet", bucket=spec.bucket or "", prefix="orders/")
        return S3ParquetSink(settings, region=REGION, endpoint_url=spec.moto_url)
    if spec.sink == "local":
        from fsspec.implementations.local import LocalFileSystem

        class LocalArchiveTarget(LocalFileSystem):  # type: ignore[misc]
            """fsspec's local filesystem under another name: pyarrow swaps one named LocalFileSystem for its own,
            which does not create the partition directories."""

        assert spec.local_dir is not None
        settings = S3ParquetSinkSettings(type="s3_parquet", bucket=spec.local_dir, prefix="orders/")
        filesystem = LocalArchiveTarget(auto_mkdir=True)
        return S3ParquetSink(settings, region=REGION, endpoint_url=None, filesystem=filesystem)
    raise ValueError(f"unknown sink {spec.sink!r}")


class MemoryProbe:
    """What a pipeline child's memory is made of, when the parent asks (`PipelineChild.memory`).

    RSS alone cannot tell a leak from a buffer, from Arrow's pool keeping freed pages, or from free heap that
    malloc has not given back. So a report holds the counts of what the pipeline keeps per shard, Python's live
    objects by type (after a collection, so garbage awaiting the collector does not count), pymalloc's blocks,
    Arrow's own allocations, and, with tracemalloc on, the allocation sites whose traced size grew most since the
    baseline report. Diagnostic only: a report walks every object and may take a second.
    """

    def __init__(self, pipeline: Any, sink: ObservedSink, frames: int) -> None:
        self._pipeline = pipeline
        self._sink = sink
        self._baseline: Any = None
        if frames:
            import tracemalloc

            tracemalloc.start(frames)

    def report(self, options: Sequence[str]) -> dict[str, Any]:
        import gc
        import tracemalloc

        gc.collect()
        types: collections.Counter[str] = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
        )
        found: dict[str, Any] = {
            "rss_kib": proc_status().get("VmRSS"),
            "allocated_blocks": sys.getallocatedblocks(),
            "held": self._held(),
            "types": {name: n for name, n in types.items() if n >= 20},
        }
        if "pyarrow" in sys.modules:
            import pyarrow

            pool = pyarrow.default_memory_pool()
            found["arrow"] = {
                "backend": pool.backend_name,
                "allocated": pool.bytes_allocated(),
                "max": pool.max_memory(),
            }
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            found["traced"] = {"current": current, "peak": peak}
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if "baseline" in options or self._baseline is None:
                self._baseline = snapshot
            found["grown"] = [
                {
                    "size_diff": stat.size_diff,
                    "count_diff": stat.count_diff,
                    "size": stat.size,
                    "trace": [f"{frame.filename}:{frame.lineno}" for frame in stat.traceback],
                }
                for stat in snapshot.compare_to(self._baseline, "traceback")[:30]
            ]
        if "trim" in options:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            found["rss_after_trim_kib"] = proc_status().get("VmRSS")
        return found

    def _held(self) -> dict[str, int | None]:
        """Sizes of what the pipeline keeps per shard (or per anything): the places a leak would be. Some are
        internals, read by name: one renamed since shows as None rather than failing the report."""
        p = self._pipeline
        inner = self._sink.inner

        def size(owner: Any, name: str) -> int | None:
            value = getattr(owner, name, None)
            return None if value is None else len(value() if callable(value) else value)

        return {
            "lineage shards": size(p.lineage, "shards"),
            "lineage finished": size(p.lineage, "_finished"),
            "store known rows": size(p.store, "known"),
            "reading": size(p, "_reading"),
            "scheduler active": size(p.scheduler, "active_shard_ids"),
            "scheduler progress": size(p.scheduler, "progress"),
            "scheduler heap": size(p.scheduler, "_heap"),
            "stats committed": size(p.stats, "committed"),
            "archive parts": size(inner, "_parts"),
            "archive buffered bytes": getattr(inner, "buffered_bytes", None),
            "s3fs dircache": size(getattr(inner, "_fs", None), "dircache"),
            "threads": threading.active_count(),
        }


def _child_main() -> None:
    from pipeline.runner import Pipeline
    from pipeline.settings import load_settings

    logging.basicConfig(level=logging.WARNING, format="child %(levelname)s %(name)s: %(message)s")
    for name, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    spec = ChildSpec(**json.loads(sys.stdin.readline()))
    stop = threading.Event()
    requests: queue.Queue[list[str]] = queue.Queue()

    def watch_stdin() -> None:
        for line in sys.stdin:
            command = line.split()
            if command == ["stop"]:
                break
            if command[:1] == ["memory"]:
                requests.put(command[1:])  # answered by the main loop, which owns the pipeline
        stop.set()  # a closed stdin (the parent has gone) stops too

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()

    def emit(event: str, **values: Any) -> None:
        print(json.dumps({"event": event, "t": time.time(), **values}), flush=True)

    sections: dict[str, Any] = {"checkpoint": {"table_name": "bench-checkpoints"}, **spec.sections}
    settings = load_settings(
        source={"stream_arn": spec.stream_arn, "region": REGION, "endpoint_url": spec.moto_url},
        # Required by the model; unless entries are given, the observed sink below is passed in directly.
        sinks=spec.sink_entries or [{"type": "memory"}],
        **sections,
    )
    clients = _RoutedClients(spec.moto_url, spec.streams_url, settings.reader.poll_workers + 4)
    if spec.sink_entries:
        pipeline = Pipeline(settings, clients=clients)
        sink: Any = _TakenByAll(pipeline)
    else:
        sink = ObservedSink(_child_sink(spec))
        pipeline = Pipeline(settings, sinks=[sink], clients=clients)
    sampler = (
        StackSampler(spec.profile_interval, lambda n: n == "delivery" or n.startswith("poll-") or "-lane-" in n).start()
        if spec.profile
        else None
    )
    probe = MemoryProbe(pipeline, sink, spec.tracemalloc_frames)
    started_wall = time.time()
    pipeline.start()
    start_seconds = time.time() - started_wall
    cpu_at_start = time.process_time()
    times_at_start = thread_times()
    emit("started", start_seconds=start_seconds, shards=len(pipeline.scheduler.active_shard_ids()))

    peak_threads = 0
    peak_active = 0
    reached: dict[str, Any] | None = None
    next_progress = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        status = proc_status()
        peak_threads = max(peak_threads, status.get("Threads", 0))
        peak_active = max(peak_active, threading.active_count())
        target_reached = spec.stop_after_records is not None and sink.taken >= spec.stop_after_records
        if now >= next_progress or target_reached:
            next_progress = now + spec.progress_seconds
            emit(
                "progress",
                taken=sink.taken,
                rss_kib=status.get("VmRSS"),
                hwm_kib=status.get("VmHWM"),
                threads=status.get("Threads"),
                active_count=threading.active_count(),
                queue_records=pipeline.queue.depth[0],
                polls=pipeline.scheduler.polls,
                empty_polls=pipeline.scheduler.empty_polls,
                cpu_seconds=time.process_time() - cpu_at_start,
                # What the pipeline holds per shard, for benchmarks that watch it over time (memory_day.py).
                records_read=pipeline.stats.records_read,
                checkpoints_written=pipeline.stats.checkpoints_written,
                shards_finished=pipeline.stats.shards_finished,
                shards_reading=len(pipeline.scheduler.active_shard_ids()),
                shards_known=len(pipeline.lineage.shards()),
                rows_known=None if pipeline.store is None else len(pipeline.store.known()),
            )
        if pipeline.fatal is not None:
            break
        if target_reached:
            reached = {"seconds": time.time() - started_wall, "cpu_seconds": time.process_time() - cpu_at_start}
            emit("reached", **reached)
            break
        if time.time() - started_wall > spec.max_seconds:
            break
        while not requests.empty():
            emit("memory", **probe.report(requests.get()))
        stop.wait(0.05)

    # Before stopping: the pipeline's threads are still there to be named.
    times_at_end = thread_times()
    cpu_before_stop = time.process_time() - cpu_at_start
    wall_before_stop = time.time() - started_wall
    if sampler is not None:
        sampler.stop()
    stop_started = time.time()
    clean = pipeline.stop()
    status = proc_status()
    latencies = sorted(sink.latencies)
    emit(
        "done",
        clean=clean,
        fatal=None if pipeline.fatal is None else repr(pipeline.fatal),
        taken=sink.taken,
        records_read=pipeline.stats.records_read,
        checkpoints_written=pipeline.stats.checkpoints_written,
        start_seconds=start_seconds,
        wall_seconds=wall_before_stop,
        cpu_seconds=cpu_before_stop,
        stop_seconds=time.time() - stop_started,
        total_wall_seconds=time.time() - started_wall,
        total_cpu_seconds=time.process_time() - cpu_at_start,
        reached=reached,
        hwm_kib=status.get("VmHWM"),
        rss_kib=status.get("VmRSS"),
        peak_threads=peak_threads,
        peak_active_count=peak_active,
        polls=pipeline.scheduler.polls,
        empty_polls=pipeline.scheduler.empty_polls,
        queue_peak_records=pipeline.queue.peak_records,
        thread_times={
            group: {
                "threads": end.threads,
                "cpu_seconds": (end.cpu_ns - (times_at_start.get(group) or ThreadTimes(0, 0, 0)).cpu_ns) / 1e9,
                "runqueue_seconds": (end.runqueue_ns - (times_at_start.get(group) or ThreadTimes(0, 0, 0)).runqueue_ns)
                / 1e9,
            }
            for group, end in times_at_end.items()
        },
        samples={group: dict(labels) for group, labels in (sampler.samples.items() if sampler else ())},
        sampler_cpu_seconds=0.0 if sampler is None else sampler.own_cpu_seconds,
        latencies=latencies,
        first_latencies=sorted(latency for _, latency in sink.first_by_shard.values()),
    )


# --- reporting -----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned plain-text table: first column left, the rest right."""
    everything = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in everything
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def profile_report(done: Mapping[str, Any], top: int = 8) -> str:
    """Per thread group: CPU, run-queue wait and an estimate of GIL wait over the run; then where the CPU went.

    The GIL estimate: the share of samples in which a thread was not in a wait, times its thread-seconds, less
    what it spent on a CPU or queued for one. Samples lean towards moments the GIL is free, so it is rough.
    """
    wall = float(done["wall_seconds"])
    lines = [f"thread time over the {wall:.1f}-s run (seconds, and % of the group's thread-seconds):"]
    rows = []
    samples: Mapping[str, Mapping[str, Sequence[int]]] = done.get("samples") or {}
    for group, times in sorted(done["thread_times"].items(), key=lambda kv: -kv[1]["cpu_seconds"]):
        thread_seconds = wall * times["threads"]
        cpu, runqueue = times["cpu_seconds"], times["runqueue_seconds"]
        labels = samples.get(group)
        busy = gil = "-"
        if labels:
            counts = sum(n for n, _cpu in labels.values())
            active = sum(n for label, (n, _cpu) in labels.items() if not label.endswith("[waiting]")) / counts
            waiting = 1 - active
            busy = f"{waiting:.0%}"
            gil = f"~{max(0.0, active * thread_seconds - cpu - runqueue) / thread_seconds:.0%}"
        rows.append(
            [
                group,
                str(times["threads"]),
                f"{cpu:.1f} ({cpu / thread_seconds:.0%})",
                f"{runqueue:.1f} ({runqueue / thread_seconds:.0%})",
                busy,
                gil,
            ]
        )
    lines.append(table(["threads", "n", "on CPU", "run queue", "in a wait", "GIL wait"], rows))
    for group, labels in sorted(samples.items()):
        counts = sum(n for n, _cpu in labels.values()) or 1
        cpu_total = sum(c for _n, c in labels.values()) or 1
        lines.append(f"\n'{group}': share of its CPU time / of its samples (wall) by where it was, {counts:,} samples")
        working = [(label, v) for label, v in labels.items() if not label.endswith("[waiting]")]
        ranked = sorted(working, key=lambda kv: (-kv[1][1], -kv[1][0]))
        for label, (n, cpu_ns) in ranked[:top]:
            lines.append(f"  {cpu_ns / cpu_total:6.1%} {n / counts:6.1%}  {label}")
        waits = [(label, n, c) for label, (n, c) in labels.items() if label.endswith("[waiting]")]
        unplaced = sum(c for _label, _n, c in waits)
        if unplaced:
            lines.append(f"  {unplaced / cpu_total:6.1%} {'':6}  (CPU used before the thread was next seen waiting)")
        for label, n, _c in sorted(waits, key=lambda kv: -kv[1])[:3]:
            lines.append(f"  {'':6} {n / counts:6.1%}  {label}")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        _child_main()
    else:
        sys.exit("bench/harness.py is run by the benchmarks (python bench/harness.py child), not by hand")
