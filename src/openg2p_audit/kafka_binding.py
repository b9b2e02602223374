"""The CloudEvents Kafka protocol binding, binary mode, for audit events.

Each record carries the envelope in `ce_*` headers, a `content-type` header,
and the `data` JSON as its value. A Knative KafkaSource turns exactly this
into a binary-mode HTTP CloudEvent, so the writer receives the original id,
source, type, subject, time and extensions unchanged.

The key is the event's subject (or its actor's id): one entity's events land
on one partition and keep their order.

Encoding is done here rather than through `cloudevents.kafka.to_binary`
because that would build a second event object per record on the hot path;
decoding uses the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudevents.kafka import KafkaMessage, from_binary, from_structured

from .contract import AuditEvent

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def attribute_text(value: Any) -> str:
    """An attribute's canonical string (CloudEvents type system): booleans are true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def encode(event: AuditEvent) -> KafkaRecord:
    attrs = event.attributes()
    headers = [("content-type", attrs.pop("datacontenttype").encode())]
    headers.extend((f"ce_{name}", attribute_text(value).encode()) for name, value in attrs.items())
    return KafkaRecord(
        key=event.partition_key.encode(), value=event.data_json_bytes(), headers=headers
    )


def is_binary(headers: list[tuple[str, bytes]] | dict[str, bytes]) -> bool:
    names = headers.keys() if isinstance(headers, dict) else (h for h, _ in headers)
    return any(name.lower() == "ce_specversion" for name in names)


def decode_attributes(
    headers: list[tuple[str, bytes]] | dict[str, bytes], key: bytes | None, value: bytes
) -> dict[str, Any]:
    """A record (binary or structured mode) as a plain CloudEvent attribute dict with `data`.

    Raises ValueError when the record is not a CloudEvent at all.
    """
    hdrs = dict(headers) if not isinstance(headers, dict) else headers
    # No key for the SDK: it would invent a `partitionkey` extension from it, which the
    # emitter never sent (the key is ingest's choice); a `ce_partitionkey` header is kept.
    message = KafkaMessage(headers=hdrs, key=None, value=value)
    if is_binary(hdrs):
        ce = from_binary(message)
    else:
        content_type = next(
            (v.decode() for k, v in hdrs.items() if k.lower() == "content-type"), ""
        )
        if not content_type.startswith(STRUCTURED_CONTENT_TYPE):
            raise ValueError("record is neither a binary nor a structured CloudEvent")
        ce = from_structured(message)
    attrs = dict(ce.get_attributes())
    attrs["data"] = ce.get_data()
    return attrs


def decode(
    headers: list[tuple[str, bytes]] | dict[str, bytes], key: bytes | None, value: bytes
) -> AuditEvent:
    """Parse and validate a record; raises ValueError or pydantic.ValidationError."""
    return AuditEvent.model_validate(decode_attributes(headers, key, value))
