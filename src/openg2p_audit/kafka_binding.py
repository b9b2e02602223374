"""The CloudEvents Kafka protocol binding, binary mode, as the events topic carries audit events.

Each record carries the envelope in `ce_*` headers, a `content-type` header,
and the `data` JSON as its value, plus ingest's attestation
(`ce_auditattestation`, attestation.py). A Knative KafkaSource turns exactly
this into a binary-mode HTTP CloudEvent, so the writer receives the original
id, source, type, subject, time and extensions unchanged.

Header values are written percent-encoded (`http_binding.transport_value`):
Knative's dispatcher copies them into HTTP headers byte for byte and parses
`source` with java.net.URI, so only plain ASCII survives it unchanged; every
reader decodes them (`decode_record`, and the writer's HTTP binding). Only
binary mode is read: ingest writes nothing else, and a structured record (or
a record without `ce_` headers) is not one of its events.

The key is the event's subject (or its actor's id): one entity's events land
on one partition and keep their order.

Encoding is done here rather than through `cloudevents.kafka.to_binary`
because that would build a second event object per record on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .attestation import EXTENSION, Attestor
from .contract import AuditEvent
from .http_binding import header_value, transport_value

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        """Bytes of the record as Kafka holds it: key, value and every header."""
        return len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers)

    @property
    def attribute_bytes(self) -> int:
        """Bytes of the event's attributes as the binary-mode HTTP headers a KafkaSource sends
        (`ce-name: value` and `Content-Type: ...`, each with its separator and line end)."""
        return sum(len(k) + len(v) + 4 for k, v in self.headers)


class NotBinary(ValueError):
    """The record is not a binary-mode CloudEvent (no `ce_specversion` header)."""


def attribute_text(value: Any) -> str:
    """An attribute's canonical string (CloudEvents type system): booleans are true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode(event: AuditEvent, attestor: Attestor) -> KafkaRecord:
    """The record ingest (or the query service) produces for an event, attested."""
    attrs = {name: attribute_text(value) for name, value in event.attributes().items()}
    data = event.data_json_bytes()
    proof = attestor.attest(attrs, data)
    headers = [("content-type", attrs.pop("datacontenttype").encode())]
    headers.extend((f"ce_{name}", transport_value(value).encode()) for name, value in attrs.items())
    headers.append((f"ce_{EXTENSION}", proof.encode()))
    return KafkaRecord(key=event.partition_key.encode(), value=data, headers=headers)


def is_binary(headers: list[tuple[str, bytes]] | dict[str, bytes]) -> bool:
    names = headers.keys() if isinstance(headers, dict) else (h for h, _ in headers)
    return any(name.lower() == "ce_specversion" for name in names)


def decode_record(headers: list[tuple[str, bytes | None]]) -> dict[str, str]:
    """A binary-mode record's attributes, decoded (`datacontenttype` from `content-type`).

    Raises NotBinary for anything else, and ValueError for a header that is not UTF-8.
    """
    attrs: dict[str, str] = {}
    content_type = None
    binary = False
    for name, raw in headers:
        lower = name.lower()
        if lower == "content-type":
            content_type = (raw or b"").decode("utf-8")
        elif lower.startswith("ce_") and len(lower) > 3:
            attrs[lower[3:]] = header_value((raw or b"").decode("utf-8"))
            binary = binary or lower == "ce_specversion"
    if not binary:
        raise NotBinary("the record has no ce_specversion header: it is not a binary-mode event")
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    return attrs


def decode(headers: list[tuple[str, bytes]], key: bytes | None, value: bytes) -> AuditEvent:
    """A record as the event it carries (its attestation left out, not checked: tools and
    tests; what stores events checks it, `writer.event_from_attributes`).

    Raises NotBinary, ValueError or pydantic.ValidationError.
    """
    import json

    attrs: dict[str, Any] = decode_record(headers)
    attrs.pop(EXTENSION, None)
    attrs["data"] = json.loads(value) if value else None
    return AuditEvent.model_validate(attrs)
