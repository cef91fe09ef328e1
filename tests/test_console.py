"""What `streamsink run` shows a person: the status line on a terminal, progress lines in JSON logs, the line after
a stop. Real pipelines against the moto server; the terminal is a pseudo-terminal or a stream that says it is one."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from pipeline.ops.console import Progress, ProgressLog, StatusLine, configure_logging
from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.memory import FlakySink, MemorySink
from tests.conftest import read_archive, unique, wait_until

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]


class _Terminal(io.StringIO):
    """Everything written to it, as a terminal would receive it."""

    def isatty(self) -> bool:
        return True


def _screen(output: str) -> list[str]:
    """What a terminal shows after `output`: carriage return, erase line (ESC [K, ESC [2K), newline, text."""
    lines = [""]
    col = 0
    i = 0
    while i < len(output):
        if output.startswith("\x1b[2K", i):
            lines[-1] = " " * col
            i += 4
            continue
        if output.startswith("\x1b[K", i):
            lines[-1] = lines[-1][:col]
            i += 3
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + char + line[col + 1 :]
            col += 1
    return [line.rstrip() for line in lines]


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _write(aws: EmbeddedAws, table: str, count: int) -> None:
    dynamodb = aws.client("dynamodb")
    for n in range(count):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": f"p{n}"}, "sk": {"S": "s"}})


@pytest.mark.usefixtures("_restore_logging")
def test_log_lines_never_run_into_the_status_line(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    terminal = _Terminal()
    assert configure_logging("INFO", "auto", terminal) is True
    _write(aws, table, 4)
    sink = MemorySink("copy")
    pipeline = Pipeline(make_settings(), sinks=[sink])
    pipeline.start()
    status = StatusLine(pipeline, stream=terminal, interval=3600).start()  # drawn below, not by its timer
    try:
        wait_until(lambda: pipeline.stats.delivered_by_sink.get("copy") == 4, what="delivery")
        status.draw()
        logging.getLogger("pipeline.test").warning("shard %s: first", "shardId-1")
        logging.getLogger("pipeline.test").error("shard %s: second", "shardId-2")
        status.draw()
    finally:
        status.stop()
        pipeline.stop()
    screen = [line for line in _screen(terminal.getvalue()) if line]
    logged = [line for line in screen if "pipeline.test" in line]
    assert len(logged) == 2
    for line in logged:
        assert re.match(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (WARNING|ERROR) pipeline\.test: shard shardId-\d: ", line
        )
    assert logged[0].endswith("first") and logged[1].endswith("second")
    statuses = [line for line in screen if " read  " in line]
    assert statuses and all(line.startswith("4 read  ") for line in statuses)
    assert all("pipeline.test" not in line for line in statuses)
    # The status line was drawn again under the log lines, and the stop summary came after it, on its own line.
    assert screen.index(logged[-1]) < screen.index(statuses[-1]) < len(screen) - 1
    assert screen[-1].endswith("delivered: copy 4; the next start goes on from there")


def test_on_a_pseudo_terminal_the_signal_log_line_starts_on_its_own_line(
    aws: EmbeddedAws, table: str, bucket: str, tmp_path: Any
) -> None:
    """`streamsink run` on a real pseudo-terminal: SIGINT is logged while the status line is shown."""
    config = tmp_path / "run.toml"
    config.write_text(
        f'[source]\ntable_name = "{table}"\nregion = "{aws.region}"\nendpoint_url = "{aws.endpoint_url}"\n'
        f'[checkpoint]\ntable_name = "{unique("checkpoints")}"\n'
        f"[reader]\nidle_poll_max_seconds = 0.2\n[batch]\nmax_wait_seconds = 0.2\n"
        f'[dead_letter]\npath = "{tmp_path / "dl.jsonl"}"\n'
        f'[[sinks]]\ntype = "s3_parquet"\nbucket = "{bucket}"\nprefix = "orders/"\nbuffer_max_seconds = 0.5\n'
    )
    controller, terminal = pty.openpty()
    process = subprocess.Popen([*STREAMSINK, "run", "--config", str(config)], stderr=terminal, stdout=terminal)
    os.close(terminal)
    received: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the process exited and the terminal closed
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _write(aws, table, 3)
        wait_until(lambda: b"3 read  " in b"".join(received), what="the status line showing the records")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
        os.close(controller)
    screen = [line for line in _screen(b"".join(received).decode().replace("\r\n", "\n")) if line]
    draining = [line for line in screen if "SIGINT received: draining" in line]
    assert len(draining) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO streamsink: SIGINT received: draining", draining[0])
    assert screen[-1].endswith("delivered: s3_parquet 3; the next start goes on from there")


def test_delivered_counts_only_what_is_checkpointed_and_buffered_apart(
    aws: EmbeddedAws, table: str, bucket: str, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    settings = make_settings(
        sinks=[
            {"type": "s3_parquet", "name": "archive", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 900}
        ]
    )
    _write(aws, table, 10)
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        wait_until(lambda: pipeline.stats.buffered == 10, what="the archive taking every record into its buffer")
        progress = Progress.of(pipeline)
        line = StatusLine(pipeline, stream=io.StringIO()).render()
        commits = pipeline.stats.checkpoints_written
        archived = read_archive(aws, bucket).num_rows
    finally:
        with caplog.at_level(logging.INFO, logger="pipeline.runner"):
            assert pipeline.stop()
    assert (progress.records_read, progress.checkpointed, progress.buffered) == (10, 0, 10)
    assert progress.sinks == {"archive": {"delivered": 0, "dead_lettered": 0}}
    assert commits == 0 and archived == 0
    assert "delivered archive=0  buffered 10  in flight 0" in line
    # The stop flushed the buffer and checkpointed it: now it is delivered.
    after = Progress.of(pipeline)
    assert (after.checkpointed, after.buffered) == (10, 0)
    assert after.sinks["archive"]["delivered"] == 10
    assert read_archive(aws, bucket).num_rows == 10
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:")]
    assert summaries == [
        f"stopped: 10 change(s) read in this run, all checkpointed ({pipeline.stats.checkpoints_written} commit(s) "
        f"to table {settings.checkpoint.table_name}); delivered: archive 10; the next start goes on from there"
    ]


def test_the_stop_line_says_what_will_be_read_again(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    _write(aws, table, 6)
    refusing = FlakySink("strict", refuse=lambda _record: PermanentSinkError("no"))
    pipeline = Pipeline(make_settings(dead_letter={"on_failure": "block"}), sinks=[refusing])
    pipeline.start()
    try:
        wait_until(lambda: pipeline.fatal is not None, what="the refusal stopping the pipeline")
    finally:
        with caplog.at_level(logging.INFO, logger="pipeline.runner"):
            assert not pipeline.stop()
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:")]
    assert len(summary) == 1
    assert summary[0].startswith("stopped: 6 change(s) read in this run, 0 checkpointed (0 commit(s) to table ")
    assert summary[0].endswith(
        "; delivered: strict 0; 6 record(s) read past the checkpoints will be read again at the next start"
    )


@pytest.mark.usefixtures("_restore_logging")
def test_json_logs_carry_a_progress_line_every_interval(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    out = io.StringIO()
    assert configure_logging("INFO", "json", out) is False
    settings = make_settings(runtime={"progress_interval_seconds": 0.1})
    pipeline = Pipeline(settings)
    pipeline.start()
    shown = ProgressLog(pipeline, settings.runtime.progress_interval_seconds).start()

    def progress_lines() -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in out.getvalue().splitlines() if line]
        return [line for line in lines if line["logger"] == "pipeline.progress"]

    try:
        _write(aws, table, 7)
        wait_until(lambda: any(line["checkpointed"] == 7 for line in progress_lines()), what="a progress line")
    finally:
        shown.stop()
        pipeline.stop()
    lines = progress_lines()
    assert len(lines) >= 2  # one per interval, before and after the records arrived
    last = next(line for line in lines if line["checkpointed"] == 7)
    assert last["level"] == "INFO"
    assert last["records_read"] == 7 and last["buffered"] == 0 and last["dead_lettered"] == 0
    assert last["sinks"] == {"s3_parquet": {"delivered": 7, "dead_lettered": 0}}
    assert isinstance(last["lag_seconds"], float) and last["lag_seconds"] >= 0
    assert last["shards"] >= 1 and last["poll_errors"] == 0
    assert last["message"].startswith("progress: 7 read, 7 checkpointed, 0 buffered, 0 in flight, lag ")
    assert last["message"].endswith("delivered (durable): s3_parquet 7")


def test_progress_interval_must_be_positive() -> None:
    minimal: dict[str, Any] = {"source": {"table_name": "t"}, "sinks": [{"type": "memory"}]}
    with pytest.raises(ConfigError) as raised:
        load_settings(**minimal, runtime={"progress_interval_seconds": 0})
    assert any("runtime.progress_interval_seconds" in line for line in raised.value.lines)
    assert load_settings(**minimal).runtime.progress_interval_seconds == 60.0
