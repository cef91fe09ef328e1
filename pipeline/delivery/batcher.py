"""The bounded queue between readers and delivery, and the closing of batches.

The queue is bounded by records and by bytes: when delivery falls behind, readers wait in `put`, so memory stays
flat however large the backlog in the stream. Batches close on whichever comes first of `max_records`,
`max_bytes` or `max_wait_seconds` since the batch's first entry; records are unmarshalled as they join a batch.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.records import Batch, ChangeRecord, change_record_from_stream, snapshot_record
from pipeline.settings import BatchSettings
from pipeline.source.reader import ShardPage
from pipeline.source.snapshot import SnapshotPage

QueuedPage = ShardPage | SnapshotPage
"""What readers queue: a shard's GetRecords page, or a page of an initial load's items."""


def page_records(page: QueuedPage) -> int:
    return len(page.records) if isinstance(page, ShardPage) else len(page.items)


class QueueClosedError(Exception):
    """The queue was closed while a reader waited to put a page."""


class BoundedQueue:
    def __init__(self, max_records: int, max_bytes: int) -> None:
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._pages: collections.deque[QueuedPage] = collections.deque()
        self._records = 0
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        self.peak_records = 0

    def put(self, page: QueuedPage, *, share: float = 1.0) -> None:
        """Wait for room, then append. A page larger than the whole capacity still fits into an empty queue.

        `share`: the part of the capacity this page may fill up to. An initial load's pages wait while the queue
        is half full, so the stream's pages always find room: the load never holds the stream back."""
        n = page_records(page)
        max_records, max_bytes = self._max_records * share, self._max_bytes * share
        with self._cond:
            while (
                not self._closed
                and self._pages
                and (self._records + n > max_records or self._bytes + page.size_bytes > max_bytes)
            ):
                self._cond.wait()
            if self._closed:
                raise QueueClosedError("queue closed")
            self._pages.append(page)
            self._records += n
            self._bytes += page.size_bytes
            self.peak_records = max(self.peak_records, self._records)
            self._cond.notify_all()

    def get(self, timeout: float) -> QueuedPage | None:
        with self._cond:
            if not self._pages:
                self._cond.wait(timeout)
            if not self._pages:
                return None
            page = self._pages.popleft()
            self._records -= page_records(page)
            self._bytes -= page.size_bytes
            self._cond.notify_all()
            return page

    def close(self) -> None:
        """Wake and refuse waiting writers; readers can still drain what is queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def depth(self) -> tuple[int, int]:
        with self._cond:
            return self._records, self._bytes


LoadPosition = tuple[str | None, int, int, int]
"""An initial-load segment's position: (resume token, next page, items of the pages done, the hold they were read
under: the load's lease epoch)."""


@dataclass(frozen=True, slots=True)
class ClosedBatch:
    """A batch for the sinks plus what committing it means for checkpoints."""

    batch: Batch
    positions: dict[str, str]
    finished_shards: frozenset[str]
    load_pages: dict[int, LoadPosition] = field(default_factory=dict)
    """Initial-load segment -> where committing the batch moves it: its pages whose last item is in this batch or
    an earlier one (items counts those pages' items)."""


@dataclass
class _OpenBatch:
    records: list[ChangeRecord] = field(default_factory=list)
    size_bytes: int = 0
    positions: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    load_pages: dict[int, LoadPosition] = field(default_factory=dict)
    opened_at: float | None = None

    def empty(self) -> bool:
        return not self.records and not self.finished and not self.load_pages


def moved_on(earlier: LoadPosition | None, later: LoadPosition) -> LoadPosition:
    """A segment's position after `later` (pages done after `earlier`): the items of both count when they were read
    under the same hold of the load; one read under an earlier hold counts for nothing, and a late one of an earlier
    hold leaves the later hold's position as it is."""
    if earlier is not None and earlier[3] > later[3]:
        return earlier
    before = earlier[2] if earlier is not None and earlier[3] == later[3] else 0
    return (later[0], later[1], before + later[2], later[3])


class BatchAssembler:
    """Turns queued pages into closed batches. Used from the delivery thread only."""

    def __init__(
        self,
        settings: BatchSettings,
        table: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        stream_arn: str | None = None,
    ) -> None:
        self._settings = settings
        self._table = table
        self._stream_arn = stream_arn
        self._clock = clock
        self._open = _OpenBatch()
        self._load: tuple[str, tuple[str, ...], str | None] | None = None

    def expect_load(self, load_id: str, key_names: tuple[str, ...], region: str | None) -> None:
        """SNAPSHOT pages of `load_id` may be added from now on: items of a table keyed by `key_names`."""
        self._load = (load_id, key_names, region)

    def _add_snapshot(self, page: SnapshotPage) -> list[ClosedBatch]:
        assert self._load is not None, "a snapshot page before expect_load"
        load_id, key_names, region = self._load
        closed: list[ClosedBatch] = []
        per_item = page.size_bytes // max(1, len(page.items))
        for index, item in enumerate(page.items):
            record = snapshot_record(
                item,
                key_names=key_names,
                load_id=load_id,
                table=self._table,
                segment=page.segment,
                page=page.page,
                index=index,
                read_at=page.read_at,
                size_bytes=len(item) if isinstance(item, bytes) else per_item,
                stream_arn=self._stream_arn,
                region=region,
            )
            current = self._joined(record, closed)
            if index == len(page.items) - 1:  # the page is whole once this batch commits
                self._page_done(current, page)
            self._close_if_full(closed)
        if not page.items:
            self._page_done(self._opened(), page)
        return closed

    @staticmethod
    def _page_done(current: _OpenBatch, page: SnapshotPage) -> None:
        position = (page.resume, page.page + 1, len(page.items), page.hold)
        current.load_pages[page.segment] = moved_on(current.load_pages.get(page.segment), position)

    def _opened(self) -> _OpenBatch:
        """The open batch, its age counted from now if it was empty."""
        if self._open.opened_at is None:
            self._open.opened_at = self._clock()
        return self._open

    def _joined(self, record: ChangeRecord, closed: list[ClosedBatch]) -> _OpenBatch:
        """Add `record` to the open batch, closing that first if the record would take it past max_bytes (a
        ceiling: a sink may have a hard size cap); returns the batch it joined."""
        if self._open.records and self._open.size_bytes + record.size_bytes > self._settings.max_bytes:
            closed.append(self._close())
        current = self._opened()
        current.records.append(record)
        current.size_bytes += record.size_bytes
        return current

    def _close_if_full(self, closed: list[ClosedBatch]) -> None:
        current = self._open
        if len(current.records) >= self._settings.max_records or current.size_bytes >= self._settings.max_bytes:
            closed.append(self._close())

    def add(self, page: QueuedPage) -> list[ClosedBatch]:
        if isinstance(page, SnapshotPage):
            return self._add_snapshot(page)
        closed: list[ClosedBatch] = []
        for raw in page.records:
            record = change_record_from_stream(
                raw, table=self._table, shard_id=page.shard_id, stream_arn=self._stream_arn
            )
            self._joined(record, closed).positions[page.shard_id] = record.sequence_number
            self._close_if_full(closed)
        if page.end_of_shard:
            # The shard's last records are in this batch or an earlier one, so it is finished once this commits.
            self._opened().finished.add(page.shard_id)
        return closed

    def due(self) -> bool:
        opened = self._open.opened_at
        return opened is not None and self._clock() - opened >= self._settings.max_wait_seconds

    def seconds_until_due(self) -> float:
        opened = self._open.opened_at
        if opened is None:
            return self._settings.max_wait_seconds
        return max(0.0, opened + self._settings.max_wait_seconds - self._clock())

    def close(self) -> ClosedBatch | None:
        """Close the open batch now, if it holds anything."""
        return None if self._open.empty() else self._close()

    def _close(self) -> ClosedBatch:
        current = self._open
        self._open = _OpenBatch()
        return ClosedBatch(
            batch=Batch(tuple(current.records), current.size_bytes),
            positions=dict(current.positions),
            finished_shards=frozenset(current.finished),
            load_pages=dict(current.load_pages),
        )
