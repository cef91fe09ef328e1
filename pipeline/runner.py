"""Wires source -> readers -> queue -> batcher -> sinks -> checkpoint; starts, drains and stops them.

Threads: `reader.poll_workers` pollers, one delivery thread (batches, sinks, checkpoints: a single writer keeps
per-shard order without locks), one discovery thread. The count does not grow with the number of shards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime

from pipeline.aws import AwsClients
from pipeline.delivery.batcher import BatchAssembler, BoundedQueue, ClosedBatch, QueueClosedError
from pipeline.delivery.dead_letter import build_dead_letters
from pipeline.delivery.driver import Delivery
from pipeline.delivery.feed import SinkFeed
from pipeline.delivery.filters import compile_filter
from pipeline.ops.metrics import MetricsServer, PipelineMetrics
from pipeline.ops.view import PipelineStats
from pipeline.retry import RetryPolicy
from pipeline.settings import Settings
from pipeline.source.reader import ShardPage, ShardReader, StartPosition, TrimmedDataError
from pipeline.source.scheduler import PollScheduler
from pipeline.source.stream import ShardInfo, ShardLineage, describe_shards, resolve_stream_arn, table_name_of
from pipeline.state.checkpoint import Checkpoint, CheckpointStore
from sinks.base import Sink
from sinks.registry import build_sink

log = logging.getLogger(__name__)


class ShutdownInterruptedError(Exception):
    """A retry wait was cut short because the pipeline is being stopped hard."""


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        sinks: Sequence[Sink] | None = None,
        clients: AwsClients | None = None,
    ) -> None:
        self.settings = settings
        source = settings.source
        self.clients = clients or AwsClients(
            source.region, source.endpoint_url, max_pool_connections=settings.reader.poll_workers + 4
        )
        self.sinks: list[Sink] = (
            list(sinks)
            if sinks is not None
            else [build_sink(s, region=source.region, endpoint_url=source.endpoint_url) for s in settings.sinks]
        )
        self._hard_stop = threading.Event()
        self.retry = RetryPolicy(settings.retry, sleep=self._interruptible_sleep)
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
            feeds=None if sinks is not None else [SinkFeed.of(s) for s in settings.sinks],
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
        self.metrics = PipelineMetrics(self, stall_seconds=settings.metrics.stall_seconds)
        self.metrics_server: MetricsServer | None = None
        self._checkpoints: dict[str, Checkpoint] = {}
        self._initial_shards: set[str] = set()
        self._first_start = False
        self._started: set[str] = set()
        self._draining = threading.Event()
        self._stopping = threading.Event()
        self._discover_now = threading.Event()
        self._delivery_thread: threading.Thread | None = None
        self._discovery_thread: threading.Thread | None = None
        self._store: CheckpointStore | None = None
        self._assembler: BatchAssembler | None = None

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
            self.stream_arn = resolve_stream_arn(self.clients.client("dynamodb"), source.table_name, self.retry)
        self._assembler = BatchAssembler(self.settings.batch, table_name_of(self.stream_arn))
        self._store = CheckpointStore(
            self.clients.client("dynamodb"),
            table_name=self.settings.checkpoint.table_name,
            stream_arn=self.stream_arn,
            consumer_name=self.settings.checkpoint.consumer_name,
            retry=self.retry,
        )
        self._store.ensure_table(self.settings.checkpoint.create_table)
        self._checkpoints = self._store.load()
        self._first_start = not self._checkpoints
        self.lineage.mark_finished(cp.shard_id for cp in self._checkpoints.values() if cp.finished)
        self.stats.committed.update(
            {cp.shard_id: cp.sequence_number for cp in self._checkpoints.values() if cp.sequence_number}
        )
        for sink in self.sinks:
            sink.open()

        shards = describe_shards(self.clients.client("dynamodbstreams"), self.stream_arn, self.retry)
        self.lineage.update(shards)
        self._initial_shards = {s.shard_id for s in shards}
        if self._first_start and source.starting_position == "LATEST":
            # Starting at LATEST means: nothing from before now. Closed shards hold only the past.
            skipped = {s.shard_id for s in shards if s.closed}
            if skipped:
                self._store.save({}, skipped)
                self.lineage.mark_finished(skipped)
        log.info(
            "stream %s: %d shard(s), %d checkpoint(s), sinks: %s",
            self.stream_arn,
            len(shards),
            len(self._checkpoints),
            ", ".join(s.name for s in self.sinks),
        )

        self._schedule_readable()
        self.scheduler.start()
        self._delivery_thread = threading.Thread(target=self._deliver_loop, name="delivery", daemon=True)
        self._delivery_thread.start()
        self._discovery_thread = threading.Thread(target=self._discovery_loop, name="discovery", daemon=True)
        self._discovery_thread.start()

    def _start_position(self, shard: ShardInfo) -> StartPosition:
        checkpoint = self._checkpoints.get(shard.shard_id)
        if checkpoint is not None and checkpoint.sequence_number is not None:
            return StartPosition.after(checkpoint.sequence_number)
        if (
            self._first_start
            and self.settings.source.starting_position == "LATEST"
            and shard.shard_id in self._initial_shards
        ):
            return StartPosition("LATEST")
        # A shard that appears later holds changes made after we started: all of them are wanted.
        return StartPosition("TRIM_HORIZON")

    def _schedule_readable(self) -> None:
        streams = self.clients.client("dynamodbstreams")
        for shard in self.lineage.readable(exclude=self._started):
            self._started.add(shard.shard_id)
            reader = ShardReader(
                shard,
                stream_arn=self.stream_arn,
                streams=streams,
                retry=self.retry,
                start=self._start_position(shard),
                limit=self.settings.reader.get_records_limit,
                on_trimmed_data=self.settings.source.on_trimmed_data,
            )
            if reader.start.kind == "LATEST":
                reader.fix_position()
            log.info("reading shard %s from %s", shard.shard_id, reader.start.kind)
            self.scheduler.add(reader)

    # -- readers -----------------------------------------------------------------------------------------

    def _enqueue(self, page: ShardPage) -> None:
        self.queue.put(page)

    def _on_shard_error(self, reader: ShardReader, error: BaseException) -> float | None:
        if isinstance(error, QueueClosedError | ShutdownInterruptedError):
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
                self.lineage.update(describe_shards(streams, self.stream_arn, self.retry))
                self._schedule_readable()
            except ShutdownInterruptedError:
                return
            except Exception as exc:
                log.error("shard discovery failed, trying again in %.0fs: %s", interval, exc)

    # -- delivery ----------------------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        assert self._assembler is not None
        positions: dict[str, str] = {}
        record_times: dict[str, datetime] = {}
        finished: set[str] = set()
        try:
            while not self._hard_stop.is_set():  # past the shutdown timeout: leave the rest to the next run
                wait = min(self._assembler.seconds_until_due(), 0.2)
                page = self.queue.get(wait)
                closed: list[ClosedBatch] = []
                if page is not None:
                    self.stats.records_read += len(page.records)
                    closed.extend(self._assembler.add(page))
                drained = page is None and self._draining.is_set()
                if self._assembler.due() or drained:
                    last = self._assembler.close()
                    if last is not None:
                        closed.append(last)
                for item in closed:
                    admitted = self.record_filter.select(item.batch)
                    self.stats.filtered += len(item.batch) - len(admitted)
                    started = time.monotonic()
                    self.delivery.deliver(admitted)
                    self.metrics.observe_batch(admitted, time.monotonic() - started)
                    self.stats.events.update(r.event_name for r in item.batch.records)
                    positions.update(item.positions)
                    record_times.update((r.shard_id, r.approximate_creation_time) for r in item.batch.records)
                    finished |= item.finished_shards
                if (positions or finished) and (drained or finished or self.delivery.flush_due(time.monotonic())):
                    self._commit(positions, finished, record_times)
                    positions, finished, record_times = {}, set(), {}
                if drained and self.queue.depth[0] == 0:
                    return
        except Exception as exc:
            self._fail(exc)
            self.queue.close()  # nobody drains it any more: release readers waiting to put

    def _commit(self, positions: dict[str, str], finished: set[str], record_times: dict[str, datetime]) -> None:
        """Everything delivered so far becomes durable in every sink, then the checkpoint records it."""
        assert self._store is not None
        self.delivery.flush()
        self._store.save(positions, finished, record_times)
        self.stats.checkpoints_written += 1
        self.stats.committed.update(positions)
        self.metrics.observe_commit(set(positions))
        if finished:
            self.stats.finished_shards |= finished
            self.lineage.mark_finished(finished)
            self._discover_now.set()  # children of a finished shard may be read now

    # -- stop --------------------------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self.fatal is None and not isinstance(error, ShutdownInterruptedError):
            self.fatal = error
            log.error("pipeline stopping: %s", error)
        self._stopping.set()
        self._discover_now.set()

    def _interruptible_sleep(self, seconds: float) -> None:
        if self._hard_stop.wait(seconds):
            raise ShutdownInterruptedError("stopped while waiting to retry")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a fatal error or `request_stop`; True if stopping was requested or failed."""
        return self._stopping.wait(timeout)

    def request_stop(self) -> None:
        self._stopping.set()
        self._discover_now.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Drain: finish polls in flight, deliver everything queued, flush sinks, checkpoint, close.

        Returns True when everything read was delivered and checkpointed within `timeout`."""
        timeout = self.settings.runtime.shutdown_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.request_stop()
        self.scheduler.stop(timeout=max(0.0, deadline - time.monotonic()))
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
        delivering = self._delivery_thread is not None and self._delivery_thread.is_alive()
        for sink in self.sinks if not delivering else ():  # a sink is never called from two threads at once
            try:
                sink.close()
            except Exception as exc:
                log.warning("closing sink %s: %s", sink.name, exc)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        return clean and self.fatal is None
