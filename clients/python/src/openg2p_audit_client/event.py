"""Building an audit event as ingest expects it, and everything that can be checked locally.

An event is a plain dict in CloudEvents 1.0 structured form (the envelope
attributes plus `data`, the audit record), serialised once to compact UTF-8
JSON: those exact bytes are what the outbox keeps and what every retry sends,
so a retry can never alter an event.

Locally checked: the published JSON Schema (`schema.py`) and the contract's
rules that a JSON Schema cannot say (RFC 3339 times, W3C traceparent,
extension names and values, no U+0000, no NaN, nesting depth, the authcontext
attributes that only ingest may set, the record size). What only ingest can
decide (the caller's token, the source policy, the retention window) is
decided there; a refusal then lands in the outbox's `rejected` table.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidEvent
from .schema import contract_validator

JSON = "application/json"

# Envelope attributes the contract defines; any other top-level member is an extension.
CONTEXT_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema",
     "traceparent", "data"}
)  # fmt: skip
# The CloudEvents authcontext extension: ingest sets it from the caller's token.
AUTHCONTEXT = ("authtype", "authid", "authclaims")

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,64}$")
_JSON_MEDIA = re.compile(r"^application/(?:[\w.+-]+\+)?json\s*(?:;.*)?$", re.IGNORECASE)
# Room kept for the authcontext ingest adds to each record (ce_authtype, ce_authid and the
# JSON of ce_authclaims), so that an event within the bound here is within it at ingest.
AUTHCONTEXT_ALLOWANCE = 1024


def rfc3339(moment: datetime) -> str:
    """`moment` in UTC as RFC 3339 with a `Z`; a naive datetime is refused (its zone is a guess)."""
    if moment.tzinfo is None:
        raise InvalidEvent(["time: must carry a time zone (e.g. datetime.now(timezone.utc))"])
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(timezone.utc))


def build_event(
    type: str,
    source: str,
    actor: str | dict[str, Any],
    action: str,
    outcome: str,
    resource: dict[str, Any] | None = None,
    subject: str | None = None,
    *,
    id: str | None = None,
    time: datetime | str | None = None,
    traceparent: str | None = None,
    extensions: dict[str, str | int | bool] | None = None,
    **details: Any,
) -> dict[str, Any]:
    """The CloudEvent for one audit record (not yet checked: see `check`).

    `actor` is the actor's id (a user unless said otherwise) or the whole actor
    object (`{"type": "service", "id": "openg2p-registry"}`); `details` are the
    record's other members: `reason`, `changes`, `context`, or any of the
    emitter's own, which the trail keeps.
    """
    data: dict[str, Any] = {
        "actor": {"id": actor} if isinstance(actor, str) else dict(actor),
        "action": action,
        "outcome": outcome,
    }
    if resource is not None:
        data["resource"] = resource
    data.update({k: v for k, v in details.items() if v is not None})
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": id if id is not None else str(uuid.uuid4()),
        "source": source,
        "type": type,
        "time": rfc3339(time) if isinstance(time, datetime) else (time or now_rfc3339()),
        "datacontenttype": JSON,
        "data": data,
    }
    if subject is not None:
        event["subject"] = subject
    if traceparent is not None:
        event["traceparent"] = traceparent
    for name, value in (extensions or {}).items():
        if name in event or name in CONTEXT_ATTRIBUTES:
            raise InvalidEvent([f"extensions.{name}: {name} is an envelope attribute"])
        event[name] = value
    return event


def complete(raw: dict[str, Any]) -> dict[str, Any]:
    """A whole CloudEvent given as a dict, with what `build_event` would fill in when missing."""
    event = dict(raw)
    event.setdefault("specversion", "1.0")
    if event.get("id") is None:
        event["id"] = str(uuid.uuid4())
    if event.get("time") is None:
        event["time"] = now_rfc3339()
    event.setdefault("datacontenttype", JSON)
    return event


def contract_problems(event: dict[str, Any], max_depth: int = 32) -> list[str]:
    """The contract's rules beyond its JSON Schema, as ingest applies them."""
    problems: list[str] = []
    time = event.get("time")
    if isinstance(time, str) and not _RFC3339.match(time):
        problems.append("time: must be an RFC 3339 timestamp, e.g. 2026-04-01T12:00:00Z")
    ctype = event.get("datacontenttype")
    if isinstance(ctype, str) and (
        not _JSON_MEDIA.match(ctype) or ctype.lower().startswith("application/cloudevents")
    ):
        # An audit record is never itself a CloudEvent (nor a batch of them).
        problems.append("datacontenttype: data must be JSON (application/json)")
    trace = event.get("traceparent")
    if isinstance(trace, str):
        m = _TRACEPARENT.match(trace)
        if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
            problems.append("traceparent: must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>")
    for name, value in event.items():
        if name in CONTEXT_ATTRIBUTES:
            continue
        if name in AUTHCONTEXT:
            problems.append(f"{name}: set by ingest from the caller's token; do not send it")
        elif name == "data_base64":
            problems.append("data_base64: data must be JSON")
        elif not _EXTENSION_NAME.match(name):
            problems.append(f"{name}: an extension attribute name must be lowercase a-z0-9")
        elif value is not None and not isinstance(value, str | int | bool):
            problems.append(f"{name}: an extension attribute must be a string, int or bool")
    where = _first(event, lambda v: isinstance(v, str) and "\x00" in v, keys=True)
    if where is not None:
        problems.append(f"{where}: strings must not contain U+0000 (NUL)")
    where = _first(event, lambda v: isinstance(v, float) and not math.isfinite(v))
    if where is not None:
        problems.append(f"{where}: NaN and Infinity are not JSON numbers")
    if _depth(event) > max_depth:
        problems.append(f"nested more than {max_depth} levels deep")
    return problems


def check(event: dict[str, Any], max_depth: int = 32) -> None:
    """Raise InvalidEvent naming every problem (schema first, then the contract's rules)."""
    problems = [str(v) for v in contract_validator().errors(event)]
    problems.extend(contract_problems(event, max_depth))
    if problems:
        raise InvalidEvent(problems, event.get("id") if isinstance(event, dict) else None)


def encode(event: dict[str, Any]) -> bytes:
    """The event's bytes on the wire and in the outbox: compact UTF-8 JSON."""
    try:
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as exc:  # a datetime, a set, a lone surrogate...
        raise InvalidEvent([f"not JSON-serialisable: {exc}"], event.get("id")) from None


def record_size(event: dict[str, Any], body: bytes) -> int:
    """An upper bound of the Kafka record ingest makes of the event (INGEST_MAX_EVENT_BYTES).

    Ingest counts key + value + headers: the value is `data`, the headers the
    other attributes, the key the subject (else the actor's id); the event's
    JSON holds all of these with quoting on top, so its length bounds them.
    """
    data = event.get("data") or {}
    actor = data.get("actor") if isinstance(data, dict) else None
    key = event.get("subject") or (actor.get("id") if isinstance(actor, dict) else "") or ""
    return len(body) + len(str(key).encode()) + AUTHCONTEXT_ALLOWANCE


def _first(value: Any, bad: Any, path: str = "", keys: bool = False) -> str | None:
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if bad(item):
            return where or "(event)"
        if isinstance(item, dict):
            for k, v in item.items():
                here = f"{where}.{k}" if where else str(k)
                if keys and bad(k):
                    return here
                stack.append((here, v))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
