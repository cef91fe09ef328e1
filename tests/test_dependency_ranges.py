"""The boto3/botocore range in pyproject.toml resolves at both ends, with a current s3fs.

Every aiobotocore release (s3fs's dependency) accepts only a narrow window of botocore versions, so a botocore
range is only true if pip can find an aiobotocore, and through it an s3fs, for its ends. pip is asked exactly
what an install would do (`pip install --dry-run --report`, ignoring what this environment has) for the
project's dependencies with boto3 and botocore held at the lowest, then the highest, version the range allows.
When the range was set, both ends resolved s3fs 2026.9.0, the newest, with aiobotocore 2.19.0 and 3.10.0.

These tests need the package index: they are skipped, saying so, only when it cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
RANGED = ("boto3", "botocore")

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _dependencies() -> list[Requirement]:
    project: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def _requirement(name: str) -> Requirement:
    (found,) = [r for r in _dependencies() if r.name == name]
    return found


def _ends(requirement: Requirement) -> tuple[str, str]:
    """The range's lowest and highest versions: it is stated as `>=LOW,<=HIGH` so both are known exactly."""
    bounds = {spec.operator: spec.version for spec in requirement.specifier}
    assert set(bounds) == {">=", "<="}, f"{requirement}: state the range as >=LOW,<=HIGH"
    return bounds[">="], bounds["<="]


def _index_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/s3fs/", timeout=10).close()
    except (urllib.error.URLError, OSError):
        return False
    return True


def _resolve(pins: list[str]) -> dict[str, Version]:
    """What `pip install` of the project's dependencies plus `pins` would install: name -> version."""
    if not _index_reachable():
        pytest.skip("the package index (PyPI) cannot be reached")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", "-"]
    command += ["--no-input", "--disable-pip-version-check", *(str(r) for r in _dependencies()), *pins]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"pip cannot resolve {pins}:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    return {item["metadata"]["name"].lower(): Version(item["metadata"]["version"]) for item in report["install"]}


def test_boto3_and_botocore_share_one_range() -> None:
    """boto3 X.Y.Z requires botocore X.Y.Z's minor series: two different ranges would have dead ends."""
    assert _ends(_requirement("boto3")) == _ends(_requirement("botocore"))
    s3fs = _requirement("s3fs")
    assert any(spec.operator == ">=" for spec in s3fs.specifier), "without a lower bound pip falls back to s3fs 0.4.2"


@pytest.mark.parametrize("end", ["lowest", "highest"])
def test_each_end_of_the_range_resolves_with_a_current_s3fs(end: str) -> None:
    low, high = _ends(_requirement("boto3"))
    version = low if end == "lowest" else high
    resolved = _resolve([f"{name}=={version}" for name in RANGED])

    for name in RANGED:
        assert resolved[name] == Version(version)
    s3fs = _requirement("s3fs")
    assert resolved["s3fs"] in s3fs.specifier  # never the 2020 s3fs 0.4.2, which has no aiobotocore
    assert "aiobotocore" in resolved
