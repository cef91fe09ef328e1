"""`streamsink run` with `source.initial_load = "scan"`, killed with SIGKILL at seeded points during the copy while
a writer changes the table: each start resumes the copy from its checkpointed progress (not from the start), and
the result is still exact (the replica equals the source, no deleted item back, every item in the archive).

Resumed, not restarted: the committed copy counts every key at most once, and Scan calls (through a counting
proxy) exceed the committed pages only by those a life read past its last commit.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.state.load_progress import LoadState, LoadStore
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import read_archive, unique, wait_until
from tests.fault_proxy import FaultProxy
from tests.test_crash_safety import StreamsinkProcess, write_config
from tests.test_initial_load import put, raw_replica, scan_all, table_from_archive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("workers"),
]  # not beside the worker tests: both are timing-bound processes

ITEMS = 600
SEGMENTS = 3
PAGE_ITEMS = 20
KILL_AT = (0.0, 0.3, 0.55, 0.75)
"""Fractions of the items committed at which a life is killed; 0: before its first progress is saved."""
SEED = 4242


def load_row(dynamodb: Any, checkpoint_table: str, stream_arn: str) -> LoadState | None:
    partition = CheckpointStore(
        dynamodb,
        table_name=checkpoint_table,
        stream_arn=stream_arn,
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    ).partition
    store = LoadStore(
        dynamodb, table_name=checkpoint_table, partition=partition, retry=RetryPolicy(RetrySettings()), worker="test"
    )
    try:
        return store.read()
    except Exception:
        return None  # the checkpoint table is not there yet


def test_sigkill_during_the_load_resumes_it_and_the_result_is_exact(
    aws: EmbeddedAws, table: str, replica: str, bucket: str, tmp_path: Path
) -> None:
    dynamodb = aws.client("dynamodb")
    keys = [f"k{n:04d}" for n in range(ITEMS)]
    for n, key in enumerate(keys):
        put(dynamodb, table, key, n)
    stream_arn = dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    checkpoint_table = unique("checkpoints")
    rng = random.Random(SEED)
    stop_writing = threading.Event()
    writes = {"ops": 0}

    def writer() -> None:
        client = aws.client("dynamodb")
        while not stop_writing.is_set():
            key = rng.choice(keys)
            if rng.random() < 0.3:
                client.delete_item(TableName=table, Key={"pk": {"S": key}, "sk": {"S": "a"}})
            else:
                put(client, table, key, 10_000 + writes["ops"])
            writes["ops"] += 1
            stop_writing.wait(0.01)

    with FaultProxy(aws.endpoint_url) as proxy:
        config = write_config(
            tmp_path / "load.toml",
            {
                "source": {
                    "table_name": table,
                    "region": aws.region,
                    "endpoint_url": proxy.endpoint_url,
                    "initial_load": "scan",
                    "starting_position": "LATEST",
                },
                # 0.5 units a page (moto's figure): 6 pages a second, so that a kill lands mid-copy.
                "initial_load": {"segments": SEGMENTS, "page_items": PAGE_ITEMS, "read_units_per_second": 3.0},
                "checkpoint": {"table_name": checkpoint_table},
                "lease": {"failover_seconds": 3},
                "batch": {"max_records": 20, "max_wait_seconds": 0.1, "queue_capacity": 60},
                "delivery": {"max_records_in_flight": 40},
                "reader": {
                    "idle_poll_min_seconds": 0.05,
                    "idle_poll_max_seconds": 0.2,
                    "discovery_interval_seconds": 0.5,
                },
                "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.2},
                "dead_letter": {"path": str(tmp_path / "dead-letters.jsonl"), "on_failure": "block"},
                "runtime": {"shutdown_timeout_seconds": 20.0, "log_format": "text"},
                "sinks": [
                    {"type": "dynamodb_table", "table_name": replica, "endpoint_url": aws.endpoint_url},
                    {
                        "type": "s3_parquet",
                        "bucket": bucket,
                        "prefix": "orders/",
                        "buffer_max_seconds": 0.3,
                        "endpoint_url": aws.endpoint_url,
                    },
                ],
            },
        )
        writing = threading.Thread(target=writer, daemon=True)
        writing.start()
        pages_at_kill: list[int] = []
        for fraction in KILL_AT:
            life = len(pages_at_kill)
            run = StreamsinkProcess(config, tmp_path / f"life-{life}.log")
            if fraction == 0.0:
                wait_until(lambda: load_row(dynamodb, checkpoint_table, stream_arn) is not None, what="the load row")
            else:
                wait_until(
                    lambda: (
                        (row := load_row(dynamodb, checkpoint_table, stream_arn)) is not None
                        and row.items >= fraction * ITEMS  # noqa: B023 - called before the loop moves on
                    ),
                    timeout=60,
                    what=f"{fraction:.0%} of the items committed",
                )
            before = load_row(dynamodb, checkpoint_table, stream_arn)
            run.kill()
            after = load_row(dynamodb, checkpoint_table, stream_arn)
            assert before is not None and after is not None and after.phase == "loading", "killed too late"
            if pages_at_kill and pages_at_kill[-1]:  # the life before left progress: this one went on from it
                assert "resumes" in run.output(), run.output()
            pages_at_kill.append(sum(p.next_page for p in after.progress.values()))
        last = StreamsinkProcess(config, tmp_path / "last.log")
        wait_until(
            lambda: (row := load_row(dynamodb, checkpoint_table, stream_arn)) is not None and row.phase == "done",
            timeout=90,
            what="the load to be done",
        )
        stop_writing.set()
        writing.join()
        source = scan_all(dynamodb, table)
        wait_until(lambda: scan_all(dynamodb, replica) == source, timeout=30, what="the replica to equal the source")
        code, _ = last.terminate(timeout=30)
        assert code == 0, last.output()
        scans = proxy.count("DynamoDB_20120810.Scan")

    done = load_row(dynamodb, checkpoint_table, stream_arn)
    assert done is not None
    total_pages = sum(p.next_page for p in done.progress.values())
    # The writer only ever uses the ITEMS keys, and one pass over a segment reads an item at most once: resumed,
    # the committed copy counts each key at most once; afresh at every start it would count the pages before
    # every kill again (about 1.6 x ITEMS with these kills).
    assert done.items <= ITEMS, (done.items, pages_at_kill)
    assert total_pages <= ITEMS // PAGE_ITEMS + 2 * SEGMENTS, (total_pages, pages_at_kill)
    # Calls beyond the committed pages: only those read past a life's last commit are read again.
    repeated = scans - total_pages
    assert repeated <= len(KILL_AT) * SEGMENTS * 4, (scans, total_pages, pages_at_kill)
    assert not [i for i in raw_replica(dynamodb, replica) if "_streamsink_deleted" in i], "tombstones left"
    assert writes["ops"] > 100
    # "The table as the load read it, plus every change since" (the README's query) is the table.
    assert table_from_archive(read_archive(aws, bucket).to_pylist()) == source
