"""An initial load's Scan parsed by msgspec (`pipeline.wire.parse_scan`, `AwsClients.scan_client`) against
botocore's own parser on the same moto table: the same items, the same records, the same archive rows; a binary
LastEvaluatedKey goes back as ExclusiveStartKey and the scan goes on exactly where it was."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from pipeline.aws import AwsClients
from pipeline.records import snapshot_record
from pipeline.testing.emulator import EmbeddedAws
from sinks.s3_parquet import archive_table
from tests.conftest import unique


def _table_with_binary_sort_key(dynamodb: Any) -> str:
    name = unique("scanned")
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "B"},
        ],
    )
    for n in range(25):
        dynamodb.put_item(
            TableName=name,
            Item={
                "pk": {"S": f"p{n % 3}"},
                "sk": {"B": bytes([n, 255, 0])},
                "n": {"N": "12345678901234567890123456789012345678"},
                "m": {"M": {"l": {"L": [{"S": "ü"}, {"BOOL": True}, {"NULL": True}]}, "bs": {"BS": [b"\x01"]}}},
                "ns": {"NS": ["1", "2.5"]},
            },
        )
    return name


def _wire_json(item: dict[str, Any]) -> Any:
    """botocore's item as the service's JSON would read: binary as base64 text."""

    def value(v: Any) -> Any:
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [value(x) for x in v]
        return v

    return value(item)


def test_scan_items_as_text_equal_botocores_items_and_resume_from_a_binary_key(aws: EmbeddedAws) -> None:
    plain = aws.client("dynamodb")
    name = _table_with_binary_sort_key(plain)
    fast = AwsClients(aws.region, aws.endpoint_url).scan_client()
    expected: list[Any] = []
    got: list[bytes] = []
    request: dict[str, Any] = {"TableName": name, "Limit": 7, "ReturnConsumedCapacity": "TOTAL"}
    fast_request = dict(request)
    while True:
        page = plain.scan(**request)
        fast_page = fast.scan(**fast_request)
        expected += page["Items"]
        got += fast_page["Items"]
        assert all(isinstance(item, bytes) for item in fast_page["Items"])
        assert fast_page.get("LastEvaluatedKey") == page.get("LastEvaluatedKey")  # botocore's: B as bytes
        assert fast_page["ConsumedCapacity"] == page["ConsumedCapacity"]
        if "LastEvaluatedKey" not in page:
            break
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        fast_request["ExclusiveStartKey"] = fast_page["LastEvaluatedKey"]
    assert len(got) == 25
    assert [orjson.loads(item) for item in got] == [_wire_json(item) for item in expected]

    def records(items: list[Any]) -> list[Any]:
        return [
            snapshot_record(
                item,
                key_names=("pk", "sk"),
                load_id="load-1",
                table=name,
                segment=0,
                page=0,
                index=i,
                read_at=1_800_000_000.0,
                size_bytes=100,
            )
            for i, item in enumerate(items)
        ]

    from_text, from_dicts = records(got), records(expected)
    assert [r.keys for r in from_text] == [r.keys for r in from_dicts]
    assert [dict(r.new_image or {}) for r in from_text] == [dict(r.new_image or {}) for r in from_dicts]
    text_rows = archive_table(from_text).to_pylist()
    dict_rows = archive_table(from_dicts).to_pylist()
    for a, b in zip(text_rows, dict_rows, strict=True):
        assert orjson.loads(a.pop("new_image")) == orjson.loads(b.pop("new_image"))
        assert orjson.loads(a.pop("keys")) == orjson.loads(b.pop("keys"))
        assert a == b
