"""Adversarial review of the initial load (branch review-load): each test shows one broken promise."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import wait_until
from tests.test_initial_load import INTERNAL, put, raw_replica, scan_all

KEYS = [f"k{n:03d}" for n in range(60)]


def load_phase(pipeline: Pipeline) -> str | None:
    load = pipeline.initial_load
    return None if load is None or load.state is None else load.state.phase


@pytest.fixture
def load_settings(make_settings: Callable[..., Settings], replica: str) -> Callable[..., Settings]:
    def build(*, initial_load: dict[str, Any] | None = None, **sections: Any) -> Settings:
        return make_settings(
            source={"initial_load": "scan", "starting_position": "LATEST"},
            initial_load={"segments": 2, "page_items": 10, **(initial_load or {})},
            lease={"failover_seconds": 2},
            sinks=[{"type": "dynamodb_table", "table_name": replica}],
            **sections,
        )

    return build


def test_a_failed_finish_write_leaves_the_load_loading_forever_after_a_restart(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """The last segment's progress is saved (every segment `done`), then the `finished` write fails (its retries
    run out on a network error; a SIGKILL at that point is the same). The next start takes the load over, finds no
    segment left to copy, starts no segment thread, and nothing ever calls `commit` again: the load stays
    `loading` for ever, the replica keeps tombstones and writes the load attribute for ever, no clean-up."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings()
    first = Pipeline(settings)
    failing = threading.Event()
    failing.set()

    def refuse_finish(params: dict[str, Any], **_: Any) -> None:
        if failing.is_set() and ":finished" in params.get("ExpressionAttributeValues", {}):
            raise EndpointConnectionError(endpoint_url="http://checkpoints")

    first.clients.client("dynamodb").meta.events.register("before-parameter-build.dynamodb.UpdateItem", refuse_finish)
    started(first)
    wait_until(lambda: first.fatal is not None, timeout=30, what="the finish write to fail")
    first.stop(timeout=5)
    assert load_phase(first) == "loading"
    assert first.initial_load is not None and all(p.done for p in first.initial_load.store.read().progress.values())

    second = started(Pipeline(settings))  # the restart: the network is back
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": KEYS[0]}, "sk": {"S": "a"}})
    wait_until(lambda: load_phase(second) == "done", timeout=20, what="the restarted worker to finish the load")
    source = scan_all(dynamodb, table)
    wait_until(lambda: scan_all(dynamodb, replica) == source, timeout=20, what="the replica to equal the source")
    assert not [i for i in raw_replica(dynamodb, replica) if INTERNAL[2] in i], "tombstones left"


def test_a_worker_that_lost_the_load_keeps_copying_and_its_late_copy_brings_a_deleted_item_back(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """Worker A copies; its heartbeat writes fail (a throttled or unreachable checkpoint row, a stalled thread)
    while the rest of it works. B takes A's shards and the load over after the failover time (as it should), copies
    the rest, finishes, cleans up and marks the load `done`. But losing the load only makes A's progress writes
    fail (LoadLostError is logged): A's segment threads go on reading the whole table into A's sinks. Once A has
    seen `done` it left load mode, so its copies are written on SNAPSHOT_CONDITION against items that carry no
    load id any more: a copy read before a delete, delivered after it, re-creates the deleted item; one read before
    an update overwrites it. The replica no longer equals the table, and nothing will ever correct it."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings(initial_load={"page_items": 5})
    a = Pipeline(settings)
    beats_fail = threading.Event()

    def no_heartbeat(params: dict[str, Any], **_: Any) -> None:
        if beats_fail.is_set() and "beat" in params.get("Item", {}):
            raise EndpointConnectionError(endpoint_url="http://checkpoints")

    test_client = aws.client("dynamodb")
    damaged: dict[str, str] = {}
    one_at_a_time = threading.Lock()

    def slow_scan_then_change(parsed: dict[str, Any], **_: Any) -> None:
        """A's Scan answers take 1.5 s to arrive (a slow network); once the load is done, the first item of one
        answer is deleted, and one of another is updated, while the answer is on its way."""
        threading.Event().wait(1.5)
        items = parsed.get("Items", [])
        with one_at_a_time:
            if items and load_phase(a) == "done" and len(damaged) < 2:
                change(items[0])

    def change(item: dict[str, Any]) -> None:
        items = [item]
        key = {"pk": items[0]["pk"], "sk": items[0]["sk"]}
        if not damaged:
            test_client.delete_item(TableName=table, Key=key)
            damaged[items[0]["pk"]["S"]] = "deleted"
            wait_until(lambda: "Item" not in test_client.get_item(TableName=replica, Key=key), timeout=10)
        else:
            put(test_client, table, items[0]["pk"]["S"], 99999)
            damaged[items[0]["pk"]["S"]] = "updated"
            wait_until(
                lambda: test_client.get_item(TableName=replica, Key=key).get("Item", {}).get("version")
                == {"N": "99999"},
                timeout=10,
            )

    a_client = a.clients.client("dynamodb")
    a_client.meta.events.register("before-parameter-build.dynamodb.PutItem", no_heartbeat)
    a_client.meta.events.register("after-call.dynamodb.Scan", slow_scan_then_change)
    started(a)
    assert a.initial_load is not None and a.initial_load.store.holding
    beats_fail.set()
    b = started(Pipeline(settings))
    wait_until(lambda: load_phase(b) == "done", timeout=30, what="B to take the load over and finish it")
    wait_until(lambda: len(damaged) == 2, timeout=30, what="A to read on after the load was done")
    threading.Event().wait(3.0)  # A's last answers arrive and are written
    source = scan_all(dynamodb, table)
    replica_now = scan_all(dynamodb, replica)
    wrong = {k: (source.get(k), replica_now.get(k)) for k in damaged if source.get(k) != replica_now.get(k)}
    assert not wrong, f"the replica differs from the source after the load was done: {damaged} -> {wrong}"


def test_a_pipeline_filter_on_event_names_drops_the_whole_copy_silently_and_the_load_is_done(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """`[filter] event_names = ["INSERT", "MODIFY", "REMOVE"]` (every change: a config written before SNAPSHOT
    existed) now drops every copied item before any sink, yet the load commits its pages, logs "N item(s)
    delivered to every sink" and ends `done`: the replica holds none of the table, and no error says why."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings(filter={"event_names": ["INSERT", "MODIFY", "REMOVE"]})
    pipeline = started(Pipeline(settings))
    wait_until(lambda: load_phase(pipeline) == "done" or pipeline.fatal is not None, timeout=20, what="the load")
    assert pipeline.fatal is not None or scan_all(dynamodb, replica) == scan_all(dynamodb, table), (
        f"load {load_phase(pipeline)}, replica holds {len(scan_all(dynamodb, replica))} of {len(KEYS)} items"
    )


def test_a_stale_replica_item_the_source_no_longer_has_is_left_after_the_load(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """The replica was filled before (an earlier pipeline, a restore); since then an item was deleted from the
    source while nothing replicated. The copy overwrites stale items it reads, but one it never reads stays: after
    the load is done and the stream drained the replica is not equal to the source (the README: "the result
    equals the table")."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    put(dynamodb, replica, "gone-from-source", 1)
    pipeline = started(Pipeline(load_settings()))
    wait_until(lambda: load_phase(pipeline) == "done", timeout=20, what="the load")
    assert scan_all(dynamodb, replica) == scan_all(dynamodb, table)



def test_a_throttled_scan_stops_the_pipeline_instead_of_pausing_the_copy(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """table_loader.py promises "An outage of the table slows the copy; it never stops the pipeline" (pause 30 s,
    go on from the last page). But TableScanSource.pages wraps every ClientError left after its retries, throttling
    and 5xx included, in SnapshotSourceError, which `is_retryable` says is not: the loader reports it and the
    whole pipeline stops with "Scan ... refused: ProvisionedThroughputExceededException"."""
    from botocore.exceptions import ClientError

    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    pipeline = Pipeline(load_settings())
    throttled = threading.Event()
    throttled.set()

    def throttle(**_: Any) -> None:
        if throttled.is_set():
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}}, "Scan"
            )

    pipeline.clients.client("dynamodb").meta.events.register("before-parameter-build.dynamodb.Scan", throttle)
    started(pipeline)
    threading.Event().wait(2.0)  # a short burst of throttling, longer than the retries' few tenths of a second
    throttled.clear()
    assert pipeline.fatal is None, f"the pipeline stopped on a throttled Scan: {pipeline.fatal}"
