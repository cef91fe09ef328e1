"""Mistakes an operator makes are one line naming the thing and the fix, never a traceback; a variable that looks
like a setting but sets nothing is a warning naming the one that would."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.testing.emulator import EmbeddedAws
from tests.conftest import unique
from tests.test_crash_safety import write_config

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]


def only_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--config", str(tmp_path)]) == 2
    assert only_line(capsys.readouterr().err) == (
        f"streamsink: config error: config file {str(tmp_path)!r} is a directory; give the path of a TOML file in it"
    )


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes('[source]\ntable_name = "café"\n'.encode("latin-1"))
    assert main(["run", "--config", str(config)]) == 2
    assert only_line(capsys.readouterr().err) == (
        f"streamsink: config error: config file {str(config)!r} is not UTF-8 text (byte 26 is 0xe9); save it as UTF-8"
    )


def test_demo_without_moto_says_how_to_install_the_extra_from_the_clone() -> None:
    # moto made unimportable, as in an install without the demo extra.
    script = "import sys; sys.modules['moto'] = None; from pipeline.cli import main; sys.exit(main(['demo']))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert only_line(done.stderr) == (
        "streamsink: demo: the embedded AWS stand-in needs moto, which is not installed; "
        'from the clone, run pip install -e ".[demo]"'
    )


def run_config(tmp_path: Path, aws: EmbeddedAws, table: str, **sections: dict[str, object]) -> Path:
    return write_config(
        tmp_path / "config.toml",
        {
            "source": {"table_name": table, "region": aws.region, "endpoint_url": aws.endpoint_url},
            "checkpoint": {"table_name": unique("checkpoints")},
            "runtime": {"log_format": "text", "log_level": "ERROR"},
            "dead_letter": {"path": str(tmp_path / "dl.jsonl")},
            **sections,
            "sinks": [{"type": "memory"}],
        },
    )


def test_a_missing_source_table_names_the_table_region_and_endpoint(
    aws: EmbeddedAws, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = unique("no-such-table")
    assert main(["run", "--config", str(run_config(tmp_path, aws, missing))]) == 1
    line = only_line(capsys.readouterr().err)
    assert line == (
        f"streamsink: cannot start: table {missing!r} not found in region {aws.region} at {aws.endpoint_url}; "
        "check the table name, the region and the endpoint"
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_metrics_port_in_use_names_metrics_port(
    aws: EmbeddedAws, table: str, tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_config(tmp_path, aws, table, metrics={"port": taken_port, "host": "127.0.0.1"})
    assert main(["run", "--config", str(config)]) == 1
    assert only_line(capsys.readouterr().err) == (
        f"streamsink: cannot start: metrics.port = {taken_port}: 127.0.0.1:{taken_port} is already in use (by "
        "another streamsink or another program); choose a free port, or 0 for any free one"
    )


def test_tail_with_something_that_is_not_a_stream_arn_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", "--stream-arn", "not-an-arn"]) == 2
    assert only_line(capsys.readouterr().err) == (
        "streamsink: tail: --stream-arn 'not-an-arn' is not a stream ARN: give one of the form "
        "arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL (the table's LatestStreamArn), or --table NAME"
    )


def validate_with_variable(tmp_path: Path, variable: str, value: str) -> subprocess.CompletedProcess[str]:
    """`streamsink validate` of a minimal config, in an environment of its own plus `variable`."""
    config = tmp_path / "c.toml"
    config.write_text('[source]\ntable_name = "t"\n[[sinks]]\ntype = "memory"\n')
    env = {"PATH": "/usr/bin:/bin", "AWS_DEFAULT_REGION": "us-east-1", variable: value}
    return subprocess.run(
        [*STREAMSINK, "validate", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("STREAMSINK_LOG_LEVEL", "did you mean STREAMSINK_RUNTIME__LOG_LEVEL?"),
        ("STREAMSINK_BATCH_MAX_RECORDS", "did you mean STREAMSINK_BATCH__MAX_RECORDS?"),
        ("STREAMSINK_REGION", "did you mean STREAMSINK_SOURCE__REGION or STREAMSINK_DEAD_LETTER__REGION?"),
        ("STREAMSINK_LOGGING__LEVEL", "use STREAMSINK_<SECTION>__<KEY> (sections: SOURCE, CHECKPOINT,"),
    ],
)
def test_a_variable_that_looks_like_a_setting_but_sets_nothing_is_a_warning_naming_the_form_that_works(
    tmp_path: Path, variable: str, suggestion: str
) -> None:
    done = validate_with_variable(tmp_path, variable, "DEBUG")
    assert done.returncode == 0, done.stderr
    assert only_line(done.stderr).startswith(
        f"streamsink: warning: environment variable {variable} configures nothing: {suggestion}"
    )
    assert json.loads(done.stdout)["runtime"]["log_level"] == "INFO"


def test_the_suggested_variable_works_and_is_not_warned_about(tmp_path: Path) -> None:
    done = validate_with_variable(tmp_path, "STREAMSINK_RUNTIME__LOG_LEVEL", "DEBUG")
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout)["runtime"]["log_level"] == "DEBUG"
