"""An initial load by parallel Scan: each segment pages through its share of the table, within a read budget.

Scan reads what the table holds when each page is read (eventually consistent unless `consistent_read`), so the
copy is not one moment's picture. It does not need to be: the stream is read from before the first page on, and
every change it carries wins over the copy of the same item (`sinks.dynamodb_table`), so an item the copy read
before a change ends as the change left it.

Read capacity: a page costs its bytes / 4 KB read units (half that, eventually consistent). `ReadBudget` holds
all segments together to `read_units_per_second` on the units DynamoDB reports it consumed (ConsumedCapacity),
so the table's own readers keep the rest of its capacity.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
from botocore.exceptions import ClientError

from pipeline.errors import error_code, is_retryable
from pipeline.records import to_json_bytes
from pipeline.retry import RetryPolicy
from pipeline.source.snapshot import SnapshotPage, SnapshotSourceError


class ReadBudget:
    """Read units per second across every segment: a page's cost is paid after it is read (DynamoDB reports it
    then), and the next page of any segment waits until the units spent so far fit the rate."""

    def __init__(
        self,
        units_per_second: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = units_per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._free_at = clock()
        """The moment the units spent so far are paid for at the rate."""
        self.spent = 0.0

    def spend(self, units: float) -> None:
        with self._lock:
            self.spent += units
            if self._rate is None:
                return
            self._free_at = max(self._free_at, self._clock()) + units / self._rate

    def wait(self) -> None:
        """Block until the budget has room (interruptible through `sleep`)."""
        if self._rate is None:
            return
        with self._lock:
            delay = self._free_at - self._clock()
        if delay > 0:
            self._sleep(delay)


class TableScanSource:
    """The `SnapshotSource` of `source.initial_load = "scan"`."""

    def __init__(
        self,
        *,
        dynamodb: Any,
        table_name: str,
        segments: int,
        retry: RetryPolicy,
        budget: ReadBudget,
        consistent_read: bool = False,
        page_items: int | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ddb = dynamodb
        self._table = table_name
        self._segments = segments
        self._retry = retry
        self._budget = budget
        self._consistent = consistent_read
        self._page_items = page_items
        self._wall_clock = wall_clock
        self.key_names: tuple[str, ...] = ()
        self._estimated: int | None = None

    @property
    def segments(self) -> int:
        return self._segments

    @property
    def estimated_items(self) -> int | None:
        return self._estimated

    def prepare(self) -> None:
        try:
            table = self._retry.call("DescribeTable (initial load)", self._ddb.describe_table, TableName=self._table)
        except ClientError as exc:
            if is_retryable(exc):
                raise  # an outage that outlasted the retries: the copy pauses, it does not stop the pipeline
            raise SnapshotSourceError(_refusal(self._table, "DescribeTable", exc)) from exc
        description = table["Table"]
        schema = sorted(description["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
        self.key_names = tuple(k["AttributeName"] for k in schema)
        # ItemCount is refreshed about every six hours: good for an ETA, not for a check.
        self._estimated = int(description.get("ItemCount", 0)) or None

    def pages(self, segment: int, resume: str | None, first_page: int) -> Iterator[SnapshotPage]:
        request: dict[str, Any] = {
            "TableName": self._table,
            "Segment": segment,
            "TotalSegments": self._segments,
            "ReturnConsumedCapacity": "TOTAL",
            "ConsistentRead": self._consistent,
        }
        if self._page_items is not None:
            request["Limit"] = self._page_items
        if resume is not None:
            request["ExclusiveStartKey"] = decode_start_key(resume)
        page_number = first_page
        while True:
            self._budget.wait()
            read_at = self._wall_clock()
            try:
                answer = self._retry.call(f"Scan (segment {segment})", self._ddb.scan, **request)
            except ClientError as exc:
                if is_retryable(exc):
                    raise  # throttling or 5xx past the retries: the segment pauses and goes on from this page
                raise SnapshotSourceError(_refusal(self._table, "Scan", exc)) from exc
            units = float(answer.get("ConsumedCapacity", {}).get("CapacityUnits", 0.0))
            self._budget.spend(units)
            items = tuple(answer.get("Items", ()))
            last_key = answer.get("LastEvaluatedKey")
            yield SnapshotPage(
                segment=segment,
                items=items,
                size_bytes=sum(len(item) if isinstance(item, bytes) else len(to_json_bytes(item)) for item in items),
                resume=None if last_key is None else encode_start_key(last_key),
                page=page_number,
                read_at=read_at,
                read_units=units,
            )
            if last_key is None:
                return
            request["ExclusiveStartKey"] = last_key
            page_number += 1


def encode_start_key(key: Mapping[str, Any]) -> str:
    """A LastEvaluatedKey as text for the load's progress row (binary key values as base64)."""
    return orjson.dumps(
        {name: {"B": base64.b64encode(v["B"]).decode()} if "B" in v else v for name, v in key.items()}
    ).decode()


def decode_start_key(text: str) -> dict[str, Any]:
    key: dict[str, Any] = orjson.loads(text)
    return {name: {"B": base64.b64decode(v["B"])} if "B" in v else v for name, v in key.items()}


def _refusal(table: str, operation: str, exc: ClientError) -> str:
    code = error_code(exc)
    if code == "ResourceNotFoundException":
        return f"initial load: table {table!r} does not exist ({operation}); check source.table_name and region"
    if code in ("AccessDeniedException", "UnrecognizedClientException"):
        return (
            f"initial load: {code} on {operation} of table {table!r}; allow dynamodb:{operation} on it "
            "(config/iam-policy.json)"
        )
    return f"initial load: {operation} of table {table!r} refused: {code}"
