"""The client's JSON Schema subset: the published schema stays inside it, and it agrees
with `jsonschema` (the reference implementation, a dev dependency only) on the contract's
valid and invalid events and on every keyword of the subset."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator

from openg2p_audit_client.schema import (
    ANNOTATIONS,
    SUPPORTED,
    SchemaError,
    Validator,
    contract_validator,
    published_schema,
)

SCHEMA = published_schema()
REFERENCE = Draft202012Validator(SCHEMA)
OURS = contract_validator()
FAST = settings(
    max_examples=120, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip


def keywords(node, found=None) -> set[str]:
    """Every keyword used anywhere in a schema (property names are not keywords)."""
    found = set() if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            if key in ("properties", "patternProperties", "$defs"):
                for sub in value.values():
                    keywords(sub, found)
            elif key in ("anyOf", "oneOf", "allOf"):
                for sub in value:
                    keywords(sub, found)
            elif key in ("items", "additionalProperties", "not"):
                keywords(value, found)
    return found


def test_the_published_schema_uses_only_the_subset():
    used = keywords(SCHEMA)
    assert used <= SUPPORTED, f"the contract now uses {sorted(used - SUPPORTED)}: extend schema.py"
    assert "format" in used and "format" in ANNOTATIONS  # asserted by the contract checks


def test_a_schema_beyond_the_subset_is_refused_not_half_checked():
    for extra in (
        {"dependentRequired": {"a": ["b"]}},
        {"unevaluatedProperties": False},
        {"$ref": "https://example.org/other.json"},
        {"if": {"type": "string"}},
    ):
        with pytest.raises(SchemaError):
            Validator({"type": "object", **extra})


def valid_event() -> dict:
    return {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "time": "2026-04-01T12:00:00Z",
        "data": {
            "actor": {"type": "user", "id": "officer-17", "roles": ["officer"]},
            "action": "view",
            "outcome": "success",
            "resource": {"type": "beneficiary", "id": "BEN-1", "amount": 10},
            "changes": [{"field": "name"}],
            "context": {"ip": "10.0.0.1"},
        },
    }


def mutations():
    """Invalid (and a few valid) variants of a valid event, by path."""
    cases = []

    def case(label, path, value, drop=False):
        event = valid_event()
        node = event
        for part in path[:-1]:
            node = node[part]
        if drop:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        cases.append(pytest.param(event, id=label))

    case("no id", ["id"], None, drop=True)
    case("empty id", ["id"], "")
    case("id a number", ["id"], 7)
    case("specversion 0.3", ["specversion"], "0.3")
    case("specversion number", ["specversion"], 1.0)
    case("no data", ["data"], None, drop=True)
    case("data a string", ["data"], "x")
    case("no actor", ["data", "actor"], None, drop=True)
    case("actor id empty", ["data", "actor", "id"], "")
    case("actor type robot", ["data", "actor", "type"], "robot")
    case("actor roles not strings", ["data", "actor", "roles"], [1, 2])
    case("actor roles null", ["data", "actor", "roles"], None)
    case("outcome maybe", ["data", "outcome"], "maybe")
    case("outcome true", ["data", "outcome"], True)
    case("resource without type", ["data", "resource"], {"id": "x"})
    case("resource null", ["data", "resource"], None)
    case("resource a list", ["data", "resource"], [])
    case("changes an object", ["data", "changes"], {"a": 1})
    case("context a list", ["data", "context"], [1])
    case("subject a number", ["subject"], 3)
    case("subject null", ["subject"], None)
    case("time a number", ["time"], 1700000000)
    case("time not rfc3339 (format is an annotation)", ["time"], "yesterday")
    case("traceparent a bool", ["traceparent"], False)
    case("extension kept", ["tenant"], "gov-1")
    case("datacontenttype a number", ["datacontenttype"], 1)
    return cases


@pytest.mark.parametrize("event", [pytest.param(valid_event(), id="valid"), *mutations()])
def test_verdicts_agree_on_the_contracts_events(event):
    assert OURS.is_valid(event) == REFERENCE.is_valid(event)


def test_every_example_mutation_is_caught_where_jsonschema_catches_it():
    # Guard against a vacuous agreement: most mutations above are invalid.
    verdicts = [REFERENCE.is_valid(p.values[0]) for p in mutations()]
    assert verdicts.count(False) >= 20


@FAST
@given(from_schema(SCHEMA))
def test_every_event_the_schema_generates_is_valid_here(event):
    assert OURS.errors(event) == []


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def damaged_events(draw):
    """A generated valid event with one member replaced by an arbitrary JSON value, or dropped."""
    event = copy.deepcopy(draw(from_schema(SCHEMA)))
    node = event
    path = []
    while isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        path.append(key)
        if not isinstance(node[key], dict):
            break
        node = node[key]
    target = event
    for key in path[:-1]:
        target = target[key]
    if path:
        if draw(st.booleans()):
            del target[path[-1]]
        else:
            target[path[-1]] = draw(JSON_VALUES)
    return event


@FAST
@given(damaged_events())
def test_verdicts_agree_on_damaged_events(event):
    assert OURS.is_valid(event) == REFERENCE.is_valid(event), json.dumps(event)[:500]


@FAST
@given(JSON_VALUES)
def test_verdicts_agree_on_arbitrary_json(value):
    assert OURS.is_valid(value) == REFERENCE.is_valid(value)


# Every keyword of the subset, including those the contract does not use today, against
# jsonschema on instances on both sides of the line.
KEYWORD_CASES = [
    ({"type": ["string", "null"]}, ["a", None, 1, True]),
    ({"type": "integer"}, [1, 1.0, 1.5, True, "1"]),
    ({"type": "number"}, [1, 1.5, True, None]),
    ({"type": "boolean"}, [True, 0]),
    ({"enum": [1, "a", None, [1]]}, [1, 1.0, True, "a", None, [1], [True], "b"]),
    ({"const": {"a": [1, 2]}}, [{"a": [1, 2]}, {"a": [1, 2.0]}, {"a": [2, 1]}, {"a": [True, 2]}]),
    ({"const": False}, [False, 0, None]),
    ({"minLength": 2, "maxLength": 3}, ["a", "ab", "abcd", "\U0001f600\U0001f600", 5]),
    ({"pattern": "^[a-z]+$"}, ["abc", "ab1", 3]),
    ({"pattern": "b"}, ["abc", "xyz"]),
    ({"minimum": 1, "maximum": 3}, [0, 1, 3, 3.5, "2"]),
    ({"exclusiveMinimum": 1, "exclusiveMaximum": 3}, [1, 2, 3]),
    ({"required": ["a"], "properties": {"a": {"type": "string"}}}, [{"a": "x"}, {"a": 1}, {}]),
    ({"additionalProperties": False, "properties": {"a": {}}}, [{"a": 1}, {"a": 1, "b": 2}]),
    ({"additionalProperties": {"type": "integer"}}, [{"x": 1}, {"x": "y"}]),
    ({"patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
     [{"x1": 1}, {"x1": "a"}, {"y": 1}]),
    ({"items": {"type": "string"}, "minItems": 1, "maxItems": 2}, [[], ["a"], ["a", 1], ["a"] * 3]),
    ({"anyOf": [{"type": "string"}, {"minimum": 5}]}, ["a", 6, 4, None]),
    ({"oneOf": [{"type": "integer"}, {"minimum": 5}]}, [1, 6, 5.5, "a"]),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, [6, 4, 5.5]),
    ({"not": {"type": "string"}}, ["a", 1]),
    ({"$defs": {"s": {"type": "string"}}, "items": {"$ref": "#/$defs/s"}}, [["a"], [1]]),
    ({"$defs": {"s": {"minLength": 2}}, "$ref": "#/$defs/s", "maxLength": 3}, ["a", "ab", "abcd"]),
    ({"properties": {"a": True, "b": False}}, [{"a": 1}, {"b": 1}]),
]  # fmt: skip


@pytest.mark.parametrize(
    "schema,instance",
    [pytest.param(s, i, id=f"{json.dumps(s)[:40]}-{json.dumps(i)}") for s, xs in KEYWORD_CASES
     for i in xs],
)  # fmt: skip
def test_every_keyword_of_the_subset_agrees(schema, instance):
    full = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    assert Validator(full).is_valid(instance) == Draft202012Validator(full).is_valid(instance)


def test_violations_name_the_path():
    event = valid_event()
    event["data"]["actor"]["id"] = ""
    event["data"]["outcome"] = "maybe"
    paths = {v.path for v in OURS.errors(event)}
    assert paths == {"data.actor.id", "data.outcome"}
