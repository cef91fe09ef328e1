"""The `streamsink` command: run, validate, demo, tail, status."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from pipeline.ops.console import ProgressLog, StatusLine, configure_logging
from pipeline.ops.demo import run_demo
from pipeline.ops.status import run_status
from pipeline.ops.tail import run_tail
from pipeline.runner import Pipeline
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
    tail = commands.add_parser("tail", help="print a table's changes as they happen (read-only, no checkpoints)")
    stream = tail.add_mutually_exclusive_group(required=True)
    stream.add_argument("--table", help="follow this table's latest stream")
    stream.add_argument("--stream-arn", help="follow this stream")
    tail.add_argument("--from", dest="start", choices=("latest", "trim-horizon"), default="latest")
    tail.add_argument("--format", choices=("summary", "record", "json"), default="summary")
    tail.add_argument("--limit", type=_positive_int, metavar="N", help="stop after N changes")
    tail.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="EXPR",
        help="e.g. 'event=MODIFY key.pk^=customer#'; repeatable",
    )
    tail.add_argument("--region")
    tail.add_argument("--endpoint-url")
    status = commands.add_parser("status", help="each shard's state, checkpoint and lag (read-only)")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="a JSON document instead of a table")
    status.add_argument(
        "--count-behind",
        type=_positive_int,
        nargs="?",
        const=10_000,
        metavar="MAX",
        help="read ahead from each unfinished shard's checkpoint and count its records, up to MAX (10000)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _settings(path: str) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"streamsink: config error: {line}", file=sys.stderr)
        return None


def run(settings: Settings) -> int:
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
    shown: StatusLine | ProgressLog = (
        StatusLine(pipeline) if interactive else ProgressLog(pipeline, settings.runtime.progress_interval_seconds)
    ).start()
    while not stop.is_set() and not pipeline.wait(0.2):
        pass
    shown.stop()
    clean = pipeline.stop()
    if pipeline.fatal is not None:
        print(f"streamsink: stopped on error: {pipeline.fatal}", file=sys.stderr)
        return 1
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        configure_logging("WARNING", "text")
        return run_demo(changes=args.changes)
    if args.command == "tail":
        return run_tail(
            table_name=args.table,
            stream_arn=args.stream_arn,
            start="LATEST" if args.start == "latest" else "TRIM_HORIZON",
            fmt=args.format,
            limit=args.limit,
            filters=args.filter,
            region=args.region,
            endpoint_url=args.endpoint_url,
        )
    settings = _settings(args.config)
    if settings is None:
        return 2
    if args.command == "validate":
        print(settings.model_dump_json(indent=2))
        return 0
    if args.command == "status":
        return run_status(settings, as_json=args.json, count_cap=args.count_behind)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
