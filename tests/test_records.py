"""Unmarshalling of DynamoDB JSON and the plain-JSON form of unmarshalled values."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import dateutil.tz
import pytest
from boto3.dynamodb.types import DYNAMODB_CONTEXT, Binary, TypeSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.records import (
    UnmarshalError,
    change_record_from_stream,
    to_json,
    to_json_bytes,
    unmarshal_image,
    unmarshal_value,
)
from tests.factories import change_record, stream_record, ttl_identity

# 38 significant digits, the most DynamoDB keeps.
DIGITS_38 = "12345678901234567890123456789012345678"


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ({"S": "héllo"}, "héllo"),
        ({"S": ""}, ""),
        ({"N": "42"}, Decimal("42")),
        ({"N": "-0.5"}, Decimal("-0.5")),
        ({"BOOL": True}, True),
        ({"BOOL": False}, False),
        ({"NULL": True}, None),
        ({"B": b"\x00\xffraw"}, b"\x00\xffraw"),
    ],
)
def test_scalars_unmarshal_to_python(typed: dict[str, Any], expected: Any) -> None:
    value = unmarshal_value(typed)
    assert value == expected
    assert type(value) is type(expected)


def test_binary_arrives_decoded_from_boto3_or_as_base64_text_from_the_wire() -> None:
    blob = bytes(range(256))
    assert unmarshal_value({"B": blob}) == blob
    assert unmarshal_value({"B": bytearray(blob)}) == blob
    assert unmarshal_value({"B": base64.b64encode(blob).decode("ascii")}) == blob
    assert unmarshal_value({"BS": [base64.b64encode(b"a").decode(), base64.b64encode(b"b").decode()]}) == {
        b"a",
        b"b",
    }


def test_numbers_keep_every_digit_as_decimal() -> None:
    for text in (DIGITS_38, f"-{DIGITS_38}", f"0.{DIGITS_38}", f"1.{DIGITS_38[1:]}E+125", "1E-130"):
        value = unmarshal_value({"N": text})
        assert isinstance(value, Decimal)
        assert value == Decimal(text)
        assert str(value) == str(Decimal(text))


def test_sets_unmarshal_to_frozensets() -> None:
    assert unmarshal_value({"SS": ["b", "a"]}) == frozenset({"a", "b"})
    assert unmarshal_value({"NS": ["10", "9.5", DIGITS_38]}) == frozenset(
        {Decimal("10"), Decimal("9.5"), Decimal(DIGITS_38)}
    )
    assert unmarshal_value({"BS": [b"x", b"y"]}) == frozenset({b"x", b"y"})
    for typed in ({"SS": ["a"]}, {"NS": ["1"]}, {"BS": [b"a"]}):
        assert isinstance(unmarshal_value(typed), frozenset)


def test_lists_and_maps_unmarshal_recursively() -> None:
    typed = {
        "M": {
            "name": {"S": "widget"},
            "tags": {"L": [{"S": "a"}, {"N": "1"}, {"NULL": True}, {"L": []}]},
            "dims": {"M": {"w": {"N": "1.5"}, "ok": {"BOOL": True}, "ids": {"NS": ["1", "2"]}}},
        }
    }
    assert unmarshal_value(typed) == {
        "name": "widget",
        "tags": ["a", Decimal("1"), None, []],
        "dims": {"w": Decimal("1.5"), "ok": True, "ids": frozenset({Decimal(1), Decimal(2)})},
    }


def test_unmarshal_image_unmarshals_each_attribute() -> None:
    image = {"pk": {"S": "order-1"}, "total": {"N": "19.99"}, "paid": {"BOOL": False}}
    assert unmarshal_image(image) == {"pk": "order-1", "total": Decimal("19.99"), "paid": False}
    assert unmarshal_image({}) == {}


@pytest.mark.parametrize(
    "typed",
    [
        {"X": "1"},
        {"s": "lower-case tag"},
        {},
        {"S": "a", "N": "1"},
        {"M": {"inner": {"NOPE": 1}}},
        {"L": [{"S": "ok"}, {"DATE": "2024-01-01"}]},
    ],
)
def test_values_outside_the_grammar_raise_unmarshal_error(typed: dict[str, Any]) -> None:
    with pytest.raises(UnmarshalError):
        unmarshal_value(typed)


def test_unmarshal_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'X'"):
        unmarshal_image({"a": {"S": "fine"}, "b": {"X": "bad"}})


# --- to_json -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        DIGITS_38,
        f"-{DIGITS_38}",
        f"0.{DIGITS_38}",
        f"{DIGITS_38[:20]}.{DIGITS_38[20:]}",
        f"1.{DIGITS_38[1:]}E+125",
        f"-9.{DIGITS_38[1:]}E-100",
        "1E+5",
        "1E-130",
        "0.000000000000000000000000000000000001",
        "100",
        "-0",
    ],
)
def test_numbers_survive_to_json_digit_for_digit(text: str) -> None:
    value = unmarshal_value({"N": text})
    encoded = to_json({"n": value, "in_list": [value]})

    # The JSON number token is exactly Decimal's rendering of what DynamoDB sent: no float in between.
    token = str(Decimal(text))
    assert encoded == f'{{"n":{token},"in_list":[{token}]}}'

    parsed = json.loads(encoded, parse_float=Decimal, parse_int=Decimal)
    assert parsed["n"] == Decimal(text)
    assert str(parsed["n"]) == token


def test_a_38_digit_number_parses_back_exactly_even_as_a_json_integer() -> None:
    parsed = json.loads(to_json(unmarshal_value({"N": DIGITS_38})))
    assert parsed == int(DIGITS_38)
    # A float would have kept about 17 of the 38 digits.
    assert float(DIGITS_38) != int(DIGITS_38)


def test_binary_becomes_base64_text() -> None:
    blob = b"\x00\x01\xfe\xff"
    assert json.loads(to_json({"b": unmarshal_value({"B": blob})})) == {"b": "AAH+/w=="}
    assert to_json_bytes(unmarshal_value({"B": blob})) == b'"AAH+/w=="'


def test_sets_become_sorted_arrays() -> None:
    assert to_json(unmarshal_value({"SS": ["pear", "apple", "fig"]})) == '["apple","fig","pear"]'
    # Numeric order, not text order: 9 before 10.
    assert to_json(unmarshal_value({"NS": ["10", "9", "-1.5", "1E+2"]})) == "[-1.5,9,10,1E+2]"
    blobs = [b"\xff", b"\x00\x01", b"\x00"]
    expected = [base64.b64encode(b).decode() for b in sorted(blobs)]
    assert json.loads(to_json(unmarshal_value({"BS": blobs}))) == expected


def test_to_json_of_a_full_image() -> None:
    image = unmarshal_image(
        {
            "pk": {"S": "a"},
            "n": {"N": "3.14"},
            "nested": {"M": {"l": {"L": [{"NULL": True}, {"BOOL": True}]}}},
        }
    )
    assert to_json(image) == '{"pk":"a","n":3.14,"nested":{"l":[null,true]}}'


def test_to_json_refuses_unknown_types() -> None:
    with pytest.raises(TypeError):
        to_json({"x": object()})


# --- change records ----------------------------------------------------------------------------------------


def test_change_record_from_stream_carries_every_field() -> None:
    raw = stream_record(
        sequence="4421584500000000017450439091",
        event_name="MODIFY",
        event_id="e-1",
        keys={"pk": {"S": "order-7"}},
        new_image={"pk": {"S": "order-7"}, "total": {"N": "20"}},
        old_image={"pk": {"S": "order-7"}, "total": {"N": "10"}},
        size_bytes=321,
    )
    record = change_record_from_stream(raw, table="orders", shard_id="shardId-9")
    assert record.event_id == "e-1"
    assert record.event_name == "MODIFY"
    assert record.table == "orders"
    assert record.shard_id == "shardId-9"
    assert record.sequence_number == "4421584500000000017450439091"
    assert record.sequence == 4421584500000000017450439091
    assert record.keys == {"pk": "order-7"}
    assert record.new_image == {"pk": "order-7", "total": Decimal(20)}
    assert record.old_image == {"pk": "order-7", "total": Decimal(10)}
    assert record.size_bytes == 321
    assert record.user_identity is None
    assert record.raw is raw


def test_missing_images_stay_none() -> None:
    insert = change_record(event_name="INSERT")
    remove = change_record(event_name="REMOVE")
    keys_only = change_record(event_name="MODIFY", view_type="KEYS_ONLY")
    assert insert.old_image is None and insert.new_image is not None
    assert remove.new_image is None and remove.old_image is not None
    assert keys_only.new_image is None and keys_only.old_image is None
    assert keys_only.keys == {"pk": "item-1"}


def test_sequence_compares_as_an_integer_not_as_text() -> None:
    assert change_record(sequence="10").sequence > change_record(sequence="9").sequence


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (
            datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2))),
            datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        ),
        (
            datetime(2024, 5, 1, 7, 30, tzinfo=timezone(timedelta(hours=-5))),
            datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        ),
        (datetime(2024, 5, 1, 12, 30, tzinfo=UTC), datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        # botocore parses timestamps with dateutil time zones.
        (
            datetime(2024, 5, 1, 8, 30, tzinfo=dateutil.tz.gettz("America/New_York")),
            datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        ),
        # A naive time is taken to be UTC already.
        (datetime(2024, 5, 1, 12, 30), datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
    ],
)
def test_approximate_creation_time_is_converted_to_utc(created: datetime, expected: datetime) -> None:
    record = change_record(created=created)
    assert record.approximate_creation_time == expected
    assert record.approximate_creation_time.utcoffset() == timedelta(0)
    assert record.approximate_creation_time.tzinfo is UTC


def test_approximate_creation_time_as_epoch_seconds_from_raw_wire_json() -> None:
    raw = stream_record()
    raw["dynamodb"]["ApproximateCreationDateTime"] = 1714566600.5
    record = change_record_from_stream(raw, table="t", shard_id="s")
    assert record.approximate_creation_time == datetime(2024, 5, 1, 12, 30, 0, 500000, tzinfo=UTC)


def test_ttl_expiry_is_recognised_from_user_identity() -> None:
    record = change_record(event_name="REMOVE", user_identity=ttl_identity())
    assert record.user_identity is not None
    assert record.user_identity.type == "Service"
    assert record.user_identity.principal_id == "dynamodb.amazonaws.com"
    assert record.user_identity.is_ttl_expiry


@pytest.mark.parametrize(
    "identity",
    [
        {"Type": "Service", "PrincipalId": "lambda.amazonaws.com"},
        {"Type": "User", "PrincipalId": "dynamodb.amazonaws.com"},
    ],
)
def test_other_identities_are_not_ttl_expiry(identity: dict[str, str]) -> None:
    record = change_record(event_name="REMOVE", user_identity=identity)
    assert record.user_identity is not None
    assert not record.user_identity.is_ttl_expiry


# --- property: whatever boto3 can write, unmarshal_value reads back -----------------------------------------


def _dynamodb_decimal(coefficient: int, exponent: int) -> Decimal:
    # Built from text: Decimal arithmetic would round to the default context's 28 digits.
    return DYNAMODB_CONTEXT.create_decimal(
        Decimal(f"{coefficient}E{exponent}")
    )  # raises if DynamoDB could not store it exactly


decimals = st.builds(_dynamodb_decimal, st.integers(-(10**38) + 1, 10**38 - 1), st.integers(-90, 80))
binaries = st.binary(max_size=32) | st.binary(max_size=32).map(Binary)
scalars = st.none() | st.booleans() | decimals | st.text(max_size=20) | binaries
sets = (
    st.frozensets(st.text(max_size=10), min_size=1, max_size=5)
    | st.frozensets(decimals, min_size=1, max_size=5)
    | st.sets(st.binary(max_size=10), min_size=1, max_size=5)
)
attribute_values = st.recursive(
    scalars | sets,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _as_unmarshalled(value: Any) -> Any:
    """What unmarshal_value gives back for a value boto3 serialized: bytes for Binary, frozensets for sets."""
    if isinstance(value, Binary):
        return value.value
    if isinstance(value, set | frozenset):
        return frozenset(_as_unmarshalled(v) for v in value)
    if isinstance(value, list):
        return [_as_unmarshalled(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_unmarshalled(v) for k, v in value.items()}
    return value


def _assert_same(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, Decimal):
        assert str(actual) == str(expected)  # the same digits and exponent, not merely an equal number
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same(actual[key], expected[key])
    else:
        assert actual == expected


@settings(deadline=None)
@given(attribute_values)
def test_unmarshal_value_inverts_boto3_type_serializer(value: Any) -> None:
    typed = TypeSerializer().serialize(value)
    _assert_same(unmarshal_value(typed), _as_unmarshalled(value))


@settings(deadline=None)
@given(decimals)
def test_any_dynamodb_number_survives_to_json(value: Decimal) -> None:
    typed = TypeSerializer().serialize(value)
    encoded = to_json(unmarshal_value(typed))
    assert encoded == str(value)
    parsed = json.loads(encoded, parse_float=Decimal, parse_int=Decimal)
    assert parsed == value
