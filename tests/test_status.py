"""`streamsink status` after real pipeline runs: checkpoints in the moto server, the stream from moto or, where shards
must split, from the simulated stream."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.aws import AwsClients
from pipeline.cli import main
from pipeline.ops.status import RecordsBehind, age_text, collect_status, render_table
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import RetrySettings, Settings
from pipeline.state.checkpoint import CheckpointStore
from pipeline.testing.emulator import EmbeddedAws
from pipeline.testing.simulated_stream import StreamSimulator
from sinks.memory import MemorySink
from tests.conftest import stream_records, unique, wait_until


@pytest.fixture
def simulator() -> StreamSimulator:
    return StreamSimulator()


def simulated(aws: EmbeddedAws, simulator: StreamSimulator) -> AwsClients:
    """Clients whose streams calls the simulator answers (it splits shards; moto does not); the rest go to moto."""
    clients = AwsClients(aws.region, aws.endpoint_url)
    simulator.attach(clients.client("dynamodbstreams"))
    return clients


def version(n: int, pk: str = "item") -> dict[str, Any]:
    return {"pk": {"S": pk}, "sk": {"S": "a"}, "version": {"N": str(n)}}


def last(records: list[dict[str, Any]]) -> dict[str, Any]:
    return max(records, key=lambda r: int(r["dynamodb"]["SequenceNumber"]))


def made_at(record: dict[str, Any]) -> str:
    """A record's ApproximateCreationDateTime (a datetime from boto3, epoch seconds on the wire), ISO in UTC."""
    made = record["dynamodb"]["ApproximateCreationDateTime"]
    if not isinstance(made, datetime):
        made = datetime.fromtimestamp(made, UTC)
    return made.astimezone(UTC).isoformat()


def run_until_checkpointed(
    pipeline: Pipeline, positions: dict[str, str], finished: frozenset[str] = frozenset()
) -> None:
    pipeline.start()
    try:
        wait_until(
            lambda: (
                pipeline.fatal is not None
                or (
                    all(pipeline.stats.committed.get(s) == q for s, q in positions.items())
                    and all(pipeline.lineage.is_finished(s) for s in finished)
                )
            ),
            what="checkpoints",
        )
    finally:
        assert pipeline.stop() is True, pipeline.fatal


def cells(line: str) -> list[str]:
    return re.split(r" {2,}", line)


def test_after_a_run_the_finished_parent_is_done_and_its_children_open(
    aws: EmbeddedAws, simulator: StreamSimulator, make_settings: Callable[..., Settings]
) -> None:
    stream = simulator.create_stream("orders")
    (parent,) = stream.open_shard_ids()
    for n in range(3):
        stream.put_item(version(n))
    stream.split_shard()
    stream.put_item(version(3))
    child = stream.shard_for(version(3))
    (idle,) = set(stream.open_shard_ids()) - {child}
    parent_last, child_last = last(stream.records(parent)), last(stream.records(child))
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn})
    clients = simulated(aws, simulator)
    run_until_checkpointed(
        Pipeline(settings, sinks=[MemorySink()], clients=clients),
        {parent: parent_last["dynamodb"]["SequenceNumber"], child: child_last["dynamodb"]["SequenceNumber"]},
        frozenset({parent}),
    )

    status = collect_status(settings, clients)

    by_id = {s.shard.shard_id: s for s in status.shards}
    assert status.shards[0] is by_id[parent]  # parents first
    assert {shard_id: (s.state, s.behind) for shard_id, s in by_id.items()} == {
        parent: ("done", RecordsBehind(0)),
        child: ("open", RecordsBehind()),
        idle: ("open", RecordsBehind()),
    }
    assert by_id[parent].checkpoint is not None and by_id[child].checkpoint is not None
    assert by_id[parent].checkpoint.sequence_number == parent_last["dynamodb"]["SequenceNumber"]
    assert by_id[child].checkpoint.sequence_number == child_last["dynamodb"]["SequenceNumber"]
    assert by_id[child].checkpoint.last_record_at == made_at(child_last)
    assert by_id[idle].checkpoint is not None and by_id[idle].checkpoint.sequence_number is None  # seen, unread
    assert by_id[child].shard.parent_shard_id == by_id[idle].shard.parent_shard_id == parent
    assert by_id[parent].checkpoint.owner is not None and by_id[child].checkpoint.owner is None
    assert status.workers == ()  # a worker that stopped cleanly left

    lines = render_table(status).splitlines()
    assert lines[:3] == [
        f"stream: {stream.arn}",
        f"consumer: streamsink (checkpoint table {settings.checkpoint.table_name})",
        "",
    ]
    header, *rows = lines[3:7]
    assert cells(header) == [
        "SHARD",
        "PARENT",
        "STATE",
        "CHECKPOINT",
        "BEHIND",
        "LAST RECORD AGE",
        "OWNER",
        "LEASE",
        "UPDATED",
    ]
    for row in rows:
        shown = by_id[cells(row)[0]]
        checkpoint = shown.checkpoint
        expected = [
            shown.shard.shard_id,
            shown.shard.parent_shard_id or "-",
            shown.state,
            (checkpoint.sequence_number if checkpoint else None) or "-",
            "0" if shown.state == "done" else "?",
        ]
        assert cells(row)[:5] == expected
        if checkpoint is None or checkpoint.sequence_number is None:
            assert cells(row)[5:] == ["-", "-", "-", "-"]
        else:
            assert re.fullmatch(r"\d+s|\d+m\d\ds", cells(row)[5])  # the age: how long ago depends on the clock
            # The finished parent names who finished it; the stop released the children's leases.
            assert cells(row)[6:] == [checkpoint.owner or "-", "-", checkpoint.updated_at]
        # Aligned: every column starts where its heading does.
        assert row.index(f"  {shown.state} ") + 2 == header.index("STATE")
    oldest = min((child, idle), key=lambda shard_id: int(by_id[shard_id].shard.starting_sequence_number))
    delivered = "nothing delivered yet" if oldest == idle else r"last delivered record \d+s old"
    assert re.fullmatch(
        rf"3 shard\(s\): 2 open, 0 closed, 1 done; oldest unfinished: {oldest} \(open, {delivered}\)", lines[-1]
    )


def test_a_closed_shard_not_yet_delivered_and_every_backlog_counted_ahead(
    aws: EmbeddedAws, dynamodb: Any, simulator: StreamSimulator, make_settings: Callable[..., Settings]
) -> None:
    stream = simulator.create_stream("orders")
    (parent,) = stream.open_shard_ids()
    for n in range(3):
        stream.put_item(version(n))
    stream.split_shard()
    stream.put_item(version(3))
    stream.put_item(version(4))
    child = stream.shard_for(version(4))
    (idle,) = set(stream.open_shard_ids()) - {child}
    settings = make_settings(source={"table_name": None, "stream_arn": stream.arn})
    CheckpointStore(
        dynamodb,
        table_name=settings.checkpoint.table_name,
        stream_arn=stream.arn,
        consumer_name="streamsink",
        retry=RetryPolicy(RetrySettings()),
    ).ensure_table(create=True)  # the pipeline has started but checkpointed nothing

    status = collect_status(settings, simulated(aws, simulator), count_cap=100)

    assert {s.shard.shard_id: (s.state, s.checkpoint, s.behind) for s in status.shards} == {
        parent: ("closed", None, RecordsBehind(3)),  # counted to the closed shard's end
        child: ("open", None, RecordsBehind(2)),  # counted until reads come back empty
        idle: ("open", None, RecordsBehind(0)),
    }
    assert render_table(status).splitlines()[-1] == (
        f"3 shard(s): 2 open, 1 closed, 0 done; oldest unfinished: {parent} (closed, nothing delivered yet)"
    )


def write_config(path: Path, settings: Settings) -> Path:
    source = settings.source
    path.write_text(
        f'[source]\ntable_name = "{source.table_name}"\nregion = "{source.region}"\n'
        f'endpoint_url = "{source.endpoint_url}"\n'
        f'[checkpoint]\ntable_name = "{settings.checkpoint.table_name}"\n'
        '[[sinks]]\ntype = "memory"\n'
    )
    return path


def test_cli_status_json_matches_the_checkpoint_and_count_behind_counts_what_came_since(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for n in range(4):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": "customer#1"}, "sk": {"S": f"order#{n}"}})
    delivered = last(stream_records(aws, table))
    settings = make_settings()
    shard_id = aws.client("dynamodbstreams").describe_stream(
        StreamArn=dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    )["StreamDescription"]["Shards"][0]["ShardId"]
    run_until_checkpointed(
        Pipeline(settings, sinks=[MemorySink()]), {shard_id: delivered["dynamodb"]["SequenceNumber"]}
    )
    for n in range(4, 7):  # written after the pipeline stopped: 3 records behind
        dynamodb.put_item(TableName=table, Item={"pk": {"S": "customer#1"}, "sk": {"S": f"order#{n}"}})
    config = str(write_config(tmp_path / "status.toml", settings))

    assert main(["status", "--config", config, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert main(["status", "--config", config, "--json", "--count-behind"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert main(["status", "--config", config, "--count-behind", "2"]) == 0
    capped = capsys.readouterr().out

    (shard,) = document["shards"]
    assert shard == {
        "shard_id": shard_id,
        "parent_shard_id": None,
        "state": "open",
        "starting_sequence_number": shard["starting_sequence_number"],
        "ending_sequence_number": None,
        "checkpoint_sequence_number": delivered["dynamodb"]["SequenceNumber"],
        "records_behind": None,
        "records_behind_at_least": False,
        "records_trimmed": False,
        "last_record_at": made_at(delivered),
        "last_record_age_seconds": shard["last_record_age_seconds"],
        "owner": None,  # released at the stop
        "owner_heartbeat_age_seconds": None,
        "lease_epoch": 2,  # taken once, released once
        "checkpoint_updated_at": shard["checkpoint_updated_at"],
    }
    assert document["workers"] == []
    assert shard["last_record_age_seconds"] >= 0
    assert document["stream_arn"] == dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    assert (document["consumer_name"], document["checkpoint_table"]) == ("streamsink", settings.checkpoint.table_name)
    assert document["summary"] == {
        "shards": 1,
        "open": 1,
        "closed": 0,
        "done": 0,
        "oldest_unfinished": shard_id,
        "checkpoints_of_gone_shards": 0,
    }
    assert (counted["shards"][0]["records_behind"], counted["shards"][0]["records_behind_at_least"]) == (3, False)
    row = capped.splitlines()[4]
    assert cells(row)[:5] == [shard_id, "-", "open", delivered["dynamodb"]["SequenceNumber"], ">= 2"]


def test_a_missing_checkpoint_table_is_reported_not_created(
    dynamodb: Any, make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = unique("no-checkpoints")
    config = str(write_config(tmp_path / "status.toml", make_settings(checkpoint={"table_name": missing})))

    assert main(["status", "--config", config]) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"streamsink: status: checkpoint table '{missing}' does not exist: the pipeline has not run with this "
        "config yet, or checkpoint.table_name is wrong (status never creates it)"
    ]
    assert missing not in dynamodb.list_tables()["TableNames"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.4, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90061, "1d01h")],
)
def test_ages_read_at_a_glance(seconds: float | None, text: str) -> None:
    assert age_text(seconds) == text


def test_cli_status_region_and_endpoint_flags_override_the_configs_source(
    aws: EmbeddedAws,
    dynamodb: Any,
    table: str,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dynamodb.put_item(TableName=table, Item=version(1))
    delivered = last(stream_records(aws, table))
    settings = make_settings()
    shard_id = aws.client("dynamodbstreams").describe_stream(
        StreamArn=dynamodb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    )["StreamDescription"]["Shards"][0]["ShardId"]
    run_until_checkpointed(
        Pipeline(settings, sinks=[MemorySink()]), {shard_id: delivered["dynamodb"]["SequenceNumber"]}
    )
    # moto keeps regions apart: in another region neither the table nor its checkpoint table exists.
    elsewhere = "eu-west-1" if aws.region != "eu-west-1" else "us-west-2"
    wrong_region = settings.model_copy(update={"source": settings.source.model_copy(update={"region": elsewhere})})
    config = str(write_config(tmp_path / "status.toml", wrong_region))
    assert main(["status", "--config", config]) == 1
    assert capsys.readouterr().err.startswith("streamsink: status: ")

    # Nothing listens on port 9: only the --endpoint-url given can answer.
    unreachable = wrong_region.model_copy(
        update={"source": wrong_region.source.model_copy(update={"endpoint_url": "http://127.0.0.1:9"})}
    )
    config = str(write_config(tmp_path / "unreachable.toml", unreachable))
    assert main(["status", "--config", config, "--region", aws.region, "--endpoint-url", aws.endpoint_url]) == 0

    row = capsys.readouterr().out.splitlines()[4]
    assert cells(row)[:4] == [shard_id, "-", "open", delivered["dynamodb"]["SequenceNumber"]]
