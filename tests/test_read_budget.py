"""The scan load's read budget on a fake clock, its resume tokens, and `TableScanSource` against moto: a parallel
scan's segments cover the table exactly once, a segment resumes where a page left it, within the budget."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import pytest

from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.source.snapshot import SnapshotPage, SnapshotSourceError
from pipeline.source.table_scan import ReadBudget, TableScanSource, decode_start_key, encode_start_key
from tests.conftest import unique

_NO_WAIT = RetryPolicy(
    RetrySettings(max_attempts=3, initial_delay_seconds=0, max_delay_seconds=0), sleep=lambda _: None
)


class FakeTime:
    """A clock and a sleep that records each delay and moves the clock by it: no real time passes."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _budget(rate: float | None, time: FakeTime) -> ReadBudget:
    return ReadBudget(rate, clock=time.clock, sleep=time.sleep)


# --- ReadBudget -------------------------------------------------------------------------------------------


def test_the_next_page_waits_until_the_units_spent_fit_the_rate() -> None:
    time = FakeTime()
    budget = _budget(10.0, time)
    budget.wait()
    assert time.slept == []  # nothing spent yet

    budget.spend(5.0)
    budget.wait()
    assert time.slept == [pytest.approx(0.5)]
    budget.wait()  # paid for by that sleep
    assert time.slept == [pytest.approx(0.5)]


def test_time_elapsed_since_spending_counts_towards_the_wait() -> None:
    time = FakeTime()
    budget = _budget(4.0, time)
    budget.spend(2.0)
    time.now += 0.2
    budget.wait()
    assert time.slept == [pytest.approx(0.5 - 0.2)]

    budget.spend(2.0)
    time.now += 0.7  # longer than the 0.5 s these units cost
    budget.wait()
    assert len(time.slept) == 1


def test_units_spent_in_a_row_add_up_and_idle_time_is_no_credit() -> None:
    time = FakeTime()
    budget = _budget(10.0, time)
    time.now += 100.0  # idle: a burst after it would starve the table's own readers
    for units in (3.0, 4.0, 5.0):
        budget.spend(units)
    budget.wait()
    assert time.slept == [pytest.approx(1.2)]
    assert budget.spent == 12.0


def test_unlimited_never_sleeps_and_still_counts_what_was_spent() -> None:
    time = FakeTime()
    budget = _budget(None, time)
    budget.spend(1e9)
    budget.wait()
    assert time.slept == []
    assert budget.spent == 1e9


def test_segments_on_several_threads_share_one_budget() -> None:
    time = FakeTime()
    budget = _budget(100.0, time)
    threads, spends = 8, 2000
    start = threading.Barrier(threads)

    def segment() -> None:
        start.wait()
        for _ in range(spends):
            budget.spend(0.5)

    workers = [threading.Thread(target=segment) for _ in range(threads)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: an unlocked update would lose units
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(switching)

    assert budget.spent == threads * spends * 0.5
    budget.wait()
    assert time.slept == [pytest.approx(threads * spends * 0.5 / 100.0)]


# --- resume tokens ----------------------------------------------------------------------------------------


def test_start_keys_round_trip_through_text_with_string_number_and_binary_values() -> None:
    key = {"pk": {"S": "customer#1"}, "n": {"N": "-12.500"}, "b": {"B": bytes(range(256))}}
    text = encode_start_key(key)
    assert isinstance(text, str)
    assert json.loads(text)["b"] == {"B": json.loads(text)["b"]["B"]}  # JSON, the bytes as base64 text
    assert decode_start_key(text) == key


# --- TableScanSource against moto -------------------------------------------------------------------------


def _table(dynamodb: Any, items: int, *, binary_key: bool = False) -> str:
    name = unique("scanned")
    # A binary sort key: moto's parallel scan cannot hash a binary partition key.
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "B" if binary_key else "N"},
        ],
    )
    for start in range(0, items, 25):
        requests = [
            {
                "PutRequest": {
                    "Item": {
                        "pk": {"S": f"customer#{n % 7}"},
                        "sk": {"B": n.to_bytes(2, "big") + b"\xff"} if binary_key else {"N": str(n)},
                        "amount": {"N": f"{n}.5"},
                    }
                }
            }
            for n in range(start, min(items, start + 25))
        ]
        dynamodb.batch_write_item(RequestItems={name: requests})
    return name


def _source(dynamodb: Any, table: str, budget: ReadBudget | None = None, **options: Any) -> TableScanSource:
    source = TableScanSource(
        dynamodb=dynamodb,
        table_name=table,
        segments=options.pop("segments", 4),
        retry=_NO_WAIT,
        budget=budget or ReadBudget(None),
        **options,
    )
    source.prepare()
    return source


def _keys(pages: list[SnapshotPage]) -> list[tuple[str, Any]]:
    return [(item["pk"]["S"], item["sk"].get("N") or bytes(item["sk"]["B"])) for p in pages for item in p.items]


def test_the_segments_pages_cover_every_item_exactly_once(dynamodb: Any) -> None:
    table = _table(dynamodb, 40)
    source = _source(dynamodb, table, page_items=3)
    assert source.key_names == ("pk", "sk") and source.segments == 4

    seen: list[tuple[str, Any]] = []
    for segment in range(4):
        pages = list(source.pages(segment, None, 0))
        assert [p.segment for p in pages] == [segment] * len(pages)
        assert [p.page for p in pages] == list(range(len(pages)))
        assert pages[-1].resume is None
        assert all(p.resume is not None for p in pages[:-1])
        seen += _keys(pages)
    assert sorted(seen) == sorted((f"customer#{n % 7}", str(n)) for n in range(40))


def test_an_empty_segment_yields_one_empty_last_page(dynamodb: Any) -> None:
    """So that it is committed as done, like any other segment."""
    source = _source(dynamodb, _table(dynamodb, 0))
    for segment in range(4):
        (only,) = source.pages(segment, None, 0)
        assert (only.items, only.resume, only.page, only.size_bytes) == ((), None, 0, 0)


@pytest.mark.parametrize("binary_key", [False, True], ids=["string-key", "binary-key"])
def test_a_segment_resumed_from_a_pages_token_yields_exactly_the_rest(dynamodb: Any, binary_key: bool) -> None:
    table = _table(dynamodb, 30, binary_key=binary_key)
    source = _source(dynamodb, table, segments=2, page_items=4)
    whole = list(source.pages(1, None, 0))
    assert len(whole) >= 3, "a segment of several pages"

    for cut in (0, 1):
        resumed = list(source.pages(1, whole[cut].resume, cut + 1))
        assert _keys(resumed) == _keys(whole[cut + 1 :])
        assert [p.page for p in resumed] == [p.page for p in whole[cut + 1 :]]
        assert resumed[-1].resume is None


def test_a_page_reports_the_read_units_dynamodb_says_it_consumed(dynamodb: Any) -> None:
    table = _table(dynamodb, 12)
    budget = ReadBudget(None)
    source = _source(dynamodb, table, budget=budget, segments=1, page_items=5)
    pages = list(source.pages(0, None, 0))

    direct = dynamodb.scan(
        TableName=table, Segment=0, TotalSegments=1, Limit=5, ReturnConsumedCapacity="TOTAL", ConsistentRead=False
    )
    assert pages[0].read_units == direct["ConsumedCapacity"]["CapacityUnits"] > 0
    assert budget.spent == pytest.approx(sum(p.read_units for p in pages))


def test_each_page_after_the_first_waits_for_the_budget(dynamodb: Any) -> None:
    table = _table(dynamodb, 12)
    time = FakeTime()
    source = _source(dynamodb, table, budget=_budget(2.0, time), segments=1, page_items=5)
    pages = list(source.pages(0, None, 0))
    assert len(pages) >= 3
    assert time.slept == [pytest.approx(p.read_units / 2.0) for p in pages[:-1]]


def test_a_missing_table_is_one_line_naming_it(dynamodb: Any) -> None:
    missing = unique("no-such-table")
    source = TableScanSource(dynamodb=dynamodb, table_name=missing, segments=2, retry=_NO_WAIT, budget=ReadBudget(None))
    with pytest.raises(SnapshotSourceError) as prepared:
        source.prepare()
    with pytest.raises(SnapshotSourceError) as scanned:
        next(source.pages(0, None, 0))
    for error in (prepared.value, scanned.value):
        message = str(error)
        assert "\n" not in message and repr(missing) in message
        assert "does not exist" in message
