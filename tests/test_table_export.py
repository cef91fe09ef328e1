"""TableExportSource against the moto server: the export's API through moto, its files in the documented layout.

moto starts and describes exports but writes neither manifests nor DynamoDB's data file names
(tests/export_layout.py says what it does), so each test starts an export through moto and writes the layout for
that export's ARN with `write_export`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from pipeline.aws import AwsClients
from pipeline.retry import RetryPolicy
from pipeline.settings import RetrySettings
from pipeline.source.snapshot import SnapshotPage, SnapshotSource, SnapshotSourceError
from pipeline.source.table_export import TableExportSource
from pipeline.testing.emulator import EmbeddedAws, create_stream_table
from tests.conftest import unique
from tests.export_layout import data_file_keys, start_moto_export, write_export

EXPORT_TIME = 1_700_000_000.0
PREFIX = "exports/orders"


def make_items(count: int, *, payload: int = 0) -> list[dict[str, Any]]:
    """Items in DynamoDB JSON as an export writes them (binary as base64 text); `payload` random hex characters
    each, for files that do not compress to nothing."""
    return [
        {
            "pk": {"S": f"order-{i:05d}"},
            "sk": {"S": "v1"},
            "total": {"N": str(i * 7)},
            "blob": {"B": base64.b64encode(i.to_bytes(4, "big")).decode()},
            "lines": {"L": [{"M": {"sku": {"S": f"sku-{i}"}, "qty": {"N": "2"}}}]},
            "tags": {"SS": ["a", f"t{i}"]},
            **({"note": {"S": "".join(uuid.uuid4().hex for _ in range(payload // 32 + 1))}} if payload else {}),
        }
        for i in range(count)
    ]


def key_of(item: Mapping[str, Any]) -> str:
    return str(item["pk"]["S"])


def read_all(source: SnapshotSource) -> dict[int, list[SnapshotPage]]:
    return {segment: list(source.pages(segment, None, 0)) for segment in range(source.segments)}


class Recorder:
    """A client that passes every call to the real one and records it; tests script answers on top."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return method(**kwargs)

        return call

    def named(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for called, kwargs in self.calls if called == name]


class ScriptedDynamodb(Recorder):
    """moto's DynamoDB, but DescribeExport first fails `throttled` times, then says IN_PROGRESS `in_progress`
    times, and reports `export_time` as DynamoDB does (moto reports no ExportTime)."""

    def __init__(
        self, client: Any, *, throttled: int = 0, in_progress: int = 0, export_time: float | None = None
    ) -> None:
        super().__init__(client)
        self.throttled = throttled
        self.in_progress = in_progress
        self.export_time = export_time

    def describe_export(self, **kwargs: Any) -> Any:
        self.calls.append(("describe_export", kwargs))
        if self.throttled:
            self.throttled -= 1
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}, "ResponseMetadata": {}},
                "DescribeExport",
            )
        response = self._client.describe_export(**kwargs)
        description = response["ExportDescription"]
        if self.export_time is not None:
            description["ExportTime"] = self.export_time
        if self.in_progress:
            self.in_progress -= 1
            description["ExportStatus"] = "IN_PROGRESS"
        return response


@dataclass(frozen=True)
class Exported:
    table: str
    table_arn: str
    export_arn: str
    summary_key: str
    items: list[dict[str, Any]]


@pytest.fixture(scope="module")
def clients(aws: EmbeddedAws) -> AwsClients:
    """Clients as the pipeline builds them: botocore's retries off, the policy's only (built once: a session and
    its clients take a tenth of a second)."""
    return AwsClients(aws.region, aws.endpoint_url)


@pytest.fixture(scope="module")
def export_bucket(clients: AwsClients) -> str:
    """One bucket for the module's exports: each export has its own id under the prefix."""
    name = unique("exports")
    clients.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def retry() -> RetryPolicy:
    return RetryPolicy(
        RetrySettings(max_attempts=3, initial_delay_seconds=0.01, max_delay_seconds=0.02), sleep=lambda _: None
    )


def new_table(clients: AwsClients) -> tuple[str, str]:
    dynamodb = clients.client("dynamodb")
    name = unique("orders")
    create_stream_table(dynamodb, name)
    return name, str(dynamodb.describe_table(TableName=name)["Table"]["TableArn"])


@pytest.fixture
def exported(clients: AwsClients, export_bucket: str) -> Callable[..., Exported]:
    """An export started through moto, its files written in the documented layout: `exported(items, files=...)`."""

    def build(items: list[dict[str, Any]], *, files: Any, export_time: float = EXPORT_TIME) -> Exported:
        table, table_arn = new_table(clients)
        arn = start_moto_export(clients.client("dynamodb"), table, export_bucket, PREFIX)
        _, summary_key = write_export(
            clients.client("s3"),
            export_bucket,
            PREFIX,
            items,
            files=files,
            export_time=export_time,
            export_arn=arn,
            table_arn=table_arn,
        )
        return Exported(table, table_arn, arn, summary_key, items)

    return build


@pytest.fixture
def make_source(clients: AwsClients, export_bucket: str, retry: RetryPolicy) -> Callable[..., TableExportSource]:
    def build(**overrides: Any) -> TableExportSource:
        arguments: dict[str, Any] = {
            "dynamodb": clients.client("dynamodb"),
            "s3": clients.client("s3"),
            "bucket": export_bucket,
            "prefix": PREFIX,
            "export_arn": None,
            "segments": 1,
            "retry": retry,
            "poll_seconds": 7.0,
            "sleep": lambda seconds: pytest.fail(f"slept {seconds}s, not expected"),
            **overrides,
        }
        return TableExportSource(**arguments)

    return build


# --- starting and waiting --------------------------------------------------------------------------------------


def test_a_new_export_is_started_recorded_at_once_and_waited_for(
    clients: AwsClients, export_bucket: str, make_source: Callable[..., TableExportSource]
) -> None:
    table, table_arn = new_table(clients)
    real = clients.client("dynamodb")
    real.update_continuous_backups(
        TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
    )
    real.put_item(TableName=table, Item={"pk": {"S": "in-moto-only"}, "sk": {"S": "v1"}})
    dynamodb = ScriptedDynamodb(real, throttled=1, in_progress=2)
    items = make_items(9)
    recorded: list[tuple[str, int]] = []

    def on_export(arn: str) -> None:
        recorded.append((arn, len(dynamodb.named("describe_export"))))
        # Where DynamoDB would have written the export by the time it is COMPLETED.
        write_export(
            clients.client("s3"),
            export_bucket,
            PREFIX,
            items,
            files=[4, 0, 5],
            export_time=EXPORT_TIME,
            export_arn=arn,
            table_arn=table_arn,
        )

    sleeps: list[float] = []
    source = make_source(dynamodb=dynamodb, table_arn=table_arn, segments=2, on_export=on_export, sleep=sleeps.append)
    assert source.estimated_items is None
    with pytest.raises(RuntimeError):
        _ = source.segments

    source.prepare()

    (request,) = dynamodb.named("export_table_to_point_in_time")
    assert request["TableArn"] == table_arn
    assert request["S3Bucket"] == export_bucket
    assert request["S3Prefix"] == PREFIX
    assert request["ExportFormat"] == "DYNAMODB_JSON"
    assert "ExportTime" not in request  # now
    assert request["ClientToken"]
    (arn, describes_before) = recorded[0]
    assert len(recorded) == 1 and describes_before == 0, "the ARN is recorded before any wait"
    assert source.export_arn == arn
    assert sleeps == [7.0, 7.0], "two IN_PROGRESS answers, two waits; the throttled call is retried, not slept on"
    assert len(dynamodb.named("describe_export")) == 4
    described = real.describe_export(ExportArn=arn)["ExportDescription"]
    assert (described["S3Bucket"], described["S3Prefix"], described["ExportFormat"]) == (
        export_bucket,
        PREFIX,
        "DYNAMODB_JSON",
    )
    assert source.estimated_items == 9
    assert source.segments == 2
    read = [item for pages in read_all(source).values() for page in pages for item in page.items]
    assert sorted(read, key=key_of) == items, "the manifest's files, not moto's own data file"


def test_a_given_export_is_read_without_starting_another(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource], clients: AwsClients
) -> None:
    export = exported(make_items(3), files=1)
    dynamodb = Recorder(clients.client("dynamodb"))
    source = make_source(dynamodb=dynamodb, table_arn=export.table_arn, export_arn=export.export_arn, bucket=None)
    source.prepare()
    assert dynamodb.named("export_table_to_point_in_time") == []
    assert source.export_arn == export.export_arn
    (page,) = source.pages(0, None, 0)
    assert list(page.items) == export.items


def test_a_failed_export_raises_one_line_naming_the_bucket_and_the_fix(
    clients: AwsClients, make_source: Callable[..., TableExportSource]
) -> None:
    table, table_arn = new_table(clients)
    clients.client("dynamodb").update_continuous_backups(
        TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
    )
    missing = unique("no-such-bucket")
    source = make_source(table_arn=table_arn, bucket=missing, sleep=lambda _: None)
    with pytest.raises(SnapshotSourceError) as raised:
        source.prepare()
    message = str(raised.value)
    assert "\n" not in message
    assert "S3NoSuchBucket" in message and missing in message and table in message
    assert f"create bucket {missing}" in message


def test_point_in_time_recovery_off_says_how_to_turn_it_on(
    clients: AwsClients, make_source: Callable[..., TableExportSource]
) -> None:
    table, table_arn = new_table(clients)  # moto's tables start with PITR off, as DynamoDB's do
    recorded: list[str] = []
    source = make_source(table_arn=table_arn, on_export=recorded.append)
    with pytest.raises(SnapshotSourceError) as raised:
        source.prepare()
    assert str(raised.value) == (
        f"table {table}: point-in-time recovery is off, and an export needs it; turn it on with "
        f"aws dynamodb update-continuous-backups --table-name {table} "
        "--point-in-time-recovery-specification PointInTimeRecoveryEnabled=true"
    )
    assert recorded == []


def test_a_missing_table_is_named(clients: AwsClients, make_source: Callable[..., TableExportSource]) -> None:
    table_arn = f"arn:aws:dynamodb:{clients.region}:123456789012:table/{unique('gone')}"
    with pytest.raises(SnapshotSourceError, match=f"^table {table_arn}: not found; check the table name"):
        make_source(table_arn=table_arn).prepare()


def test_an_export_of_another_table_is_refused(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource], clients: AwsClients
) -> None:
    export = exported(make_items(2), files=1)
    _, other_arn = new_table(clients)
    with pytest.raises(SnapshotSourceError, match=f"is of table {export.table_arn}, not of {other_arn}"):
        make_source(table_arn=other_arn, export_arn=export.export_arn).prepare()


def test_an_export_older_than_the_stream_start_is_a_gap(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported(make_items(2), files=1, export_time=EXPORT_TIME)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, not_before=EXPORT_TIME + 1)
    with pytest.raises(SnapshotSourceError) as raised:
        source.prepare()
    message = str(raised.value)
    assert "\n" not in message
    assert "2023-11-14T22:13:20.000Z, before the stream's starting point 2023-11-14T22:13:21.000Z" in message
    assert "in neither" in message and "start a new export" in message


def test_the_gap_is_refused_before_waiting_when_describe_export_gives_the_time(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource], clients: AwsClients
) -> None:
    export = exported(make_items(2), files=1)
    dynamodb = ScriptedDynamodb(clients.client("dynamodb"), in_progress=100, export_time=EXPORT_TIME)
    sleeps: list[float] = []
    source = make_source(
        dynamodb=dynamodb,
        table_arn=export.table_arn,
        export_arn=export.export_arn,
        not_before=time.time(),
        sleep=sleeps.append,
    )
    with pytest.raises(SnapshotSourceError, match="in neither"):
        source.prepare()
    assert sleeps == []


def test_an_export_at_the_stream_start_is_accepted(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported(make_items(2), files=1)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, not_before=EXPORT_TIME)
    source.prepare()
    assert source.estimated_items == 2


# --- pages ------------------------------------------------------------------------------------------------------

LAYOUTS = [
    pytest.param(1, [5, 0, 7, 3], 4, id="one-segment"),
    pytest.param(3, [5, 0, 7, 3, 0, 2, 6], 3, id="three-segments"),
    pytest.param(4, 9, 2, id="four-segments-even-files"),
    pytest.param(2, [4, 4, 0, 0], 4, id="pages-end-at-file-ends"),
    pytest.param(2, [1, 1, 1, 1, 1, 1], 5, id="pages-span-files"),
]


def layout_source(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    segments: int,
    files: int | list[int],
    page_items: int,
) -> tuple[Exported, TableExportSource]:
    """A prepared source over an export of one of the LAYOUTS (`files` a number: two items a file)."""
    export = exported(make_items(files * 2 if isinstance(files, int) else sum(files)), files=files)
    source = make_source(
        table_arn=export.table_arn, export_arn=export.export_arn, segments=segments, page_items=page_items
    )
    source.prepare()
    return export, source


@pytest.mark.parametrize(("segments", "files", "page_items"), LAYOUTS)
def test_the_segments_pages_cover_every_item_exactly_once(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    segments: int,
    files: Any,
    page_items: int,
) -> None:
    export, source = layout_source(exported, make_source, segments, files, page_items)
    assert source.segments == segments
    assert source.estimated_items == len(export.items)

    read: list[Mapping[str, Any]] = []
    for segment, pages in read_all(source).items():
        assert [page.page for page in pages] == list(range(len(pages)))
        assert pages[-1].resume is None
        assert all(page.resume is not None for page in pages[:-1])
        for page in pages:
            assert page.segment == segment
            assert 0 < len(page.items) <= page_items or len(pages) == 1
            assert page.read_at == EXPORT_TIME
            assert page.read_units == 0
            assert page.size_bytes == sum(len(json.dumps({"Item": item})) for item in page.items)
            read.extend(page.items)
    assert sorted(read, key=key_of) == export.items
    assert len({key_of(item) for item in read}) == len(read)


@pytest.mark.parametrize(("segments", "files", "page_items"), LAYOUTS)
def test_resuming_from_any_page_yields_exactly_the_pages_after_it(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    segments: int,
    files: Any,
    page_items: int,
) -> None:
    _, source = layout_source(exported, make_source, segments, files, page_items)
    for segment, pages in read_all(source).items():
        for done, page in enumerate(pages[:-1]):
            resumed = list(source.pages(segment, page.resume, done + 1))
            assert resumed == pages[done + 1 :], f"segment {segment} resumed at {page.resume!r}"


def test_files_go_to_segments_in_manifest_order(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported(make_items(6), files=[1, 1, 1, 1, 1, 1])
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, segments=4)
    source.prepare()
    keys = {segment: [key_of(i) for p in pages for i in p.items] for segment, pages in read_all(source).items()}
    assert keys == {
        0: ["order-00000", "order-00004"],
        1: ["order-00001", "order-00005"],
        2: ["order-00002"],
        3: ["order-00003"],
    }


@pytest.mark.parametrize(
    ("files", "page_items", "tokens"),
    [
        pytest.param([5, 0, 3], 2, ["0:2", "0:4", "2:1", None], id="across-an-empty-file"),
        pytest.param([4, 4], 4, ["1:0", None], id="a-page-ending-a-file-resumes-at-the-next"),
        pytest.param([2, 0, 0], 2, [None], id="only-empty-files-after-the-last-page"),
    ],
)
def test_resume_points_name_the_file_and_the_lines_done(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    files: list[int],
    page_items: int,
    tokens: list[str | None],
) -> None:
    export = exported(make_items(sum(files)), files=files)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, page_items=page_items)
    source.prepare()
    assert [page.resume for page in source.pages(0, None, 0)] == tokens


def test_no_more_segments_than_files_and_an_empty_segment_yields_one_empty_page(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    clients: AwsClients,
    export_bucket: str,
) -> None:
    export = exported(make_items(3), files=[0, 3, 0])
    s3 = Recorder(clients.client("s3"))
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, segments=8, s3=s3)
    source.prepare()
    assert source.segments == 3
    for segment in (0, 2):
        assert list(source.pages(segment, None, 5)) == [
            SnapshotPage(segment=segment, items=(), size_bytes=0, resume=None, page=5, read_at=EXPORT_TIME)
        ]
    (page,) = source.pages(1, None, 0)
    assert list(page.items) == export.items and page.resume is None
    empty = data_file_keys(clients.client("s3"), export_bucket, export.summary_key)[::2]
    assert not [call for call in s3.named("get_object") if call["Key"] in empty], "empty files are not fetched"


def test_an_export_of_an_empty_table(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported([], files=1)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, segments=4)
    source.prepare()
    assert (source.segments, source.estimated_items) == (1, 0)
    assert [(p.items, p.resume) for p in source.pages(0, None, 0)] == [((), None)]


class FlakyBodies(Recorder):
    """S3 whose GetObject bodies for `key` break (a reset connection) after `good_reads` reads, `breaks` times."""

    def __init__(self, client: Any, key: str, *, breaks: int, good_reads: int) -> None:
        super().__init__(client)
        self.key, self.breaks, self.good_reads = key, breaks, good_reads

    def get_object(self, **kwargs: Any) -> Any:
        self.calls.append(("get_object", kwargs))
        response = self._client.get_object(**kwargs)
        if kwargs["Key"] == self.key and self.breaks:
            self.breaks -= 1
            response["Body"] = _BreakingBody(response["Body"], self.good_reads)
        return response


class _BreakingBody:
    def __init__(self, body: Any, good_reads: int) -> None:
        self._body, self._left = body, good_reads

    def read(self, amt: int | None = None) -> bytes:
        if self._left == 0:
            raise ResponseStreamingError(error=ConnectionResetError("connection reset by peer"))
        self._left -= 1
        return bytes(self._body.read(amt))

    def close(self) -> None:
        self._body.close()


def test_a_read_broken_mid_file_fetches_the_file_again_and_skips_what_was_taken(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    clients: AwsClients,
    export_bucket: str,
) -> None:
    export = exported(make_items(400, payload=200), files=[400])
    (key,) = data_file_keys(clients.client("s3"), export_bucket, export.summary_key)
    s3 = FlakyBodies(clients.client("s3"), key, breaks=2, good_reads=6)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, s3=s3, page_items=50)
    source.prepare()
    pages = list(source.pages(0, None, 0))
    assert [item for page in pages for item in page.items] == export.items
    assert [len(page.items) for page in pages] == [50] * 8
    assert len([call for call in s3.named("get_object") if call["Key"] == key]) == 3
    assert s3.breaks == 0


def test_a_segment_stopped_after_its_first_page_resumes_from_its_token(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported(make_items(10), files=[10])
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn, page_items=3)
    source.prepare()
    pages = source.pages(0, None, 0)
    assert isinstance(pages, Generator)
    first = next(pages)
    pages.close()
    assert first.resume == "0:3"
    rest = list(source.pages(0, first.resume, 1))
    assert [key_of(i) for p in rest for i in p.items] == [key_of(i) for i in export.items[3:]]


# --- damaged exports and bad resume points -------------------------------------------------------------------


def test_a_missing_data_file_names_it(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    clients: AwsClients,
    export_bucket: str,
) -> None:
    export = exported(make_items(4), files=[2, 2])
    bucket = export_bucket
    key = data_file_keys(clients.client("s3"), bucket, export.summary_key)[1]
    clients.client("s3").delete_object(Bucket=bucket, Key=key)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn)
    source.prepare()
    with pytest.raises(SnapshotSourceError, match=f"^s3://{bucket}/{key}: not found; .* start a new export$"):
        list(source.pages(0, None, 0))


def test_a_data_file_shorter_than_its_manifest_says_is_refused(
    exported: Callable[..., Exported],
    make_source: Callable[..., TableExportSource],
    clients: AwsClients,
    export_bucket: str,
) -> None:
    export = exported(make_items(4), files=[4])
    bucket = export_bucket
    (key,) = data_file_keys(clients.client("s3"), bucket, export.summary_key)
    clients.client("s3").put_object(Bucket=bucket, Key=key, Body=b"")  # zero bytes: no gzip stream at all
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn)
    source.prepare()
    with pytest.raises(SnapshotSourceError, match="holds 0 items, its manifest says 4"):
        list(source.pages(0, None, 0))


def test_a_resume_point_of_another_kind_is_refused(
    exported: Callable[..., Exported], make_source: Callable[..., TableExportSource]
) -> None:
    export = exported(make_items(2), files=1)
    source = make_source(table_arn=export.table_arn, export_arn=export.export_arn)
    source.prepare()
    for token in ["abc", "1", "1:x", "-1:0", '{"pk": {"S": "order-1"}}']:
        with pytest.raises(SnapshotSourceError, match="is not an export's FILE:LINES"):
            list(source.pages(0, token, 0))
