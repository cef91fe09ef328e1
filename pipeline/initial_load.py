"""InitialLoadRun: a table's existing items copied to the sinks while the stream is read; the result equals the table.

The order that makes it exact:
1. the stream is registered first (`Pipeline.start` fixes every shard's position and the first start's moment
   before anything else), so every change made from then on is delivered, however long the copy takes;
2. the copy reads the table (`pipeline.source.table_scan` or `table_export`) into the same queue, behind the stream
   (`pipeline.source.table_loader`), as SNAPSHOT records; each segment's progress is checkpointed after every sink
   took its pages (`pipeline.state.load_progress`), so a crash resumes the copy where it was;
3. sinks make a stream change win over the copy of the same item (a replica keeps tombstones for deletes while the
   load runs: `sinks.dynamodb_table`);
4. when every segment is committed the load is `finished`: each worker's sinks stop keeping tombstones, and once
   every live worker has nothing in flight from before (their heartbeats say `load_ended`), the worker holding the
   load cleans up (`clean_up_initial_load`) and marks it `done`.

One worker runs the copy: it holds the load like a shard's lease (conditional writes on owner and epoch), a peer
takes it over when that worker's heartbeat stops, or at once when it released it at a stop.

Retention: the copy needs nothing from the stream, but the stream must keep being delivered while it runs. A
copy whose ETA is longer than the stream keeps changes is warned about (a long outage during it would lose
changes); a shard whose oldest undelivered change comes within `stop_margin_seconds` of the stream's retention
while the load runs stops the pipeline with an error naming it, before anything is lost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from pipeline.aws import AwsClients
from pipeline.errors import is_retryable
from pipeline.retry import RetryPolicy, ShutdownInterruptedError
from pipeline.settings import Settings
from pipeline.source.snapshot import SnapshotPage, SnapshotSource, SnapshotSourceError
from pipeline.source.table_export import TableExportSource
from pipeline.source.table_loader import OUTAGE_PAUSE_SECONDS, TableLoader
from pipeline.source.table_scan import ReadBudget, TableScanSource
from pipeline.state.leases import LeaseCoordinator
from pipeline.state.load_progress import (
    LoadLostError,
    LoadReport,
    LoadState,
    LoadStore,
    SegmentProgress,
    eta_seconds,
    report_of,
)
from sinks.base import Sink

log = logging.getLogger(__name__)


class RetentionRiskError(Exception):
    """Changes a load depends on are about to leave the stream: stopped before they are lost."""


def new_load_id(now: float) -> str:
    return "load-" + datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")


class InitialLoadRun:
    def __init__(
        self,
        settings: Settings,
        *,
        clients: AwsClients,
        sinks: Sequence[Sink],
        store: LoadStore,
        retry: RetryPolicy,
        source_retry: RetryPolicy,
        leases: LeaseCoordinator,
        table_name: str,
        table_arn: str,
        since: float | None,
        put: Callable[[SnapshotPage], None],
        fail: Callable[[BaseException], None],
        stopping: threading.Event,
        sleep: Callable[[float], None],
        request_pass: Callable[[], None] = lambda: None,
        coordination_read_at: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """`request_pass`: ask the lease thread for a pass now (the load finished: its clean-up is due).
        `coordination_read_at`: when (monotonic) the last read of every worker's heartbeat was sent."""
        self._settings = settings
        self._clients = clients
        self._sinks = list(sinks)
        self.store = store
        self._retry = retry
        self._source_retry = source_retry
        self._leases = leases
        self._table = table_name
        self._table_arn = table_arn
        self._since = since
        self._put = put
        self._fail = fail
        self._stopping = stopping
        self._sleep = sleep
        self._request_pass = request_pass
        self._coordination_read_at = coordination_read_at
        self._finish_seen_at: float | None = None
        self._finish_lock = threading.Lock()
        """When (monotonic) this worker knew the load finished: a clean-up needs a heartbeat read sent after it,
        so that every worker that may still be in load mode (it read `loading` before the finish) is in it."""
        self.state: LoadState | None = None
        self.key_names: tuple[str, ...] = ()
        self._committed: dict[int, SegmentProgress] = {}
        self._loader: TableLoader | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sinks_loading = False
        self._end_mark: int | None = None
        """Batches submitted when this worker's sinks left load mode: once that many are done, none is in flight."""
        self.batches_submitted = 0
        self.batches_done = 0
        self._cleaning: threading.Thread | None = None
        self._rate_start: tuple[float, int] | None = None
        """(stream clock, items committed) when this worker began copying: the rate and the ETA start there."""
        self._warned_eta = False
        self._warned_shards: set[str] = set()

    # -- start ---------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """At the start, after the stream is registered and before anything is delivered."""
        mode = self._settings.source.initial_load
        assert mode != "none"
        self.key_names = self._describe_keys()
        state = self.store.read()
        if state is None:
            state = self.store.begin(
                new_load_id(time.time()), mode, self._settings.initial_load.segments, None, self._since
            )
            log.info("initial load %s (%s, %d segment(s)) begins", state.load_id, state.mode, state.segments)
        elif state.mode != mode and state.phase != "done":
            log.warning(
                "initial load %s was begun as %r and goes on so (source.initial_load = %r now)",
                state.load_id,
                state.mode,
                mode,
            )
        self.state = state
        if state.phase == "loading":
            for sink in self._sinks:
                sink.begin_initial_load(state.load_id)
            self._sinks_loading = True
        else:
            self._end_mark = 0
        if state.phase == "done":
            log.info("initial load %s was done at %s: changes only", state.load_id, state.done_at)
            return
        self.load_pass()

    def _describe_keys(self) -> tuple[str, ...]:
        table = self._source_retry.call(
            "DescribeTable (initial load)", self._clients.client("dynamodb").describe_table, TableName=self._table
        )["Table"]
        schema = sorted(table["KeySchema"], key=lambda k: k["KeyType"] != "HASH")
        return tuple(k["AttributeName"] for k in schema)

    @property
    def load_id(self) -> str | None:
        return None if self.state is None else self.state.load_id

    @property
    def active(self) -> bool:
        """SNAPSHOT records may still come (the load is `loading`)."""
        return self.state is not None and self.state.phase == "loading"

    # -- passes (the lease thread) --------------------------------------------------------------------------

    def load_pass(self) -> None:
        """Take the load over when it is free or its worker is gone; learn that it finished; clean up when due."""
        state = self.store.read()
        if state is None:
            return
        with self._lock:
            self.state = state
        if state.phase == "done":
            self._leave_load_mode(state.load_id)
            return
        if self.store.holding and (state.owner != self.worker_id or state.lease_epoch != self.store.epoch):
            self._lost(f"worker {state.owner or 'none'} holds it now")
        holder_gone = state.owner is None or state.owner == self.worker_id or not self._leases.is_live(state.owner)
        if not self.store.holding and holder_gone:
            taken = self.store.take(state)
            if taken is not None:
                with self._lock:
                    self.state = taken
                if state.owner not in (None, self.worker_id):
                    log.info("initial load %s taken over from worker %s", state.load_id, state.owner)
                if taken.phase == "loading":
                    self._start_copy(taken)
        elif (
            self.store.holding
            and state.phase == "loading"
            and state.progress
            and all(p.done for p in state.progress.values())
            and not self._reading
        ):
            self._finish(state.load_id)  # every segment was committed, and then the finish was not written
        elif self.store.holding and state.phase == "loading" and not self._copy_under_way():
            # Held, and nothing copies: a take whose copy thread was still ending (a lost hold's), or whose read
            # after the take failed. The copy starts from the committed progress under this hold.
            self._start_copy(state)
        if state.phase == "finished":
            self._leave_load_mode(state.load_id)
            if self._finish_seen_at is None:
                self._finish_seen_at = time.monotonic()
            if self.store.holding and self._everyone_ended(state.load_id):
                self._start_clean_up(state.load_id)

    def _copy_under_way(self) -> bool:
        """A copy thread is preparing, or a loader is reading or has queued every segment (its last pages may
        still be committing: a second copy would move their segments back)."""
        if self._stopping.is_set() or (self._thread is not None and self._thread.is_alive()):
            return True
        loader = self._loader
        return loader is not None and (loader.reading or not loader.stopped_early)

    @property
    def worker_id(self) -> str:
        return self._leases.worker_id

    def _start_copy(self, state: LoadState) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._loader is not None:  # of an earlier hold of this load: its pages commit nothing under this one
            self._loader.stop()
            self._loader.join(5.0)
            self._loader = None
        self._committed = dict(state.progress)
        if any(p.next_page for p in state.progress.values()):
            log.info(
                "initial load %s resumes: %d of %d segment(s) left, %d item(s) copied before",
                state.load_id,
                state.segments - state.segments_done,
                state.segments,
                state.items,
            )
        self._thread = threading.Thread(target=self._copy, args=(state,), name="initial-load", daemon=True)
        self._thread.start()

    def _copy(self, state: LoadState) -> None:
        try:
            source = self._source(state)
            while True:
                try:
                    source.prepare()
                    break
                except Exception as exc:
                    if not is_retryable(exc):
                        raise
                    log.error("initial load: %s; trying again in %.0fs", exc, OUTAGE_PAUSE_SECONDS)
                    self._sleep(OUTAGE_PAUSE_SECONDS)
            if source.estimated_items is not None and source.estimated_items != state.estimated_items:
                self.store.set_estimate(source.estimated_items)
                with self._lock:
                    self.state = dataclasses.replace(self.state or state, estimated_items=source.estimated_items)
            # The progress and the hold as they are now: the load may have been lost, or lost and taken again,
            # while this thread waited for an export or an outage.
            current = self.store.read()
            hold = self.store.epoch
            if current is None or hold is None or current.owner != self.worker_id or current.lease_epoch != hold:
                return
            self._committed = dict(current.progress)
            self._rate_start = (self._clients.stream_now(), sum(p.items for p in self._committed.values()))
            if all(p.done for p in self._committed.values()):
                self._finish(state.load_id)  # committed to the end before, and the finish was not written then
                return

            def put(page: SnapshotPage) -> None:
                self._put(dataclasses.replace(page, hold=hold))

            loader = TableLoader(
                source,
                put,
                self._committed,
                stopping=self._stopping,
                on_error=self._copy_failed,
            )
            self._loader = loader
            loader.start()
            if self.store.epoch != hold:  # lost while the loader was being made
                loader.stop()
        except ShutdownInterruptedError:
            return
        except LoadLostError as exc:
            log.warning("initial load %s: %s", state.load_id, exc)
        except Exception as exc:
            self._copy_failed(exc)

    def _copy_failed(self, error: BaseException) -> None:
        if self._stopping.is_set():
            return  # the queue closed, or a retry wait was cut short, by the stop
        if isinstance(error, SnapshotSourceError):
            self._fail(error)
            return
        self._fail(SnapshotSourceError(f"initial load: {type(error).__name__}: {error}"))

    def _source(self, state: LoadState) -> SnapshotSource:
        load = self._settings.initial_load
        if state.mode == "scan":
            return TableScanSource(
                dynamodb=self._clients.scan_client(),
                table_name=self._table,
                segments=state.segments,
                retry=self._source_retry,
                budget=ReadBudget(load.read_units_per_second, sleep=self._sleep),
                consistent_read=load.consistent_read,
                page_items=load.page_items,
            )
        s3 = self._clients.client("s3", region=load.s3_region, endpoint_url=load.s3_endpoint_url)
        return TableExportSource(
            dynamodb=self._clients.client("dynamodb"),
            s3=s3,
            table_arn=self._table_arn,
            bucket=load.export_bucket,
            prefix=load.export_prefix,
            export_arn=state.export_arn or load.export_arn,
            segments=state.segments,
            retry=self._source_retry,
            poll_seconds=load.export_poll_seconds,
            sleep=self._sleep,
            # An export this load started began after the stream's positions were fixed. One it is given must not
            # be older than `since`: the whole second after the last LATEST iterator was taken.
            not_before=None if state.export_arn or state.since is None or not load.export_arn else state.since,
            on_export=self.store.set_export,
        )

    # -- commits (the delivery thread) ------------------------------------------------------------------------

    def commit(self, pages: Mapping[int, tuple[str | None, int, int, int]]) -> bool:
        """Segments moved forward by batches every sink took and flushed; True when this made the load finished
        (every SNAPSHOT record is delivered). Pages read under an earlier hold of the load (it was lost, then taken
        again) move nothing: the copy of this hold reads from the progress it found."""
        hold = self.store.epoch
        if not pages or hold is None:
            return False
        moved: dict[int, SegmentProgress] = {}
        for segment, (resume, next_page, items, read_under) in pages.items():
            if read_under != hold:
                continue
            before = self._committed.get(segment, SegmentProgress())
            moved[segment] = SegmentProgress(resume, next_page, before.items + items, resume is None)
        if not moved:
            return False
        try:
            self.store.save(moved)
        except LoadLostError as exc:
            self._lost(str(exc))
            return False
        self._committed.update(moved)
        state = self.state
        if state is None or not all(p.done for p in self._committed.values()):
            return False
        self._finish(state.load_id)
        return True

    def _finish(self, load_id: str) -> None:
        """Every segment is committed: the load is `finished` (a failure here is retried by the next start or
        pass, which find every segment done). The delivery thread's commit and a pass may both get here."""
        with self._finish_lock:
            if self._finish_seen_at is not None:
                return
            try:
                self.store.finish()
            except LoadLostError as exc:
                self._lost(str(exc))
                return
            except ShutdownInterruptedError:
                return
            except Exception as exc:  # the checkpoint table is out past the retries: the next pass tries again
                log.error("initial load %s: writing its finish failed, trying again at the next pass: %s", load_id, exc)
                return
            self._finish_seen_at = time.monotonic()
        log.info(
            "initial load %s finished: %d item(s) delivered to every sink",
            load_id,
            sum(p.items for p in self._committed.values()),
        )
        with self._lock:
            self.state = self.store.read()
        self._leave_load_mode(load_id)
        self._request_pass()

    def _lost(self, why: str) -> None:
        """Another worker holds the load now: stop copying, and let no copied item still queued reach a sink
        (`copying` is False, and the runner drops them): that worker copies them again after their changes."""
        self.store.forget()
        if self._loader is not None:
            self._loader.stop()
        log.warning("initial load %s: stopped copying, %s", self.load_id, why)

    @property
    def copying(self) -> bool:
        """This worker holds the load: only then may its SNAPSHOT records be delivered (once it lost the load,
        those still queued are dropped; the worker holding it now copies those items again)."""
        return self.store.holding

    @property
    def _reading(self) -> bool:
        return self._loader is not None and self._loader.reading

    @property
    def waiting_to_clean(self) -> bool:
        """Finished and held here, the clean-up not begun: each heartbeat read may be the one it waits for."""
        state = self.state
        return state is not None and state.phase == "finished" and self.store.holding and self._cleaning is None

    @property
    def read_everything(self) -> bool:
        """Every segment's last page is queued: the commit that finishes the load need not wait for a sink's
        buffer timer (the archive's may be a minute)."""
        loader = self._loader
        return self.copying and loader is not None and not loader.reading and not loader.stopped_early

    def _leave_load_mode(self, load_id: str) -> None:
        """No SNAPSHOT record comes any more: sinks stop keeping what only the load needed."""
        with self._lock:
            if not self._sinks_loading:
                if self._end_mark is None:
                    self._end_mark = 0
                return
            self._sinks_loading = False
            for sink in self._sinks:
                sink.end_initial_load(load_id)
            self._end_mark = self.batches_submitted

    @property
    def ended(self) -> str | None:
        """The load id, once this worker's sinks left load mode and no batch from before is in flight."""
        if self.state is None or self._end_mark is None or self.batches_done < self._end_mark:
            return None
        return self.state.load_id

    def _everyone_ended(self, load_id: str) -> bool:
        if self.ended != load_id or self._finish_seen_at is None:
            return False
        if self._coordination_read_at() <= self._finish_seen_at:
            return False  # a worker that joined just before the finish may not be in the heartbeats read yet
        return all(beat.load_ended == load_id for beat in self._leases.live_beats().values())

    def _start_clean_up(self, load_id: str) -> None:
        if self._cleaning is not None:
            return
        self._cleaning = threading.Thread(target=self._clean_up, args=(load_id,), name="load-clean-up", daemon=True)
        self._cleaning.start()

    def _clean_up(self, load_id: str) -> None:
        removed = 0
        try:
            for sink in self._sinks:
                count = self._retry.call(
                    f"cleaning up after initial load {load_id} (sink {sink.name})", sink.clean_up_initial_load, load_id
                )
                if count:
                    log.info("initial load %s: sink %s removed %d tombstone(s)", load_id, sink.name, count)
                removed += count
            self.store.mark_done(removed)
            with self._lock:
                self.state = self.store.read()
            log.info("initial load %s done", load_id)
        except ShutdownInterruptedError:
            self._cleaning = None
        except LoadLostError as exc:
            log.warning("initial load %s: clean-up left to the worker holding it now (%s)", load_id, exc)
        except Exception as exc:
            log.error("initial load %s: clean-up failed, trying again at the next pass: %s", load_id, exc)
            self._cleaning = None

    # -- what it looks like ------------------------------------------------------------------------------------

    def report(self) -> LoadReport | None:
        """The load as this worker sees it: the progress it holds, the rate it copies at (on the stream's clock);
        a worker that does not copy shows the row and no rate."""
        state = self.state
        if state is None:
            return None
        holding = self.store.holding
        live = dataclasses.replace(state, progress=dict(self._committed)) if holding and self._committed else state
        rate = None
        if holding and self._rate_start is not None and state.phase == "loading":
            started, items_then = self._rate_start
            elapsed = self._clients.stream_now() - started
            if elapsed > 0 and live.items > items_then:
                rate = (live.items - items_then) / elapsed
        return dataclasses.replace(report_of(live), items_per_second=rate, eta_seconds=eta_seconds(live, rate))

    # -- retention (the discovery thread) -----------------------------------------------------------------------

    def watch_retention(self, undelivered: Mapping[str, float]) -> None:
        """`undelivered`: shard -> creation time (stream clock) of its oldest change not yet delivered, for the
        shards this worker reads that are behind. Warns early; stops the pipeline before a change is lost."""
        if not self.active:
            return
        load = self._settings.initial_load
        retention = load.retention_seconds
        now = self._clients.stream_now()
        report = self.report()
        eta = None if report is None else report.eta_seconds
        if eta is not None and eta > retention - load.warn_margin_seconds and not self._warned_eta:
            self._warned_eta = True
            log.warning(
                "initial load %s: %s of %s item(s) copied; at %s it ends in %s, longer than the stream "
                "keeps changes (%s): if the stream's delivery falls that far behind, or the pipeline is down that "
                "long, changes are lost (more initial_load.segments or read_units_per_second, or "
                "source.initial_load = 'export')",
                report.load_id if report else "",
                f"{report.items:,}" if report else "?",
                f"{report.estimated_items:,}" if report and report.estimated_items else "?",
                _rate(report.items_per_second if report else None),
                _duration(eta),
                _duration(retention),
            )
        for shard_id, created in sorted(undelivered.items(), key=lambda pair: pair[1]):
            age = now - created
            left = retention - age
            if left < load.stop_margin_seconds:
                self._fail(
                    RetentionRiskError(
                        f"shard {shard_id}: its oldest undelivered change is up to {_duration(age)} old and may leave "
                        f"the stream in {_duration(max(0.0, left))} (retention {_duration(retention)}), while "
                        f"initial load {self.load_id} runs; stopped before it is lost: nothing is lost yet and the "
                        "checkpoint stays. Fix what holds delivery back (a sink's outage or throttling, see the "
                        "log), then start again at once"
                    )
                )
                return
            expected = eta if eta is not None else 0.0
            if left - expected < load.warn_margin_seconds and shard_id not in self._warned_shards:
                self._warned_shards.add(shard_id)
                log.warning(
                    "shard %s: its oldest undelivered change is up to %s old and may leave the stream in %s; initial "
                    "load %s is expected to run %s more. The pipeline stops %s before it would be lost",
                    shard_id,
                    _duration(age),
                    _duration(max(0.0, left)),
                    self.load_id,
                    _duration(expected) if eta is not None else "an unknown time",
                    _duration(load.stop_margin_seconds),
                )

    # -- stop --------------------------------------------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """Stop copying (the pipeline is stopping): segment threads end at their next page."""
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._loader is not None:
            self._loader.join(max(0.0, deadline - time.monotonic()))

    def release(self) -> None:
        """After the drain: a peer or the next start takes the load over at once."""
        try:
            self.store.release()
        except Exception as exc:
            log.warning("releasing the initial load failed (a peer takes it after lease.failover_seconds): %s", exc)


def _rate(per_second: float | None) -> str:
    if not per_second:
        return "no measured rate"
    if per_second < 1.0:
        return f"{per_second * 3600:,.0f} item(s)/h"
    return f"{per_second:,.0f} item(s)/s"


def _duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    seconds = max(0.0, seconds)
    hours, rest = divmod(int(seconds), 3600)
    minutes = rest // 60
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{int(rest % 60):02d}s"
    return f"{seconds:.0f}s"
