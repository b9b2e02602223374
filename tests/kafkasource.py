"""HTTP requests exactly as a Knative KafkaSource makes them from Kafka records.

The KafkaSource dispatcher (knative-extensions/eventing-kafka-broker) reads a
record with the CloudEvents SDK's Kafka binding and POSTs it with the HTTP
binary binding: every `ce_<name>` record header becomes a `ce-<name>` HTTP
header, the record's `content-type` header becomes `Content-Type`, and the
value is the body. The dispatcher adds its own W3C `traceparent` header for
its tracing span, unrelated to the event's `ce-traceparent`.

A record that is not a CloudEvent (no `ce_` headers, no structured content
type) is wrapped by the dispatcher's InvalidCloudEventInterceptor into an
event of type `dev.knative.kafka.event` whose data is the record value.
"""

from __future__ import annotations

from datetime import UTC, datetime

from openg2p_audit.kafka_binding import KafkaRecord

DISPATCHER_TRACEPARENT = "00-11111111111111111111111111111111-2222222222222222-01"


def binary_delivery(record: KafkaRecord) -> tuple[dict[str, str], bytes]:
    headers = {"User-Agent": "Vert.x-WebClient/4.5", "traceparent": DISPATCHER_TRACEPARENT}
    for name, value in record.headers:
        if name.lower() == "content-type":
            headers["Content-Type"] = value.decode()
        elif name.startswith("ce_"):
            headers["ce-" + name[3:]] = value.decode()
    return headers, record.value


def wrapped_delivery(
    value: bytes,
    *,
    key: bytes | None = b"beneficiary/1",
    topic: str = "openg2p.audit.events",
    partition: int = 0,
    offset: int = 0,
    timestamp_ms: int | None = None,
    content_type: str | None = "application/json",
    namespace: str = "openg2p",
    source_name: str = "audit-events-to-writer",
) -> tuple[dict[str, str], bytes]:
    ts = timestamp_ms if timestamp_ms is not None else int(datetime.now(UTC).timestamp() * 1000)
    time = datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")
    headers = {
        "User-Agent": "Vert.x-WebClient/4.5",
        "traceparent": DISPATCHER_TRACEPARENT,
        "ce-specversion": "1.0",
        "ce-id": f"partition:{partition}/offset:{offset}",
        "ce-source": f"/apis/v1/namespaces/{namespace}/kafkasources/{source_name}#{topic}",
        "ce-type": "dev.knative.kafka.event",
        "ce-subject": f"partition:{partition}#{offset}",
        "ce-time": time.replace("+00:00", "Z"),
    }
    if key is not None:
        headers["ce-partitionkey"] = key.decode()
        headers["ce-key"] = key.decode()
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers, value
