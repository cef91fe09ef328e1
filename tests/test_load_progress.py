"""LoadStore against a moto checkpoint table: one load per stream whatever restarts say, progress that round-trips,
and writes fenced on owner and lease epoch so that a worker that lost the load cannot move it."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.state.load_progress import LoadLostError, LoadState, LoadStore, SegmentProgress
from tests.conftest import unique

STREAM = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"
_NO_WAIT = RetryPolicy(
    RetrySettings(max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0), sleep=lambda _: None
)


@pytest.fixture
def checkpoint_table(dynamodb: Any) -> str:
    """A checkpoint table as the pipeline creates it (`checkpoint.create_table`)."""
    name = unique("checkpoints")
    CheckpointStore(
        dynamodb, table_name=name, stream_arn=STREAM, consumer_name="test", retry=_NO_WAIT, worker="setup"
    ).ensure_table(create=True)
    return name


@pytest.fixture
def partition() -> str:
    return unique("stream-partition")


def _store(dynamodb: Any, table: str, partition: str, worker: str) -> LoadStore:
    return LoadStore(dynamodb, table_name=table, partition=partition, retry=_NO_WAIT, worker=worker)


def _begun(store: LoadStore, load_id: str = "load-1", segments: int = 4) -> LoadState:
    return store.begin(load_id, "scan", segments, estimated_items=1000, since=1_767_225_600.25)


def test_begin_records_one_load_and_a_second_begin_keeps_it(
    dynamodb: Any, checkpoint_table: str, partition: str
) -> None:
    store = _store(dynamodb, checkpoint_table, partition, "worker-a")
    first = _begun(store)
    assert (first.load_id, first.mode, first.phase, first.segments) == ("load-1", "scan", "loading", 4)
    assert first.progress == {s: SegmentProgress() for s in range(4)}
    assert (first.estimated_items, first.since, first.owner, first.lease_epoch) == (1000, 1_767_225_600.25, None, 0)

    # A restart with another id and another configuration resumes the load recorded, as it was recorded.
    again = _store(dynamodb, checkpoint_table, partition, "worker-b").begin("load-2", "export", 8, None, None)
    assert again == first
    assert store.read() == first


def test_a_worker_that_took_the_load_saves_progress(dynamodb: Any, checkpoint_table: str, partition: str) -> None:
    store = _store(dynamodb, checkpoint_table, partition, "worker-a")
    taken = store.take(_begun(store))
    assert taken is not None and store.holding
    assert (taken.owner, taken.lease_epoch) == ("worker-a", 1)

    store.save({0: SegmentProgress(resume='{"pk": {"S": "a"}}', next_page=1, items=25)})
    state = store.read()
    assert state is not None and state.progress[0] == SegmentProgress('{"pk": {"S": "a"}}', 1, 25, False)


def test_a_worker_whose_load_was_taken_over_cannot_save(dynamodb: Any, checkpoint_table: str, partition: str) -> None:
    a = _store(dynamodb, checkpoint_table, partition, "worker-a")
    b = _store(dynamodb, checkpoint_table, partition, "worker-b")
    assert a.take(_begun(a)) is not None
    a.save({0: SegmentProgress(resume="a-token", next_page=1, items=10)})

    state = b.read()
    assert state is not None
    taken = b.take(state)  # A's owner is gone, as the caller judged: the epoch moves on
    assert taken is not None and (taken.owner, taken.lease_epoch) == ("worker-b", 2)

    with pytest.raises(LoadLostError):
        a.save({0: SegmentProgress(resume="stale-token", next_page=2, items=20)})
    assert not a.holding
    with pytest.raises(LoadLostError):  # and every other write of A's is refused too
        a.finish()
    after = b.read()
    assert after is not None and after.progress[0].resume == "a-token" and after.phase == "loading"

    b.save({0: SegmentProgress(resume="b-token", next_page=2, items=20)})
    saved = b.read()
    assert saved is not None and saved.progress[0].resume == "b-token"


def test_the_epoch_fences_an_older_process_of_the_same_worker_id(
    dynamodb: Any, checkpoint_table: str, partition: str
) -> None:
    """A worker id that outlives its process (a host name, a pod name): the owner alone would not tell them apart."""
    old = _store(dynamodb, checkpoint_table, partition, "worker-a")
    assert old.take(_begun(old)) is not None
    restarted = _store(dynamodb, checkpoint_table, partition, "worker-a")
    state = restarted.read()
    assert state is not None and restarted.take(state) is not None

    with pytest.raises(LoadLostError):
        old.save({0: SegmentProgress(resume="old-token", next_page=1)})
    restarted.save({0: SegmentProgress(resume="new-token", next_page=1)})
    saved = restarted.read()
    assert saved is not None and saved.progress[0].resume == "new-token"


def test_a_released_load_is_taken_by_another_worker_at_once(
    dynamodb: Any, checkpoint_table: str, partition: str
) -> None:
    a = _store(dynamodb, checkpoint_table, partition, "worker-a")
    b = _store(dynamodb, checkpoint_table, partition, "worker-b")
    assert a.take(_begun(a)) is not None
    a.release()
    assert not a.holding
    released = b.read()
    assert released is not None and released.owner is None

    taken = b.take(released)
    assert taken is not None and taken.owner == "worker-b"
    with pytest.raises(LoadLostError):
        a.save({1: SegmentProgress(next_page=1)})
    b.save({1: SegmentProgress(next_page=1, items=3)})


def test_finish_and_mark_done_move_the_phase(dynamodb: Any, checkpoint_table: str, partition: str) -> None:
    store = _store(dynamodb, checkpoint_table, partition, "worker-a")
    assert store.take(_begun(store)) is not None

    store.finish()
    finished = store.read()
    assert finished is not None and finished.phase == "finished"
    assert finished.finished_at is not None and finished.done_at is None

    store.mark_done(cleaned=7)
    done = store.read()
    assert done is not None and done.phase == "done" and done.done_at is not None
    assert done.finished_at == finished.finished_at
    item = dynamodb.get_item(
        TableName=checkpoint_table, Key={"stream": {"S": partition}, "shard_id": {"S": "#load"}}, ConsistentRead=True
    )["Item"]
    assert item["cleaned"] == {"N": "7"}


def test_the_progress_map_round_trips_tokens_pages_counts_and_done(
    dynamodb: Any, checkpoint_table: str, partition: str
) -> None:
    store = _store(dynamodb, checkpoint_table, partition, "worker-a")
    assert store.take(_begun(store)) is not None
    token = '{"pk": {"S": "customer#7"}, "sk": {"B": "AP8="}}'
    store.save(
        {
            0: SegmentProgress(resume=token, next_page=3, items=300),
            2: SegmentProgress(resume=None, next_page=9, items=812, done=True),
        }
    )
    state = store.read()
    assert state is not None
    assert state.progress == {
        0: SegmentProgress(token, 3, 300, False),
        1: SegmentProgress(),
        2: SegmentProgress(None, 9, 812, True),
        3: SegmentProgress(),
    }
    assert (state.items, state.segments_done) == (1112, 1)

    store.save({0: SegmentProgress(resume=None, next_page=4, items=310, done=True)})  # the token goes
    moved = store.read()
    assert moved is not None and moved.progress[0] == SegmentProgress(None, 4, 310, True)


def test_of_two_workers_taking_the_same_state_at_once_exactly_one_wins(
    dynamodb: Any, checkpoint_table: str, partition: str
) -> None:
    state = _begun(_store(dynamodb, checkpoint_table, partition, "setup"))
    stores = {name: _store(dynamodb, checkpoint_table, partition, name) for name in ("worker-a", "worker-b")}
    together = threading.Barrier(len(stores))
    results: dict[str, LoadState | None] = {}

    def take(name: str) -> None:
        together.wait()
        results[name] = stores[name].take(state)

    threads = [threading.Thread(target=take, args=(name,)) for name in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [name for name, taken in results.items() if taken is not None]
    assert len(winners) == 1 and len(results) == 2
    (winner,) = winners
    (loser,) = set(stores) - {winner}
    assert stores[winner].holding and not stores[loser].holding
    final = stores[winner].read()
    assert final is not None and (final.owner, final.lease_epoch) == (winner, 1)
    with pytest.raises(LoadLostError):
        stores[loser].save({0: SegmentProgress(next_page=1)})
    stores[winner].save({0: SegmentProgress(next_page=1)})
