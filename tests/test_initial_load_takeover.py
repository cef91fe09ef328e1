"""A worker that loses the initial load while its copies are still queued, and takes it back: none of the old
hold's copies reaches a sink after the loss, and none of its pages moves the new hold's progress (each test failed
before its fix)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pipeline.initial_load as initial_load_module
from pipeline.records import Batch
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.source.table_loader import TableLoader
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


def ghost_holds(pipeline: Pipeline, dynamodb: Any, *, taken: bool) -> None:
    """Another worker, "ghost" (live), takes the load (`taken`) or releases it, as a peer does when this worker's
    heartbeat stalls or when it stops; then this worker's pass reads the row (it lost the load, or takes it back)."""
    load = pipeline.initial_load
    assert load is not None
    pipeline.leases.is_live = lambda worker, at=None: True  # type: ignore[method-assign]
    row = load.store.read()
    assert row is not None
    epoch = {":new": {"N": str(row.lease_epoch + 1)}}
    dynamodb.update_item(
        TableName=pipeline.settings.checkpoint.table_name,
        Key=load.store._key(),
        UpdateExpression="SET #owner = :ghost, lease_epoch = :new" if taken else "REMOVE #owner SET lease_epoch = :new",
        ExpressionAttributeNames={"#owner": "owner"},
        ExpressionAttributeValues={":ghost": {"S": "ghost"}, **epoch} if taken else epoch,
    )
    load.load_pass()


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

    ghost_holds(a, dynamodb, taken=True)  # A reads the row: it lost the load
    assert not load.copying
    lost_at = len(sink.records)

    sink.release.set()
    threading.Event().wait(2.0)  # every batch A still had closes and is submitted
    late = [r.event_id for r in sink.records[lost_at:] if r.load_id is not None]
    # The first batch (2 copies) was submitted before the loss: the remaining 8 copies of the page must be dropped.
    late = [e for e in late if not e.endswith(("0000000", "0000001"))]
    assert not late, f"A delivered {len(late)} copies after it lost the load: {late}"


def test_pages_read_under_a_lost_hold_commit_nothing_after_the_load_is_taken_back(
    aws: Any,
    dynamodb: Any,
    table: str,
    replica: str,
    make_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """A loses the load, then takes it back and copies again from the committed progress. A batch of the first
    hold (its segment's last page: resume None) that completes only now must move nothing: before pages carried
    their hold, `commit` saved it as the segment done and finished the load while the new copy's pages were on their
    way; the replica, out of load mode, then refused those copies, and items were missing for good."""
    for n in range(10):
        put(dynamodb, table, f"k{n:03d}", n)
    settings = make_settings(
        source={"initial_load": "scan", "starting_position": "LATEST"},
        initial_load={"segments": 1, "page_items": 20},
        lease={"failover_seconds": 2},
        sinks=[{"type": "dynamodb_table", "table_name": replica}],
    )
    a = Pipeline(settings)
    slow = threading.Event()
    slow.set()

    def slow_scan(**_: Any) -> None:
        if slow.is_set():
            threading.Event().wait(3.0)

    a.clients.scan_client().meta.events.register("before-call.dynamodb.Scan", slow_scan)
    started(a)
    load = a.initial_load
    assert load is not None and load.copying
    first_hold = load.store.epoch
    assert first_hold is not None
    ghost_holds(a, dynamodb, taken=True)  # A loses the load
    ghost_holds(a, dynamodb, taken=False)  # and takes it back
    assert load.copying and load.store.epoch not in (None, first_hold)
    # The first hold's last page, done by every sink only now:
    assert load.commit({0: (None, 1, 10, first_hold)}) is False
    row = load.store.read()
    assert row is not None and row.phase == "loading" and not row.progress[0].done
    slow.clear()
    wait_until(lambda: load.state is not None and load.state.phase == "done", timeout=40, what="the load")
    got = {i["pk"]["S"] for i in dynamodb.scan(TableName=replica, ConsistentRead=True)["Items"]}
    assert got == {f"k{n:03d}" for n in range(10)}


def test_a_retake_while_the_copy_thread_builds_its_loader_still_copies_the_table(
    dynamodb: Any,
    table: str,
    make_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
    monkeypatch: Any,
) -> None:
    """initial_load.py `_copy` reads the row and the hold (E1), passes its check, builds and starts the loader,
    then stops it when `store.epoch != hold`. If the load was lost and taken back (E2) in between, `_start_copy`
    for E2 returned at once because the copy thread was still alive (initial_load.py `_start_copy`:
    `if self._thread is not None and self._thread.is_alive(): return`). So the E1 thread stops its own loader and
    exits, and no thread copies under E2: this worker holds the load, `load_pass` finds nothing to do (not every
    segment is done, it is holding), and the load stays `loading` for good. Before 58ef2df the old thread's loader
    kept copying (commits needed only `store.holding`). Here the window (a few lines, or the GetItem of
    `store.read()` in `_copy`) is widened by holding the loader's construction."""
    for n in range(10):
        put(dynamodb, table, f"k{n:03d}", n)
    settings = make_settings(
        source={"initial_load": "scan", "starting_position": "LATEST"},
        initial_load={"segments": 1, "page_items": 20},
        lease={"failover_seconds": 2},
        sinks=[{"type": "memory"}],
    )
    building = threading.Event()
    go_on = threading.Event()

    class SlowToBuild(TableLoader):
        built = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            SlowToBuild.built += 1
            if SlowToBuild.built == 1:
                building.set()
                go_on.wait(20)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(initial_load_module, "TableLoader", SlowToBuild)
    a = Pipeline(settings)
    started(a)
    load = a.initial_load
    assert load is not None
    wait_until(building.is_set, timeout=20, what="the copy thread to build its loader")
    first_hold = load.store.epoch
    assert first_hold is not None
    ghost_holds(a, dynamodb, taken=True)  # A loses the load
    ghost_holds(a, dynamodb, taken=False)  # and takes it back
    assert load.copying and load.store.epoch == first_hold + 3
    go_on.set()
    try:
        wait_until(lambda: load.state is not None and load.state.phase == "done", timeout=30, what="the load")
    except AssertionError:
        row = load.store.read()
        raise AssertionError(
            f"load stuck: phase={row.phase if row else None} progress={row.progress if row else None} "
            f"holding epoch={load.store.epoch} "
            f"copy thread alive={load._thread is not None and load._thread.is_alive()} "
            f"loader halted={load._loader is not None and load._loader._halt.is_set()}"
        ) from None
    sink = a.sinks[0]
    assert isinstance(sink, MemorySink)
    assert {r.keys["pk"] for r in sink.records if r.load_id is not None} == {f"k{n:03d}" for n in range(10)}
