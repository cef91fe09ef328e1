"""Dead-letter destinations against the moto server: a JSONL file, an SQS queue, S3 objects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.aws import AwsClients
from pipeline.delivery.dead_letter import JsonlDeadLetters, S3DeadLetters, SqsDeadLetters, build_dead_letters
from pipeline.records import ChangeRecord
from pipeline.retry import RetryPolicy
from pipeline.runner import Pipeline
from pipeline.settings import ConfigError, RetrySettings, Settings, load_settings
from pipeline.testing.emulator import EmbeddedAws
from sinks.base import PermanentSinkError, SinkError
from sinks.memory import FlakySink
from tests.conftest import unique, wait_until
from tests.factories import change_record


def _policy() -> RetryPolicy:
    return RetryPolicy(RetrySettings(max_attempts=3, initial_delay_seconds=0.01, max_delay_seconds=0.05))


def _refused(*records: ChangeRecord, reason: str = "item too large") -> list[tuple[ChangeRecord, SinkError]]:
    return [(record, PermanentSinkError(reason)) for record in records]


def _record(sequence: int, pk: str | None = None, payload: str | None = None) -> ChangeRecord:
    keys = {"pk": {"S": pk or f"item-{sequence}"}}
    new_image = {**keys, "payload": {"S": payload}} if payload is not None else None
    return change_record(sequence=sequence, keys=keys, new_image=new_image)


def _receive_all(sqs: Any, queue_url: str, expected: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for _ in range(20):
        if len(messages) >= expected:
            break
        response = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
        )
        messages.extend(response.get("Messages", []))
    return messages


@pytest.fixture
def queue_url(aws: EmbeddedAws) -> str:
    return str(aws.client("sqs").create_queue(QueueName=unique("dead-letters"))["QueueUrl"])


def test_sqs_dead_letters_carry_the_full_record_the_sink_and_the_reason(aws: EmbeddedAws, queue_url: str) -> None:
    sqs = aws.client("sqs")
    overflow = JsonlDeadLetters(Path("unused.jsonl"))
    dead_letters = SqsDeadLetters(sqs, queue_url, retry=_policy(), overflow=overflow)
    records = [_record(100 + n, pk=f"item-{n}") for n in range(13)]

    dead_letters.put("replica", _refused(*records))

    messages = _receive_all(sqs, queue_url, 13)
    bodies = [orjson.loads(m["Body"]) for m in messages]
    assert sorted(b["sequence_number"] for b in bodies) == [str(100 + n) for n in range(13)]
    first = next(b for b in bodies if b["sequence_number"] == "100")
    assert first["sink"] == "replica"
    assert first["error"] == "item too large"
    assert first["error_kind"] == "PermanentSinkError"
    assert first["record"]["dynamodb"]["Keys"] == {"pk": {"S": "item-0"}}
    assert first["record"]["dynamodb"]["SequenceNumber"] == "100"
    assert {m["MessageAttributes"]["sink"]["StringValue"] for m in messages} == {"replica"}
    assert dead_letters.count == 13
    assert not overflow.path.exists()


def test_an_entry_too_large_for_sqs_goes_whole_to_the_file_and_the_queue_gets_a_pointer(
    aws: EmbeddedAws, queue_url: str, tmp_path: Path
) -> None:
    sqs = aws.client("sqs")
    overflow = JsonlDeadLetters(tmp_path / "overflow.jsonl")
    dead_letters = SqsDeadLetters(sqs, queue_url, retry=_policy(), overflow=overflow)
    big = _record(7, pk="big", payload="x" * 300_000)
    small = _record(8, pk="small")

    dead_letters.put("queue", _refused(big, small, reason="message over 256 KiB"))

    bodies = {b["sequence_number"]: b for b in (orjson.loads(m["Body"]) for m in _receive_all(sqs, queue_url, 2))}
    assert set(bodies) == {"7", "8"}
    assert "record" not in bodies["7"]
    assert bodies["7"]["record_stored_at"] == str(overflow.path)
    assert bodies["8"]["record"]["dynamodb"]["SequenceNumber"] == "8"
    stored = [orjson.loads(line) for line in overflow.path.read_bytes().splitlines()]
    assert [entry["sequence_number"] for entry in stored] == ["7"]
    assert stored[0]["record"]["dynamodb"]["NewImage"]["payload"] == {"S": "x" * 300_000}


def test_s3_dead_letters_are_one_jsonl_object_per_refusal(aws: EmbeddedAws) -> None:
    s3 = aws.client("s3")
    bucket = unique("dead-letters")
    s3.create_bucket(Bucket=bucket)
    dead_letters = S3DeadLetters(s3, bucket, "refused", retry=_policy())

    dead_letters.put("archive", _refused(_record(1), _record(2)))
    dead_letters.put("archive", _refused(_record(3), reason="access denied"))

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert len(keys) == 2
    assert all(key.startswith("refused/dt=") and key.endswith(".jsonl") for key in keys)
    entries = [
        orjson.loads(line) for key in keys for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()
    ]
    assert sorted((e["sequence_number"], e["error"]) for e in entries) == [
        ("1", "item too large"),
        ("2", "item too large"),
        ("3", "access denied"),
    ]
    assert dead_letters.location == f"dead-letter bucket s3://{bucket}/refused/"


def test_a_pipeline_sends_refused_records_to_the_configured_queue_and_goes_on(
    aws: EmbeddedAws, table: str, queue_url: str, make_settings: Callable[..., Settings]
) -> None:
    dynamodb = aws.client("dynamodb")
    for n in range(30):
        dynamodb.put_item(TableName=table, Item={"pk": {"S": f"p{n}"}, "sk": {"S": "s"}, "n": {"N": str(n)}})
    refuse = {"p3", "p17"}
    sink = FlakySink(
        refuse=lambda r: PermanentSinkError("no p3 or p17 here") if r.keys["pk"] in refuse else None,
    )
    settings = make_settings(dead_letter={"destination": "sqs", "queue_url": queue_url})
    pipeline = Pipeline(settings, sinks=[sink])
    pipeline.start()
    try:
        wait_until(lambda: pipeline.stats.checkpoints_written > 0 and len(sink.records) == 28, what="delivery")
    finally:
        assert pipeline.stop()

    bodies = [orjson.loads(m["Body"]) for m in _receive_all(aws.client("sqs"), queue_url, 2)]
    assert sorted(b["record"]["dynamodb"]["Keys"]["pk"]["S"] for b in bodies) == ["p17", "p3"]
    assert {b["error"] for b in bodies} == {"no p3 or p17 here"}
    assert pipeline.delivery.stats.dead_lettered == {"flaky": 2}
    last = max(int(r["dynamodb"]["SequenceNumber"]) for r in [b["record"] for b in bodies])
    assert int(pipeline.stats.committed[bodies[0]["shard_id"]]) >= last


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"destination": "sqs"}, "dead_letter.queue_url: required when dead_letter.destination = 'sqs'"),
        ({"destination": "s3"}, "dead_letter.bucket: required when dead_letter.destination = 's3'"),
        ({"destination": "kafka"}, "dead_letter.destination: Input should be 'jsonl', 'sqs' or 's3'"),
    ],
)
def test_an_incomplete_destination_is_a_config_error_naming_the_key(section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(source={"table_name": "t"}, sinks=[{"type": "memory"}], dead_letter=section)
    assert any(line.startswith(message) for line in error.value.lines), error.value.lines


def test_the_destination_is_built_from_settings(aws: EmbeddedAws, queue_url: str, tmp_path: Path) -> None:
    clients = AwsClients(aws.region, aws.endpoint_url)
    settings = load_settings(
        source={"table_name": "t"},
        sinks=[{"type": "memory"}],
        dead_letter={"destination": "sqs", "queue_url": queue_url, "path": str(tmp_path / "big.jsonl")},
    )
    built = build_dead_letters(settings.dead_letter, clients, _policy())
    assert isinstance(built, SqsDeadLetters)
    assert built.location == f"dead-letter SQS queue {queue_url}"
    default = load_settings(source={"table_name": "t"}, sinks=[{"type": "memory"}])
    assert isinstance(build_dead_letters(default.dead_letter, clients, _policy()), JsonlDeadLetters)


class _RefusesOneEntry:
    """The real SQS client, except that the entry carrying `sequence` is refused as the sender's fault."""

    def __init__(self, sqs: Any, sequence: str) -> None:
        self._sqs = sqs
        self._sequence = sequence
        self.calls: list[int] = []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(sum(len(e["MessageBody"]) for e in Entries))
        bad = [e for e in Entries if orjson.loads(e["MessageBody"])["sequence_number"] == self._sequence]
        good = [e for e in Entries if e not in bad]
        response = dict(self._sqs.send_message_batch(QueueUrl=QueueUrl, Entries=good)) if good else {}
        response["Failed"] = [
            {"Id": e["Id"], "SenderFault": True, "Code": "InvalidMessageContents", "Message": "no"} for e in bad
        ]
        return response


def test_calls_stay_under_the_batch_size_limit_and_a_refused_entry_goes_whole_to_the_file(
    aws: EmbeddedAws, queue_url: str, tmp_path: Path
) -> None:
    sqs = _RefusesOneEntry(aws.client("sqs"), sequence="5")
    overflow = JsonlDeadLetters(tmp_path / "overflow.jsonl")
    dead_letters = SqsDeadLetters(sqs, queue_url, retry=_policy(), overflow=overflow)
    records = [_record(n, payload="y" * 100_000) for n in range(1, 7)]  # six of ~100 KB: three calls at least

    dead_letters.put("queue", _refused(*records))

    assert len(sqs.calls) >= 3
    assert all(size <= 256 * 1024 for size in sqs.calls)
    received = {orjson.loads(m["Body"])["sequence_number"] for m in _receive_all(aws.client("sqs"), queue_url, 5)}
    assert received == {"1", "2", "3", "4", "6"}
    stored = [orjson.loads(line) for line in overflow.path.read_bytes().splitlines()]
    assert [entry["sequence_number"] for entry in stored] == ["5"]
    assert stored[0]["record"]["dynamodb"]["NewImage"]["payload"] == {"S": "y" * 100_000}


def test_a_dead_letter_file_and_the_directories_made_for_it_are_private(tmp_path: Path) -> None:
    """Dead letters hold item data: what streamsink creates for them only its owner can read."""
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    path = existing / "streamsink" / "dead" / "letters.jsonl"
    dead_letters = JsonlDeadLetters(path)
    dead_letters.open()
    dead_letters.put("archive", _refused(_record(1)))
    assert path.stat().st_mode & 0o777 == 0o600
    assert (existing / "streamsink").stat().st_mode & 0o777 == 0o700
    assert (existing / "streamsink" / "dead").stat().st_mode & 0o777 == 0o700
    assert existing.stat().st_mode & 0o777 == 0o755  # a directory that was there already is left as it was
    assert len(path.read_bytes().splitlines()) == 1


def test_the_dead_letter_prefix_is_normalised_like_the_archives() -> None:
    settings = load_settings(
        source={"table_name": "t"},
        sinks=[{"type": "memory"}],
        dead_letter={"destination": "s3", "bucket": "b", "prefix": "/refused"},
    )
    assert settings.dead_letter.prefix == "refused/"
