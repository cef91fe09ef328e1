"""CheckpointStore against the moto server: many shards per commit, merged state, fenced writes, throttling."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import unique

STREAM = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"


class _Throttles:
    """The real client, except that the first `times` calls of `operation` fail as DynamoDB throttling does."""

    def __init__(self, client: Any, operation: str, times: int) -> None:
        self._client = client
        self._operation = operation
        self.times = times
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        if name != self._operation:
            return real

        def call(**kwargs: Any) -> Any:
            self.calls += 1
            if self.times > 0:
                self.times -= 1
                raise ClientError(
                    {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"}}, name
                )
            return real(**kwargs)

        return call


def _store(dynamodb: Any, table: str, worker: str = "worker-1") -> CheckpointStore:
    policy = RetryPolicy(RetrySettings(max_attempts=5, initial_delay_seconds=0.01, max_delay_seconds=0.02))
    store = CheckpointStore(
        dynamodb, table_name=table, stream_arn=STREAM, consumer_name="test", retry=policy, worker=worker
    )
    store.ensure_table(create=True)
    return store


def _leased(store: CheckpointStore, shard_ids: list[str]) -> None:
    """Rows for the shards, and their leases, as a worker's first pass would leave them."""
    store.register((s, None) for s in shard_ids)
    rows = store.load()
    for shard_id in shard_ids:
        assert store.take(rows[shard_id]) is not None


def test_a_commit_of_many_shards_is_read_back_exactly(aws: EmbeddedAws) -> None:
    table = unique("checkpoints")
    store = _store(aws.client("dynamodb"), table)
    when = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)
    positions = {f"shardId-{n:04d}": str(10**20 + n * 7) for n in range(60)}
    _leased(store, list(positions))

    assert store.save(positions, {"shardId-0003"}, {shard: when for shard in positions}) == {}

    loaded = _store(aws.client("dynamodb"), table).load()
    assert {shard: cp.sequence_number for shard, cp in loaded.items()} == positions
    assert {shard for shard, cp in loaded.items() if cp.finished} == {"shardId-0003"}
    assert {cp.last_record_at for cp in loaded.values()} == {when.isoformat()}
    assert {cp.owner for cp in loaded.values()} == {"worker-1"}


def test_a_later_save_keeps_what_it_does_not_change(aws: EmbeddedAws) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("checkpoints")
    first = _store(dynamodb, table)
    _leased(first, ["a", "b"])
    when = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)
    first.save({"a": "100", "b": "200"}, record_times={"a": when, "b": when})

    second = _store(dynamodb, table, worker="worker-2")  # a restarted pipeline: knows only what it loads
    for row in second.load().values():
        assert second.take(row) is not None  # the first worker's process is gone
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


def test_a_worker_that_lost_a_lease_cannot_move_its_checkpoint(aws: EmbeddedAws) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("checkpoints")
    zombie = _store(dynamodb, table, worker="paused")
    _leased(zombie, ["a", "b"])
    zombie.save({"a": "100", "b": "100"})
    peer = _store(dynamodb, table, worker="peer")
    assert peer.take(peer.load()["a"]) is not None  # the paused worker's heartbeat stopped moving

    refused = zombie.save({"a": "150", "b": "150"})  # it wakes up with a batch it delivered before the pause

    assert list(refused) == ["a"]
    loaded = peer.load()
    assert (loaded["a"].sequence_number, loaded["a"].owner) == ("100", "peer")
    assert (loaded["b"].sequence_number, loaded["b"].owner) == ("150", "paused")
    assert peer.save({"a": "170"}) == {}
    assert peer.load()["a"].sequence_number == "170"


def test_a_lease_given_up_and_taken_again_refuses_the_epoch_that_held_it_before(aws: EmbeddedAws) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("checkpoints")
    worker = _store(dynamodb, table, worker="w")
    _leased(worker, ["a"])
    stale = worker.checkpoint("a")
    assert stale is not None
    worker.release(["a"])
    again = worker.take(worker.load()["a"])
    assert again is not None and again.lease_epoch == stale.lease_epoch + 2

    twin = _store(dynamodb, table, worker="w")  # the same name, holding what the first epoch held
    twin._known["a"] = stale
    twin._held["a"] = stale.lease_epoch
    assert twin.save({"a": "999"}) == {"a": stale.lease_epoch}
    assert worker.save({"a": "500"}) == {}
    assert worker.load()["a"].sequence_number == "500"


def test_registering_a_shard_never_resets_a_row_another_worker_moved_on(aws: EmbeddedAws) -> None:
    dynamodb = aws.client("dynamodb")
    table = unique("checkpoints")
    first = _store(dynamodb, table, worker="first")
    _leased(first, ["a"])
    first.save({"a": "100"})

    late = _store(dynamodb, table, worker="late")  # listed the stream before the first worker wrote its rows
    late.register([("a", None)])
    late.register([("a", None)], overwrite=True)

    row = first.load()["a"]
    assert (row.sequence_number, row.owner) == ("100", "first")


def test_sequence_numbers_are_compared_as_numbers(aws: EmbeddedAws) -> None:
    store = _store(aws.client("dynamodb"), unique("checkpoints"))
    _leased(store, ["a"])
    store.save({"a": "100"})

    store.save({"a": "99"})  # "99" > "100" as text: a string comparison would move the checkpoint back

    assert store.load()["a"].sequence_number == "100"


def test_throttled_checkpoint_writes_are_written_again(aws: EmbeddedAws) -> None:
    table = unique("checkpoints")
    throttled = _Throttles(aws.client("dynamodb"), "update_item", times=0)
    store = _store(throttled, table)
    positions = {f"shardId-{n:02d}": str(500 + n) for n in range(20)}
    _leased(store, list(positions))
    throttled.calls, throttled.times = 0, 2

    assert store.save(positions) == {}

    assert throttled.calls == 22
    assert {s: cp.sequence_number for s, cp in _store(aws.client("dynamodb"), table).load().items()} == positions
