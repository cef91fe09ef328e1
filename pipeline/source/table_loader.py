"""TableLoader: an initial load's segments read side by side into the pipeline's queue, behind the stream.

Each unfinished segment is read from where its progress row says (the last page every sink took), page by page,
on a small pool of threads. Pages join the same bounded queue the shard readers fill (`put`, given by the
runner), but only while it is less than half full (`BoundedQueue.put(share=...)`): the stream's pages always
find room, so a copy of any size never holds back the changes that must win over it, and memory stays bounded
by the queue, not the table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from pipeline.errors import is_retryable
from pipeline.retry import ShutdownInterruptedError
from pipeline.source.snapshot import SnapshotPage, SnapshotSource
from pipeline.state.load_progress import SegmentProgress

log = logging.getLogger(__name__)

LOAD_QUEUE_SHARE = 0.5
"""The part of the queue an initial load's pages may fill: the rest is always the stream's."""

MAX_SEGMENT_THREADS = 32
OUTAGE_PAUSE_SECONDS = 30.0
"""After a segment's retries ran out on an outage (throttling, 5xx, no connection): the pause before it goes on
from the last page it queued. An outage of the table slows the copy; it never stops the pipeline."""


class TableLoader:
    def __init__(
        self,
        source: SnapshotSource,
        put: Callable[[SnapshotPage], None],
        progress: Mapping[int, SegmentProgress],
        *,
        stopping: threading.Event,
        on_error: Callable[[BaseException], None],
        outage_pause_seconds: float = OUTAGE_PAUSE_SECONDS,
    ) -> None:
        self._source = source
        self._put = put
        """Waits for room in the queue; raises once the pipeline stops (its error goes to `on_error`)."""
        self._todo: deque[int] = deque(sorted(s for s, p in progress.items() if not p.done))
        self._segments = len(self._todo)
        self._progress = dict(progress)
        self._stopping = stopping
        self._on_error = on_error
        self._pause = outage_pause_seconds
        self._halt = threading.Event()
        self.outages = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.segments_read: set[int] = set()
        """Segments whose last page is queued (not yet committed)."""

    def start(self) -> None:
        count = min(len(self._todo), MAX_SEGMENT_THREADS)
        for n in range(count):
            thread = threading.Thread(target=self._work, name=f"load-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def stopped_early(self) -> bool:
        """Stopped, failed or left segments unread: its threads ended without every segment read."""
        with self._lock:
            return self._halt.is_set() or len(self.segments_read) < self._segments

    def stop(self) -> None:
        """Stop at the next page (the load was lost to another worker): no more pages are queued."""
        self._halt.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def reading(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _next(self) -> int | None:
        with self._lock:
            return self._todo.popleft() if self._todo else None

    def _work(self) -> None:
        while not self._stopping.is_set() and not self._halt.is_set():
            segment = self._next()
            if segment is None:
                return
            progress = self._progress[segment]
            resume, next_page = progress.resume, progress.next_page
            while not self._stopping.is_set() and not self._halt.is_set():
                try:
                    for page in self._source.pages(segment, resume, next_page):
                        if self._stopping.is_set() or self._halt.is_set():
                            return
                        self._put(page)
                        resume, next_page = page.resume, page.page + 1
                        if page.resume is None:
                            with self._lock:
                                self.segments_read.add(segment)
                    break
                except ShutdownInterruptedError:
                    return
                except Exception as exc:
                    if not is_retryable(exc):  # a refusal, or the queue closed at a stop: the runner decides
                        self._on_error(exc)
                        return
                    self.outages += 1
                    log.error(
                        "initial load, segment %d: %s; going on from its last page in %.0fs", segment, exc, self._pause
                    )
                    if self._stopping.wait(self._pause) or self._halt.is_set():
                        return
