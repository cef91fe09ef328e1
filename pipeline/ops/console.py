"""What `streamsink run` prints: a live status line on a terminal, JSON log lines in a container.

Log lines carry counts, shard ids, sequence numbers and error messages, never item contents or credentials, so
INFO logs can be shipped anywhere.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

import orjson

from pipeline.ops.view import PipelineView

NOISY_LOGGERS = ("botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "werkzeug")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode("utf-8")


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> bool:
    """Set up the root logger; returns True when a live status line should be shown (`auto` on a terminal)."""
    stream = stream or sys.stderr
    interactive = log_format == "auto" and stream.isatty()
    handler = logging.StreamHandler(stream)
    if log_format == "json" or (log_format == "auto" and not interactive):
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return interactive


class StatusLine:
    """Rewrites one terminal line every `interval` seconds: throughput, lag, queue, sinks, errors."""

    def __init__(self, pipeline: PipelineView, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self._pipeline = pipeline
        self._stream = stream or sys.stderr
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-line", daemon=True)
        self._last = (time.monotonic(), 0)

    def start(self) -> StatusLine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._stream.write("\n")
        self._stream.flush()

    def render(self) -> str:
        p = self._pipeline
        now = time.monotonic()
        then, read_then = self._last
        read = p.stats.records_read
        rate = (read - read_then) / (now - then) if now > then else 0.0
        self._last = (now, read)
        ages = [a for a in (s.iterator_age(time.time()) for s in list(p.scheduler.progress.values())) if a is not None]
        lag = f"{max(ages):.1f}s" if ages else "-"
        queued, _ = p.queue.depth
        delivered = " ".join(f"{name}={count:,}" for name, count in p.delivery.stats.delivered.items()) or "-"
        dead = sum(p.delivery.stats.dead_lettered.values())
        return (
            f"{read:,} read  {rate:,.0f} rec/s  lag {lag}  queue {queued:,}/{p.settings.batch.queue_capacity:,}  "
            f"shards {len(p.scheduler.progress)}  delivered {delivered}  dead-lettered {dead:,}  "
            f"poll errors {p.scheduler.errors:,}"
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._stream.write("\r\x1b[2K" + self.render())
            self._stream.flush()
