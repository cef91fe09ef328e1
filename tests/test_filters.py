"""Filters: every condition, their combinations, the command-line form, and config errors as an operator sees them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.delivery.filters import FilterSettings, FilterSyntaxError, compile_filter, parse_filter
from pipeline.records import Batch, ChangeRecord, EventName
from pipeline.settings import ConfigError, load_settings
from tests.factories import change_record, ttl_identity

_SERIALIZER = TypeSerializer()


def _typed(image: dict[str, Any]) -> dict[str, Any]:
    return {name: _SERIALIZER.serialize(value) for name, value in image.items()}


def record(
    event: EventName = "MODIFY",
    *,
    pk: Any = "customer#1",
    new: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    ttl: bool = False,
    view_type: str = "NEW_AND_OLD_IMAGES",
) -> ChangeRecord:
    """A change to item `pk`; images are plain Python values (numbers as Decimal), keys added to both."""
    keys = {"pk": pk}
    return change_record(
        event_name=event,
        keys=_typed(keys),
        new_image=_typed({**keys, **(new or {})}),
        old_image=_typed({**keys, **(old or {})}),
        user_identity=ttl_identity() if ttl else None,
        view_type=view_type,
    )


def admits(spec: dict[str, Any], change: ChangeRecord) -> bool:
    return compile_filter(FilterSettings.model_validate(spec)).admits(change)


INSERT = record("INSERT", new={"status": "new"})
MODIFY = record("MODIFY", new={"status": "paid"}, old={"status": "new"})
REMOVE = record("REMOVE", old={"status": "paid"})
TTL_REMOVE = record("REMOVE", old={"status": "paid"}, ttl=True)


def test_an_empty_filter_admits_everything() -> None:
    assert compile_filter(FilterSettings()).admits_all
    assert all(admits({}, r) for r in (INSERT, MODIFY, REMOVE, TTL_REMOVE))


def test_event_names_admit_only_those_events_in_any_case() -> None:
    spec = {"event_names": ["insert", "REMOVE"]}
    assert FilterSettings.model_validate(spec).event_names == ["INSERT", "REMOVE"]
    assert [admits(spec, r) for r in (INSERT, MODIFY, REMOVE)] == [True, False, True]


@pytest.mark.parametrize(
    ("ttl_deletes", "expected"),
    [("include", [True, True, True]), ("exclude", [True, True, False]), ("only", [False, False, True])],
)
def test_ttl_deletes_include_exclude_or_only(ttl_deletes: str, expected: list[bool]) -> None:
    assert [admits({"ttl_deletes": ttl_deletes}, r) for r in (INSERT, REMOVE, TTL_REMOVE)] == expected


def test_key_equality_prefix_and_one_of() -> None:
    vip, plain, order = record(pk="customer#vip"), record(pk="customer#1"), record(pk="order#1")
    assert [admits({"keys": {"pk": "customer#1"}}, r) for r in (vip, plain, order)] == [False, True, False]
    assert [admits({"keys": {"pk": {"prefix": "customer#"}}}, r) for r in (vip, plain, order)] == [True, True, False]
    assert [admits({"keys": {"pk": ["order#1", "customer#vip"]}}, r) for r in (vip, plain, order)] == [
        True,
        False,
        True,
    ]
    both = {"keys": {"pk": {"prefix": "customer#", "one_of": ["customer#vip", "order#1"]}}}
    assert [admits(both, r) for r in (vip, plain, order)] == [True, False, False]


def test_a_condition_on_a_key_attribute_the_record_lacks_fails() -> None:
    assert not admits({"keys": {"sk": {"prefix": "a"}}}, INSERT)
    assert admits({"keys": {"sk": {"exists": False}}}, INSERT)


@pytest.mark.parametrize("wanted", ["5", "5.0", "5e0", "+5", 5, 5.0, ["4", 5]])
@pytest.mark.parametrize("stored", [Decimal("5"), Decimal("5.0"), Decimal("5.00")])
def test_a_number_matches_by_value_whether_written_as_number_or_text(wanted: Any, stored: Decimal) -> None:
    assert admits({"attributes": {"qty": wanted}}, record(new={"qty": stored}))
    assert admits({"keys": {"pk": wanted}}, record(pk=stored))


@pytest.mark.parametrize(
    ("wanted", "stored", "match"),
    [
        (0.1, Decimal("0.1"), True),  # a float means its shortest decimal form, not its binary expansion
        ("0.10", Decimal("0.1"), True),
        ("5", "5", True),  # text matches text exactly
        ("5.0", "5", False),
        (5, "5", False),  # a number never matches a string attribute
        ("abc", Decimal("5"), False),
        (True, True, True),
        ("true", True, True),  # the command-line form has only text
        (True, Decimal("1"), False),  # BOOL and N stay apart
        ("1", True, False),
        ("YQ==", b"a", False),  # binary, sets, maps, lists and NULL equal no filter value
        ("a", {"a"}, False),
        ("a", ["a"], False),
        ("null", None, False),
    ],
)
def test_value_matching_keeps_dynamodb_types_apart(wanted: Any, stored: Any, match: bool) -> None:
    assert admits({"attributes": {"x": wanted}}, record(new={"x": stored})) is match


def test_prefix_applies_to_strings_only() -> None:
    assert admits({"attributes": {"x": {"prefix": "1"}}}, record(new={"x": "12"}))
    assert not admits({"attributes": {"x": {"prefix": "1"}}}, record(new={"x": Decimal(12)}))


def test_attributes_look_in_the_new_image_and_in_the_old_one_for_remove() -> None:
    spec = {"attributes": {"status": "paid"}}
    assert admits(spec, MODIFY)  # new status paid, old status new
    assert admits(spec, REMOVE)  # the item as it was deleted
    assert not admits(spec, record("MODIFY", new={"status": "new"}, old={"status": "paid"}))


def test_attributes_fall_back_to_the_keys_when_the_stream_carries_no_image() -> None:
    keys_only = record("INSERT", pk="customer#1", new={"status": "paid"}, view_type="KEYS_ONLY")
    assert keys_only.new_image is None
    assert admits({"attributes": {"pk": {"prefix": "customer#"}}}, keys_only)
    assert not admits({"attributes": {"status": "paid"}}, keys_only)


def test_new_and_old_image_conditions_catch_a_transition() -> None:
    shipped = {"old_image": {"status": "paid"}, "new_image": {"status": "shipped"}}
    assert admits(shipped, record(new={"status": "shipped"}, old={"status": "paid"}))
    assert not admits(shipped, record(new={"status": "shipped"}, old={"status": "shipped"}))
    # An INSERT has no old image: nothing is there, so only `exists = false` holds.
    assert not admits({"old_image": {"status": {"exists": True}}}, INSERT)
    assert admits({"old_image": {"status": {"exists": False}}}, INSERT)


def test_exists_tests_presence_only() -> None:
    with_flag, without = record(new={"deleted": False}), record(new={})
    assert [admits({"attributes": {"deleted": {"exists": True}}}, r) for r in (with_flag, without)] == [True, False]
    assert [admits({"attributes": {"deleted": {"exists": False}}}, r) for r in (with_flag, without)] == [False, True]


def test_changed_attributes_drop_a_modify_that_touched_only_other_attributes() -> None:
    spec = {"changed_attributes": ["status", "price"]}
    assert admits(spec, record(new={"status": "paid", "seen": 2}, old={"status": "new", "seen": 1}))
    assert not admits(spec, record(new={"status": "new", "seen": 2}, old={"status": "new", "seen": 1}))
    assert admits(spec, record(new={"price": Decimal(3)}, old={}))  # added
    assert admits(spec, record(new={}, old={"price": Decimal(3)}))  # removed
    assert not admits(spec, record(new={"price": Decimal("3.0")}, old={"price": Decimal("3")}))  # same number
    assert admits(spec, record(new={"price": True}, old={"price": Decimal(1)}))  # BOOL true is not N 1
    assert admits(spec, record(new={"status": {"a": [Decimal(1)]}}, old={"status": {"a": [Decimal(2)]}}))
    assert not admits(spec, record(new={"status": {"a": [Decimal(1)]}}, old={"status": {"a": [Decimal(1)]}}))


def test_changed_attributes_pass_inserts_removes_and_modifies_without_both_images() -> None:
    spec = {"changed_attributes": ["status"]}
    assert admits(spec, INSERT)
    assert admits(spec, REMOVE)
    assert admits(spec, record(new={"status": "x"}, old={"status": "x"}, view_type="NEW_IMAGE"))


def test_every_condition_in_one_filter_must_hold() -> None:
    spec = {
        "event_names": ["MODIFY"],
        "keys": {"pk": {"prefix": "customer#"}},
        "attributes": {"status": "paid"},
        "changed_attributes": ["status"],
    }
    assert admits(spec, MODIFY)
    assert not admits(spec, INSERT)  # event
    assert not admits(spec, record(pk="order#1", new={"status": "paid"}, old={"status": "new"}))  # key
    assert not admits(spec, record(new={"status": "paid", "n": 1}, old={"status": "paid"}))  # unchanged status


def test_any_of_admits_what_one_alternative_admits_and_exclude_drops_what_one_exclusion_admits() -> None:
    spec = {
        "any_of": [{"event_names": ["INSERT"]}, {"attributes": {"status": "paid"}}],
        "exclude": [{"ttl_deletes": "only"}],
    }
    assert [admits(spec, r) for r in (INSERT, MODIFY, REMOVE, TTL_REMOVE)] == [True, True, True, False]
    assert not admits(spec, record("MODIFY", new={"status": "new"}, old={}))


def test_select_keeps_order_and_sizes_and_returns_the_batch_itself_when_nothing_is_dropped() -> None:
    records = (INSERT, MODIFY, REMOVE, TTL_REMOVE)
    batch = Batch(records, sum(r.size_bytes for r in records))
    keep_all = compile_filter(FilterSettings(event_names=["INSERT", "MODIFY", "REMOVE"]))
    assert keep_all.select(batch) is batch
    kept = compile_filter(FilterSettings.model_validate({"event_names": ["REMOVE", "INSERT"]})).select(batch)
    assert kept.records == (INSERT, REMOVE, TTL_REMOVE)
    assert kept.size_bytes == sum(r.size_bytes for r in kept.records)


# -- properties over generated records and filters ------------------------------------------------------------

_STATUSES = ["new", "paid", "shipped"]
_conditions = st.one_of(
    st.sampled_from(_STATUSES),
    st.lists(st.sampled_from(_STATUSES), min_size=1, max_size=2),
    st.fixed_dictionaries({}, optional={"prefix": st.sampled_from(["n", "p", "s"]), "exists": st.just(True)}).filter(
        bool
    ),
    st.just({"exists": False}),
)
_leaf_fields = {
    "event_names": st.lists(st.sampled_from(["INSERT", "MODIFY", "REMOVE"]), min_size=1, max_size=3),
    "ttl_deletes": st.sampled_from(["include", "exclude", "only"]),
    "keys": st.fixed_dictionaries({"pk": st.sampled_from(["a#1", "b#2", {"prefix": "a#"}])}),
    "attributes": st.fixed_dictionaries({"status": _conditions}),
    "new_image": st.fixed_dictionaries({"status": _conditions}),
    "old_image": st.fixed_dictionaries({"status": _conditions}),
    "changed_attributes": st.sampled_from([["status"], ["seen"], ["status", "seen"]]),
}
filters = st.fixed_dictionaries({}, optional=_leaf_fields)


@st.composite
def records(draw: st.DrawFn) -> ChangeRecord:
    event: EventName = draw(st.sampled_from(["INSERT", "MODIFY", "REMOVE"]))
    image = st.fixed_dictionaries(
        {}, optional={"status": st.sampled_from(_STATUSES), "seen": st.integers(0, 2).map(Decimal)}
    )
    return record(
        event,
        pk=draw(st.sampled_from(["a#1", "b#2"])),
        new=draw(image),
        old=draw(image),
        ttl=event == "REMOVE" and draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(spec=filters, other=filters, change=records())
def test_combinators_are_and_or_and_not(spec: dict[str, Any], other: dict[str, Any], change: ChangeRecord) -> None:
    one, two = admits(spec, change), admits(other, change)
    assert admits({"exclude": [spec]}, change) is (not one)
    assert admits({"any_of": [spec, other]}, change) is (one or two)
    assert admits({"any_of": [spec], "exclude": [other]}, change) is (one and not two)
    # Conditions on different fields of one filter must all hold: the same as requiring each on its own.
    disjoint = {field: value for field, value in other.items() if field not in spec}
    assert admits({**spec, **disjoint}, change) is (one and admits(disjoint, change))


@settings(max_examples=200, deadline=None)
@given(
    digits=st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-(10**9), max_value=10**9),
    zeros=st.integers(0, 3),
)
def test_any_spelling_of_a_number_matches_it(digits: Decimal, zeros: int) -> None:
    stored = Decimal(str(digits) + ("0" * zeros if "." in str(digits) else ""))
    change = record(new={"n": stored})
    for spelling in (str(digits), format(digits, "e"), str(digits.normalize())):
        assert admits({"attributes": {"n": spelling}}, change), spelling
    assert not admits({"attributes": {"n": str(digits + 1)}}, change)


# -- the command-line form ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "toml_form"),
    [
        ("event=MODIFY", {"event_names": ["MODIFY"]}),
        ("event=insert,REMOVE", {"event_names": ["INSERT", "REMOVE"]}),
        ("event!=REMOVE", {"exclude": [{"event_names": ["REMOVE"]}]}),
        ("key.pk^=customer#", {"keys": {"pk": {"prefix": "customer#"}}}),
        ("key.pk=customer#1", {"keys": {"pk": "customer#1"}}),
        ("has=new.status", {"new_image": {"status": {"exists": True}}}),
        ("has=old.status", {"old_image": {"status": {"exists": True}}}),
        ("has=status", {"attributes": {"status": {"exists": True}}}),
        ("!has=status", {"exclude": [{"attributes": {"status": {"exists": True}}}]}),
        ("changed=status,price", {"changed_attributes": ["status", "price"]}),
        ("ttl=exclude", {"ttl_deletes": "exclude"}),
        (
            "attr.qty=5 new.state=shipped old.state=paid",
            {
                "attributes": {"qty": "5"},
                "new_image": {"state": "shipped"},
                "old_image": {"state": "paid"},
            },
        ),
        ("key.pk^=customer# key.pk=customer#7", {"keys": {"pk": {"prefix": "customer#", "equals": "customer#7"}}}),
        ("attr.note='two words'", {"attributes": {"note": "two words"}}),
        (
            "event=INSERT or changed=status ttl=exclude",
            {"any_of": [{"event_names": ["INSERT"]}, {"changed_attributes": ["status"], "ttl_deletes": "exclude"}]},
        ),
    ],
)
def test_the_command_line_form_builds_the_same_filter_as_the_config_file(text: str, toml_form: dict[str, Any]) -> None:
    assert parse_filter(text) == FilterSettings.model_validate(toml_form)


def test_the_command_line_form_admits_what_the_config_file_form_admits() -> None:
    text = "event=MODIFY,REMOVE key.pk^=customer# !ttl=only changed=status"
    spec = {
        "event_names": ["MODIFY", "REMOVE"],
        "keys": {"pk": {"prefix": "customer#"}},
        "changed_attributes": ["status"],
        "ttl_deletes": "exclude",
    }
    cli = compile_filter(parse_filter(text))
    for change in (INSERT, MODIFY, REMOVE, TTL_REMOVE, record(new={"status": "new", "x": 1}, old={"status": "new"})):
        assert cli.admits(change) is admits(spec, change)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty filter"),
        ("event=INSRT", "'event=INSRT': must be one of INSERT, MODIFY, REMOVE (got 'INSRT')"),
        ("ttl=never", "'ttl=never': Input should be 'include', 'exclude' or 'only'"),
        ("status=paid", "'status=paid': unknown name 'status'"),
        ("key.pk", "'key.pk': expected NAME=VALUE"),
        ("key.=x", "unknown name 'key.'"),
        ("key.pk^=", "'key.pk^=': String should have at least 1 character"),
        ("event^=IN", "^= (prefix) applies to attributes"),
        ("!key.pk!=x", "use either a leading ! or !=, not both"),
        ("event=INSERT or", "'or' needs clauses on both sides"),
        ("event=INSERT event=REMOVE", "'event=REMOVE': event_names is already given; use `or`"),
        ("key.pk=a key.pk=b", "'key.pk=b': pk already has a condition like this"),
        ("has=", "name an attribute"),
        ("attr.x='open", "No closing quotation"),
    ],
)
def test_command_line_errors_name_the_clause_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as raised:
        parse_filter(text)
    assert message in str(raised.value)


# -- config errors, as `streamsink validate` shows them ---------------------------------------------------------

_VALID = """
[source]
table_name = "orders"

[filter]
event_names = ["INSERT", "MODIFY"]
ttl_deletes = "exclude"

[[sinks]]
type = "memory"
name = "customers"
filter = { keys = { pk = { prefix = "customer#" } }, changed_attributes = ["status"] }

[[sinks]]
type = "memory"
name = "big-orders"
project = ["total"]
[sinks.filter]
attributes = { total = { exists = true } }
[[sinks.filter.exclude]]
keys = { pk = "order#test" }
"""


def test_the_documented_toml_form_loads(tmp_path: Path) -> None:
    config = tmp_path / "filters.toml"
    config.write_text(_VALID)
    loaded = load_settings(config)
    assert loaded.filter == FilterSettings(event_names=["INSERT", "MODIFY"], ttl_deletes="exclude")
    customers, big = loaded.sinks
    assert customers.filter == parse_filter("key.pk^=customer# changed=status")
    assert big.filter == parse_filter("has=total !key.pk=order#test")
    assert big.project == ["total"]


def test_validated_settings_load_again_from_their_own_dump(tmp_path: Path) -> None:
    config = tmp_path / "filters.toml"
    config.write_text(_VALID)
    loaded = load_settings(config)
    assert load_settings(**loaded.model_dump()) == loaded  # `streamsink validate` prints a loadable config


def test_environment_variables_override_the_pipeline_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "filters.toml"
    config.write_text(_VALID)
    monkeypatch.setenv("STREAMSINK_FILTER__TTL_DELETES", "only")
    assert load_settings(config).filter.ttl_deletes == "only"


_SINK = '\n[[sinks]]\ntype = "memory"\n'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[filter]\nevent_names = ["INSERT", "UPSERT"]\n',
            "filter.event_names[1]: must be one of INSERT, MODIFY, REMOVE (got 'UPSERT')",
        ),
        (
            _SINK + _SINK + 'filter = { event_names = ["INSRT"] }\n',
            "sinks[1].filter.event_names[0]: must be one of INSERT, MODIFY, REMOVE (got 'INSRT')",
        ),
        ("[filter]\nevent_names = []\n", "filter.event_names: List should have at least 1 item"),
        (
            "[filter]\nttl_deletes = 'never'\n",
            "filter.ttl_deletes: Input should be 'include', 'exclude' or 'only' (got 'never')",
        ),
        (
            "[filter]\nevent = ['INSERT']\n",
            "filter.event: unknown key; allowed here: event_names, keys, attributes, new_image, old_image, "
            "changed_attributes, ttl_deletes, any_of, exclude",
        ),
        (
            _SINK + "filter = { keys = { pk = { startswith = 'c#' } } }\n",
            "sinks[0].filter.keys.pk.startswith: unknown key; allowed here: equals, one_of, prefix, exists",
        ),
        (_SINK + "filter = { keys = { pk = {} } }\n", "sinks[0].filter.keys.pk: give at least one of equals"),
        (
            _SINK + "filter = { attributes = { x = { exists = false, equals = 1 } } }\n",
            "sinks[0].filter.attributes.x: exists = false cannot be combined with equals",
        ),
        (
            _SINK + "filter = { attributes = { x = 1979-05-27 } }\n",
            "sinks[0].filter.attributes.x: must be a value, a list of values, or a table with any of",
        ),
        (
            _SINK + "filter = { attributes = { x = { one_of = [1, { a = 1 }] } } }\n",
            "sinks[0].filter.attributes.x.one_of[1]: must be a string, a number or true/false",
        ),
        (
            _SINK + "filter = { attributes = { x = nan } }\n",
            "sinks[0].filter.attributes.x.equals: must be a string, a number or true/false (got nan)",
        ),
        (
            _SINK + "filter = { any_of = [{ event_names = ['INSERT'] }, { ttl_deletes = 'maybe' }] }\n",
            "sinks[0].filter.any_of[1].ttl_deletes: Input should be 'include', 'exclude' or 'only' (got 'maybe')",
        ),
        (
            _SINK + "filter = { exclude = [{ new_image = { s = { prefix = '' } } }] }\n",
            "sinks[0].filter.exclude[0].new_image.s.prefix: String should have at least 1 character",
        ),
        (_SINK + "filter = { changed_attributes = [] }\n", "sinks[0].filter.changed_attributes: List should have"),
    ],
)
def test_a_bad_filter_is_one_line_naming_the_key(tmp_path: Path, body: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[source]\ntable_name = "orders"\n' + body + ("" if "[[sinks]]" in body else _SINK))
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert len(raised.value.lines) == 1, raised.value.lines
    assert raised.value.lines[0].startswith(expected)
