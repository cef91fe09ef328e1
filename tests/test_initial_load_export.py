"""`source.initial_load = "export"` on the simulated stream: the pipeline starts an export of the table, reads it
from S3 (moto) while a writer puts, updates and deletes the same keys and a shard splits, and the replica ends
equal to the table, no deleted item back; the archive holds one SNAPSHOT row per exported item and every change.

moto accepts ExportTableToPointInTime but writes no manifests, so "the service" here is a hook on the pipeline's
own client: when its ExportTableToPointInTime call returns, the hook writes DynamoDB's documented export layout of
the simulated table as it is at that moment (tests/export_layout.py), as DynamoDB would write it later. Each
data file answers 0.3 s late, so the writer's changes to exported items reach the sinks before their copies do.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.runner import Pipeline
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from pipeline.testing.simulated_stream import SimulatedStream, StreamSimulator
from tests.conftest import read_archive, unique, wait_until
from tests.export_layout import write_export
from tests.test_initial_load import load_phase, raw_replica, scan_all, table_from_archive

KEYS = [f"k{n:03d}" for n in range(200)]


def item(key: str, version: int) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}, "body": {"S": "y" * 30}}


@pytest.fixture
def simulator() -> StreamSimulator:
    return StreamSimulator(rollover_seconds=None)


@pytest.fixture
def export_pipeline(
    on_simulator: Callable[..., Pipeline], replica: str, bucket: str
) -> Callable[[SimulatedStream, str], Pipeline]:
    def build(stream: SimulatedStream, export_bucket: str) -> Pipeline:
        return on_simulator(
            stream,
            source={"initial_load": "export"},
            initial_load={"segments": 3, "export_bucket": export_bucket, "export_poll_seconds": 0.2},
            lease={"failover_seconds": 3},
            sinks=[
                {"type": "dynamodb_table", "table_name": replica},
                {"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.5},
            ],
        )

    return build


def test_export_load_with_a_writer_and_a_split_leaves_the_replica_equal_to_the_table(
    aws: EmbeddedAws,
    dynamodb: Any,
    s3: Any,
    simulator: StreamSimulator,
    replica: str,
    bucket: str,
    export_pipeline: Callable[[SimulatedStream, str], Pipeline],
) -> None:
    name = unique("exported")
    create_stream_table(dynamodb, name)  # moto's table of the same name: the export call and the key schema
    dynamodb.update_continuous_backups(
        TableName=name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
    )
    stream = simulator.create_stream(name, shards=2)
    for n, key in enumerate(KEYS):
        stream.put_item(item(key, n))
    export_bucket = unique("exports")
    s3.create_bucket(Bucket=export_bucket)
    exported: list[int] = []

    def export_written(parsed: Any = None, **_kwargs: Any) -> None:
        """What DynamoDB does for the call: the table as of now, in the documented layout."""
        arn = parsed["ExportDescription"]["ExportArn"]
        items = stream.items()
        write_export(
            s3, export_bucket, "streamsink-exports/", items, files=6, export_time=simulator.clock.now(), export_arn=arn
        )
        exported.append(len(items))

    def late(**_kwargs: Any) -> None:
        threading.Event().wait(0.3)

    pipeline = export_pipeline(stream, export_bucket)
    events = pipeline.clients.client("dynamodb").meta.events
    events.register("after-call.dynamodb.ExportTableToPointInTime", export_written)
    pipeline.clients.client("s3", endpoint_url=aws.endpoint_url).meta.events.register("after-call.s3.GetObject", late)

    rng = random.Random(11)
    stop = threading.Event()
    ops = {"n": 0, "deletes": 0}

    def writer() -> None:
        while not stop.is_set():
            key = rng.choice(KEYS)
            if rng.random() < 0.35:
                stream.delete_item({"pk": {"S": key}, "sk": {"S": "a"}})
                ops["deletes"] += 1
            else:
                stream.put_item(item(key, 1000 + ops["n"]))
            ops["n"] += 1
            if ops["n"] == 150:
                stream.split_shard()
            stop.wait(0.004)

    writing = threading.Thread(target=writer, daemon=True)
    pipeline.start()
    writing.start()
    wait_until(lambda: load_phase(pipeline) in ("finished", "done"), timeout=60, what="the copy to finish")
    stop.set()
    writing.join()
    wait_until(lambda: load_phase(pipeline) == "done", timeout=30, what="the clean-up")
    table = {i["pk"]["S"]: i for i in stream.items()}
    wait_until(lambda: scan_all(dynamodb, replica) == table, timeout=30, what="the replica to equal the table")
    assert exported and ops["deletes"] > 20, (exported, ops)
    assert not [i for i in raw_replica(dynamodb, replica) if "_streamsink_deleted" in i], "tombstones left"
    state = pipeline.initial_load.state if pipeline.initial_load else None
    assert state is not None and state.mode == "export" and state.export_arn
    pipeline.stop()
    archive = read_archive(aws, bucket).to_pylist()
    snapshot_keys = [row["keys"] for row in archive if row["event_name"] == "SNAPSHOT"]
    assert len(snapshot_keys) == len(set(snapshot_keys)) == exported[0]
    assert table_from_archive(archive) == table
