"""What an initial load reads: pages of a table's items, per segment, each with the point a restart resumes at.

A load copies the table in `segments` that run side by side: Scan's parallel segments, or an export's data files
dealt out to that many readers. A segment moves on page by page; a page's `resume` token is where the segment
goes on once every sink has taken the page (the LastEvaluatedKey of a Scan, the file and line of an export), so a
crash repeats at most the pages after the last one committed, never the whole copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    """Items one segment read in one call (a Scan page, or a run of lines of an export's data file)."""

    segment: int
    items: tuple[Mapping[str, Any] | bytes, ...]
    """Whole items in DynamoDB JSON: each item's JSON text as the service sent it (a Scan parsed by
    `pipeline.wire`), or a mapping."""
    size_bytes: int
    resume: str | None
    """Where the segment goes on after this page; None: this was the segment's last page."""
    page: int
    """The page's number in its segment, from 0 (a resumed segment goes on counting): with `segment` it names
    every snapshot record of a load uniquely and in reading order."""
    read_at: float
    """When the items were read (epoch seconds): the moment of the Scan call, an export's ExportTime."""
    read_units: float = 0.0
    """Read capacity the page consumed (0 for an export, which consumes none)."""
    hold: int = 0
    """The lease epoch of the load under which the page was read: progress is committed only under that hold."""


class SnapshotSource(Protocol):
    """A way of reading a whole table in segments: `pipeline.source.table_scan`, `pipeline.source.table_export`."""

    @property
    def segments(self) -> int:
        """How many segments the copy runs in (known once `prepare` returned)."""
        ...

    @property
    def estimated_items(self) -> int | None:
        """How many items the copy will read, if known (an export's exact count, a table's ItemCount)."""
        ...

    def prepare(self) -> None:
        """Anything before the first page (an export: start it, or find it, and wait until it is complete).
        Retries outages; raises `SnapshotSourceError` with one line naming the resource and the fix."""
        ...

    def pages(self, segment: int, resume: str | None, first_page: int) -> Iterator[SnapshotPage]:
        """The segment's pages after `resume` (None: from its start), numbered from `first_page`; the last one
        has `resume = None`. An empty segment yields one empty page, so that it is committed as done."""
        ...


class SnapshotSourceError(Exception):
    """The copy cannot go on (no such table, no export, no permission): the message says what to fix."""
