"""`streamsink --version`, and help text for every option of every command."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

from pipeline.cli import _parser

STREAMSINK = [sys.executable, "-m", "pipeline.cli"]


def test_version_is_the_installed_package_version() -> None:
    done = subprocess.run([*STREAMSINK, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"streamsink {importlib.metadata.version('streamsink')}"


def _commands(parser: argparse.ArgumentParser, name: str = "streamsink") -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and, depth first, every subcommand's parser, with the command line that reaches it."""
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                found += _commands(subparser, f"{name} {command}")
    return found


def test_every_command_and_every_option_has_help_text() -> None:
    commands = _commands(_parser())
    assert {name for name, _ in commands} >= {
        "streamsink",
        "streamsink run",
        "streamsink validate",
        "streamsink demo",
        "streamsink tail",
        "streamsink status",
    }
    missing = []
    for name, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                # each command's one-line summary in `streamsink --help`
                missing += [f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help]
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
