"""CPU cost of "GetRecords response bytes -> archive Parquet bytes" on one core.

The archive sink sits on the hot path of every shard reader, so its per-record cost bounds how many shards one
process can keep up with. This compares ways through the same seeded GetRecords bodies, each page going
through a real boto3 client's `get_records` (request building, signing, event hooks, response parsing) whose
HTTP send is answered in memory with the page's bytes:

- ``naive``: what a first boto3 consumer writes: a default client, boto3's ``TypeDeserializer``, rows of
  ``json.dumps`` images, ``pa.Table.from_pylist``. The baseline the "vs naive" ratios are relative to.
- ``streamsink``: a client from ``AwsClients`` (GetRecords decoded by msgspec in pipeline.wire,
  images kept as text),
  ``change_record_from_stream``, ``archive_table`` with the sink's default ``image_encoding = "dynamodb_json"``
  (images written from the stream record; the records' lazy images are never unmarshalled).
- ``streamsink-json``: the same with ``image_encoding = "json"`` (every image unmarshalled, then plain JSON).
- ``streamsink-botocore`` (only with ``--paths``): ``streamsink`` with ``fast_get_records=False``, i.e.
  botocore's own parser; what the fast parse saves.
- ``orjson-floor``: ``orjson.loads`` of the bodies and nothing else; no path that must parse JSON goes faster.

Each page (``--page-size`` records, one GetRecords response) is turned into one zstd Parquet object in memory.
The sink itself writes once per flush, usually several pages, but per page gives a latency per GetRecords call
and a Parquet write of 1000 rows is a small share of the total. Each path runs in its own process, pinned
to one CPU with Arrow's thread pools at one thread, so the peak RSS reported belongs to that path alone and no
path borrows a second core. Before timing, the parent checks that the fast parse and botocore's parser give
the same archive table for the first page in both image encodings, so the figures compare equal output.

Run from the repository root: ``python bench/archive_path.py``. Prints figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import os
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from decimal import Decimal
from random import Random
from typing import Any

import boto3
import botocore
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from boto3.dynamodb.types import Binary, TypeDeserializer
from botocore.awsrequest import AWSResponse

from pipeline.aws import AwsClients
from pipeline.records import change_record_from_stream
from sinks.s3_parquet import ImageEncoding, archive_table

PATHS = ("naive", "streamsink", "streamsink-json", "streamsink-botocore", "orjson-floor")
DEFAULT_PATHS = ("naive", "streamsink", "streamsink-json", "orjson-floor")
TABLE = "bench"
SHARD_ID = "shardId-bench"
SEED = 42

# A page is turned into one function call that returns how many rows it produced: a path that silently
# dropped records must not look fast.
PageFn = Callable[[bytes], int]

_WORDS = (
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo"),
    *("lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform"),
    *("victor", "whiskey", "xray", "yankee", "zulu", "parcel", "invoice", "refund", "express"),
)
_CITIES = ("Seattle", "Dublin", "Frankfurt", "Tokyo", "Sao Paulo", "Sydney", "Mumbai", "Toronto")
_STATUSES = ("PENDING", "PAID", "PACKED", "SHIPPED", "DELIVERED", "RETURNED")


# --- synthetic GetRecords bodies ---------------------------------------------------------------------------


def _n(value: int | str | Decimal) -> dict[str, str]:
    return {"N": str(value)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _text(rng: Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _money(rng: Random) -> str:
    return f"{rng.randint(1, 99_999)}.{rng.randint(0, 99):02d}"


def _big(rng: Random) -> str:
    # 38 significant digits: the DynamoDB maximum, and more than any float keeps.
    digits = str(rng.randint(10**37, 10**38 - 1))
    if rng.random() < 0.5:
        return digits
    point = rng.randint(1, 37)
    return f"-{digits[:point]}.{digits[point:]}"


def _image(rng: Random, pk: str, sk: str, version: int) -> dict[str, Any]:
    """One order item in DynamoDB JSON (blobs already base64, as on the wire), every type tag present."""
    lines = [
        {
            "M": {
                "sku": _s(f"SKU-{rng.randint(0, 10**8):08d}"),
                "qty": _n(rng.randint(1, 12)),
                "price": _n(_money(rng)),
            }
        }
        for _ in range(rng.randint(1, 2))
    ]
    return {
        "pk": _s(pk),
        "sk": _s(sk),
        "status": _s(rng.choice(_STATUSES)),
        "version": _n(version),
        "amount": _n(_money(rng)),
        "ledger_total": _n(_big(rng)),
        "created_at": _n(1_714_000_000 + rng.randint(0, 10**6)),
        "expires_at": _n(1_800_000_000 + rng.randint(0, 10**6)),
        "payload": {"B": base64.b64encode(rng.randbytes(rng.randint(24, 72))).decode("ascii")},
        "active": {"BOOL": rng.random() < 0.8},
        "tags": {"SS": sorted({rng.choice(_WORDS) for _ in range(rng.randint(1, 4))})},
        "scores": {"NS": sorted({f"{rng.uniform(-100, 100):.4f}" for _ in range(rng.randint(2, 5))})},
        "lines": {"L": lines},
        "address": {
            "M": {
                "city": _s(rng.choice(_CITIES)),
                "zip": _s(f"{rng.randint(0, 99999):05d}"),
                "geo": {
                    "M": {
                        "lat": _n(f"{rng.uniform(-90, 90):.6f}"),
                        "lon": _n(f"{rng.uniform(-180, 180):.6f}"),
                    }
                },
            }
        },
        "history": {"L": [_s(rng.choice(_STATUSES)), _n(rng.randint(0, 10**6)), {"NULL": True}]},
        "note": _s(_text(rng, rng.randint(3, 10))),
    }


def _epoch_wire(seconds: int) -> orjson.Fragment:
    # The service writes the timestamp as a Java double: 1714567890 -> 1.71456789E9.
    digits = str(seconds)
    return orjson.Fragment(f"{digits[0]}.{digits[1:].rstrip('0') or '0'}E{len(digits) - 1}".encode())


def _record(rng: Random, index: int, sequence: int) -> dict[str, Any]:
    pk = f"CUSTOMER#{rng.getrandbits(64):016x}"
    sk = f"ORDER#2024-05-{rng.randint(1, 28):02d}#{index:08d}"
    roll = rng.random()
    event_name = "INSERT" if roll < 0.3 else "MODIFY" if roll < 0.9 else "REMOVE"
    version = rng.randint(1, 50)
    new_image = None if event_name == "REMOVE" else _image(rng, pk, sk, version)
    old_image = None if event_name == "INSERT" else _image(rng, pk, sk, version - 1)
    ddb: dict[str, Any] = {
        "ApproximateCreationDateTime": _epoch_wire(1_714_567_890 + index // 50),
        "Keys": {"pk": _s(pk), "sk": _s(sk)},
    }
    if new_image is not None:
        ddb["NewImage"] = new_image
    if old_image is not None:
        ddb["OldImage"] = old_image
    ddb["SequenceNumber"] = str(sequence)
    # SizeBytes counts names and values, not the JSON type-tag overhead: roughly half the wire size.
    ddb["SizeBytes"] = len(orjson.dumps([ddb["Keys"], new_image, old_image])) // 2
    ddb["StreamViewType"] = "NEW_AND_OLD_IMAGES"
    record: dict[str, Any] = {
        "awsRegion": "us-east-1",
        "dynamodb": ddb,
        "eventID": f"{rng.getrandbits(128):032x}",
        "eventName": event_name,
        "eventSource": "aws:dynamodb",
        "eventVersion": "1.1",
    }
    if event_name == "REMOVE" and rng.random() < 0.5:
        record["userIdentity"] = {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}
    return record


def make_bodies(total: int, page_size: int) -> list[bytes]:
    """GetRecords response bodies exactly as the wire carries them, seeded so runs compare across machines."""
    rng = Random(SEED)
    sequence = 400_000_000_000_004_996_600_000
    bodies: list[bytes] = []
    for start in range(0, total, page_size):
        records = []
        for index in range(start, min(start + page_size, total)):
            sequence += rng.randint(1, 10**6)
            records.append(_record(rng, index, sequence))
        iterator = f"arn:aws:dynamodb:us-east-1:123456789012:table/{TABLE}/stream/2024-05-01T00:00:00.000|1|"
        body = {
            "NextShardIterator": iterator + base64.b64encode(rng.randbytes(180)).decode(),
            "Records": records,
        }
        bodies.append(orjson.dumps(body))
    return bodies


# --- the paths -------------------------------------------------------------------------------------------


REGION = "us-east-1"
# Never dialled: every GetRecords is answered in memory by the before-send hook below.
ENDPOINT = "http://127.0.0.1:9"
ITERATOR = f"arn:aws:dynamodb:{REGION}:123456789012:table/{TABLE}/stream/2024-05-01T00:00:00.000|1|AAAA"


class _CannedBody:
    """The raw HTTP body botocore reads a response from."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def _get_records(client: Any) -> Callable[[bytes], dict[str, Any]]:
    """`client.get_records`, with the HTTP exchange replaced by the given response body (status 200)."""
    pending: list[bytes] = []

    def respond(request: Any, **_: Any) -> AWSResponse:
        body = pending.pop()
        headers = {
            "x-amzn-requestid": "BENCH0000000000000000000000000000000000000000000000000",
            "content-type": "application/x-amz-json-1.0",
            "content-length": str(len(body)),
        }
        return AWSResponse(request.url, 200, headers, _CannedBody(body))

    client.meta.events.register("before-send.dynamodb-streams.GetRecords", respond)

    def get_records(body: bytes) -> dict[str, Any]:
        pending.append(body)
        response: dict[str, Any] = client.get_records(ShardIterator=ITERATOR)
        return response

    return get_records


def _use_placeholder_credentials() -> None:
    # Requests are signed as usual; nothing leaves the process, but the credential chain must find something.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")


def _parquet_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return int(sink.getvalue().size)


def _naive_default(value: Any) -> Any:
    # The literal `default=str` raises on boto3's Binary (its __str__ returns bytes), so the baseline needs
    # this one extra case; everything else (Decimal, set) is str() as a first version would do it.
    if isinstance(value, Binary):
        return base64.b64encode(value.value).decode("ascii")
    return str(value)


def _naive() -> PageFn:
    _use_placeholder_credentials()
    get_records = _get_records(boto3.client("dynamodbstreams", region_name=REGION, endpoint_url=ENDPOINT))
    deserializer = TypeDeserializer()

    def image(raw: dict[str, Any] | None) -> str | None:
        if raw is None:
            return None
        return json.dumps({k: deserializer.deserialize(v) for k, v in raw.items()}, default=_naive_default)

    def page(body: bytes) -> int:
        rows = []
        for record in get_records(body)["Records"]:
            ddb = record["dynamodb"]
            identity = record.get("userIdentity")
            rows.append(
                {
                    "event_id": record["eventID"],
                    "event_name": record["eventName"],
                    "table": TABLE,
                    "shard_id": SHARD_ID,
                    "sequence_number": ddb["SequenceNumber"],
                    "approximate_creation_time": ddb["ApproximateCreationDateTime"],
                    "keys": image(ddb["Keys"]),
                    "new_image": image(ddb.get("NewImage")),
                    "old_image": image(ddb.get("OldImage")),
                    "size_bytes": ddb["SizeBytes"],
                    "user_identity": None
                    if identity is None
                    else {"type": identity["Type"], "principal_id": identity["PrincipalId"]},
                }
            )
        table = pa.Table.from_pylist(rows)
        _parquet_bytes(table)
        return int(table.num_rows)

    return page


def _streamsink_table(fast_get_records: bool, encoding: ImageEncoding) -> Callable[[bytes], pa.Table]:
    """A page's archive table as the pipeline builds it, with the pipeline's own client."""
    _use_placeholder_credentials()
    clients = AwsClients(REGION, ENDPOINT, fast_get_records=fast_get_records)
    get_records = _get_records(clients.client("dynamodbstreams"))

    def table(body: bytes) -> pa.Table:
        raws = get_records(body)["Records"]
        records = [change_record_from_stream(raw, table=TABLE, shard_id=SHARD_ID) for raw in raws]
        return archive_table(records, encoding)

    return table


def _streamsink(fast_get_records: bool = True, encoding: ImageEncoding = "dynamodb_json") -> PageFn:
    table_of = _streamsink_table(fast_get_records, encoding)

    def page(body: bytes) -> int:
        table = table_of(body)
        _parquet_bytes(table)
        return int(table.num_rows)

    return page


def _orjson_floor() -> PageFn:
    def page(body: bytes) -> int:
        return len(orjson.loads(body)["Records"])

    return page


def check_same_archive(body: bytes) -> None:
    """The fast parse must not change a single archive value; fail loudly rather than time a wrong path."""
    encodings: tuple[ImageEncoding, ...] = ("dynamodb_json", "json")
    for encoding in encodings:
        fast, slow = _streamsink_table(True, encoding)(body), _streamsink_table(False, encoding)(body)
        if not fast.equals(slow):
            raise RuntimeError(
                f"the fast GetRecords parse gives a different {encoding} archive table than botocore's parser"
            )


_FACTORIES: dict[str, Callable[[], PageFn]] = {
    "naive": _naive,
    "streamsink": _streamsink,
    "streamsink-json": lambda: _streamsink(encoding="json"),
    "streamsink-botocore": lambda: _streamsink(fast_get_records=False),
    "orjson-floor": _orjson_floor,
}


# --- measuring one path (child process) --------------------------------------------------------------------


@dataclass(frozen=True)
class PathResult:
    """What one child process reports back to the parent, as JSON on stdout."""

    path: str
    records: int
    best_seconds: float
    """CPU seconds of the fastest run: what the path costs, whatever else shares the core."""
    best_wall_seconds: float
    page_ms: list[float]
    """CPU milliseconds of every page of every run."""
    baseline_rss_mib: float
    peak_rss_mib: float
    cpu: int | None


def _max_rss_mib() -> float:
    """Peak RSS of this process since it exec'd.

    Linux carries ru_maxrss across exec, so a child would report its parent's peak (the parent holds every
    body); /proc's VmHWM belongs to the new image alone.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is KiB on Linux (bytes on macOS, where this overstates by 1024x).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pin_to_one_cpu(cpu: int | None) -> int | None:
    """One core means one core: no Arrow thread pool and no second CPU for the scheduler to lend."""
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
    os.sched_setaffinity(0, {cpu})
    return cpu


def _read_bodies(path: str) -> list[bytes]:
    # Line by line: reading the whole file first would put a second copy of every body into the peak RSS.
    with open(path, "rb") as file:
        return [line.rstrip(b"\n") for line in file]


def measure(path: str, bodies: list[bytes], runs: int, cpu: int | None) -> PathResult:
    """Best-of-`runs` CPU and wall time over all pages, plus every page's CPU time from every run.

    CPU time is what the figures use: on a machine that others share, wall time also counts the time the
    path waited for its core. On an idle core the two agree within a few percent.
    """
    total = sum(len(orjson.loads(body)["Records"]) for body in bodies)
    page = _FACTORIES[path]()
    page(bodies[0])  # warm botocore's shape caches and Arrow's lazy initialisation outside the clock
    gc.collect()
    baseline = _max_rss_mib()
    best = best_wall = float("inf")
    page_ms: list[float] = []
    for _ in range(runs):
        gc.collect()
        rows = 0
        started, started_wall = time.process_time(), time.perf_counter()
        for body in bodies:
            before = time.process_time()
            rows += page(body)
            page_ms.append((time.process_time() - before) * 1000)
        best = min(best, time.process_time() - started)
        best_wall = min(best_wall, time.perf_counter() - started_wall)
        if rows != total:
            raise RuntimeError(f"{path} produced {rows} rows from {total} records")
    return PathResult(path, total, best, best_wall, page_ms, baseline, _max_rss_mib(), cpu)


# --- orchestration and report (parent process) -------------------------------------------------------------


def _run_children(args: argparse.Namespace, bodies_file: str) -> list[PathResult]:
    """Each path in its own process on its own CPU, at most `--jobs` at a time, results in `--paths` order."""
    cpus: list[int | None] = [None]
    if hasattr(os, "sched_getaffinity"):
        cpus = [*sorted(os.sched_getaffinity(0))]
    free: queue.Queue[int | None] = queue.Queue()
    for cpu in cpus[: max(1, args.jobs)]:
        free.put(cpu)

    def run(path: str) -> PathResult:
        cpu = free.get()
        try:
            command = [sys.executable, os.path.abspath(__file__), "--only", path, "--bodies", bodies_file]
            command += ["--runs", str(args.runs)] + ([] if cpu is None else ["--cpu", str(cpu)])
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        finally:
            free.put(cpu)
        return PathResult(**json.loads(done.stdout))

    with ThreadPoolExecutor(max_workers=free.qsize()) as pool:
        return list(pool.map(run, args.paths))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))  # nearest rank
    return ordered[rank - 1]


def report(results: list[PathResult], wire_bytes: int, pages: int, page_size: int, jobs: int) -> str:
    """An aligned table a reader can paste into a PR, with what was measured stated above and below it."""
    total = results[0].records
    runs = len(results[0].page_ms) // pages
    naive = next((r for r in results if r.path == "naive"), None)
    floor = next((r for r in results if r.path == "orjson-floor"), None)
    header = (
        "path",
        "records/s",
        "wall records/s",
        "vs naive",
        "time vs floor",
        "p50 ms/page",
        "p99 ms/page",
        "peak RSS MiB",
        "RSS at start MiB",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.path,
                f"{r.records / r.best_seconds:,.0f}",
                f"{r.records / r.best_wall_seconds:,.0f}",
                f"{naive.best_seconds / r.best_seconds:.2f}x" if naive else "-",
                f"{r.best_seconds / floor.best_seconds:.2f}x" if floor else "-",
                f"{_percentile(r.page_ms, 50):.1f}",
                f"{_percentile(r.page_ms, 99):.1f}",
                f"{r.peak_rss_mib:.1f}",
                f"{r.baseline_rss_mib:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    table.insert(1, "  ".join("-" * w for w in widths))
    placement = ", ".join(f"{r.path} on cpu {r.cpu}" for r in results)
    machine = platform.platform()
    return "\n".join(
        [
            f"GetRecords response bytes -> zstd Parquet bytes, one core per path: {total:,} records, "
            f"{pages} pages of {page_size},",
            f"{wire_bytes / total:,.0f} B/record on the wire ({wire_bytes / 2**20:.1f} MiB), "
            f"records/s = best of {runs} runs",
            "",
            *table,
            "",
            f"latency: nearest-rank percentiles over {runs * pages} pages ({runs} runs x {pages})",
            "records/s and ms/page: CPU time of the path's process (wall records/s: elapsed time, best run)",
            "vs naive: records/s over naive's (higher is faster); time vs floor: CPU time over orjson-floor's",
            "RSS at start: after loading bodies and a warm-up page; peak: VmHWM of the path's process",
            f"{jobs} path(s) at a time: {placement}",
            f"python {platform.python_version()} ({platform.python_implementation()}), {machine}, "
            f"cpu_count={os.cpu_count()}; botocore {botocore.__version__}, pyarrow {pa.__version__}, "
            f"orjson {orjson.__version__}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000, help="total records (default 20000)")
    parser.add_argument(
        "--page-size",
        "--pages-size",
        dest="page_size",
        type=int,
        default=1000,
        help="records per GetRecords response (default 1000, the service maximum)",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per path; the best is reported")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="paths measured at once, each pinned to its own CPU (default 2; 1 gives the quietest figures)",
    )
    # Internal: how the parent invokes each child.
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=list(DEFAULT_PATHS),
        help=f"paths to measure, in this order (default: {' '.join(DEFAULT_PATHS)})",
    )
    parser.add_argument("--only", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.records, args.page_size, args.runs, args.jobs) < 1:
        parser.error("--records, --page-size, --runs and --jobs must be positive")

    if args.only:
        cpu = _pin_to_one_cpu(args.cpu)  # before loading anything, so all of the child's work is on that CPU
        bodies = _read_bodies(args.bodies) if args.bodies else make_bodies(args.records, args.page_size)
        print(json.dumps(asdict(measure(args.only, bodies, args.runs, cpu))))
        return

    # Generated once and handed over as a file: every child times the same bytes and none pays to build them.
    bodies = make_bodies(args.records, args.page_size)
    wire_bytes, pages = sum(len(b) for b in bodies), len(bodies)
    check_same_archive(bodies[0])
    with tempfile.TemporaryDirectory(prefix="streamsink-bench-") as tmp:
        bodies_file = os.path.join(tmp, "getrecords.ndjson")
        with open(bodies_file, "wb") as file:
            file.writelines(body + b"\n" for body in bodies)
        del bodies
        results = _run_children(args, bodies_file)
    jobs = min(args.jobs, len({r.cpu for r in results}) or 1)
    print(report(results, wire_bytes, pages, args.page_size, jobs))


if __name__ == "__main__":
    main()
