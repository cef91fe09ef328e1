"""streamsink finds its region and credentials where every AWS tool does, and `validate` prints the configuration
as it will run: the region resolved, every sink and the dead-letter destination with the region and endpoint
they inherit. Each test gives the command its whole environment (and an AWS config file of its own), so the
machine's own AWS setup cannot decide the outcome."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest

from pipeline.ops.demo import _item
from pipeline.testing.emulator import DUMMY_CREDENTIALS, EmbeddedAws, create_stream_table
from tests.conftest import unique, wait_until
from tests.test_crash_safety import write_config

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]


def aws_environment(tmp_path: Path, aws_config: str = "", **variables: str) -> dict[str, str]:
    """An environment with no AWS setup but an AWS config file holding `aws_config`, plus `variables`."""
    config_file = tmp_path / "aws-config"
    config_file.write_text(aws_config)
    credentials_file = tmp_path / "aws-credentials"
    credentials_file.write_text("")
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(config_file),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials_file),
        "AWS_EC2_METADATA_DISABLED": "true",
        **DUMMY_CREDENTIALS,
        **variables,
    }


def streamsink(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STREAMSINK, *args], capture_output=True, text=True, timeout=60, env=env)


def no_region_config(tmp_path: Path, **dead_letter: Any) -> Path:
    """A config that names no region: one sink inherits everything, one has its own region."""
    return write_config(
        tmp_path / "config.toml",
        {
            "source": {"table_name": "orders", "endpoint_url": "http://127.0.0.1:4566"},
            "dead_letter": dead_letter or {"path": str(tmp_path / "dl.jsonl")},
            "sinks": [
                {"type": "s3_parquet", "name": "archive", "bucket": "audit"},
                {
                    "type": "sqs",
                    "name": "queue",
                    "queue_url": "https://sqs.ap-south-1.amazonaws.com/123456789012/changes",
                    "region": "ap-south-1",
                },
            ],
        },
    )


@pytest.mark.parametrize(
    ("variables", "aws_config", "expected"),
    [
        ({"AWS_REGION": "eu-west-2", "AWS_DEFAULT_REGION": "us-west-1"}, "", "eu-west-2"),
        ({"AWS_DEFAULT_REGION": "us-west-1"}, "", "us-west-1"),
        ({"AWS_PROFILE": "ops"}, "[profile ops]\nregion = sa-east-1\n", "sa-east-1"),
        ({}, "[default]\nregion = ca-central-1\n", "ca-central-1"),
    ],
    ids=["AWS_REGION-before-AWS_DEFAULT_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "default-profile"],
)
def test_validate_resolves_an_unset_region_as_aws_tools_do_and_fills_in_what_is_inherited(
    tmp_path: Path, variables: dict[str, str], aws_config: str, expected: str
) -> None:
    config = no_region_config(
        tmp_path, destination="sqs", queue_url="https://sqs.eu-west-2.amazonaws.com/123456789012/dead-letters"
    )
    done = streamsink("validate", "--config", str(config), env=aws_environment(tmp_path, aws_config, **variables))
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["source"]["region"] == expected
    archive, queue = resolved["sinks"]
    assert (archive["region"], archive["endpoint_url"]) == (expected, "http://127.0.0.1:4566")
    assert (queue["region"], queue["endpoint_url"]) == ("ap-south-1", "http://127.0.0.1:4566")
    assert (resolved["dead_letter"]["region"], resolved["dead_letter"]["endpoint_url"]) == (
        expected,
        "http://127.0.0.1:4566",
    )


def test_no_region_anywhere_is_one_line_saying_where_to_set_it(tmp_path: Path) -> None:
    env = aws_environment(tmp_path)
    for command in ("validate", "run", "status"):
        done = streamsink(command, "--config", str(no_region_config(tmp_path)), env=env)
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.splitlines() == [
            "streamsink: config error: source.region: not set, and no region in AWS_REGION, AWS_DEFAULT_REGION or "
            f"profile 'default' of {env['AWS_CONFIG_FILE']}; set source.region (or AWS_REGION, e.g. "
            "AWS_REGION=us-east-1)"
        ], command
    done = streamsink("tail", "--table", "orders", env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "streamsink: tail: --region: not set, and no region in AWS_REGION, AWS_DEFAULT_REGION or profile 'default' "
        f"of {env['AWS_CONFIG_FILE']}; set --region (or AWS_REGION, e.g. AWS_REGION=us-east-1)"
    ]


def test_an_aws_profile_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    done = streamsink(
        "validate", "--config", str(no_region_config(tmp_path)), env=aws_environment(tmp_path, AWS_PROFILE="nope")
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "streamsink: config error: source.region: not set, and profile 'nope' (AWS_PROFILE) is not in the AWS "
        "config files; fix AWS_PROFILE, or set source.region or AWS_REGION"
    ]


def test_run_reads_and_delivers_in_the_region_aws_region_names(aws: EmbeddedAws, tmp_path: Path) -> None:
    """moto keeps each region apart, as AWS does: a table, checkpoint table and queue made in eu-west-2 are found
    only by a pipeline that took its region from AWS_REGION (AWS_DEFAULT_REGION says otherwise)."""
    region = "eu-west-2"

    def client(service: str) -> Any:
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=aws.endpoint_url,
            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    table, checkpoints = unique("orders"), unique("checkpoints")
    create_stream_table(client("dynamodb"), table)
    queue_url = client("sqs").create_queue(QueueName=unique("changes"))["QueueUrl"]
    config = write_config(
        tmp_path / "config.toml",
        {
            "source": {"table_name": table, "endpoint_url": aws.endpoint_url},
            "checkpoint": {"table_name": checkpoints},
            "reader": {"idle_poll_max_seconds": 0.2},
            "batch": {"max_wait_seconds": 0.2},
            "runtime": {"log_format": "json"},
            "dead_letter": {"path": str(tmp_path / "dl.jsonl")},
            "sinks": [{"type": "sqs", "queue_url": queue_url}],
        },
    )
    env = aws_environment(tmp_path, AWS_REGION=region, AWS_DEFAULT_REGION="us-east-1")
    process = subprocess.Popen(
        [*STREAMSINK, "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client("dynamodb").put_item(TableName=table, Item=_item(1))
        received: list[dict[str, Any]] = []

        def delivered() -> bool:
            assert process.poll() is None, process.communicate()[1]
            received.extend(client("sqs").receive_message(QueueUrl=queue_url).get("Messages", []))
            return bool(received)

        wait_until(delivered, what="the change in the eu-west-2 queue")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert json.loads(received[0]["Body"])["keys"] == {"pk": "customer#1", "sk": "order#00001"}
    assert checkpoints in client("dynamodb").list_tables()["TableNames"]
    assert f"arn:aws:dynamodb:{region}:" in stderr
