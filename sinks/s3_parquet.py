"""Audit archive: every change as a row in zstd Parquet on S3, Hive-partitioned by event hour (an initial load's
items apart, under `snapshot=<load id>/`).

Rows are buffered like Firehose (by bytes and by age) so a quiet table does not become thousands of tiny
objects; the pipeline checkpoints only after `flush()` has written them. Object names derive from the shard and
the first and last sequence numbers they hold, so replaying the same range after a crash overwrites the same
object instead of adding a duplicate.

Images are stored as `dynamodb_json` by default: the typed form exactly as the stream delivered it, which is also
the format of DynamoDB's own export to S3. It is lossless (an `N` keeps its digit string, `B` stays base64 and
apart from `S`, a set stays apart from a list) and it is the cheap path: a record read through `pipeline.wire`
still holds each image as the JSON text the service sent, and that text is copied into the column unparsed (a
record from elsewhere, or one a transform changed, has its typed images encoded with `orjson.dumps`). `json`
(plain JSON, numbers exact) is easier to query but has to parse and unmarshal every value and encode it back:
from GetRecords bytes to Parquet bytes it costs about five times the CPU of `dynamodb_json` (bench/README.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, field_validator

from pipeline.aws import AwsClients
from pipeline.errors import error_code, http_status, is_retryable
from pipeline.object_names import UnsafeNameError, checked_sequence_number, checked_shard_id, normalized_prefix
from pipeline.records import Batch, ChangeRecord, WireStreamRecord, to_json_bytes
from sinks.base import PermanentSinkError, RetryableSinkError, Sink, SinkError, SinkSettings, WriteResult

log = logging.getLogger(__name__)

ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_name", pa.string(), nullable=False),
        pa.field("table", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("sequence_number", pa.string(), nullable=False),
        pa.field("approximate_creation_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("keys", pa.string(), nullable=False),
        pa.field("new_image", pa.string()),
        pa.field("old_image", pa.string()),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field(
            "user_identity",
            pa.struct([pa.field("type", pa.string()), pa.field("principal_id", pa.string())]),
        ),
    ]
)

ImageEncoding = Literal["json", "dynamodb_json"]

_HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class S3ParquetSinkSettings(SinkSettings):
    """`[[sinks]] type = "s3_parquet"`: the audit archive."""

    type: Literal["s3_parquet"]
    bucket: str = Field(min_length=3, max_length=63, description="Existing bucket to write to.")
    prefix: str = Field(default="", description="Key prefix; a trailing '/' is added when missing.")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    image_encoding: ImageEncoding = Field(
        default="dynamodb_json",
        description="How the keys, new_image and old_image columns are written. 'dynamodb_json' (default): the "
        'typed form exactly as the stream delivers it, as in DynamoDB\'s own export to S3 ({"n": {"N": "1.5"}}); '
        "lossless (N digits kept, B apart from S, sets apart from lists) and written straight from the stream "
        "record, without unmarshalling. 'json': plain JSON ({\"n\": 1.5}), numbers exact, binary as base64, sets "
        "as sorted arrays; easier to query, but B reads like S and a set like a list, and it costs about five "
        "times the CPU per record.",
    )
    buffer_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    buffer_max_seconds: float = Field(default=60.0, ge=0.0, le=900.0)
    upload_concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Objects a flush uploads at once: one per (hour, shard) with rows, so a flush after a busy "
        "minute on many shards is many objects, each a round trip or more.",
    )

    @field_validator("prefix")
    @classmethod
    def _slash_terminated(cls, prefix: str) -> str:
        return normalized_prefix(prefix)


def _json_or_none(value: Any) -> bytes | None:
    return None if value is None else to_json_bytes(value)


def _typed_json(stream: Mapping[str, Any], name: str) -> bytes | None:
    if type(stream) is WireStreamRecord:
        return stream.image_json(name)
    return _json_or_none(stream.get(name))


def archive_table(records: Sequence[ChangeRecord], encoding: ImageEncoding = "dynamodb_json") -> pa.Table:
    """The archive rows for `records`, in order."""
    # JSON goes from orjson to Arrow as UTF-8 bytes: no decoding to str for Arrow to encode again.
    if encoding == "dynamodb_json":
        # From the stream record, never the images: reading those would unmarshal them. A record straight from
        # pipeline.wire still holds each image as the service's text, copied as it is; other records have theirs
        # encoded (boto3's bytes back to base64), which gives the same JSON, and the same bytes when the service's
        # text is compact, as AWS's is.
        streams = [r.raw["dynamodb"] for r in records]
        keys = [_typed_json(s, "Keys") or b"{}" for s in streams]
        new_images = [_typed_json(s, "NewImage") for s in streams]
        old_images = [_typed_json(s, "OldImage") for s in streams]
    else:
        keys = [to_json_bytes(r.keys) for r in records]
        new_images = [_json_or_none(r.new_image) for r in records]
        old_images = [_json_or_none(r.old_image) for r in records]
    columns: dict[str, list[Any]] = {
        "event_id": [r.event_id for r in records],
        "event_name": [r.event_name for r in records],
        "table": [r.table for r in records],
        "shard_id": [r.shard_id for r in records],
        "sequence_number": [r.sequence_number for r in records],
        "approximate_creation_time": [r.approximate_creation_time for r in records],
        "keys": keys,
        "new_image": new_images,
        "old_image": old_images,
        "size_bytes": [r.size_bytes for r in records],
        "user_identity": [
            None
            if r.user_identity is None
            else {"type": r.user_identity.type, "principal_id": r.user_identity.principal_id}
            for r in records
        ],
    }
    return pa.table(columns, schema=ARCHIVE_SCHEMA)


def _runs_by_part(records: Sequence[ChangeRecord]) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """(partition, shard) -> the [start, end) runs of `records` that belong to it, in order.

    A batch is a few long runs (pages of one shard, mostly within one hour), so the partition is formatted once a
    run rather than once a record: a record costs a shard comparison and two datetime comparisons.
    """
    runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    key: tuple[str, str] | None = None
    start = 0
    hour_start = hour_end = _EPOCH
    for index, record in enumerate(records):
        t = record.approximate_creation_time
        if key is not None and record.shard_id == key[1] and hour_start <= t < hour_end:
            continue
        if key is not None:
            runs.setdefault(key, []).append((start, index))
        key, start = (partition_of(record), record.shard_id), index
        hour_start = t.replace(minute=0, second=0, microsecond=0)
        hour_end = hour_start + _HOUR
    if key is not None:
        runs.setdefault(key, []).append((start, len(records)))
    return runs


def _unnamable(records: Sequence[ChangeRecord]) -> dict[str, SinkError]:
    """Records whose shard id or sequence number cannot be part of an object name, refused with the reason."""
    refused: dict[str, SinkError] = {}
    for record in records:
        try:
            checked_shard_id(record.shard_id)
            checked_sequence_number(record.sequence_number)
        except UnsafeNameError as error:
            refused[record.event_id] = PermanentSinkError(f"record {record.event_id}: {error}; not archived")
    return refused


def partition_of(record: ChangeRecord) -> str:
    """`dt=/hour=` of the change's creation; an initial load's items under `snapshot=<load id>`, with the same
    columns, so "the table as the load read it, plus every change since" is one query (README)."""
    if record.load_id is not None:
        return f"snapshot={record.load_id}"
    t = record.approximate_creation_time
    return f"dt={t:%Y-%m-%d}/hour={t:%H}"


def object_key(prefix: str, partition: str, shard_id: str, first_sequence: str, last_sequence: str) -> str:
    return f"{prefix}{partition}/{shard_id}-{first_sequence}-{last_sequence}.parquet"


@dataclass
class _PartBuffer:
    """Rows of one (partition, shard) waiting to be written, oldest first."""

    tables: list[pa.Table] = field(default_factory=list)
    first_sequence: str = ""
    last_sequence: str = ""


class S3ParquetSink(Sink):
    concurrency_limit = 1
    """Rows are buffered per (hour, shard) in stream order, and objects are named by their first and last sequence
    numbers: one lane writes. A flush uploads up to `upload_concurrency` objects at once."""

    def __init__(
        self,
        settings: S3ParquetSinkSettings,
        *,
        region: str,
        endpoint_url: str | None,
        filesystem: Any = None,
    ) -> None:
        super().__init__(settings.name or settings.type)
        self._settings = settings
        self._region = region
        self._endpoint_url = endpoint_url
        self._fs = filesystem
        self._parts: dict[tuple[str, str], _PartBuffer] = {}
        self._sealed: list[tuple[tuple[str, str], _PartBuffer]] = []
        """Parts a flush tried and did not write: they take no more rows, so a retry writes the object the failed
        upload may have stored after all under the same name (first and last sequence unchanged)."""
        self._buffered_bytes = 0
        self._oldest: float | None = None
        self._uploads: ThreadPoolExecutor | None = None
        self.objects_written = 0
        self.last_object: str | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._fs is None:
            import s3fs

            client_kwargs: dict[str, Any] = {"region_name": self._region}
            # The pipeline's retry policy is the only one: botocore's and s3fs's own retries would hide an
            # outage inside flush() for half a minute, out of reach of the settings and of a hard stop.
            self._fs = s3fs.S3FileSystem(
                endpoint_url=self._endpoint_url,
                client_kwargs=client_kwargs,
                config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}},
                skip_instance_cache=True,
            )
            self._fs.retries = 1  # not a constructor argument: passed there it breaks exists()
            self._check_bucket()
        elif not self._fs.exists(self._settings.bucket):  # a filesystem given by the caller (local, tests)
            raise PermanentSinkError(f"bucket {self._settings.bucket!r} does not exist")

    def _check_bucket(self) -> None:
        """HeadBucket, so that a missing bucket, a denial and an outage are told apart (s3fs's exists() answers
        False to all three): an outage is retryable, the others are refusals that name the bucket."""
        bucket = self._settings.bucket
        s3 = AwsClients(self._region, self._endpoint_url).client("s3")
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = http_status(exc)
            if status == 404 or error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise PermanentSinkError(
                    f"bucket {bucket!r} does not exist in {self._region} (endpoint {self._endpoint_url or 'AWS'})"
                ) from exc
            if status == 403:
                raise PermanentSinkError(
                    f"bucket {bucket!r}: access denied (HTTP 403); the credentials need s3:ListBucket on it"
                ) from exc
            if is_retryable(exc):
                raise RetryableSinkError(f"bucket {bucket!r}: HeadBucket failed: {error_code(exc) or status}") from exc
            raise PermanentSinkError(f"bucket {bucket!r}: HeadBucket failed: {error_code(exc) or status}") from exc
        except BotoCoreError as exc:
            raise RetryableSinkError(f"bucket {bucket!r}: HeadBucket failed: {type(exc).__name__}") from exc

    def write(self, batch: Batch) -> WriteResult:
        records = batch.records
        if not records:
            return WriteResult()
        unnamable = _unnamable(records)
        if unnamable:
            records = tuple(r for r in records if r.event_id not in unnamable)
            if not records:
                return WriteResult(failed=unnamable)
        table = archive_table(records, self._settings.image_encoding)
        runs_by_part = _runs_by_part(records)
        with self._lock:  # the rows are built outside it; a flush waits only for them to be buffered
            for key, runs in runs_by_part.items():
                part = self._parts.setdefault(key, _PartBuffer())
                # Slices share the batch table's buffers: buffering a run copies nothing. (So after a flush that
                # wrote only some parts, the parts left can hold more memory than buffered_bytes counts, until
                # they are written.)
                slices = [table.slice(start, end - start) for start, end in runs]
                part.tables.extend(slices)
                part.first_sequence = part.first_sequence or records[runs[0][0]].sequence_number
                part.last_sequence = records[runs[-1][1] - 1].sequence_number
                self._buffered_bytes += sum(rows.nbytes for rows in slices)
            if self._oldest is None:
                self._oldest = time.monotonic()
        return WriteResult(failed=unnamable)

    def flush_due(self, now: float) -> bool:
        if self._oldest is None:
            return True
        return self.buffer_full() or now - self._oldest >= self._settings.buffer_max_seconds

    def buffer_full(self) -> bool:
        return self._buffered_bytes >= self._settings.buffer_max_bytes

    @property
    def max_buffer_seconds(self) -> float:
        return self._settings.buffer_max_seconds

    def flush(self) -> None:
        """Write every buffered part, several at once; each part is forgotten once written, so a retry after a
        failure writes only what is left. Called while the lane may be writing: the buffer is locked meanwhile."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        # Rows written from now on go to new parts; these are uploaded until each is written.
        self._sealed.extend(self._parts.items())
        self._parts = {}
        if not self._sealed:
            self._oldest = None
            return
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(
                self._settings.upload_concurrency, thread_name_prefix=f"{self.name}-upload"
            )
        pending = [(key, part, self._uploads.submit(self._upload, key, part)) for key, part in self._sealed]
        errors: list[BaseException] = []
        self._sealed = []
        for key, part, future in pending:  # in buffer order, whichever finished first
            error = future.exception()
            if error is not None:
                errors.append(error)
                self._sealed.append((key, part))
                continue
            self.objects_written += 1
            self.last_object = future.result()
            self._buffered_bytes -= sum(t.nbytes for t in part.tables)
        if errors:
            for error in errors[1:]:
                log.warning("sink %s: %s", self.name, error)
            # A refusal that no retry will change outranks an outage: the caller must hear about it, not retry.
            raise next((e for e in errors if isinstance(e, PermanentSinkError)), errors[0])
        self._oldest = None

    def _upload(self, key: tuple[str, str], part: _PartBuffer) -> str:
        partition, shard_id = key
        path = f"{self._settings.bucket}/" + object_key(
            self._settings.prefix, partition, shard_id, part.first_sequence, part.last_sequence
        )
        compression = None if self._settings.compression == "none" else self._settings.compression
        with _mapped_errors(f"s3://{path}"):
            pq.write_table(pa.concat_tables(part.tables), path, filesystem=self._fs, compression=compression)
        return path

    def close(self) -> None:
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            self._uploads = None

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes


@contextmanager
def _mapped_errors(what: str) -> Iterator[None]:
    """The one place where s3fs/botocore errors become the sink's two error kinds."""
    try:
        yield
    except (PermanentSinkError, RetryableSinkError):
        raise
    # S3's answers name the object and the error, never a row's values: their text is safe to log.
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError) as exc:
        raise PermanentSinkError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # connection resets, timeouts, 5xx, throttling from s3fs or botocore
        raise RetryableSinkError(f"{what}: {type(exc).__name__}: {exc}") from exc
