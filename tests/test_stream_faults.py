"""The pipeline against a faithful stream: splits, roll-overs, expiry, throttling, 5xx, trimming and the 1 MB cap.

The real Pipeline reads the simulated stream through the real boto3 client (answered in-process at the wire
level); checkpoints go to the moto server. Each test checks what a replica needs: every change delivered exactly
once, the changes of one item in the order they happened, and the replica equal to the table.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

import pipeline.runner
from pipeline.aws import AwsClients
from pipeline.records import ChangeRecord, unmarshal_image
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.source.reader import ShardReader, TrimmedDataError
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import (
    MAX_PAGE_BYTES,
    FaultSchedule,
    ManualClock,
    ServedCall,
    SimulatedStream,
    StreamSimulator,
)
from sinks.memory import MemorySink
from tests.conftest import wait_until

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def simulator(clock: ManualClock) -> StreamSimulator:
    return StreamSimulator(clock=clock)


Run = Callable[..., tuple[Pipeline, MemorySink]]


@pytest.fixture
def run(aws: EmbeddedAws, simulator: StreamSimulator, make_settings: Callable[..., Settings]) -> Iterator[Run]:
    """Start a Pipeline on a simulated stream; `sections` override settings. Pipelines left running are stopped."""
    started: list[Pipeline] = []

    def start(stream: SimulatedStream, sink: MemorySink | None = None, **sections: Any) -> tuple[Pipeline, MemorySink]:
        source = {"table_name": None, "stream_arn": stream.arn, **sections.pop("source", {})}
        settings = make_settings(source=source, **sections)
        clients = AwsClients(aws.region, aws.endpoint_url)
        simulator.attach(clients.client("dynamodbstreams"))
        sink = sink or MemorySink()
        pipeline = Pipeline(settings, sinks=[sink], clients=clients)
        pipeline.start()
        started.append(pipeline)
        return pipeline, sink

    yield start
    for running in started:
        running.stop(timeout=5)


def item(key: str, version: int, **attributes: dict[str, Any]) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}, "version": {"N": str(version)}, **attributes}


def until_delivered(pipeline: Pipeline, sink: MemorySink, count: int) -> None:
    wait_until(lambda: len(sink.records) >= count or pipeline.fatal is not None, timeout=30, what=f"{count} records")
    assert pipeline.fatal is None, pipeline.fatal


def key_of(record: ChangeRecord) -> tuple[Any, ...]:
    return tuple(sorted(record.keys.items()))


def assert_exactly_once_in_order(sink: MemorySink, stream: SimulatedStream) -> None:
    delivered = sink.records
    ids = [r.event_id for r in delivered]
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert sorted(ids) == sorted(r["eventID"] for r in stream.records()), "delivered != written"
    by_key: dict[tuple[Any, ...], list[int]] = collections.defaultdict(list)
    for record in delivered:
        by_key[key_of(record)].append(record.sequence)
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers), f"changes of {key} delivered out of order"


def assert_replica_equals_table(sink: MemorySink, stream: SimulatedStream) -> None:
    replica: dict[tuple[Any, ...], Any] = {}
    for record in sink.records:
        if record.event_name == "REMOVE":
            replica.pop(key_of(record), None)
        else:
            replica[key_of(record)] = record.new_image
    table = {
        tuple(sorted(unmarshal_image({k: i[k] for k in ("pk", "sk")}).items())): unmarshal_image(i)
        for i in stream.items()
    }
    assert replica == table


# -- lineage ---------------------------------------------------------------------------------------------------


def test_splits_while_records_flow_deliver_parents_before_children_and_lose_nothing(
    simulator: StreamSimulator, run: Run
) -> None:
    # Sequence numbers cross from 21 to 22 digits on the way: any string comparison would show.
    stream = simulator.create_stream("orders", shards=2, first_sequence_number=10**21 - 3000)
    pipeline, sink = run(stream, reader={"get_records_limit": 25})
    keys = [f"order-{n}" for n in range(24)]
    versions = collections.Counter[str]()

    def burst(count: int) -> None:
        for n in range(count):
            key = keys[(n * 7) % len(keys)]
            versions[key] += 1
            if versions[key] % 9 == 0:
                stream.delete_item({"pk": {"S": key}, "sk": {"S": "a"}})
            else:
                stream.put_item(item(key, versions[key]))

    for _ in range(3):
        burst(120)
        # Split while the reader is part-way through the shard: it holds an iterator into what is closing.
        wait_until(lambda: len(sink.records) >= stream.records_written - 60, what="reading under way")
        stream.split_shard()
    burst(120)
    until_delivered(pipeline, sink, stream.records_written)

    assert_exactly_once_in_order(sink, stream)
    assert_replica_equals_table(sink, stream)
    shards = stream.shards()
    closed = [s for s in shards if s.closed]
    assert len(closed) == 3 and len(shards) == 8
    delivered = [r.sequence_number for r in sink.records]
    for shard in closed:
        assert shard.last_sequence_number in delivered, f"the last record of {shard.shard_id} was lost"
    wait_until(lambda: all(pipeline.lineage.is_finished(s.shard_id) for s in closed), what="parents finished")
    position = {r.event_id: n for n, r in enumerate(sink.records)}
    for parent in closed:
        children = [s.shard_id for s in shards if s.parent_shard_id == parent.shard_id]
        assert len(children) == 2
        for child in children:
            child_records = [r for r in sink.records if r.shard_id == child]
            assert child_records, f"child {child} was never read"
            parent_records = [r for r in sink.records if r.shard_id == parent.shard_id]
            for key in {key_of(r) for r in child_records} & {key_of(r) for r in parent_records}:
                last_of_parent = max(position[r.event_id] for r in parent_records if key_of(r) == key)
                first_of_child = min(position[r.event_id] for r in child_records if key_of(r) == key)
                assert last_of_parent < first_of_child


def test_a_chain_of_roll_overs_every_four_hours_is_followed_to_the_newest_shard(
    simulator: StreamSimulator, clock: ManualClock, run: Run
) -> None:
    stream = simulator.create_stream("orders")
    (first,) = stream.open_shard_ids()
    pipeline, sink = run(stream)
    for generation in range(5):
        for n in range(20):
            stream.put_item(item(f"k{n}", generation))
        until_delivered(pipeline, sink, stream.records_written)
        # Four hours later the service has rolled the shard over, and every iterator the reader held has expired.
        clock.advance(4 * HOUR)
    for n in range(20):
        stream.put_item(item(f"k{n}", 99))
    until_delivered(pipeline, sink, stream.records_written)

    assert_exactly_once_in_order(sink, stream)
    assert_replica_equals_table(sink, stream)
    chain = stream.shards()
    assert [s.parent_shard_id for s in chain] == [None] + [s.shard_id for s in chain[:-1]]
    assert len(chain) == 6 and chain[0].shard_id == first
    assert {s.shard_id for s in sink.records} == {s.shard_id for s in chain}  # each found by discovery
    wait_until(
        lambda: all(pipeline.lineage.is_finished(s.shard_id) for s in chain[:-1]), what="closed generations finished"
    )
    assert simulator.counts["GetRecords:ExpiredIteratorException"] >= 1


# -- expiry ----------------------------------------------------------------------------------------------------


def test_an_iterator_that_expires_mid_shard_is_replaced_after_the_last_record_read(
    simulator: StreamSimulator, clock: ManualClock, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    stream = simulator.create_stream("orders")
    for n in range(200):
        stream.put_item(item(f"k{n % 50}", n))
    pages_read: list[ServedCall] = []

    def pause_after_third_page(call: ServedCall) -> None:
        if call.operation == "GetRecords" and call.records:
            pages_read.append(call)
            if len(pages_read) == 3:
                clock.advance(16 * 60)  # the consumer stalls past the 15-minute TTL between two polls

    simulator.on_call(pause_after_third_page)
    caplog.set_level(logging.INFO, logger="pipeline.source.reader")
    pipeline, sink = run(stream, reader={"get_records_limit": 20})
    until_delivered(pipeline, sink, 200)

    assert_exactly_once_in_order(sink, stream)
    calls = simulator.calls()
    expired = [n for n, c in enumerate(calls) if c.error_code == "ExpiredIteratorException"]
    assert len(expired) == 1
    reacquire = calls[expired[0] + 1]
    assert reacquire.operation == "GetShardIterator" and reacquire.iterator_type == "AFTER_SEQUENCE_NUMBER"
    assert reacquire.sequence_number == pages_read[2].sequence_number == sink.records[59].sequence_number
    assert "iterator expired" in caplog.text


# -- throttling and server errors ------------------------------------------------------------------------------


def test_throttling_and_server_errors_on_a_seeded_schedule_are_retried_and_lose_nothing(
    simulator: StreamSimulator, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.faults = FaultSchedule(seed=7, throttle_rate=0.2, error_rate=0.1, expire_rate=0.03, empty_rate=0.05)
    stream = simulator.create_stream("orders", shards=3)
    stream.write_synthetic(600, item_bytes=300)
    caplog.set_level(logging.WARNING)
    pipeline, sink = run(stream, reader={"get_records_limit": 50}, retry={"max_attempts": 4})
    until_delivered(pipeline, sink, 300)
    stream.split_shard()
    stream.write_synthetic(300, item_bytes=300, first=400)  # 200 changes of keys already written, 100 new
    until_delivered(pipeline, sink, stream.records_written)

    assert_exactly_once_in_order(sink, stream)
    assert_replica_equals_table(sink, stream)
    injected = collections.Counter(c.error_code for c in simulator.calls() if c.injected)
    assert injected["LimitExceededException"] >= 5 and injected["InternalServerError"] >= 3
    assert injected["ExpiredIteratorException"] >= 1
    assert "retrying in" in caplog.text  # the pipeline's own back-off took them, not botocore's


# -- trimmed data ----------------------------------------------------------------------------------------------


def _fall_behind_past_retention(
    simulator: StreamSimulator, clock: ManualClock, run: Run
) -> tuple[SimulatedStream, str, str, list[str | None]]:
    """A first run delivers 50 records and stops; 40 more are written an hour later and 30 a day later. When the
    pipeline comes back 25.5 hours after the start, the 40 it still needs have passed the retention."""
    stream = simulator.create_stream("orders")
    (shard,) = stream.open_shard_ids()
    first_run, first_sink = run(stream)
    for n in range(50):
        stream.put_item(item(f"k{n}", 1))
    until_delivered(first_run, first_sink, 50)
    assert first_run.stop() is True
    checkpointed = first_sink.records[-1].sequence_number
    clock.advance(HOUR)
    for n in range(40):
        stream.put_item(item(f"k{n}", 2))
    clock.advance(23.5 * HOUR)
    kept = [stream.put_item(item(f"late{n}", 3)) for n in range(30)]
    clock.advance(HOUR)
    assert sum(s.trimmed for s in stream.shards()) == 90
    return stream, shard, checkpointed, kept


def test_trimmed_records_stop_the_pipeline_by_default_saying_where(
    simulator: StreamSimulator, clock: ManualClock, run: Run
) -> None:
    stream, shard, checkpointed, _kept = _fall_behind_past_retention(simulator, clock, run)
    pipeline, sink = run(stream)
    wait_until(lambda: pipeline.fatal is not None, what="the pipeline to stop")
    assert isinstance(pipeline.fatal, TrimmedDataError)
    message = str(pipeline.fatal)
    assert shard in message and f"after sequence number {checkpointed}" in message
    assert "retention" in message
    assert pipeline.stop() is False
    assert sink.records == []


def test_skip_to_trim_horizon_goes_on_from_the_oldest_kept_record_and_says_so(
    simulator: StreamSimulator,
    clock: ManualClock,
    run: Run,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream, shard, checkpointed, kept = _fall_behind_past_retention(simulator, clock, run)
    readers: list[ShardReader] = []

    class RecordingReader(ShardReader):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            readers.append(self)

    monkeypatch.setattr(pipeline.runner, "ShardReader", RecordingReader)
    caplog.set_level(logging.ERROR, logger="pipeline.source.reader")
    second_run, sink = run(stream, source={"on_trimmed_data": "skip_to_trim_horizon"})
    until_delivered(second_run, sink, 30)

    assert [r.sequence_number for r in sink.records] == kept  # from the oldest kept record on, across 6 roll-overs
    skipped = [r for r in readers if r.trimmed_skips]
    assert [(r.shard_id, r.trimmed_skips) for r in skipped] == [(shard, 1)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert shard in errors[0].getMessage() and f"after sequence number {checkpointed}" in errors[0].getMessage()
    assert "TRIM_HORIZON" in errors[0].getMessage()


# -- the 1 MB page cap -----------------------------------------------------------------------------------------


def test_big_items_come_in_pages_under_1_mb_and_all_arrive(simulator: StreamSimulator, run: Run) -> None:
    stream = simulator.create_stream("documents")
    for n in range(10):
        stream.put_item(item(f"doc{n}", 1, body={"B": bytes([n]) * 300_000}))
    for n in range(5):
        stream.put_item(item(f"doc{n}", 2, body={"B": bytes([n + 100]) * 300_000}))
    pipeline, sink = run(stream)
    until_delivered(pipeline, sink, 15)

    assert_exactly_once_in_order(sink, stream)
    assert_replica_equals_table(sink, stream)
    pages = [c for c in simulator.calls("GetRecords") if c.records]
    assert max(c.body_bytes for c in pages) <= MAX_PAGE_BYTES
    assert len(pages) >= 5  # 3 INSERTs (400 KB each on the wire) or 1 MODIFY (800 KB) fit in a page
    assert sink.records[-1].new_image is not None and sink.records[-1].new_image["body"] == bytes([104]) * 300_000
