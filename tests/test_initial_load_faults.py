"""Faults that once broke an initial load's promises, each failing before its fix: a finish write lost after the
last progress write, a worker that lost the load copying on, an `event_names` filter dropping the copy, a throttled
Scan."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from botocore.exceptions import EndpointConnectionError

from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, Settings
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import wait_until
from tests.test_initial_load import INTERNAL, load_phase, put, raw_replica, scan_all

KEYS = [f"k{n:03d}" for n in range(60)]


@pytest.fixture
def load_settings(make_settings: Callable[..., Settings], replica: str) -> Callable[..., Settings]:
    def build(*, initial_load: dict[str, Any] | None = None, **sections: Any) -> Settings:
        sections.setdefault("sinks", [{"type": "dynamodb_table", "table_name": replica}])
        return make_settings(
            source={"initial_load": "scan", "starting_position": "LATEST"},
            initial_load={"segments": 2, "page_items": 10, **(initial_load or {})},
            lease={"failover_seconds": 2},
            **sections,
        )

    return build


def test_a_finish_write_lost_after_the_last_progress_is_made_by_the_next_start(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """The last segment's progress is saved (every segment `done`), then the `finished` write fails (its retries
    run out on a network error; a SIGKILL at that point is the same). The next start finds no segment left to copy:
    it must finish the load itself (before the fix nothing ever did: the load stayed `loading` for ever, the replica
    kept tombstones and load stamps, no clean-up)."""
    for n, key in enumerate(KEYS):
        put(dynamodb, table, key, n)
    settings = load_settings()
    first = Pipeline(settings)
    failing = threading.Event()
    failing.set()

    refused = {"n": 0}

    def refuse_finish(params: dict[str, Any], **_: Any) -> None:
        if failing.is_set() and ":finished" in params.get("ExpressionAttributeValues", {}):
            refused["n"] += 1
            raise EndpointConnectionError(endpoint_url="http://checkpoints")

    first.clients.client("dynamodb").meta.events.register("before-parameter-build.dynamodb.UpdateItem", refuse_finish)
    started(first)
    wait_until(lambda: refused["n"] > 0, timeout=30, what="the finish write to fail")
    assert first.fatal is None, "a finish that could not be written stops nothing: the next pass or start writes it"
    first.stop(timeout=5)
    assert load_phase(first) == "loading"
    assert first.initial_load is not None and all(p.done for p in first.initial_load.store.read().progress.values())

    second = started(Pipeline(settings))  # the restart: the network is back
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": KEYS[0]}, "sk": {"S": "a"}})
    wait_until(lambda: load_phase(second) == "done", timeout=20, what="the restarted worker to finish the load")
    source = scan_all(dynamodb, table)
    wait_until(lambda: scan_all(dynamodb, replica) == source, timeout=20, what="the replica to equal the source")
    assert not [i for i in raw_replica(dynamodb, replica) if INTERNAL[2] in i], "tombstones left"


def test_a_worker_that_lost_the_load_stops_copying_and_no_late_copy_undoes_a_change(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """Worker A copies; its heartbeat writes fail (a throttled or unreachable checkpoint row, a stalled thread)
    while the rest of it works. B takes A's shards and the load over after the failover time (as it should), copies
    the rest, finishes, cleans up and marks the load `done`. A, whose progress write is refused, must stop copying
    and deliver none of the copies it still has: before the fix its segment threads read on into its sinks, and a
    copy read before a delete (or an update) and written after the load was done re-created the deleted item (or
    rolled the update back), for good. Its Scan answers arrive 1.5 s late; any that arrives after the load is done
    has one of its items deleted, another updated, on the way."""
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
        items = [orjson.loads(i) if isinstance(i, bytes) else i for i in parsed.get("Items", [])]
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
                lambda: (
                    test_client.get_item(TableName=replica, Key=key).get("Item", {}).get("version") == {"N": "99999"}
                ),
                timeout=10,
            )

    a_client = a.clients.client("dynamodb")
    a_client.meta.events.register("before-parameter-build.dynamodb.PutItem", no_heartbeat)
    a.clients.scan_client().meta.events.register("after-call.dynamodb.Scan", slow_scan_then_change)
    started(a)
    assert a.initial_load is not None and a.initial_load.store.holding
    beats_fail.set()
    b = started(Pipeline(settings))
    wait_until(lambda: load_phase(b) == "done", timeout=30, what="B to take the load over and finish it")
    assert a.initial_load is not None and not a.initial_load.copying, "A still holds the load B finished"
    threading.Event().wait(4.0)  # any answer A still had in flight arrives (and, before the fix, was written)
    source = scan_all(dynamodb, table)
    replica_now = scan_all(dynamodb, replica)
    wrong = {k: (source.get(k), replica_now.get(k)) for k in damaged if source.get(k) != replica_now.get(k)}
    assert not wrong, f"the replica differs from the source after the load was done: {damaged} -> {wrong}"


def test_an_event_names_filter_that_leaves_out_snapshot_is_a_config_error_not_a_silently_empty_copy(
    load_settings: Callable[..., Settings], replica: str
) -> None:
    """`[filter] event_names = ["INSERT", "MODIFY", "REMOVE"]` (every change: a config written before SNAPSHOT
    existed) would drop every copied item before any sink while the load commits its pages and ends `done`. It is
    refused in one line naming the key and the fix; so is a per-sink filter of a sink that takes the copy."""
    with pytest.raises(ConfigError) as pipeline_wide:
        load_settings(filter={"event_names": ["INSERT", "MODIFY", "REMOVE"]})
    (line,) = pipeline_wide.value.lines
    assert "filter.event_names" in line and 'add "SNAPSHOT"' in line
    sink = {"type": "dynamodb_table", "table_name": replica, "filter": {"event_names": ["INSERT", "MODIFY"]}}
    with pytest.raises(ConfigError) as per_sink:
        load_settings(sinks=[sink])
    (line,) = per_sink.value.lines
    assert "sinks[0] (dynamodb_table)" in line and "initial_load = false" in line
    load_settings(sinks=[{**sink, "initial_load": False}])  # a sink that takes no copy may filter as it likes


def test_a_throttled_scan_pauses_the_copy_and_does_not_stop_the_pipeline(
    dynamodb: Any,
    table: str,
    replica: str,
    load_settings: Callable[..., Settings],
    started: Callable[[Pipeline], Pipeline],
) -> None:
    """An outage of the table slows the copy; it never stops the pipeline (the segment pauses and goes on from its
    last page). Before the fix every ClientError left after the Scan's retries, throttling and 5xx included, became
    a refusal and stopped the pipeline."""
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

    pipeline.clients.scan_client().meta.events.register("before-parameter-build.dynamodb.Scan", throttle)
    started(pipeline)
    threading.Event().wait(2.0)  # a short burst of throttling, longer than the retries' few tenths of a second
    throttled.clear()
    assert pipeline.fatal is None, f"the pipeline stopped on a throttled Scan: {pipeline.fatal}"
