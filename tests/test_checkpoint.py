"""CheckpointStore against the moto server: many shards per commit, merged state, throttled batch writes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import unique

STREAM = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"


class _LeavesSomeUnprocessed:
    """The real client, except that the first `times` BatchWriteItem calls apply only half their items and
    hand the rest back as UnprocessedItems, as DynamoDB does when throttled."""

    def __init__(self, client: Any, times: int) -> None:
        self._client = client
        self._times = times
        self.batch_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def batch_write_item(self, RequestItems: dict[str, list[Any]]) -> dict[str, Any]:
        self.batch_calls += 1
        if self._times <= 0:
            return dict(self._client.batch_write_item(RequestItems=RequestItems))
        self._times -= 1
        (table, requests), *_ = RequestItems.items()
        half = len(requests) // 2
        self._client.batch_write_item(RequestItems={table: requests[:half]})
        return {"UnprocessedItems": {table: requests[half:]}}


def _store(dynamodb: Any, table: str) -> CheckpointStore:
    policy = RetryPolicy(RetrySettings(max_attempts=5, initial_delay_seconds=0.01, max_delay_seconds=0.02))
    store = CheckpointStore(dynamodb, table_name=table, stream_arn=STREAM, consumer_name="test", retry=policy)
    store.ensure_table(create=True)
    return store


def test_a_commit_of_many_shards_is_read_back_exactly(aws: EmbeddedAws) -> None:
    table = unique("checkpoints")
    store = _store(aws.client("dynamodb"), table)
    when = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)
    positions = {f"shardId-{n:04d}": str(10**20 + n * 7) for n in range(60)}

    store.save(positions, {"shardId-0003"}, {shard: when for shard in positions})

    loaded = _store(aws.client("dynamodb"), table).load()
    assert {shard: cp.sequence_number for shard, cp in loaded.items()} == positions
    assert {shard for shard, cp in loaded.items() if cp.finished} == {"shardId-0003"}
    assert {cp.last_record_at for cp in loaded.values()} == {when.isoformat()}


def test_a_later_save_keeps_what_it_does_not_change(aws: EmbeddedAws) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("checkpoints")
    first = _store(dynamodb, table)
    when = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)
    first.save({"a": "100", "b": "200"}, record_times={"a": when, "b": when})

    second = _store(dynamodb, table)  # a restarted pipeline: knows only what it loads
    second.load()
    second.save({}, {"a"})
    second.save({"b": "250"})

    loaded = second.load()
    assert (loaded["a"].sequence_number, loaded["a"].finished, loaded["a"].last_record_at) == (
        "100",
        True,
        when.isoformat(),
    )
    assert (loaded["b"].sequence_number, loaded["b"].finished, loaded["b"].last_record_at) == (
        "250",
        False,
        when.isoformat(),
    )


def test_unprocessed_items_are_written_again(aws: EmbeddedAws) -> None:
    table = unique("checkpoints")
    throttled = _LeavesSomeUnprocessed(aws.client("dynamodb"), times=2)
    store = _store(throttled, table)
    positions = {f"shardId-{n:02d}": str(500 + n) for n in range(20)}

    store.save(positions)

    assert throttled.batch_calls == 3
    assert {s: cp.sequence_number for s, cp in _store(aws.client("dynamodb"), table).load().items()} == positions
