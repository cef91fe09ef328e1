"""Per-sink record transforms: a user's `record_transform`, and `project`, each keeping `raw` in step.

A transform or projection that changes an image also rewrites `raw` (the stream record in DynamoDB JSON) to match,
because sinks that forward the stream record as-is (SQS, SNS, the archive's `dynamodb_json` encoding) read `raw`,
not the images: an attribute masked in `new_image` must not travel on in `raw`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Annotated, Any

from boto3.dynamodb.types import TypeSerializer
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from pipeline.records import ChangeRecord
from pipeline.user_code import import_callable

RecordTransform = Callable[[ChangeRecord], ChangeRecord | None]
"""Called with each admitted record; returns the record to deliver (e.g. `dataclasses.replace` with masked
attributes) or None to drop it for this sink. It must not change the record it is given: other sinks get it."""

_IMAGES = (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage"))
_SERIALIZER = TypeSerializer()
_ABSENT = object()


class TransformError(Exception):
    """A `record_transform` raised, or returned something that is not a ChangeRecord or None.

    The message names the exception's class, never its text: a transform's error may quote the very value it
    was to mask, and this message reaches logs and the dead-letter destination."""


_EXPECTED = "a function taking a ChangeRecord and returning a ChangeRecord or None"


def resolve_record_transform(reference: str) -> RecordTransform:
    function: RecordTransform = import_callable(reference, expected=_EXPECTED)
    return function


def _importable(reference: str) -> str:
    try:
        resolve_record_transform(reference)
    except ValueError as exc:
        raise PydanticCustomError("record_transform", "{reason}", {"reason": str(exc)}) from None
    return reference


TransformReference = Annotated[str, AfterValidator(_importable)]
"""A `record_transform` setting: checked to import and be callable when the config is validated."""


def apply_transform(transform: RecordTransform, record: ChangeRecord) -> ChangeRecord | None:
    """Run a user transform; its result's `raw` follows any image it changed. Raises TransformError."""
    try:
        result = transform(record)
    except Exception as exc:
        raise TransformError(f"record_transform raised {type(exc).__name__}") from exc
    if result is None or result is record:
        return result
    if not isinstance(result, ChangeRecord):
        raise TransformError(
            f"record_transform returned a {type(result).__name__}; return a ChangeRecord "
            "(e.g. dataclasses.replace(record, new_image=...)) or None to drop the record"
        )
    if result.raw is not record.raw:
        return result  # the transform wrote its own stream record
    changed = [(field, tag) for field, tag in _IMAGES if getattr(result, field) is not getattr(record, field)]
    if not changed:
        return result
    stream = dict(result.raw["dynamodb"])
    for field, tag in changed:
        image: Mapping[str, Any] | None = getattr(result, field)
        if image is None:
            stream.pop(tag, None)
        else:
            try:
                stream[tag] = _typed(image, getattr(record, field) or {}, stream.get(tag) or {})
            except (TypeError, ValueError, ArithmeticError) as exc:
                raise TransformError(
                    f"record_transform returned a {field} DynamoDB cannot hold ({type(exc).__name__})"
                ) from exc
    return replace(result, raw={**result.raw, "dynamodb": stream})


def _typed(image: Mapping[str, Any], before: Mapping[str, Any], typed_before: Mapping[str, Any]) -> dict[str, Any]:
    """DynamoDB JSON for `image`. A value the transform passed on untouched (the very same object) keeps its
    typed form from the stream record: masking one attribute costs one attribute's marshalling, not the item's."""
    typed: dict[str, Any] = {}
    for name, value in image.items():
        kept = typed_before.get(name)
        typed[name] = kept if kept is not None and before.get(name, _ABSENT) is value else _SERIALIZER.serialize(value)
    return typed


def project(record: ChangeRecord, attributes: Collection[str]) -> ChangeRecord:
    """Keep only `attributes` and the key attributes in both images (and in `raw`)."""
    keep = set(attributes).union(record.keys)

    def cut(image: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        return None if image is None else {name: value for name, value in image.items() if name in keep}

    new_image, old_image = cut(record.new_image), cut(record.old_image)
    if _same_size(record.new_image, new_image) and _same_size(record.old_image, old_image):
        return record
    stream = dict(record.raw["dynamodb"])
    for tag in ("NewImage", "OldImage"):
        if tag in stream:
            stream[tag] = cut(stream[tag])
    return replace(record, new_image=new_image, old_image=old_image, raw={**record.raw, "dynamodb": stream})


def _same_size(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> bool:
    return before is None or after is None or len(before) == len(after)
