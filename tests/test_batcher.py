"""The bounded queue between readers and delivery, and the closing of batches."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.delivery.batcher import BatchAssembler, BoundedQueue, ClosedBatch, QueueClosedError
from pipeline.settings import BatchSettings
from pipeline.source.reader import ShardPage
from tests.factories import page, stream_record

# Blocking behaviour is checked against generous bounds: a call that should block is still blocked after
# BLOCKED_FOR, and a call that should return does so within RETURNS_WITHIN.
BLOCKED_FOR = 0.2
RETURNS_WITHIN = 5.0


class _Call:
    """Runs `fn` on a daemon thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def still_blocked(self) -> bool:
        return not self.done.wait(BLOCKED_FOR)

    def finished(self) -> bool:
        return self.done.wait(RETURNS_WITHIN)


def _records(count: int, *, start: int = 1, size_bytes: int = 100) -> list[dict[str, Any]]:
    return [stream_record(sequence=n, size_bytes=size_bytes) for n in range(start, start + count)]


# --- BoundedQueue ------------------------------------------------------------------------------------------


def test_queue_is_fifo_and_tracks_depth() -> None:
    queue = BoundedQueue(max_records=100, max_bytes=1_000_000)
    first, second = page("A", _records(2)), page("B", _records(3))
    queue.put(first)
    queue.put(second)
    assert queue.depth == (5, first.size_bytes + second.size_bytes)
    assert queue.get(timeout=1) is first
    assert queue.depth == (3, second.size_bytes)
    assert queue.get(timeout=1) is second
    assert queue.depth == (0, 0)
    assert queue.peak_records == 5


def test_put_blocks_while_full_by_records_until_a_get_makes_room() -> None:
    queue = BoundedQueue(max_records=3, max_bytes=1_000_000)
    queue.put(page("A", _records(2)))
    blocked = _Call(lambda: queue.put(page("A", _records(2, start=3))))
    assert blocked.still_blocked()
    assert queue.depth[0] == 2

    assert queue.get(timeout=1) is not None
    assert blocked.finished()
    assert blocked.error is None
    assert queue.depth[0] == 2


def test_put_blocks_while_full_by_bytes_until_a_get_makes_room() -> None:
    queue = BoundedQueue(max_records=1000, max_bytes=1000)
    queue.put(page("A", _records(1), size_bytes=700))
    blocked = _Call(lambda: queue.put(page("A", _records(1, start=2), size_bytes=400)))
    assert blocked.still_blocked()

    assert queue.get(timeout=1) is not None
    assert blocked.finished()
    assert blocked.error is None
    assert queue.depth == (1, 400)


def test_a_page_that_fits_exactly_does_not_block() -> None:
    queue = BoundedQueue(max_records=4, max_bytes=1000)
    queue.put(page("A", _records(2), size_bytes=500))
    queue.put(page("A", _records(2, start=3), size_bytes=500))
    assert queue.depth == (4, 1000)


def test_an_oversize_page_is_admitted_into_an_empty_queue() -> None:
    queue = BoundedQueue(max_records=2, max_bytes=1024)
    huge = page("A", _records(10), size_bytes=10_000)
    admitted = _Call(lambda: queue.put(huge))
    assert admitted.finished()
    assert admitted.error is None
    assert queue.depth == (10, 10_000)

    # ...but nothing joins it until it is drained.
    after = _Call(lambda: queue.put(page("A", _records(1, start=11))))
    assert after.still_blocked()
    assert queue.get(timeout=1) is huge
    assert after.finished()
    assert after.error is None


def test_get_on_an_empty_queue_times_out_with_none() -> None:
    queue = BoundedQueue(max_records=10, max_bytes=10_000)
    assert queue.get(timeout=0.05) is None


def test_get_wakes_when_a_page_arrives() -> None:
    queue = BoundedQueue(max_records=10, max_bytes=10_000)
    waiting = _Call(lambda: queue.get(timeout=RETURNS_WITHIN * 2))
    assert waiting.still_blocked()
    arriving = page("A", _records(1))
    queue.put(arriving)
    assert waiting.finished()
    assert waiting.result is arriving


def test_close_wakes_a_blocked_put_with_queue_closed_error() -> None:
    queue = BoundedQueue(max_records=1, max_bytes=10_000)
    queued = page("A", _records(1))
    queue.put(queued)
    blocked = _Call(lambda: queue.put(page("A", _records(1, start=2))))
    assert blocked.still_blocked()

    queue.close()
    assert blocked.finished()
    assert isinstance(blocked.error, QueueClosedError)
    # What was queued before the close can still be drained; nothing more gets in.
    assert queue.get(timeout=1) is queued
    assert queue.get(timeout=0.01) is None
    with pytest.raises(QueueClosedError):
        queue.put(page("A", _records(1, start=3)))


# --- BatchAssembler ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _assembler(
    *, max_records: int = 100, max_bytes: int = 1_000_000, max_wait_seconds: float = 1.0
) -> tuple[BatchAssembler, FakeClock]:
    clock = FakeClock()
    batch_settings = BatchSettings(max_records=max_records, max_bytes=max_bytes, max_wait_seconds=max_wait_seconds)
    return BatchAssembler(batch_settings, table="orders", clock=clock), clock


def _ids(closed: ClosedBatch) -> list[str]:
    return [r.event_id for r in closed.batch.records]


def test_batches_close_on_max_records() -> None:
    assembler, _ = _assembler(max_records=3)
    raws = _records(7)
    closed = assembler.add(page("A", raws))
    assert [len(c.batch) for c in closed] == [3, 3]
    assert _ids(closed[0]) == [r["eventID"] for r in raws[0:3]]
    assert _ids(closed[1]) == [r["eventID"] for r in raws[3:6]]
    assert closed[0].positions == {"A": "3"}
    assert closed[1].positions == {"A": "6"}

    rest = assembler.close()
    assert rest is not None
    assert _ids(rest) == [raws[6]["eventID"]]
    assert rest.positions == {"A": "7"}
    assert assembler.close() is None


def test_batches_close_on_max_records_across_pages() -> None:
    assembler, _ = _assembler(max_records=4)
    assert assembler.add(page("A", _records(3))) == []
    closed = assembler.add(page("B", _records(3, start=10)))
    assert len(closed) == 1
    assert [(r.shard_id, r.sequence_number) for r in closed[0].batch.records] == [
        ("A", "1"),
        ("A", "2"),
        ("A", "3"),
        ("B", "10"),
    ]
    assert closed[0].positions == {"A": "3", "B": "10"}


def test_batches_close_when_they_reach_max_bytes() -> None:
    assembler, _ = _assembler(max_bytes=2048)
    closed = assembler.add(page("A", _records(5, size_bytes=1024)))
    assert [len(c.batch) for c in closed] == [2, 2]
    assert [c.batch.size_bytes for c in closed] == [2048, 2048]
    rest = assembler.close()
    assert rest is not None
    assert rest.batch.size_bytes == 1024


def test_a_batch_closes_after_max_wait_from_its_first_record() -> None:
    assembler, clock = _assembler(max_wait_seconds=1.0)
    assert not assembler.due()
    assert assembler.seconds_until_due() == 1.0

    assert assembler.add(page("A", _records(1))) == []
    clock.now += 0.6
    assert assembler.add(page("A", _records(1, start=2))) == []  # a later record does not restart the wait
    assert not assembler.due()
    assert assembler.seconds_until_due() == pytest.approx(0.4)

    clock.now += 0.4
    assert assembler.due()
    assert assembler.seconds_until_due() == 0.0
    clock.now += 5
    assert assembler.seconds_until_due() == 0.0

    closed = assembler.close()
    assert closed is not None
    assert [r.sequence_number for r in closed.batch.records] == ["1", "2"]
    # The next batch's wait starts with its own first record.
    assert not assembler.due()
    assert assembler.seconds_until_due() == 1.0


def test_an_empty_assembler_is_never_due_and_closes_to_nothing() -> None:
    assembler, clock = _assembler()
    clock.now += 3600
    assert not assembler.due()
    assert assembler.close() is None
    assert assembler.add(page("A", [])) == []
    clock.now += 3600
    assert not assembler.due()
    assert assembler.close() is None


def test_positions_are_the_last_sequence_of_each_shard_and_shard_order_is_kept() -> None:
    assembler, _ = _assembler()
    assembler.add(page("A", [stream_record(sequence=n) for n in (5, 9)]))
    assembler.add(page("B", [stream_record(sequence=n) for n in (100, 101, 102)]))
    assembler.add(page("A", [stream_record(sequence=n) for n in (10, 11)]))
    closed = assembler.close()
    assert closed is not None
    assert closed.positions == {"A": "11", "B": "102"}
    by_shard: dict[str, list[str]] = {}
    for record in closed.batch.records:
        by_shard.setdefault(record.shard_id, []).append(record.sequence_number)
    assert by_shard == {"A": ["5", "9", "10", "11"], "B": ["100", "101", "102"]}
    assert closed.finished_shards == frozenset()


def test_records_are_unmarshalled_with_table_and_shard() -> None:
    assembler, _ = _assembler()
    assembler.add(page("shardId-7", [stream_record(new_image={"pk": {"S": "x"}, "n": {"N": "1.50"}})]))
    closed = assembler.close()
    assert closed is not None
    (record,) = closed.batch.records
    assert (record.table, record.shard_id) == ("orders", "shardId-7")
    assert record.new_image is not None
    assert str(record.new_image["n"]) == "1.50"


def test_end_of_shard_marks_the_batch_holding_the_shards_last_records() -> None:
    assembler, _ = _assembler()
    assembler.add(page("A", _records(2)))
    assembler.add(page("B", _records(1, start=50)))
    assembler.add(page("A", _records(2, start=3), end_of_shard=True))
    closed = assembler.close()
    assert closed is not None
    assert closed.finished_shards == frozenset({"A"})
    assert closed.positions == {"A": "4", "B": "50"}


def test_end_of_shard_across_batches_marks_only_the_batch_with_the_last_record() -> None:
    assembler, _ = _assembler(max_records=3)
    closed = assembler.add(page("A", _records(5), end_of_shard=True))
    assert len(closed) == 1
    assert closed[0].finished_shards == frozenset()
    rest = assembler.close()
    assert rest is not None
    assert rest.positions == {"A": "5"}
    assert rest.finished_shards == frozenset({"A"})


def test_end_of_shard_is_not_lost_when_its_last_record_closes_a_batch() -> None:
    assembler, clock = _assembler(max_records=2, max_wait_seconds=1.0)
    closed = assembler.add(page("A", _records(2), end_of_shard=True))
    assert len(closed) == 1
    assert closed[0].positions == {"A": "2"}
    # The shard may only be marked finished once a batch at or after its last record commits.
    assert closed[0].finished_shards in (frozenset(), frozenset({"A"}))
    if closed[0].finished_shards:
        assert assembler.close() is None
        return
    assert not assembler.due()
    clock.now += 1.0
    assert assembler.due()
    marker = assembler.close()
    assert marker is not None
    assert len(marker.batch) == 0
    assert marker.finished_shards == frozenset({"A"})


def test_an_end_of_shard_page_with_no_records_produces_a_batch_once_due() -> None:
    assembler, clock = _assembler(max_wait_seconds=2.0)
    assert assembler.add(page("A", [], end_of_shard=True)) == []
    assert not assembler.due()
    assert assembler.seconds_until_due() == 2.0
    clock.now += 2.0
    assert assembler.due()
    closed = assembler.close()
    assert closed is not None
    assert len(closed.batch) == 0
    assert closed.batch.size_bytes == 0
    assert closed.positions == {}
    assert closed.finished_shards == frozenset({"A"})
    assert assembler.close() is None


# --- property: whatever the pages, batches keep every record once, in order, within limits -----------------

_SHARDS = ("A", "B", "C")


@st.composite
def _page_streams(draw: st.DrawFn) -> list[ShardPage]:
    """Pages from up to three shards, interleaved; each shard's sequences increase and it may end."""
    next_sequence = dict.fromkeys(_SHARDS, 1)
    ended: set[str] = set()
    pages: list[ShardPage] = []
    for _ in range(draw(st.integers(0, 12))):
        open_shards = [s for s in _SHARDS if s not in ended]
        if not open_shards:
            break
        shard = draw(st.sampled_from(open_shards))
        sizes = draw(st.lists(st.integers(0, 1500), max_size=6))
        records = []
        for size in sizes:
            n = next_sequence[shard]
            next_sequence[shard] += draw(st.integers(1, 1000))
            records.append(stream_record(sequence=n, size_bytes=size, event_id=f"{shard}-{n}"))
        end = draw(st.booleans())
        if end:
            ended.add(shard)
        pages.append(page(shard, records, end_of_shard=end))
    return pages


@settings(deadline=None, max_examples=60)
@given(_page_streams(), st.integers(1, 8), st.integers(1024, 4096))
def test_batches_keep_every_record_once_in_order_within_limits(
    pages: list[ShardPage], max_records: int, max_bytes: int
) -> None:
    assembler, _ = _assembler(max_records=max_records, max_bytes=max_bytes)
    batches: list[ClosedBatch] = []
    for p in pages:
        batches.extend(assembler.add(p))
    last = assembler.close()
    if last is not None:
        batches.append(last)

    sent = [r["eventID"] for p in pages for r in p.records]
    assert [eid for b in batches for eid in _ids(b)] == sent

    for b in batches:
        assert len(b.batch) <= max_records
        assert b.batch.size_bytes == sum(r.size_bytes for r in b.batch.records)
        # A batch closes as soon as it reaches max_bytes, so only its last record can take it there.
        assert b.batch.size_bytes - (b.batch.records[-1].size_bytes if b.batch.records else 0) < max_bytes
        expected_positions = {r.shard_id: r.sequence_number for r in b.batch.records}
        assert b.positions == expected_positions

    # A shard that ended is finished in exactly one batch, at or after the one holding its last record.
    ended = {p.shard_id for p in pages if p.end_of_shard}
    for shard in ended:
        marking = [i for i, b in enumerate(batches) if shard in b.finished_shards]
        assert len(marking) == 1
        holding = [i for i, b in enumerate(batches) if shard in b.positions]
        assert not holding or marking[0] >= max(holding)
    assert all(b.finished_shards <= ended for b in batches)


def test_a_batch_never_exceeds_max_bytes_when_records_do_not_fit_evenly() -> None:
    assembler = BatchAssembler(BatchSettings(max_records=100, max_bytes=1024), table="t")
    records = [stream_record(sequence=10**20 + n, size_bytes=600) for n in range(5)]
    closed = assembler.add(page("shardId-a", records))
    last = assembler.close()
    assert last is not None
    batches = [*closed, last]
    assert [b.batch.size_bytes for b in batches] == [600] * 5
    assert [r.sequence_number for b in batches for r in b.batch.records] == [str(10**20 + n) for n in range(5)]
