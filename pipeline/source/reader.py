"""One shard's iterator lifecycle: acquire, page through with GetRecords, re-acquire when it expires.

A reader does one GetRecords per `poll()` and keeps no thread of its own; the scheduler decides when each of a
thousand readers polls next.

Records older than the stream's 24-hour retention are trimmed. Running into that is never silent: with
`on_trimmed_data="fail"` the reader raises TrimmedDataError (the pipeline stops and says where); with
"skip_to_trim_horizon" it logs an ERROR naming the shard and the position it skipped from, counts the skip in
`trimmed_skips`, and goes on from the oldest record still kept.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from botocore.exceptions import ClientError

from pipeline.retry import RetryPolicy
from pipeline.source.stream import ShardInfo

log = logging.getLogger(__name__)

OnTrimmedData = Literal["fail", "skip_to_trim_horizon"]

# Per-record allowance on top of the item size the stream reports, for the envelope (ids, names, numbers).
RECORD_OVERHEAD_BYTES = 256

# GetRecords returns at most 1000 records or 1 MB, whichever comes first. A page of full-size items (1.7 KB each,
# twice that on the wire with both images) reaches the 1 MB cap at about 600 records, well short of the record
# limit; a body past half the cap most likely stopped there because the next record did not fit. Polling again
# at once costs one call if that guess is wrong, and saves a pause per page on a shard with a backlog.
AT_CAP_BODY_BYTES = 512 * 1024


class TrimmedDataError(Exception):
    """Records this consumer needed are older than the stream's retention: they are gone."""


@dataclass(frozen=True, slots=True)
class StartPosition:
    """Where a shard is read from: TRIM_HORIZON, LATEST, or after a sequence number (a checkpoint)."""

    kind: Literal["TRIM_HORIZON", "LATEST", "AFTER_SEQUENCE_NUMBER"]
    sequence_number: str | None = None

    @classmethod
    def after(cls, sequence_number: str) -> StartPosition:
        return cls("AFTER_SEQUENCE_NUMBER", sequence_number)

    def __str__(self) -> str:
        if self.kind == "AFTER_SEQUENCE_NUMBER":
            return f"after sequence number {self.sequence_number}"
        return self.kind


@dataclass(frozen=True, slots=True)
class ShardPage:
    """One GetRecords result for one shard, still in DynamoDB JSON; `end_of_shard` marks its last page.

    The reader does not move past a page when it reads it, only when `ShardReader.advance` is told the page was
    handed on: a failure in between leaves the reader where it was, so the page is read again, never lost.
    """

    shard_id: str
    records: tuple[Mapping[str, Any], ...]
    """GetRecords' `Records` elements: `WireRecord`s, or dicts when botocore or the general parse read the page."""
    size_bytes: int
    end_of_shard: bool
    at_limit: bool = False
    """The page stopped at GetRecords' record limit or near its 1 MB cap: more records are probably waiting."""
    skipped: int = 0
    """Records at the front of the page made before the pipeline's start (`not_before`), left out."""
    last_sequence: str | None = None
    """The sequence number of the page's last record, skipped ones included: where the reader goes next."""
    next_iterator: str | None = field(default=None, repr=False)

    @property
    def read(self) -> int:
        """Records the service returned, skipped ones included."""
        return len(self.records) + self.skipped


class ShardReader:
    def __init__(
        self,
        shard: ShardInfo,
        *,
        stream_arn: str,
        streams: Any,
        retry: RetryPolicy,
        start: StartPosition,
        limit: int = 1000,
        on_trimmed_data: OnTrimmedData = "fail",
        not_before: float | None = None,
    ) -> None:
        """`not_before` (epoch seconds): records made before it are left out until the first one made at or
        after it; from then on every record counts. Records read through a LATEST iterator are not filtered (the
        iterator is the exact start); once it is spent with nothing read (it expired), a LATEST reader given
        `not_before` falls back to TRIM_HORIZON with the filter, so an expiry cannot skip what was written
        meanwhile."""
        self.shard = shard
        self._stream_arn = stream_arn
        self._streams = streams
        self._retry = retry
        self.start = start
        self._limit = limit
        self._on_trimmed_data = on_trimmed_data
        self._not_before = not_before
        self._filtering = start.kind != "LATEST"
        self._latest_taken = False
        self.skipped_before_start = 0
        """Records left out because they were made before `not_before`."""
        self._iterator: str | None = None
        self.service_time: float | None = None
        """The service's clock (its HTTP Date, whole seconds) when it last issued this reader an iterator."""
        self.last_sequence_read: str | None = start.sequence_number
        self.empty_polls = 0
        self.finished = False
        self.trimmed_skips = 0
        """Times this shard went on from TRIM_HORIZON after records it still needed had been trimmed."""

    def count_from(self, not_before: float) -> None:
        """Leave out records made before `not_before` (epoch seconds), as the constructor's argument does: for a
        reader whose LATEST iterator was fixed before the moment it counts from was known."""
        self._not_before = not_before

    @property
    def counting_from(self) -> float | None:
        """The creation time from which records count, while records before it are still being left out."""
        return self._not_before

    @property
    def limit(self) -> int:
        """Records per GetRecords call: a page this full means more is waiting."""
        return self._limit

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id

    def fix_position(self) -> None:
        """Acquire the iterator now rather than at the first poll: LATEST means "from this moment", and the
        moment a pipeline has started is when `start()` returns, not when a worker first gets to the shard."""
        if self._iterator is None:
            self._iterator = self._acquire()

    def _position(self) -> StartPosition:
        # After records were read, resume after the last one: never re-read what is already queued.
        if self.last_sequence_read is not None:
            return StartPosition.after(self.last_sequence_read)
        if self.start.kind == "LATEST" and self._latest_taken and self._not_before is not None:
            # LATEST was a moment, and `not_before` names it: a later iterator must not mean "now" again.
            return StartPosition("TRIM_HORIZON")
        return self.start

    def _acquire(self) -> str:
        position = self._position()
        try:
            iterator = self._get_shard_iterator(position)
        except ClientError as exc:
            if _error_code(exc) != "TrimmedDataAccessException":
                raise
            self._trimmed(exc)
            position = self._position()
            iterator = self._get_shard_iterator(position)
        if position.kind == "LATEST":
            self._latest_taken = True
            self._filtering = False
        elif position.kind == "TRIM_HORIZON":
            self._filtering = True
        return iterator

    def _get_shard_iterator(self, position: StartPosition) -> str:
        request: dict[str, Any] = {
            "StreamArn": self._stream_arn,
            "ShardId": self.shard_id,
            "ShardIteratorType": position.kind,
        }
        if position.sequence_number is not None:
            request["SequenceNumber"] = position.sequence_number
        response = self._retry.call("GetShardIterator", self._streams.get_shard_iterator, **request)
        self.service_time = _response_date(response) or self.service_time
        return str(response["ShardIterator"])

    def _trimmed(self, exc: ClientError) -> None:
        """Records this shard still needed are gone: stop, or say so loudly and go on from the oldest kept."""
        position = self._position()
        if self._on_trimmed_data == "fail":
            raise TrimmedDataError(
                f"shard {self.shard_id}: records {position} are past the stream's 24-hour retention and were "
                "trimmed; they cannot be delivered (source.on_trimmed_data = 'skip_to_trim_horizon' goes on from "
                "the oldest record still kept)"
            ) from exc
        self.trimmed_skips += 1
        log.error(
            "shard %s: records %s were trimmed (past the stream's 24-hour retention) and are lost; "
            "skipping to TRIM_HORIZON, the oldest record still kept (skip %d on this shard)",
            self.shard_id,
            position,
            self.trimmed_skips,
        )
        self.start = StartPosition("TRIM_HORIZON")
        self.last_sequence_read = None

    def _gone(self, exc: ClientError) -> dict[str, Any]:
        """The shard left the stream (24 hours after it closed: a long outage held this reader that long) before
        it was read to its end: stop, or say so loudly and treat it as ended, so its children are read."""
        what = f"shard {self.shard_id} is no longer in the stream (it aged out, 24 hours after it closed)"
        position = self._position()
        if self._on_trimmed_data == "fail":
            raise TrimmedDataError(
                f"{what} before it was read to its end: records {position} are gone "
                "(source.on_trimmed_data = 'skip_to_trim_horizon' goes on with its children)"
            ) from exc
        self.trimmed_skips += 1
        log.error("%s before it was read to its end: records %s are lost; going on with its children", what, position)
        return {"Records": []}  # no NextShardIterator: the end of the shard

    def poll(self) -> ShardPage:
        """One GetRecords call. The page after the shard's last is never requested. The reader stays where it
        was until `advance(page)`."""
        if self.finished:
            raise RuntimeError(f"shard {self.shard_id} is already finished")
        response = self._get_records()
        records = tuple(response.get("Records", ()))
        next_iterator = response.get("NextShardIterator")
        at_limit = len(records) >= self.limit or _body_bytes(response) >= AT_CAP_BODY_BYTES
        last_sequence = records[-1]["dynamodb"]["SequenceNumber"] if records else None
        skipped = 0
        if self._filtering and self._not_before is not None:
            while skipped < len(records) and _created(records[skipped]) < self._not_before:
                skipped += 1
            records = records[skipped:]
        size = sum(int(r["dynamodb"].get("SizeBytes", 0)) + RECORD_OVERHEAD_BYTES for r in records)
        return ShardPage(
            self.shard_id,
            records,
            size,
            end_of_shard=next_iterator is None,
            at_limit=at_limit,
            skipped=skipped,
            last_sequence=last_sequence,
            next_iterator=next_iterator,
        )

    def advance(self, page: ShardPage) -> None:
        """The page was handed on: move past it."""
        self._iterator = page.next_iterator
        self.finished = page.next_iterator is None
        if page.last_sequence is not None:
            self.last_sequence_read = page.last_sequence
            self.empty_polls = 0
        else:
            self.empty_polls += 1
        if page.skipped:
            self.skipped_before_start += page.skipped
        if page.records:
            self._not_before = None  # in stream order, everything after a record made after the start is too

    def _get_records(self) -> dict[str, Any]:
        """GetRecords at the current position. An iterator that expired, or that points at records trimmed since
        it was issued, is replaced (at most twice a poll); any other error is left to the caller."""
        replaced = 0
        while True:
            try:
                if self._iterator is None:
                    self._iterator = self._acquire()
                response: dict[str, Any] = self._retry.call(
                    "GetRecords", self._streams.get_records, ShardIterator=self._iterator, Limit=self._limit
                )
                return response
            except ClientError as exc:
                code = _error_code(exc)
                if code == "ResourceNotFoundException":
                    return self._gone(exc)
                if code not in ("ExpiredIteratorException", "TrimmedDataAccessException"):
                    raise
                self._iterator = None  # spent either way: the next poll acquires a fresh one if this one fails
                if code == "TrimmedDataAccessException":
                    self._trimmed(exc)
                else:
                    log.info("shard %s: iterator expired, re-acquiring %s", self.shard_id, self._position())
                replaced += 1
                if replaced > 2:
                    raise


def _created(record: Mapping[str, Any]) -> float:
    epoch = creation_epoch(record["dynamodb"].get("ApproximateCreationDateTime"))
    return float("inf") if epoch is None else epoch  # no creation time: never assumed to be old


def creation_epoch(value: Any) -> float | None:
    """ApproximateCreationDateTime as boto3 parses it (datetime) or as the wire carries it (epoch seconds)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def _response_date(response: Mapping[str, Any]) -> float | None:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


def _body_bytes(response: dict[str, Any]) -> int:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    try:
        return int(headers.get("content-length", 0))
    except (TypeError, ValueError):
        return 0


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
