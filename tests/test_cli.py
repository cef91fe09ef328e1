"""The `streamsink` command as an operator runs it: a subprocess, a TOML file, signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.ops.demo import _item
from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import read_archive, stream_records, unique, wait_until

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[source]\ntable_name = "t"\n[[sinks]]\ntype = "s3_parquet"\nbucket = "bkt"\nbuckt = "b"\n',
            "sinks[0].buckt: unknown key",
        ),
        ('[source]\ntable_name = "t"\n[[sinks]]\ntype = "kafka"\n', "sinks[0].type: must be one of s3_parquet"),
        (
            '[source]\ntable_name = "t"\nstarting_position = "EARLIEST"\n[[sinks]]\ntype = "memory"\n',
            "source.starting_position: Input should be 'TRIM_HORIZON', 'LATEST' or 'AT_TIMESTAMP' (got 'EARLIEST')",
        ),
        ('[source]\ntable_name = "t"\n[batch]\nmax_records = 0\n[[sinks]]\ntype = "memory"\n', "batch.max_records"),
        ("[source]\n[[sinks]]\ntype = 'memory'\n", "set exactly one of source.table_name or source.stream_arn"),
        ('[source]\ntable_name = "t"\n', "sinks: required key is missing"),
        ("[source\n", "not valid TOML"),
    ],
)
def test_a_bad_config_exits_2_with_one_line_naming_the_key(tmp_path: Path, body: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(body)
    done = subprocess.run([*STREAMSINK, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[source]\ntable_name = "t"\n[batch]\nmax_records = 5\n[[sinks]]\ntype = "memory"\n')
    env = {"STREAMSINK_BATCH__MAX_RECORDS": "77", "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*STREAMSINK, "validate", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert '"max_records": 77' in done.stdout


def test_sigterm_drains_flushes_and_checkpoints_then_exits_0(
    aws: EmbeddedAws, dynamodb: Any, table: str, bucket: str, tmp_path: Path
) -> None:
    checkpoints = unique("checkpoints")
    config = tmp_path / "run.toml"
    # The archive buffers for five minutes: only the shutdown flush can make these rows appear.
    config.write_text(
        f'[source]\ntable_name = "{table}"\nregion = "{aws.region}"\nendpoint_url = "{aws.endpoint_url}"\n'
        f'[checkpoint]\ntable_name = "{checkpoints}"\n'
        f"[reader]\nidle_poll_max_seconds = 0.2\n[batch]\nmax_wait_seconds = 0.2\n"
        f'[dead_letter]\npath = "{tmp_path / "dl.jsonl"}"\n'
        f'[[sinks]]\ntype = "s3_parquet"\nbucket = "{bucket}"\nprefix = "orders/"\nbuffer_max_seconds = 300\n'
    )
    process = subprocess.Popen(
        [*STREAMSINK, "run", "--config", str(config)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        for n in range(25):
            dynamodb.put_item(TableName=table, Item=_item(n))
        wait_until(lambda: bool(dynamodb.list_tables()["TableNames"].count(checkpoints)), what="the checkpoint table")
        time.sleep(2.0)  # let the readers take the changes into the pipeline's buffer
        assert process.poll() is None, "streamsink run exited before SIGTERM"
        assert read_archive(aws, bucket).num_rows == 0
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "SIGTERM received: draining" in stderr
    last = json.loads(stderr.strip().splitlines()[-1])["message"]  # the JSON log line the stop ends with
    assert re.fullmatch(
        rf"stopped: 25 change\(s\) read in this run, all checkpointed \(\d+ commit\(s\) to table {checkpoints}\); "
        r"delivered: s3_parquet 25; the next start goes on from there",
        last,
    ), last

    truth = stream_records(aws, table)
    archived = read_archive(aws, bucket).column("event_id").to_pylist()
    assert sorted(archived) == sorted(r["eventID"] for r in truth)
    store = CheckpointStore(
        dynamodb,
        table_name=checkpoints,
        stream_arn=dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"],
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    )
    last = max(int(r["dynamodb"]["SequenceNumber"]) for r in truth)
    assert [int(c.sequence_number or 0) for c in store.load().values()] == [last]


def test_demo_runs_end_to_end_and_says_ok() -> None:
    done = subprocess.run([*STREAMSINK, "demo", "--changes", "30"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sinks: archive, replica, queue, topic" in done.stdout
    assert "archive: 51 rows under s3://audit-archive/orders/, 51 distinct changes" in done.stdout
    assert "replica: 24 items, equal to the source table" in done.stdout
    assert "queue (sqs, change bodies): 51 messages, 51 distinct changes" in done.stdout
    assert "topic (sns -> sqs, dynamodb bodies): 51 messages, 51 distinct changes" in done.stdout
    assert "OK: 51 changes written; archive, replica, queue and topic each received all of them" in done.stdout
    # Progress as it goes: every step says what it does, stamped with the demo's own time.
    lines = done.stdout.splitlines()
    assert lines[0].endswith("installing streamsink and moto is not part of them")
    steps = [re.match(r"\[ *(\d+\.\d)s\] (.*)", line) for line in lines]
    said = [step.group(2) for step in steps if step]
    for expected in (
        "starting the embedded AWS stand-in",
        "sinks: archive, replica, queue, topic",
        "writing 51 changes to orders: 30 inserts",
        "wrote 51 changes",
        "stopping the pipeline",
        "stopped: 51 change(s) read in this run, all checkpointed",
        "reading every destination back",
    ):
        assert any(text.startswith(expected) for text in said), (expected, said)
    stamps = [float(step.group(1)) for step in steps if step]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("config/*.toml")), ids=lambda p: p.name)
def test_every_example_config_validates(path: Path) -> None:
    done = subprocess.run([*STREAMSINK, "validate", "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sinks"]
