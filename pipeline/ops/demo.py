"""`streamsink demo`: the whole pipeline against the embedded AWS stand-in, end to end, in under a minute.

One table feeds all four sinks: a Parquet archive on S3, a replica table, an SQS queue and an SNS topic (with a
queue subscribed). The demo writes inserts, updates and deletes covering every DynamoDB attribute type, waits
until every change is checkpointed, stops gracefully, then reads each destination back and checks it received
every change: the archive and both queues by event id, the replica by comparing it with the source table.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
import pyarrow.dataset as ds

from pipeline.runner import Pipeline
from pipeline.settings import load_settings
from pipeline.testing.emulator import EmbeddedAws, create_stream_table

TABLE = "orders"
REPLICA = "orders-replica"
BUCKET = "audit-archive"


def _item(n: int) -> dict[str, Any]:
    """An item using every attribute type, including a number with 38 significant digits."""
    return {
        "pk": {"S": f"customer#{n % 17}"},
        "sk": {"S": f"order#{n:05d}"},
        "amount": {"N": f"{n}.{n:02d}"},
        "precise": {"N": "1234567890123456789012345678.9012345678"},
        "paid": {"BOOL": n % 2 == 0},
        "coupon": {"NULL": True},
        "blob": {"B": n.to_bytes(4, "big")},
        "tags": {"SS": ["new", f"tag{n % 5}"]},
        "scores": {"NS": [str(n), "0.5"]},
        "chunks": {"BS": [b"\x00", bytes([n % 256])]},
        "lines": {"L": [{"S": "widget"}, {"N": "2"}, {"M": {"sku": {"S": f"sku-{n}"}}}]},
        "address": {"M": {"city": {"S": "Lyon"}, "zip": {"N": "69001"}}},
    }


def changes_for(count: int) -> int:
    """How many changes `write_changes(..., count)` makes."""
    return count + len(range(0, count, 2)) + len(range(0, count, 5))


def write_changes(
    dynamodb: Any, table: str, count: int, progress: Callable[[int], None] | None = None
) -> collections.Counter[str]:
    """Inserts `count` items, updates half of them and deletes a fifth; returns changes by event name.

    `progress(changes written so far)` is called after every change."""
    written: collections.Counter[str] = collections.Counter()
    for n in range(count):
        dynamodb.put_item(TableName=table, Item=_item(n))
        written["INSERT"] += 1
        if progress is not None:
            progress(written.total())
    for n in range(0, count, 2):
        dynamodb.update_item(
            TableName=table,
            Key={"pk": {"S": f"customer#{n % 17}"}, "sk": {"S": f"order#{n:05d}"}},
            UpdateExpression="SET paid = :t, amount = amount + :d",
            ExpressionAttributeValues={":t": {"BOOL": True}, ":d": {"N": "0.01"}},
        )
        written["MODIFY"] += 1
        if progress is not None:
            progress(written.total())
    for n in range(0, count, 5):
        dynamodb.delete_item(TableName=table, Key={"pk": {"S": f"customer#{n % 17}"}, "sk": {"S": f"order#{n:05d}"}})
        written["REMOVE"] += 1
        if progress is not None:
            progress(written.total())
    return written


class _Steps:
    """Prints each step with the seconds since the demo started, flushed at once (stdout may be a pipe), so that
    a pause always says what it is waiting for. `every` prints at most once per `PROGRESS_SECONDS`."""

    PROGRESS_SECONDS = 2.0

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.started = time.monotonic()
        self._printed = self.started

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed:5.1f}s] {text}", file=self._out, flush=True)
        self._printed = time.monotonic()

    def every(self, text: str) -> None:
        if time.monotonic() - self._printed >= self.PROGRESS_SECONDS:
            self.say(text)


def run_demo(changes: int = 200, out: TextIO | None = None, timeout: float = 90.0) -> int:
    import sys

    out = out or sys.stdout
    steps = _Steps(out)
    print(
        "streamsink demo: the times shown are the demo's own, from its start; installing streamsink and moto "
        "is not part of them",
        file=out,
        flush=True,
    )
    steps.say("starting the embedded AWS stand-in (a moto server on a loopback port)")
    with EmbeddedAws() as aws:
        steps.say(f"embedded AWS at {aws.endpoint_url}; creating table {TABLE} (with a stream) and the destinations")
        dynamodb = aws.client("dynamodb")
        create_stream_table(dynamodb, TABLE)
        destinations = _create_destinations(aws)
        settings = load_settings(
            source={"table_name": TABLE, "region": aws.region, "endpoint_url": aws.endpoint_url},
            batch={"max_wait_seconds": 0.5},
            reader={"idle_poll_max_seconds": 0.5},
            dead_letter={"path": "streamsink-demo-dead-letters.jsonl"},
            sinks=[
                {
                    "type": "s3_parquet",
                    "name": "archive",
                    "bucket": BUCKET,
                    "prefix": "orders/",
                    "buffer_max_seconds": 2,
                },
                {"type": "dynamodb_table", "name": "replica", "table_name": REPLICA},
                {"type": "sqs", "name": "queue", "queue_url": destinations.queue_url, "body_format": "change"},
                {"type": "sns", "name": "topic", "topic_arn": destinations.topic_arn, "body_format": "dynamodb"},
            ],
        )
        pipeline = Pipeline(settings)
        pipeline.start()
        steps.say(f"pipeline reading {pipeline.stream_arn}")
        steps.say(f"sinks: {', '.join(sink.name for sink in pipeline.sinks)}")
        total = changes_for(changes)
        steps.say(f"writing {total} changes to {TABLE}: {changes} inserts, then updates and deletes")

        def delivered() -> str:
            stats = pipeline.stats
            return f"{stats.checkpointed} checkpointed, {stats.buffered} more in the sinks waiting for a flush"

        written = write_changes(
            dynamodb, TABLE, changes, lambda done: steps.every(f"  wrote {done} of {total}; {delivered()}")
        )
        steps.say(
            f"wrote {total} changes: {dict(written)}; waiting until every sink has them and they are checkpointed"
        )
        deadline = time.monotonic() + timeout
        while pipeline.stats.checkpoints_written == 0 or sum(pipeline.stats.events.values()) < total:
            if pipeline.fatal or time.monotonic() > deadline:
                print(f"demo failed: {pipeline.fatal or 'timed out waiting for delivery'}", file=out)
                pipeline.stop()
                return 1
            steps.every(f"  of {total}: {delivered()}")
            time.sleep(0.2)
        steps.say("stopping the pipeline: flushing the archive, writing the last checkpoints")
        clean = pipeline.stop()
        steps.say(pipeline.stop_summary())
        steps.say("reading every destination back")
        results = [
            _check_archive(aws, written, out),
            _check_replica(dynamodb, out),
            _check_messages(aws.client("sqs"), destinations.queue_url, "queue (sqs, change bodies)", total, out, steps),
            _check_messages(
                aws.client("sqs"),
                destinations.topic_queue_url,
                "topic (sns -> sqs, dynamodb bodies)",
                total,
                out,
                steps,
            ),
        ]
        ok = clean and all(results)
        print(
            f"{'OK' if ok else 'MISMATCH'}: {total} changes written; archive, replica, queue and topic each "
            f"received all of them in {steps.elapsed:.1f}s (the demo's own time)",
            file=out,
            flush=True,
        )
        return 0 if ok else 1


@dataclass(frozen=True, slots=True)
class _Destinations:
    queue_url: str
    topic_arn: str
    topic_queue_url: str


def _create_destinations(aws: EmbeddedAws) -> _Destinations:
    """The archive bucket, the replica table, a queue, and a topic with a queue subscribed to it."""
    aws.client("s3").create_bucket(Bucket=BUCKET)
    aws.client("dynamodb").create_table(
        TableName=REPLICA,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
    )
    sqs, sns = aws.client("sqs"), aws.client("sns")
    queue_url = sqs.create_queue(QueueName="order-changes")["QueueUrl"]
    topic_arn = sns.create_topic(Name="order-events")["TopicArn"]
    topic_queue_url = sqs.create_queue(QueueName="order-events-subscriber")["QueueUrl"]
    subscriber_arn = sqs.get_queue_attributes(QueueUrl=topic_queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=subscriber_arn,
        Attributes={"RawMessageDelivery": "true"},
    )
    return _Destinations(queue_url, topic_arn, topic_queue_url)


def _check_archive(aws: EmbeddedAws, written: collections.Counter[str], out: TextIO) -> bool:
    archive = ds.dataset(
        f"{BUCKET}/orders/", format="parquet", partitioning="hive", filesystem=_s3fs(aws.endpoint_url)
    ).to_table()
    by_event = collections.Counter(archive.column("event_name").to_pylist())
    distinct = len(set(archive.column("event_id").to_pylist()))
    print(
        f"archive: {archive.num_rows} rows under s3://{BUCKET}/orders/, {distinct} distinct changes",
        file=out,
        flush=True,
    )
    for row in archive.sort_by("sequence_number").slice(0, 2).to_pylist():
        print(
            f"  {row['approximate_creation_time']:%Y-%m-%dT%H:%M:%SZ} {row['event_name']:<6} "
            f"keys={row['keys']} new_image={(row['new_image'] or '')[:100]}...",
            file=out,
        )
    return by_event == written and distinct == sum(written.values())


def _check_replica(dynamodb: Any, out: TextIO) -> bool:
    """The replica holds exactly the source's items (the sink's sequence attribute aside)."""
    source = _scan(dynamodb, TABLE)
    replica = _scan(dynamodb, REPLICA)
    for item in replica.values():
        item.pop("_streamsink_sequence", None)
    same = source == replica
    print(
        f"replica: {len(replica)} items, {'equal to' if same else 'DIFFERENT from'} the source table",
        file=out,
        flush=True,
    )
    return same


def _scan(dynamodb: Any, table: str) -> dict[tuple[str, str], dict[str, Any]]:
    from boto3.dynamodb.types import TypeDeserializer

    plain = TypeDeserializer()
    items: dict[tuple[str, str], dict[str, Any]] = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table):
        for item in page["Items"]:
            values = {name: plain.deserialize(value) for name, value in item.items()}
            items[(values["pk"], values["sk"])] = values
    return items


def _check_messages(sqs: Any, queue_url: str, label: str, total: int, out: TextIO, steps: _Steps) -> bool:
    """Every change arrived as a message: count distinct event ids (delivery is at least once).

    Read messages are deleted, as a consumer would: the emulator's ReceiveMessage slows down with every message
    a queue holds, received or not."""
    event_ids: set[str] = set()
    messages = 0
    empty = 0
    while empty < 3:
        batch = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        empty = 0 if batch else empty + 1
        for message in batch:
            messages += 1
            event_ids.add(orjson.loads(message["Body"])["eventID"])
        if batch:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)],
            )
        steps.every(f"  {label}: {messages} of {total} messages read")
    print(f"{label}: {messages} messages, {len(event_ids)} distinct changes", file=out, flush=True)
    return len(event_ids) == total


def _s3fs(endpoint_url: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint_url, skip_instance_cache=True)
