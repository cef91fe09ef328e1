"""`source.initial_load = "scan"` against moto: the table's existing items and every change made during the copy
meet so that the replica equals the source exactly, no deleted item comes back, and the archive holds one
SNAPSHOT row per item read plus every change.

A writer puts, updates and deletes the same keys while the copy runs (pages of 10 items over four segments, so the
copy takes many round trips and the writer's changes land between them).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipeline.ops.status import collect_status, status_document, summary_text
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import read_archive, wait_until

KEYS = [f"k{n:03d}" for n in range(240)]
INTERNAL = ("_streamsink_sequence", "_streamsink_load", "_streamsink_deleted")


def put(dynamodb: Any, table: str, key: str, version: int) -> None:
    dynamodb.put_item(
        TableName=table,
        Item={"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}, "body": {"S": "x" * 40}},
    )


def scan_all(dynamodb: Any, table: str) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    request: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = dynamodb.scan(**request)
        for item in page["Items"]:
            items[item["pk"]["S"]] = {k: v for k, v in item.items() if k not in INTERNAL}
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def raw_replica(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    return [item for page in dynamodb.get_paginator("scan").paginate(TableName=table) for item in page["Items"]]


def table_from_archive(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The README's query in Python: per item, its last change in stream order, else its copy; REMOVE: gone."""
    latest: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
    for row in rows:
        keys = json.loads(row["keys"])
        key = keys["pk"]["S"]
        snapshot = row["event_name"] == "SNAPSHOT"
        order = (0, 0) if snapshot else (1, int(row["sequence_number"]))
        if key not in latest or order >= latest[key][0]:
            latest[key] = (order, row)
    table: dict[str, dict[str, Any]] = {}
    for key, (_, row) in latest.items():
        if row["event_name"] != "REMOVE":
            table[key] = json.loads(row["new_image"])
    return table


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_query() -> str:
    """The README's DuckDB query for "the table as the load read it, plus every change since", as written there."""
    text = README.read_text()
    start = text.index("```sql\n-- The table as the initial load read it")
    return text[start + len("```sql\n") : text.index("```", start + 6)]


def table_by_duckdb(s3: Any, bucket: str, prefix: str, where: Path) -> dict[str, dict[str, Any]]:
    """The README's query, run by DuckDB over the archive's objects (copied to `where`: DuckDB's S3 support is an
    extension it would download)."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            target = where / entry["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read())
    query = readme_query().replace("s3://BUCKET/PREFIX", f"{where / prefix}/")
    rows = duckdb.sql(query).fetchall()
    return {json.loads(keys)["pk"]["S"]: json.loads(image) for keys, image in rows}


class Writer(threading.Thread):
    """Seeded puts, updates and deletes of KEYS until told to stop."""

    def __init__(self, dynamodb: Any, table: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.dynamodb, self.table = dynamodb, table
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.ops = 0
        self.deletes = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            key = self.random.choice(KEYS)
            if self.random.random() < 0.35:
                self.dynamodb.delete_item(TableName=self.table, Key={"pk": {"S": key}, "sk": {"S": "a"}})
                self.deletes += 1
            else:
                put(self.dynamodb, self.table, key, 1000 + self.ops)
            self.ops += 1
            self.stop_event.wait(0.005)


def late_answers(pipeline: Pipeline, seconds: float = 0.3) -> None:
    """Every Scan answer reaches the pipeline `seconds` after the table read it (a slow network, a busy client):
    the writer's changes to the items of a page are made, and streamed, before the page is delivered."""

    def late(**_kwargs: Any) -> None:
        threading.Event().wait(seconds)

    pipeline.clients.scan_client().meta.events.register("after-call.dynamodb.Scan", late)


def load_phase(pipeline: Pipeline) -> str | None:
    load = pipeline.initial_load
    return None if load is None or load.state is None else load.state.phase


@pytest.fixture
def load_settings(make_settings: Callable[..., Settings], replica: str, bucket: str) -> Callable[..., Settings]:
    def build(**extra: Any) -> Settings:
        return make_settings(
            source={"initial_load": "scan", "starting_position": "LATEST"},
            initial_load={"segments": 4, "page_items": 10, "read_units_per_second": 4.0, **extra},
            lease={"failover_seconds": 3},
            sinks=[
                {"type": "dynamodb_table", "table_name": replica},
                {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.5},
                {"type": "sqs", "name": "queue", "queue_url": "unused"},
            ][:2],
        )

    return build


def test_scan_load_with_a_writer_leaves_the_replica_equal_to_the_source(
    tmp_path: Path,
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    replica: str,
    bucket: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings()
    pipeline = Pipeline(settings)
    late_answers(pipeline)
    writer = Writer(aws.client("dynamodb"), table, seed=7)
    started(pipeline)
    writer.start()
    wait_until(lambda: load_phase(pipeline) in ("finished", "done"), timeout=60, what="the copy to finish")
    writer.stop_event.set()
    writer.join()
    wait_until(lambda: load_phase(pipeline) == "done", timeout=30, what="the tombstones' clean-up")
    source = scan_all(dynamodb, table)
    wait_until(lambda: scan_all(dynamodb, replica) == source, timeout=30, what="the replica to equal the source")
    assert writer.deletes > 10 and writer.ops > 50, "the writer changed too little to test anything"
    assert not [i for i in raw_replica(dynamodb, replica) if "_streamsink_deleted" in i], "tombstones left"

    pipeline.stop()
    report = pipeline.initial_load.report() if pipeline.initial_load else None
    assert report is not None and report.phase == "done"
    archive = read_archive(aws, bucket).to_pylist()
    snapshots = [row for row in archive if row["event_name"] == "SNAPSHOT"]
    assert {row["snapshot"] for row in snapshots} == {report.load_id}
    # One row per item read: no item twice (no crash here), as many as the copy delivered.
    keys_read = [row["keys"] for row in snapshots]
    assert len(keys_read) == len(set(keys_read)) == report.items
    assert any(row["event_name"] == "REMOVE" for row in archive), "the writer's deletes reached the archive"
    assert table_from_archive(archive) == source
    assert table_by_duckdb(aws.client("s3"), bucket, "orders/", tmp_path / "archive") == source


def test_a_second_worker_takes_the_load_over_when_the_first_stops_and_status_shows_it(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """Two workers of one consumer: one copies; when it stops mid-copy (releasing the load), the other goes on
    from the committed progress; the clean-up waits for both workers, and `status` shows the load as it goes."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings(read_units_per_second=2.0)
    first = started(Pipeline(settings))
    second = started(Pipeline(settings))
    copying = [p for p in (first, second) if p.initial_load is not None and p.initial_load.store.holding]
    assert len(copying) == 1, "exactly one worker holds the load"
    holder = copying[0]
    other = second if holder is first else first
    wait_until(lambda: (holder.initial_load.report().items if holder.initial_load else 0) >= 40, what="some progress")
    status = collect_status(settings)
    assert status.initial_load is not None and status.initial_load.phase == "loading"
    assert status.initial_load.owner == holder.worker_id
    assert "initial load load-" in summary_text(status) and "(scan): loading" in summary_text(status)
    assert holder.stop() is True
    done_before = collect_status(settings).initial_load
    # Released at the stop: free, or already taken by the other worker (it looks at once).
    assert done_before is not None and done_before.owner in (None, other.worker_id)
    assert 0 < done_before.items < len(KEYS)
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": KEYS[-1]}, "sk": {"S": "a"}})  # a tombstone to clean up
    wait_until(lambda: load_phase(other) == "done", timeout=60, what="the other worker to finish the load")
    source = scan_all(dynamodb, table)
    wait_until(lambda: scan_all(dynamodb, replica) == source, timeout=30, what="the replica to equal the source")
    assert not [i for i in raw_replica(dynamodb, replica) if "_streamsink_deleted" in i], "tombstones left"
    document = status_document(collect_status(settings))
    assert document["initial_load"]["phase"] == "done"
    # Resumed: the first worker's pages are not read again (the deleted item is counted if it was read before).
    assert len(KEYS) - 1 <= document["initial_load"]["items"] <= len(KEYS)
