"""An initial load read from a DynamoDB export to S3 (ExportTableToPointInTime, DYNAMODB_JSON format).

An export consumes no read capacity and reads the table as of one instant (its ExportTime), which a parallel
Scan cannot do. The export is DynamoDB's documented layout (S3DataExport.Output in the DynamoDB developer guide):

    PREFIX/AWSDynamoDB/EXPORT_ID/manifest-summary.json   itemCount, exportTime, manifestFilesS3Key, ...
    PREFIX/AWSDynamoDB/EXPORT_ID/manifest-files.json     JSON lines: dataFileS3Key, itemCount, md5Checksum, etag
    PREFIX/AWSDynamoDB/EXPORT_ID/data/*.json.gz          gzip JSON lines, each {"Item": {...DynamoDB JSON...}}

Every key in the manifests is a whole S3 key in the export's bucket. The data files are dealt out to segments in
manifest order (file i to segment i % segments) and a segment reads its files one after another, so a resume
token is a file and a line count: the files never change, and the same lines come back in the same order.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from botocore.exceptions import ClientError, IncompleteReadError

from pipeline.errors import error_code, http_status, is_retryable
from pipeline.retry import RetryPolicy
from pipeline.source.snapshot import SnapshotPage, SnapshotSourceError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "DYNAMODB_JSON"


@dataclass(frozen=True, slots=True)
class _DataFile:
    key: str
    item_count: int
    """The files manifest's count: files it says are empty are never fetched, the others are checked against it."""


@dataclass(frozen=True, slots=True)
class _Export:
    """A completed export, as its manifests describe it: everything `pages` needs, fixed once `prepare` returned."""

    arn: str
    bucket: str
    export_time: float
    item_count: int
    files: tuple[_DataFile, ...]


class TableExportSource:
    """`SnapshotSource` over a point-in-time export of `table_arn` in S3 (a new one, or `export_arn`'s).

    `prepare` starts an export when `export_arn` is None and reports its ARN through `on_export` at once, so that a
    restart resumes that export instead of paying for another; then it waits until the export is COMPLETED,
    calling DescribeExport every `poll_seconds` and waiting through `sleep` (which may raise to interrupt the
    wait). `not_before` (epoch seconds) is when the stream's starting positions were fixed: an export of an
    earlier moment would miss the changes in between, so it is refused.

    Every AWS call goes through `retry`; a refusal (no table, PITR off, no bucket, no permission, a failed
    export) raises `SnapshotSourceError` with one line naming the resource and the fix. Errors that are still
    retryable when the attempts run out are raised as they are.
    """

    def __init__(
        self,
        *,
        dynamodb: Any,
        s3: Any,
        table_arn: str,
        bucket: str | None,
        prefix: str,
        export_arn: str | None,
        segments: int,
        retry: RetryPolicy,
        poll_seconds: float = 30.0,
        sleep: Callable[[float], None] | None = None,
        not_before: float | None = None,
        on_export: Callable[[str], None] | None = None,
        page_items: int = 1000,
    ) -> None:
        if export_arn is None and not bucket:
            raise ValueError("a new export needs a bucket to write to (or an export_arn to read)")
        if segments < 1 or page_items < 1 or poll_seconds < 0:
            raise ValueError(f"segments ({segments}) and page_items ({page_items}) >= 1, poll_seconds >= 0")
        self._dynamodb = dynamodb
        self._s3 = s3
        self._table_arn = table_arn
        self._table = table_arn.split(":table/", 1)[-1].split("/", 1)[0]
        self._bucket = bucket
        self._prefix = prefix
        self._export_arn = export_arn
        self._configured_segments = segments
        self._retry = retry
        self._poll_seconds = poll_seconds
        self._sleep = sleep or time.sleep
        self._not_before = not_before
        self._on_export = on_export
        self._page_items = page_items
        self._export: _Export | None = None

    @property
    def export_arn(self) -> str | None:
        """The export read: the one given, or the one `prepare` started (None until then)."""
        return self._export_arn

    @property
    def segments(self) -> int:
        export = self._prepared()
        return max(1, min(self._configured_segments, len(export.files)))

    @property
    def estimated_items(self) -> int | None:
        return self._export.item_count if self._export is not None else None

    def prepare(self) -> None:
        if self._export_arn is None:
            self._export_arn = self._start()
        description = self._wait(self._export_arn)
        self._export = self._read_manifests(description)
        log.info(
            "export %s: %d items in %d data files, as of %s",
            self._export.arn,
            self._export.item_count,
            len(self._export.files),
            _iso(self._export.export_time),
        )

    def pages(self, segment: int, resume: str | None, first_page: int) -> Iterator[SnapshotPage]:
        export = self._prepared()
        count = self.segments
        if not 0 <= segment < count:
            raise ValueError(f"segment {segment} of {count}")
        files = export.files[segment::count]
        index, skip = _parse_resume(resume, segment)
        if skip == 0:
            index = _with_items(files, index)
        number = first_page
        items: list[Mapping[str, Any]] = []
        size = 0
        while index < len(files):
            reader = _DataFileReader(self._s3, export.bucket, files[index], skip, self._retry)
            try:
                while True:
                    for line_number, line in reader.read(self._page_items - len(items)):
                        items.append(_item(line, line_number, reader.where))
                        size += len(line)
                    if len(items) < self._page_items:
                        break  # the file ended before the page filled: the page goes on with the next file
                    ended = reader.at_end()
                    following = _with_items(files, index + 1) if ended else index
                    token = None
                    if following < len(files):
                        token = f"{following}:0" if ended else f"{index}:{reader.lines_done}"
                    yield self._page(segment, items, size, token, number)
                    if token is None:
                        return
                    number, items, size = number + 1, [], 0
                    if ended:
                        break
            finally:
                reader.close()
            index, skip = _with_items(files, index + 1), 0
        yield self._page(segment, items, size, None, number)

    # --- the export's lifecycle ------------------------------------------------------------------------------

    def _start(self) -> str:
        # One ClientToken for every attempt: a retried call whose first attempt did reach DynamoDB (a timeout on
        # the answer) returns that export instead of starting and billing a second one.
        request = {
            "TableArn": self._table_arn,
            "S3Bucket": self._bucket,
            "S3Prefix": self._prefix,
            "ExportFormat": EXPORT_FORMAT,
            "ClientToken": uuid.uuid4().hex,
        }
        try:
            response = self._retry.call(
                "ExportTableToPointInTime", self._dynamodb.export_table_to_point_in_time, **request
            )
        except ClientError as exc:
            raise self._dynamodb_refusal(exc, "ExportTableToPointInTime") or exc from None
        arn = str(response["ExportDescription"]["ExportArn"])
        log.info("export of table %s to s3://%s/%s started: %s", self._table, self._bucket, self._prefix, arn)
        if self._on_export is not None:
            self._on_export(arn)
        return arn

    def _wait(self, arn: str) -> dict[str, Any]:
        """DescribeExport until the export is COMPLETED.

        A plain loop, not the retry policy: an export in progress is not a failure to back off from but a job of
        minutes to hours, checked at the same interval throughout (botocore's ExportCompleted waiter gives up
        after 20 minutes and could not be interrupted). Outages of DescribeExport itself are retried inside
        `_describe` by the policy."""
        waiting_since: float | None = None
        while True:
            description = self._describe(arn)
            self._check_is_readable(description)
            if description.get("ExportTime") is not None:
                # Known from the start: a gap is refused before hours of waiting, not after.
                self._check_not_before(arn, _epoch(description["ExportTime"]))
            status = description.get("ExportStatus")
            if status == "COMPLETED":
                return description
            if status == "FAILED":
                raise self._failed(arn, description)
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("export %s is %s; checking every %.0fs", arn, status, self._poll_seconds)
            else:
                log.debug("export %s still %s after %.0fs", arn, status, time.monotonic() - waiting_since)
            self._sleep(self._poll_seconds)

    def _describe(self, arn: str) -> dict[str, Any]:
        try:
            response = self._retry.call("DescribeExport", self._dynamodb.describe_export, ExportArn=arn)
        except ClientError as exc:
            raise self._dynamodb_refusal(exc, "DescribeExport") or exc from None
        description: dict[str, Any] = response["ExportDescription"]
        return description

    def _check_is_readable(self, description: Mapping[str, Any]) -> None:
        arn = description.get("ExportArn", self._export_arn)
        table = description.get("TableArn")
        if table and table != self._table_arn:
            raise SnapshotSourceError(
                f"export {arn} is of table {table}, not of {self._table_arn}: "
                "give an export of this table, or none to have a new one started"
            )
        self._check_format(arn, description.get("ExportFormat"))
        export_type = description.get("ExportType")
        if export_type and export_type != "FULL_EXPORT":
            raise SnapshotSourceError(
                f"export {arn} of table {self._table} is an {export_type}, which holds changes, not the table: "
                "give a FULL_EXPORT, or none to have a new one started"
            )

    def _check_format(self, arn: str, export_format: str | None) -> None:
        if export_format and export_format != EXPORT_FORMAT:
            raise SnapshotSourceError(
                f"export {arn} of table {self._table} is in {export_format}, not {EXPORT_FORMAT}: "
                f"give a {EXPORT_FORMAT} export, or none to have a new one started"
            )

    def _check_not_before(self, arn: str, export_time: float) -> None:
        if self._not_before is not None and export_time < self._not_before:
            raise SnapshotSourceError(
                f"export {arn} of table {self._table} shows the table as of {_iso(export_time)}, before the stream's "
                f"starting point {_iso(self._not_before)}: changes in between would be in neither; start a new "
                "export (clear the recorded export ARN and the pipeline starts one)"
            )

    def _failed(self, arn: str, description: Mapping[str, Any]) -> SnapshotSourceError:
        code = str(description.get("FailureCode") or "unknown")
        message = _one_line(str(description.get("FailureMessage") or "no message"))
        bucket = description.get("S3Bucket", self._bucket)
        if "NoSuchBucket" in code:
            fix = f"create bucket {bucket} (or configure an existing one), then start a new export"
        elif "AccessDenied" in code:
            fix = (
                f"allow the pipeline's role s3:PutObject and s3:AbortMultipartUpload on {bucket}, "
                "then start a new export"
            )
        else:
            fix = "fix the cause, then start a new export (clear the recorded export ARN and the pipeline starts one)"
        return SnapshotSourceError(
            f"export {arn} of table {self._table} to bucket {bucket} failed: {code}: {message}; {fix}"
        )

    def _read_manifests(self, description: Mapping[str, Any]) -> _Export:
        arn = str(description.get("ExportArn") or self._export_arn)
        bucket = str(description.get("S3Bucket") or self._bucket)
        # DynamoDB names the summary in ExportManifest; moto (the tests' stand-in) reports none, and then the
        # documented layout says where it is.
        summary_key = description.get("ExportManifest") or _documented_summary_key(
            str(description.get("S3Prefix", self._prefix) or ""), arn
        )
        summary = orjson.loads(self._get(bucket, summary_key))
        if not isinstance(summary, dict) or not summary.get("manifestFilesS3Key"):
            raise SnapshotSourceError(
                f"s3://{bucket}/{summary_key} is not an export's summary manifest (no manifestFilesS3Key): "
                "the export's files were changed; start a new export"
            )
        self._check_format(arn, summary.get("outputFormat"))
        moment = description.get("ExportTime") or summary.get("exportTime")
        if moment is None:
            raise SnapshotSourceError(
                f"export {arn}: neither DescribeExport nor s3://{bucket}/{summary_key} says its time"
            )
        export_time = _epoch(moment)
        self._check_not_before(arn, export_time)
        files_key = str(summary["manifestFilesS3Key"])
        files = []
        for number, line in enumerate(self._get(bucket, files_key).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
                files.append(_DataFile(str(entry["dataFileS3Key"]), int(entry["itemCount"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise SnapshotSourceError(
                    f"line {number} of s3://{bucket}/{files_key} is not a data file's entry "
                    "(dataFileS3Key, itemCount): the export's files were changed; start a new export"
                ) from None
        item_count = summary.get("itemCount", description.get("ItemCount"))
        return _Export(
            arn=arn,
            bucket=bucket,
            export_time=export_time,
            item_count=int(item_count) if item_count is not None else sum(f.item_count for f in files),
            files=tuple(files),
        )

    def _get(self, bucket: str, key: str) -> bytes:
        """A small object (a manifest) whole; a read that fails half-way is retried with the request."""

        def fetch() -> bytes:
            body: bytes = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body

        try:
            return self._retry.retrying(f"GetObject s3://{bucket}/{key}", retry_on=_read_retryable)(fetch)
        except ClientError as exc:
            raise _s3_refusal(exc, bucket, key) or exc from None

    def _dynamodb_refusal(self, exc: ClientError, action: str) -> SnapshotSourceError | None:
        """The one line for a refusal of a DynamoDB call; None for an outage that outlasted the retries, which is
        raised as it is."""
        if is_retryable(exc):
            return None
        code = error_code(exc)
        table = self._table
        if code == "PointInTimeRecoveryUnavailableException":
            return SnapshotSourceError(
                f"table {table}: point-in-time recovery is off, and an export needs it; turn it on with "
                f"aws dynamodb update-continuous-backups --table-name {table} "
                "--point-in-time-recovery-specification PointInTimeRecoveryEnabled=true"
            )
        if code in ("TableNotFoundException", "ResourceNotFoundException"):
            return SnapshotSourceError(
                f"table {self._table_arn}: not found; check the table name, the account and the region"
            )
        if code == "ExportNotFoundException":
            return SnapshotSourceError(
                f"export {self._export_arn} of table {table}: not found; the recorded export ARN is wrong or the "
                "export is gone: clear it and the pipeline starts a new export"
            )
        if code in ("AccessDeniedException", "AccessDenied") or http_status(exc) == 403:
            also = (
                f" and s3:PutObject, s3:AbortMultipartUpload on {self._bucket}" if action.startswith("Export") else ""
            )
            return SnapshotSourceError(
                f"not allowed to {action} on table {table}: grant the pipeline's role dynamodb:{action}{also}"
            )
        return SnapshotSourceError(f"{action} for table {table} refused: {code}: {_message(exc)}")

    # --- reading -----------------------------------------------------------------------------------------------

    def _prepared(self) -> _Export:
        if self._export is None:
            raise RuntimeError("TableExportSource.prepare() has not completed")
        return self._export

    def _page(
        self, segment: int, items: list[Mapping[str, Any]], size: int, resume: str | None, number: int
    ) -> SnapshotPage:
        return SnapshotPage(
            segment=segment,
            items=tuple(items),
            size_bytes=size,
            resume=resume,
            page=number,
            read_at=self._prepared().export_time,
            read_units=0.0,
        )


class _DataFileReader:
    """One gzip data file read as a stream of lines, from line `skip` on, never held whole in memory.

    A read that fails part-way (a reset connection, one a slow consumer let go idle) is retried by the policy: the
    object is fetched again and the lines already taken are skipped, which is exact because an export's files
    never change. Retried reads re-download and decompress the file's head again; nothing is returned twice."""

    def __init__(self, s3: Any, bucket: str, file: _DataFile, skip: int, retry: RetryPolicy) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._file = file
        self._skip = skip
        self._retry = retry
        self._stream: gzip.GzipFile | None = None
        self._body: Any = None
        self._consumed = 0
        """Lines taken from the object so far (blank ones included): where a fetch after a failure goes on."""
        self._items = 0
        """Item lines among them, for the check against the manifest's itemCount at the end."""
        self._ended = False
        self._ahead: tuple[int, bytes] | None = None
        self.lines_done = skip
        """Lines up to and including the last one `read` returned: the resume point after it."""

    @property
    def where(self) -> str:
        return f"s3://{self._bucket}/{self._file.key}"

    def read(self, n: int) -> list[tuple[int, bytes]]:
        """Up to `n` more item lines with their line numbers (from 1), fewer only at the file's end."""
        taken: list[tuple[int, bytes]] = []
        if n > 0 and self._ahead is not None:
            taken.append(self._ahead)
            self._ahead = None
        if len(taken) < n and not self._ended:
            taken.extend(self._take(n - len(taken)))
        if taken:
            self.lines_done = taken[-1][0]
        return taken

    def at_end(self) -> bool:
        """Whether no item line is left (reads one ahead to know)."""
        if self._ahead is None and not self._ended:
            ahead = self._take(1)
            self._ahead = ahead[0] if ahead else None
        return self._ahead is None

    def close(self) -> None:
        self._drop()

    def _take(self, n: int) -> list[tuple[int, bytes]]:
        try:
            return self._retry.retrying(f"reading {self.where}", retry_on=_read_retryable)(self._take_once, n)
        except ClientError as exc:
            raise _s3_refusal(exc, self._bucket, self._file.key) or exc from None

    def _take_once(self, n: int) -> list[tuple[int, bytes]]:
        try:
            stream = self._stream or self._open()
            while self._consumed < self._skip:  # resuming inside the file: these lines were delivered
                line = stream.readline()
                if not line:
                    raise SnapshotSourceError(
                        f"{self.where} has {self._consumed} lines, fewer than the resume point {self._skip}: "
                        "the checkpoint is not of this export; restart the load from the beginning"
                    )
                self._consumed += 1
                self._items += bool(line.strip())
            # Counted locally and kept only on success: after a failure the next fetch skips what was kept.
            consumed, items = self._consumed, self._items
            taken: list[tuple[int, bytes]] = []
            while len(taken) < n:
                line = stream.readline()
                if not line:
                    self._ended = True
                    break
                consumed += 1
                line = line.rstrip(b"\r\n")
                if line.strip():
                    items += 1
                    taken.append((consumed, line))
            self._consumed, self._items = consumed, items
        except BaseException:
            self._drop()
            raise
        if self._ended:
            self._drop()
            if self._items != self._file.item_count:
                raise SnapshotSourceError(
                    f"{self.where} holds {self._items} items, its manifest says {self._file.item_count}: "
                    "the export's files were changed; start a new export"
                )
        return taken

    def _open(self) -> gzip.GzipFile:
        self._body = self._s3.get_object(Bucket=self._bucket, Key=self._file.key)["Body"]
        stream = gzip.GzipFile(fileobj=self._body, mode="rb")
        for _ in range(self._consumed):  # a fetch after a failure: past the lines already taken
            if not stream.readline():
                raise SnapshotSourceError(f"{self.where} got shorter while it was read: start a new export")
        self._stream = stream
        return stream

    def _drop(self) -> None:
        stream, body = self._stream, self._body
        self._stream = self._body = None
        if stream is not None:
            stream.close()
        if body is not None:
            body.close()


def _item(line: bytes, number: int, where: str) -> Mapping[str, Any]:
    try:
        item = orjson.loads(line)["Item"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        item = None
    if not isinstance(item, dict):
        raise SnapshotSourceError(
            f'line {number} of {where} is not an export item ({{"Item": ...}}): '
            f"only {EXPORT_FORMAT} exports can be read; start a new export"
        )
    return item


def _with_items(files: tuple[_DataFile, ...], index: int) -> int:
    """The first file from `index` on that the manifest says holds items (len(files): none)."""
    while index < len(files) and files[index].item_count == 0:
        index += 1
    return index


def _parse_resume(resume: str | None, segment: int) -> tuple[int, int]:
    if resume is None:
        return 0, 0
    file, _, lines = resume.partition(":")
    if not (file.isdigit() and lines.isdigit()):
        raise SnapshotSourceError(
            f"segment {segment}: resume point {resume!r} is not an export's FILE:LINES (a checkpoint of another "
            "kind of load?); restart the load from the beginning"
        )
    return int(file), int(lines)


def _documented_summary_key(prefix: str, export_arn: str) -> str:
    """PREFIX/AWSDynamoDB/EXPORT_ID/manifest-summary.json; the export id is the last part of the ARN
    (arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/export/EXPORT_ID)."""
    export_id = export_arn.rsplit("/", 1)[-1]
    head = f"{prefix.rstrip('/')}/" if prefix.strip("/") else ""
    return f"{head}AWSDynamoDB/{export_id}/manifest-summary.json"


def _read_retryable(exc: BaseException) -> bool:
    """The policy's outages, and a body that ended before its Content-Length (a connection closed early)."""
    return is_retryable(exc) or isinstance(exc, IncompleteReadError)


def _s3_refusal(exc: ClientError, bucket: str, key: str) -> SnapshotSourceError | None:
    """As `_dynamodb_refusal`, for S3."""
    if is_retryable(exc):
        return None
    code = error_code(exc)
    if code == "NoSuchBucket":
        return SnapshotSourceError(f"bucket {bucket}: does not exist (it held the export); start a new export")
    if code == "NoSuchKey":
        return SnapshotSourceError(
            f"s3://{bucket}/{key}: not found; the export's files were deleted or moved: start a new export"
        )
    if code in ("AccessDenied", "AccessDeniedException") or http_status(exc) == 403:
        return SnapshotSourceError(
            f"not allowed to read s3://{bucket}/{key}: grant the pipeline's role s3:GetObject on "
            f"arn:aws:s3:::{bucket}/{key.split('AWSDynamoDB/', 1)[0]}*"
        )
    return SnapshotSourceError(f"GetObject s3://{bucket}/{key} refused: {code}: {_message(exc)}")


def _message(exc: ClientError) -> str:
    return _one_line(str(exc.response.get("Error", {}).get("Message", "")) or str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _epoch(value: Any) -> float:
    """ExportTime as boto3 gives it (a datetime) or as the summary manifest writes it (ISO 8601, "Z")."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float):
        return float(value)
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
