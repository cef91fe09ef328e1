"""Prometheus metrics and a health check for a running pipeline, served over HTTP.

Counters and gauges are read from the pipeline's own state when Prometheus scrapes (a custom collector), so the
hot paths keep plain integer counters and pay nothing for metrics. Only the distributions (batch sizes, delivery
latency, change-to-sink latency) are observed as they happen.

Health (`/healthz`): unhealthy, with the reasons in the body, when the pipeline stopped on an error, or when a
shard has made no progress for `metrics.stall_seconds` while behind: it has records read but not checkpointed
(a sink is down or refusing), or no successful GetRecords (the stream is unreachable). A shard that is merely
idle (its last poll came back empty and everything read is checkpointed) is healthy however long it sleeps.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.ops.view import PipelineView
from pipeline.records import Batch

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reasons: tuple[str, ...]


class PipelineMetrics:
    """The metrics of one pipeline, on a registry of its own (several pipelines may share a process)."""

    def __init__(self, pipeline: PipelineView, stall_seconds: float) -> None:
        self._pipeline = pipeline
        self.stall_seconds = stall_seconds
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_records = Histogram(
            "streamsink_batch_records",
            "Records per batch handed to the sinks.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "streamsink_batch_delivery_seconds",
            "Time for every sink to take one batch, retries included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.change_to_sink_seconds = Histogram(
            "streamsink_change_to_sink_seconds",
            "From a change's ApproximateCreationDateTime to every sink having taken it.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(pipeline))

    def observe_batch(self, batch: Batch, seconds: float) -> None:
        """Called by the delivery thread after every sink took `batch`."""
        self.batch_records.observe(len(batch))
        self.batch_seconds.observe(seconds)
        now = time.time()
        for record in batch.records:
            self.change_to_sink_seconds.observe(max(0.0, now - record.approximate_creation_time.timestamp()))

    def health(self, now: float | None = None) -> Health:
        now = time.time() if now is None else now
        pipeline = self._pipeline
        reasons: list[str] = []
        if pipeline.fatal is not None:
            reasons.append(f"stopped on error: {pipeline.fatal}")
        started = pipeline.started_at or now
        failing = pipeline.discovery_failing_since
        if failing is not None and now - failing > self.stall_seconds:
            reasons.append(
                f"shard discovery (DescribeStream) failing for {now - failing:.0f}s: {pipeline.discovery_error}"
            )
        idle = pipeline.reading_nothing_since
        if idle is not None and now - idle > self.stall_seconds:
            reasons.append(
                f"no shard has been read for {now - idle:.0f}s while the stream has unfinished shards "
                "(children wait for a parent that is not being read, or discovery found none)"
            )
        store = pipeline.store
        if store is not None and store.failing_since is not None and now - store.failing_since > self.stall_seconds:
            reasons.append(
                f"checkpoint table {store.table_name}: commits failing for {now - store.failing_since:.0f}s "
                f"({store.last_error}); delivery waits until it is back"
            )
        beating = pipeline.heartbeat_failing_since
        if beating is not None and now - beating > self.stall_seconds:
            reasons.append(
                f"heartbeats failing for {now - beating:.0f}s: peers take this worker's shards after "
                f"lease.failover_seconds"
            )
        failing_sinks = dict(pipeline.delivery.stats.failing_since)
        for sink, since in failing_sinks.items():
            if now - since > self.stall_seconds:
                error = pipeline.delivery.stats.last_error.get(sink, "")
                reasons.append(f"sink {sink}: writes failing for {now - since:.0f}s ({error}); delivery waits for it")
        # A buffering sink holds taken records until its buffer is due: that is not a stall.
        allowance = pipeline.delivery.max_buffer_seconds + pipeline.settings.batch.max_wait_seconds
        committed = dict(pipeline.stats.committed)
        for progress in list(pipeline.scheduler.progress.values()):
            held = progress.held_since
            if held is not None and now - held > self.stall_seconds:
                reasons.append(
                    f"shard {progress.shard_id}: its reader has waited {now - held:.0f}s at the full queue: "
                    "delivery is not keeping up"
                )
                continue
            last_ok = progress.last_poll_ok_at or started
            if now - last_ok > self.stall_seconds:
                reasons.append(f"shard {progress.shard_id}: no successful GetRecords for {now - last_ok:.0f}s")
                continue
            read = progress.last_sequence_read
            done = committed.get(progress.shard_id)
            behind = read is not None and (done is None or int(done) < int(read))
            unacked = progress.unacked_since
            if behind and unacked is not None and now - unacked > self.stall_seconds + allowance:
                reasons.append(
                    f"shard {progress.shard_id}: records read up to {read} but nothing checkpointed for "
                    f"{now - unacked:.0f}s (checkpoint at {done or 'none'})"
                )
        return Health(not reasons, tuple(reasons))


class _StateCollector(Collector):
    """Reads counters and gauges from the pipeline at scrape time."""

    def __init__(self, pipeline: PipelineView) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        p = self._pipeline
        now = time.time()
        yield _counter("streamsink_records_read", "Records read from the stream.", p.stats.records_read)
        yield _counter("streamsink_checkpoints_written", "Checkpoint commits.", p.stats.checkpoints_written)
        yield _counter(
            "streamsink_records_filtered_by_pipeline",
            "Records the pipeline-wide [filter] left out (checkpointed, never delivered).",
            p.stats.filtered,
        )
        for name, help_text, values in (
            ("streamsink_records_delivered", "Records taken by a sink.", p.delivery.stats.delivered),
            ("streamsink_records_dead_lettered", "Records a sink refused for good.", p.delivery.stats.dead_lettered),
            ("streamsink_records_filtered", "Records a sink's filter left out.", p.delivery.stats.filtered),
        ):
            family = CounterMetricFamily(name, help_text, labels=["sink"])
            for sink in p.sinks:
                family.add_metric([sink.name], values.get(sink.name, 0))
            yield family
        events = CounterMetricFamily(
            "streamsink_events",
            "Changes handled (delivered, dead-lettered or filtered), by event name.",
            labels=["event"],
        )
        for event, count in sorted(p.stats.events.items()):
            events.add_metric([event], count)
        yield events
        calls = CounterMetricFamily(
            "streamsink_getrecords_calls", "GetRecords calls: the polling cost.", labels=["result"]
        )
        scheduler = p.scheduler
        calls.add_metric(["records"], scheduler.polls - scheduler.empty_polls)
        calls.add_metric(["empty"], scheduler.empty_polls)
        calls.add_metric(["error"], scheduler.errors)
        yield calls
        records, size = p.queue.depth
        yield GaugeMetricFamily("streamsink_queue_records", "Records waiting for the batcher.", value=records)
        yield GaugeMetricFamily("streamsink_queue_bytes", "Bytes waiting for the batcher.", value=size)
        shards = GaugeMetricFamily("streamsink_shards", "Shards by state.", labels=["state"])
        shards.add_metric(["reading"], len(scheduler.progress))
        shards.add_metric(["finished"], p.stats.shards_finished)
        yield shards
        age = GaugeMetricFamily(
            "streamsink_shard_iterator_age_seconds",
            "Now minus the creation time of the newest record read; 0 when caught up.",
            labels=["shard"],
        )
        since_poll = GaugeMetricFamily(
            "streamsink_shard_seconds_since_poll", "Time since the last successful GetRecords.", labels=["shard"]
        )
        for progress in list(scheduler.progress.values()):
            value = progress.iterator_age(now)
            if value is not None:
                age.add_metric([progress.shard_id], value)
            if progress.last_poll_ok_at is not None:
                since_poll.add_metric([progress.shard_id], now - progress.last_poll_ok_at)
        yield age
        yield since_poll
        yield GaugeMetricFamily("streamsink_leases_held", "Shard leases this worker holds.", value=p.stats.leases_held)
        yield GaugeMetricFamily(
            "streamsink_workers_live",
            "Workers of this consumer alive as this one sees them (itself included).",
            value=p.stats.live_workers,
        )
        leases = CounterMetricFamily(
            "streamsink_lease_events",
            "Leases taken (free or expired), stolen (from a worker above its share), lost (to another worker) and "
            "released (handed back at a stop or above the share).",
            labels=["event"],
        )
        for event in ("taken", "stolen", "lost", "released"):
            leases.add_metric([event], p.stats.lease_events.get(event, 0))
        yield leases
        yield _counter(
            "streamsink_trimmed_skips",
            "Times records were skipped because the stream had trimmed them (a shard, or a whole shard aged out).",
            p.scheduler.trimmed_skips + p.stats.aged_out_skips,
        )
        load = p.initial_load.report() if p.initial_load is not None else None
        if load is not None:
            phase = GaugeMetricFamily(
                "streamsink_initial_load_phase", "1 for the initial load's phase.", labels=["load_id", "phase"]
            )
            for name in ("loading", "finished", "done"):
                phase.add_metric([load.load_id, name], 1.0 if load.phase == name else 0.0)
            yield phase
            yield GaugeMetricFamily(
                "streamsink_initial_load_items", "Items the initial load has delivered to every sink.", value=load.items
            )
            unknown = float("nan")
            yield GaugeMetricFamily(
                "streamsink_initial_load_items_estimated",
                "Items the initial load is expected to copy (an export's count; a table's ItemCount); NaN unknown.",
                value=unknown if load.estimated_items is None else load.estimated_items,
            )
            yield GaugeMetricFamily(
                "streamsink_initial_load_eta_seconds",
                "Seconds until the initial load is expected to finish, at the rate this worker copies; NaN unknown.",
                value=unknown if load.eta_seconds is None else load.eta_seconds,
            )
        yield _counter(
            "streamsink_records_skipped_before_start",
            "Records left out because they were made before the first start (starting_position LATEST or "
            "AT_TIMESTAMP).",
            p.scheduler.skipped_before_start,
        )


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


class MetricsServerError(Exception):
    """The metrics server cannot listen where `[metrics]` says; the message names the key and the fix."""


def _listen_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"metrics.port = {port}: {host}:{port} is already in use (by another streamsink or another program); "
            "choose a free port, or 0 for any free one"
        )
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket.gaierror):
        return f"metrics.host = {host!r}: not an address of this machine; use 0.0.0.0, 127.0.0.1 or one of its own"
    if exc.errno == errno.EACCES:
        return f"metrics.port = {port}: not allowed to listen on {host}:{port}; use a port above 1023"
    return f"metrics.port = {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"


class MetricsServer:
    """`/metrics` (Prometheus text format) and `/healthz` (200 or 503 with reasons) on a background thread."""

    def __init__(self, metrics: PipelineMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        handler = _handler_for(metrics)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise MetricsServerError(_listen_error(host, port, exc)) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(metrics: PipelineMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
            elif self.path.split("?")[0] == "/healthz":
                health = metrics.health()
                body = "ok\n" if health.healthy else "".join(f"{reason}\n" for reason in health.reasons)
                self._reply(200 if health.healthy else 503, "text/plain; charset=utf-8", body.encode())
            else:
                self._reply(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
