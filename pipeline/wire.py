"""GetRecords bodies parsed by orjson instead of botocore's shape walker.

botocore parses a response value by value in Python against the service model. For a GetRecords page of
1000 NEW_AND_OLD_IMAGES records that is about half a second of CPU, ten times what parsing the JSON costs, and
most of what it does (blobs to bytes, the timestamp to a datetime) the pipeline undoes again for the archive.

`parse_get_records` runs on botocore's `before-parse` event. For a 2xx response it parses the body with orjson,
hands `Records` and `NextShardIterator` over through `customized_response_dict` (botocore merges that into its
parsed response) and gives botocore's parser the body without them. Everything else stays botocore's:
signing, `ResponseMetadata`, and every non-2xx response, which is left untouched so error codes
parse exactly as before.

The records then stay in wire form: binary as base64 text, `ApproximateCreationDateTime` as epoch seconds,
numbers as the digit strings they always were. `pipeline.records` accepts both forms and builds the same
ChangeRecord from either; `ChangeRecord.raw` is the wire form, as a Lambda consumer would see it.
"""

from __future__ import annotations

from typing import Any

import orjson

GET_RECORDS_EVENT = "before-parse.dynamodb-streams.GetRecords"
_HANDLER_ID = "streamsink.wire.parse_get_records"


def parse_get_records(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    """The `before-parse` handler. Anything it does not recognise it leaves for botocore to parse as usual."""
    if response_dict.get("status_code", 500) >= 300:
        return
    body = response_dict.get("body")
    if not isinstance(body, bytes | bytearray) or not body:
        return
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return  # botocore's parser reports a malformed body its own way
    if not isinstance(parsed, dict) or not isinstance(parsed.get("Records", []), list):
        return
    if "Records" in parsed:
        customized_response_dict["Records"] = parsed.pop("Records")
    if isinstance(parsed.get("NextShardIterator"), str):
        customized_response_dict["NextShardIterator"] = parsed.pop("NextShardIterator")
    # Whatever else the body holds (nothing, today) is still botocore's to parse.
    response_dict["body"] = orjson.dumps(parsed)


def install_fast_get_records(client: Any) -> None:
    """Have a `dynamodbstreams` client parse GetRecords with `parse_get_records`; idempotent.

    Each boto3 client has its own copy of the event hooks, so other clients of the same session keep
    botocore's parser.
    """
    client.meta.events.register(GET_RECORDS_EVENT, parse_get_records, unique_id=_HANDLER_ID)
