"""The `streamsink` command: run, validate, demo, tail, status."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from pipeline.aws import STREAM_ARN_FORM
from pipeline.ops.console import ProgressLog, StatusLine, configure_logging
from pipeline.ops.demo import run_demo
from pipeline.ops.status import run_status
from pipeline.ops.tail import run_tail
from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, Settings, environment_warnings, load_settings
from pipeline.testing.emulator import EmulatorUnavailableError
from pipeline.version import version
from pipeline.workers import run_workers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsink", description="DynamoDB Streams replication pipeline.")
    parser.add_argument("--version", action="version", version=f"streamsink {version()}", help="print the version")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    run = commands.add_parser("run", help="run the pipeline until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, help="TOML file; STREAMSINK_<SECTION>__<KEY> env vars override")
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start N worker processes sharing the stream's shards through leases (one process uses about one "
        "core); SIGTERM drains them all (default 1)",
    )
    check = commands.add_parser("validate", help="check a config file and print it as it will run")
    check.add_argument(
        "--config",
        required=True,
        help="TOML file to check; printed with environment overrides applied and inherited regions and endpoints "
        "filled in",
    )
    demo = commands.add_parser("demo", help="run end to end against an embedded AWS stand-in (moto)")
    demo.add_argument("--changes", type=int, default=200, help="items to insert (updates and deletes follow)")
    tail = commands.add_parser("tail", help="print a table's changes as they happen (read-only, no checkpoints)")
    tail.add_argument(
        "--config",
        metavar="PATH",
        help="read the stream, region and endpoint from this TOML file's [source] section, as `run` does; "
        "--table, --stream-arn, --region and --endpoint-url override it",
    )
    stream = tail.add_mutually_exclusive_group()
    stream.add_argument("--table", help="follow this table's latest stream")
    stream.add_argument("--stream-arn", help=f"follow this stream ({STREAM_ARN_FORM})")
    tail.add_argument(
        "--from",
        dest="start",
        choices=("latest", "trim-horizon"),
        default="latest",
        help="latest (default): changes from now on; trim-horizon: also everything the stream still holds (24 hours)",
    )
    tail.add_argument(
        "--format",
        choices=("summary", "record", "json"),
        default="summary",
        help="summary (default): one line per change; record: with its images; json: the SQS/SNS `change` body",
    )
    tail.add_argument("--limit", type=_positive_int, metavar="N", help="stop after N changes")
    tail.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="EXPR",
        help="e.g. 'event=MODIFY key.pk^=customer#'; repeatable",
    )
    tail.add_argument(
        "--region",
        help="AWS region; default: the stream ARN's, else AWS_REGION, AWS_DEFAULT_REGION or the profile's",
    )
    tail.add_argument("--endpoint-url", metavar="URL", help="an AWS-compatible endpoint (moto, LocalStack)")
    status = commands.add_parser("status", help="each shard's state, checkpoint and lag (read-only)")
    status.add_argument(
        "--config",
        required=True,
        metavar="PATH",
        help="the pipeline's TOML file: its [source] section names the stream, its [checkpoint] section the "
        "checkpoint table and consumer; STREAMSINK_<SECTION>__<KEY> env vars override",
    )
    status.add_argument("--region", help="AWS region of the stream and checkpoint table (default: source.region)")
    status.add_argument(
        "--endpoint-url", help="an AWS-compatible endpoint such as moto or LocalStack (default: source.endpoint_url)"
    )
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
    for line in environment_warnings(os.environ):
        print(f"streamsink: warning: {line}", file=sys.stderr)
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
    try:
        pipeline = Pipeline(settings)
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
        try:
            return run_demo(changes=args.changes)
        except EmulatorUnavailableError as exc:
            print(f"streamsink: demo: {exc}", file=sys.stderr)
            return 1
    if args.command == "tail":
        source = None
        if args.config is not None:
            tail_settings = _settings(args.config)
            if tail_settings is None:
                return 2
            source = tail_settings.source
        return run_tail(
            table_name=args.table,
            stream_arn=args.stream_arn,
            start="LATEST" if args.start == "latest" else "TRIM_HORIZON",
            fmt=args.format,
            limit=args.limit,
            filters=args.filter,
            region=args.region,
            endpoint_url=args.endpoint_url,
            source=source,
        )
    settings = _settings(args.config)
    if settings is None:
        return 2
    if args.command == "validate":
        print(settings.model_dump_json(indent=2))
        return 0
    if args.command == "status":
        return run_status(
            settings,
            as_json=args.json,
            count_cap=args.count_behind,
            region=args.region,
            endpoint_url=args.endpoint_url,
        )
    if args.workers > 1:
        configure_logging(settings.runtime.log_level, "text")
        return run_workers(args.config, settings, args.workers)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
