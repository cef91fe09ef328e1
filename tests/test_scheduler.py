"""The poll pace: full pages at once, active shards four times a second, idle shards backing off to the ceiling."""

from __future__ import annotations

import time
from typing import Any

from pipeline.reader import ShardPage, ShardReader, StartPosition
from pipeline.retry import RetryPolicy
from pipeline.scheduler import ACTIVE_WINDOW_SECONDS, PollScheduler, ShardProgress
from pipeline.settings import RetrySettings
from pipeline.stream import ShardInfo
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


def _records(count: int) -> ShardPage:
    return page("shardId-1", [stream_record(sequence=n) for n in range(1, count + 1)])


def test_a_full_page_is_followed_at_once_and_a_partial_one_after_the_minimum() -> None:
    scheduler, reader = _scheduler(), _reader(limit=3)
    assert scheduler.next_delay(reader, _records(3)) == 0.0
    assert scheduler.next_delay(reader, _records(1)) == 0.25


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
