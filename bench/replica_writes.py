"""Write strategies for the DynamoDB replica sink, measured against a moto server in its own process.

BatchWriteItem cannot be conditional, so a replica that must never let an older change overwrite a newer one
has two ways to write. This script times both, plus a baseline, on the same seeded changes in one run:

- ``naive``: sequential, unconditional ``put_item`` / ``delete_item`` of the NewImage: what a first version
  does. It is fast but wrong on replay (an old change overwrites a newer one); it is here as the baseline.
- ``per-item xN``: ``DynamoDbTableSink`` itself, a conditional PutItem/DeleteItem per change on N threads
  (each key's changes in order on one thread).
- ``transact``: conditional writes grouped into TransactWriteItems calls of up to 100, at most one write per
  key per call (the service refuses two). A cancelled call is sent again without the writes whose condition
  failed, as a sink would have to.

Each strategy writes to a fresh table twice: ``fresh`` (an empty table) and ``replay`` (the same batches
again, as after a crash before a checkpoint: every condition fails). Afterwards the table is checked against
the expected final state, so a strategy that lost writes cannot look fast. ``--rtt-ms`` adds a fixed wait
before every call, standing in for the network round trip to AWS that a local moto server lacks.

moto (5.2.5) deep-copies the whole table once per item of every TransactWriteItems call, to roll back on
failure, so ``transact`` slows down as the table grows: compare ``--records 100 --keys 100`` with the default.
That cost is moto's, not DynamoDB's.

Run from the repository root: ``python bench/replica_writes.py``. Prints figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from random import Random
from typing import Any

import boto3
import botocore
from botocore.exceptions import ClientError

from pipeline.aws import AwsClients
from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery
from pipeline.records import Batch, ChangeRecord, change_record_from_stream
from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.testing.emulator import DUMMY_CREDENTIALS
from sinks.dynamodb_table import (
    NEWER_WINS_CONDITION,
    DynamoDbTableSink,
    DynamoDbTableSinkSettings,
    padded_sequence,
)

SEED = 7
REGION = "us-east-1"
SEQUENCE_ATTRIBUTE = "_streamsink_sequence"
TRANSACTION_LIMIT = 100


# --- changes ----------------------------------------------------------------------------------------------


def _image(rng: Random, pk: str, sk: str, version: int) -> dict[str, Any]:
    return {
        "pk": {"S": pk},
        "sk": {"S": sk},
        "version": {"N": str(version)},
        "status": {"S": rng.choice(("PENDING", "PAID", "SHIPPED", "DELIVERED"))},
        "amount": {"N": f"{rng.randint(1, 99_999)}.{rng.randint(0, 99):02d}"},
        "payload": {"B": rng.randbytes(48)},
        "tags": {"SS": sorted({rng.choice(("new", "gift", "express", "bulk", "return")) for _ in range(3)})},
        "lines": {"L": [{"M": {"sku": {"S": f"SKU-{rng.randint(0, 10**6):06d}"}, "qty": {"N": "2"}}}]},
        "note": {"S": " ".join(rng.choice(("alpha", "bravo", "charlie", "delta")) for _ in range(12))},
    }


def make_changes(total: int, keys: int) -> tuple[list[ChangeRecord], dict[tuple[str, str], int]]:
    """Seeded INSERT/MODIFY/REMOVE changes in stream order, and each live key's final `version`."""
    rng = Random(SEED)
    sequence = 400_000_000_000_000_000_000  # 21 digits, as DynamoDB starts them
    live: dict[tuple[str, str], int] = {}
    records: list[ChangeRecord] = []
    for index in range(total):
        drawn = rng.randrange(keys)
        key = (f"customer#{drawn % 97:03d}", f"order#{drawn:06d}")
        sequence += rng.randint(1, 10**6)
        version = live.get(key, 0) + 1
        event_name = "INSERT" if key not in live else "REMOVE" if rng.random() < 0.1 else "MODIFY"
        ddb: dict[str, Any] = {
            "ApproximateCreationDateTime": 1_714_567_890 + index // 50,
            "Keys": {"pk": {"S": key[0]}, "sk": {"S": key[1]}},
            "SequenceNumber": str(sequence),
            "SizeBytes": 300,
            "StreamViewType": "NEW_AND_OLD_IMAGES",
        }
        if event_name == "REMOVE":
            del live[key]
        else:
            ddb["NewImage"] = _image(rng, key[0], key[1], version)
            live[key] = version
        raw = {"eventID": f"{index:08d}", "eventName": event_name, "dynamodb": ddb}
        records.append(change_record_from_stream(raw, table="orders", shard_id="shardId-bench"))
    return records, live


def batches_of(records: list[ChangeRecord], size: int) -> list[Batch]:
    return [Batch(tuple(records[i : i + size]), 0) for i in range(0, len(records), size)]


# --- clients ----------------------------------------------------------------------------------------------


class CountingClient:
    """The real client, with a fixed wait before each call (the round trip) and a count of calls made."""

    def __init__(self, client: Any, rtt_seconds: float) -> None:
        self._client = client
        self._rtt = rtt_seconds
        self._lock = threading.Lock()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(**kwargs: Any) -> Any:
            with self._lock:
                self.calls += 1
            if self._rtt:
                time.sleep(self._rtt)
            return method(**kwargs)

        return call


# --- strategies -------------------------------------------------------------------------------------------

Strategy = Callable[[CountingClient, str, list[Batch]], None]


def naive(client: CountingClient, table: str, batches: list[Batch]) -> None:
    for batch in batches:
        for record in batch.records:
            ddb = record.raw["dynamodb"]
            if record.event_name == "REMOVE":
                client.delete_item(TableName=table, Key=ddb["Keys"])
            else:
                client.put_item(TableName=table, Item=ddb["NewImage"])


def per_item(threads: int) -> Strategy:
    """The sink on `threads` lanes of the delivery driver, as the pipeline runs it (one key per lane)."""

    def run(client: CountingClient, table: str, batches: list[Batch]) -> None:
        settings = DynamoDbTableSinkSettings(type="dynamodb_table", table_name=table)
        sink = DynamoDbTableSink(settings, region=REGION, endpoint_url=None, client=client)
        sink.open()
        with tempfile.TemporaryDirectory() as scratch:
            delivery = Delivery(
                [sink],
                retry=RetryPolicy(RetrySettings(max_attempts=1)),
                dead_letters=JsonlDeadLetters(f"{scratch}/dead.jsonl"),
                concurrency=[threads],
            )
            try:
                for batch in batches:
                    delivery.deliver(batch)
                if delivery.stats.dead_lettered:
                    raise RuntimeError(f"per-item x{threads}: {delivery.stats.dead_lettered} record(s) failed")
            finally:
                delivery.stop()
                sink.close()

    return run


def _transact_item(record: ChangeRecord, table: str) -> dict[str, Any]:
    ddb = record.raw["dynamodb"]
    sequence = padded_sequence(record.sequence_number)
    condition = {
        "TableName": table,
        "ConditionExpression": NEWER_WINS_CONDITION,
        "ExpressionAttributeNames": {"#seq": SEQUENCE_ATTRIBUTE},
        "ExpressionAttributeValues": {":seq": {"S": sequence}},
    }
    if record.event_name == "REMOVE":
        return {"Delete": {"Key": ddb["Keys"], **condition}}
    return {"Put": {"Item": {**ddb["NewImage"], SEQUENCE_ATTRIBUTE: {"S": sequence}}, **condition}}


def _chunks(records: tuple[ChangeRecord, ...]) -> Iterator[list[ChangeRecord]]:
    """Up to 100 records, each key at most once, in stream order: a repeated key starts the next call."""
    chunk: list[ChangeRecord] = []
    seen: set[tuple[str, str]] = set()
    for record in records:
        key = (record.keys["pk"], record.keys["sk"])
        if key in seen or len(chunk) == TRANSACTION_LIMIT:
            yield chunk
            chunk, seen = [], set()
        chunk.append(record)
        seen.add(key)
    if chunk:
        yield chunk


def transact(client: CountingClient, table: str, batches: list[Batch]) -> None:
    for batch in batches:
        for chunk in _chunks(batch.records):
            items = [_transact_item(r, table) for r in chunk]
            while items:
                try:
                    client.transact_write_items(TransactItems=items)
                    break
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "TransactionCanceledException":
                        raise
                    reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
                    if any(code not in ("None", "ConditionalCheckFailed") for code in reasons):
                        raise
                    # Items whose condition failed already hold a newer change: taken. Send the rest again.
                    items = [item for item, code in zip(items, reasons, strict=True) if code == "None"]


# --- measuring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    strategy: str
    fresh_per_second: float
    replay_per_second: float
    fresh_calls: int
    replay_calls: int


def _create_table(dynamodb: Any, name: str) -> None:
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
    )


def _versions(dynamodb: Any, table: str) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table):
        for item in page["Items"]:
            found[(item["pk"]["S"], item["sk"]["S"])] = int(item["version"]["N"])
    return found


def measure(
    name: str,
    strategy: Strategy,
    aws: AwsClients,
    batches: list[Batch],
    expected: dict[tuple[str, str], int],
    rtt: float,
) -> Figures:
    dynamodb = aws.client("dynamodb")
    table = f"replica-{name.replace(' ', '-')}-{time.monotonic_ns()}"
    _create_table(dynamodb, table)
    total = sum(len(b) for b in batches)
    seconds: list[float] = []
    calls: list[int] = []
    for _ in ("fresh", "replay"):
        client = CountingClient(dynamodb, rtt)
        started = time.perf_counter()
        strategy(client, table, batches)
        seconds.append(time.perf_counter() - started)
        calls.append(client.calls)
        found = _versions(dynamodb, table)
        if found != expected:
            raise RuntimeError(f"{name}: the table does not hold the final state ({len(found)} items)")
    dynamodb.delete_table(TableName=table)
    return Figures(name, total / seconds[0], total / seconds[1], calls[0], calls[1])


@contextmanager
def moto_server(endpoint_url: str | None) -> Iterator[str]:
    """An existing endpoint, or a moto server of our own in a separate process (its CPU is not ours)."""
    if endpoint_url:
        yield endpoint_url
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:  # werkzeug may still be busy with a request: stop it hard
            server.kill()
            server.wait()


def report(figures: list[Figures], args: argparse.Namespace, live: int, load: tuple[float, float]) -> str:
    naive_rate = next((f.fresh_per_second for f in figures if f.strategy == "naive"), None)
    header = ("strategy", "fresh rec/s", "vs naive", "calls", "replay rec/s", "calls")
    rows = [header]
    for f in figures:
        rows.append(
            (
                f.strategy,
                f"{f.fresh_per_second:,.0f}",
                f"{f.fresh_per_second / naive_rate:.2f}x" if naive_rate else "-",
                f"{f.fresh_calls:,}",
                f"{f.replay_per_second:,.0f}",
                f"{f.replay_calls:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(
        [
            f"{args.records:,} changes over {args.keys:,} keys ({live:,} live at the end), batches of "
            f"{args.batch_size}, round trip added per call: {args.rtt_ms} ms",
            "",
            *lines,
            "",
            "replay: the same batches again; every conditional write finds a newer or equal change "
            "(naive overwrites instead)",
            f"load average before/after: {load[0]:.1f}/{load[1]:.1f} (the moto server and this process share "
            f"the machine's {os.cpu_count()} CPUs with whatever else runs)",
            f"python {platform.python_version()}, {platform.platform()}; "
            f"boto3 {boto3.__version__}, botocore {botocore.__version__}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=600, help="changes written per pass (default 600)")
    parser.add_argument("--keys", type=int, default=600, help="distinct item keys drawn from (default 600)")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per sink write (default 1000)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8], help="per-item pool sizes (1 8)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="wait added before every call (default 0)")
    parser.add_argument("--endpoint-url", help="use this server instead of starting moto")
    args = parser.parse_args(argv)
    if min(args.records, args.keys, args.batch_size, *args.threads) < 1 or args.rtt_ms < 0:
        parser.error("--records, --keys, --batch-size and --threads must be positive, --rtt-ms not negative")

    for name, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    records, live = make_changes(args.records, args.keys)
    batches = batches_of(records, args.batch_size)
    strategies: list[tuple[str, Strategy]] = [("naive", naive)]
    strategies += [(f"per-item x{n}", per_item(n)) for n in args.threads]
    strategies.append(("transact", transact))
    load_before = os.getloadavg()[0]
    with moto_server(args.endpoint_url) as url:
        aws = AwsClients(REGION, url, max_pool_connections=max(args.threads) + 2)
        figures = [measure(name, run, aws, batches, live, args.rtt_ms / 1000) for name, run in strategies]
    print(report(figures, args, len(live), (load_before, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
