"""`streamsink tail`: formats, --limit, --from, filters and signals against the moto server; splits and lineage
against the simulated stream (moto's streams have one shard that never splits)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.ops.tail import TailFormat, TailPacing, TailTarget, summary_line, tail, tail_target
from pipeline.settings import SourceSettings
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from tests.conftest import stream_records, unique, wait_until
from tests.factories import change_record

BIG = "12345678901234567890123456789012345678"  # 38 significant digits: a float would keep 17
BLOB = b"\x00\xffbin"  # base64: AP9iaW4=
QUICK = TailPacing(
    poll_workers=2, idle_poll_min_seconds=0.05, idle_poll_max_seconds=0.1, discovery_interval_seconds=0.2
)


class Tail:
    """`tail` on a thread, for the tests that need to act while it runs."""

    def __init__(self, streams: Any, stream_arn: str, **options: Any) -> None:
        self.out = io.StringIO()
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.printed: int | None = None
        self.error: BaseException | None = None
        options.setdefault("pacing", QUICK)
        self._thread = threading.Thread(
            target=self._run, args=(streams, stream_arn, options), name="tail-under-test", daemon=True
        )

    def _run(self, streams: Any, stream_arn: str, options: dict[str, Any]) -> None:
        try:
            self.printed = tail(streams, stream_arn, out=self.out, stop=self.stop, ready=self.ready, **options)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Tail:
        self._thread.start()
        wait_until(lambda: self.ready.is_set() or self.error is not None, what="tail polling every shard")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self._thread.join(10)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def wait_for_lines(self, count: int) -> list[str]:
        wait_until(lambda: len(self.lines()) >= count or self.error is not None, what=f"{count} lines")
        assert self.error is None, self.error
        return self.lines()

    def join(self) -> None:
        self._thread.join(20)
        assert not self._thread.is_alive(), "tail did not return"
        assert self.error is None, self.error


def stream_arn_of(dynamodb: Any, table: str) -> str:
    return str(dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"])


def give_up_after(seconds: float = 20.0) -> threading.Event:
    """A stop event that fires by itself, so a tail that never reaches its limit fails instead of hanging."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.daemon = True
    timer.start()
    return stop


def tail_all(aws: EmbeddedAws, stream_arn: str, count: int, fmt: TailFormat = "summary", **options: Any) -> str:
    """Everything from the oldest record, stopping at `count` changes."""
    out = io.StringIO()
    printed = tail(
        aws.client("dynamodbstreams"),
        stream_arn,
        out=out,
        stop=give_up_after(),
        start="TRIM_HORIZON",
        fmt=fmt,
        limit=count,
        pacing=QUICK,
        **options,
    )
    assert printed == count
    return out.getvalue()


def only_shard(aws: EmbeddedAws, stream_arn: str) -> str:
    shards = aws.client("dynamodbstreams").describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]
    assert len(shards) == 1
    return str(shards[0]["ShardId"])


def second(record: dict[str, Any]) -> str:
    """A stream record's creation time as the summary prints it."""
    return f"{record['dynamodb']['ApproximateCreationDateTime'].astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def put(dynamodb: Any, table: str, pk: str, sk: str, **attributes: Any) -> None:
    dynamodb.put_item(TableName=table, Item={"pk": {"S": pk}, "sk": {"S": sk}, **attributes})


@pytest.fixture
def typed_table(dynamodb: Any) -> str:
    """Keyed by a number, which the summary must print with every digit."""
    name = unique("typed")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "N"}],
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    return name


def write_typed_changes(dynamodb: Any, table: str) -> None:
    key = {"id": {"N": BIG}}
    dynamodb.put_item(TableName=table, Item={**key, "amount": {"N": "0.10"}, "blob": {"B": BLOB}})
    dynamodb.update_item(
        TableName=table,
        Key=key,
        UpdateExpression="SET amount = :a",
        ExpressionAttributeValues={":a": {"N": "98765432109876543210.987654321098765432"}},
    )
    dynamodb.delete_item(TableName=table, Key=key)


# -- formats ---------------------------------------------------------------------------------------------------


def test_summary_prints_time_event_and_keys_per_change_in_stream_order(
    aws: EmbeddedAws, dynamodb: Any, table: str
) -> None:
    put(dynamodb, table, "customer#1", "order#1", status={"S": "new"})
    put(dynamodb, table, "customer#2", "order#7")
    dynamodb.update_item(
        TableName=table,
        Key={"pk": {"S": "customer#1"}, "sk": {"S": "order#1"}},
        UpdateExpression="SET #s = :s",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":s": {"S": "paid"}},
    )
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "customer#2"}, "sk": {"S": "order#7"}})

    truth = stream_records(aws, table)
    printed = tail_all(aws, stream_arn_of(dynamodb, table), 4).splitlines()

    assert printed == [
        f"[{second(truth[0])}] INSERT  pk=customer#1, sk=order#1",
        f"[{second(truth[1])}] INSERT  pk=customer#2, sk=order#7",
        f"[{second(truth[2])}] MODIFY  pk=customer#1, sk=order#1",
        f"[{second(truth[3])}] REMOVE  pk=customer#2, sk=order#7",
    ]


def test_summary_shows_a_38_digit_number_key_with_every_digit(
    aws: EmbeddedAws, dynamodb: Any, typed_table: str
) -> None:
    write_typed_changes(dynamodb, typed_table)
    truth = stream_records(aws, typed_table)

    printed = tail_all(aws, stream_arn_of(dynamodb, typed_table), 3).splitlines()

    assert printed == [
        f"[{second(truth[0])}] INSERT  id={BIG}",
        f"[{second(truth[1])}] MODIFY  id={BIG}",
        f"[{second(truth[2])}] REMOVE  id={BIG}",
    ]


def test_summary_puts_the_hash_key_first_and_keeps_the_record_order_without_a_key_schema() -> None:
    record = change_record(
        keys={"blob": {"B": BLOB}, "id": {"N": "7"}},
        created=datetime(2026, 5, 27, 15, 35, 57, 900_000, tzinfo=UTC),
        event_name="MODIFY",
    )
    assert summary_line(record, key_names=["id", "blob"]) == "[2026-05-27T15:35:57Z] MODIFY  id=7, blob=AP9iaW4="
    assert summary_line(record) == "[2026-05-27T15:35:57Z] MODIFY  blob=AP9iaW4=, id=7"


def test_json_lines_carry_each_change_with_every_digit_and_binary_as_base64(
    aws: EmbeddedAws, dynamodb: Any, typed_table: str
) -> None:
    write_typed_changes(dynamodb, typed_table)
    truth = stream_records(aws, typed_table)
    stream_arn = stream_arn_of(dynamodb, typed_table)

    text = tail_all(aws, stream_arn, 3, fmt="json")

    lines = text.splitlines()
    assert len(lines) == 3
    # The exact number tokens are in the text itself: no float was ever involved.
    assert f'"id":{BIG}' in lines[0]
    assert '"amount":98765432109876543210.987654321098765432' in lines[1]
    changes = [json.loads(line, parse_float=Decimal, parse_int=Decimal) for line in lines]
    assert [c["eventName"] for c in changes] == ["INSERT", "MODIFY", "REMOVE"]
    assert [c["eventID"] for c in changes] == [r["eventID"] for r in truth]
    assert [c["sequenceNumber"] for c in changes] == [r["dynamodb"]["SequenceNumber"] for r in truth]
    assert {c["shardId"] for c in changes} == {only_shard(aws, stream_arn)}
    assert {c["table"] for c in changes} == {typed_table}
    assert all(c["keys"] == {"id": Decimal(BIG)} for c in changes)
    assert changes[0]["newImage"] == {"id": Decimal(BIG), "amount": Decimal("0.10"), "blob": "AP9iaW4="}
    assert changes[0]["oldImage"] is None
    assert changes[1]["oldImage"]["amount"] == Decimal("0.10")
    assert changes[1]["newImage"]["amount"] == Decimal("98765432109876543210.987654321098765432")
    assert changes[2]["newImage"] is None
    assert changes[2]["oldImage"]["blob"] == "AP9iaW4="
    for change, record in zip(changes, truth, strict=True):
        made = record["dynamodb"]["ApproximateCreationDateTime"].astimezone(UTC)
        assert change["approximateCreationDateTime"] == made.isoformat().replace("+00:00", "Z")


def test_record_format_prints_the_summary_then_identity_and_images_as_an_indented_block(
    aws: EmbeddedAws, dynamodb: Any, typed_table: str
) -> None:
    write_typed_changes(dynamodb, typed_table)
    truth = stream_records(aws, typed_table)
    modify = truth[1]

    stream_arn = stream_arn_of(dynamodb, typed_table)

    text = tail_all(aws, stream_arn, 2, fmt="record")

    blocks = text.split("\n\n")
    assert blocks[-1] == ""  # every block, the last too, ends in a blank line
    assert blocks[1] == (
        f"[{second(modify)}] MODIFY  id={BIG}\n"
        "{\n"
        f'  "eventID": "{modify["eventID"]}",\n'
        '  "newImage": {\n'
        '    "amount": 98765432109876543210.987654321098765432,\n'
        '    "blob": "AP9iaW4=",\n'
        f'    "id": {BIG}\n'
        "  },\n"
        '  "oldImage": {\n'
        '    "amount": 0.10,\n'
        '    "blob": "AP9iaW4=",\n'
        f'    "id": {BIG}\n'
        "  },\n"
        f'  "sequenceNumber": "{modify["dynamodb"]["SequenceNumber"]}",\n'
        f'  "shardId": "{only_shard(aws, stream_arn)}"\n'
        "}"
    )


# -- where tail starts and stops -----------------------------------------------------------------------------


def test_limit_stops_after_n_changes_in_stream_order(aws: EmbeddedAws, dynamodb: Any, table: str) -> None:
    for n in range(5):
        put(dynamodb, table, f"customer#{n}", "order#1")

    printed = tail_all(aws, stream_arn_of(dynamodb, table), 3).splitlines()

    assert [line.split("  ", 1)[1] for line in printed] == [
        "pk=customer#0, sk=order#1",
        "pk=customer#1, sk=order#1",
        "pk=customer#2, sk=order#1",
    ]


def test_latest_shows_only_what_follows_and_trim_horizon_shows_the_history_too(
    aws: EmbeddedAws, dynamodb: Any, table: str
) -> None:
    put(dynamodb, table, "before", "1")
    put(dynamodb, table, "before", "2")
    stream_arn = stream_arn_of(dynamodb, table)

    with Tail(aws.client("dynamodbstreams"), stream_arn, start="LATEST") as following:
        put(dynamodb, table, "after", "1")
        put(dynamodb, table, "after", "2")
        latest = following.wait_for_lines(2)

    history = tail_all(aws, stream_arn, 4).splitlines()
    assert [line.split("  ", 1)[1] for line in latest] == ["pk=after, sk=1", "pk=after, sk=2"]
    assert [line.split("  ", 1)[1] for line in history] == [
        "pk=before, sk=1",
        "pk=before, sk=2",
        "pk=after, sk=1",
        "pk=after, sk=2",
    ]


def test_the_stop_event_ends_a_tail_without_a_limit(aws: EmbeddedAws, dynamodb: Any, table: str) -> None:
    following = Tail(aws.client("dynamodbstreams"), stream_arn_of(dynamodb, table), start="LATEST")
    with following:
        put(dynamodb, table, "customer#1", "order#1")
        following.wait_for_lines(1)
    following.join()
    assert following.printed == 1


# -- lineage: the simulated stream splits shards as the service does ---------------------------------------------


@pytest.fixture
def simulator() -> StreamSimulator:
    return StreamSimulator()


def version(n: int, pk: str = "item") -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": "a"}, "version": {"N": str(n)}}


def versions_printed(text: str) -> list[tuple[str, int]]:
    return [(c["keys"]["pk"], int(c["newImage"]["version"])) for c in map(json.loads, text.splitlines())]


def test_children_are_read_only_after_their_parent_is_read_to_the_end(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("orders")
    (parent,) = stream.open_shard_ids()
    for n in range(3):
        stream.put_item(version(n))
    children = set(stream.split_shard())
    for n in range(3, 6):
        stream.put_item(version(n))  # the item's later changes are in a child

    out = io.StringIO()
    tail(
        simulator.client(),
        stream.arn,
        out=out,
        stop=give_up_after(),
        start="TRIM_HORIZON",
        fmt="json",
        limit=6,
        pacing=QUICK,
    )

    assert versions_printed(out.getvalue()) == [("item", n) for n in range(6)]
    calls = simulator.calls()
    parent_read_to_end = next(
        i for i, c in enumerate(calls) if c.operation == "GetRecords" and c.shard_id == parent and c.end_of_shard
    )
    first_child_touch = min(i for i, c in enumerate(calls) if c.shard_id in children)
    assert parent_read_to_end < first_child_touch


def test_shards_that_appear_while_tailing_are_picked_up_and_read_from_their_start(
    simulator: StreamSimulator,
) -> None:
    stream = simulator.create_stream("orders")
    with Tail(simulator.client(), stream.arn, start="LATEST", fmt="json") as following:
        stream.put_item(version(0, "a"))
        stream.put_item(version(0, "b"))
        following.wait_for_lines(2)
        stream.split_shard()
        for n in range(1, 4):
            stream.put_item(version(n, "a"))
            stream.put_item(version(n, "b"))
        printed = versions_printed("\n".join(following.wait_for_lines(8)))

    for pk in ("a", "b"):
        assert [v for key, v in printed if key == pk] == [0, 1, 2, 3]
    assert len({line["shardId"] for line in map(json.loads, following.lines())}) >= 2


def test_latest_skips_closed_shards_and_follows_their_children_from_now(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("orders")
    (parent,) = stream.open_shard_ids()
    stream.put_item(version(0))
    stream.split_shard()
    stream.put_item(version(1))
    with Tail(simulator.client(), stream.arn, start="LATEST", fmt="json") as following:
        stream.put_item(version(2))
        printed = versions_printed("\n".join(following.wait_for_lines(1)))
    assert printed == [("item", 2)]
    assert [c for c in simulator.calls() if c.shard_id == parent] == []  # the closed shard holds only the past


def test_summary_shows_a_binary_key_as_base64(simulator: StreamSimulator) -> None:
    stream = simulator.create_stream("typed", key_schema=(("id", "HASH"), ("blob", "RANGE")))
    stream.put_item({"id": {"N": BIG}, "blob": {"B": BLOB}})
    truth = stream.records()[0]

    out = io.StringIO()
    tail(simulator.client(), stream.arn, out=out, stop=give_up_after(), start="TRIM_HORIZON", limit=1, pacing=QUICK)

    made = datetime.fromtimestamp(truth["dynamodb"]["ApproximateCreationDateTime"], UTC)
    assert out.getvalue() == f"[{made:%Y-%m-%dT%H:%M:%SZ}] INSERT  id={BIG}, blob=AP9iaW4=\n"


# -- the command ---------------------------------------------------------------------------------------------


def endpoint(aws: EmbeddedAws) -> list[str]:
    return ["--region", aws.region, "--endpoint-url", aws.endpoint_url]


@pytest.fixture
def interrupt_after_20s() -> Iterator[None]:
    """A command that never reaches its --limit gets Ctrl-C, as an operator would send it: the test then fails
    on what was printed instead of hanging."""
    timer = threading.Timer(20.0, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.mark.usefixtures("interrupt_after_20s")
def test_cli_tail_prints_json_lines_and_exits_0_at_the_limit(
    aws: EmbeddedAws, dynamodb: Any, table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    put(dynamodb, table, "customer#1", "order#1", total={"N": BIG})
    put(dynamodb, table, "customer#1", "order#2")
    put(dynamodb, table, "customer#1", "order#3")

    code = main(
        ["tail", "--table", table, "--from", "trim-horizon", "--format", "json", "--limit", "2", *endpoint(aws)]
    )

    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    lines = captured.out.splitlines()
    assert [json.loads(line)["keys"]["sk"] for line in lines] == ["order#1", "order#2"]
    assert f'"total":{BIG}' in lines[0]


@pytest.mark.usefixtures("interrupt_after_20s")
def test_cli_filters_must_all_keep_a_change(
    aws: EmbeddedAws, dynamodb: Any, table: str, capsys: pytest.CaptureFixture[str]
) -> None:
    put(dynamodb, table, "customer#1", "order#1")
    put(dynamodb, table, "customer#2", "order#1")
    put(dynamodb, table, "customer#1", "order#1", status={"S": "paid"})
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "customer#2"}, "sk": {"S": "order#1"}})
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": "customer#1"}, "sk": {"S": "order#1"}})
    stream_arn = stream_arn_of(dynamodb, table)

    # No --region: a stream ARN names its region.
    command = ["tail", "--stream-arn", stream_arn, "--from", "trim-horizon", "--limit", "2"]
    filters = ["--filter", "event=MODIFY,REMOVE", "--filter", "key.pk=customer#1"]
    code = main([*command, *filters, "--endpoint-url", aws.endpoint_url])

    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in printed] == [
        "MODIFY  pk=customer#1, sk=order#1",
        "REMOVE  pk=customer#1, sk=order#1",
    ]


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--filter", "colour=red"], 2, "streamsink: tail: --filter 'colour=red': unknown name 'colour'"),
        ([], 1, "streamsink: tail: table 'no-such-table' not found"),
    ],
)
def test_cli_tail_errors_are_one_line_on_stderr(
    aws: EmbeddedAws, capsys: pytest.CaptureFixture[str], arguments: list[str], code: int, message: str
) -> None:
    assert main(["tail", "--table", "no-such-table", *arguments, *endpoint(aws)]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert captured.err.startswith(message)


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_tail_command_cleanly_with_exit_0(
    aws: EmbeddedAws, dynamodb: Any, table: str, sent: signal.Signals
) -> None:
    put(dynamodb, table, "customer#1", "order#1")
    command = [sys.executable, "-m", "pipeline.cli", "tail", "--table", table, "--from", "trim-horizon", *endpoint(aws)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # printed and flushed while the command keeps running
        assert first.endswith("INSERT  pk=customer#1, sk=order#1\n")
        assert process.poll() is None
        process.send_signal(sent)
        rest, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert (process.returncode, rest, stderr) == (0, "", "")


def test_the_tail_command_ends_with_exit_0_when_its_reader_goes_away(
    aws: EmbeddedAws, dynamodb: Any, table: str
) -> None:
    # `streamsink tail | head -1`: no further change will come to fail a write, yet the command must end.
    put(dynamodb, table, "customer#1", "order#1")
    command = [sys.executable, "-m", "pipeline.cli", "tail", "--table", table, "--from", "trim-horizon", *endpoint(aws)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().endswith("INSERT  pk=customer#1, sk=order#1\n")
        process.stdout.close()
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None
    assert (process.returncode, process.stderr.read()) == (0, "")


# -- --config --------------------------------------------------------------------------------------------------


def source_config(path: Path, **source: str) -> str:
    """A pipeline config whose [source] section holds `source`; the sink is never opened by tail."""
    lines = "".join(f'{key} = "{value}"\n' for key, value in source.items())
    path.write_text(f'[source]\n{lines}[[sinks]]\ntype = "memory"\n')
    return str(path)


@pytest.mark.usefixtures("interrupt_after_20s")
def test_cli_tail_config_follows_the_table_at_the_region_and_endpoint_of_its_source_section(
    aws: EmbeddedAws, dynamodb: Any, table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(dynamodb, table, "customer#1", "order#1")
    put(dynamodb, table, "customer#1", "order#2")
    config = source_config(tmp_path / "c.toml", table_name=table, region=aws.region, endpoint_url=aws.endpoint_url)

    # No --table, --region or --endpoint-url: without the config's endpoint this would go to AWS.
    code = main(["tail", "--config", config, "--from", "trim-horizon", "--limit", "2"])

    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    assert [line.split("] ", 1)[1] for line in captured.out.splitlines()] == [
        "INSERT  pk=customer#1, sk=order#1",
        "INSERT  pk=customer#1, sk=order#2",
    ]


@pytest.mark.usefixtures("interrupt_after_20s")
def test_cli_tail_flags_override_the_config(
    aws: EmbeddedAws, dynamodb: Any, table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(dynamodb, table, "customer#2", "order#1")
    # moto keeps each region apart: the table exists only in aws.region, and the config names another table.
    elsewhere = "eu-west-1" if aws.region != "eu-west-1" else "us-west-2"
    config = source_config(
        tmp_path / "c.toml", table_name=unique("other"), region=elsewhere, endpoint_url=aws.endpoint_url
    )

    assert main(["tail", "--config", config, "--from", "trim-horizon", "--limit", "1"]) == 1
    assert capsys.readouterr().err.startswith("streamsink: tail: table 'other-")

    command = ["tail", "--config", config, "--table", table, "--region", aws.region, "--from", "trim-horizon"]
    assert main([*command, "--limit", "1"]) == 0
    assert capsys.readouterr().out.endswith("] INSERT  pk=customer#2, sk=order#1\n")


def test_a_stream_arn_flag_brings_its_own_region_over_the_configs() -> None:
    source = SourceSettings(table_name="orders", region="eu-west-1", endpoint_url="http://127.0.0.1:5000")
    arn = "arn:aws:dynamodb:ap-south-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"

    assert tail_target(source) == TailTarget("orders", None, "eu-west-1", "http://127.0.0.1:5000")
    assert tail_target(source, stream_arn=arn) == TailTarget(None, arn, "ap-south-1", "http://127.0.0.1:5000")
    assert tail_target(source, stream_arn=arn, region="us-west-2", endpoint_url="http://localhost:4566") == (
        TailTarget(None, arn, "us-west-2", "http://localhost:4566")
    )
    assert tail_target(None) is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "streamsink: tail: name the stream: --table NAME, --stream-arn ARN or --config PATH"),
        (["--config", "missing.toml"], "streamsink: config error: "),
    ],
)
def test_cli_tail_without_a_stream_or_with_a_bad_config_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert main(["tail", *arguments]) == 2
    captured = capsys.readouterr()
    assert (captured.out, len(captured.err.splitlines())) == ("", 1)
    assert captured.err.startswith(message)
