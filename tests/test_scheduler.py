"""The poll pace: a page cut by a limit is followed at once, active shards are polled four times a second, idle
shards back off to the ceiling."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from pipeline.aws import AwsClients
from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.source.reader import ShardPage, ShardReader, StartPosition
from pipeline.source.scheduler import ACTIVE_WINDOW_SECONDS, PollScheduler, ShardProgress
from pipeline.source.stream import ShardInfo
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from tests.factories import page, stream_record


def _scheduler() -> PollScheduler:
    return PollScheduler(
        workers=1,
        deliver=lambda _page: None,
        on_shard_error=lambda _reader, _error: None,
        idle_min_seconds=0.25,
        idle_max_seconds=10.0,
    )


def _reader(limit: int = 3) -> ShardReader:
    shard = ShardInfo("shardId-1", None, "100", None)
    streams: Any = object()  # never called: pacing is decided from the pages alone
    return ShardReader(
        shard,
        stream_arn="arn",
        streams=streams,
        retry=RetryPolicy(RetrySettings()),
        start=StartPosition("TRIM_HORIZON"),
        limit=limit,
    )


def _records(count: int, *, at_limit: bool = False) -> ShardPage:
    return replace(page("shardId-1", [stream_record(sequence=n) for n in range(1, count + 1)]), at_limit=at_limit)


def test_a_page_at_its_limit_is_followed_at_once_and_any_other_after_the_minimum() -> None:
    scheduler, reader = _scheduler(), _reader(limit=3)
    assert scheduler.next_delay(reader, _records(3, at_limit=True)) == 0.0
    assert scheduler.next_delay(reader, _records(1, at_limit=True)) == 0.0  # cut by the 1 MB cap
    assert scheduler.next_delay(reader, _records(1)) == 0.25


def test_a_page_is_at_its_limit_when_cut_by_the_record_limit_or_the_size_cap(aws: EmbeddedAws) -> None:
    """Against the simulated stream over boto3: GetRecords stops at `Limit` records or at 1 MB."""
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders", shards=1)
    for n in range(700):  # ~3.3 KB each on the wire: 1 MB holds about 300
        stream.put_item({"pk": {"S": f"k{n:04d}"}, "sk": {"S": "a"}, "body": {"S": "x" * 3200}})
    streams = AwsClients(aws.region, aws.endpoint_url).client("dynamodbstreams")
    simulator.attach(streams)

    def reader(limit: int) -> ShardReader:
        (shard_id,) = stream.open_shard_ids()
        return ShardReader(
            ShardInfo(shard_id, None, "0", None),
            stream_arn=stream.arn,
            streams=streams,
            retry=RetryPolicy(RetrySettings()),
            start=StartPosition("TRIM_HORIZON"),
            limit=limit,
        )

    by_size = reader(limit=1000)
    pages = []
    for _ in range(4):
        pages.append(by_size.poll())
        by_size.advance(pages[-1])
    counts = [len(p.records) for p in pages]
    assert sum(counts) == 700 and counts[-1] == 0 and 0 < counts[0] < 1000
    assert [p.at_limit for p in pages] == [True, True, False, False]  # the third holds the last ~100

    first = reader(limit=100).poll()  # 100 records are about 330 KB: cut by the count alone
    assert (len(first.records), first.at_limit) == (100, True)
    assert ShardPage("s", (), 0, False).at_limit is False


def test_an_empty_poll_on_a_recently_active_shard_keeps_the_fast_pace() -> None:
    scheduler, reader = _scheduler(), _reader()
    scheduler.progress["shardId-1"] = ShardProgress("shardId-1", last_records_at=time.time() - 5)
    reader.empty_polls = 40
    assert scheduler.next_delay(reader, _records(0)) == 0.25


def test_a_quiet_shard_backs_off_exponentially_to_the_ceiling() -> None:
    scheduler, reader = _scheduler(), _reader()
    scheduler.progress["shardId-1"] = ShardProgress(
        "shardId-1", last_records_at=time.time() - ACTIVE_WINDOW_SECONDS - 1
    )
    delays = []
    for empty in range(1, 9):
        reader.empty_polls = empty
        delays.append(scheduler.next_delay(reader, _records(0)))
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    reader.empty_polls = 5000  # hours idle: capped, no overflow
    assert scheduler.next_delay(reader, _records(0)) == 10.0


def test_a_shard_that_never_had_records_backs_off_from_the_start() -> None:
    scheduler, reader = _scheduler(), _reader()
    reader.empty_polls = 3
    assert scheduler.next_delay(reader, _records(0)) == 1.0


def test_a_page_whose_hand_off_fails_is_read_again_and_nothing_is_lost(aws: EmbeddedAws) -> None:
    """The reader moves past a page only once it is queued: a failure in between (here the first hand-off raises)
    leaves it where it was, so the next poll returns the same records."""
    simulator = StreamSimulator()
    stream = simulator.create_stream("orders", shards=1)
    for n in range(30):
        stream.put_item({"pk": {"S": f"k{n:02d}"}, "sk": {"S": "a"}})
    streams = AwsClients(aws.region, aws.endpoint_url).client("dynamodbstreams")
    simulator.attach(streams)
    state = stream.shards()[0]
    shard = ShardInfo(state.shard_id, None, state.starting_sequence_number, None)
    reader = ShardReader(
        shard,
        stream_arn=stream.arn,
        streams=streams,
        retry=RetryPolicy(RetrySettings()),
        start=StartPosition("TRIM_HORIZON"),
        limit=10,
    )
    handed: list[str] = []
    failures = []

    def deliver(page: ShardPage) -> None:
        if page.records and not failures:
            failures.append(page)
            raise RuntimeError("the queue refused the page")
        handed.extend(r["dynamodb"]["SequenceNumber"] for r in page.records)

    scheduler = PollScheduler(
        workers=1,
        deliver=deliver,
        on_shard_error=lambda _reader, _error: 0.0,  # try the shard again at once
        idle_min_seconds=0.01,
        idle_max_seconds=0.01,
    )
    scheduler.add(reader)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while len(handed) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop(timeout=5)
    assert failures and [r["dynamodb"]["SequenceNumber"] for r in failures[0].records] == handed[:10]
    assert handed == [r["dynamodb"]["SequenceNumber"] for r in stream.records()]
