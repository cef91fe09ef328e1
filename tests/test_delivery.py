"""Delivery to sinks: retries, per-record failures, bisection, dead letters; which errors are retryable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery, DeliveryBlockedError
from pipeline.delivery.feed import SinkFeed, SinkFeedSettings
from pipeline.delivery.filters import FilterSettings
from pipeline.delivery.lanes import lane_of
from pipeline.errors import is_retryable
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy, ShutdownInterruptedError
from pipeline.settings import RetrySettings
from sinks.base import PermanentSinkError, RetryableSinkError, Sink, SinkError, WriteResult
from sinks.memory import FlakySink, MemorySink, refuse_event_ids
from tests.factories import change_record


def _policy(**overrides: Any) -> RetryPolicy:
    values: dict[str, Any] = {
        "max_attempts": 3,
        "initial_delay_seconds": 0,
        "max_delay_seconds": 0,
        **overrides,
    }
    return RetryPolicy(RetrySettings(**values), sleep=lambda _s: None)


@pytest.fixture
def dead_letters(tmp_path: Path) -> JsonlDeadLetters:
    return JsonlDeadLetters(tmp_path / "dead" / "letters.jsonl")


def _delivery(sinks: list[Sink], dead_letters: JsonlDeadLetters, **kwargs: Any) -> Delivery:
    return Delivery(sinks, retry=kwargs.pop("retry", _policy()), dead_letters=dead_letters, **kwargs)


def _records(count: int) -> list[ChangeRecord]:
    return [
        change_record(
            sequence=n,
            event_id=f"e{n}",
            new_image={"pk": {"S": f"item-{n}"}, "n": {"N": f"{n}.10"}},
            size_bytes=10 * n,
        )
        for n in range(1, count + 1)
    ]


def _batch(records: list[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))


def _ids(records: list[ChangeRecord]) -> list[str]:
    return [r.event_id for r in records]


def _dead(dead_letters: JsonlDeadLetters) -> list[dict[str, Any]]:
    if not dead_letters.path.exists():
        return []
    return [orjson.loads(line) for line in dead_letters.path.read_bytes().splitlines()]


class RecordingSink(Sink):
    """Takes whatever `decide` does not refuse; remembers every write's event ids and every record taken."""

    def __init__(self, decide: Callable[[Batch], WriteResult] | None = None, name: str = "recording") -> None:
        super().__init__(name)
        self._decide = decide or (lambda _b: WriteResult())
        self.writes: list[list[str]] = []
        self.taken: list[ChangeRecord] = []

    def write(self, batch: Batch) -> WriteResult:
        self.writes.append(_ids(list(batch.records)))
        result = self._decide(batch)
        self.taken.extend(r for r in batch.records if r.event_id not in result.failed)
        return result


def fail_retryably(times: dict[str, int]) -> Callable[[Batch], WriteResult]:
    """Reports each named record as retryable-failed on its first `times[id]` writes."""
    seen: dict[str, int] = {}

    def decide(batch: Batch) -> WriteResult:
        failed: dict[str, SinkError] = {}
        for record in batch.records:
            seen[record.event_id] = seen.get(record.event_id, 0) + 1
            if seen[record.event_id] <= times.get(record.event_id, 0):
                failed[record.event_id] = RetryableSinkError(f"throttled {record.event_id}")
        return WriteResult(failed=failed)

    return decide


class PoisonSink(Sink):
    """A bulk API that rejects a whole request containing a poison record.

    With `partial=True` it first takes the records before the poison, as a sink writing one by one would.
    """

    def __init__(self, poison: set[str], *, partial: bool = False) -> None:
        super().__init__("poisoned")
        self._poison = poison
        self._partial = partial
        self.taken: list[ChangeRecord] = []
        self.writes = 0

    def write(self, batch: Batch) -> WriteResult:
        self.writes += 1
        accepted: list[ChangeRecord] = []
        for record in batch.records:
            if record.event_id in self._poison:
                if self._partial:
                    self.taken.extend(accepted)
                raise PermanentSinkError(f"validation failed for {record.event_id}")
            accepted.append(record)
        self.taken.extend(accepted)
        return WriteResult()


# --- everything taken ---------------------------------------------------------------------------------------


def test_every_record_is_delivered_to_every_sink_in_order(dead_letters: JsonlDeadLetters) -> None:
    records = _records(5)
    first, second = MemorySink("first"), MemorySink("second")
    delivery = _delivery([first, second], dead_letters)
    delivery.deliver(_batch(records))
    assert first.records == records
    assert second.records == records
    assert delivery.stats.delivered == {"first": 5, "second": 5}
    assert delivery.stats.dead_lettered == {}
    assert delivery.stats.batches == 1
    assert not dead_letters.path.exists()


def test_an_empty_batch_is_not_written(dead_letters: JsonlDeadLetters) -> None:
    sink = RecordingSink()
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch([]))
    assert sink.writes == []
    assert delivery.stats.batches == 0


def test_flush_reaches_every_sink(dead_letters: JsonlDeadLetters) -> None:
    first, second = MemorySink("first"), MemorySink("second")
    _delivery([first, second], dead_letters).flush()
    assert (first.flushes, second.flushes) == (1, 1)


def test_on_handled_names_each_record_a_sink_took_dead_lettered_or_left_out(dead_letters: JsonlDeadLetters) -> None:
    """The hook says which records each sink is done with: those it took, those dead-lettered, and those its
    feed's filter left out; a record still failing when the write was stopped is in none of them."""
    records = _records(6)
    refusing = FlakySink("refusing", refuse=refuse_event_ids({"e2"}))
    throttled = RecordingSink(fail_retryably({"e5": 1_000}), name="throttled")
    filtered = MemorySink("filtered")
    no_fours = SinkFeed.of(SinkFeedSettings(filter=FilterSettings(exclude=[FilterSettings(keys={"pk": ["item-4"]})])))
    handled: dict[str, list[str]] = {}
    stop_after = {"attempts": 0}

    def sleep(_seconds: float) -> None:
        stop_after["attempts"] += 1
        if stop_after["attempts"] > 2:
            raise ShutdownInterruptedError("stopped")

    delivery = _delivery(
        [refusing, throttled, filtered],
        dead_letters,
        retry=RetryPolicy(RetrySettings(max_attempts=1_000, initial_delay_seconds=0, max_delay_seconds=0), sleep),
        feeds=[SinkFeed(), SinkFeed(), no_fours],
        on_handled=lambda sink, done: handled.setdefault(sink, []).extend(r.event_id for r in done),
    )
    ticket = delivery.submit(_batch(records))
    assert ticket is not None
    delivery.wait_done(2.0)
    deadline = time.monotonic() + 2.0
    while delivery.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ticket.done  # the throttled sink's write was stopped with e5 still failing
    assert sorted(handled["refusing"]) == ["e1", "e2", "e3", "e4", "e5", "e6"]  # e2 dead-lettered
    assert [d["event_id"] for d in _dead(dead_letters)] == ["e2"]
    assert sorted(handled["throttled"]) == ["e1", "e2", "e3", "e4", "e6"]
    assert sorted(handled["filtered"]) == ["e1", "e2", "e3", "e4", "e5", "e6"]  # e4 left out by the filter
    assert _ids(filtered.records) == ["e1", "e2", "e3", "e5", "e6"]


# --- permanent refusals -------------------------------------------------------------------------------------


def test_records_refused_in_the_write_result_are_dead_lettered_and_the_rest_taken_once(
    dead_letters: JsonlDeadLetters,
) -> None:
    records = _records(6)
    sink = FlakySink("flaky", refuse=refuse_event_ids({"e2", "e5"}, reason="item too large"))
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(records))

    assert _ids(sink.records) == ["e1", "e3", "e4", "e6"]
    assert sink.attempts == 1  # permanent refusals are not retried
    entries = _dead(dead_letters)
    assert [e["event_id"] for e in entries] == ["e2", "e5"]
    for entry in entries:
        assert entry["sink"] == "flaky"
        assert entry["error"] == "item too large"
        assert entry["error_kind"] == "PermanentSinkError"
    assert delivery.stats.delivered == {"flaky": 4}
    assert delivery.stats.dead_lettered == {"flaky": 2}
    assert dead_letters.count == 2


def test_a_dead_letter_carries_the_full_raw_record(dead_letters: JsonlDeadLetters) -> None:
    (record,) = _records(1)
    sink = FlakySink("flaky", refuse=refuse_event_ids({"e1"}, reason="no"))
    _delivery([sink], dead_letters).deliver(_batch([record]))

    (entry,) = _dead(dead_letters)
    raw = record.raw
    assert entry["table"] == "orders"
    assert entry["shard_id"] == record.shard_id
    assert entry["sequence_number"] == "1"
    stored = entry["record"]
    assert stored["eventID"] == raw["eventID"]
    assert stored["eventName"] == raw["eventName"]
    assert stored["awsRegion"] == raw["awsRegion"]
    assert stored["dynamodb"]["Keys"] == raw["dynamodb"]["Keys"]
    assert stored["dynamodb"]["NewImage"] == {"pk": {"S": "item-1"}, "n": {"N": "1.10"}}
    assert stored["dynamodb"]["SequenceNumber"] == raw["dynamodb"]["SequenceNumber"]
    assert stored["dynamodb"]["SizeBytes"] == raw["dynamodb"]["SizeBytes"]
    assert stored["dynamodb"]["ApproximateCreationDateTime"] == "2024-01-01T00:00:01+00:00"
    failed_at = datetime.fromisoformat(entry["failed_at"])
    assert failed_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - failed_at) < timedelta(minutes=5)


@pytest.mark.parametrize("poison", [{"e1"}, {"e4"}, {"e8"}, {"e3", "e7"}, {"e2", "e3", "e4"}])
def test_a_batch_refused_whole_is_bisected_to_the_refused_records(
    dead_letters: JsonlDeadLetters, poison: set[str]
) -> None:
    records = _records(8)
    sink = PoisonSink(poison)
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(records))

    # The sink takes a request all or nothing, so each good record is taken exactly once, in stream order.
    assert _ids(sink.taken) == [r.event_id for r in records if r.event_id not in poison]
    entries = _dead(dead_letters)
    assert sorted(e["event_id"] for e in entries) == sorted(poison)
    for entry in entries:
        assert entry["sink"] == "poisoned"
        assert entry["error"] == f"validation failed for {entry['event_id']}"
        assert entry["error_kind"] == "PermanentSinkError"
        assert entry["record"]["eventID"] == entry["event_id"]
    assert delivery.stats.delivered == {"poisoned": 8 - len(poison)}
    assert delivery.stats.dead_lettered == {"poisoned": len(poison)}


def test_bisection_with_a_sink_that_takes_records_before_the_poison(dead_letters: JsonlDeadLetters) -> None:
    records = _records(9)
    sink = PoisonSink({"e3", "e8"}, partial=True)
    _delivery([sink], dead_letters).deliver(_batch(records))

    # Re-sent halves may deliver a record twice; none may be lost, and no refused one may get through.
    taken = set(_ids(sink.taken))
    assert taken == {r.event_id for r in records} - {"e3", "e8"}
    entries = _dead(dead_letters)
    assert sorted(e["event_id"] for e in entries) == ["e3", "e8"]
    assert {e["record"]["eventID"] for e in entries} == {"e3", "e8"}


# --- retryable failures -------------------------------------------------------------------------------------


def test_records_failing_retryably_are_retried_alone_until_taken(dead_letters: JsonlDeadLetters) -> None:
    records = _records(4)
    sink = RecordingSink(fail_retryably({"e2": 2, "e4": 1}))
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(records))

    assert sink.writes == [["e1", "e2", "e3", "e4"], ["e2", "e4"], ["e2"]]
    assert sorted(_ids(sink.taken)) == ["e1", "e2", "e3", "e4"]
    assert _dead(dead_letters) == []
    assert delivery.stats.delivered == {"recording": 4}


def takes_one_per_call(batch: Batch) -> WriteResult:
    """A destination that is up but takes only the first entry of every call (heavily throttled)."""
    return WriteResult(failed={r.event_id: RetryableSinkError(f"throttled {r.event_id}") for r in batch.records[1:]})


def test_records_failing_while_others_are_taken_are_dead_lettered_after_max_attempts(
    dead_letters: JsonlDeadLetters,
) -> None:
    sink = RecordingSink(takes_one_per_call)
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(_records(5)))

    # Three attempts in which the destination took something: the limit applies to what is left.
    assert sink.writes == [["e1", "e2", "e3", "e4", "e5"], ["e2", "e3", "e4", "e5"], ["e3", "e4", "e5"]]
    assert _ids(sink.taken) == ["e1", "e2", "e3"]
    entries = _dead(dead_letters)
    assert [e["event_id"] for e in entries] == ["e4", "e5"]
    assert all(e["sink"] == "recording" and "throttled" in e["error"] for e in entries)
    assert entries[0]["record"]["eventID"] == "e4"
    assert delivery.stats.delivered == {"recording": 3}
    assert delivery.stats.dead_lettered == {"recording": 2}


def test_a_record_failing_on_its_own_is_an_outage_waited_out_past_max_attempts(
    dead_letters: JsonlDeadLetters,
) -> None:
    """Once only e2 is left, every record of the write fails: nothing tells a down destination from a record
    the destination refuses, so it is retried like an outage and never dead-lettered."""
    sink = RecordingSink(fail_retryably({"e2": 12}))
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(_records(3)))

    assert sink.writes == [["e1", "e2", "e3"]] + [["e2"]] * 12
    assert _ids(sink.taken) == ["e1", "e3", "e2"]
    assert _dead(dead_letters) == []
    assert delivery.stats.dead_lettered == {}


def test_every_record_failing_retryably_is_an_outage_however_long_it_lasts(dead_letters: JsonlDeadLetters) -> None:
    """A replica whose every PutItem times out reports each record retryable: that is the destination down."""
    sink = RecordingSink(fail_retryably({"e1": 20, "e2": 20, "e3": 20}))
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(_records(3)))

    assert len(sink.writes) == 21 and sink.writes[-1] == ["e1", "e2", "e3"]
    assert _ids(sink.taken) == ["e1", "e2", "e3"]
    assert _dead(dead_letters) == []


def test_mixed_refusals_and_retries_in_one_write(dead_letters: JsonlDeadLetters) -> None:
    retrying = fail_retryably({"e1": 1})

    def decide(batch: Batch) -> WriteResult:
        failed = dict(retrying(batch).failed)
        if any(r.event_id == "e3" for r in batch.records):
            failed["e3"] = PermanentSinkError("bad e3")
        return WriteResult(failed=failed)

    sink = RecordingSink(decide)
    _delivery([sink], dead_letters).deliver(_batch(_records(3)))
    assert sink.writes == [["e1", "e2", "e3"], ["e1"]]
    assert sorted(_ids(sink.taken)) == ["e1", "e2"]
    assert [(e["event_id"], e["error"]) for e in _dead(dead_letters)] == [("e3", "bad e3")]


def test_a_whole_batch_outage_is_retried_then_delivered(dead_letters: JsonlDeadLetters) -> None:
    records = _records(3)
    sink = FlakySink("flaky", fail_writes=2)
    delivery = _delivery([sink], dead_letters)
    delivery.deliver(_batch(records))
    assert sink.attempts == 3
    assert sink.records == records
    assert _dead(dead_letters) == []


def test_an_outage_outlasting_max_attempts_is_still_retried(dead_letters: JsonlDeadLetters) -> None:
    # Whole-batch outages are not bounded by max_attempts: nothing is skipped while the sink is down.
    sink = FlakySink("flaky", fail_writes=7)
    _delivery([sink], dead_letters).deliver(_batch(_records(2)))
    assert sink.attempts == 8
    assert len(sink.records) == 2
    assert _dead(dead_letters) == []


def test_an_outage_older_than_max_record_age_dead_letters_the_batch(dead_letters: JsonlDeadLetters) -> None:
    # The factory's records were created in 2024: far older than a minute.
    sink = FlakySink("flaky", fail_writes=100)
    delivery = _delivery([sink], dead_letters, retry=_policy(max_record_age_seconds=60))
    delivery.deliver(_batch(_records(2)))
    assert sink.attempts == 1
    assert sink.records == []
    entries = _dead(dead_letters)
    assert [e["event_id"] for e in entries] == ["e1", "e2"]
    assert all(e["error_kind"] == "RetryableSinkError" for e in entries)


# --- on_failure = "block" -----------------------------------------------------------------------------------


def test_block_stops_on_a_refused_record_and_writes_no_dead_letter(dead_letters: JsonlDeadLetters) -> None:
    sink = FlakySink("flaky", refuse=refuse_event_ids({"e2"}))
    delivery = _delivery([sink], dead_letters, on_failure="block")
    with pytest.raises(DeliveryBlockedError, match="e2"):
        delivery.deliver(_batch(_records(3)))
    assert not dead_letters.path.exists()
    assert dead_letters.count == 0
    assert delivery.stats.dead_lettered == {}


def test_block_stops_bisection_before_anything_after_the_refused_record_is_written(
    dead_letters: JsonlDeadLetters,
) -> None:
    """Ordering over progress: a later change of the same item must not reach the sink past the one refused."""
    records = _records(8)
    sink = PoisonSink({"e3"})
    with pytest.raises(DeliveryBlockedError, match="e3"):
        _delivery([sink], dead_letters, on_failure="block").deliver(_batch(records))
    assert _ids(sink.taken) == ["e1", "e2"]
    assert not dead_letters.path.exists()


def test_block_stops_on_exhausted_retries_too(dead_letters: JsonlDeadLetters) -> None:
    sink = RecordingSink(takes_one_per_call)
    with pytest.raises(DeliveryBlockedError, match="e4"):
        _delivery([sink], dead_letters, on_failure="block").deliver(_batch(_records(5)))
    assert not dead_letters.path.exists()


# --- is_retryable -------------------------------------------------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutItem"
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ProvisionedThroughputExceededException", 400),
        ("ThrottlingException", 400),
        ("Throttling", 400),
        ("RequestLimitExceeded", 400),
        ("LimitExceededException", 400),
        ("SlowDown", 503),
        ("InternalServerError", 500),
        ("SomeNewServerFault", 500),
        ("ServiceUnavailable", 503),
        ("TooManyRequests", 429),
    ],
)
def test_throttling_and_server_errors_are_retryable(code: str, status: int) -> None:
    assert is_retryable(_client_error(code, status))


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ValidationException", 400),
        ("ConditionalCheckFailedException", 400),
        ("ResourceNotFoundException", 400),
        ("AccessDeniedException", 403),
        ("ItemCollectionSizeLimitExceededException", 400),
    ],
)
def test_client_errors_are_not_retryable(code: str, status: int) -> None:
    assert not is_retryable(_client_error(code, status))


def test_a_client_error_without_metadata_is_not_retryable() -> None:
    assert not is_retryable(ClientError({"Error": {"Code": "ValidationException"}}, "PutItem"))


def test_transport_failures_are_retryable() -> None:
    assert is_retryable(EndpointConnectionError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com"))
    assert is_retryable(ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com"))


def test_sink_errors_and_others() -> None:
    assert is_retryable(RetryableSinkError("throttled", retry_after=1.0))
    assert not is_retryable(PermanentSinkError("too large"))
    assert not is_retryable(ValueError("bug"))


class GatedByKey(Sink):
    """Takes records at once, except those of item `slow`, which wait until `release` is set."""

    def __init__(self, slow: str) -> None:
        super().__init__("gated")
        self._slow = slow
        self.release = threading.Event()
        self.fast_written = threading.Event()

    def write(self, batch: Batch) -> WriteResult:
        if any(r.keys["pk"] == self._slow for r in batch.records):
            self.release.wait(10)
        else:
            self.fast_written.set()
        return WriteResult()


def test_a_batch_is_done_only_when_every_lane_has_written_its_part(dead_letters: JsonlDeadLetters) -> None:
    """A part may be written before the next part is even handed out; the batch must still wait for all."""
    records = _records(8)
    lanes = 4
    slow = next(r for r in records if lane_of(r, lanes) != lane_of(records[0], lanes)).keys["pk"]
    sink = GatedByKey(slow)
    delivery = _delivery([sink], dead_letters, concurrency=[lanes])
    ticket = delivery.submit(_batch(records))
    assert ticket is not None
    assert sink.fast_written.wait(5)
    time.sleep(0.05)
    assert not ticket.done and delivery.done() == []
    sink.release.set()
    deadline = time.monotonic() + 5
    while not ticket.done and time.monotonic() < deadline:
        delivery.wait_done(0.1)
    assert delivery.done() == [ticket]


def test_a_full_window_gives_way_once_the_oldest_batch_is_done(dead_letters: JsonlDeadLetters) -> None:
    """A batch holds its place in the window until it is handed back, and only the caller hands it back: a
    `submit` waiting for room must return (None) as soon as the oldest batch is done, or a caller that waits
    without a timeout would wait forever and one with a timeout would idle until it ran out."""
    records = _records(20)
    delivery = _delivery([MemorySink()], dead_letters, max_records_in_flight=10)
    first = delivery.submit(_batch(records[:10]))
    assert first is not None
    answer: list[Any] = []
    waiting = threading.Thread(target=lambda: answer.append(delivery.submit(_batch(records[10:]))), daemon=True)
    waiting.start()
    waiting.join(30)
    assert not waiting.is_alive(), "submit kept waiting although the batch holding the window was done"
    assert answer == [None] and delivery.window_depth == (10, first.batch.size_bytes)
    assert delivery.done() == [first]
    assert delivery.window_depth == (0, 0)
    second = delivery.submit(_batch(records[10:]))
    assert second is not None
    delivery.stop()
