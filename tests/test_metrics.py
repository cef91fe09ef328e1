"""Metrics scraped over HTTP from a running pipeline (moto source), the health check, and the console output."""

from __future__ import annotations

import io
import logging
import urllib.error
import urllib.request
from collections.abc import Callable

import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ops.console import JsonLogFormatter, StatusLine, configure_logging
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.memory import FlakySink, MemorySink
from tests.conftest import wait_until


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _health(port: int) -> tuple[int, str]:
    try:
        response = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _write(aws: EmbeddedAws, table: str, count: int) -> None:
    dynamodb = aws.client("dynamodb")
    for n in range(count):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": f"p{n}"}, "sk": {"S": "s"}})


def test_metrics_count_what_the_pipeline_did(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    _write(aws, table, 25)
    sink = MemorySink("copy")
    pipeline = Pipeline(make_settings(metrics={"port": 0, "host": "127.0.0.1"}), sinks=[sink])
    pipeline.start()
    try:
        assert pipeline.metrics_server is not None
        port = pipeline.metrics_server.port
        wait_until(lambda: pipeline.stats.checkpoints_written > 0 and len(sink.records) == 25, what="delivery")
        metrics = _scrape(port)
        status, body = _health(port)
    finally:
        pipeline.stop()

    assert metrics[("streamsink_records_read_total", ())] == 25
    assert metrics[("streamsink_records_delivered_total", (("sink", "copy"),))] == 25
    assert metrics[("streamsink_records_dead_lettered_total", (("sink", "copy"),))] == 0
    assert metrics[("streamsink_events_total", (("event", "INSERT"),))] == 25
    assert metrics[("streamsink_getrecords_calls_total", (("result", "records"),))] >= 1
    assert metrics[("streamsink_checkpoints_written_total", ())] >= 1
    assert metrics[("streamsink_batch_records_count", ())] >= 1
    assert metrics[("streamsink_batch_records_sum", ())] == 25
    assert metrics[("streamsink_change_to_sink_seconds_count", ())] == 25
    assert ("streamsink_queue_records", ()) in metrics
    shard_gauges = [key for key in metrics if key[0] == "streamsink_shard_seconds_since_poll"]
    assert len(shard_gauges) == 1
    assert [key for key in metrics if key[0] == "streamsink_shard_iterator_age_seconds"]
    assert (status, body) == (200, "ok\n")


def test_health_turns_unhealthy_when_a_shard_is_behind_and_stuck(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    """The sink is down: records are read, nothing is checkpointed, and /healthz says which shard and why."""
    _write(aws, table, 5)
    down = FlakySink("down", fail_writes=10**9)
    settings = make_settings(
        metrics={"port": 0, "host": "127.0.0.1", "stall_seconds": 0.5},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.05, "max_delay_seconds": 0.1},
    )
    pipeline = Pipeline(settings, sinks=[down])
    pipeline.start()
    try:
        assert pipeline.metrics_server is not None
        port = pipeline.metrics_server.port
        # Under load the first poll itself may take longer than stall_seconds (also reported, and also 503):
        # wait for the reason this test is about.
        wait_until(lambda: "nothing checkpointed" in _health(port)[1], what="the stuck shard reported")
        status, body = _health(port)
        assert down.attempts > 1
    finally:
        pipeline.stop(timeout=1.0)
    assert status == 503
    assert "records read up to" in body
    assert "nothing checkpointed" in body
    assert pipeline.stats.committed == {}


def test_an_idle_caught_up_shard_stays_healthy(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    sink = MemorySink()
    pipeline = Pipeline(make_settings(metrics={"port": 0, "host": "127.0.0.1", "stall_seconds": 0.5}), sinks=[sink])
    pipeline.start()
    try:
        assert pipeline.metrics_server is not None
        wait_until(lambda: pipeline.scheduler.empty_polls >= 5, what="idle polls")
        wait_until(lambda: pipeline.scheduler.empty_polls >= 10, what="more idle polls")
        assert _health(pipeline.metrics_server.port) == (200, "ok\n")
    finally:
        pipeline.stop()


def test_json_log_lines_are_one_object_each() -> None:
    out = io.StringIO()
    assert configure_logging("INFO", "json", out) is False
    logging.getLogger("pipeline.test").info("shard %s: %d records", "shardId-1", 3)
    line = orjson.loads(out.getvalue().splitlines()[-1])
    assert line["level"] == "INFO"
    assert line["logger"] == "pipeline.test"
    assert line["message"] == "shard shardId-1: 3 records"
    assert JsonLogFormatter().format(logging.makeLogRecord({"msg": "x"})).startswith("{")


def test_auto_log_format_is_json_when_not_a_terminal() -> None:
    out = io.StringIO()  # isatty() is False, as in a container
    assert configure_logging("INFO", "auto", out) is False
    logging.getLogger("pipeline.test").warning("hello")
    assert orjson.loads(out.getvalue().splitlines()[-1])["message"] == "hello"


def test_the_status_line_shows_throughput_queue_and_sinks(
    aws: EmbeddedAws, table: str, make_settings: Callable[..., Settings]
) -> None:
    _write(aws, table, 12)
    sink = FlakySink("copy", refuse=lambda r: PermanentSinkError("too big") if r.keys["pk"] == "p3" else None)
    pipeline = Pipeline(make_settings(), sinks=[sink])
    pipeline.start()
    try:
        wait_until(lambda: pipeline.stats.checkpointed == 12, what="a dead letter and the checkpoint after it")
        line = StatusLine(pipeline, stream=io.StringIO()).render()
    finally:
        pipeline.stop()
    assert line.startswith("12 read")
    assert "delivered copy=11" in line
    assert "dead-lettered 1" in line
    assert "queue 0/10,000" in line
