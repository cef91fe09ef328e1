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
