"""A load slower than the stream's retention, on the simulated clock: the pipeline warns early, then stops with an
error naming the shard before the change it has not delivered leaves the stream; started again, it delivers that
change and finishes the copy: nothing was lost.

The stream is throttled from the start (every GetRecords refused), so its one change waits undelivered while the
service's clock moves on 10 minutes every 0.1 s; the copy (a moto table, scanned within a read budget) goes on at
its own pace, which on that clock is a few items an hour.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.initial_load import RetentionRiskError
from pipeline.runner import Pipeline
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from pipeline.testing.simulated_stream import ManualClock, SimulatedStream, StreamSimulator
from sinks.memory import MemorySink
from tests.conftest import unique, wait_until

HOUR = 3600.0
ITEMS = 200


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


@pytest.fixture
def simulator(clock: ManualClock) -> StreamSimulator:
    return StreamSimulator(clock=clock, rollover_seconds=None)


@pytest.fixture
def build(on_simulator: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
    def pipeline(stream: SimulatedStream, sink: MemorySink, read_units: float) -> Pipeline:
        return on_simulator(
            stream,
            given_sinks=[sink],
            source={"initial_load": "scan", "starting_position": "LATEST"},
            initial_load={"segments": 2, "page_items": 5, "read_units_per_second": read_units},
            reader={"discovery_interval_seconds": 0.1},
            lease={"failover_seconds": 3},
        )

    return pipeline


def test_a_load_slower_than_retention_warns_then_stops_before_a_change_is_lost(
    aws: EmbeddedAws,
    dynamodb: Any,
    simulator: StreamSimulator,
    clock: ManualClock,
    build: Callable[..., Pipeline],
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = unique("slow")
    create_stream_table(dynamodb, name)  # what the copy scans; the stream is the simulator's
    for n in range(ITEMS):
        dynamodb.put_item(TableName=name, Item={"pk": {"S": f"k{n:03d}"}, "sk": {"S": "a"}, "n": {"N": str(n)}})
    stream = simulator.create_stream(name, shards=1)
    simulator.fail_next("GetRecords", "LimitExceededException", times=1_000_000)
    sink = MemorySink()
    first = build(stream, sink, read_units=1.0)  # moto counts 0.5 a page: two pages of 5 items a second
    caplog.set_level(logging.WARNING, logger="pipeline.initial_load")
    first.start()
    clock.advance(2)  # past the first start's second: a change made in it counts as before the start
    change_at = clock.now()
    stream.put_item({"pk": {"S": "late"}, "sk": {"S": "a"}, "n": {"N": "1"}})
    stopped = threading.Event()

    def time_passes() -> None:
        while not stopped.wait(0.1) and clock.now() - change_at < 30 * HOUR:
            clock.advance(600)

    mover = threading.Thread(target=time_passes, daemon=True)
    mover.start()
    try:
        assert first.wait(timeout=120), "the pipeline never stopped"
    finally:
        stopped.set()
        mover.join()
    age_at_stop = clock.now() - change_at
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("longer than the stream keeps changes" in w for w in warnings), warnings
    assert any(w.startswith(f"shard {stream.open_shard_ids()[0]}") for w in warnings), warnings
    assert isinstance(first.fatal, RetentionRiskError), first.fatal
    assert stream.open_shard_ids()[0] in str(first.fatal)
    assert age_at_stop < 24 * HOUR, f"stopped only after the change had left the stream ({age_at_stop / HOUR:.1f} h)"
    assert not any(r.event_name != "SNAPSHOT" for r in sink.records)
    first.stop(timeout=5)

    simulator.clear_faults()
    second = build(stream, sink, read_units=50.0)
    second.start()
    wait_until(
        lambda: (
            second.initial_load is not None
            and second.initial_load.state is not None
            and second.initial_load.state.phase == "done"
            and any(r.keys.get("pk") == "late" for r in sink.records)
        ),
        timeout=60,
        what="the change and the rest of the copy",
    )
    assert {r.keys["pk"] for r in sink.records if r.event_name == "SNAPSHOT"} == {f"k{n:03d}" for n in range(ITEMS)}
