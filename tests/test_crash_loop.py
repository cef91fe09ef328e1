"""Progress under a crash loop: a process killed every few seconds (an OOM loop, a liveness probe too strict)
still moves forward, because what every sink has taken is checkpointed batch by batch, not page by page.

Both tests deliver one GetRecords page of 300 changes in batches of 20 through a slow destination, so the page
takes several seconds: longer than the process is allowed to live.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.ops.demo import _item
from pipeline.records import Batch
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from sinks.base import WriteResult
from sinks.memory import MemorySink
from tests.conftest import stream_records, unique, wait_until
from tests.fault_proxy import FaultProxy, latency
from tests.test_crash_safety import StreamsinkProcess, load_checkpoints, write_config
from tests.test_sink_sqs import receive_all

PAGE = 300
BATCH = 20


class GatedSink(MemorySink):
    """Takes batches until `gate_after` records, then waits at the gate until the test opens it."""

    def __init__(self, gate_after: int) -> None:
        super().__init__("gated")
        self._gate_after = gate_after
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def write(self, batch: Batch) -> WriteResult:
        if len(self.records) >= self._gate_after:
            self.waiting.set()
            self.gate.wait(30)
        return super().write(batch)


def test_a_checkpoint_follows_every_batch_all_sinks_took_before_the_page_is_done(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    for n in range(PAGE):
        dynamodb.put_item(TableName=table, Item=_item(n))
    sequences = [r["dynamodb"]["SequenceNumber"] for r in stream_records(aws, table)]
    sink = GatedSink(gate_after=100)
    settings = make_settings(batch={"max_records": BATCH})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    try:
        wait_until(sink.waiting.is_set, what="five batches taken, the sixth held")

        # Half the page is still undelivered, and what was taken is durable already.
        def stored() -> list[str | None]:
            found = load_checkpoints(dynamodb, settings.checkpoint.table_name, pipeline.stream_arn)
            return [c.sequence_number for c in found.values()]

        wait_until(lambda: stored() == [sequences[99]], what="a checkpoint at the 100th change")
        assert len(sink.records) == 100
    finally:
        sink.gate.set()
        assert pipeline.stop() is True
    assert [r.sequence_number for r in sink.records] == sequences


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


@pytest.mark.slow
def test_a_process_killed_faster_than_it_delivers_a_page_still_moves_forward_every_time(
    aws: EmbeddedAws, proxy: FaultProxy, tmp_path: Path
) -> None:
    dynamodb, sqs = aws.client("dynamodb"), aws.client("sqs")
    table = unique("orders")
    stream_arn = create_stream_table(dynamodb, table)
    for n in range(PAGE):
        dynamodb.put_item(TableName=table, Item=_item(n))
    sequences = [int(r["dynamodb"]["SequenceNumber"]) for r in stream_records(aws, table)]
    queue_url = sqs.create_queue(QueueName=unique("changes"))["QueueUrl"]
    proxy.inject(lambda request: request.service == "sqs", latency(0.4))  # 15 batches x 2 calls: 12 s a page
    checkpoint_table = unique("checkpoints")
    config = write_config(
        tmp_path / "crash-loop.toml",
        {
            "source": {"table_name": table, "region": aws.region, "endpoint_url": aws.endpoint_url},
            "checkpoint": {"table_name": checkpoint_table},
            "batch": {"max_records": BATCH, "max_wait_seconds": 0.1},
            "reader": {"idle_poll_min_seconds": 0.05, "idle_poll_max_seconds": 0.2},
            "runtime": {"log_format": "text"},
            "dead_letter": {"path": str(tmp_path / "dead-letters.jsonl")},
            # One call at a time: a page takes longer than a life (with the default 32 it would not).
            "sinks": [
                {"type": "sqs", "queue_url": queue_url, "endpoint_url": proxy.endpoint_url, "max_concurrency": 1}
            ],
        },
    )

    def checkpointed() -> int:
        found = load_checkpoints(dynamodb, checkpoint_table, stream_arn)
        numbers = [int(c.sequence_number) for c in found.values() if c.sequence_number]
        return sum(1 for s in sequences if numbers and s <= max(numbers))

    progress = [0]
    for cycle in range(3):
        run = StreamsinkProcess(config, tmp_path / f"run-{cycle}.log")
        run.wait_for_output("reading shard")
        # Killed as soon as this life has checkpointed anything new: a few batches into the page, however slowly
        # the process started. A fixed lifetime would not do: on a loaded machine a slow start could use all of
        # it, and a checkpoint only at the end of the page would show here as one life delivering all of it.
        wait_until(
            lambda run=run: checkpointed() > progress[-1] or run.process.poll() is not None,
            timeout=30,
            what=f"a checkpoint past {progress[-1]} in cycle {cycle}",
        )
        run.kill()
        progress.append(checkpointed())
        assert progress[-1] > progress[-2], f"no progress in cycle {cycle}: {progress}\n{run.output()}"
        assert progress[-1] < PAGE, f"cycle {cycle} delivered the whole page in one life: {progress}"

    last = StreamsinkProcess(config, tmp_path / "last.log")
    wait_until(
        lambda: checkpointed() == PAGE or last.process.poll() is not None, timeout=60, what="the rest", interval=0.2
    )
    code, _ = last.terminate(timeout=30)
    assert code == 0, last.output()
    delivered = {json.loads(m["Body"])["eventID"] for m in receive_all(sqs, queue_url)}
    assert delivered == {r["eventID"] for r in stream_records(aws, table)}
    print(f"\ncrash loop: checkpointed changes after each kill {progress[1:]} of {PAGE}")
