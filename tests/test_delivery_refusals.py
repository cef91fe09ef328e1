"""Delivery's promises for refusals and the counts an operator reads, in the scenarios that break them most easily:

- block mode writes no later change of the refused item, also when a standard queue would have sent it in the
  same SendMessageBatch as the change it refuses (one change per item per call);
- a destination gone or forbidden while running stops delivery naming it instead of dead-lettering the whole
  stream: a queue or topic whose KMS key may no longer be used, a replica whose write permission is revoked;
- the status line's `in flight` counts what the sinks are still writing, not batches done behind a slower one or
  records the pipeline's filter dropped;
- the stop line says what each sink delivered, and sinks need distinct names;
- a sink whose write ended with a record dead-lettered after `retry.max_attempts` is no longer marked failing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pipeline.delivery.dead_letter import JsonlDeadLetters
from pipeline.delivery.driver import Delivery
from pipeline.delivery.lanes import lane_of
from pipeline.records import Batch, ChangeRecord
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import DestinationUnusableError, RetryableSinkError, Sink, WriteResult
from sinks.memory import MemorySink
from sinks.sns import SnsSink, SnsSinkSettings
from sinks.sqs import SqsSink, SqsSinkSettings
from tests.conftest import unique, wait_until
from tests.test_delivery_promises import QUICK, _batch, _change, _dead_event_ids, _replica_sink, _wait_blocked
from tests.test_sink_sqs import FaultInjectingClient, body_event_id, pipeline_client, receive_all

# -- block mode ------------------------------------------------------------------------------------------------


def test_block_mode_sends_no_later_change_of_the_refused_item_in_the_same_call_to_a_standard_queue(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """README: "Block mode stops as soon as a refusal is known: no later change of the refused item is written"
    (with block mode standard queues keep an item on one lane for it). A standard queue's SendMessageBatch is
    the longest prefix of the write, so an item's two changes travel in one call; the queue refuses the first
    entry as the sender's fault (here an invalid DelaySeconds, refused by the server itself) and takes the
    second in the same call. The pipeline blocks only afterwards, with the refused item's next change on the
    queue. (A FIFO queue carries one change per item in a call; a standard queue in block mode needs the same.)"""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    first = _change(1, "item-1")
    later = _change(2, "item-1")

    def invalid_delay(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "DelaySeconds": 901} if body_event_id(entry) == first.event_id else entry

    client = FaultInjectingClient(
        pipeline_client(aws, "sqs"), batch_method="send_message_batch", entries_key="Entries", alter=invalid_delay
    )
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, on_failure="block", concurrency=[1])
    try:
        delivery.submit(_batch([first, later]))
        _wait_blocked(delivery)
        assert first.event_id in str(delivery.error)
        sent = [json.loads(m["Body"])["eventID"] for m in receive_all(sqs, url)]
        assert later.event_id not in sent, (
            f"the refused item's next change {later.event_id} was sent ({len(client.calls)} call(s))"
        )
    finally:
        delivery.stop()


# -- a destination forbidden while running ---------------------------------------------------------------------


class RefusesEveryCall:
    """The real client; every call of `method` is answered with a call-level error `code` (HTTP 400), as the
    service answers once the destination may no longer be written. Every other call goes through."""

    def __init__(self, real: Any, method: str | tuple[str, ...], code: str, operation: str) -> None:
        self._real = real
        self._methods = (method,) if isinstance(method, str) else method
        self._code = code
        self._operation = operation
        self._lock = threading.Lock()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if name not in self._methods:
            return attribute

        def call(**_kwargs: Any) -> Any:
            with self._lock:
                self.calls += 1
            raise ClientError(
                {
                    "Error": {"Code": self._code, "Message": "User is not authorized to use this destination"},
                    "ResponseMetadata": {"HTTPStatusCode": 400},
                },
                self._operation,
            )

        return call


def _outcome(delivery: Delivery, records: list[ChangeRecord]) -> tuple[bool, BaseException | None]:
    ticket = delivery.submit(_batch(records))
    assert ticket is not None
    wait_until(lambda: ticket.done or delivery.error is not None, timeout=30, what="the write to end")
    return ticket.done, delivery.error


@pytest.mark.parametrize("code", ["KmsAccessDenied", "KMS.AccessDeniedException", "KmsDisabled"])
def test_a_queue_whose_kms_key_may_no_longer_be_used_stops_delivery_and_dead_letters_nothing(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters, code: str
) -> None:
    """README, Guarantees: "A destination that is gone or forbidden while running (...; access denied for the
    call) stops the pipeline naming it, rather than dead-letter the whole stream one record at a time." An
    encrypted queue whose KMS key the pipeline's role may no longer use (or that was disabled) answers every
    SendMessageBatch with KmsAccessDenied / KmsDisabled (the query-compatible code KMS.AccessDeniedException):
    the sink maps it to a refusal of the call, the writer bisects down to single records and dead-letters every
    one of them, and the batch is done, so the checkpoint moves past the whole stream."""
    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    client = RefusesEveryCall(pipeline_client(aws, "sqs"), "send_message_batch", code, "SendMessageBatch")
    sink = SqsSink(
        SqsSinkSettings(type="sqs", queue_url=url), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[1])
    records = [_change(n, f"item-{n:02d}") for n in range(20)]
    try:
        done, error = _outcome(delivery, records)
        dead = _dead_event_ids(dead_letters)
        assert dead == [], f"{len(dead)} of {len(records)} records dead-lettered after {client.calls} calls ({code})"
        assert not done and isinstance(error, DestinationUnusableError), f"batch done: {done}, error: {error!r}"
    finally:
        delivery.stop()


def test_a_topic_whose_kms_key_may_no_longer_be_used_stops_delivery_and_dead_letters_nothing(
    aws: EmbeddedAws, dead_letters: JsonlDeadLetters
) -> None:
    """As for the queue: SNS answers PublishBatch with KMSAccessDenied once the topic's key may not be used."""
    sns = aws.client("sns")
    topic = sns.create_topic(Name=unique("changes"))["TopicArn"]
    client = RefusesEveryCall(pipeline_client(aws, "sns"), "publish_batch", "KMSAccessDenied", "PublishBatch")
    sink = SnsSink(
        SnsSinkSettings(type="sns", topic_arn=topic), region=aws.region, endpoint_url=aws.endpoint_url, client=client
    )
    sink.open()
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[1])
    records = [_change(n, f"item-{n:02d}") for n in range(20)]
    try:
        done, error = _outcome(delivery, records)
        dead = _dead_event_ids(dead_letters)
        assert dead == [], f"{len(dead)} of {len(records)} records dead-lettered after {client.calls} calls"
        assert not done and isinstance(error, DestinationUnusableError), f"batch done: {done}, error: {error!r}"
    finally:
        delivery.stop()


def test_a_replica_whose_write_permission_is_revoked_stops_delivery_and_dead_letters_nothing(
    aws: EmbeddedAws, replica: str, dead_letters: JsonlDeadLetters
) -> None:
    """README, Guarantees: a destination "forbidden while running (...; access denied for the call) stops the
    pipeline"; the table of cases: "a sink's destination is deleted, or access to it revoked, while running ...
    nothing is dead-lettered". The role loses dynamodb:PutItem on the replica: every PutItem (one call per change)
    is answered AccessDeniedException, which the replica sink reports as a refusal of that record, so every change
    of the stream is dead-lettered one at a time and the checkpoint moves on."""
    client = RefusesEveryCall(
        pipeline_client(aws, "dynamodb"), ("put_item", "delete_item"), "AccessDeniedException", "PutItem"
    )
    sink = _replica_sink(aws, replica, client)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[4])
    records = [_change(n, f"item-{n:02d}") for n in range(12)]
    try:
        done, error = _outcome(delivery, records)
        dead = _dead_event_ids(dead_letters)
        assert dead == [], f"{len(dead)} of {len(records)} changes dead-lettered after {client.calls} PutItem calls"
        assert not done and isinstance(error, DestinationUnusableError), f"batch done: {done}, error: {error!r}"
    finally:
        delivery.stop()


# -- what the status line calls in flight ----------------------------------------------------------------------


class StuckOn(Sink):
    """Takes every write at once, except one holding `stuck_event_id`, which waits until released."""

    def __init__(self, stuck_event_id: str) -> None:
        super().__init__("stuck")
        self._stuck = stuck_event_id
        self.release = threading.Event()

    def write(self, batch: Batch) -> WriteResult:
        if any(r.event_id == self._stuck for r in batch.records):
            self.release.wait(30)
        return WriteResult()


def test_in_flight_counts_only_what_the_sinks_are_still_writing(dead_letters: JsonlDeadLetters) -> None:
    """README, Operating it: the status line's `in flight` is "what the sinks are still writing"
    (`Delivery.window_depth`: "Records and bytes handed to the sinks and not yet taken by all of them"). One
    record is stuck in its write on one lane; behind it a batch of 10 the sink has taken on the other lane, and a
    batch of 10 read of which the pipeline's filter admitted none (never handed to any sink). The sink is
    writing 1 record; the status line and the JSON progress line (`in_flight`) say 21."""
    stuck = _change(0, "hot")
    stuck_lane = lane_of(stuck, 2)
    sink = StuckOn(stuck.event_id)
    delivery = Delivery([sink], retry=QUICK, dead_letters=dead_letters, concurrency=[2])
    taken = [r for r in (_change(n, f"item-{n:03d}") for n in range(1, 200)) if lane_of(r, 2) != stuck_lane][:10]
    dropped = [_change(n, f"other-{n:03d}") for n in range(200, 210)]
    try:
        first = delivery.submit(_batch([stuck]))
        second = delivery.submit(_batch(taken))
        third = delivery.submit(_batch([]), read=_batch(dropped))
        assert first is not None and second is not None and third is not None
        wait_until(lambda: second.done and third.done, timeout=20, what="the batches behind the stuck one")
        assert not first.done and delivery.done() == []
        in_flight = delivery.records_writing  # what the status line and the JSON progress line show
        assert in_flight == 1, (
            f"in flight: {in_flight} records while the sink is writing 1; {len(taken)} it has taken and "
            f"{len(dropped)} the filter dropped are counted as still being written"
        )
    finally:
        sink.release.set()
        delivery.stop()


# -- the stop line ---------------------------------------------------------------------------------------------


def test_the_stop_line_counts_what_each_sink_delivered_and_sinks_need_distinct_names(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    """README, Running it: the stop line says what each sink delivered. Names key those counts (and the metrics
    and dead letters), so two sinks of one name are refused rather than counted as one."""
    for n in range(5):
        dynamodb.put_item(
            TableName=table, Item={"pk": {"S": f"customer#{n}"}, "sk": {"S": f"order#{n:05d}"}, "amount": {"N": "1"}}
        )
    with pytest.raises(ValueError, match="two sinks are named 'memory'"):
        Pipeline(make_settings(), sinks=[MemorySink(), MemorySink()])
    first, second = MemorySink("first"), MemorySink("second")
    pipeline = Pipeline(make_settings(), sinks=[first, second])
    pipeline.start()
    try:
        wait_until(lambda: pipeline.stats.checkpointed >= 5, timeout=20, what="the five changes checkpointed")
    finally:
        pipeline.stop(timeout=10)
    assert (len(first.records), len(second.records)) == (5, 5)
    summary = pipeline.stop_summary()
    assert "delivered: first 5, second 5;" in summary, summary


# -- health after a write that ended -------------------------------------------------------------------------


class ThrottlesOne(Sink):
    """Takes every record but one, which it reports throttled every time."""

    def __init__(self, throttled_event_id: str) -> None:
        super().__init__("throttles-one")
        self._throttled = throttled_event_id

    def write(self, batch: Batch) -> WriteResult:
        return WriteResult(
            failed={
                r.event_id: RetryableSinkError(f"record {r.event_id}: throttled")
                for r in batch.records
                if r.event_id == self._throttled
            }
        )


def test_a_sink_is_not_left_failing_once_its_write_ended_with_a_dead_letter(dead_letters: JsonlDeadLetters) -> None:
    """README, Operating it: `/healthz` turns 503 naming a sink whose "writes failing" for `metrics.stall_seconds`
    (`DeliveryStats.failing_since`: "while they do"). A record that failed itself `retry.max_attempts` times while
    the others were taken is dead-lettered and the write is over, but the sink stays marked failing since that
    attempt: with the stream quiet afterwards, health reports a healthy sink failing for as long as no other write
    of it succeeds."""
    one_attempt = RetryPolicy(RetrySettings(max_attempts=1, initial_delay_seconds=0.001, max_delay_seconds=0.01))
    records = [_change(n, f"item-{n:02d}") for n in range(3)]
    sink = ThrottlesOne(records[1].event_id)
    delivery = Delivery([sink], retry=one_attempt, dead_letters=dead_letters, concurrency=[1])
    try:
        delivery.deliver(_batch(records))
        assert _dead_event_ids(dead_letters) == [records[1].event_id]
        assert delivery.stats.failing_since == {}, (
            f"sink still marked failing after its write ended: {delivery.stats.last_error}"
        )
    finally:
        delivery.stop()
