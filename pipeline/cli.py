"""The `streamsink` command: run, validate, demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from pipeline.settings import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsink", description="DynamoDB Streams replication pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, help="TOML file; STREAMSINK_<SECTION>__<KEY> env vars override")
    check = commands.add_parser("validate", help="check a config file and print it resolved")
    check.add_argument("--config", required=True)
    demo = commands.add_parser("demo", help="run end to end against an embedded AWS stand-in (moto)")
    demo.add_argument("--changes", type=int, default=200, help="items to insert (updates and deletes follow)")
    return parser


def _settings(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"streamsink: config error: {line}", file=sys.stderr)
        return None


def run(settings: Settings) -> int:
    from pipeline.console import StatusLine, configure_logging
    from pipeline.runner import Pipeline

    interactive = configure_logging(settings.runtime.log_level, settings.runtime.log_format)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("streamsink").info("%s received: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    pipeline = Pipeline(settings)
    try:
        pipeline.start()
    except Exception as exc:
        print(f"streamsink: cannot start: {exc}", file=sys.stderr)
        return 1
    status = StatusLine(pipeline).start() if interactive else None
    while not stop.is_set() and not pipeline.wait(0.2):
        pass
    if status is not None:
        status.stop()
    clean = pipeline.stop()
    if pipeline.fatal is not None:
        print(f"streamsink: stopped on error: {pipeline.fatal}", file=sys.stderr)
        return 1
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from pipeline.console import configure_logging
        from pipeline.demo import run_demo

        configure_logging("WARNING", "text")
        return run_demo(changes=args.changes)
    settings = _settings(args.config)
    if settings is None:
        return 2
    if args.command == "validate":
        print(settings.model_dump_json(indent=2))
        return 0
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
