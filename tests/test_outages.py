"""A destination that is down is an outage for every sink and for the dead-letter destinations: it is waited out
however long it lasts, nothing is dead-lettered, the checkpoint stays at what is durable, and once the destination
is back it holds every change.

Each destination is reached through `FaultProxy`, which fails its requests (connection resets or 5xx) for far
longer than `retry.max_attempts` back-offs (shrunk to hundredths of a second here: 3 attempts take about 0.1 s,
the outage about 2.5 s and dozens of attempts). The source and the checkpoint table talk to moto directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeDeserializer

from pipeline.ops.demo import _item, write_changes
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.memory import FlakySink
from tests.conftest import read_archive, stream_records, unique, wait_until
from tests.fault_proxy import RESET, SLOW_DOWN, Fault, FaultProxy, RequestInfo, any_request, s3_bucket
from tests.test_sink_sns import subscribe_queue
from tests.test_sink_sqs import receive_all

OUTAGE_SECONDS = 2.5
RETRY = {"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05}


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


@dataclass
class Destination:
    """One sink's destination behind the proxy: its [[sinks]] entry, what the outage hits, and its contents."""

    sink: dict[str, Any]
    down: Callable[[RequestInfo], bool]
    fault: Fault
    event_ids: Callable[[], list[str]]


def _service(name: str) -> Callable[[RequestInfo], bool]:
    return lambda request: request.service == name


def _archive(aws: EmbeddedAws, proxy: FaultProxy) -> Destination:
    bucket = unique("archive")
    aws.client("s3").create_bucket(Bucket=bucket)
    return Destination(
        sink={"type": "s3_parquet", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.2},
        down=s3_bucket(bucket),
        fault=SLOW_DOWN,
        event_ids=lambda: read_archive(aws, bucket).column("event_id").to_pylist(),
    )


def _bodies(aws: EmbeddedAws, url: str) -> list[str]:
    return [json.loads(m["Body"])["eventID"] for m in receive_all(aws.client("sqs"), url)]


def _queue(aws: EmbeddedAws, proxy: FaultProxy) -> Destination:
    url = aws.client("sqs").create_queue(QueueName=unique("changes"))["QueueUrl"]
    return Destination(
        sink={"type": "sqs", "queue_url": url}, down=_service("sqs"), fault=RESET, event_ids=lambda: _bodies(aws, url)
    )


def _topic(aws: EmbeddedAws, proxy: FaultProxy) -> Destination:
    sns, sqs = aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name=unique("changes"))["TopicArn"]
    url = subscribe_queue(sns, sqs, topic, raw=True)
    return Destination(
        sink={"type": "sns", "topic_arn": topic},
        down=_service("sns"),
        fault=Fault("status", 500, "InternalError"),
        event_ids=lambda: _bodies(aws, url),
    )


def _replica(aws: EmbeddedAws, proxy: FaultProxy) -> Destination:
    dynamodb = aws.client("dynamodb")
    name = unique("replica")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk")],
    )
    # The replica keeps items, not events: it is checked against the source table instead (see the test).
    return Destination(
        sink={"type": "dynamodb_table", "table_name": name},
        down=any_request,  # only the replica sink goes through the proxy; PutItem and DeleteItem are reset
        fault=RESET,
        event_ids=lambda: [],
    )


def _items(dynamodb: Any, table: str) -> dict[tuple[str, str], dict[str, Any]]:
    deserialize = TypeDeserializer().deserialize
    items = {}
    for page in dynamodb.get_paginator("scan").paginate(TableName=table):
        for raw in page["Items"]:
            item = {k: deserialize(v) for k, v in raw.items() if k != "_streamsink_sequence"}
            items[(item["pk"], item["sk"])] = item
    return items


def _last_sequence(aws: EmbeddedAws, table: str) -> str:
    return max((r["dynamodb"]["SequenceNumber"] for r in stream_records(aws, table)), key=int)


def _committed(pipeline: Pipeline) -> str | None:
    return next(iter(pipeline.stats.committed.values()), None)


@pytest.mark.parametrize("make_destination", [_archive, _queue, _topic, _replica], ids=["s3", "sqs", "sns", "replica"])
def test_a_long_outage_of_a_sink_is_waited_out_and_nothing_is_dead_lettered(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    proxy: FaultProxy,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    make_destination: Callable[[EmbeddedAws, FaultProxy], Destination],
) -> None:
    destination = make_destination(aws, proxy)
    settings = make_settings(
        retry=RETRY,
        batch={"max_records": 20, "max_wait_seconds": 0.1},
        sinks=[{**destination.sink, "endpoint_url": proxy.endpoint_url}],
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        for n in range(10):
            dynamodb.put_item(TableName=table, Item=_item(1000 + n))
        before = _last_sequence(aws, table)
        wait_until(lambda: _committed(pipeline) == before, what="the first changes checkpointed")

        outage = proxy.inject(destination.down, destination.fault)
        write_changes(dynamodb, table, 20)  # inserts, updates and deletes of the same keys
        deadline = time.monotonic() + OUTAGE_SECONDS
        wait_until(lambda: proxy.faults[destination.fault.kind] >= 10, what="the outage to be felt")
        while time.monotonic() < deadline:
            assert pipeline.fatal is None, pipeline.fatal
            assert pipeline.delivery.stats.dead_lettered == {}
            time.sleep(0.1)
        refused_during_outage = proxy.faults[destination.fault.kind]
        assert _committed(pipeline) == before, "the checkpoint moved past changes the sink never took"

        proxy.clear(outage)
        last = _last_sequence(aws, table)
        wait_until(lambda: _committed(pipeline) == last or pipeline.fatal is not None, timeout=60, what="recovery")
    finally:
        proxy.clear()
        clean = pipeline.stop()
    assert clean and pipeline.fatal is None, pipeline.fatal
    assert refused_during_outage > 3 * RETRY["max_attempts"], "the outage was not longer than the retry limit"
    assert pipeline.delivery.stats.dead_lettered == {}
    dead = Path(settings.dead_letter.path)
    assert not dead.exists() or dead.read_bytes() == b""  # (created at start, to check it can be written)
    truth = stream_records(aws, table)
    if destination.sink["type"] == "dynamodb_table":
        assert _items(dynamodb, destination.sink["table_name"]) == _items(dynamodb, table)
    else:
        assert set(destination.event_ids()) == {r["eventID"] for r in truth}


def _dead_letter_queue(aws: EmbeddedAws, tmp_path: Path) -> tuple[dict[str, Any], Callable[[], list[str]]]:
    url = aws.client("sqs").create_queue(QueueName=unique("dead-letters"))["QueueUrl"]
    section = {"destination": "sqs", "queue_url": url, "path": str(tmp_path / "overflow.jsonl")}
    return section, lambda: [json.loads(m["Body"])["event_id"] for m in receive_all(aws.client("sqs"), url)]


def _dead_letter_bucket(aws: EmbeddedAws, tmp_path: Path) -> tuple[dict[str, Any], Callable[[], list[str]]]:
    s3 = aws.client("s3")
    bucket = unique("dead-letters")
    s3.create_bucket(Bucket=bucket)

    def event_ids() -> list[str]:
        found = []
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found += [json.loads(line)["event_id"] for line in body.splitlines()]
        return found

    return {"destination": "s3", "bucket": bucket}, event_ids


@pytest.mark.parametrize("make_destination", [_dead_letter_queue, _dead_letter_bucket], ids=["sqs", "s3"])
def test_a_long_outage_of_the_dead_letter_destination_is_waited_out_without_a_checkpoint_past_it(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    proxy: FaultProxy,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    make_destination: Callable[[EmbeddedAws, Path], tuple[dict[str, Any], Callable[[], list[str]]]],
) -> None:
    section, dead_letter_ids = make_destination(aws, tmp_path)
    poison = {"order#00003", "order#00007"}

    def refuse(record: Any) -> PermanentSinkError | None:
        return PermanentSinkError("refused by the destination") if record.keys["sk"] in poison else None

    sink = FlakySink("copy", refuse=refuse)
    settings = make_settings(retry=RETRY, dead_letter={**section, "endpoint_url": proxy.endpoint_url})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    try:
        outage = proxy.inject(any_request, Fault("status", 503, "ServiceUnavailable"))
        for n in range(10):
            dynamodb.put_item(TableName=table, Item=_item(n))
        wait_until(lambda: proxy.faults["status"] >= 10, what="dead letters to meet the outage")
        time.sleep(OUTAGE_SECONDS)
        assert pipeline.fatal is None, pipeline.fatal
        # Changes before the first poison one may have closed a batch of their own and be checkpointed; nothing
        # at or past it may be.
        first_poison = min(
            int(r["dynamodb"]["SequenceNumber"])
            for r in stream_records(aws, table)
            if r["dynamodb"]["Keys"]["sk"]["S"] in poison
        )
        committed = [int(sequence) for sequence in pipeline.stats.committed.values()]
        assert all(sequence < first_poison for sequence in committed), (
            f"checkpointed past records whose dead letters are not durable: {committed} >= {first_poison}"
        )
        refused_during_outage = proxy.faults["status"]

        proxy.clear(outage)
        last = _last_sequence(aws, table)
        wait_until(lambda: _committed(pipeline) == last or pipeline.fatal is not None, timeout=60, what="recovery")
    finally:
        proxy.clear()
        clean = pipeline.stop()
    assert clean and pipeline.fatal is None, pipeline.fatal
    assert refused_during_outage > 3 * RETRY["max_attempts"]
    by_key = {r["dynamodb"]["Keys"]["sk"]["S"]: r["eventID"] for r in stream_records(aws, table)}
    assert sorted(dead_letter_ids()) == sorted(by_key[sk] for sk in poison)
    assert sorted(r.event_id for r in sink.records) == sorted(e for sk, e in by_key.items() if sk not in poison)
