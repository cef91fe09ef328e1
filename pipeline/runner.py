"""Wires source -> readers -> queue -> batcher -> sinks -> checkpoint; starts, drains and stops them.

Threads: `reader.poll_workers` pollers, one delivery thread (batches, sinks, checkpoints: a single writer keeps
per-shard order without locks), one discovery thread. The count does not grow with the number of shards.

Two retry policies share the settings but not their patience: reading (GetRecords, DescribeStream) stops
retrying the moment a stop is requested, so a throttled stream cannot eat the shutdown budget; delivering (sink
writes, flushes, dead letters, checkpoints) goes on until the drain is done or the shutdown timeout has passed.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.aws import AwsClients
from pipeline.delivery.batcher import (
    BatchAssembler,
    BoundedQueue,
    ClosedBatch,
    LoadPosition,
    QueueClosedError,
    moved_on,
    page_records,
)
from pipeline.delivery.dead_letter import build_dead_letters
from pipeline.delivery.driver import Delivery, Ticket
from pipeline.delivery.feed import SinkFeed
from pipeline.delivery.filters import compile_filter
from pipeline.initial_load import InitialLoadRun
from pipeline.ops.metrics import MetricsServer, PipelineMetrics
from pipeline.ops.view import PipelineStats
from pipeline.records import Batch
from pipeline.retry import RetryPolicy, ShutdownInterruptedError
from pipeline.settings import Settings, resolve_locations
from pipeline.source.reader import ShardPage, ShardReader, StartPosition, TrimmedDataError
from pipeline.source.scheduler import PollScheduler, ShardProgress
from pipeline.source.snapshot import SnapshotPage
from pipeline.source.stream import (
    ShardInfo,
    ShardLineage,
    StreamNotFoundError,
    describe_shards,
    resolve_stream_arn,
    table_name_of,
)
from pipeline.source.table_loader import LOAD_QUEUE_SHARE
from pipeline.state.checkpoint import Checkpoint, CheckpointStore, StoredState, StreamStart
from pipeline.state.leases import LeaseCoordinator, default_worker_id, local_identity
from pipeline.state.load_progress import LoadStore
from sinks.base import Sink, SinkError
from sinks.registry import build_sink

log = logging.getLogger(__name__)

RETENTION_WATCH_POLL_SECONDS = 60.0
"""A shard whose last successful poll, this recent, found nothing new is caught up: nothing of it can age out."""
RETENTION_STUCK_SECONDS = 300.0
"""A shard behind whose checkpoint has not moved for this long (the stream's clock), since it was first watched in
this process, is stuck: only a stuck shard stops the pipeline, one catching up is left to catch up."""


class StreamChangedError(Exception):
    """The table's stream is not the one this consumer has been reading (it was disabled and enabled again)."""


class SinkOpenError(Exception):
    """A sink could not be opened at start-up; the message names the sink and what is wrong."""


def stream_changed_message(table: str, old: str, new: str) -> str:
    return (
        f"table {table!r}: its stream changed from {old} to {new} (the stream was disabled and enabled again); "
        "changes made while no stream was enabled are in neither stream. The old stream's unread records stay "
        f'readable for 24 hours after it was disabled: deliver them with source.stream_arn = "{old}" until '
        f'`streamsink status` shows every shard done, then go on with source.stream_arn = "{new}" '
        "(read as a first start: source.starting_position applies)"
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        sinks: Sequence[Sink] | None = None,
        clients: AwsClients | None = None,
    ) -> None:
        # Settings built in code rather than by load_settings get their inherited regions and endpoints here.
        self.settings = settings = resolve_locations(settings)
        source = settings.source
        self.worker_id = settings.lease.worker_id or default_worker_id()
        self.clients = clients or AwsClients(
            source.region,
            source.endpoint_url,
            max_pool_connections=settings.reader.poll_workers + 4,
            agent=f"worker/{self.worker_id}",
        )
        self.sinks: list[Sink] = (
            list(sinks)
            if sinks is not None
            else [build_sink(s, region=self.clients.region, endpoint_url=source.endpoint_url) for s in settings.sinks]
        )
        self._hard_stop = threading.Event()
        self._stopping = threading.Event()
        self.retry = RetryPolicy(settings.retry, sleep=self._sleep_unless_stopped_hard)
        self.source_retry = RetryPolicy(settings.retry, sleep=self._sleep_unless_stopping)
        self.stats = PipelineStats()
        self.lineage = ShardLineage()
        self.queue = BoundedQueue(settings.batch.queue_capacity, settings.batch.queue_max_bytes)
        self.dead_letters = build_dead_letters(settings.dead_letter, self.clients, self.retry)
        self.delivery = Delivery(
            self.sinks,
            retry=self.retry,
            dead_letters=self.dead_letters,
            on_failure=settings.dead_letter.on_failure,
            # Sinks passed in directly are not built from settings.sinks, so their entries' filters do not apply.
            feeds=None
            if sinks is not None
            else [
                SinkFeed.of(s, snapshots_by_default=sink.takes_snapshots)
                for s, sink in zip(settings.sinks, self.sinks, strict=True)
            ],
            concurrency=None if sinks is not None else [s.max_concurrency for s in settings.sinks],
            max_records_in_flight=settings.delivery.max_records_in_flight,
            max_bytes_in_flight=settings.delivery.max_bytes_in_flight,
        )
        self.record_filter = compile_filter(settings.filter)
        self.scheduler = PollScheduler(
            workers=settings.reader.poll_workers,
            deliver=self._enqueue,
            on_shard_error=self._on_shard_error,
            idle_min_seconds=settings.reader.idle_poll_min_seconds,
            idle_max_seconds=settings.reader.idle_poll_max_seconds,
        )
        self.stream_arn = ""
        self.fatal: BaseException | None = None
        self.started_at: float | None = None
        self.store: CheckpointStore | None = None
        self.stream_start: StreamStart | None = None
        self.discovery_failing_since: float | None = None
        self.discovery_error: str | None = None
        self.reading_nothing_since: float | None = None
        self.initial_load: InitialLoadRun | None = None
        """The copy of the table's existing items (`source.initial_load`), or None."""
        self.metrics = PipelineMetrics(self, stall_seconds=settings.metrics.stall_seconds)
        self.metrics_server: MetricsServer | None = None
        self._check_unknown_parents = True
        self._fixed_readers: dict[str, ShardReader] = {}
        """Readers whose LATEST iterator the first start fixed before it recorded its moment."""
        self._reading: set[str] = set()
        """Shards handed to the scheduler and not yet finished."""
        self._all_finished_logged = False
        self._draining = threading.Event()
        self._discover_now = threading.Event()
        self._delivery_thread: threading.Thread | None = None
        self._discovery_thread: threading.Thread | None = None
        self._assembler: BatchAssembler | None = None
        self.leases = LeaseCoordinator(
            self.worker_id,
            failover_seconds=settings.lease.failover_seconds,
            steal_after_seconds=settings.lease.pass_interval,
            identity=local_identity(),
        )
        self.lease_failing_since: float | None = None
        self._leased: dict[str, int] = {}
        """Shards whose lease this worker holds, and the epoch it holds them at."""
        self._shedding: dict[str, tuple[ShardProgress | None, float]] = {}
        """Shards being given up: what their dropped reader read (its last record, also of a poll still in flight
        when it was dropped), and since when (monotonic) they drain."""
        self._commit_soon = threading.Event()
        """Commit what is delivered at once (shards are being given up), not when the sinks' buffers are due."""
        self._beat = 0
        self._lease_thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self.heartbeat_failing_since: float | None = None
        self._lease_wake = threading.Event()
        self._pass_now = threading.Event()
        self._coordination_read_at = 0.0
        """When (monotonic) the last read of every worker's heartbeat was sent."""
        self._retention_moved: dict[str, tuple[str | None, float]] = {}
        """Shard -> its checkpoint at the last retention watch, and since when (stream clock) it has been there."""
        self._schedule_lock = threading.RLock()
        """Held while readers are scheduled or dropped, and while `_leased` / `_shedding` are checked and changed
        (the lease, heartbeat, delivery and discovery threads all touch them)."""

    # -- start -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = time.time()
        source = self.settings.source
        if self.settings.metrics.port is not None:
            self.metrics_server = MetricsServer(
                self.metrics, self.settings.metrics.host, self.settings.metrics.port
            ).start()
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics.host, self.metrics_server.port)
        if source.stream_arn:
            self.stream_arn = source.stream_arn
        else:
            assert source.table_name is not None
            self.stream_arn = resolve_stream_arn(self.clients.client("dynamodb"), source.table_name, self.source_retry)
        self._assembler = BatchAssembler(
            self.settings.batch, table_name_of(self.stream_arn), stream_arn=self.stream_arn
        )
        self._open_destinations()
        store = self.store = CheckpointStore(
            self.clients.client("dynamodb"),
            table_name=self.settings.checkpoint.table_name,
            stream_arn=self.stream_arn,
            consumer_name=self.settings.checkpoint.consumer_name,
            retry=self.retry,
            worker=self.worker_id,
        )
        store.ensure_table(self.settings.checkpoint.create_table)
        self._check_stream_in_use(store)
        state = store.load_state()
        shards = self._describe()
        self.lineage.update(shards)
        self.stream_start = self._fix_start(store, state, shards)
        self._reconcile(shards)
        rows = store.known()
        self.lineage.mark_finished(shard_id for shard_id, row in rows.items() if row.finished)
        self.stats.committed.update({s: row.sequence_number for s, row in rows.items() if row.sequence_number})
        self._heartbeat()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()  # before the first pass, which may take a thousand leases
        store.announce()  # peers above their share give some up now, not at their next pass
        self._lease_pass()
        self._begin_initial_load(store)
        log.info(
            "stream %s: %d shard(s), %d checkpoint(s), started %s, worker %s holds %d lease(s) of %d live "
            "worker(s), sinks: %s",
            self.stream_arn,
            len(shards),
            sum(1 for row in rows.values() if row.sequence_number),
            _describe_start(self.stream_start),
            self.worker_id,
            len(self._leased),
            len(self.leases.live_workers()),
            ", ".join(s.name for s in self.sinks),
        )

        self.scheduler.start()
        self._delivery_thread = threading.Thread(target=self._deliver_loop, name="delivery", daemon=True)
        self._delivery_thread.start()
        self._discovery_thread = threading.Thread(target=self._discovery_loop, name="discovery", daemon=True)
        self._discovery_thread.start()
        self._lease_thread = threading.Thread(target=self._lease_loop, name="leases", daemon=True)
        self._lease_thread.start()

    def _begin_initial_load(self, store: CheckpointStore) -> None:
        """After the stream is registered (every shard's position fixed) and before anything is delivered."""
        if self.settings.source.initial_load == "none":
            return
        assert self._assembler is not None and self.stream_start is not None
        since = None if self.stream_start.since is None else float(self.stream_start.since)
        self.initial_load = InitialLoadRun(
            self.settings,
            clients=self.clients,
            sinks=self.sinks,
            store=LoadStore(
                self.clients.client("dynamodb"),
                table_name=store.table_name,
                partition=store.partition,
                retry=self.retry,
                worker=self.worker_id,
            ),
            retry=self.retry,
            source_retry=self.source_retry,
            leases=self.leases,
            table_name=table_name_of(self.stream_arn),
            table_arn=self.stream_arn.split("/stream/", 1)[0],
            since=since,
            put=self._enqueue_snapshot,
            fail=self._fail,
            stopping=self._stopping,
            sleep=self._sleep_unless_stopping,
            request_pass=self._request_pass,
            coordination_read_at=lambda: self._coordination_read_at,
        )
        self.initial_load.begin()
        assert self.initial_load.load_id is not None
        self._assembler.expect_load(self.initial_load.load_id, self.initial_load.key_names, self.clients.region)

    def _check_stream_in_use(self, store: CheckpointStore) -> None:
        """Reading by table name, the stream must be the one this consumer read before; an explicit stream ARN
        becomes the one in use (that is how an operator moves on to a new stream)."""
        table_arn = self.stream_arn.split("/stream/", 1)[0]
        in_use = store.stream_in_use(table_arn)
        if self.settings.source.table_name is not None and in_use is not None and in_use != self.stream_arn:
            raise StreamChangedError(stream_changed_message(self.settings.source.table_name, in_use, self.stream_arn))
        if in_use != self.stream_arn:
            store.use_stream(table_arn, self.stream_arn)

    def _open_destinations(self) -> None:
        """Open every sink and check the dead-letter destination: outages are retried, refusals name what."""
        for sink in self.sinks:
            try:
                self.retry.call(f"opening sink {sink.name}", sink.open)
            except SinkError as error:
                raise SinkOpenError(f"sink {sink.name}: {error}") from error
        self.dead_letters.open()

    def _fix_start(self, store: CheckpointStore, state: StoredState, shards: list[ShardInfo]) -> StreamStart:
        """What "where shards without a checkpoint begin" means for this consumer, fixed at its first start and
        recorded before anything is read, so that every later start, expired iterator and new shard honours it."""
        source = self.settings.source
        now = datetime.now(UTC).isoformat()
        if state.start is not None:
            configured = source.starting_position
            if state.start.starting_position != configured or (
                configured == "AT_TIMESTAMP" and state.start.since != _since(self.settings)
            ):
                log.warning(
                    "source.starting_position applies at the first start only: this consumer started %s (recorded "
                    "in checkpoint table %s); use a new checkpoint.consumer_name to start over",
                    _describe_start(state.start),
                    store.table_name,
                )
            return state.start
        if any(row.sequence_number for row in state.checkpoints.values()):
            # Checkpoints from a version that kept no first-start record: shards without one read everything.
            log.info("no record of this consumer's first start; shards without a checkpoint are read from the oldest")
            store.register((s.shard_id, s.parent_shard_id) for s in shards)
            self._check_unknown_parents = False
            return store.record_start(StreamStart("TRIM_HORIZON", None, now))
        position = source.starting_position
        # A first start tried before (killed, or failed) may have left rows: they describe a stream that was never
        # read, so they are written afresh, and those of shards gone since are dropped.
        store.prune(set(state.checkpoints) - {s.shard_id for s in shards})
        skipped = {s.shard_id for s in shards if s.closed} if position == "LATEST" else set()
        # LATEST means: nothing from before now. Closed shards hold only the past.
        store.register(((s.shard_id, s.parent_shard_id) for s in shards), finished=skipped, overwrite=True)
        self.lineage.mark_finished(skipped)
        self._check_unknown_parents = False  # parents that aged out before the first start are none of ours
        since = _since(self.settings)
        if position == "LATEST":
            since = self._fix_latest_iterators([s for s in shards if not s.closed])
        ours = StreamStart(position, since, now)
        fixed = store.record_start(ours)
        if fixed != ours:  # another process made the first start: its moment holds, not our iterators
            self._fixed_readers = {}
        for reader in self._fixed_readers.values():
            assert fixed.since is not None
            reader.count_from(float(fixed.since))
        return fixed

    def _fix_latest_iterators(self, shards: list[ShardInfo]) -> int:
        """Take a LATEST iterator for every open shard, then name the moment: the service's clock (its HTTP Date)
        after the last of them. Every change made from that second on comes after every iterator, so the first
        run, which reads from them, leaves none out; a later start reads from the oldest record and leaves out
        what was made before that second, so every run agrees on what "after the first start" means."""
        streams = self.clients.client("dynamodbstreams")
        service_times: list[float] = []
        for shard in shards:
            reader = self._reader(shard, streams, StartPosition("LATEST"), None)
            reader.fix_position()
            self._fixed_readers[shard.shard_id] = reader
            if reader.service_time is not None:
                service_times.append(reader.service_time)
        if service_times and len(service_times) == len(shards):
            return math.floor(max(service_times)) + 1  # the Date header is the whole second it answered in
        return math.ceil(time.time())  # no Date from the service: the host's clock, after every iterator

    def _start_position(self, shard: ShardInfo) -> tuple[StartPosition, float | None]:
        """Where a shard is read from, and from which creation time its records count."""
        assert self.store is not None and self.stream_start is not None
        row = self.store.checkpoint(shard.shard_id)
        if row is not None and row.sequence_number is not None:
            return StartPosition.after(row.sequence_number), None
        since = None if self.stream_start.since is None else float(self.stream_start.since)
        return StartPosition("TRIM_HORIZON"), since

    def _reader(self, shard: ShardInfo, streams: Any, start: StartPosition, not_before: float | None) -> ShardReader:
        return ShardReader(
            shard,
            stream_arn=self.stream_arn,
            streams=streams,
            retry=self.source_retry,
            start=start,
            limit=self.settings.reader.get_records_limit,
            on_trimmed_data=self.settings.source.on_trimmed_data,
            not_before=not_before,
        )

    def _schedule_readable(self) -> None:
        """Read every shard this worker leases that lineage lets be read and that is not being read yet."""
        streams = self.clients.client("dynamodbstreams")
        with self._schedule_lock:
            for shard in self.lineage.readable(exclude=self._reading | self._unlisted_unfinished()):
                if shard.shard_id not in self._leased or shard.shard_id in self._shedding:
                    continue
                reader = self._fixed_readers.pop(shard.shard_id, None)
                if reader is None:
                    start, not_before = self._start_position(shard)
                    reader = self._reader(shard, streams, start, not_before)
                self._reading.add(shard.shard_id)
                log.info("reading shard %s from %s", shard.shard_id, _describe_reader(reader))
                self.scheduler.add(reader)

    def _unlisted_unfinished(self) -> set[str]:
        """Rows of shards the stream no longer lists that are not finished: a peer may still be reading one
        (it aged out of the listing while an outage held its reader), so its children wait."""
        assert self.store is not None
        listed = {s.shard_id for s in self.lineage.shards()}
        return {s for s, row in self.store.known().items() if not row.finished and s not in listed}

    # -- leases ------------------------------------------------------------------------------------------

    def _heartbeat(self) -> bool:
        """Show this worker is alive and read the others' heartbeats; True if a pass should follow now (a worker
        joined, left or expired, or leases were released)."""
        assert self.store is not None
        if self._stopping.is_set() and self._beat:
            return False  # the stop deletes the heartbeat row: none may be written after it
        self._beat += 1
        self.store.heartbeat(
            self._beat,
            len(self._leased),
            self.leases.identity,
            shedding=len(self._shedding),
            load_ended=None if self.initial_load is None else self.initial_load.ended,
        )
        read_at = time.monotonic()
        workers, changes = self.store.coordination()
        self._coordination_read_at = read_at
        changed = self.leases.observe(workers, at=read_at)
        announced = self.leases.last_changes is not None and changes != self.leases.last_changes
        self.leases.last_changes = changes
        self.stats.live_workers = len(self.leases.live_workers(read_at))
        self.stats.leases_held = len(self._leased)
        return changed or announced

    def _lease_pass(self) -> None:
        """Read every row, notice leases lost, then take, steal and give up towards an even share."""
        assert self.store is not None
        read_at = time.monotonic()
        state = self.store.load_state()
        self.lineage.mark_finished(s for s, row in state.checkpoints.items() if row.finished)
        self._notice_lost(state.checkpoints)
        # Rows naming this worker that it does not know it holds: an earlier life under the same worker id, or a
        # take whose answer was lost. Taken again (epoch moved on), so that earlier life is fenced off too.
        adopt = [
            row
            for s, row in state.checkpoints.items()
            if row.owner == self.worker_id and not row.finished and s not in self._leased
        ]
        readable = [s.shard_id for s in self.lineage.readable(exclude=self._unlisted_unfinished())]
        plan = self.leases.plan(state, readable, at=read_at)
        self.stats.live_workers = plan.live_workers
        self._take([*adopt, *plan.take], "taken")
        if plan.steal is not None:
            self._take([plan.steal], "stolen")
        shed = [s for s in plan.shed if s not in self._shedding]
        if shed:
            self._shed(shed, plan.share)
        self.stats.leases_held = len(self._leased)
        self._schedule_readable()

    def _take(self, rows: list[Checkpoint], how: str) -> None:
        assert self.store is not None
        for row, taken in zip(rows, self.store.take_all(rows), strict=True):
            if taken is None:
                continue  # another worker was quicker
            with self._schedule_lock:
                self._leased[row.shard_id] = taken.lease_epoch
            self.stats.lease_events[how] += 1
            if row.owner is not None:
                log.info("lease of shard %s %s from worker %s", row.shard_id, how, row.owner)

    def _notice_lost(self, rows: dict[str, Checkpoint]) -> None:
        lost = [
            (s, epoch)
            for s, epoch in list(self._leased.items())
            if s not in rows or rows[s].owner != self.worker_id or rows[s].lease_epoch != epoch
        ]
        for shard_id, epoch in lost:
            row = rows.get(shard_id)
            why = f"now held by {row.owner or 'nobody'}" if row is not None else "its row is gone"
            self._lose(shard_id, why, epoch)

    def _lose(self, shard_id: str, why: str, epoch: int | None) -> None:
        """Stop reading a shard whose lease went to another worker: its checkpoint is that worker's now. Only
        the lease held at `epoch` is lost: a refusal noticed late must not drop a lease taken again since."""
        with self._schedule_lock:
            if epoch is None or self._leased.get(shard_id) != epoch:
                return
            del self._leased[shard_id]
            self._shedding.pop(shard_id, None)
            self._stop_reading(shard_id)
        self.stats.lease_events["lost"] += 1
        log.warning(
            "lease of shard %s lost (%s): stopped reading it; what this worker read past its checkpoint is "
            "read again by the new owner",
            shard_id,
            why,
        )

    def _stop_reading(self, shard_id: str) -> ShardProgress | None:
        """Drop a shard's reader (a poll in flight still hands its page on, and notes it in the progress returned);
        under the schedule lock, so no reader of the shard can be scheduled meanwhile."""
        with self._schedule_lock:
            progress = self.scheduler.progress.get(shard_id)
            self.scheduler.remove(shard_id)
            self._reading.discard(shard_id)
            self._fixed_readers.pop(shard_id, None)
            return progress

    def _shed(self, shard_ids: list[str], share: int) -> None:
        """Give up leases above this worker's share: stop reading, let what was read be delivered and
        checkpointed (a commit is made soon, without waiting for a buffering sink's own time), then release
        (`_release_drained`). The lease is kept meanwhile, so no peer reads the shard twice."""
        log.info(
            "holding %d lease(s), above the share of %d: giving up %s once delivered",
            len(self._leased),
            share,
            ", ".join(shard_ids),
        )
        now = time.monotonic()
        with self._schedule_lock:  # marked as being given up before its reader is dropped: none is scheduled again
            for shard_id in shard_ids:
                self._shedding[shard_id] = (self._stop_reading(shard_id), now)
        self._commit_soon.set()

    def _drained(self, shard_id: str, progress: ShardProgress | None) -> bool:
        """No poll of the shard is in flight, and the checkpoint covers the last record its dropped reader read
        (pages whose records were all left out, made before the first start, read none and move nothing)."""
        if self.scheduler.polling(shard_id):
            return False
        last = None if progress is None else progress.last_sequence_read
        committed = self.stats.committed.get(shard_id)
        return last is None or (committed is not None and int(committed) >= int(last))

    def _release_drained(self) -> None:
        """Release given-up shards once drained; a shard that cannot be drained (a sink down) stays held."""
        assert self.store is not None
        if not self._shedding:
            return
        with self._schedule_lock:
            ready = [s for s, (progress, _since) in list(self._shedding.items()) if self._drained(s, progress)]
        if not ready:
            return
        self.store.release(ready)
        with self._schedule_lock:
            for shard_id in ready:
                self._shedding.pop(shard_id, None)
                self._stop_reading(shard_id)  # none may be left, whatever scheduled it
                if self._leased.pop(shard_id, None) is not None:
                    self.stats.lease_events["released"] += 1
        self.store.announce()

    def _heartbeat_loop(self) -> None:
        """A heartbeat every `lease.heartbeat_seconds`, on a thread of its own: a long pass (a thousand takes, a
        throttled table) must never make this worker look gone to its peers."""
        while not self._stopping.wait(self.settings.lease.heartbeat):
            try:
                if self._heartbeat() or (self.initial_load is not None and self.initial_load.waiting_to_clean):
                    self._request_pass()
                self.heartbeat_failing_since = None
            except ShutdownInterruptedError:
                return
            except Exception as exc:
                if self.heartbeat_failing_since is None:
                    self.heartbeat_failing_since = time.time()
                log.error("heartbeat failed, trying again in %.1fs: %s", self.settings.lease.heartbeat, exc)

    def _lease_loop(self) -> None:
        """A pass every `lease.pass_interval_seconds`, or at once when a heartbeat read shows a change, a shard
        finished or discovery found one nobody holds; releases of given-up shards as they drain."""
        lease = self.settings.lease
        next_pass = time.monotonic() + lease.pass_interval
        while not self._stopping.is_set():
            wait = next_pass - time.monotonic()
            if self._shedding:
                wait = min(wait, 0.2)
            self._lease_wake.wait(max(0.0, wait))
            self._lease_wake.clear()
            if self._stopping.is_set():
                return
            try:
                if self._pass_now.is_set() or time.monotonic() >= next_pass:
                    self._pass_now.clear()
                    next_pass = time.monotonic() + lease.pass_interval
                    self._lease_pass()
                    if self.initial_load is not None:
                        self.initial_load.load_pass()
                self._release_drained()
                self.lease_failing_since = None
            except ShutdownInterruptedError:
                return
            except Exception as exc:
                if self.lease_failing_since is None:
                    self.lease_failing_since = time.time()
                log.error("lease pass failed, trying again at the next one: %s", exc)

    def _request_pass(self) -> None:
        self._pass_now.set()
        self._lease_wake.set()

    def _release_all(self) -> None:
        """At a stop with everything delivered: give every lease up so peers take them at once."""
        assert self.store is not None
        try:
            with self._schedule_lock:
                held = [s for s in list(self._leased) if not self.lineage.is_finished(s)]
            if held:
                self.store.release(held)
                self.stats.lease_events["released"] += len(held)
                self.store.announce()
            self.store.leave()
            if self._heartbeat_thread is not None and self._heartbeat_thread.is_alive():
                # A heartbeat still under way (a slow answer) would land after the delete: a worker row peers
                # count as live for the failover time. Wait for it (the client's read timeout bounds it), delete again.
                self._heartbeat_thread.join(35.0)
                self.store.leave()
        except Exception as exc:
            log.warning("releasing leases at the stop failed (peers take them after lease.failover_seconds): %s", exc)
            return
        self._leased.clear()

    # -- what the stream lists, against what the checkpoints say ---------------------------------------------

    def _reconcile(self, shards: list[ShardInfo]) -> None:
        """Shards the stream lists against the rows of the checkpoint table: say loudly what was lost, give new
        shards their rows, and forget rows nothing needs any more."""
        assert self.store is not None
        lost = self._lost(shards)
        if lost:
            # Losing a shard is loud and stops by default: one listing that left a shard out must not cause it.
            again = {s.shard_id for s in self._describe()}
            lost = [(shard_id, what) for shard_id, what in lost if shard_id not in again]
        for shard_id, what in lost:
            self._aged_out(shard_id, what)
        self.store.register((s.shard_id, s.parent_shard_id) for s in shards)
        self._check_unknown_parents = True
        self._forget_finished(shards)

    def _lost(self, shards: list[ShardInfo]) -> list[tuple[str, str]]:
        """Shards whose records were needed and that the stream no longer lists: unfinished rows, and (after the
        first start) parents of shards never seen that no row knows either."""
        assert self.store is not None
        listed = {s.shard_id for s in shards}
        rows = self.store.known()
        lost: list[tuple[str, str]] = []
        for row in rows.values():
            if row.owner not in (None, self.worker_id) and self.leases.is_live(row.owner or ""):
                continue  # a peer reads it, or will say it is lost
            if row.shard_id in self._shedding:
                continue  # its pages are still being delivered here
            if not row.finished and row.shard_id not in listed and row.shard_id not in self._reading:
                where = f"after sequence number {row.sequence_number}" if row.sequence_number else "from its start"
                lost.append((row.shard_id, f"its records {where} were never delivered"))
        if self._check_unknown_parents:
            for shard in shards:
                parent = shard.parent_shard_id
                if shard.shard_id not in rows and parent and parent not in listed and parent not in rows:
                    lost.append((parent, f"the parent of {shard.shard_id}, it came and went unread"))
        return lost

    def _describe(self) -> list[ShardInfo]:
        return describe_shards(self.clients.client("dynamodbstreams"), self.stream_arn, self.source_retry)

    def _aged_out(self, shard_id: str, what: str) -> None:
        """A shard whose records were needed has left the stream (closed more than 24 hours ago)."""
        assert self.store is not None
        message = (
            f"shard {shard_id} aged out of the stream (closed more than 24 hours ago) before it was read to its "
            f"end: {what}, and they are gone"
        )
        if self.settings.source.on_trimmed_data == "fail":
            raise TrimmedDataError(
                f"{message} (source.on_trimmed_data = 'skip_to_trim_horizon' goes on with its children)"
            )
        row = self.store.checkpoint(shard_id)
        if row is not None and not self.store.finish_unread(row):
            return  # the row changed meanwhile (a peer took or finished it): the next look decides again
        log.error("%s; going on with its children (source.on_trimmed_data = 'skip_to_trim_horizon')", message)
        self.stats.aged_out_skips += 1
        self.lineage.mark_finished([shard_id])

    def _forget_finished(self, shards: list[ShardInfo]) -> None:
        """Rows and in-memory state of shards long finished: gone from the stream, with no unfinished child."""
        assert self.store is not None
        listed = {s.shard_id for s in shards}
        rows = self.store.known()
        needed = {row.parent_shard_id for row in rows.values() if not row.finished and row.parent_shard_id}
        needed |= {s.parent_shard_id for s in shards if s.parent_shard_id and not self.lineage.is_finished(s.shard_id)}
        done = [s for s, row in rows.items() if row.finished and s not in listed and s not in needed]
        if done:
            self.store.prune(done)
            log.info("forgot %d finished shard(s) that aged out of the stream", len(done))
        for shard_id in [s for s in list(self.stats.committed) if s not in listed and s not in self._reading]:
            self.stats.committed.pop(shard_id, None)

    # -- readers -----------------------------------------------------------------------------------------

    def _enqueue(self, page: ShardPage) -> None:
        self.queue.put(page)

    def _enqueue_snapshot(self, page: SnapshotPage) -> None:
        self.queue.put(page, share=LOAD_QUEUE_SHARE)  # the stream's pages always find room

    def _on_shard_error(self, reader: ShardReader, error: BaseException) -> float | None:
        if isinstance(error, QueueClosedError | ShutdownInterruptedError):
            self._reading.discard(reader.shard_id)
            return None
        if isinstance(error, TrimmedDataError):
            self._fail(error)
            return None
        log.error("shard %s: polling failed, trying again later: %s", reader.shard_id, error)
        return self.settings.reader.idle_poll_max_seconds

    def _discovery_loop(self) -> None:
        interval = self.settings.reader.discovery_interval_seconds
        streams = self.clients.client("dynamodbstreams")
        while not self._stopping.is_set():
            self._discover_now.wait(interval)
            self._discover_now.clear()
            if self._stopping.is_set():
                return
            try:
                self._check_stream_unchanged()
                shards = describe_shards(streams, self.stream_arn, self.source_retry)
            except ShutdownInterruptedError:
                return
            except StreamChangedError as error:
                self._fail(error)
                return
            except Exception as exc:
                if self.discovery_failing_since is None:
                    self.discovery_failing_since = time.time()
                self.discovery_error = f"{type(exc).__name__}: {exc}"
                log.error("shard discovery failed, trying again in %.0fs: %s", interval, exc)
                self._note_what_is_read()
                continue
            self.discovery_failing_since = self.discovery_error = None
            self.lineage.update(shards)
            try:
                self._reconcile(shards)
                self._schedule_readable()
                if self._unowned_readable():
                    self._request_pass()
            except TrimmedDataError as error:
                self._fail(error)
                return
            except ShutdownInterruptedError:
                return
            except Exception as exc:
                log.error("updating shard state failed, trying again in %.0fs: %s", interval, exc)
            self._note_what_is_read()
            self._watch_retention()

    def _watch_retention(self) -> None:
        """While a load runs: for every shard this worker holds that is behind, the creation time of its oldest
        change not yet delivered (or a time before it), for the load's retention watch."""
        if self.initial_load is None or not self.initial_load.active or self.store is None:
            return
        start = self.stream_start
        since = None if start is None or start.since is None else float(start.since)
        now = time.time()
        stream_now = self.clients.stream_now()
        undelivered: dict[str, float] = {}
        with self._schedule_lock:
            leased = [s for s in self._leased if not self.lineage.is_finished(s)]
        for shard_id in leased:
            row = self.store.checkpoint(shard_id)
            position = None if row is None else row.sequence_number
            seen = self._retention_moved.get(shard_id)
            if seen is None or seen[0] != position:
                self._retention_moved[shard_id] = (position, stream_now)
                continue  # first watched, or moved on since the last watch: not stuck
            if stream_now - seen[1] < RETENTION_STUCK_SECONDS:
                continue
            progress = self.scheduler.progress.get(shard_id)
            caught_up = (
                progress is not None
                and progress.unacked_since is None
                and progress.held_since is None
                and progress.last_poll_ok_at is not None
                and now - progress.last_poll_ok_at < RETENTION_WATCH_POLL_SECONDS
                and (progress.last_records_at or 0.0) < progress.last_poll_ok_at
            )
            if caught_up:
                continue
            created = None if progress is None else progress.oldest_unacked_created
            if created is None and row is not None and row.last_record_at is not None:
                created = datetime.fromisoformat(row.last_record_at).timestamp()
            if created is None:
                created = since  # nothing delivered from it yet: its changes are no older than the first start
            if created is not None:
                undelivered[shard_id] = created
        self.initial_load.watch_retention(undelivered)

    def _unowned_readable(self) -> bool:
        assert self.store is not None
        rows = self.store.known()
        return any(
            shard.shard_id in rows and rows[shard.shard_id].owner is None
            for shard in self.lineage.readable(exclude=self._reading | self._unlisted_unfinished())
        )

    def _check_stream_unchanged(self) -> None:
        table = self.settings.source.table_name
        if table is None:
            return
        try:
            latest = resolve_stream_arn(self.clients.client("dynamodb"), table, self.source_retry)
        except StreamNotFoundError:
            log.warning(
                "table %s has no stream enabled now (or no longer exists); reading what stream %s still holds",
                table,
                self.stream_arn,
            )
            return
        if latest != self.stream_arn:
            raise StreamChangedError(stream_changed_message(table, self.stream_arn, latest))

    def _note_what_is_read(self) -> None:
        """No shard being read while some are unfinished is a stall (health says so after stall_seconds)."""
        unfinished = self.lineage.unfinished()
        rows = self.store.known() if self.store is not None else {}
        ours = [  # shards a live peer holds are its to read: a worker with fewer shards than peers idles
            s
            for s in unfinished
            if s.shard_id not in rows
            or rows[s.shard_id].owner in (None, self.worker_id)
            or not self.leases.is_live(rows[s.shard_id].owner or "")
        ]
        if self.scheduler.active_shard_ids() or not ours:
            self.reading_nothing_since = None
        elif self.reading_nothing_since is None:
            self.reading_nothing_since = time.time()
        if not unfinished and not self._all_finished_logged:
            self._all_finished_logged = True
            log.warning(
                "every shard of stream %s is finished: the stream was disabled or its table deleted; "
                "nothing more will arrive on it",
                self.stream_arn,
            )

    # -- delivery ----------------------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        """Pages -> batches -> every sink at once, several batches in flight; checkpoints follow the prefix of
        batches every sink has taken, committed as it becomes durable (a process that never lives through a
        whole page, an OOM loop or a strict liveness probe, still moves forward batch by batch)."""
        assert self._assembler is not None
        progress = _Uncommitted()
        try:
            while not self._hard_stop.is_set():  # past the shutdown timeout: leave the rest to the next run
                wait = min(self._assembler.seconds_until_due(), 0.2)
                page = self.queue.get(wait)
                closed: list[ClosedBatch] = []
                if page is not None:
                    self.stats.records_read += page_records(page)
                    closed.extend(self._assembler.add(page))
                drained = page is None and self._draining.is_set()
                if self._assembler.due() or drained:
                    last = self._assembler.close()
                    if last is not None:
                        closed.append(last)
                for item in closed:
                    admitted = self.record_filter.select(item.batch)
                    self.stats.filtered += len(item.batch) - len(admitted)
                    load = self.initial_load
                    if load is not None:
                        load.batches_submitted += 1  # before the batch can write: the end mark must count it
                    while (
                        self.delivery.submit(self._still_ours(admitted), item, timeout=0.2, read=item.batch) is None
                    ):  # the window is full
                        if self._hard_stop.is_set():
                            return
                        self._take_done(progress, drained)
                self._take_done(progress, drained)
                if drained and self.queue.depth[0] == 0 and self.delivery.in_flight == 0:
                    if progress.any:
                        self._commit(progress)
                    return
        except Exception as exc:
            self._fail(exc)
            self.delivery.stop()
            self.queue.close()  # nobody drains it any more: release readers waiting to put

    def _still_ours(self, batch: Batch) -> Batch:
        """The batch without its copies once this worker lost the load (checked at every try to submit: the
        window may be full while the load moves on). The worker holding it now copies those items again."""
        load = self.initial_load
        if load is None or load.copying or all(r.load_id is None for r in batch.records):
            return batch
        kept = tuple(r for r in batch.records if r.load_id is None)
        return Batch(kept, sum(r.size_bytes for r in kept))

    def _take_done(self, progress: _Uncommitted, drained: bool) -> None:
        """Fold in the batches every sink has taken, in order, and commit when it is due."""
        for ticket in self.delivery.done():
            item: ClosedBatch = ticket.context
            self.metrics.observe_batch(ticket.batch, ticket.seconds)
            self.stats.events.update(r.event_name for r in item.batch.records)
            progress.add(item, ticket)
            if self.initial_load is not None:
                self.initial_load.batches_done += 1
            self.stats.buffered += len(ticket.batch)
            if self._commit_due(progress, drained):
                self._commit(progress)
        if self._commit_due(progress, drained):
            self._commit(progress)

    def _commit_due(self, progress: _Uncommitted, drained: bool) -> bool:
        return progress.any and (
            drained
            or bool(progress.finished)
            or (bool(progress.load_pages) and self.initial_load is not None and self.initial_load.read_everything)
            or self._commit_soon.is_set()
            or self.delivery.flush_due(time.monotonic())
        )

    def _commit(self, progress: _Uncommitted) -> None:
        """Everything delivered so far becomes durable in every sink, then the checkpoint records it."""
        assert self.store is not None
        self.delivery.flush()
        if not self._shedding:
            self._commit_soon.clear()  # while shards drain, every commit is made at once
        refused = self.store.save(progress.positions, progress.finished, progress.record_times)
        if self.initial_load is not None and self.initial_load.commit(progress.load_pages):
            self._request_pass()  # the load finished: its clean-up is the lease thread's
        for shard_id, epoch in refused.items():
            self._lose(shard_id, "the checkpoint write was refused: another worker holds it", epoch)
        positions = {s: p for s, p in progress.positions.items() if s not in refused}
        finished = progress.finished - set(refused)
        self.stats.checkpoints_written += 1
        self.stats.committed.update(positions)
        self.stats.checkpointed += progress.records
        self.stats.buffered -= progress.delivered
        self.stats.delivered_by_sink.update(progress.by_sink)
        now = time.time()
        for shard_id, sequence in positions.items():
            progress_of = self.scheduler.progress.get(shard_id)
            if progress_of is None:
                continue
            read = progress_of.last_sequence_read
            # Everything read is checkpointed, or progress was made and what is left was read after this moment.
            progress_of.unacked_since = None if read is None or int(sequence) >= int(read) else now
            created = progress.record_times.get(shard_id)
            # What is left was made after the last record delivered: a bound of its age for the retention watch.
            progress_of.oldest_unacked_created = (
                None if progress_of.unacked_since is None or created is None else created.timestamp()
            )
        if finished:
            with self._schedule_lock:
                for shard_id in finished:
                    self._leased.pop(shard_id, None)  # a finished shard is nobody's to read: its lease means nothing
            self.stats.shards_finished += len(finished)
            self.lineage.mark_finished(finished)
            with self._schedule_lock:
                self._reading -= finished
            self._discover_now.set()  # children of a finished shard may be read now
            self._request_pass()
        if self._shedding:
            self._lease_wake.set()
        progress.clear()

    # -- stop --------------------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self.fatal is None and not isinstance(error, ShutdownInterruptedError):
            self.fatal = error
            log.error("pipeline stopping: %s", error)
        self._stopping.set()
        self._discover_now.set()

    def _sleep_unless_stopped_hard(self, seconds: float) -> None:
        if self._hard_stop.wait(seconds):
            raise ShutdownInterruptedError("stopped while waiting to retry")

    def _sleep_unless_stopping(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise ShutdownInterruptedError("stopping: no more reading")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a fatal error or `request_stop`; True if stopping was requested or failed."""
        return self._stopping.wait(timeout)

    def request_stop(self) -> None:
        self._stopping.set()
        self._discover_now.set()
        self._lease_wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Drain: finish polls in flight, deliver everything queued, flush sinks, checkpoint, close.

        Returns True when everything read was delivered and checkpointed within `timeout`."""
        timeout = self.settings.runtime.shutdown_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.request_stop()
        self.scheduler.stop(timeout=max(0.0, deadline - time.monotonic()))
        if self.initial_load is not None:
            self.initial_load.stop(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        self._draining.set()
        clean = True
        if self._delivery_thread is not None:
            self._delivery_thread.join(max(0.0, deadline - time.monotonic()))
            if self._delivery_thread.is_alive():
                log.error("shutdown timed out after %.1fs; undelivered records will be read again", timeout)
                clean = False
                self._hard_stop.set()
                self.queue.close()
                self._delivery_thread.join(5.0)
        if self._discovery_thread is not None:
            self._discovery_thread.join(5.0)
        if self._lease_thread is not None:
            self._lease_thread.join(5.0)
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(5.0)
        delivering = self._delivery_thread is not None and self._delivery_thread.is_alive()
        self.delivery.stop()
        delivering = delivering or self.delivery.busy
        if self.store is not None and not delivering:
            if self.initial_load is not None:
                self.initial_load.release()
            self._release_all()  # nothing of ours is written any more: peers may take over at once
        for sink in self.sinks if not delivering else ():  # never closed while a lane may still write to it
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing sink %s: %s", sink.name, exc)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("%s", self.stop_summary())
        return clean and self.fatal is None

    def stop_summary(self) -> str:
        """One line for the operator after a stop: what is delivered for good, and what the next start reads again."""
        stats = self.stats
        dead = dict(self.delivery.stats.dead_lettered)
        sinks = ", ".join(
            f"{sink.name} {stats.delivered_by_sink.get(sink.name, 0):,}"
            + (f" (+{dead[sink.name]:,} dead-lettered)" if dead.get(sink.name) else "")
            for sink in self.sinks
        )
        # Records read but not covered by a checkpoint, and pages still queued when the drain was cut short.
        again = stats.records_read - stats.checkpointed + self.queue.depth[0]
        read = f"stopped: {stats.records_read:,} change(s) read in this run"
        commits = f"{stats.checkpoints_written:,} commit(s) to table {self.settings.checkpoint.table_name}"
        if again <= 0:
            return f"{read}, all checkpointed ({commits}); delivered: {sinks}; the next start goes on from there"
        return (
            f"{read}, {stats.checkpointed:,} checkpointed ({commits}); delivered: {sinks}; {again:,} record(s) "
            "read past the checkpoints will be read again at the next start"
        )


@dataclass
class _Uncommitted:
    """What the batches every sink has taken moved the checkpoint to, since the last commit."""

    positions: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    record_times: dict[str, datetime] = field(default_factory=dict)
    load_pages: dict[int, LoadPosition] = field(default_factory=dict)
    """Initial-load segment -> where its pages done since the last commit move it."""
    records: int = 0
    """Records read in these batches, the pipeline filter's leftovers included."""
    delivered: int = 0
    """Records of these batches handed to the sinks (the pipeline filter's leftovers not counted)."""
    by_sink: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def any(self) -> bool:
        return bool(self.positions or self.finished or self.load_pages)

    def add(self, item: ClosedBatch, ticket: Ticket) -> None:
        self.positions.update(item.positions)
        self.record_times.update(
            (r.shard_id, r.approximate_creation_time) for r in item.batch.records if r.load_id is None
        )
        for segment, position in item.load_pages.items():
            self.load_pages[segment] = moved_on(self.load_pages.get(segment), position)
        self.finished |= item.finished_shards
        self.records += len(item.batch)
        self.delivered += len(ticket.batch)
        self.by_sink.update(ticket.taken)

    def clear(self) -> None:
        self.positions, self.finished, self.record_times, self.load_pages = {}, set(), {}, {}
        self.records, self.delivered, self.by_sink = 0, 0, collections.Counter()


def _since(settings: Settings) -> int | None:
    """The earliest creation time a first start delivers, whole seconds (DynamoDB rounds creation times down)."""
    source = settings.source
    if source.starting_position == "LATEST":
        return math.floor(time.time())
    if source.starting_position == "AT_TIMESTAMP":
        assert source.starting_timestamp is not None
        return math.floor(source.starting_timestamp.timestamp())
    return None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _describe_reader(reader: ShardReader) -> str:
    where = str(reader.start) if reader.last_sequence_read is None else f"after {reader.last_sequence_read}"
    counted = reader.counting_from
    return where if counted is None else f"{where} (changes made since {_iso(counted)})"


def _describe_start(start: StreamStart | None) -> str:
    if start is None:
        return "-"
    if start.since is None:
        return f"at {start.starting_position}"
    return f"at {start.starting_position} (changes made since {_iso(start.since)})"
