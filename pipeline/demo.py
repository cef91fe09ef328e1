"""`streamsink demo`: the whole pipeline against the embedded AWS stand-in, end to end, in under a minute.

It creates a table with a stream and an archive bucket, starts the pipeline, writes a mix of inserts, updates
and deletes covering every DynamoDB attribute type, waits until every change is checkpointed, stops gracefully,
then reads the archive back and shows what arrived.
"""

from __future__ import annotations

import collections
import time
from typing import Any, TextIO

import pyarrow.dataset as ds

from pipeline.emulator import EmbeddedAws, create_stream_table
from pipeline.runner import Pipeline
from pipeline.settings import load_settings

TABLE = "orders"
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


def write_changes(dynamodb: Any, table: str, count: int) -> collections.Counter[str]:
    """Inserts `count` items, updates half of them and deletes a fifth; returns changes by event name."""
    written: collections.Counter[str] = collections.Counter()
    for n in range(count):
        dynamodb.put_item(TableName=table, Item=_item(n))
        written["INSERT"] += 1
    for n in range(0, count, 2):
        dynamodb.update_item(
            TableName=table,
            Key={"pk": {"S": f"customer#{n % 17}"}, "sk": {"S": f"order#{n:05d}"}},
            UpdateExpression="SET paid = :t, amount = amount + :d",
            ExpressionAttributeValues={":t": {"BOOL": True}, ":d": {"N": "0.01"}},
        )
        written["MODIFY"] += 1
    for n in range(0, count, 5):
        dynamodb.delete_item(TableName=table, Key={"pk": {"S": f"customer#{n % 17}"}, "sk": {"S": f"order#{n:05d}"}})
        written["REMOVE"] += 1
    return written


def run_demo(changes: int = 200, out: TextIO | None = None, timeout: float = 45.0) -> int:
    import sys

    out = out or sys.stdout
    started = time.monotonic()
    with EmbeddedAws() as aws:
        dynamodb = aws.client("dynamodb")
        create_stream_table(dynamodb, TABLE)
        aws.client("s3").create_bucket(Bucket=BUCKET)
        settings = load_settings(
            source={"table_name": TABLE, "region": aws.region, "endpoint_url": aws.endpoint_url},
            batch={"max_wait_seconds": 0.5},
            reader={"idle_poll_max_seconds": 0.5},
            dead_letter={"path": "streamsink-demo-dead-letters.jsonl"},
            sinks=[{"type": "s3_parquet", "bucket": BUCKET, "prefix": "orders/", "buffer_max_seconds": 2}],
        )
        pipeline = Pipeline(settings)
        pipeline.start()
        print(f"embedded AWS at {aws.endpoint_url}; pipeline reading {pipeline.stream_arn}", file=out)
        written = write_changes(dynamodb, TABLE, changes)
        total = sum(written.values())
        print(f"wrote {total} changes: {dict(written)}", file=out)
        deadline = time.monotonic() + timeout
        while pipeline.stats.checkpoints_written == 0 or sum(pipeline.stats.events.values()) < total:
            if pipeline.fatal or time.monotonic() > deadline:
                print(f"demo failed: {pipeline.fatal or 'timed out waiting for delivery'}", file=out)
                pipeline.stop()
                return 1
            time.sleep(0.2)
        clean = pipeline.stop()

        archive = ds.dataset(
            f"{BUCKET}/orders/", format="parquet", partitioning="hive", filesystem=_s3fs(aws.endpoint_url)
        ).to_table()
        by_event = collections.Counter(archive.column("event_name").to_pylist())
        distinct = len(set(archive.column("event_id").to_pylist()))
        objects = sum(len(getattr(s, "objects_written", [])) for s in pipeline.sinks)
        print(
            f"delivered {sum(by_event.values())} changes ({distinct} distinct event ids): {dict(by_event)}",
            file=out,
        )
        print(
            f"archive: {objects} Parquet object(s) under s3://{BUCKET}/orders/, {archive.num_rows} rows",
            file=out,
        )
        print("sample rows:", file=out)
        for row in archive.sort_by("sequence_number").slice(0, 3).to_pylist():
            print(
                f"  {row['approximate_creation_time']:%Y-%m-%dT%H:%M:%SZ} {row['event_name']:<6} "
                f"keys={row['keys']} new_image={(row['new_image'] or '')[:110]}...",
                file=out,
            )
        ok = clean and by_event == written and distinct == total
        print(
            f"{'OK' if ok else 'MISMATCH'}: {total} changes written, {distinct} archived exactly once "
            f"in {time.monotonic() - started:.1f}s",
            file=out,
        )
        return 0 if ok else 1


def _s3fs(endpoint_url: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint_url, skip_instance_cache=True)
