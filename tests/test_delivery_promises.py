"""Delivery's promises in the scenarios most likely to break them: a lane stuck on a hot item, a filter that drops
most records, throttling that lets part of every write through, a call refused whole after others were taken,
block mode on every kind of destination, and a destination deleted while running.

- the in-flight window bounds memory ("memory stays flat however slow a sink is"): batches done behind a stuck
  one still count until handed back, and so do records the pipeline filter drops;
- block mode stops "before any later change of the refused item is written", for FIFO and standard queues and the
  replica, and other lanes start no retry once it has;
- `retry.max_attempts` bounds only records that keep failing: changes held back behind a throttled one of the
  same item, and records never sent behind a throttled call, are written again, not dead-lettered;
- a call refused whole after an earlier call of the same write was taken is bisected;
- a destination gone while running stops delivery naming it; nothing is dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery, DeliveryBlockedError
from pipeline.delivery.lanes import lane_of
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import DestinationUnusableError, Sink, WriteResult
from sinks.dynamodb_table import DynamoDbTableSink, DynamoDbTableSinkSettings
from sinks.memory import FlakySink
from sinks.sqs import SqsSink, SqsSinkSettings
from tests.conftest import unique, wait_until
from tests.factories import change_record
from tests.test_sink_sqs import FaultInjectingClient, pipeline_client, receive_all

QUICK = RetryPolicy(RetrySettings(max_attempts=3, initial_delay_seconds=0.001, max_delay_seconds=0.01))


def _dead_event_ids(dead_letters: JsonlDeadLetters) -> list[str]:
    if not dead_letters.path.exists():
        return []
    return [json.loads(line)["event_id"] for line in dead_letters.path.read_text().splitlines()]


def _change(n: int, pk: str, *, image: Mapping[str, Any] | None = None) -> ChangeRecord:
    keys = {"pk": {"S": pk}, "sk": {"S": "a"}}
    return change_record(
        sequence=10**20 + n,
        event_name="MODIFY",
        keys=keys,
        new_image={**keys, "n": {"N": str(n)}, **(image or {})},
        event_id=f"e{n:04d}",
    )


def _batch(records: list[ChangeRecord]) -> Batch:
    return Batch(tuple(records), sum(r.size_bytes for r in records))


# -- the in-flight window and memory ---------------------------------------------------------------------------


class OneItemStuck(Sink):
    """A keyed destination on which one item's writes wait until released: that item's lane retrying a long
    outage of its partition (a hot key), while every other lane writes at once."""

    default_concurrency = 4

    def __init__(self, stuck_pk: str) -> None:
        super().__init__("stuck")
        self._stuck_pk = stuck_pk
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.taken: list[str] = []

    def write(self, batch: Batch) -> WriteResult:
        if any(r.keys["pk"] == self._stuck_pk for r in batch.records):
            self.release.wait(60)
        with self._lock:
            self.taken.extend(r.event_id for r in batch.records)
        return WriteResult()


def test_batches_done_behind_a_stuck_one_still_count_against_the_in_flight_window(
    dead_letters: JsonlDeadLetters,
) -> None:
    """Batches complete out of order but are handed back (and can be checkpointed) only in order, so every batch
    behind the stuck one stays in memory. They leave the window as soon as they complete, though, so `submit`
    never waits and the records held grow with the backlog: "memory stays flat however slow a sink is" and
    `delivery.max_records_in_flight` bound nothing while one lane is slow."""
    sink = OneItemStuck("hot")
    window = 20
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[4], max_records_in_flight=window)
    stuck = _change(0, "hot")
    hot_lane = lane_of(stuck, 4)
    others = [r for r in (_change(n, f"item-{n:03d}") for n in range(1, 1000)) if lane_of(r, 4) != hot_lane][:200]
    try:
        held = [delivery.submit(_batch([stuck]))]
        for start in range(0, len(others), 5):
            ticket = delivery.submit(_batch(others[start : start + 5]), timeout=1.0)
            if ticket is None:  # the window is full: the caller (and the queue and readers behind it) waits
                break
            held.append(ticket)
        assert delivery.done() == [], "a batch was handed back before the stuck one"
        records_held = sum(len(t.batch) for t in held if t is not None)
        assert records_held <= window + 5, (
            f"{records_held} records handed to the sinks and not handed back, with max_records_in_flight = {window}"
        )
    finally:
        sink.release.set()
        delivery.stop()


def test_records_the_pipeline_filter_drops_still_count_against_memory_while_a_sink_is_down(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    """A `[filter]` that admits few records (here only REMOVEs) and a sink that is down: each later batch is
    admitted empty, takes nothing of the window, completes at once and waits behind the stuck one holding its
    records. The delivery thread keeps taking pages, the queue never fills and the readers never wait: the whole
    backlog comes out of the stream into memory ("Readers block when the queue is full, so a backlog stays in
    the stream")."""
    key = {"pk": {"S": "customer#0"}, "sk": {"S": "order#00000"}}
    dynamodb.put_item(TableName=table, Item={**key, "amount": {"N": "1"}})
    dynamodb.delete_item(TableName=table, Key=key)  # the one admitted record: the down sink never takes it
    total = 2 + 300
    for n in range(1, 301):
        dynamodb.put_item(
            TableName=table, Item={"pk": {"S": f"customer#{n}"}, "sk": {"S": f"order#{n:05d}"}, "amount": {"N": "1"}}
        )
    settings = make_settings(
        filter={"event_names": ["REMOVE"]},
        batch={"max_records": 10, "queue_capacity": 20, "max_wait_seconds": 0.05},
        reader={"get_records_limit": 10},
        delivery={"max_records_in_flight": 20},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05},
    )
    down = FlakySink("down", fail_writes=10**9)
    pipeline = Pipeline(settings, sinks=[down])
    # queue (20) + window (20) + the open batch (10) + a page in each reader's hand (10 per shard): far under 100
    bound = 100
    pipeline.start()
    try:
        try:
            wait_until(lambda: pipeline.stats.records_read > bound, timeout=15, what="records read past the bound")
            # past the bound: nothing holds the readers back, see how far they go
            wait_until(lambda: pipeline.stats.records_read >= total, timeout=15, what="the whole backlog read")
        except AssertionError:
            pass  # the readers waited (as promised), or stopped somewhere past the bound
        assert down.attempts > 0, "the sink was never tried"
        assert pipeline.stats.records_read <= bound, (
            f"{pipeline.stats.records_read} of {total} records taken out of the stream into memory while the sink "
            f"is down (queue 20, max_records_in_flight 20)"
        )
    finally:
        pipeline.stop(timeout=1.0)


def test_a_slow_lane_lets_the_whole_backlog_out_of_the_stream(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    """The pipeline view of the first test: one item's lane is stuck (its writes wait), every other item is on
    another lane and written at once. The batches behind the stuck one complete, leave the window, and the
    delivery thread goes on taking pages: the readers never wait and the backlog comes out of the stream into
    memory, though "Readers block when the queue is full (records or bytes), so a backlog stays in the
    stream"."""
    hot = {"pk": {"S": "customer#hot"}, "sk": {"S": "order#hot"}}
    hot_lane = lane_of(change_record(keys=hot), 4)
    others = [
        key
        for key in ({"pk": {"S": f"customer#{n}"}, "sk": {"S": f"order#{n:05d}"}} for n in range(1000))
        if lane_of(change_record(keys=key), 4) != hot_lane
    ][:300]
    dynamodb.put_item(TableName=table, Item={**hot, "amount": {"N": "1"}})
    for key in others:
        dynamodb.put_item(TableName=table, Item={**key, "amount": {"N": "1"}})
    total = 1 + len(others)
    settings = make_settings(
        batch={"max_records": 10, "queue_capacity": 20, "max_wait_seconds": 0.05},
        reader={"get_records_limit": 10},
        delivery={"max_records_in_flight": 20},
    )
    sink = OneItemStuck("customer#hot")
    pipeline = Pipeline(settings, sinks=[sink])
    bound = 100  # queue (20) + window (20) + the open batch (10) + a page in the reader's hand (10), and room
    pipeline.start()
    try:
        try:
            wait_until(lambda: pipeline.stats.records_read > bound, timeout=15, what="records read past the bound")
            wait_until(lambda: pipeline.stats.records_read >= total, timeout=15, what="the whole backlog read")
        except AssertionError:
            pass  # the readers waited (as promised), or stopped somewhere past the bound
        assert pipeline.stats.records_read <= bound, (
            f"{pipeline.stats.records_read} of {total} records taken out of the stream into memory behind one "
            f"stuck lane (queue 20, max_records_in_flight 20; {len(sink.taken)} written, none checkpointed)"
        )
    finally:
        sink.release.set()
        pipeline.stop(timeout=2.0)


# -- block mode ------------------------------------------------------------------------------------------------


def _wait_blocked(delivery: Delivery) -> None:
    wait_until(lambda: delivery.error is not None, timeout=20, what="the delivery to block")
    assert isinstance(delivery.error, DeliveryBlockedError)


def test_block_mode_sends_no_later_change_of_an_item_whose_message_a_fifo_queue_refuses(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """An item's change whose message is over 256 KiB (the item itself is within DynamoDB's 400 KB) is refused
    for good; with on_failure = "block" the pipeline must stop "before any later change of the refused item is
    written". The FIFO sink does not hold the group back behind a permanent refusal, so the item's next change
    goes out in the next call of the same write, and only then does the writer raise."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes") + ".fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url),
        region=aws.region,
        endpoint_url=aws.endpoint_url,
        client=pipeline_client(aws, "sqs"),
    )
    sink.open()
    too_big = _change(1, "item-1", image={"blob": {"S": "x" * (300 * 1024)}})
    next_change = _change(2, "item-1")
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[1])
    try:
        delivery.submit(_batch([too_big, next_change]))
        _wait_blocked(delivery)
        sent = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, url)]
        assert next_change.event_id not in sent, "the refused item's next change was sent before the pipeline stopped"
    finally:
        delivery.stop()


def _replica_sink(aws: EmbeddedAws, replica: str, client: Any = None) -> DynamoDbTableSink:
    sink = DynamoDbTableSink(
        DynamoDbTableSinkSettings(type="dynamodb_table", table_name=replica),
        region=aws.region,
        endpoint_url=aws.endpoint_url,
        client=client or pipeline_client(aws, "dynamodb"),
    )
    sink.open()
    return sink


def test_block_mode_applies_no_later_change_of_an_item_the_replica_refuses(
    aws: EmbeddedAws, dynamodb: Any, replica: str, dead_letters: JsonlDeadLetters
) -> None:
    """The replica refuses a change for good (its item is over DynamoDB's 400 KB; a source item just under it
    is too once the sequence attribute is added) and goes on with the same item's next change in the same write:
    with on_failure = "block" the replica ends up holding a change the pipeline stopped before."""
    sink = _replica_sink(aws, replica)
    too_big = _change(1, "item-1", image={"blob": {"S": "x" * (410 * 1024)}})
    next_change = _change(2, "item-1")
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[1])
    try:
        delivery.submit(_batch([too_big, next_change]))
        _wait_blocked(delivery)
        assert too_big.event_id in str(delivery.error)
        item = dynamodb.get_item(TableName=replica, Key={"pk": {"S": "item-1"}, "sk": {"S": "a"}}).get("Item")
        assert item is None, f"the replica applied change n={item and item['n']['N']} after the refused one"
    finally:
        delivery.stop()


# -- retry limits ----------------------------------------------------------------------------------------------


class ThrottlesEveryThird:
    """The real DynamoDB client, throttling every third write: a hot partition the table keeps up with in part."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._lock = threading.Lock()
        self.calls = 0
        self.throttled = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name not in ("put_item", "delete_item"):
            return attribute

        def call(**kwargs: Any) -> Any:
            with self._lock:
                self.calls += 1
                throttle = self.calls % 3 == 0
                self.throttled += throttle
            if throttle:
                raise ClientError(
                    {
                        "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"},
                        "ResponseMetadata": {"HTTPStatusCode": 400},
                    },
                    name,
                )
            return attribute(**kwargs)

        return call


def test_changes_held_back_behind_a_throttled_change_are_not_dead_lettered(
    aws: EmbeddedAws, dynamodb: Any, replica: str, dead_letters: JsonlDeadLetters
) -> None:
    """One item's 30 changes in one part; the table throttles every third write, so no change fails more than
    once and every attempt moves forward. The writer counts each such attempt against `retry.max_attempts` for
    the whole rest, and dead-letters the changes held back behind the throttled one, most never sent at all.
    README: "`retry.max_attempts` bounds only records that keep failing while the destination takes others";
    throttling is retried, not dead-lettered."""
    client = ThrottlesEveryThird(pipeline_client(aws, "dynamodb"))
    sink = _replica_sink(aws, replica, client=client)
    changes = [_change(n, "hot") for n in range(1, 31)]
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[1])
    delivery.deliver(_batch(changes))
    dead = _dead_event_ids(dead_letters)
    assert dead == [], f"{len(dead)} throttled or held-back changes dead-lettered after {client.throttled} throttles"
    item = dynamodb.get_item(TableName=replica, Key={"pk": {"S": "hot"}, "sk": {"S": "a"}})["Item"]
    assert item["n"]["N"] == "30"


# -- bisection -------------------------------------------------------------------------------------------------


class RefusesCallsWithPoison:
    """The real SQS client; a SendMessageBatch holding a poison record is refused as a whole (a 400 for the call,
    as their own bulk-destination test models it), every other call goes through."""

    def __init__(self, real: Any, poison: str) -> None:
        self._real = real
        self._poison = poison

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name != "send_message_batch":
            return attribute

        def call(**kwargs: Any) -> Any:
            if any(json.loads(e["MessageBody"])["eventID"] == self._poison for e in kwargs["Entries"]):
                raise ClientError(
                    {
                        "Error": {"Code": "InvalidParameterValue", "Message": "refused"},
                        "ResponseMetadata": {"HTTPStatusCode": 400},
                    },
                    "SendMessageBatch",
                )
            return attribute(**kwargs)

        return call


def test_a_call_refused_after_an_earlier_call_was_taken_is_bisected_not_dead_lettered_whole(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """30 records to a standard queue, one poison record in the second call of the write. The first call is
    taken, the second refused: the sink reports it and every unsent call after it refused for good, so the
    writer dead-letters 20 records without bisecting. README: "a sink refuses records: the batch is bisected to
    isolate them; the rest is delivered"."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    records = [_change(n, f"item-{n:02d}") for n in range(30)]
    poison = records[15].event_id
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url),
        region=aws.region,
        endpoint_url=aws.endpoint_url,
        client=RefusesCallsWithPoison(pipeline_client(aws, "sqs"), poison),
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[1])
    delivery.deliver(_batch(records))
    assert sorted(_dead_event_ids(dead_letters)) == [poison]
    sent = sorted(json.loads(m["Body"])["eventID"] for m in receive_all(sqs, url))
    assert sent == sorted(r.event_id for r in records if r.event_id != poison)


def _throttled(operation: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "slow down"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
        operation,
    )


def test_records_never_sent_behind_a_throttled_call_are_not_dead_lettered(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """90 records to a standard queue in one write (nine calls); every third call is throttled as a whole, so
    each attempt sends two calls and stops at the third. The third such attempt exhausts `retry.max_attempts`
    and the 30 records still unsent are dead-lettered: none of them was ever refused, they were never even sent.
    README: a write "that fails as a whole ... is the destination being down: ... nothing is dead-lettered";
    throttling is "retried for those records only"."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    client = FaultInjectingClient(
        pipeline_client(aws, "sqs"),
        batch_method="send_message_batch",
        entries_key="Entries",
        raise_on_call={n: _throttled("SendMessageBatch") for n in (3, 6, 9, 12, 15)},
    )
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    records = [_change(n, f"item-{n:02d}") for n in range(90)]
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[1])
    delivery.deliver(_batch(records))
    dead = _dead_event_ids(dead_letters)
    assert dead == [], f"{len(dead)} records dead-lettered after {len(client.calls)} calls, 3 of them throttled"
    sent = sorted(json.loads(m["Body"])["eventID"] for m in receive_all(sqs, url))
    assert sent == sorted(r.event_id for r in records)


class HoldsCallsUntilSeen:
    """The real SQS client; a SendMessageBatch without the awaited record waits (at most `patience` seconds)
    until a call with it has been answered: it orders two lanes' calls without any sleep."""

    def __init__(self, real: Any, awaited: str, patience: float = 10.0) -> None:
        self._real = real
        self._awaited = awaited
        self._patience = patience
        self.seen = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name != "send_message_batch":
            return attribute

        def call(**kwargs: Any) -> Any:
            ids = [json.loads(e["MessageBody"])["eventID"] for e in kwargs["Entries"]]
            if self._awaited in ids:
                answer = attribute(**kwargs)
                self.seen.set()
                return answer
            self.seen.wait(self._patience)
            return attribute(**kwargs)

        return call


def test_block_mode_sends_no_later_change_of_the_refused_item_to_a_standard_queue(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """A standard queue spreads a batch over its lanes in calls of 10, so an item's next change can sit on
    another lane than the change its queue refuses. Block mode "stops before any later change of the refused
    item is written": here the item's next change goes out on the second lane while the first still holds the
    refused one."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    records = [_change(n, f"item-{n:02d}") for n in range(20)]
    records[9] = _change(9, "item-hot", image={"blob": {"S": "x" * (300 * 1024)}})  # refused: over 256 KiB
    records[10] = _change(10, "item-hot")  # the same item's next change, in the next call of 10
    client = HoldsCallsUntilSeen(pipeline_client(aws, "sqs"), awaited=records[10].event_id, patience=2.0)
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[2])
    try:
        delivery.submit(_batch(records))
        _wait_blocked(delivery)
        assert records[9].event_id in str(delivery.error)
        sent = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, url)]
        assert records[10].event_id not in sent, "the refused item's next change was sent"
    finally:
        delivery.stop()


class CallsAfterBlock:
    """The real SQS client, refusing one record as the sender's fault and noting for every other
    SendMessageBatch whether the delivery had already blocked when the call started. The refusal waits until
    another lane's first call has started, and that call waits until the delivery has blocked, so the block
    lands while it is in flight (each wait at most `patience` seconds); then it is throttled as a whole, so that
    its lane would retry it."""

    def __init__(self, real: Any, refused: str, patience: float = 10.0) -> None:
        self._real = real
        self._refused = refused
        self._patience = patience
        self.delivery: Delivery | None = None
        self.started_after_block: list[list[str]] = []
        self._other_started = threading.Event()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name != "send_message_batch":
            return attribute

        def call(**kwargs: Any) -> Any:
            delivery = self.delivery
            assert delivery is not None
            entries = kwargs["Entries"]
            ids = [json.loads(e["MessageBody"])["eventID"] for e in entries]
            if self._refused in ids:
                self._other_started.wait(self._patience)
                failed = [
                    {"Id": e["Id"], "SenderFault": True, "Code": "InvalidParameterValue", "Message": "refused"}
                    for e, event_id in zip(entries, ids, strict=True)
                    if event_id == self._refused
                ]
                kept = [e for e, event_id in zip(entries, ids, strict=True) if event_id != self._refused]
                answer = attribute(**{**kwargs, "Entries": kept}) if kept else {"Successful": []}
                return {**answer, "Failed": [*answer.get("Failed", []), *failed]}
            with self._lock:
                first = not self._other_started.is_set()
                self._other_started.set()
                if delivery.error is not None:
                    self.started_after_block.append(ids)
            if first:
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: delivery.error is not None, timeout=self._patience, what="the block")
                raise _throttled("SendMessageBatch")
            return attribute(**kwargs)

        return call


def test_after_a_block_other_lanes_start_no_new_calls(aws: EmbeddedAws, dead_letters: JsonlDeadLetters) -> None:
    """Block mode: "other items' lanes finish the call they are in and start no retry". The queue refuses one
    record as the sender's fault while another lane is in the first call of its part; that call is throttled as
    a whole after the block. A lane told to stop only between parts would retry it (and send the part's second
    call): the FIFO queue would receive calls started after the pipeline blocked."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes") + ".fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    refused = _change(0, "item-refused")
    refused_lane = lane_of(refused, 2)
    others = [r for r in (_change(n, f"item-{n:03d}") for n in range(1, 200)) if lane_of(r, 2) != refused_lane][:20]
    client = CallsAfterBlock(pipeline_client(aws, "sqs"), refused.event_id)
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[2])
    client.delivery = delivery
    try:
        # The other lane's part (20 items, two calls of 10) is handed out first, so that it is queued before the
        # block stops the lanes.
        delivery.submit(_batch([*others, refused]))
        _wait_blocked(delivery)
        wait_until(lambda: not delivery.busy, timeout=20, what="the lanes to finish")
        assert client.started_after_block == [], (
            f"{len(client.started_after_block)} call(s) started after the pipeline blocked"
        )
    finally:
        delivery.stop()


def test_block_mode_applies_no_later_change_of_an_item_whose_change_the_replica_cannot_plan(
    aws: EmbeddedAws, dynamodb: Any, replica: str, dead_letters: JsonlDeadLetters
) -> None:
    """A change refused before any call (its image lacks the target table's sort key) must hold back the same
    item's next change in the write, as a refusal by the table does."""
    keys = {"pk": {"S": "item-1"}, "sk": {"S": "a"}}
    unplannable = change_record(
        sequence=10**20 + 1, event_name="MODIFY", keys=keys, new_image={"pk": {"S": "item-1"}}, event_id="e0001"
    )
    next_change = _change(2, "item-1")
    delivery = Delivery(
        [_replica_sink(aws, replica)], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[1]
    )
    try:
        delivery.submit(_batch([unplannable, next_change]))
        _wait_blocked(delivery)
        assert unplannable.event_id in str(delivery.error)
        assert dynamodb.get_item(TableName=replica, Key=keys).get("Item") is None
    finally:
        delivery.stop()


# -- a destination gone while running -------------------------------------------------------------------------


def _wait_failed(delivery: Delivery) -> BaseException:
    wait_until(lambda: delivery.error is not None, timeout=20, what="the delivery to stop")
    assert delivery.error is not None
    return delivery.error


def test_a_queue_deleted_while_running_stops_delivery_and_dead_letters_nothing(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """Every call fails for good once the queue is gone: bisecting would dead-letter the whole stream one record
    at a time while the checkpoint moves on. It stops instead, naming the queue, with the batch not done."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url),
        region=aws.region,
        endpoint_url=aws.endpoint_url,
        client=pipeline_client(aws, "sqs"),
    )
    sink.open()
    sqs.delete_queue(QueueUrl=url)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[2])
    try:
        ticket = delivery.submit(_batch([_change(n, f"item-{n:02d}") for n in range(30)]))
        error = _wait_failed(delivery)
        assert isinstance(error, DestinationUnusableError)
        assert "does not exist" in str(error) and url.rsplit("/", 1)[-1] in str(error)
        assert ticket is not None and not ticket.done
        assert _dead_event_ids(dead_letters) == []
    finally:
        delivery.stop()


def test_a_replica_table_deleted_while_running_stops_delivery_and_dead_letters_nothing(
    aws: EmbeddedAws, dynamodb: Any, replica: str, dead_letters: JsonlDeadLetters
) -> None:
    sink = _replica_sink(aws, replica)
    dynamodb.delete_table(TableName=replica)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[4])
    try:
        ticket = delivery.submit(_batch([_change(n, f"item-{n:02d}") for n in range(12)]))
        error = _wait_failed(delivery)
        assert isinstance(error, DestinationUnusableError)
        assert replica in str(error) and "ResourceNotFoundException" in str(error)
        assert ticket is not None and not ticket.done
        assert _dead_event_ids(dead_letters) == []
    finally:
        delivery.stop()
