"""A DynamoDB export's files, written the way DynamoDB documents them, for tests of loads from an export.

moto 5.2.5 accepts ExportTableToPointInTime and answers DescribeExport (its export thread finishes at once), but
the files it writes are not DynamoDB's: one data file under PREFIX/AWSDynamoDB/UUID/data/UUID.gz, where UUID is
not the export's id, and no manifests; its DescribeExport reports no ExportManifest and no ExportTime. So a test
starts an export through moto (`start_moto_export`) for the API side, and writes the documented layout for that
export's ARN itself (`write_export`), where `TableExportSource` finds it:

    PREFIX/AWSDynamoDB/EXPORT_ID/_started
    PREFIX/AWSDynamoDB/EXPORT_ID/manifest-summary.json
    PREFIX/AWSDynamoDB/EXPORT_ID/manifest-files.json
    PREFIX/AWSDynamoDB/EXPORT_ID/data/NAME.json.gz

The checksum files (manifest-*.checksum) are left out: their format is not documented, and nothing reads them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

ACCOUNT = "123456789012"


def start_moto_export(dynamodb: Any, table_name: str, bucket: str, prefix: str) -> str:
    """Turn point-in-time recovery on for the table and start an export of it through moto; its ARN."""
    dynamodb.update_continuous_backups(
        TableName=table_name, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
    )
    table_arn = dynamodb.describe_table(TableName=table_name)["Table"]["TableArn"]
    response = dynamodb.export_table_to_point_in_time(
        TableArn=table_arn, S3Bucket=bucket, S3Prefix=prefix, ExportFormat="DYNAMODB_JSON"
    )
    return str(response["ExportDescription"]["ExportArn"])


def export_base(prefix: str, export_arn: str) -> str:
    """PREFIX/AWSDynamoDB/EXPORT_ID, the export id being the ARN's last part."""
    head = f"{prefix.rstrip('/')}/" if prefix.strip("/") else ""
    return f"{head}AWSDynamoDB/{export_arn.rsplit('/', 1)[-1]}"


def write_export(
    s3: Any,
    bucket: str,
    prefix: str,
    items: Sequence[Mapping[str, Any]],
    *,
    files: int | Sequence[int],
    export_time: float,
    export_arn: str | None = None,
    table_arn: str = f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/orders",
) -> tuple[str, str]:
    """Write an export of `items` (DynamoDB JSON, binary as base64 text) to `bucket`; (export ARN, summary key).

    `files`: how many data files, the items dealt out in order and as evenly as they go (more files than items:
    the rest are empty), or the number of items in each file, in order (0: an empty file). Empty files are gzip
    streams of nothing, as DynamoDB writes for an empty partition. `export_arn` None makes one up in DynamoDB's
    form; give moto's (`start_moto_export`) when the source will ask moto's DescribeExport about it."""
    if export_arn is None:
        export_arn = f"{table_arn}/export/{int(export_time * 1000):014d}-{uuid.uuid4().hex[:8]}"
    sizes = _sizes(len(items), files)
    base = export_base(prefix, export_arn)
    s3.put_object(Bucket=bucket, Key=f"{base}/_started", Body=b"")
    entries: list[str] = []
    start = 0
    for size in sizes:
        lines = "".join(json.dumps({"Item": item}) + "\n" for item in items[start : start + size])
        start += size
        body = gzip.compress(lines.encode())
        key = f"{base}/data/{uuid.uuid4().hex[:26]}.json.gz"
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        digest = hashlib.md5(body)
        entries.append(
            json.dumps(
                {
                    "itemCount": size,
                    "md5Checksum": base64.b64encode(digest.digest()).decode(),
                    "etag": digest.hexdigest(),
                    "dataFileS3Key": key,
                }
            )
        )
    files_key = f"{base}/manifest-files.json"
    s3.put_object(Bucket=bucket, Key=files_key, Body="".join(f"{entry}\n" for entry in entries).encode())
    summary = {
        "version": "2020-06-30",
        "exportArn": export_arn,
        "startTime": _iso(export_time),
        "endTime": _iso(max(export_time, time.time())),
        "tableArn": table_arn,
        "tableId": str(uuid.uuid4()),
        "exportTime": _iso(export_time),
        "s3Bucket": bucket,
        "s3Prefix": prefix,
        "s3SseAlgorithm": "AES256",
        "s3SseKmsKeyId": None,
        "manifestFilesS3Key": files_key,
        "billedSizeBytes": 0,
        "itemCount": len(items),
        "outputFormat": "DYNAMODB_JSON",
    }
    summary_key = f"{base}/manifest-summary.json"
    s3.put_object(Bucket=bucket, Key=summary_key, Body=json.dumps(summary).encode())
    return export_arn, summary_key


def data_file_keys(s3: Any, bucket: str, summary_key: str) -> list[str]:
    """The data files of an export written by `write_export`, in manifest order."""
    summary = json.loads(s3.get_object(Bucket=bucket, Key=summary_key)["Body"].read())
    manifest = s3.get_object(Bucket=bucket, Key=summary["manifestFilesS3Key"])["Body"].read().decode()
    return [json.loads(line)["dataFileS3Key"] for line in manifest.splitlines() if line]


def _sizes(count: int, files: int | Sequence[int]) -> list[int]:
    if isinstance(files, int):
        if files < 1:
            raise ValueError("an export has at least one data file")
        return [count // files + (1 if i < count % files else 0) for i in range(files)]
    if sum(files) != count or any(size < 0 for size in files):
        raise ValueError(f"file sizes {list(files)} do not add up to {count} items")
    return list(files)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
