"""Validation against the contract's published JSON Schema, with the standard library only.

An emitter must learn that an event is malformed when it builds it, not hours
later from a `rejected` table; so the client checks every event against the
same `audit-event.schema.json` that ingest publishes (shipped in this package).
The client cannot depend on `jsonschema` (an Odoo service has the standard
library, `requests` and `urllib3`), so this module implements the part of JSON
Schema 2020-12 that such a contract needs. Constructing a `Validator` refuses a
schema that uses any other keyword, so a contract that grows beyond the subset
fails loudly instead of being half-checked; the tests prove that the published
schema stays inside it and that the verdicts agree with `jsonschema`'s.

`format` is an annotation here, as it is by default in `jsonschema` and in the
2020-12 specification; the RFC 3339 shape of `time` is one of the contract's
own checks (`event.contract_problems`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_RESOURCE = "audit-event.schema.json"

# Keywords that assert something about an instance, and those that only annotate.
ASSERTIONS = frozenset(
    {
        "type", "enum", "const",
        "minLength", "maxLength", "pattern",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "properties", "required", "additionalProperties", "patternProperties",
        "items", "minItems", "maxItems",
        "anyOf", "oneOf", "allOf", "not",
        "$ref",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {
        "$schema", "$id", "$defs", "$comment", "title", "description", "default",
        "examples", "format", "deprecated", "readOnly", "writeOnly",
    }
)  # fmt: skip
SUPPORTED = ASSERTIONS | ANNOTATIONS


class SchemaError(ValueError):
    """The schema uses JSON Schema this validator does not implement."""


@dataclass(frozen=True)
class Violation:
    """One way the instance breaks the schema; `path` is dotted (`data.actor.id`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '(event)'}: {self.message}"


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0, objects and arrays compare member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if name == "number":
        return isinstance(value, int | float)
    if name == "integer":
        return isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    raise SchemaError(f"unknown type {name!r}")


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


class Validator:
    """A compiled view of one schema document; `errors(instance)` lists every violation."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self._check_keywords(schema, "#")
        self._patterns: dict[str, re.Pattern[str]] = {}

    # -- the schema itself -----------------------------------------------------

    def _check_keywords(self, node: Any, where: str) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise SchemaError(f"{where}: a schema must be an object or a boolean")
        unknown = sorted(set(node) - SUPPORTED)
        if unknown:
            raise SchemaError(f"{where}: unsupported JSON Schema keyword(s) {', '.join(unknown)}")
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            raise SchemaError(f"{where}: only local references (#/...) are supported, not {ref!r}")
        for key in ("properties", "patternProperties", "$defs"):
            for name, sub in node.get(key, {}).items():
                self._check_keywords(sub, f"{where}/{key}/{name}")
        for key in ("additionalProperties", "items", "not"):
            if key in node:
                self._check_keywords(node[key], f"{where}/{key}")
        for key in ("anyOf", "oneOf", "allOf"):
            for i, sub in enumerate(node.get(key, [])):
                self._check_keywords(sub, f"{where}/{key}/{i}")
        if ref is not None:
            self._resolve(ref)

    def _resolve(self, ref: str) -> Any:
        node: Any = self.schema
        for raw in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise SchemaError(f"unresolvable reference {ref!r}") from None
        return node

    def _pattern(self, text: str) -> re.Pattern[str]:
        compiled = self._patterns.get(text)
        if compiled is None:
            compiled = self._patterns[text] = re.compile(text)
        return compiled

    # -- instances -------------------------------------------------------------

    def errors(self, instance: Any) -> list[Violation]:
        out: list[Violation] = []
        self._check(self.schema, instance, "", out)
        return out

    def is_valid(self, instance: Any) -> bool:
        return not self.errors(instance)

    def _check(self, schema: Any, value: Any, path: str, out: list[Violation]) -> None:
        if schema is True:
            return
        if schema is False:
            out.append(Violation(path, "no value is allowed here"))
            return
        if "$ref" in schema:
            self._check(self._resolve(schema["$ref"]), value, path, out)
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, n) for n in names):
                out.append(Violation(path, f"must be of type {' or '.join(names)}"))
                return
        if "const" in schema and not _json_equal(value, schema["const"]):
            out.append(Violation(path, f"must be {json.dumps(schema['const'])}"))
        if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
            allowed = ", ".join(json.dumps(e) for e in schema["enum"])
            out.append(Violation(path, f"must be one of {allowed}"))
        if isinstance(value, str):
            self._string(schema, value, path, out)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self._number(schema, value, path, out)
        elif isinstance(value, dict):
            self._object(schema, value, path, out)
        elif isinstance(value, list):
            self._array(schema, value, path, out)
        self._combinators(schema, value, path, out)

    def _string(self, schema: dict, value: str, path: str, out: list[Violation]) -> None:
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(Violation(path, f"must be at least {schema['minLength']} character(s)"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(Violation(path, f"must be at most {schema['maxLength']} character(s)"))
        if "pattern" in schema and not self._pattern(schema["pattern"]).search(value):
            out.append(Violation(path, f"must match {schema['pattern']}"))

    def _number(self, schema: dict, value: float, path: str, out: list[Violation]) -> None:
        checks = (
            ("minimum", lambda bound: value >= bound, "at least"),
            ("maximum", lambda bound: value <= bound, "at most"),
            ("exclusiveMinimum", lambda bound: value > bound, "more than"),
            ("exclusiveMaximum", lambda bound: value < bound, "less than"),
        )
        for key, holds, words in checks:
            if key in schema and not holds(schema[key]):
                out.append(Violation(path, f"must be {words} {schema[key]}"))

    def _object(self, schema: dict, value: dict, path: str, out: list[Violation]) -> None:
        for name in schema.get("required", []):
            if name not in value:
                out.append(Violation(_join(path, name), "is required"))
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        extra = schema.get("additionalProperties", True)
        for name, member in value.items():
            matched = False
            if name in properties:
                matched = True
                self._check(properties[name], member, _join(path, name), out)
            for pattern, sub in patterns.items():
                if self._pattern(pattern).search(name):
                    matched = True
                    self._check(sub, member, _join(path, name), out)
            if not matched and extra is not True:
                if extra is False:
                    out.append(Violation(_join(path, name), "is not an allowed member"))
                else:
                    self._check(extra, member, _join(path, name), out)

    def _array(self, schema: dict, value: list, path: str, out: list[Violation]) -> None:
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(Violation(path, f"must hold at least {schema['minItems']} item(s)"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(Violation(path, f"must hold at most {schema['maxItems']} item(s)"))
        if "items" in schema:
            for i, item in enumerate(value):
                self._check(schema["items"], item, _join(path, i), out)

    def _combinators(self, schema: dict, value: Any, path: str, out: list[Violation]) -> None:
        for sub in schema.get("allOf", []):
            self._check(sub, value, path, out)
        if "anyOf" in schema:
            branches = [self._branch(sub, value, path) for sub in schema["anyOf"]]
            if all(branches):
                # The branch that got furthest says the most; with one non-null branch
                # (`anyOf: [X, null]`, as the contract's optional members are) that is X.
                out.extend(min(branches, key=len))
        if "oneOf" in schema:
            passing = sum(not self._branch(sub, value, path) for sub in schema["oneOf"])
            if passing != 1:
                out.append(Violation(path, f"must match exactly one alternative, not {passing}"))
        if "not" in schema and not self._branch(schema["not"], value, path):
            out.append(Violation(path, "must not match the excluded schema"))

    def _branch(self, schema: Any, value: Any, path: str) -> list[Violation]:
        found: list[Violation] = []
        self._check(schema, value, path, found)
        return found


def published_schema() -> dict[str, Any]:
    """The contract's JSON Schema as shipped in this package (docs/audit-event.schema.json)."""
    text = resources.files(__package__).joinpath(SCHEMA_RESOURCE).read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def contract_validator() -> Validator:
    return Validator(published_schema())
