"""A shard that left the stream (closed more than 24 hours ago) before the pipeline read it to its end is never
skipped silently: with `on_trimmed_data = "fail"` the start stops naming it, with `"skip_to_trim_horizon"` an
ERROR line names it, the skip is counted, and reading goes on with its children.

Two ways to lose a shard while the pipeline is down for more than a day, both on the simulated stream (moto
never closes a shard): a shard with a checkpoint that was not finished, and a shard the pipeline never saw (it
was created and aged out while the pipeline was down; only its child is still listed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import pipeline.runner as runner
from pipeline.aws import AwsClients
from pipeline.records import Batch
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.source.reader import TrimmedDataError
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import ManualClock, SimulatedStream, StreamSimulator
from sinks.base import RetryableSinkError, WriteResult
from sinks.memory import MemorySink
from tests.conftest import wait_until

DAY = 24 * 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def simulator(clock: ManualClock) -> StreamSimulator:
    return StreamSimulator(clock=clock, rollover_seconds=None)


Build = Callable[..., Pipeline]


@pytest.fixture
def build(on_simulator: Callable[..., Pipeline]) -> Build:
    def pipeline(stream: SimulatedStream, sink: MemorySink, **source: Any) -> Pipeline:
        return on_simulator(stream, given_sinks=[sink], source=source)

    return pipeline


def item(key: str, version: int) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}}


def _down_for_more_than_a_day(simulator: StreamSimulator, clock: ManualClock, build: Build) -> tuple[Any, str, str]:
    """A first run reads shard A; then, while the pipeline is down, A gets more changes and rolls over to B,
    B gets changes and rolls over to C, and a day passes: A and B age out, only C is listed."""
    stream = simulator.create_stream("orders", shards=1)
    (a,) = stream.open_shard_ids()
    for n in range(3):
        stream.put_item(item(f"k{n}", 1))
    sink = MemorySink()
    first = build(stream, sink)
    first.start()
    wait_until(lambda: first.stats.committed.get(a) is not None and len(sink.records) == 3, what="the first run")
    assert first.stop() is True

    for n in range(3):
        stream.put_item(item(f"k{n}", 2))  # in A, never read
    b = stream.roll_over_shard(a)
    stream.put_item(item("k0", 3))  # in B, which the pipeline never sees
    stream.roll_over_shard(b)
    clock.advance(DAY + 3600)
    stream.put_item(item("k0", 4))  # in C, still listed
    assert [s.shard_id for s in stream.shards()] == stream.open_shard_ids()  # A and B are gone
    return stream, a, b


def test_a_shard_that_aged_out_unfinished_stops_the_start_naming_it(
    simulator: StreamSimulator, clock: ManualClock, build: Build
) -> None:
    stream, a, _b = _down_for_more_than_a_day(simulator, clock, build)
    restarted = build(stream, MemorySink())
    with pytest.raises(TrimmedDataError, match=a) as raised:
        restarted.start()
    assert "aged out of the stream" in str(raised.value) and "skip_to_trim_horizon" in str(raised.value)


def test_skipping_says_which_shards_were_lost_counts_them_and_goes_on_with_the_children(
    simulator: StreamSimulator, clock: ManualClock, build: Build, caplog: pytest.LogCaptureFixture
) -> None:
    stream, a, b = _down_for_more_than_a_day(simulator, clock, build)
    sink = MemorySink()
    restarted = build(stream, sink, on_trimmed_data="skip_to_trim_horizon")
    with caplog.at_level(logging.ERROR, logger="pipeline.runner"):
        restarted.start()
        wait_until(lambda: len(sink.records) >= 1, what="the child's change")
    assert [(r.keys["pk"], int(r.new_image["version"])) for r in sink.records] == [("k0", 4)]
    lost = [r.getMessage() for r in caplog.records if "aged out of the stream" in r.getMessage()]
    assert any(a in line and "never delivered" in line for line in lost), lost
    assert any(b in line and "came and went unread" in line for line in lost), lost
    assert restarted.stats.aged_out_skips == 2
    scraped = restarted.metrics.registry.get_sample_value("streamsink_trimmed_skips_total")
    assert scraped == 2


def test_rows_and_state_of_shards_long_finished_are_forgotten(
    simulator: StreamSimulator, clock: ManualClock, build: Build
) -> None:
    """A finished shard is forgotten (its checkpoint row deleted, nothing kept in memory) once it has aged out of
    the stream and none of its children is unfinished: a pipeline running for months reads a bounded partition."""
    stream = simulator.create_stream("orders", shards=1)
    (a,) = stream.open_shard_ids()
    stream.put_item(item("k", 1))
    sink = MemorySink()
    pipeline = build(stream, sink)
    pipeline.start()
    b = stream.roll_over_shard(a)
    stream.put_item(item("k", 2))
    c = stream.roll_over_shard(b)
    stream.put_item(item("k", 3))
    # C's change read too, before the day passes: that change would age out with A and B, and C's reader, started
    # only once B is finished, had on a loaded machine not read it yet (the day then trimmed it unread).
    wait_until(
        lambda: pipeline.lineage.is_finished(a) and pipeline.lineage.is_finished(b) and len(sink.records) == 3,
        what="A and B read, and C's first change",
    )
    assert pipeline.store is not None
    assert set(pipeline.store.known()) == {a, b, c}

    clock.advance(DAY + 3600)  # A and B age out; B's child C is unfinished, so B is still needed
    stream.put_item(item("k", 4))
    wait_until(lambda: len(sink.records) == 4, what="C's newest change")
    wait_until(lambda: set(pipeline.store.known()) == {b, c}, what="A forgotten")
    assert set(pipeline.store.load()) == {b, c}  # the table itself, not just the cache
    assert set(pipeline.stats.committed) <= {b, c}
    assert not pipeline.lineage.is_finished(a)  # the in-memory finished set follows the stream
    assert pipeline.fatal is None


class SwitchSink(MemorySink):
    """Down (every write retryable) while `down` is set."""

    def __init__(self) -> None:
        super().__init__("switch")
        self.down = threading.Event()
        self.attempts = 0

    def write(self, batch: Batch) -> WriteResult:
        self.attempts += 1
        if self.down.is_set():
            raise RetryableSinkError("destination down")
        return super().write(batch)


@pytest.mark.parametrize("on_trimmed_data", ["fail", "skip_to_trim_horizon"])
def test_an_outage_outlasting_a_parents_retention_applies_on_trimmed_data_to_it(
    aws: EmbeddedAws,
    simulator: StreamSimulator,
    clock: ManualClock,
    make_settings: Callable[..., Settings],
    on_trimmed_data: str,
) -> None:
    """The parent's reader waits at the full queue through a sink outage of more than a day; when it polls again
    its shard has left the stream. That is trimmed data like any other: stop naming it, or say so and go on."""
    stream = simulator.create_stream("orders", shards=1)
    (a,) = stream.open_shard_ids()
    settings = make_settings(
        source={"table_name": None, "stream_arn": stream.arn, "on_trimmed_data": on_trimmed_data},
        batch={"max_records": 5, "queue_capacity": 5, "max_wait_seconds": 0.05},
        delivery={"max_records_in_flight": 5},
        reader={"get_records_limit": 5},
    )
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    sink = SwitchSink()
    pipeline = Pipeline(settings, sinks=[sink], clients=clients)
    pipeline.start()
    try:
        stream.put_item(item("warm", 1))
        wait_until(lambda: len(sink.records) == 1, what="a first delivery")
        sink.down.set()
        for n in range(40):
            stream.put_item(item(f"k{n}", 1))  # a backlog in A that the full queue holds back
        stream.roll_over_shard(a)
        wait_until(lambda: sink.attempts >= 3, what="the outage to be retried")
        clock.advance(DAY + 3600)  # A is trimmed and leaves the stream while the sink is down
        stream.put_item(item("in-the-child", 1))
        sink.down.clear()
        if on_trimmed_data == "fail":
            wait_until(lambda: pipeline.fatal is not None, what="the stop")
            assert isinstance(pipeline.fatal, TrimmedDataError) and a in str(pipeline.fatal)
        else:
            wait_until(lambda: any(r.keys["pk"] == "in-the-child" for r in sink.records), what="the child read")
            assert pipeline.fatal is None and pipeline.scheduler.trimmed_skips >= 1
    finally:
        pipeline.stop(timeout=2)


def test_one_listing_that_leaves_a_shard_out_does_not_make_it_lost(
    aws: EmbeddedAws,
    simulator: StreamSimulator,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Losing a shard stops the pipeline by default; a single DescribeStream answer that lacks a shard (a lagging
    view) must not: the shard is taken as gone only when a second listing agrees."""
    stream = simulator.create_stream("orders", shards=1)
    (a,) = stream.open_shard_ids()
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn})
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    sink = SwitchSink()
    pipeline = Pipeline(settings, sinks=[sink], clients=clients)
    pipeline.start()
    real = runner.describe_shards
    leave_out: list[str] = []

    def lagging(*args: Any, **kwargs: Any) -> Any:
        shards = real(*args, **kwargs)
        if leave_out:
            gone = leave_out.pop()
            return [s for s in shards if s.shard_id != gone]
        return shards

    monkeypatch.setattr(runner, "describe_shards", lagging)
    try:
        stream.put_item(item("k", 1))
        wait_until(lambda: len(sink.records) == 1, what="the first change")
        sink.down.set()  # A's last page waits in delivery, so its child is registered but not being read
        stream.put_item(item("k", 2))
        child = stream.roll_over_shard(a)
        stream.put_item(item("k", 3))
        assert pipeline.store is not None
        wait_until(lambda: pipeline.store.checkpoint(child) is not None, what="the child registered")  # type: ignore[union-attr]
        leave_out.append(child)
        wait_until(lambda: not leave_out, what="the short listing")
        sink.down.clear()
        wait_until(lambda: len(sink.records) == 3, what="every change, the child's included")
        assert pipeline.fatal is None and pipeline.stats.aged_out_skips == 0
        assert [int(r.new_image["version"]) for r in sink.records] == [1, 2, 3]  # type: ignore[index]
    finally:
        pipeline.stop(timeout=2)
