"""Initial-load settings an operator gets wrong are one line from `streamsink validate` naming the key to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from tests.test_cli_errors import only_line
from tests.test_crash_safety import write_config

CONFIG_ERROR = "streamsink: config error: "


def _config(tmp_path: Path, initial_load: str, **load: Any) -> Path:
    sections: dict[str, Any] = {"source": {"table_name": "orders", "initial_load": initial_load}}
    if load:
        sections["initial_load"] = load
    return write_config(tmp_path / "config.toml", {**sections, "sinks": [{"type": "memory"}]})


def test_an_export_load_with_nowhere_to_export_to_names_export_bucket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--config", str(_config(tmp_path, "export"))]) == 2
    line = only_line(capsys.readouterr().err)
    assert line.startswith(CONFIG_ERROR + "initial_load.export_bucket: required with source.initial_load = 'export'")
    assert "initial_load.export_arn" in line  # the other way to fix it


@pytest.mark.parametrize(
    "load",
    [
        {"export_bucket": "exports-bucket"},
        {"export_arn": "arn:aws:dynamodb:us-east-1:123456789012:table/orders/export/01700000000000-abcdef12"},
    ],
    ids=["bucket", "arn"],
)
def test_an_export_load_with_a_bucket_or_an_export_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], load: dict[str, str]
) -> None:
    assert main(["validate", "--config", str(_config(tmp_path, "export", **load))]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("segments", [0, 1001])
def test_segments_out_of_range_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], segments: int) -> None:
    assert main(["validate", "--config", str(_config(tmp_path, "scan", segments=segments))]) == 2
    line = only_line(capsys.readouterr().err)
    assert line.startswith(CONFIG_ERROR + "initial_load.segments: ")
    assert f"(got {segments})" in line
