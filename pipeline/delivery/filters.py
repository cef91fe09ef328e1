"""Which change records go on: pipeline-wide (`[filter]`) and per sink (`filter = {...}` on a `[[sinks]]` entry).

A filter is a set of conditions that must all hold, plus `any_of` (alternatives, at least one must admit the
record) and `exclude` (filters that must not admit it). The config file and the command-line form
(`parse_filter`, for `streamsink tail --filter`) both produce the same `FilterSettings`, so the two cannot drift
apart; `compile_filter` turns it into a `RecordFilter` once, before any record is seen.

Values are compared with the unmarshalled record, where every DynamoDB number is a `Decimal`: a filter value
matches a number attribute when it has the same numeric value, so `5`, `5.0` and `"5"` all match N 5 and N 5.0.
A string matches an S attribute with the same text, and "true" / "false" also match BOOL attributes, so the
command-line form (where every value is text) means what the config file means.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pipeline.records import Batch, ChangeRecord, EventName

EVENT_NAMES: tuple[EventName, ...] = ("INSERT", "MODIFY", "REMOVE", "SNAPSHOT")
TtlDeletes = Literal["include", "exclude", "only"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_CONDITION_KEYS = "equals, one_of, prefix, exists"


def _event_name(value: Any) -> Any:
    if isinstance(value, str) and value.upper() in EVENT_NAMES:
        return value.upper()
    raise PydanticCustomError("event_name", "must be one of INSERT, MODIFY, REMOVE")


def _filter_value(value: Any) -> Any:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise PydanticCustomError("filter_value", "must be a string, a number or true/false")


FilterValue = Annotated[Any, AfterValidator(_filter_value)]
"""A value to compare with: a string, a finite number or a boolean."""

AttributeName = Annotated[str, Field(min_length=1)]


class ValueCondition(BaseModel):
    """What one attribute must look like. All the keys given must hold.

    Written as a bare value (`status = "shipped"`, equality), a list (`status = ["shipped", "paid"]`, one of
    them) or a table with any of `equals`, `one_of`, `prefix` (strings only), `exists` (true / false).
    """

    model_config = _FROZEN

    equals: FilterValue | None = None
    one_of: list[FilterValue] | None = Field(default=None, min_length=1)
    prefix: str | None = Field(default=None, min_length=1)
    exists: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return data
        if isinstance(data, list):
            return {"one_of": data}
        if isinstance(data, bool | int | float | str):
            return {"equals": data}
        raise PydanticCustomError(
            "filter_condition",
            "must be a value, a list of values, or a table with any of " + _CONDITION_KEYS,
        )

    @model_validator(mode="after")
    def _satisfiable(self) -> ValueCondition:
        given = [name for name in ("equals", "one_of", "prefix") if getattr(self, name) is not None]
        if not given and self.exists is None:
            raise PydanticCustomError("filter_condition", "give at least one of " + _CONDITION_KEYS)
        if given and self.exists is False:
            raise PydanticCustomError(
                "filter_condition",
                "exists = false cannot be combined with {given}: a missing attribute has no value",
                {"given": ", ".join(given)},
            )
        return self


Conditions = dict[str, ValueCondition]


class FilterSettings(BaseModel):
    """One filter: every condition given must hold, at least one of `any_of`, and none of `exclude`.

    An empty filter admits every record. Attribute conditions look in `attributes` (the item as the change left
    it: the new image, or the old image for REMOVE; only key attributes when the stream carries no such image),
    `new_image` or `old_image` (that image exactly; a record without it has no attributes there).
    """

    model_config = _FROZEN

    event_names: list[Annotated[EventName, BeforeValidator(_event_name)]] | None = Field(
        default=None,
        min_length=1,
        description="INSERT, MODIFY, REMOVE, SNAPSHOT (an initial load's items; any case); unset: all.",
    )
    keys: Conditions = Field(default_factory=dict, description="Conditions on key attributes.")
    attributes: Conditions = Field(
        default_factory=dict, description="Conditions on the item: the new image, the old one for REMOVE."
    )
    new_image: Conditions = Field(default_factory=dict, description="Conditions on the new image.")
    old_image: Conditions = Field(default_factory=dict, description="Conditions on the old image.")
    changed_attributes: list[AttributeName] | None = Field(
        default=None,
        min_length=1,
        description="A MODIFY passes only when one of these differs between old and new image; INSERT and "
        "REMOVE pass. A MODIFY without both images passes, since it cannot be shown to be irrelevant.",
    )
    ttl_deletes: TtlDeletes = Field(
        default="include",
        description="Deletes made by TTL expiry: 'include' (no condition), 'exclude' them, or 'only' them.",
    )
    any_of: list[FilterSettings] | None = Field(
        default=None, min_length=1, description="Alternatives: at least one must admit the record."
    )
    exclude: list[FilterSettings] | None = Field(
        default=None, min_length=1, description="A record any of these admits is dropped."
    )


# -- compiled form ---------------------------------------------------------------------------------------------

Check = Callable[[ChangeRecord], bool]


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """A compiled filter. `admits(record)` is all there is; `select` applies it to a batch."""

    checks: tuple[Check, ...] = ()

    @property
    def admits_all(self) -> bool:
        return not self.checks

    def admits(self, record: ChangeRecord) -> bool:
        return all(check(record) for check in self.checks)

    def select(self, batch: Batch) -> Batch:
        """The admitted records of `batch`, in order; `batch` itself when all are admitted."""
        if not self.checks:
            return batch
        kept = tuple(record for record in batch.records if self.admits(record))
        if len(kept) == len(batch.records):
            return batch
        return Batch(kept, sum(record.size_bytes for record in kept))


ADMIT_ALL = RecordFilter()


def compile_filter(settings: FilterSettings) -> RecordFilter:
    checks: list[Check] = []
    if settings.event_names:
        names = frozenset(settings.event_names)
        checks.append(lambda record: record.event_name in names)
    if settings.ttl_deletes != "include":
        wanted = settings.ttl_deletes == "only"
        checks.append(lambda record: _is_ttl_delete(record) is wanted)
    for name, condition in settings.keys.items():
        checks.append(_image_check(lambda record: record.keys, name, condition))
    for name, condition in settings.attributes.items():
        checks.append(_image_check(_item, name, condition))
    for name, condition in settings.new_image.items():
        checks.append(_image_check(lambda record: record.new_image, name, condition))
    for name, condition in settings.old_image.items():
        checks.append(_image_check(lambda record: record.old_image, name, condition))
    if settings.changed_attributes:
        checks.append(_changed_check(tuple(settings.changed_attributes)))
    if settings.any_of:
        alternatives = tuple(compile_filter(alternative) for alternative in settings.any_of)
        checks.append(lambda record: any(alternative.admits(record) for alternative in alternatives))
    if settings.exclude:
        excluded = tuple(compile_filter(exclusion) for exclusion in settings.exclude)
        checks.append(lambda record: not any(exclusion.admits(record) for exclusion in excluded))
    return RecordFilter(tuple(checks))


def _is_ttl_delete(record: ChangeRecord) -> bool:
    return record.user_identity is not None and record.user_identity.is_ttl_expiry


def _item(record: ChangeRecord) -> Mapping[str, Any] | None:
    image = record.old_image if record.event_name == "REMOVE" else record.new_image
    return record.keys if image is None else image


@dataclass(frozen=True, slots=True)
class _Values:
    """Filter values, sorted by the DynamoDB type each can match."""

    texts: frozenset[str]
    numbers: frozenset[Decimal]
    booleans: frozenset[bool]

    @classmethod
    def of(cls, values: Iterable[Any]) -> _Values:
        texts: set[str] = set()
        numbers: set[Decimal] = set()
        booleans: set[bool] = set()
        for value in values:
            if isinstance(value, bool):
                booleans.add(value)
            elif isinstance(value, int):
                numbers.add(Decimal(value))
            elif isinstance(value, float):
                numbers.add(Decimal(repr(value)))  # the shortest decimal that reads back as this float: 0.1 is 0.1
            else:
                texts.add(value)
                if _NUMBER.fullmatch(value):
                    numbers.add(Decimal(value))
                if value in ("true", "false"):
                    booleans.add(value == "true")
        return cls(frozenset(texts), frozenset(numbers), frozenset(booleans))

    def __contains__(self, value: Any) -> bool:
        # bool before Decimal: True == 1 would blur BOOL and N.
        if isinstance(value, bool):
            return value in self.booleans
        if isinstance(value, str):
            return value in self.texts
        if isinstance(value, Decimal):
            return value in self.numbers  # Decimal("5") and Decimal("5.0") are equal and hash alike
        return False  # binary, sets, maps, lists and NULL equal no filter value


@dataclass(frozen=True, slots=True)
class _ValueTest:
    equal_to: tuple[_Values, ...]  # the value must be among each of these
    prefix: str | None
    exists: bool | None

    @classmethod
    def of(cls, condition: ValueCondition) -> _ValueTest:
        equal_to = []
        if condition.equals is not None:
            equal_to.append(_Values.of([condition.equals]))
        if condition.one_of is not None:
            equal_to.append(_Values.of(condition.one_of))
        return cls(tuple(equal_to), condition.prefix, condition.exists)

    def matches(self, image: Mapping[str, Any] | None, name: str) -> bool:
        if image is None or name not in image:
            return self.exists is False
        if self.exists is False:
            return False
        value = image[name]
        if not all(value in values for values in self.equal_to):
            return False
        return self.prefix is None or (isinstance(value, str) and value.startswith(self.prefix))


def _image_check(
    image_of: Callable[[ChangeRecord], Mapping[str, Any] | None], name: str, condition: ValueCondition
) -> Check:
    test = _ValueTest.of(condition)
    return lambda record: test.matches(image_of(record), name)


def _changed_check(names: tuple[str, ...]) -> Check:
    def check(record: ChangeRecord) -> bool:
        if record.event_name != "MODIFY" or record.new_image is None or record.old_image is None:
            return True
        return any(_differs(record.old_image, record.new_image, name) for name in names)

    return check


def _differs(old: Mapping[str, Any], new: Mapping[str, Any], name: str) -> bool:
    if (name in old) != (name in new):
        return True
    return name in old and not _same_value(old[name], new[name])


def _same_value(a: Any, b: Any) -> bool:
    """Equality of unmarshalled values that keeps DynamoDB types apart (BOOL true is not N 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- command-line form -----------------------------------------------------------------------------------------


class FilterSyntaxError(ValueError):
    """A command-line filter expression that does not parse; the message names the clause and the fix."""


_IMAGES = {"key": "keys", "attr": "attributes", "new": "new_image", "old": "old_image"}
_CLI_GRAMMAR = (
    "event=NAMES, ttl=include|exclude|only, changed=ATTRS, has=[new.|old.]ATTR, "
    "key.ATTR=V, key.ATTR^=PREFIX, attr.ATTR=V, new.ATTR=V, old.ATTR=V; ! or != negates, `or` separates alternatives"
)


def parse_filter(text: str) -> FilterSettings:
    """Parse a one-line filter, e.g. `event=MODIFY key.pk^=customer# changed=status`.

    Clauses separated by spaces must all hold; the word `or` separates alternatives; a clause starting with
    `!` (or using `!=`) excludes what it matches. Values with spaces are quoted as in a shell. The README has
    the full grammar.
    """
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise FilterSyntaxError(f"{text!r}: {exc}") from None
    if not tokens:
        raise FilterSyntaxError(f"empty filter; clauses: {_CLI_GRAMMAR}")
    groups: list[list[str]] = [[]]
    for token in tokens:
        if token.lower() == "or":
            groups.append([])
        else:
            groups[-1].append(token)
    if any(not group for group in groups):
        raise FilterSyntaxError(f"{text!r}: 'or' needs clauses on both sides")
    alternatives = [_parse_alternative(group) for group in groups]
    if len(alternatives) == 1:
        return alternatives[0]
    return FilterSettings(any_of=alternatives)


def _parse_alternative(clauses: list[str]) -> FilterSettings:
    merged: dict[str, Any] = {}
    excluded: list[FilterSettings] = []
    for clause in clauses:
        negated, fields = _parse_clause(clause)
        try:
            parsed = FilterSettings.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(_plain_error(error) for error in exc.errors())
            raise FilterSyntaxError(f"{clause!r}: {problems}") from None
        if negated:
            excluded.append(parsed)
        else:
            _merge(merged, fields, clause)
    if excluded:
        merged["exclude"] = excluded
    return FilterSettings.model_validate(merged)


def _parse_clause(clause: str) -> tuple[bool, dict[str, Any]]:
    negated = clause.startswith("!")
    body = clause[1:] if negated else clause
    at = body.find("=")
    if at <= 0:
        raise FilterSyntaxError(f"{clause!r}: expected NAME=VALUE; clauses: {_CLI_GRAMMAR}")
    operator = "="
    name = body[:at]
    if name.endswith(("^", "!")):
        operator = name[-1] + "="
        name = name[:-1]
    value = body[at + 1 :]
    if operator == "!=":
        if negated:
            raise FilterSyntaxError(f"{clause!r}: use either a leading ! or !=, not both")
        negated = True
    if name in ("event", "ttl", "changed", "has"):
        if operator == "^=":
            raise FilterSyntaxError(f"{clause!r}: ^= (prefix) applies to attributes, e.g. key.pk^=customer#")
        return negated, _plain_clause(clause, name, value)
    scope, dot, attribute = name.partition(".")
    if not dot or scope not in _IMAGES or not attribute:
        raise FilterSyntaxError(f"{clause!r}: unknown name {name!r}; clauses: {_CLI_GRAMMAR}")
    condition: dict[str, Any] = {"prefix": value} if operator == "^=" else {"equals": value}
    return negated, {_IMAGES[scope]: {attribute: condition}}


def _plain_clause(clause: str, name: str, value: str) -> dict[str, Any]:
    if name == "event":
        return {"event_names": value.split(",")}
    if name == "ttl":
        return {"ttl_deletes": value}
    if name == "changed":
        return {"changed_attributes": value.split(",")}
    scope, dot, attribute = value.partition(".")
    if dot and scope in ("new", "old") and attribute:
        return {_IMAGES[scope]: {attribute: {"exists": True}}}
    if not value:
        raise FilterSyntaxError(f"{clause!r}: name an attribute, e.g. has=status or has=new.status")
    return {"attributes": {value: {"exists": True}}}


def _merge(merged: dict[str, Any], fields: dict[str, Any], clause: str) -> None:
    """Add one clause's fields; two clauses on the same attribute combine (`key.pk^=a key.pk=ab`)."""
    for field, value in fields.items():
        if field not in merged:
            merged[field] = value
        elif isinstance(value, dict) and field in _IMAGES.values():
            for attribute, condition in value.items():
                existing = merged[field].setdefault(attribute, {})
                clash = existing.keys() & condition.keys()
                if clash:
                    raise FilterSyntaxError(
                        f"{clause!r}: {attribute} already has a condition like this; use `or` for alternatives"
                    )
                existing.update(condition)
        else:
            raise FilterSyntaxError(f"{clause!r}: {field} is already given; use `or` for alternatives")


def _plain_error(error: Mapping[str, Any]) -> str:
    # The clause is named already; its one field's location would only repeat it.
    got = error.get("input")
    return str(error["msg"]) + ("" if isinstance(got, dict | list) else f" (got {got!r})")
