"""What `streamsink run` prints: a live status line on a terminal, JSON log lines in a container.

On a terminal the status line and the log lines share stderr: a log line is written onto a cleared line and the
status line is drawn again under it, so that the two never run together. Without a status line (JSON or text
logs), a progress line is logged every `runtime.progress_interval_seconds` instead, so that logs read a day later
still show the pipeline alive and how far it got.

Log lines carry counts, shard ids, sequence numbers and error messages, never item contents or credentials, so
INFO logs can be shipped anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import orjson

from pipeline.ops.status import age_text
from pipeline.ops.view import PipelineView
from pipeline.state.load_progress import LoadReport

NOISY_LOGGERS = ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "werkzeug")
CLEAR_LINE = "\r\x1b[2K"
"""Carriage return, then erase the whole line: the terminal is back at an empty line's start."""
FIELDS = "streamsink_fields"
"""The LogRecord attribute (`extra={FIELDS: {...}}`) whose keys a JSON log line carries besides the message."""


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            entry.update((key, value) for key, value in fields.items() if key not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode("utf-8")


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """A stream handler that shares its terminal with a live status line: while one is shown, each log line is
    written onto a cleared line, and the status line is drawn again below it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.status: StatusLine | None = None

    def emit(self, record: logging.LogRecord) -> None:
        status = self.status
        if status is None:
            super().emit(record)
            return
        with status.lock:
            self.stream.write(CLEAR_LINE)
            super().emit(record)
            status.redraw()


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> bool:
    """Set up the root logger; returns True when a live status line should be shown (`auto` on a terminal)."""
    stream = stream or sys.stderr
    interactive = log_format == "auto" and stream.isatty()
    handler = ConsoleHandler(stream)
    if log_format == "json" or (log_format == "auto" and not interactive):
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return interactive


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a running pipeline is, as the status line and the progress log show it."""

    records_read: int
    checkpointed: int
    """Records read whose positions a checkpoint covers: a restart does not read them again."""
    buffered: int
    """Taken by every sink, waiting for a flush (a buffering sink, the archive) and the checkpoint after it."""
    in_flight: int
    """Handed to the sinks, not yet taken by all of them."""
    queued: int
    lag_seconds: float | None
    shards: int
    dead_lettered: int
    poll_errors: int
    sinks: dict[str, dict[str, int]]
    """Per sink: `delivered` (taken, durable and checkpointed) and `dead_lettered`."""

    @classmethod
    def of(cls, p: PipelineView, now: float | None = None) -> Progress:
        now = time.time() if now is None else now
        ages = [a for a in (s.iterator_age(now) for s in list(p.scheduler.progress.values())) if a is not None]
        stats = p.delivery.stats
        dead = dict(stats.dead_lettered)
        return cls(
            records_read=p.stats.records_read,
            checkpointed=p.stats.checkpointed,
            buffered=p.stats.buffered,
            in_flight=p.delivery.records_writing,
            queued=p.queue.depth[0],
            lag_seconds=round(max(ages), 3) if ages else None,
            shards=len(p.scheduler.progress),
            dead_lettered=sum(dead.values()),
            poll_errors=p.scheduler.errors,
            sinks={
                sink.name: {
                    "delivered": p.stats.delivered_by_sink.get(sink.name, 0),
                    "dead_lettered": dead.get(sink.name, 0),
                }
                for sink in p.sinks
            },
        )


def load_bar(load: LoadReport, width: int = 20) -> str:
    """`load [#######.............] 35% 3,500/10,000 ETA 4m10s`: the copy's progress, on the status line."""
    if not load.estimated_items:
        return f"load {load.items:,} item(s), {load.segments_done}/{load.segments} segment(s)"
    share = min(1.0, load.items / load.estimated_items)
    filled = int(share * width)
    eta = "" if load.eta_seconds is None else f" ETA {age_text(load.eta_seconds)}"
    return f"load [{'#' * filled}{'.' * (width - filled)}] {share:.0%} {load.items:,}/{load.estimated_items:,}{eta}"


class StatusLine:
    """Rewrites one terminal line every `interval` seconds: throughput, lag, queue, delivery, errors.

    `delivered` (per sink) counts what is durable and checkpointed; what the sinks hold in buffers, and what is
    still being written, is shown apart, so that no number on the screen counts records a restart sends again."""

    def __init__(self, pipeline: PipelineView, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self._pipeline = pipeline
        self._stream = stream or sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)
        self._last = (time.monotonic(), 0)
        self._shown: str | None = None
        self.lock = threading.RLock()
        """Held while anything is written to the terminal, so that a log line and a redraw never interleave."""

    def start(self) -> StatusLine:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, ConsoleHandler) and handler.stream is self._stream:
                handler.status = self
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop redrawing; the last status stays on screen and later log lines go below it."""
        self._stop.set()
        self._thread.join(2.0)
        with self.lock:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, ConsoleHandler) and handler.status is self:
                    handler.status = None
            if self._shown is not None:
                self._stream.write("\n")
                self._stream.flush()
            self._shown = None

    def render(self) -> str:
        now = time.monotonic()
        then, read_then = self._last
        progress = Progress.of(self._pipeline)
        read = progress.records_read
        rate = (read - read_then) / (now - then) if now > then else 0.0
        self._last = (now, read)
        lag = "-" if progress.lag_seconds is None else f"{progress.lag_seconds:.1f}s"
        capacity = self._pipeline.settings.batch.queue_capacity
        delivered = " ".join(f"{name}={counts['delivered']:,}" for name, counts in progress.sinks.items()) or "-"
        load = self._pipeline.initial_load.report() if self._pipeline.initial_load is not None else None
        return (
            (load_bar(load) + "  " if load is not None and load.phase == "loading" else "")
            + f"{read:,} read  {rate:,.0f} rec/s  lag {lag}  queue {progress.queued:,}/{capacity:,}  "
            f"shards {progress.shards}  delivered {delivered}  buffered {progress.buffered:,}  "
            f"in flight {progress.in_flight:,}  dead-lettered {progress.dead_lettered:,}  "
            f"poll errors {progress.poll_errors:,}"
        )

    def draw(self) -> None:
        """Replace the line on screen with the pipeline's state now."""
        with self.lock:
            self._shown = self.render()
            self.redraw()

    def redraw(self) -> None:
        """Draw the last rendered state again (after a log line took its place)."""
        with self.lock:
            if self._shown is not None:
                self._stream.write(CLEAR_LINE + self._shown)
                self._stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.draw()


class ProgressLog:
    """Without a status line, logs one progress line every `interval` seconds (logger `pipeline.progress`): in
    JSON mode its fields are keys of the line (records_read, checkpointed, buffered, in_flight, queued,
    lag_seconds, shards, dead_lettered, poll_errors, and `sinks`: per sink delivered and dead_lettered)."""

    def __init__(self, pipeline: PipelineView, interval: float) -> None:
        self._pipeline = pipeline
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-log", daemon=True)
        self._log = logging.getLogger("pipeline.progress")

    def start(self) -> ProgressLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def log_now(self) -> None:
        progress = Progress.of(self._pipeline)
        lag = "-" if progress.lag_seconds is None else f"{progress.lag_seconds:.1f}s"
        sinks = ", ".join(f"{name} {counts['delivered']:,}" for name, counts in progress.sinks.items())
        self._log.info(
            "progress: %s read, %s checkpointed, %s buffered, %s in flight, lag %s, %s dead-lettered; "
            "delivered (durable): %s",
            f"{progress.records_read:,}",
            f"{progress.checkpointed:,}",
            f"{progress.buffered:,}",
            f"{progress.in_flight:,}",
            lag,
            f"{progress.dead_lettered:,}",
            sinks or "-",
            extra={FIELDS: dataclasses.asdict(progress)},
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.log_now()
