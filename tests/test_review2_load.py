"""Review 2: breaks of the initial load's promises found after 529e829 (each test fails on HEAD 64798a5)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pipeline.records import Batch
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from sinks.base import WriteResult
from sinks.memory import MemorySink
from tests.conftest import wait_until
from tests.test_initial_load import put


class HeldSink(MemorySink):
    """Takes records like MemorySink, but its first write of SNAPSHOT records waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__("held")
        self.holding = threading.Event()
        self.release = threading.Event()
        self._held_once = False

    def write(self, batch: Batch) -> WriteResult:
        if not self._held_once and any(r.load_id is not None for r in batch.records):
            self._held_once = True
            self.holding.set()
            self.release.wait(20)
        return super().write(batch)


def test_a_worker_that_lost_the_load_delivers_no_copy_of_a_page_spanning_several_batches(
    dynamodb: Any,
    table: str,
    make_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """README (Several workers): "A worker whose progress write is refused (another took the load over) stops
    copying and delivers none of the copies it still holds". The runner drops the copies of a lost load only in
    batches that carry `load_pages` (runner.py `_deliver_loop`: `item.load_pages and not load.copying`), but only
    the batch holding a page's *last* item has load_pages (batcher.py `_add_snapshot`). A Scan page larger than
    `batch.max_records` spans several batches: all but the last of them go to the sinks after the load is lost.
    (In the replica such a late copy overwrites a change once the new holder finished: the stream's writes no longer
    carry the load attribute, so SNAPSHOT_CONDITION holds.)"""
    for n in range(10):
        put(dynamodb, table, f"k{n:03d}", n)
    settings = make_settings(
        source={"initial_load": "scan", "starting_position": "LATEST"},
        initial_load={"segments": 1, "page_items": 10},
        batch={"max_records": 2},
        delivery={"max_records_in_flight": 2},
        lease={"failover_seconds": 2},
    )
    sink = HeldSink()
    a = Pipeline(settings, sinks=[sink])
    started(a)
    load = a.initial_load
    assert load is not None
    wait_until(sink.holding.is_set, timeout=20, what="the first batch of copies to reach the sink")

    # Another worker ("ghost", live) takes the load over, as B does when A's heartbeat stalls.
    a.leases.is_live = lambda worker, at=None: True  # type: ignore[method-assign]
    row = load.store.read()
    assert row is not None
    dynamodb.update_item(
        TableName=settings.checkpoint.table_name,
        Key=load.store._key(),
        UpdateExpression="SET #owner = :ghost, lease_epoch = :new",
        ExpressionAttributeNames={"#owner": "owner"},
        ExpressionAttributeValues={":ghost": {"S": "ghost"}, ":new": {"N": str(row.lease_epoch + 1)}},
    )
    load.load_pass()  # A reads the row: it lost the load
    assert not load.copying
    lost_at = len(sink.records)

    sink.release.set()
    threading.Event().wait(2.0)  # every batch A still had closes and is submitted
    late = [r.event_id for r in sink.records[lost_at:] if r.load_id is not None]
    # The first batch (2 copies) was submitted before the loss: the remaining 8 copies of the page must be dropped.
    late = [e for e in late if not e.endswith(("0000000", "0000001"))]
    assert not late, f"A delivered {len(late)} copies after it lost the load: {late}"


def test_a_dropped_last_page_committed_after_the_load_is_taken_back_finishes_it_while_the_copy_runs(
    aws: Any,
    dynamodb: Any,
    table: str,
    replica: str,
    make_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """A loses the load while the batch holding its segment's last page is still queued: the runner drops its
    copies, but submits the batch with its `load_pages` (runner.py `_deliver_loop`), so once it is done they reach
    `_Uncommitted.add` and `InitialLoadRun.commit`. If A holds the load again by then (the other worker stopped or
    died, A took it back and started copying again from the committed progress), `commit` saves the dropped page
    as committed, the segment `done`, and finishes the load while the new copy's pages are still on their way; the
    replica, out of load mode, then refuses those copies (`_planned`: load_id != _loading). Items missing for good
    (README: "nothing lost")."""
    from sinks.registry import build_sink

    for n in range(10):
        put(dynamodb, table, f"k{n:03d}", n)
    settings = make_settings(
        source={"initial_load": "scan", "starting_position": "LATEST"},
        initial_load={"segments": 1, "page_items": 20},
        batch={"max_records": 2},
        delivery={"max_records_in_flight": 2},
        lease={"failover_seconds": 2},
        sinks=[{"type": "dynamodb_table", "table_name": replica}],
    )
    held = HeldSink()
    second_hold = threading.Event()
    second_held = threading.Event()
    base_write = held.write

    def write(batch: Batch) -> WriteResult:
        # The batch of copies 6 and 7 also waits: the dropped batch after it cannot commit before it.
        if any(r.event_id.endswith("0000006") for r in batch.records):
            second_held.set()
            second_hold.wait(20)
        return base_write(batch)

    held.write = write  # type: ignore[method-assign]
    a = Pipeline(settings, sinks=[build_sink(settings.sinks[0], region=aws.region, endpoint_url=aws.endpoint_url), held])
    slow = threading.Event()

    def slow_scan(**_: Any) -> None:
        if slow.is_set():
            threading.Event().wait(3.0)

    a.clients.scan_client().meta.events.register("before-call.dynamodb.Scan", slow_scan)
    started(a)
    load = a.initial_load
    assert load is not None
    wait_until(held.holding.is_set, timeout=20, what="the first batch of copies to reach the sink")

    ghost_live = threading.Event()
    ghost_live.set()
    real_is_live = a.leases.is_live
    a.leases.is_live = lambda worker, at=None: ghost_live.is_set() or real_is_live(worker, at)  # type: ignore[method-assign]
    row = load.store.read()
    assert row is not None
    dynamodb.update_item(
        TableName=settings.checkpoint.table_name,
        Key=load.store._key(),
        UpdateExpression="SET #owner = :ghost, lease_epoch = :new",
        ExpressionAttributeNames={"#owner": "owner"},
        ExpressionAttributeValues={":ghost": {"S": "ghost"}, ":new": {"N": str(row.lease_epoch + 1)}},
    )
    load.load_pass()
    assert not load.copying
    held.release.set()
    wait_until(second_held.is_set, timeout=10, what="the batch of copies 6 and 7")
    threading.Event().wait(1.0)  # the batch of copies 8 and 9 is closed and submitted (its copies dropped)
    # The ghost stops before committing anything: A takes the load back and copies again (its Scan now slow).
    slow.set()
    ghost_live.clear()
    dynamodb.update_item(  # the ghost stops: it releases the load, and A takes it at once
        TableName=settings.checkpoint.table_name,
        Key=load.store._key(),
        UpdateExpression="REMOVE #owner SET lease_epoch = :new",
        ExpressionAttributeNames={"#owner": "owner"},
        ExpressionAttributeValues={":new": {"N": str(row.lease_epoch + 2)}},
    )
    load.load_pass()
    assert load.copying
    second_hold.set()
    wait_until(lambda: load.state is not None and load.state.phase != "loading", timeout=30, what="the finish")
    threading.Event().wait(5.0)  # the new copy's pages arrive
    got = {i["pk"]["S"] for i in dynamodb.scan(TableName=replica, ConsistentRead=True)["Items"]}
    missing = sorted({f"k{n:03d}" for n in range(10)} - got)
    assert not missing, f"items never copied to the replica: {missing}"
