"""Review 3 of 58ef2df: a retake of the load while the copy thread is past its hold check leaves nobody copying."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pipeline.initial_load as initial_load_module
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.source.table_loader import TableLoader
from tests.conftest import wait_until
from tests.test_initial_load import put


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
    a.leases.is_live = lambda worker, at=None: True  # type: ignore[method-assign]
    key = load.store._key()
    for update, values in (
        ("SET #owner = :ghost, lease_epoch = :new", {":ghost": {"S": "ghost"}, ":new": {"N": str(first_hold + 1)}}),
        ("REMOVE #owner SET lease_epoch = :new", {":new": {"N": str(first_hold + 2)}}),
    ):
        dynamodb.update_item(
            TableName=settings.checkpoint.table_name,
            Key=key,
            UpdateExpression=update,
            ExpressionAttributeNames={"#owner": "owner"},
            ExpressionAttributeValues=values,
        )
        load.load_pass()  # the ghost takes it (A loses it), then releases it (A takes it back)
    assert load.copying and load.store.epoch == first_hold + 3
    go_on.set()
    try:
        wait_until(lambda: load.state is not None and load.state.phase == "done", timeout=30, what="the load")
    except AssertionError:
        row = load.store.read()
        raise AssertionError(
            f"load stuck: phase={row.phase if row else None} progress={row.progress if row else None} "
            f"holding epoch={load.store.epoch} copy thread alive={load._thread is not None and load._thread.is_alive()} "
            f"loader halted={load._loader is not None and load._loader._halt.is_set()}"
        ) from None
    assert sum(1 for r in a.sinks[0].records if r.load_id is not None) >= 10
