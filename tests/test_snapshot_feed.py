"""An initial load's records on their way to the sinks: which sinks get SNAPSHOT records, how a load's pages become
batches that move its segments forward only once a page is whole, and how its pages leave the stream room."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.delivery.batcher import BatchAssembler, BoundedQueue, ClosedBatch
from pipeline.delivery.feed import SinkFeed, SinkFeedSettings
from pipeline.delivery.filters import FilterSettings, compile_filter
from pipeline.records import Batch, ChangeRecord
from pipeline.settings import BatchSettings, load_settings
from pipeline.source.snapshot import SnapshotPage
from tests.factories import change_record, page, snapshot_change, stream_record

LOAD = "load-1"
KEY_NAMES = ("pk", "sk")


def _item(n: int) -> dict[str, Any]:
    return {"pk": {"S": f"customer#{n}"}, "sk": {"S": f"order#{n}"}, "amount": {"N": str(n)}}


def _snapshot(n: int) -> ChangeRecord:
    return snapshot_change(_item(n), load_id=LOAD, index=n, size_bytes=50)


def _mixed() -> Batch:
    records = (
        change_record(sequence=1, event_name="INSERT"),
        _snapshot(1),
        change_record(sequence=2, event_name="REMOVE"),
        _snapshot(2),
    )
    return Batch(records, sum(r.size_bytes for r in records))


def _stream(batch: Batch) -> tuple[ChangeRecord, ...]:
    return tuple(r for r in batch.records if r.event_name != "SNAPSHOT")


def _snapshots(batch: Batch) -> tuple[ChangeRecord, ...]:
    return tuple(r for r in batch.records if r.event_name == "SNAPSHOT")


# --- which sinks get snapshots ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("by_default", "initial_load", "given"),
    [
        (True, None, True),  # the archive, a replica table
        (False, None, False),  # a queue, a topic
        (False, True, True),  # a queue whose entry asks for the load
        (True, False, False),  # a replica whose entry declines it
    ],
)
def test_snapshot_records_go_to_a_sink_by_its_default_unless_its_entry_says(
    by_default: bool, initial_load: bool | None, given: bool
) -> None:
    batch = _mixed()
    feed = SinkFeed.of(SinkFeedSettings(initial_load=initial_load), snapshots_by_default=by_default)
    assert feed.snapshots is given
    prepared = feed.prepare(batch)

    if given:
        assert prepared.batch.records == batch.records
        assert (prepared.filtered, prepared.left_out) == (0, ())
    else:
        assert prepared.batch.records == _stream(batch)
        assert prepared.batch.size_bytes == sum(r.size_bytes for r in _stream(batch))
        assert prepared.filtered == 2
        assert prepared.left_out == _snapshots(batch)
    assert prepared.failed == ()


def test_a_sinks_entry_reads_initial_load_from_the_config() -> None:
    settings = load_settings(
        source={"table_name": "t", "initial_load": "scan"},
        sinks=[{"type": "memory", "name": "changes-only", "initial_load": False}, {"type": "memory", "name": "all"}],
    )
    declined, default = (SinkFeed.of(entry, snapshots_by_default=True) for entry in settings.sinks)
    assert (declined.snapshots, default.snapshots) == (False, True)


def test_a_filter_on_event_name_snapshot_admits_only_the_loads_records() -> None:
    batch = _mixed()
    settings = load_settings(
        source={"table_name": "t"},
        filter={"event_names": ["snapshot"]},  # any case, as the other event names
        sinks=[{"type": "memory", "filter": {"event_names": ["SNAPSHOT"]}}],
    )
    assert compile_filter(settings.filter).select(batch).records == _snapshots(batch)  # the pipeline-wide [filter]

    prepared = SinkFeed.of(settings.sinks[0]).prepare(batch)  # one sink's filter
    assert prepared.batch.records == _snapshots(batch)
    assert (prepared.filtered, prepared.left_out) == (2, _stream(batch))

    changes_only = SinkFeed.of(SinkFeedSettings(filter=FilterSettings(event_names=["INSERT", "MODIFY", "REMOVE"])))
    assert changes_only.prepare(batch).batch.records == _stream(batch)


# --- load pages into batches -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _assembler(*, max_records: int = 100, max_bytes: int = 1_000_000) -> tuple[BatchAssembler, FakeClock]:
    clock = FakeClock()
    settings = BatchSettings(max_records=max_records, max_bytes=max_bytes, max_wait_seconds=1.0)
    assembler = BatchAssembler(settings, table="orders", clock=clock)
    assembler.expect_load(LOAD, KEY_NAMES, "us-east-1")
    return assembler, clock


def _page(segment: int, numbers: range, *, page_number: int, resume: str | None) -> SnapshotPage:
    return SnapshotPage(
        segment=segment,
        items=tuple(_item(n) for n in numbers),
        size_bytes=1000 * len(numbers),
        resume=resume,
        page=page_number,
        read_at=1_700_000_000.0,
    )


def _all(assembler: BatchAssembler, closed: list[ClosedBatch]) -> list[ClosedBatch]:
    rest = assembler.close()
    return closed if rest is None else [*closed, rest]


@pytest.mark.parametrize(
    ("limits", "sizes"),
    [
        ({"max_records": 2}, [2, 2, 1]),
        ({"max_records": 5}, [5]),  # the page's last item closes the batch
        ({"max_bytes": 3000}, [3, 2]),
    ],
    ids=["by-records", "exactly-one-batch", "by-bytes"],
)
def test_only_the_batch_holding_a_pages_last_item_moves_its_segment(limits: dict[str, int], sizes: list[int]) -> None:
    assembler, _ = _assembler(**limits)
    loaded = _page(2, range(5), page_number=3, resume="token-after-page-3")
    batches = _all(assembler, assembler.add(loaded))

    assert [len(b.batch) for b in batches] == sizes
    assert [b.load_pages for b in batches] == [{}] * (len(sizes) - 1) + [{2: ("token-after-page-3", 4, 5, 0)}]
    records = [r for b in batches for r in b.batch.records]
    assert [r.new_image for r in records] == [
        {"pk": f"customer#{n}", "sk": f"order#{n}", "amount": n} for n in range(5)
    ]
    assert all(r.event_name == "SNAPSHOT" and r.load_id == LOAD for r in records)
    assert all(b.positions == {} and b.finished_shards == frozenset() for b in batches)


def test_a_segments_pages_count_only_their_own_items_in_the_batch_that_completes_them() -> None:
    assembler, _ = _assembler(max_records=4)
    first = _page(0, range(3), page_number=0, resume="after-0")
    second = _page(0, range(3, 6), page_number=1, resume="after-1")
    other = _page(1, range(10, 11), page_number=5, resume=None)
    batches = _all(assembler, assembler.add(first) + assembler.add(second) + assembler.add(other))

    assert [len(b.batch) for b in batches] == [4, 3]
    assert batches[0].load_pages == {0: ("after-0", 1, 3, 0)}
    assert batches[1].load_pages == {0: ("after-1", 2, 3, 0), 1: (None, 6, 1, 0)}


def test_two_pages_of_a_segment_ending_in_one_batch_add_up() -> None:
    assembler, _ = _assembler()
    assembler.add(_page(0, range(2), page_number=0, resume="after-0"))
    assembler.add(_page(0, range(2, 5), page_number=1, resume="after-1"))
    (batch,) = _all(assembler, [])
    assert batch.load_pages == {0: ("after-1", 2, 5, 0)}


def test_an_empty_page_still_yields_a_batch_that_moves_its_segment() -> None:
    assembler, clock = _assembler()
    assert assembler.add(_page(3, range(0), page_number=7, resume=None)) == []
    assert not assembler.due()
    clock.now += 1.0
    assert assembler.due()  # a load of empty segments is committed on time, not never

    closed = assembler.close()
    assert closed is not None
    assert len(closed.batch) == 0
    assert closed.load_pages == {3: (None, 8, 0, 0)}


# --- load pages leave the stream room in the queue --------------------------------------------------------


class _WatchedCondition(threading.Condition):
    """A Condition that says when a thread starts waiting on it: a blocked `put` is seen without sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.settled = threading.Event()
        """Set when a thread waits here, or when a `_Put` returns."""

    def wait(self, timeout: float | None = None) -> bool:
        self.settled.set()
        return super().wait(timeout)


class _Put:
    """`put()` on its own thread; `condition.settled` is set once it waits for room or has returned."""

    def __init__(self, put: Callable[[], None], condition: _WatchedCondition) -> None:
        self.returned = threading.Event()
        self.error: BaseException | None = None
        self._condition = condition
        condition.settled.clear()
        threading.Thread(target=self._run, args=(put,), daemon=True).start()

    def _run(self, put: Callable[[], None]) -> None:
        try:
            put()
        except BaseException as exc:
            self.error = exc
        finally:
            self.returned.set()
            self._condition.settled.set()

    def blocked(self) -> bool:
        """True when the put waits for room, False when it returned (the timeout only guards against a hang)."""
        assert self._condition.settled.wait(10.0), "put neither waited nor returned"
        return not self.returned.is_set()

    def done(self) -> bool:
        return self.returned.wait(10.0) and self.error is None


def test_a_load_page_waits_while_the_queue_is_half_full_and_a_stream_page_still_gets_in() -> None:
    queue = BoundedQueue(max_records=10, max_bytes=1_000_000)
    condition = _WatchedCondition()
    queue._cond = condition  # watched, to see a put block without sleeping
    queue.put(page("A", [stream_record(sequence=n) for n in range(1, 5)]))  # 4 of 10

    fits = _Put(lambda: queue.put(_page(0, range(1), page_number=0, resume="r0"), share=0.5), condition)
    assert not fits.blocked() and fits.done()  # 5 of 10: half full, not more
    assert queue.depth[0] == 5

    loaded = _page(0, range(1, 2), page_number=1, resume="r1")
    load_put = _Put(lambda: queue.put(loaded, share=0.5), condition)
    assert load_put.blocked(), "a load page that would fill the queue past half must wait"
    assert queue.depth[0] == 5

    stream_put = _Put(lambda: queue.put(page("B", [stream_record(sequence=n) for n in range(5, 9)])), condition)
    assert stream_put.done(), "a stream page must get into the room the load leaves free"
    assert queue.depth[0] == 9 and not load_put.returned.is_set()

    # Page A and the first load page out: 4 records left, room for the waiting load page within half.
    assert [type(queue.get(timeout=1)).__name__ for _ in range(2)] == ["ShardPage", "SnapshotPage"]
    assert load_put.done()
    assert queue.depth[0] == 5
    assert queue.get(timeout=1) is not None and queue.get(timeout=1) is loaded


def test_pages_of_an_earlier_hold_do_not_add_their_items_to_a_later_holds_position() -> None:
    """A load lost and taken back: a batch may end a page read under the old hold and one read under the new;
    the position is the later page's, and only the new hold's items count (the old one's commit is refused)."""
    assembler = BatchAssembler(BatchSettings(max_records=100), "orders")
    assembler.expect_load("load-1", ("pk",), None)
    old = SnapshotPage(0, tuple({"pk": {"S": f"a{n}"}} for n in range(3)), 30, "after-old", 4, 1.0, hold=1)
    new = SnapshotPage(0, tuple({"pk": {"S": f"b{n}"}} for n in range(2)), 20, "after-new", 4, 1.0, hold=3)
    assembler.add(old)
    assembler.add(new)
    closed = assembler.close()
    assert closed is not None and closed.load_pages == {0: ("after-new", 5, 2, 3)}
