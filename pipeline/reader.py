"""One shard's iterator lifecycle: acquire, page through with GetRecords, re-acquire when it expires.

A reader does one GetRecords per `poll()` and keeps no thread of its own; the scheduler decides when each of a
thousand readers polls next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from botocore.exceptions import ClientError

from pipeline.retry import RetryPolicy
from pipeline.stream import ShardInfo

log = logging.getLogger(__name__)

# Per-record allowance on top of the item size the stream reports, for the envelope (ids, names, numbers).
RECORD_OVERHEAD_BYTES = 256


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


@dataclass(frozen=True, slots=True)
class ShardPage:
    """One GetRecords result for one shard, still in DynamoDB JSON; `end_of_shard` marks its last page."""

    shard_id: str
    records: tuple[dict[str, Any], ...]
    size_bytes: int
    end_of_shard: bool


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
    ) -> None:
        self.shard = shard
        self._stream_arn = stream_arn
        self._streams = streams
        self._retry = retry
        self.start = start
        self._limit = limit
        self._iterator: str | None = None
        self.last_sequence_read: str | None = start.sequence_number
        self.empty_polls = 0
        self.finished = False

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id

    def _position(self) -> StartPosition:
        # After records were read, resume after the last one: never re-read what is already queued.
        if self.last_sequence_read is not None:
            return StartPosition.after(self.last_sequence_read)
        return self.start

    def _acquire(self) -> str:
        position = self._position()
        request: dict[str, Any] = {
            "StreamArn": self._stream_arn,
            "ShardId": self.shard_id,
            "ShardIteratorType": position.kind,
        }
        if position.sequence_number is not None:
            request["SequenceNumber"] = position.sequence_number
        try:
            response = self._retry.call("GetShardIterator", self._streams.get_shard_iterator, **request)
        except ClientError as exc:
            self._raise_if_trimmed(exc)
            raise
        return str(response["ShardIterator"])

    def _raise_if_trimmed(self, exc: ClientError) -> None:
        if exc.response.get("Error", {}).get("Code") == "TrimmedDataAccessException":
            raise TrimmedDataError(
                f"shard {self.shard_id}: records after {self._position()} are past the stream's 24-hour "
                "retention and were trimmed; they cannot be delivered"
            ) from exc

    def poll(self) -> ShardPage:
        """One GetRecords call. The page after the shard's last is never requested."""
        if self.finished:
            raise RuntimeError(f"shard {self.shard_id} is already finished")
        if self._iterator is None:
            self._iterator = self._acquire()
        try:
            response = self._retry.call(
                "GetRecords", self._streams.get_records, ShardIterator=self._iterator, Limit=self._limit
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code != "ExpiredIteratorException":
                self._raise_if_trimmed(exc)
                raise
            log.info("shard %s: iterator expired, re-acquiring from %s", self.shard_id, self._position())
            self._iterator = self._acquire()
            response = self._retry.call(
                "GetRecords", self._streams.get_records, ShardIterator=self._iterator, Limit=self._limit
            )
        records = tuple(response.get("Records", ()))
        self._iterator = response.get("NextShardIterator")
        if records:
            self.last_sequence_read = records[-1]["dynamodb"]["SequenceNumber"]
            self.empty_polls = 0
        else:
            self.empty_polls += 1
        self.finished = self._iterator is None
        size = sum(int(r["dynamodb"].get("SizeBytes", 0)) + RECORD_OVERHEAD_BYTES for r in records)
        return ShardPage(self.shard_id, records, size, end_of_shard=self.finished)
