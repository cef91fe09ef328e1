"""`starting_position` means what it says across restarts: LATEST is "changes made after the first start", however
often the pipeline restarts, whatever expires, whichever shards appear; AT_TIMESTAMP is "changes made at or after
this time".

A crash before the first checkpoint is a pipeline whose sink is down (it reads, but never commits) stopped hard:
its checkpoint table holds what such a crash leaves. The simulated stream runs on a clock that starts at the wall
clock, so creation times compare with the moment the pipeline starts; moto's stream gives real times anyway.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.ops.demo import _item
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.state.checkpoint import CheckpointStore, StreamStart
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import ManualClock, SimulatedStream, StreamSimulator
from sinks.base import Sink
from sinks.memory import FlakySink, MemorySink
from tests.conftest import wait_until

Start = Callable[..., Pipeline]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time() - 60)  # a minute ago: history is made before the pipeline starts


@pytest.fixture
def simulator(clock: ManualClock) -> StreamSimulator:
    return StreamSimulator(clock=clock, rollover_seconds=None)


@pytest.fixture
def start(aws: EmbeddedAws, simulator: StreamSimulator, make_settings: Callable[..., Settings]) -> Iterator[Start]:
    """Start a Pipeline on a simulated stream with one sink; every one started is stopped at the end."""
    started: list[Pipeline] = []

    def run(stream: SimulatedStream, sink: Sink, **source: Any) -> Pipeline:
        settings = make_settings(source={"table_name": None, "stream_arn": stream.arn, **source})
        clients = AwsClients(aws.region, aws.endpoint_url)
        simulator.attach(clients.client("dynamodbstreams"))
        pipeline = Pipeline(settings, sinks=[sink], clients=clients)
        pipeline.start()
        started.append(pipeline)
        return pipeline

    yield run
    for pipeline in started:
        pipeline.stop(timeout=2)


def down() -> FlakySink:
    """A sink that never takes anything: its pipeline reads but can never checkpoint."""
    return FlakySink("down", fail_writes=10**9)


def crash(pipeline: Pipeline, sink: FlakySink) -> None:
    """What a kill before the first checkpoint leaves: records read and tried, nothing committed."""
    wait_until(lambda: sink.attempts >= 2, what="the down sink to be tried")
    assert pipeline.stop(timeout=0.3) is False  # stopped hard, mid-retry: nothing delivered or checkpointed
    assert pipeline.stats.committed == {}


def item(key: str, version: int) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}}


def keys_in(stream: SimulatedStream, shard_id: str, count: int, prefix: str) -> list[str]:
    """`count` partition keys that the stream puts in `shard_id`."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"{prefix}-{n}"
        if stream.shard_for(item(key, 0)) == shard_id:
            found.append(key)
        n += 1
    return found


def delivered(sink: MemorySink) -> list[tuple[str, int]]:
    return sorted((r.keys["pk"], int(r.new_image["version"])) for r in sink.records if r.new_image is not None)


def now_in_the_simulator(clock: ManualClock) -> None:
    """Move the simulated clock up to the wall clock (and a little past): what is written now is new."""
    clock.advance(max(0.0, time.time() + 1 - clock.now()))


def past_the_first_start(clock: ManualClock) -> None:
    """The first start's moment is the second after its LATEST iterators (by the service's clock): a first run
    reads everything after its iterators, and every later run what was made from that second on. Changes made
    from then on are the ones every run must deliver."""
    clock.advance(2)


# -- LATEST ----------------------------------------------------------------------------------------------------


def test_latest_after_a_kill_before_the_first_checkpoint_delivers_what_was_read_before_the_kill(
    dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    for n in range(3):
        dynamodb.put_item(TableName=table, Item=_item(n))  # history the user asked to skip
    time.sleep(1.1)  # creation times are whole seconds: history from an earlier second than the start
    settings = make_settings(source={"starting_position": "LATEST"})
    sink = down()
    first = Pipeline(settings, sinks=[sink])
    first.start()
    time.sleep(1.1)  # past the first start's second (see past_the_first_start)
    for n in range(100, 103):
        dynamodb.put_item(TableName=table, Item=_item(n))
    crash(first, sink)

    restarted_sink = MemorySink()
    restarted = Pipeline(settings, sinks=[restarted_sink])
    restarted.start()
    try:
        wait_until(lambda: len(restarted_sink.records) >= 3, what="the changes made after the first start")
        time.sleep(0.5)  # anything more would arrive by now
    finally:
        assert restarted.stop() is True
    assert sorted(r.keys["sk"] for r in restarted_sink.records) == ["order#00100", "order#00101", "order#00102"]


def test_latest_with_an_iterator_that_expires_before_anything_was_read_skips_nothing_written_meanwhile(
    simulator: StreamSimulator, clock: ManualClock, start: Start
) -> None:
    stream = simulator.create_stream("orders", shards=1)
    stream.put_item(item("history", 1))
    now_in_the_simulator(clock)
    sink = MemorySink()
    # Slow idle polling leaves a second between polls to write and to let the iterator expire.
    pipeline = start(stream, sink, starting_position="LATEST")
    shard = stream.open_shard_ids()[0]
    polls_at_start = len(simulator.calls("GetRecords"))
    wait_until(lambda: len(simulator.calls("GetRecords")) > polls_at_start, what="a first empty poll")
    past_the_first_start(clock)
    stream.put_item(item("meanwhile", 1))
    clock.advance(16 * 60)  # the reader's iterator, issued at its last poll, is now past its 15 minutes
    wait_until(lambda: len(sink.records) >= 1, what="the change written while the iterator expired")
    stream.put_item(item("after", 1))
    wait_until(lambda: len(sink.records) >= 2, what="the next change")
    assert pipeline.fatal is None
    assert delivered(sink) == [("after", 1), ("meanwhile", 1)]
    assert any(c.error_code == "ExpiredIteratorException" and c.shard_id == shard for c in simulator.calls())


def test_latest_after_a_restart_does_not_replay_the_history_of_a_shard_that_had_no_checkpoint(
    simulator: StreamSimulator, clock: ManualClock, start: Start
) -> None:
    stream = simulator.create_stream("orders", shards=2)
    busy, quiet = stream.open_shard_ids()
    busy_keys = keys_in(stream, busy, 3, "busy")
    quiet_keys = keys_in(stream, quiet, 3, "quiet")
    for key in busy_keys + quiet_keys:
        stream.put_item(item(key, 1))  # history in both shards
    now_in_the_simulator(clock)

    first_sink = MemorySink()
    first = start(stream, first_sink, starting_position="LATEST")
    past_the_first_start(clock)
    stream.put_item(item(busy_keys[0], 2))  # only the busy shard gets a checkpoint
    wait_until(lambda: busy in first.stats.committed, what="a checkpoint on the busy shard")
    assert first.stop() is True
    assert quiet not in first.stats.committed

    for key in (busy_keys[1], quiet_keys[0]):
        stream.put_item(item(key, 3))  # while the pipeline is down
    second_sink = MemorySink()
    second = start(stream, second_sink, starting_position="LATEST")
    wait_until(lambda: len(second_sink.records) >= 2, what="the changes made while it was down")
    time.sleep(0.5)
    assert second.fatal is None
    assert delivered(first_sink) == [(busy_keys[0], 2)]
    assert delivered(second_sink) == sorted([(busy_keys[1], 3), (quiet_keys[0], 3)])


def test_latest_with_a_split_before_the_first_checkpoint_delivers_the_parents_and_the_childrens_changes(
    simulator: StreamSimulator, clock: ManualClock, start: Start
) -> None:
    stream = simulator.create_stream("orders", shards=1)
    for n in range(5):
        stream.put_item(item(f"k{n}", 1))  # history
    now_in_the_simulator(clock)
    sink = down()
    first = start(stream, sink, starting_position="LATEST")
    past_the_first_start(clock)
    for n in range(5):
        stream.put_item(item(f"k{n}", 2))  # read by the first run, never checkpointed
    stream.split_shard()
    for n in range(5):
        stream.put_item(item(f"k{n}", 3))  # in the children
    crash(first, sink)

    restarted_sink = MemorySink()
    restarted = start(stream, restarted_sink, starting_position="LATEST")
    wait_until(lambda: len(restarted_sink.records) >= 10, what="every change since the first start")
    time.sleep(0.5)
    assert restarted.fatal is None
    assert delivered(restarted_sink) == sorted((f"k{n}", v) for n in range(5) for v in (2, 3))
    versions: dict[str, list[int]] = collections.defaultdict(list)
    for record in restarted_sink.records:
        versions[record.keys["pk"]].append(int(record.new_image["version"]))
    assert all(seen == [2, 3] for seen in versions.values()), "a child's change overtook its parent's"


def test_the_first_start_is_recorded_and_a_later_configuration_does_not_change_it(
    simulator: StreamSimulator, clock: ManualClock, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    stream = simulator.create_stream("orders", shards=1)
    stream.put_item(item("history", 1))
    now_in_the_simulator(clock)
    first = start(stream, MemorySink(), starting_position="LATEST")
    assert first.stream_start is not None and first.stream_start.starting_position == "LATEST"
    since = first.stream_start.since
    assert since is not None and abs(since - time.time()) < 10
    assert first.stop() is True

    sink = MemorySink()
    again = start(stream, sink, starting_position="TRIM_HORIZON")
    past_the_first_start(clock)
    stream.put_item(item("later", 1))
    wait_until(lambda: len(sink.records) >= 1, what="the new change")
    assert again.stream_start == first.stream_start
    assert delivered(sink) == [("later", 1)]
    assert "applies at the first start only" in caplog.text


# -- AT_TIMESTAMP ----------------------------------------------------------------------------------------------


def test_at_timestamp_delivers_changes_from_that_second_on_in_open_and_closed_shards(
    simulator: StreamSimulator, clock: ManualClock, start: Start
) -> None:
    stream = simulator.create_stream("orders", shards=1)
    for n in range(4):
        stream.put_item(item(f"k{n}", 1))  # before the timestamp
    clock.advance(100)
    moment = int(clock.now()) + 1
    clock.advance(moment - clock.now())  # the second the timestamp names
    for n in range(4):
        stream.put_item(item(f"k{n}", 2))
    stream.split_shard()  # the parent holds changes before and after the timestamp
    for n in range(4):
        stream.put_item(item(f"k{n}", 3))

    sink = MemorySink()
    pipeline = start(
        stream,
        sink,
        starting_position="AT_TIMESTAMP",
        starting_timestamp=datetime.fromtimestamp(moment + 0.7, UTC),  # within the second: the second counts
    )
    wait_until(lambda: len(sink.records) >= 8, what="the changes since the timestamp")
    time.sleep(0.5)
    assert pipeline.fatal is None
    assert delivered(sink) == sorted((f"k{n}", v) for n in range(4) for v in (2, 3))
    assert pipeline.scheduler.skipped_before_start == 4


def test_latest_delivers_a_change_made_while_the_first_start_was_still_starting(
    simulator: StreamSimulator, clock: ManualClock, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start takes its LATEST iterators before it names its moment: a change made at any point after
    them (here while the moment is being recorded) is read by the first run."""
    stream = simulator.create_stream("orders", shards=2)
    stream.put_item(item("history", 1))
    now_in_the_simulator(clock)
    record_start = CheckpointStore.record_start

    def while_recording(store: CheckpointStore, moment: StreamStart) -> StreamStart:
        stream.put_item(item("during-the-start", 1))
        return record_start(store, moment)

    monkeypatch.setattr(CheckpointStore, "record_start", while_recording)
    sink = MemorySink()
    pipeline = start(stream, sink, starting_position="LATEST")
    stream.put_item(item("right-after", 1))  # the same second: the first run's iterators are exact
    wait_until(lambda: len(sink.records) >= 2, what="both changes")
    time.sleep(0.5)
    assert pipeline.fatal is None
    assert delivered(sink) == [("during-the-start", 1), ("right-after", 1)]


def test_a_first_start_killed_before_its_record_and_a_roll_over_raise_no_false_alarm_later(
    simulator: StreamSimulator, clock: ManualClock, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows registered by a first start that never recorded itself are written afresh by the next try: the shard
    that closed meanwhile is finished (it holds only history), and a day later, when it leaves the stream, it is
    not reported lost."""
    stream = simulator.create_stream("orders", shards=1)
    (parent,) = stream.open_shard_ids()
    stream.put_item(item("history", 1))
    now_in_the_simulator(clock)

    def killed(store: CheckpointStore, moment: StreamStart) -> StreamStart:
        raise RuntimeError("killed between the shards' rows and the first-start record")

    monkeypatch.setattr(CheckpointStore, "record_start", killed)
    with pytest.raises(RuntimeError, match="killed"):
        start(stream, MemorySink(), starting_position="LATEST")
    monkeypatch.undo()
    stream.roll_over_shard(parent)
    sink = MemorySink()
    pipeline = start(stream, sink, starting_position="LATEST")
    assert pipeline.store is not None and pipeline.store.known()[parent].finished
    past_the_first_start(clock)
    stream.put_item(item("k", 1))
    wait_until(lambda: len(sink.records) == 1, what="the child's change")
    clock.advance(24 * 3600 + 3600)  # the parent leaves the stream
    stream.put_item(item("k", 2))
    wait_until(lambda: len(sink.records) == 2, what="the next change")
    assert pipeline.fatal is None
    assert pipeline.stats.aged_out_skips == 0
