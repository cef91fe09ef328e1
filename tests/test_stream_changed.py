"""A table whose stream was disabled and enabled again has a new stream ARN. Reading by table name, streamsink
notices (at start and while running) and stops, naming both ARNs, instead of starting the new stream afresh
and leaving the old one's unread records behind without a word.

moto cannot enable a stream again, so the table and its streams are the simulated ones, served over HTTP with
DescribeTable answered for the simulated table; the checkpoint table is moto behind the same endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.runner import Pipeline, StreamChangedError
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from pipeline.testing.simulated_stream_server import SimulatedStreamsServer
from sinks.memory import MemorySink
from tests.conftest import wait_until


@pytest.fixture
def simulator() -> StreamSimulator:
    return StreamSimulator()


@pytest.fixture
def server(aws: EmbeddedAws, simulator: StreamSimulator) -> Iterator[SimulatedStreamsServer]:
    with SimulatedStreamsServer(simulator, backend_url=aws.endpoint_url) as running:
        yield running


@pytest.fixture
def build(
    aws: EmbeddedAws, server: SimulatedStreamsServer, make_settings: Callable[..., Settings]
) -> Iterator[Callable[..., tuple[Pipeline, MemorySink]]]:
    made: list[Pipeline] = []
    checkpoint_table = make_settings().checkpoint.table_name  # one consumer across the runs

    def pipeline(**source: Any) -> tuple[Pipeline, MemorySink]:
        settings = make_settings(
            source={"table_name": "orders", "endpoint_url": server.endpoint_url, **source},
            checkpoint={"table_name": checkpoint_table},
            reader={"discovery_interval_seconds": 0.2},
        )
        sink = MemorySink()
        made.append(Pipeline(settings, sinks=[sink], clients=AwsClients(aws.region, server.endpoint_url)))
        return made[-1], sink

    yield pipeline
    for running in made:
        running.stop(timeout=2)


def item(key: str) -> dict[str, Any]:
    return {"pk": {"S": key}, "sk": {"S": "a"}}


def test_a_restart_after_the_stream_was_enabled_again_stops_naming_both_streams_until_told(
    simulator: StreamSimulator, build: Callable[..., tuple[Pipeline, MemorySink]]
) -> None:
    old = simulator.create_stream("orders", shards=1)
    old.put_item(item("a"))
    first, sink = build()
    first.start()
    wait_until(lambda: len(sink.records) == 1 and bool(first.stats.committed), what="the first change")
    assert first.stop() is True

    old.put_item(item("b"))  # unread when the stream is disabled
    old.disable()
    new = simulator.create_stream("orders", shards=1)
    new.put_item(item("c"))

    with pytest.raises(StreamChangedError) as raised:
        build()[0].start()
    message = str(raised.value)
    assert old.arn in message and new.arn in message
    assert "24 hours" in message and "neither stream" in message

    # Draining the old stream, then going on with the new one, as the message says.
    drain, drained = build(table_name=None, stream_arn=old.arn)
    drain.start()
    wait_until(lambda: len(drained.records) == 1, what="the old stream's unread change")
    assert drain.stop() is True
    moved, moved_sink = build(table_name=None, stream_arn=new.arn)
    moved.start()
    wait_until(lambda: len(moved_sink.records) == 1, what="the new stream's change")
    assert moved.stop() is True
    by_table, _ = build()  # by table name again: the new stream is now the one in use
    by_table.start()
    assert by_table.stream_arn == new.arn and by_table.fatal is None
    assert [r.keys["pk"] for r in drained.records + moved_sink.records] == ["b", "c"]


def test_a_stream_enabled_again_while_running_stops_the_pipeline_naming_both(
    simulator: StreamSimulator, build: Callable[..., tuple[Pipeline, MemorySink]]
) -> None:
    old = simulator.create_stream("orders", shards=1)
    pipeline, sink = build()
    pipeline.start()
    old.put_item(item("a"))
    wait_until(lambda: len(sink.records) == 1, what="a change")
    old.disable()
    new = simulator.create_stream("orders", shards=1)
    wait_until(lambda: pipeline.fatal is not None, timeout=10, what="the pipeline to notice")
    assert isinstance(pipeline.fatal, StreamChangedError)
    assert old.arn in str(pipeline.fatal) and new.arn in str(pipeline.fatal)
    assert any(old.arn in reason for reason in pipeline.metrics.health().reasons)
