"""config/grafana-dashboard.json against a real `/metrics` scrape: every series a panel queries exists.

A pipeline reads a moto table into two real sinks (the archive and an SQS queue) with metrics on; `/metrics` is
scraped over HTTP, as Prometheus does. Each metric name in the dashboard's PromQL (panels and template
variables) must be a sample name in that scrape: `_total`, `_bucket`, `_sum` and `_count` are part of the
sample names Prometheus stores, so a query that forgets one (or names a metric that was renamed) fails here.
Label matchers must name labels the metric has, and `label="value"` a value it exports. Conversely, every
metric the pipeline exports is charted somewhere.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.runner import Pipeline
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import unique, wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana-dashboard.json"
# Added by Prometheus to every scraped series (and chosen through the dashboard's variables), not by /metrics.
TARGET_LABELS = {"job", "instance"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\b(streamsink_[A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

Labels = dict[str, set[str]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside it


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query))
    return found


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The metric selectors of a PromQL expression: (metric name, [(label, operator, value)]).

    Every metric of ours starts with `streamsink_`, and no PromQL function, keyword or label does, so the
    names are found without a full parser. Matcher values are read before string literals are blanked, so
    that a `"` or `}` inside a value cannot end a selector early.
    """
    selectors = []
    for match in _SELECTOR.finditer(_STRING.sub(lambda m: '"' + "x" * (len(m[0]) - 2) + '"', expr)):
        braces = expr[match.start(2) : match.end(2)] if match[2] else ""
        selectors.append((match[1], _MATCHER.findall(braces)))
    return selectors


def _scrape(port: int) -> dict[str, Labels]:
    """Sample name -> label -> the values seen, from a real scrape of `/metrics`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, Labels] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, defaultdict(set))
            for label, value in sample.labels.items():
                labels[label].add(value)
    return samples


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return _dashboard()


@pytest.fixture
def scrape(aws: EmbeddedAws, table: str, bucket: str, make_settings: Callable[..., Settings]) -> dict[str, Labels]:
    """A scrape of a pipeline that has read, delivered to two sinks and checkpointed."""
    queue_url = aws.client("sqs").create_queue(QueueName=unique("changes"))["QueueUrl"]
    dynamodb = aws.client("dynamodb")
    for n in range(20):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": f"p{n}"}, "sk": {"S": "s"}})
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "p0"}, "sk": {"S": "s"}})
    sinks = [
        {"type": "s3_parquet", "name": "archive", "bucket": bucket, "prefix": "orders/", "buffer_max_seconds": 0.2},
        {"type": "sqs", "name": "queue", "queue_url": queue_url},
    ]
    # With an initial load, so that its series are exported too (the 20 items copied beside the 21 changes).
    pipeline = Pipeline(
        make_settings(metrics={"port": 0, "host": "127.0.0.1"}, sinks=sinks, source={"initial_load": "scan"})
    )
    pipeline.start()
    try:
        assert pipeline.metrics_server is not None
        wait_until(
            lambda: (
                pipeline.fatal is not None
                or (
                    pipeline.stats.checkpoints_written > 0
                    and sum(n for name, n in pipeline.stats.events.items() if name != "SNAPSHOT") == 21
                    and pipeline.stats.events["SNAPSHOT"] == 19
                )
            ),
            what="21 changes and 19 copied items delivered and checkpointed",
        )
        assert pipeline.fatal is None, pipeline.fatal
        return _scrape(pipeline.metrics_server.port)
    finally:
        pipeline.stop()


def test_the_dashboard_imports_with_any_prometheus_data_source(dashboard: dict[str, Any]) -> None:
    """Grafana's import and file provisioning both accept it: the data source is a variable, never a uid."""
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": f"${{{datasource['name']}}}"}
    panels = list(_panels(dashboard["panels"]))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == reference, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == reference, panel["title"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and "id" not in dashboard  # an id would clash with an existing dashboard's


def test_every_query_names_series_a_real_scrape_has(dashboard: dict[str, Any], scrape: dict[str, Labels]) -> None:
    problems = []
    for where, expr in _queries(dashboard):
        selectors = _selectors(expr)
        if not selectors:
            problems.append(f"{where}: no streamsink metric in {expr!r}")
        for name, matchers in selectors:
            if name not in scrape:
                problems.append(f"{where}: {name} is not in /metrics")
                continue
            for label, operator, value in matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in scrape[name]:
                    problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(scrape[name])})")
                elif operator == "=" and value not in scrape[name][label]:
                    problems.append(f"{where}: {name}{{{label}={value!r}}} is not in /metrics")
    assert not problems, "\n".join(problems)


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any], scrape: dict[str, Labels]) -> None:
    """A metric added to pipeline/ops/metrics.py gets a panel (or this list of what is left out, with why)."""
    queried = {name for _, expr in _queries(dashboard) for name, _ in _selectors(expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in scrape}
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    # `_created` samples are the time each counter or histogram started: no chart needs them.
    assert families - charted == set()


def test_metric_names_are_found_in_promql() -> None:
    """The selector reader itself, on the shapes the dashboard uses."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(streamsink_batch_records_bucket{job=~"$job"}[5m]))) / '
        'sum(rate(streamsink_getrecords_calls_total{result="empty", note="a}b"}[$__rate_interval]))'
    )
    assert _selectors(expr) == [
        ("streamsink_batch_records_bucket", [("job", "=~", "$job")]),
        ("streamsink_getrecords_calls_total", [("result", "=", "empty"), ("note", "=", "a}b")]),
    ]
    assert _selectors("label_values(streamsink_records_read_total, job)") == [("streamsink_records_read_total", [])]
