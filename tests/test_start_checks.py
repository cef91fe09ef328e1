"""Start-up says what failed: a passing S3 error is retried rather than reported as a missing bucket, and the
dead-letter destination is checked like a sink, its errors naming it as the dead-letter destination."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.delivery.dead_letter import DeadLetterError
from pipeline.ops.demo import _item
from pipeline.runner import Pipeline, SinkOpenError
from pipeline.settings import Settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError
from sinks.memory import FlakySink
from tests.conftest import unique, wait_until
from tests.fault_proxy import SLOW_DOWN, FaultProxy, s3_bucket
from tests.test_crash_safety import write_config


@pytest.fixture
def proxy(aws: EmbeddedAws) -> Iterator[FaultProxy]:
    with FaultProxy(aws.endpoint_url) as running:
        yield running


def test_a_passing_s3_error_at_start_is_retried_not_called_a_missing_bucket(
    bucket: str, proxy: FaultProxy, make_settings: Callable[..., Settings]
) -> None:
    proxy.inject(s3_bucket(bucket), SLOW_DOWN, times=2)
    settings = make_settings(sinks=[{"type": "s3_parquet", "bucket": bucket, "endpoint_url": proxy.endpoint_url}])
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        assert proxy.faults["status"] == 2
        assert pipeline.fatal is None
    finally:
        assert pipeline.stop() is True


def test_a_missing_bucket_fails_the_start_naming_the_sink_the_bucket_and_where_it_looked(
    aws: EmbeddedAws, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(sinks=[{"type": "s3_parquet", "name": "archive", "bucket": "no-such-bucket-here"}])
    with pytest.raises(SinkOpenError) as raised:
        Pipeline(settings).start()
    message = str(raised.value)
    assert "sink archive" in message and "'no-such-bucket-here' does not exist" in message
    assert aws.region in message and aws.endpoint_url in message


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"destination": "sqs", "queue_url": "http://127.0.0.1:1/123456789012/nope"}, "dead-letter SQS queue"),
        ({"destination": "s3", "bucket": "no-such-dead-letter-bucket"}, "dead-letter bucket"),
    ],
    ids=["sqs", "s3"],
)
def test_a_dead_letter_destination_that_is_missing_fails_the_start_naming_it(
    aws: EmbeddedAws, make_settings: Callable[..., Settings], section: dict[str, str], named: str
) -> None:
    if section["destination"] == "sqs":  # a queue URL on the moto server that names no queue
        section = {**section, "queue_url": f"{aws.endpoint_url}/123456789012/{unique('missing')}"}
    settings = make_settings(dead_letter=section)
    with pytest.raises(DeadLetterError, match=named):
        Pipeline(settings).start()


def test_a_dead_letter_file_that_cannot_be_written_fails_the_start_as_one_line(
    aws: EmbeddedAws, table: str, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory should be")
    config = write_config(
        tmp_path / "config.toml",
        {
            "source": {"table_name": table, "region": aws.region, "endpoint_url": aws.endpoint_url},
            "dead_letter": {"path": str(blocker / "dead-letters.jsonl")},
            "runtime": {"log_format": "text"},
            "sinks": [{"type": "s3_parquet", "bucket": bucket}],
        },
    )
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("streamsink: cannot start: dead-letter file ") and "dead_letter.path" in line
    assert "NotADirectoryError" in line and "Traceback" not in err


def test_a_later_dead_letter_failure_names_the_dead_letter_destination(
    aws: EmbeddedAws, dynamodb: Any, table: str, make_settings: Callable[..., Settings]
) -> None:
    sqs = aws.client("sqs")
    queue_url = sqs.create_queue(QueueName=unique("dead-letters"))["QueueUrl"]
    sink = FlakySink("copy", refuse=lambda _record: PermanentSinkError("refused"))
    settings = make_settings(dead_letter={"destination": "sqs", "queue_url": queue_url})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    try:
        sqs.delete_queue(QueueUrl=queue_url)  # the destination goes away for good while the pipeline runs
        dynamodb.put_item(TableName=table, Item=_item(1))
        wait_until(lambda: pipeline.fatal is not None, what="the pipeline to stop")
    finally:
        pipeline.stop()
    assert isinstance(pipeline.fatal, DeadLetterError)
    assert str(pipeline.fatal).startswith(f"dead-letter SQS queue {queue_url}")
    assert pipeline.stats.committed == {}  # the refused record is read again once the destination is fixed
