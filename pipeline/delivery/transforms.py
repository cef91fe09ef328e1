"""What one sink is given: the records its `filter` admits, passed through its `record_transform`, then cut down
to its `project` attributes, in that order.

The filter sees whole records, so it can test attributes a projection later removes. A transform or projection
that changes an image also rewrites `raw` (the stream record in DynamoDB JSON) to match, because sinks that
forward the stream record as-is (SQS, SNS, the archive's `dynamodb_json` encoding) read `raw`, not the images:
an attribute masked in `new_image` must not travel on in `raw`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

from boto3.dynamodb.types import TypeSerializer
from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from pipeline.delivery.filters import ADMIT_ALL, FilterSettings, RecordFilter, compile_filter
from pipeline.records import Batch, ChangeRecord

RecordTransform = Callable[[ChangeRecord], ChangeRecord | None]
"""Called with each admitted record; returns the record to deliver (e.g. `dataclasses.replace` with masked
attributes) or None to drop it for this sink. It must not change the record it is given: other sinks get it."""

_IMAGES = (("keys", "Keys"), ("new_image", "NewImage"), ("old_image", "OldImage"))
_SERIALIZER = TypeSerializer()
_ABSENT = object()


class TransformError(Exception):
    """A `record_transform` raised, or returned something that is not a ChangeRecord or None."""


def import_callable(reference: str, *, expected: str) -> Callable[..., Any]:
    """Import `"package.module:function"`; a ValueError says what is wrong and how to fix it.

    `expected` describes the function wanted, for the message when the name is not callable.
    """
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute or ":" in attribute:
        raise ValueError('must be "package.module:function", e.g. "myapp.masking:mask_email"')
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"module {module_name!r} cannot be imported ({type(exc).__name__}: {exc}); install the package that "
            "holds it or add its directory to PYTHONPATH"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r}; define {expected} there or fix the name")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{attribute!r} is a {type(target).__name__}, not a function; name {expected}")
    function: Callable[..., Any] = target
    return function


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
        raise TransformError(f"record_transform raised {type(exc).__name__}: {exc}") from exc
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
                raise TransformError(f"record_transform returned a {field} DynamoDB cannot hold: {exc}") from exc
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


class FeedSettings(Protocol):
    """The per-sink fields every `[[sinks]]` entry has (sinks.base.SinkSettings)."""

    @property
    def filter(self) -> FilterSettings: ...

    @property
    def record_transform(self) -> str | None: ...

    @property
    def project(self) -> Sequence[str] | None: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """One batch as one sink is to get it, and what happened to the rest."""

    batch: Batch
    filtered: int
    """Records the filter did not admit, or the transform dropped: not failures, and never retried."""
    failed: tuple[tuple[ChangeRecord, TransformError], ...]
    """Records (as they came in) whose transform failed: refused for this sink, like a sink's own refusal."""


@dataclass(frozen=True, slots=True)
class SinkFeed:
    """A sink's filter, transform and projection, resolved once when the pipeline is built."""

    record_filter: RecordFilter = ADMIT_ALL
    transform: RecordTransform | None = None
    keep: frozenset[str] | None = None

    @classmethod
    def of(cls, settings: FeedSettings) -> SinkFeed:
        return cls(
            compile_filter(settings.filter),
            None if settings.record_transform is None else resolve_record_transform(settings.record_transform),
            None if settings.project is None else frozenset(settings.project),
        )

    def prepare(self, batch: Batch) -> Prepared:
        if self.record_filter.admits_all and self.transform is None and self.keep is None:
            return Prepared(batch, 0, ())
        given: list[ChangeRecord] = []
        filtered = 0
        failed: list[tuple[ChangeRecord, TransformError]] = []
        for record in batch.records:
            if not self.record_filter.admits(record):
                filtered += 1
                continue
            shaped: ChangeRecord | None = record
            if self.transform is not None:
                try:
                    shaped = apply_transform(self.transform, record)
                except TransformError as error:
                    failed.append((record, error))
                    continue
            if shaped is None:
                filtered += 1
                continue
            given.append(shaped if self.keep is None else project(shaped, self.keep))
        return Prepared(Batch(tuple(given), sum(r.size_bytes for r in given)), filtered, tuple(failed))
