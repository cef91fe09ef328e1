"""Many calls in flight, and order kept exactly where it is promised: FIFO queues and topics per item, the replica
per key, the checkpoint per shard; bisection and block mode isolate and stop as documented, lanes and all.

Real moto destinations; failures and throttling are injected into the sinks' real clients at random (seeded), so
retries, hold-backs and bisection all happen while sixteen calls are in flight.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery, DeliveryBlockedError
from pipeline.ops.demo import write_changes
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError, Sink, SinkError, WriteResult
from sinks.dynamodb_table import DynamoDbTableSink, DynamoDbTableSinkSettings
from sinks.sns import SnsSink, SnsSinkSettings
from sinks.sqs import SqsSink, SqsSinkSettings
from tests.conftest import unique, wait_until
from tests.factories import change_record
from tests.test_sink_sns import subscribe_queue
from tests.test_sink_sqs import FaultInjectingClient, pipeline_client, receive_all

LANES = 8
QUICK = RetryPolicy(RetrySettings(max_attempts=5, initial_delay_seconds=0.001, max_delay_seconds=0.01))


class InFlight:
    """Counts calls at once through a client: evidence that the lanes did overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1


class Counted:
    """The wrapped client, each call counted in flight and held a moment (so calls overlap on any machine)."""

    def __init__(self, real: Any, in_flight: InFlight, methods: tuple[str, ...]) -> None:
        self._real = real
        self._in_flight = in_flight
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name not in self._methods:
            return attribute

        def call(**kwargs: Any) -> Any:
            self._in_flight.enter()
            try:
                time.sleep(0.002)
                return attribute(**kwargs)
            finally:
                self._in_flight.leave()

        return call


def _changes(items: int, per_item: int) -> list[ChangeRecord]:
    """Changes of `items` items, `per_item` each, interleaved as a stream interleaves them."""
    return [
        change_record(
            sequence=10**20 + n,
            event_name="MODIFY",
            keys={"pk": {"S": f"item-{n % items:02d}"}, "sk": {"S": "a"}},
            new_image={"pk": {"S": f"item-{n % items:02d}"}, "sk": {"S": "a"}, "n": {"N": str(n)}},
            event_id=f"e{n:04d}",
        )
        for n in range(items * per_item)
    ]


def _batches(records: list[ChangeRecord], size: int) -> list[Batch]:
    return [Batch(tuple(records[i : i + size]), 0) for i in range(0, len(records), size)]


def _deliver_all(delivery: Delivery, batches: list[Batch]) -> None:
    """Every batch submitted at once (several in flight), then waited for in order."""
    tickets = [delivery.submit(batch) for batch in batches]
    deadline = time.monotonic() + 60
    while not all(t is not None and t.done for t in tickets):
        assert time.monotonic() < deadline, "delivery did not finish"
        delivery.wait_done(0.1)
    assert [t for t in delivery.done()] == tickets


def _random_failures(seed: int, rate: float) -> Callable[[Mapping[str, Any]], bool]:
    """Fails a `rate` of entries at random (seeded). The client asks twice about each entry of a call (to answer
    it failed, and to not send it), so each entry's draw is kept and given again."""
    rng = random.Random(seed)
    lock = threading.Lock()
    drawn: dict[int, tuple[Mapping[str, Any], bool]] = {}

    def fail(entry: Mapping[str, Any]) -> bool:
        with lock:
            seen = drawn.get(id(entry))
            if seen is None or seen[0] is not entry:
                seen = drawn[id(entry)] = (entry, rng.random() < rate)
            return seen[1]

    return fail


@pytest.fixture
def dead_letters(tmp_path: Path) -> JsonlDeadLetters:
    return JsonlDeadLetters(tmp_path / "dead.jsonl")


def _receive(sqs: Any, url: str, expected: int) -> list[dict[str, Any]]:
    """Receive until `expected` messages came (moto's FIFO queue can answer empty while groups are busy)."""
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(bodies) < expected and time.monotonic() < deadline:
        bodies += [json.loads(m["Body"]) for m in receive_all(sqs, url)]
    return bodies


def _fifo_order_holds(bodies: list[dict[str, Any]], records: list[ChangeRecord]) -> None:
    assert sorted(b["eventID"] for b in bodies) == sorted(r.event_id for r in records), "a change was lost"
    by_item: dict[str, list[int]] = collections.defaultdict(list)
    for body in bodies:
        by_item[body["keys"]["pk"]].append(int(body["sequenceNumber"]))
    for item, sequences in by_item.items():
        assert sequences == sorted(sequences), f"{item}'s changes arrived out of order"


def test_a_fifo_queue_gets_every_items_changes_in_order_with_many_calls_in_flight_and_random_failures(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes") + ".fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
    in_flight = InFlight()
    failing = FaultInjectingClient(
        Counted(pipeline_client(aws, "sqs"), in_flight, ("send_message_batch",)),
        batch_method="send_message_batch",
        entries_key="Entries",
        fail=_random_failures(seed=7, rate=0.25),
    )
    settings = SqsSinkSettings(type="sqs", queue_url=url)
    sink = SqsSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=failing)
    sink.open()
    records = _changes(items=12, per_item=3)  # moto's FIFO queue takes about 0.25 s a call: kept small
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[LANES])
    _deliver_all(delivery, _batches(records, 12))

    assert delivery.stats.dead_lettered == {}
    assert in_flight.most > 1, "the lanes never overlapped"
    injected = sum(1 for call in failing.calls for _ in call) - len(records)
    assert injected >= 3, "too few failures were injected to show anything"
    _fifo_order_holds(_receive(sqs, url, len(records)), records)


def test_a_fifo_topic_delivers_every_items_changes_in_order_with_many_calls_in_flight_and_random_failures(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    sns, sqs = aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name=unique("changes") + ".fifo", Attributes={"FifoTopic": "true"})["TopicArn"]
    url = subscribe_queue(sns, sqs, topic, raw=True)
    in_flight = InFlight()
    failing = FaultInjectingClient(
        Counted(pipeline_client(aws, "sns"), in_flight, ("publish_batch",)),
        batch_method="publish_batch",
        entries_key="PublishBatchRequestEntries",
        fail=_random_failures(seed=11, rate=0.25),
    )
    settings = SnsSinkSettings(type="sns", topic_arn=topic)
    sink = SnsSink(settings, region=aws.region, endpoint_url=aws.endpoint_url, client=failing)
    sink.open()
    records = _changes(items=12, per_item=3)  # moto's FIFO queue takes about 0.25 s a call: kept small
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[LANES])
    _deliver_all(delivery, _batches(records, 12))

    assert delivery.stats.dead_lettered == {}
    assert in_flight.most > 1
    _fifo_order_holds(_receive(sqs, url, len(records)), records)


class Throttling:
    """The real DynamoDB client, throttling a random fifth of the replica's writes (seeded) and recording the
    order in which each key's writes reached the table."""

    def __init__(self, real: Any, seed: int) -> None:
        self._real = real
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.applied: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        self.throttled = 0
        self.in_flight = InFlight()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name not in ("put_item", "delete_item"):
            return attribute

        def call(**kwargs: Any) -> Any:
            with self._lock:
                throttle = self._rng.random() < 0.2
                if throttle:
                    self.throttled += 1
            if throttle:
                raise ClientError(
                    {
                        "Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow down"},
                        "ResponseMetadata": {"HTTPStatusCode": 400},
                    },
                    name,
                )
            self.in_flight.enter()
            try:
                time.sleep(0.001)
                key = kwargs.get("Key") or kwargs["Item"]
                sequence = int(kwargs["ExpressionAttributeValues"][":seq"]["S"])
                with self._lock:
                    self.applied[(key["pk"]["S"], key["sk"]["S"])].append(sequence)
                return attribute(**kwargs)
            finally:
                self.in_flight.leave()

        return call


def test_the_replica_applies_each_keys_changes_in_order_under_concurrency_and_throttling(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    replica = unique("replica")
    dynamodb.create_table(
        TableName=replica,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk")],
    )
    client = Throttling(pipeline_client(aws, "dynamodb"), seed=3)
    sink = DynamoDbTableSink(
        DynamoDbTableSinkSettings(type="dynamodb_table", table_name=replica),
        region=aws.region,
        endpoint_url=aws.endpoint_url,
        client=client,
    )
    settings = make_settings(retry={"max_attempts": 8, "initial_delay_seconds": 0.001, "max_delay_seconds": 0.01})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    try:
        written = sum(write_changes(dynamodb, table, 60).values())  # inserts, updates, deletes of the same keys
        wait_until(lambda: sum(pipeline.stats.events.values()) >= written, timeout=60, what="every change")
    finally:
        assert pipeline.stop() is True
    assert pipeline.delivery.stats.dead_lettered == {}
    assert client.throttled > 10 and client.in_flight.most > 1
    for key, sequences in client.applied.items():
        assert sequences == sorted(sequences), f"{key}: a later change was written before an earlier one"

    def scan(name: str) -> dict[tuple[str, str], dict[str, Any]]:
        items = {}
        for page in dynamodb.get_paginator("scan").paginate(TableName=name):
            for item in page["Items"]:
                item.pop("_streamsink_sequence", None)
                items[(item["pk"]["S"], item["sk"]["S"])] = item
        return items

    assert scan(replica) == scan(table)


class Poisoned(Sink):
    """A bulk destination that refuses a whole call holding a poison record, across many lanes at once."""

    def __init__(self, poison: set[str]) -> None:
        super().__init__("poisoned")
        self._poison = poison
        self._lock = threading.Lock()
        self.taken: list[str] = []
        self.calls = 0

    def write(self, batch: Batch) -> WriteResult:
        with self._lock:
            self.calls += 1
        if any(r.event_id in self._poison for r in batch.records):
            raise PermanentSinkError("the destination refused the call")
        with self._lock:
            self.taken.extend(r.event_id for r in batch.records)
        return WriteResult()


def test_bisection_isolates_exactly_the_poison_records_on_every_lane(dead_letters: JsonlDeadLetters) -> None:
    records = _changes(items=40, per_item=5)
    poison = {"e0007", "e0133", "e0150"}
    sink = Poisoned(poison)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[8])
    _deliver_all(delivery, _batches(records, 50))
    dead = [json.loads(line)["event_id"] for line in dead_letters.path.read_text().splitlines()]
    assert sorted(dead) == sorted(poison)
    assert sorted(sink.taken) == sorted(r.event_id for r in records if r.event_id not in poison)
    assert delivery.stats.dead_lettered == {"poisoned": 3}


class RefusesOne(Sink):
    """Refuses one record for good; remembers every record taken, with the lane it came on."""

    def __init__(self, refused: str) -> None:
        super().__init__("strict")
        self._refused = refused
        self._lock = threading.Lock()
        self.taken: list[ChangeRecord] = []

    def write(self, batch: Batch) -> WriteResult:
        failed: dict[str, SinkError] = {}
        for record in batch.records:
            if record.event_id == self._refused:
                failed[record.event_id] = PermanentSinkError("refused")
            else:
                with self._lock:
                    self.taken.append(record)
        return WriteResult(failed=failed)


def test_block_mode_stops_before_any_later_change_of_the_refused_item_is_written(
    dead_letters: JsonlDeadLetters,
) -> None:
    """Other items' lanes may still finish what they had; the refused item's later changes are never written,
    no later batch is, and the batch never completes (so no checkpoint passes the refused record)."""
    records = _changes(items=16, per_item=10)
    refused = records[37]
    sink = RefusesOne(refused.event_id)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[8])
    tickets = []
    for batch in _batches(records, 40):
        try:
            tickets.append(delivery.submit(batch))
        except DeliveryBlockedError:
            break  # the lanes have stopped already: nothing more is handed to them
    deadline = time.monotonic() + 10
    while delivery.error is None and time.monotonic() < deadline:
        delivery.wait_done(0.1)
    assert isinstance(delivery.error, DeliveryBlockedError) and refused.event_id in str(delivery.error)
    with pytest.raises(DeliveryBlockedError):
        delivery.done()
    later_of_item = [r.event_id for r in records if r.keys == refused.keys and r.sequence > refused.sequence]
    taken = {r.event_id for r in sink.taken}
    assert not taken & set(later_of_item)
    blocked = tickets[37 // 40]  # the refused record's batch
    assert blocked is not None and not blocked.done
    assert not dead_letters.path.exists()
