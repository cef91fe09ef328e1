"""No item value reaches logs, `/healthz` or metrics, whichever way a record is refused.

An item carries a canary value. It is refused every way a record can be: a `record_transform` raising with the
value in its message; a replica `transform` returning a value boto3 cannot serialize (its TypeError quotes the
value); the destination answering 400 and 500 with the value quoted in its message (as services do for some
validation errors); and, in block mode, the stop those refusals cause. Every log line (at DEBUG, through the
pipeline's own logging set-up), every scrape of `/metrics` and `/healthz`, and the fatal error are searched for
it. The dead-letter destination, which holds item data by design, still carries the refused payloads, except
where the refusing step was the sink's `record_transform` (which may be the masking step).
"""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.ops.console import configure_logging
from pipeline.records import ChangeRecord
from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import unique, wait_until
from tests.fault_proxy import Fault, FaultProxy, any_request

CANARY = "canary-5a1f-do-not-log"


class _Unstorable:
    def __repr__(self) -> str:
        return CANARY


def leaky_record_transform(record: ChangeRecord) -> ChangeRecord:
    raise ValueError(f"cannot mask {record.new_image['secret'] if record.new_image else ''}")


def unstorable_view(record: ChangeRecord) -> dict[str, Any]:
    return {**record.keys, "secret": _Unstorable()}


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Everything the pipeline logs, as `streamsink run` sets logging up, at DEBUG."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", buffer)
    yield buffer
    for handler in root.handlers:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _replica(dynamodb: Any) -> str:
    name = unique("replica")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("pk", "sk")],
    )
    return name


def _scrape(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as unhealthy:
        return str(unhealthy.read().decode())


def _secret_item(n: int) -> dict[str, Any]:
    return {"pk": {"S": f"customer#{n}"}, "sk": {"S": "profile"}, "secret": {"S": f"{CANARY}-{n}"}}


HERE = "tests.test_no_values_in_output"


def test_no_refusal_path_puts_an_item_value_in_logs_health_or_metrics(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    proxy: FaultProxy,
    tmp_path: Path,
    output: io.StringIO,
    make_settings: Callable[..., Settings],
) -> None:
    quoted, refused = _replica(dynamodb), _replica(dynamodb)
    settings = make_settings(
        metrics={"port": 0, "host": "127.0.0.1"},
        retry={"max_attempts": 3, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05},
        sinks=[
            {"type": "memory", "name": "masked", "record_transform": f"{HERE}:leaky_record_transform"},
            {"type": "dynamodb_table", "name": "view", "table_name": quoted, "transform": f"{HERE}:unstorable_view"},
            {"type": "dynamodb_table", "name": "quoting", "table_name": refused, "endpoint_url": proxy.endpoint_url},
        ],
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    assert pipeline.metrics_server is not None
    port = pipeline.metrics_server.port
    scraped: list[str] = []
    try:
        # The destination first fails retryably, quoting the value, then refuses for good, quoting it again.
        retrying = proxy.inject(any_request, Fault("status", 500, "InternalServerError", message=f"busy: {CANARY}"))
        for n in range(3):
            dynamodb.put_item(TableName=table, Item=_secret_item(n))
        wait_until(lambda: proxy.faults["status"] >= 6, what="retries quoting the value")
        scraped += [_scrape(port, "/metrics"), _scrape(port, "/healthz")]
        proxy.clear(retrying)
        proxy.inject(any_request, Fault("status", 400, "ValidationException", message=f"bad value {CANARY}"))
        wait_until(lambda: sum(pipeline.delivery.stats.dead_lettered.values()) >= 9, what="every refusal")
        scraped += [_scrape(port, "/metrics"), _scrape(port, "/healthz")]
    finally:
        proxy.clear()
        assert pipeline.stop() is True
    assert pipeline.delivery.stats.dead_lettered == {"masked": 3, "view": 3, "quoting": 3}

    logged = output.getvalue()
    assert "InternalServerError" in logged and "refused 3 record(s)" in logged  # the refusals are in the log
    assert CANARY not in logged
    assert all(CANARY not in text for text in scraped)
    assert "streamsink_records_dead_lettered_total" in scraped[-2]

    letters = [json.loads(line) for line in Path(settings.dead_letter.path).read_text().splitlines()]
    by_sink: dict[str, list[dict[str, Any]]] = {}
    for letter in letters:
        by_sink.setdefault(letter["sink"], []).append(letter)
    # A sink's refusal keeps the payload and the service's words; a record_transform's keeps neither.
    assert all(CANARY in json.dumps(letter["record"]) for letter in by_sink["quoting"] + by_sink["view"])
    assert all(f"bad value {CANARY}" in letter["error"] for letter in by_sink["quoting"])
    assert all(letter["record"] is None and CANARY not in json.dumps(letter) for letter in by_sink["masked"])


def test_a_block_mode_stop_names_the_record_not_its_values(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    output: io.StringIO,
    make_settings: Callable[..., Settings],
) -> None:
    view = _replica(dynamodb)
    settings = make_settings(
        metrics={"port": 0, "host": "127.0.0.1"},
        dead_letter={"on_failure": "block"},
        sinks=[{"type": "dynamodb_table", "table_name": view, "transform": f"{HERE}:unstorable_view"}],
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    assert pipeline.metrics_server is not None
    try:
        dynamodb.put_item(TableName=table, Item=_secret_item(1))
        wait_until(lambda: pipeline.fatal is not None, what="the block")
        health = _scrape(pipeline.metrics_server.port, "/healthz")
    finally:
        pipeline.stop()
    assert "on_failure = 'block' stops here" in str(pipeline.fatal) and "TypeError" in str(pipeline.fatal)
    assert "stopped on error" in health
    for text in (str(pipeline.fatal), health, output.getvalue()):
        assert CANARY not in text
