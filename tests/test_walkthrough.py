"""README "Try it locally", run as a newcomer would paste it.

The section's shell blocks are marked with an HTML comment, `<!-- walkthrough: terminal N -->` (`, keeps
running` for a command that runs until Ctrl-C, `, needs duckdb` for the optional DuckDB step). They run in their
order, in a temporary directory holding a copy of `config/local-moto.toml`, each terminal keeping the variables
its blocks export. The only change to the text is the port: `5000`, in the blocks and the config, becomes a free
port, so the test never collides with a moto server someone runs. A block that keeps running is started in its
own process group and gets SIGINT, as Ctrl-C sends it, when its terminal's next block comes (or at the end).
`status` is run again until it shows the checkpoint, as the README tells its reader to. Without duckdb installed
(it is not a dependency) only the DuckDB step is left out.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import boto3
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from tests.conftest import read_stream, wait_until

ROOT = Path(__file__).resolve().parents[1]
README_PORT = "5000"
MARKER = "<!-- walkthrough:"
BLOCK = re.compile(r"<!-- walkthrough: terminal (\d+)((?:, [a-z ]+)*) -->\n```sh\n(.*?)```\n", re.S)
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@dataclass(frozen=True, slots=True)
class Block:
    terminal: int
    keeps_running: bool
    needs: str | None
    """A module the block imports that streamsink does not depend on."""
    script: str


def walkthrough_blocks(readme: str) -> list[Block]:
    section = readme.split("\n## Try it locally\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for match in BLOCK.finditer(section):
        options = [option.strip() for option in match.group(2).split(",") if option.strip()]
        needs = [option.removeprefix("needs ") for option in options if option.startswith("needs ")]
        blocks.append(Block(int(match.group(1)), "keeps running" in options, needs[0] if needs else None, match[3]))
    assert len(blocks) == section.count(MARKER), "a walkthrough marker that is not followed by a ```sh block"
    return blocks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Terminal:
    """One of the reader's terminals: the variables its blocks export carry on to its later blocks."""

    def __init__(self, number: int, cwd: Path, env: dict[str, str]) -> None:
        self.number = number
        self.cwd = cwd
        self.env = dict(env)
        self.running: subprocess.Popen[str] | None = None
        self.output: IO[str] | None = None
        self.log: Path = cwd / f"terminal-{number}.log"
        self._env_file = cwd / f".terminal-{number}.env"

    def run(self, script: str) -> str:
        """The block as typed at the prompt, stopping at the first failing command; returns its output."""
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", f"{script}\nenv -0 > {shlex.quote(str(self._env_file))}\n"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"terminal {self.number}: {script}\n{done.stdout}\n{done.stderr}"
        self.env = dict(entry.split("=", 1) for entry in self._env_file.read_text().split("\0") if "=" in entry)
        return done.stdout

    def start(self, script: str) -> None:
        self.output = self.log.open("w")
        self.running = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the terminal's foreground process group; returns the exit code."""
        assert self.running is not None
        os.killpg(self.running.pid, signal.SIGINT)
        try:
            return self.running.wait(timeout=40)
        finally:
            if self.output is not None:
                self.output.close()
            self.running = None

    def kill(self) -> None:
        if self.running is not None and self.running.poll() is None:
            os.killpg(self.running.pid, signal.SIGKILL)
            self.running.wait(timeout=10)


@pytest.fixture
def terminals() -> Iterator[dict[int, Terminal]]:
    """The test's terminals; what still runs in them when the test fails midway is killed."""
    opened: dict[int, Terminal] = {}
    yield opened
    for terminal in opened.values():
        terminal.kill()


def run_until_shown(terminal: Terminal, script: str, wanted: str) -> str:
    """The block run again until its output holds `wanted`, as a reader runs `status` again."""
    shown: list[str] = []

    def has_it() -> bool:
        shown.append(terminal.run(script))
        return wanted in shown[-1]

    wait_until(has_it, what=f"{script.strip()!r} showing {wanted.strip()!r}")
    return shown[-1]


def newcomer_env() -> dict[str, str]:
    """The machine's environment without anything AWS or streamsink: the README's exports must be enough. The
    venv's `python`, `streamsink` and `moto_server` come first on PATH, as with the venv activated."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STREAMSINK_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull  # no profile of this machine
    return env


def stream_records(endpoint_url: str, table: str) -> list[dict[str, Any]]:
    return read_stream(
        boto3.client("dynamodb", endpoint_url=endpoint_url, **CREDENTIALS),
        boto3.client("dynamodbstreams", endpoint_url=endpoint_url, **CREDENTIALS),
        table,
    )


def archived_event_ids(endpoint_url: str) -> list[str]:
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint_url,
        access_key=CREDENTIALS["aws_access_key_id"],
        secret_key=CREDENTIALS["aws_secret_access_key"],
        region=CREDENTIALS["region_name"],
    )
    archive = ds.dataset("audit-archive/orders/", filesystem=s3, format="parquet", partitioning="hive")
    return [str(event_id) for event_id in archive.to_table(columns=["event_id"])["event_id"].to_pylist()]


def table_cells(output: str) -> list[list[str]]:
    """DuckDB's boxed table as rows of cells."""
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in output.splitlines() if "│" in line]


@pytest.mark.slow
def test_the_try_it_locally_section_runs_as_written(tmp_path: Path, terminals: dict[int, Terminal]) -> None:
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"

    def localized(text: str) -> str:
        return re.sub(rf"\b{README_PORT}\b", str(port), text)

    (tmp_path / "config").mkdir()
    config = (ROOT / "config" / "local-moto.toml").read_text()
    (tmp_path / "config" / "local-moto.toml").write_text(localized(config))
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    env = newcomer_env()
    outputs: list[tuple[Block, str]] = []
    exit_codes: dict[str, int] = {}

    for block in blocks:
        if block.needs is not None and importlib.util.find_spec(block.needs) is None:
            continue
        terminal = terminals.setdefault(block.terminal, Terminal(block.terminal, tmp_path, env))
        if terminal.running is not None:  # the reader presses Ctrl-C before typing the next command there
            stopped = terminal.running.args[-1]
            exit_codes[stopped] = terminal.interrupt()
        script = localized(block.script)
        if block.keeps_running:
            terminal.start(script)
            if "moto_server" in script:
                wait_until(lambda: listening(port), what=f"moto_server on port {port}")
            continue
        if script.startswith("streamsink status"):
            last = max(stream_records(endpoint_url, "orders"), key=lambda r: int(r["dynamodb"]["SequenceNumber"]))
            wanted = f"  {last['dynamodb']['SequenceNumber']}  "
            outputs.append((block, run_until_shown(terminal, script, wanted)))
            continue
        outputs.append((block, terminal.run(script)))
    # What moto holds, read directly, before the reader stops it and it forgets everything.
    records = stream_records(endpoint_url, "orders")
    archived = archived_event_ids(endpoint_url)
    for terminal in terminals.values():
        if terminal.running is not None:
            stopped = terminal.running.args[-1]
            exit_codes[stopped] = terminal.interrupt()

    def output_of(command: str) -> str:
        return next(out for block, out in outputs if command in block.script)

    run_log = (tmp_path / "terminal-2.log").read_text()
    assert exit_codes[localized("streamsink run --config config/local-moto.toml\n")] == 0, run_log
    assert "Traceback" not in run_log

    # tail printed the seven changes, in the order they were made.
    tail_output = output_of("streamsink tail")
    assert [line.split("] ", 1)[1] for line in tail_output.splitlines()] == [
        *(f"INSERT  pk=customer#{n}, sk=order#1" for n in range(1, 6)),
        "MODIFY  pk=customer#1, sk=order#1",
        "REMOVE  pk=customer#5, sk=order#1",
    ]
    assert all(re.match(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] ", line) for line in tail_output.splitlines())

    # status showed the shard's checkpoint at the last change.
    last = max(records, key=lambda r: int(r["dynamodb"]["SequenceNumber"]))
    status_rows = [line.split() for line in output_of("streamsink status").splitlines() if line.startswith("shard")]
    assert [row[2:4] for row in status_rows] == [["open", last["dynamodb"]["SequenceNumber"]]]

    # The archive holds every change, once; the queue got a message for each; both read-backs say so.
    assert sorted(archived) == sorted(r["eventID"] for r in records)
    read_back = next(out for block, out in outputs if "pyarrow.dataset" in block.script and block.needs is None)
    assert read_back.splitlines() == [
        "messages in the queue: 7",
        "[{'event_name': 'INSERT', 'event_id_count': 5}, {'event_name': 'MODIFY', 'event_id_count': 1}, "
        "{'event_name': 'REMOVE', 'event_id_count': 1}]",
    ]
    duckdb_output = [out for block, out in outputs if block.needs == "duckdb"]
    if importlib.util.find_spec("duckdb") is not None:
        (query,) = duckdb_output
        assert table_cells(query)[2:] == [
            ["customer#1", "MODIFY", "10", "true"],
            ["customer#5", "REMOVE", "50", "NULL"],
        ]
