"""Throughput of the SQS and SNS sinks against a moto server, and what limits it.

Each sink writes the same ChangeRecords (read from the simulated stream: ~1.7 KB synthetic items, in batches of
`batch.max_records`, 1000 by default) to a fresh destination on a moto server in a process of its own. For
every run the script counts the batch calls and their request bytes (botocore's before-send event), and splits
the time between this process's CPU (building messages, botocore serialising and parsing) and the moto server's
CPU (from /proc), so the bottleneck can be named rather than guessed:

- `sink`: the sink's own `write()`, as the pipeline calls it;
- `floor`: the same entries, built beforehand, sent with the bare client in the same calls: moto plus botocore
  and nothing of the sink. The difference is what the sink's message building costs.

The sinks send one batch call at a time (10 entries, at most 256 KiB), so against AWS a call's round trip
bounds them: the `at N ms/call` column projects records/s as this process's CPU per record plus one round trip
per call. The DynamoDB replica sink is measured by `bench/replica_writes.py`; its figures are not repeated here.

Run from the repository root: ``python bench/sink_throughput.py`` (``--quick`` for a smoke run). Prints
figures; never asserts timings.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness import MotoServer, machine_line, table

from pipeline.aws import AwsClients
from pipeline.records import Batch, ChangeRecord, change_record_from_stream
from pipeline.testing.simulated_stream import StreamSimulator
from sinks.messages import MessageSink, batch_entries, build_message
from sinks.sns import SnsSink, SnsSinkSettings
from sinks.sqs import SqsSink, SqsSinkSettings

REGION = "us-east-1"
VARIANTS = ("sqs", "sqs-fifo", "sns", "sns-to-sqs")


@dataclass
class CallCounter:
    """Batch calls and request bytes one client sent, counted on botocore's before-send event."""

    calls: int = 0
    bytes: int = 0

    def __call__(self, request: Any, **_: Any) -> None:
        self.calls += 1
        body = request.body
        self.bytes += len(body) if isinstance(body, bytes | str) else 0


@dataclass(frozen=True)
class Run:
    variant: str
    mode: str
    records: int
    wall_seconds: float
    client_cpu_seconds: float
    moto_cpu_seconds: float
    calls: int
    request_bytes: int
    batch_rates: list[float]
    """records/s of each write, in order."""

    @property
    def per_second(self) -> float:
        return self.records / self.wall_seconds

    def projected(self, rtt_seconds: float) -> float:
        """records/s if each call also waited one round trip, with this process's CPU as measured."""
        return self.records / (self.client_cpu_seconds + self.calls * rtt_seconds)

    @property
    def bottleneck(self) -> str:
        """What the wall time was spent on. Calls go one at a time, so the client and moto take turns."""
        moto, client = self.moto_cpu_seconds / self.wall_seconds, self.client_cpu_seconds / self.wall_seconds
        if moto >= 0.6:
            return f"moto CPU ({moto:.0%} of wall)"
        if client >= 0.6:
            return f"client CPU ({client:.0%} of wall)"
        if moto + client >= 0.8:
            return f"client then moto, in turn ({client:.0%} + {moto:.0%})"
        return f"neither CPU (moto {moto:.0%}, client {client:.0%} of wall)"


def change_records(count: int, item_bytes: int) -> list[ChangeRecord]:
    """The records a pipeline would hand the sinks, from the simulator's wire JSON."""
    simulator = StreamSimulator(call_log_size=10)
    stream = simulator.create_stream("orders", shards=1)
    stream.write_synthetic(count, item_bytes=item_bytes, track_items=False)
    (shard_id,) = stream.open_shard_ids()
    return [change_record_from_stream(raw, table="orders", shard_id=shard_id) for raw in stream.records(shard_id)]


def make_sink(variant: str, moto: MotoServer, client: Any) -> MessageSink[Any]:
    """A sink on a fresh destination: a new queue, or a new topic (with a new subscribed queue for sns-to-sqs).

    moto's SQS does work in proportion to a queue's depth for every message sent (it recomputes the queue's
    attributes over all its messages), so a queue that only fills makes each write slower than the last.
    """
    name = f"changes-{uuid.uuid4().hex[:10]}"
    aws = AwsClients(REGION, moto.url)
    sqs = aws.client("sqs")
    if variant.startswith("sqs"):
        fifo = variant == "sqs-fifo"
        url = sqs.create_queue(
            QueueName=name + (".fifo" if fifo else ""), Attributes={"FifoQueue": "true"} if fifo else {}
        )["QueueUrl"]
        sqs_settings = SqsSinkSettings(type="sqs", queue_url=url)
        return SqsSink(sqs_settings, region=REGION, endpoint_url=moto.url, client=client)
    sns = aws.client("sns")
    topic_arn = sns.create_topic(Name=name)["TopicArn"]
    if variant == "sns-to-sqs":
        url = sqs.create_queue(QueueName=name + "-subscriber")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    sns_settings = SnsSinkSettings(type="sns", topic_arn=topic_arn)
    return SnsSink(sns_settings, region=REGION, endpoint_url=moto.url, client=client)


def _send_all(send: Callable[..., Any], calls: list[dict[str, Any]]) -> None:
    for arguments in calls:
        send(**arguments)


def floor_call(sink: MessageSink[Any], client: Any, batch: Batch) -> Callable[[], None]:
    """The batch calls the sink would make for `batch`, as one function using the bare client and entries built
    beforehand."""
    fifo = sink.settings.fifo
    messages = [build_message(r, sink.settings.body_format, fifo=fifo) for r in batch.records]
    groups = [messages[i : i + 10] for i in range(0, len(messages), 10)]
    if isinstance(sink, SqsSink):
        url = sink.settings.queue_url
        calls = [{"QueueUrl": url, "Entries": batch_entries(g, "MessageBody")} for g in groups]
        return functools.partial(_send_all, client.send_message_batch, calls)
    arn = sink.settings.address
    calls = [{"TopicArn": arn, "PublishBatchRequestEntries": batch_entries(g, "Message")} for g in groups]
    return functools.partial(_send_all, client.publish_batch, calls)


def measure(variant: str, mode: str, moto: MotoServer, batches: Sequence[Batch]) -> Run:
    """Each batch to a fresh destination (set up untimed); wall, CPU and moto's CPU around the writes only."""
    service = "sqs" if variant.startswith("sqs") else "sns"
    client = AwsClients(REGION, moto.url).client(service)
    counter = CallCounter()
    operation = "SendMessageBatch" if service == "sqs" else "PublishBatch"
    client.meta.events.register(f"before-send.{service}.{operation}", counter)
    rates: list[float] = []
    wall = cpu = moto_cpu = 0.0
    for batch in batches:
        sink = make_sink(variant, moto, client)
        sink.open()
        floor = floor_call(sink, client, batch) if mode == "floor" else None
        moto_before = moto.cpu_seconds()
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        if floor is not None:
            floor()
        else:
            result = sink.write(batch)
            if result.failed:
                raise RuntimeError(f"{variant}: {len(result.failed)} record(s) not taken")
        elapsed = time.perf_counter() - started_wall
        cpu += time.process_time() - started_cpu
        moto_cpu += moto.cpu_seconds() - moto_before
        wall += elapsed
        rates.append(len(batch) / elapsed)
    records = sum(len(b) for b in batches)
    return Run(variant, mode, records, wall, cpu, moto_cpu, counter.calls, counter.bytes, rates)


def report(runs: list[Run], args: argparse.Namespace) -> str:
    rows = []
    for run in runs:
        rows.append(
            [
                run.variant,
                run.mode,
                f"{run.per_second:,.0f}",
                f"{run.batch_rates[0]:,.0f} -> {run.batch_rates[-1]:,.0f}",
                f"{run.calls / run.records:.2f}",
                f"{run.request_bytes / max(1, run.calls) / 1024:.1f}",
                f"{run.client_cpu_seconds / run.records * 1e6:,.0f}",
                f"{run.moto_cpu_seconds / run.records * 1e6:,.0f}",
                f"{run.projected(args.rtt_ms / 1000):,.0f}",
                run.bottleneck,
            ]
        )
    return "\n".join(
        [
            f"{args.records:,} changes of ~{args.item_bytes:,} B in writes of {args.batch_size}, body format "
            "'change', a fresh destination per write, moto in its own process",
            "",
            table(
                [
                    "sink",
                    "mode",
                    "records/s",
                    "first -> last write",
                    "calls/record",
                    "KiB/call",
                    "client us/record",
                    "moto us/record",
                    f"at {args.rtt_ms:g} ms/call",
                    "bottleneck (wall time)",
                ],
                rows,
            ),
            "",
            "mode sink: the sink's write(); floor: the same entries sent with the bare client (sink code excluded)",
            "first -> last write: records/s of the first and the last write",
            "client / moto us/record: CPU of this process (message building, botocore) / of the moto server",
            f"at {args.rtt_ms:g} ms/call: projected records/s with one round trip per call, calls one at a time "
            "as the sink makes them",
            "DynamoDB replica sink: see bench/replica_writes.py (per-item conditional writes; moto-bound)",
            "",
            machine_line(),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=2000, help="changes per run (default 2000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="records per write (default 100; each write goes to a fresh destination, so this is also the "
        "deepest a queue gets)",
    )
    parser.add_argument("--item-bytes", type=int, default=1700, help="approximate item size (default 1700)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="round trip for the projection (default 10)")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-client runs")
    parser.add_argument("--quick", action="store_true", help="300 records")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = 300

    records = change_records(args.records, args.item_bytes)
    batches = [
        Batch(tuple(records[i : i + args.batch_size]), sum(r.size_bytes for r in records[i : i + args.batch_size]))
        for i in range(0, len(records), args.batch_size)
    ]
    runs = []
    with MotoServer() as moto:
        for variant in args.variants:
            for mode in ("sink",) if args.no_floor else ("sink", "floor"):
                runs.append(measure(variant, mode, moto, batches))
                print(f"... {variant} {mode}: {runs[-1].per_second:,.0f} records/s", file=sys.stderr)
    print(report(runs, args))


if __name__ == "__main__":
    main()
