"""The audit event contract: a CloudEvents 1.0 envelope around an audit record.

This is the one event model. Ingest validates against it before anything
reaches Kafka; the writer validates again because records can reach the topic
without passing ingest (legacy producers, replays, hand-written records), and
an event that cannot be stored must go to the dead-letter topic rather than
block its partition.

The shape follows what OpenG2P emitters send today: who (`actor`) did what
(`action`) to what (`resource`), and how it ended (`outcome`). Anything else
an emitter adds is kept, because an auditor may need it years later.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

NonEmpty = Annotated[str, StringConstraints(min_length=1)]

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,64}$")
# Parameters in printable ASCII only: Content-Type travels as an HTTP header, which Knative's
# dispatcher (Vert.x) can send only in printable ASCII and Latin-1.
_JSON_MEDIA = re.compile(r"^application/(?:[\w.+-]+\+)?json\s*(?:;[\x20-\x7e]*)?$", re.IGNORECASE)
# A CloudEvents format (application/cloudevents+json, -batch+json, ...) as the data's type
# would make the data an event of its own: Knative's Kafka reader (cloudevents/sdk-java
# MessageUtils) picks structured mode from the record's content type and delivers the
# envelope inside `data` in place of the event ingest checked.
_CLOUDEVENTS_MEDIA = re.compile(r"^\s*application/cloudevents", re.IGNORECASE)

# java.net.URI, which Knative's Kafka dispatcher parses `source` and `dataschema` with, and
# which refuses a record whose value it cannot parse (the KafkaSource then delivers it
# wrapped, as an event nobody may store): the characters it cannot take raw travel
# percent-encoded (http_binding.transport_value), so what is left to check is the shape.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")

# Envelope attributes the contract defines; anything else is an extension.
CONTEXT_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema"}
)


class ActorType(StrEnum):
    user = "user"
    system = "system"
    service = "service"
    anonymous = "anonymous"


class Outcome(StrEnum):
    success = "success"
    failure = "failure"
    denied = "denied"


class Actor(BaseModel):
    """Who acted. Extra attributes (department, office, ...) are kept."""

    model_config = ConfigDict(extra="allow")

    type: ActorType = ActorType.user
    id: NonEmpty
    name: str | None = None
    roles: list[str] | None = None
    ip: str | None = None
    session_id: str | None = None


class Resource(BaseModel):
    """What was acted upon. Extra attributes (amount, currency, program_id, ...) are kept."""

    model_config = ConfigDict(extra="allow")

    type: NonEmpty
    id: str | None = None


class AuditData(BaseModel):
    """The CloudEvent's `data`: the audit record itself."""

    model_config = ConfigDict(extra="allow")

    actor: Actor
    action: NonEmpty
    outcome: Outcome
    resource: Resource | None = None
    reason: str | None = None
    changes: list[Any] | None = None
    context: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        # Python's json reads NaN and Infinity; pydantic would later write them as null.
        where = find_non_finite(value)
        if where is not None:
            raise ValueError(f"{where}: NaN and Infinity are not JSON numbers")
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class AuditEvent(BaseModel):
    """A CloudEvents 1.0 audit event. Unknown envelope attributes are extensions and are kept."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: NonEmpty
    source: NonEmpty
    type: NonEmpty
    subject: str | None = None
    time: datetime = Field(default_factory=utcnow, description="RFC 3339; defaults to now")
    datacontenttype: str = "application/json"
    dataschema: str | None = None
    traceparent: str | None = Field(None, description="W3C trace context")
    data: AuditData

    @field_validator("time", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not _RFC3339.match(value):
                raise ValueError("must be an RFC 3339 timestamp, e.g. 2026-04-01T12:00:00Z")
            return value
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError("must carry a time zone offset")
            return value
        raise ValueError("must be an RFC 3339 timestamp string")

    @field_validator("time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        # 9999-12-31T23:59:59-01:00 parses, but its UTC instant is past datetime.max.
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must fall within the years 0001-9999 in UTC") from None

    @field_validator("datacontenttype")
    @classmethod
    def _json_only(cls, value: str) -> str:
        if is_cloudevents_media(value):
            raise ValueError(CLOUDEVENTS_MEDIA_MESSAGE)
        if not _JSON_MEDIA.match(value):
            raise ValueError("data must be JSON (application/json)")
        return value

    @field_validator("source", "dataschema")
    @classmethod
    def _uri_reference(cls, value: str | None) -> str | None:
        if value is not None:
            problem = uri_reference_problem(value)
            if problem:
                raise ValueError(f"must be a URI-reference (RFC 3986): {problem}")
        return value

    @field_validator("traceparent")
    @classmethod
    def _w3c(cls, value: str | None) -> str | None:
        if value is None:
            return None
        m = _TRACEPARENT.match(value)
        if not m or m.group(1) == "ff" or set(m.group(2)) == {"0"} or set(m.group(3)) == {"0"}:
            raise ValueError("must be a W3C traceparent: 00-<32 hex trace id>-<16 hex>-<2 hex>")
        return value

    @model_validator(mode="after")
    def _extensions(self) -> AuditEvent:
        for name, value in (self.__pydantic_extra__ or {}).items():
            if name in ("data_base64",):
                raise ValueError("data must be JSON, not data_base64")
            if not _EXTENSION_NAME.match(name):
                raise ValueError(f"extension attribute name {name!r} must be lowercase a-z0-9")
            if value is not None and not isinstance(value, str | int | bool):
                raise ValueError(f"extension attribute {name!r} must be a string, int or bool")
        return self

    @property
    def trace_id(self) -> str | None:
        return self.traceparent.split("-")[1] if self.traceparent else None

    @property
    def extensions(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})

    @property
    def partition_key(self) -> str:
        """Kafka key: one entity's events share a partition, so they stay in order."""
        return self.subject or self.data.actor.id

    @property
    def time_rfc3339(self) -> str:
        return self.time.isoformat().replace("+00:00", "Z")

    def data_json(self) -> dict[str, Any]:
        """`data` as it travels on the wire (defaults filled in, nulls dropped)."""
        return self.data.model_dump(mode="json", exclude_none=True)

    def data_json_bytes(self) -> bytes:
        """`data_json()` serialised, in one step (the ingest hot path)."""
        return self.data.__pydantic_serializer__.to_json(self.data, exclude_none=True)

    def attributes(self) -> dict[str, Any]:
        """Every envelope attribute except data, with its wire value."""
        attrs: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time_rfc3339,
            "datacontenttype": self.datacontenttype,
        }
        for name in ("subject", "dataschema", "traceparent"):
            value = getattr(self, name)
            if value is not None:
                attrs[name] = value
        attrs.update({k: v for k, v in self.extensions.items() if v is not None})
        return attrs


CLOUDEVENTS_MEDIA_MESSAGE = (
    "must not be a CloudEvents format (application/cloudevents...): the data would be read as "
    "an event of its own; send the event itself, in binary or structured mode"
)


def is_cloudevents_media(value: str) -> bool:
    """Whether a content type names a CloudEvents format, in any case, with any parameters."""
    return bool(_CLOUDEVENTS_MEDIA.match(value))


def uri_reference_problem(value: str) -> str | None:
    """What keeps `value` from being a URI reference that java.net.URI parses, or None.

    Characters a URI cannot hold raw (space, non-ASCII letters, `<>"{}|\\^` and the like)
    are allowed: they are percent-encoded in transport and decoded on arrival. What cannot
    be escaped away is the shape: a `:` before the first `/`, `?` or `#` starts a scheme,
    which must be a letter then letters, digits, `+`, `-` or `.`, and be followed by
    something; at most one `#`; `//` must name an authority or go on with a path.
    """
    head = re.split(r"[/?#]", value, maxsplit=1)[0]
    rest = value
    if ":" in head:
        scheme, _, rest = value.partition(":")
        if not _URI_SCHEME.match(scheme):
            return f"{scheme[:40]!r} before the ':' is not a URI scheme"
        if not rest:
            return "nothing follows the scheme"
    if value.count("#") > 1:
        return "more than one '#'"
    if rest.startswith("//"):
        authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
        if not authority and len(rest) == 2:
            return "'//' names no authority"
    return None


def find_nul(value: Any, path: str = "") -> str | None:
    """Path of the first string (or key) holding U+0000, which PostgreSQL cannot store."""
    if isinstance(value, str):
        return path or "$" if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if "\x00" in str(k):
                return here
            found = find_nul(v, here)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_nul(v, f"{path}[{i}]")
            if found:
                return found
    return None


def find_non_finite(value: Any) -> str | None:
    """Path of the first NaN or infinite float; the common case is one pass without paths."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                break
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    else:
        return None
    paths = [("", value)]
    while paths:
        path, v = paths.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return path or "$"
        if isinstance(v, dict):
            paths.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            paths.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


def nesting_depth(value: Any) -> int:
    """Depth of nested objects and arrays; a scalar is 0, `{}` is 1."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


def exceeds_depth(value: Any, max_depth: int) -> bool:
    """`nesting_depth(value) > max_depth`, stopping at the first level too deep.

    On the ingest hot path for every event, hence exact type checks (parsed
    JSON only holds plain dicts and lists) and no generators.
    """
    kind = type(value)
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:
        return False
    if max_depth == 0:
        return True
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and exceeds_depth(child, max_depth - 1):
            return True
    return False


def json_schema() -> dict[str, Any]:
    """The published contract, generated from the models."""
    schema = AuditEvent.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://openg2p.org/schemas/audit-event/1.0"
    return schema


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one event, phrased for the emitter's developer.

    `reason` is a stable machine word (also the metrics label); `field` is the
    dotted path inside the event when there is one.
    """

    reason: str
    message: str
    field: str | None = None
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.index is not None:
            out["index"] = self.index
        out["reason"] = self.reason
        if self.field is not None:
            out["field"] = self.field
        out["message"] = self.message
        return out


@dataclass(frozen=True, slots=True)
class Limits:
    """What an event may look like beyond its schema: the deployment chooses these."""

    max_depth: int = 32
    retention_months: int = 84
    max_clock_skew_seconds: int = 300

    def time_window(self, now: datetime | None = None) -> tuple[datetime | None, datetime]:
        """[oldest, newest] accepted `time`; None when retention is off.

        Older events would belong to monthly partitions that maintenance has
        already dropped (or never creates); events from the future beyond the
        skew would sit in partitions that do not exist yet.
        """
        now = now or utcnow()
        upper = now + timedelta(seconds=self.max_clock_skew_seconds)
        if self.retention_months == 0:
            return None, upper
        return months_before(now, self.retention_months), upper


def months_before(moment: datetime, months: int) -> datetime:
    """The same instant `months` calendar months earlier (day clamped to the month's end)."""
    index = moment.year * 12 + moment.month - 1 - months
    year, month = divmod(index, 12)
    month += 1
    next_first = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=moment.tzinfo)
    last_day = (next_first - timedelta(days=1)).day
    return moment.replace(year=year, month=month, day=min(moment.day, last_day))


def _loc(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def schema_problems(exc: ValidationError, index: int | None = None) -> list[Problem]:
    return [
        Problem("schema", err["msg"], _loc(err["loc"]), index)
        for err in exc.errors(include_url=False, include_input=False)
    ]


def check_event(
    raw: Any,
    limits: Limits,
    index: int | None = None,
    *,
    may_hold_nul: bool = True,
    window: tuple[datetime | None, datetime] | None = None,
) -> tuple[AuditEvent | None, list[Problem]]:
    """Everything that must hold before an event may be stored, as a list of problems.

    `may_hold_nul=False` lets a caller that has already scanned the raw bytes
    skip the walk for U+0000; `window` lets a batch compute the time window once.
    """
    if not isinstance(raw, dict):
        return None, [Problem("schema", "an event must be a JSON object", None, index)]
    problems: list[Problem] = []
    if exceeds_depth(raw, limits.max_depth):
        depth = nesting_depth(raw)
        message = f"nested {depth} levels deep; at most {limits.max_depth} are allowed"
        # The schema walk of a value that deep adds nothing useful.
        return None, [Problem("depth", message, None, index)]
    if may_hold_nul:
        where = find_nul(raw)
        if where is not None:
            problems.append(Problem("nul", "strings must not contain U+0000 (NUL)", where, index))
    media = raw.get("datacontenttype")
    if isinstance(media, str) and is_cloudevents_media(media):
        return None, [
            *problems,
            Problem("unsupported_media_type", CLOUDEVENTS_MEDIA_MESSAGE, "datacontenttype", index),
        ]
    try:
        event = AuditEvent.model_validate(raw)
    except ValidationError as exc:
        return None, problems + schema_problems(exc, index)
    lower, upper = window or limits.time_window()
    if (lower is not None and event.time < lower) or event.time > upper:
        oldest = lower.isoformat().replace("+00:00", "Z") if lower else "any time"
        problems.append(
            Problem(
                "time_window",
                f"time {event.time_rfc3339} is outside the accepted window "
                f"[{oldest}, {upper.isoformat().replace('+00:00', 'Z')}]",
                "time",
                index,
            )
        )
    return (None if problems else event), problems
