"""CloudEvents as the Knative data plane moves them: attributes plus opaque data bytes.

The runner is a transport. An event must reach the function as Knative's Kafka
data plane would deliver it: same attributes, same data bytes, nothing invented.
The CloudEvents Python SDK's HTTP reader adds a `time` attribute when the sender
set none and re-serialises structured data, so the bindings are done here, as
knative-extensions/eventing-kafka-broker's receiver and dispatcher do them with
cloudevents/sdk-java 4.0.1 on Vert.x:

- header values are copied, never percent-encoded or decoded: the Vert.x reader
  and writer of sdk-java pass them through (the HTTP binding's 3.1.3.2 says they
  should be encoded; the Java SDK does not), and Vert.x writes each character as
  one byte, Latin-1, `?` for a character beyond it (Netty's AsciiString.c2b);
  it refuses to send a control character at all (HttpUtils.validateHeaderValue);
- a structured body's JSON is read as a structured event (EventFormatProvider
  picks the format from the content type), binary otherwise.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..kafka_binding import attribute_text

STRUCTURED = "application/cloudevents+json"
REQUIRED = ("specversion", "id", "source", "type")
_JSON_TYPES = ("application/json", "text/json")


class NotACloudEvent(ValueError):
    """The message is neither a binary nor a structured CloudEvent."""


@dataclass
class Event:
    """A CloudEvent: context attributes (strings) and the data as bytes.

    `datacontenttype` lives in `attributes` like any other attribute; the
    bindings move it to and from the `content-type` header.
    """

    attributes: dict[str, str]
    data: bytes | None = None

    def __getitem__(self, name: str) -> str:
        return self.attributes[name]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.attributes.get(name, default)

    @property
    def id(self) -> str:
        return self.attributes.get("id", "")

    @property
    def type(self) -> str:
        return self.attributes.get("type", "")

    def with_extensions(self, extensions: Mapping[str, str]) -> Event:
        return Event({**self.attributes, **extensions}, self.data)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


def _validate(attrs: Mapping[str, Any]) -> None:
    missing = [a for a in REQUIRED if not attrs.get(a)]
    if missing:
        raise NotACloudEvent(f"missing required attribute(s): {', '.join(missing)}")
    if attrs["specversion"] != "1.0":
        raise NotACloudEvent(f"unsupported specversion {attrs['specversion']!r}")


# --- HTTP ------------------------------------------------------------------


class Unsendable(ValueError):
    """Vert.x would refuse to write the request (a header value with a control character)."""


def wire_header_value(value: str) -> str:
    """A header value as Knative's Vert.x dispatcher puts it on the wire: each character one
    byte (Latin-1), `?` for one beyond Latin-1. Returned as the text whose UTF-8 the HTTP
    client sends, so that the receiver reads the same bytes; Unsendable for what Vert.x
    refuses."""
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
        raise Unsendable(f"header value {value[:40]!r} holds a control character")
    if value.isascii():
        return value
    latin1 = "".join(c if ord(c) <= 0xFF else "?" for c in value)
    try:
        return latin1.encode("latin-1").decode("utf-8")  # these bytes, exactly
    except UnicodeDecodeError:
        return latin1  # read back by any receiver as the same characters


def to_http_binary(event: Event) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode HTTP request; Unsendable when Vert.x would refuse."""
    headers: dict[str, str] = {}
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            headers["Content-Type"] = wire_header_value(value)
        else:
            headers[f"ce-{name}"] = wire_header_value(value)
    return headers, event.data or b""


def to_http_structured(event: Event) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": STRUCTURED}, to_structured_json(event)


def to_structured_json(event: Event) -> bytes:
    doc: dict[str, Any] = dict(event.attributes)
    if event.data is not None:
        if _is_json(event.get("datacontenttype")):
            try:
                doc["data"] = json.loads(event.data)
            except ValueError:
                doc["data_base64"] = base64.b64encode(event.data).decode()
        elif event.get("datacontenttype", "").startswith("text/"):
            doc["data"] = event.data.decode("utf-8", "replace")
        else:
            doc["data_base64"] = base64.b64encode(event.data).decode()
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def from_structured_json(body: bytes) -> Event:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise NotACloudEvent(f"structured body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NotACloudEvent("structured body must be a JSON object")
    attrs = {k: attribute_text(v) for k, v in doc.items() if k not in ("data", "data_base64")}
    _validate(attrs)
    data: bytes | None = None
    if "data_base64" in doc:
        try:
            data = base64.b64decode(doc["data_base64"], validate=True)
        except (ValueError, TypeError) as exc:
            raise NotACloudEvent(f"data_base64 is not base64: {exc}") from None
    elif "data" in doc:
        value = doc["data"]
        if isinstance(value, str) and not _is_json(attrs.get("datacontenttype")):
            data = value.encode()
        else:
            data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
            attrs.setdefault("datacontenttype", "application/json")
    return Event(attrs, data)


def from_http(headers: Mapping[str, str], body: bytes) -> Event:
    """Read a binary- or structured-mode request; raises NotACloudEvent."""
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == STRUCTURED:
        return from_structured_json(body)
    if "ce-specversion" not in lower:
        raise NotACloudEvent(
            "expected a CloudEvent: ce-specversion header (binary mode) or "
            f"Content-Type {STRUCTURED} (structured mode)"
        )
    attrs = {k[3:]: v for k, v in lower.items() if k.startswith("ce-")}
    if content_type:
        attrs["datacontenttype"] = content_type
    _validate(attrs)
    return Event(attrs, body if body else None)


# --- Kafka -----------------------------------------------------------------


def _header_map(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, value in headers:
        out[name] = value or b""
    return out


def from_kafka(headers: Iterable[tuple[str, bytes | None]], value: bytes | None) -> Event:
    """A CloudEvent from a Kafka record (binary or structured); raises NotACloudEvent."""
    hdrs = _header_map(headers)
    lower = {k.lower(): v for k, v in hdrs.items()}
    content_type = lower.get("content-type", b"").decode("utf-8", "replace")
    if "ce_specversion" in lower:
        try:
            attrs = {k[3:]: v.decode("utf-8") for k, v in lower.items() if k.startswith("ce_")}
        except UnicodeDecodeError as exc:
            raise NotACloudEvent(f"ce_ header is not UTF-8: {exc}") from None
        if content_type:
            attrs["datacontenttype"] = content_type
        _validate(attrs)
        return Event(attrs, value)
    if content_type.split(";", 1)[0].strip().lower().startswith("application/cloudevents"):
        return from_structured_json(value or b"")
    raise NotACloudEvent("record has neither ce_specversion nor a structured content-type")


def to_kafka_binary(event: Event) -> tuple[list[tuple[str, bytes]], bytes | None]:
    headers: list[tuple[str, bytes]] = []
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            headers.append(("content-type", value.encode()))
        else:
            headers.append((f"ce_{name}", value.encode()))
    return headers, event.data


def to_kafka_structured(event: Event) -> tuple[list[tuple[str, bytes]], bytes]:
    return [("content-type", STRUCTURED.encode())], to_structured_json(event)
