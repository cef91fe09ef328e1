"""Lineage across workers, in one process: two pipelines with their own worker ids share a simulated stream."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from sinks.memory import MemorySink
from tests.conftest import GateSink, wait_until
from tests.test_lease_faults import LEASE, _pipeline_factory
from tests.test_workers import worker_of


def test_a_child_is_read_by_no_worker_before_its_parent_held_by_another_is_finished(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], started: Callable[[Pipeline], Pipeline]
) -> None:
    simulator = StreamSimulator(rollover_seconds=None)
    stream = simulator.create_stream("orders", shards=1, key_schema=[("pk", "HASH"), ("sk", "RANGE")])
    (parent,) = stream.open_shard_ids()
    stream.put_item({"pk": {"S": "k"}, "sk": {"S": "a"}, "version": {"N": "1"}})
    pipeline = _pipeline_factory(aws, make_settings, simulator, stream.arn)
    held_back = GateSink()
    a = started(pipeline("a", held_back))
    wait_until(lambda: parent in a.scheduler.active_shard_ids(), what="A reading the parent")
    children = stream.split_shard(parent)
    for n in range(2, 12):  # changes of the key, and of others, in the children now
        stream.put_item({"pk": {"S": f"k{n % 3}"}, "sk": {"S": "a"}, "version": {"N": str(n)}})
    other = MemorySink()
    b = started(pipeline("b", other))
    wait_until(lambda: all(c in (b.store.known() if b.store else {}) for c in children), what="B sees the children")
    time.sleep(3 * LEASE["pass_interval_seconds"] + LEASE["failover_seconds"])  # several passes of both
    early = [c for c in simulator.calls() if c.shard_id in children]
    assert early == []  # neither worker touched a child while A held the unfinished parent

    opened = time.monotonic()
    held_back.up.set()
    # Distinct changes: on a loaded machine a heartbeat can be late past the (short) failover time here, a lease
    # then moves and its span is delivered twice, which at-least-once allows.
    wait_until(
        lambda: len({r.event_id for r in held_back.records + other.records}) == 11, what="every change delivered"
    )
    child_calls = [c for c in simulator.calls() if c.shard_id in children]
    assert child_calls and min(c.at for c in child_calls) > opened
    assert a.store is not None and a.store.load()[parent].finished
    readers = {worker_of(c.client) for c in child_calls if c.operation == "GetRecords"}
    assert readers <= {"a", "b"} and readers
    # Per item, each sink has the changes in order.
    for sink in (held_back, other):
        for key in ("k0", "k1", "k2"):
            versions = [int(r.new_image["version"]) for r in sink.records if r.keys["pk"] == key]
            assert versions == sorted(versions), (sink.name, key, versions)
