"""KafkaSource: Kafka records to CloudEvents over HTTP, as the Knative Kafka dispatcher builds them.

A record that is a CloudEvent in the Kafka binding (binary: `ce_*` headers;
structured: `content-type: application/cloudevents...`) is sent as that
event: same attributes, same data bytes. Any other record is wrapped the way
`InvalidCloudEventInterceptor` does it, so a malformed record still reaches
the subscriber (and, when refused, the dead-letter topic) instead of
blocking its partition:

- type `dev.knative.kafka.event`
- id `partition:<p>/offset:<o>`, subject `partition:<p>#<o>`
- source `/apis/v1/namespaces/<ns>/kafkasources/<name>#<topic>`
- time: the record timestamp; datacontenttype: its `content-type` header
- extensions `key` and `partitionkey`: the record key (per the key-type label)
- one `kafkaheader<name>` extension per other header (name lower-cased, only a-z0-9)

Every event the dispatcher sends (wrapped or not) then gets the extensions
`knativekafkapartition` and `knativekafkaoffset`, where its record was, and the
source's `ceOverrides` last (CloudEventOverridesMutator, since knative-v1.13).
"""

from __future__ import annotations

import base64
import re
import struct
from datetime import UTC, datetime
from typing import Any

from .binding import Event, NotACloudEvent, from_kafka
from .delivery import Egress
from .dispatcher import MAX_POLL_RECORDS, KafkaDispatcher
from .manifests import KafkaSource

WRAPPED_TYPE = "dev.knative.kafka.event"
_BAD_CHARS = re.compile(r"[^a-z0-9]")


def _key(key: bytes | None, key_type: str) -> str | None:
    if key is None:
        return None
    if key_type == "int":
        return str(int.from_bytes(key, "big", signed=True))
    if key_type == "float":
        return repr(struct.unpack(">f" if len(key) == 4 else ">d", key)[0])
    if key_type == "byte-array":
        return base64.b64encode(key).decode()
    return key.decode("utf-8", "replace")


def _rfc3339(millis: int) -> str:
    t = datetime.fromtimestamp(max(millis, 0) / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def wrap_record(record: Any, source: KafkaSource) -> Event:
    """The `dev.knative.kafka.event` for a record that is not a CloudEvent."""
    attrs = {
        "specversion": "1.0",
        "id": f"partition:{record.partition}/offset:{record.offset}",
        "source": f"/apis/v1/namespaces/{source.namespace}/kafkasources/{source.name}"
        f"#{record.topic}",
        "type": WRAPPED_TYPE,
        "subject": f"partition:{record.partition}#{record.offset}",
        "time": _rfc3339(record.timestamp),
    }
    key = _key(record.key, source.key_type)
    if key is not None:
        attrs["partitionkey"] = key
        attrs["key"] = key
    for name, value in record.headers or []:
        if name.lower() == "content-type":
            attrs["datacontenttype"] = (value or b"").decode("utf-8", "replace").lower()
            continue
        attrs["kafkaheader" + _BAD_CHARS.sub("", name.lower())] = (value or b"").decode(
            "utf-8", "replace"
        )
    return Event(attrs, record.value)


def with_kafka_metadata(event: Event, record: Any) -> Event:
    """The record's partition and offset as extensions, as Knative's Kafka dispatcher adds them
    to every delivery (of a KafkaSource or a Kafka Broker's Trigger)."""
    return event.with_extensions(
        {"knativekafkapartition": str(record.partition), "knativekafkaoffset": str(record.offset)}
    )


def record_to_event(record: Any, source: KafkaSource) -> Event:
    try:
        event = from_kafka(record.headers or [], record.value)
    except NotACloudEvent:
        event = wrap_record(record, source)
    event = with_kafka_metadata(event, record)
    if source.ce_overrides:
        event = event.with_extensions(source.ce_overrides)
    return event


def kafka_source_dispatcher(
    source: KafkaSource,
    *,
    bootstrap_servers: list[str],
    destination: str,
    dead_letter: str | None,
    on_dead_letter_failure: str = "retry",
    commit_interval: float = 5.0,
    max_poll_records: int = MAX_POLL_RECORDS,
) -> KafkaDispatcher:
    egress = Egress(
        name=source.key,
        destination=destination,
        delivery=source.delivery,
        namespace=source.namespace,
        dead_letter=dead_letter,
        on_dead_letter_failure=on_dead_letter_failure,
    )
    return KafkaDispatcher(
        name=source.key,
        bootstrap_servers=bootstrap_servers,
        group=source.consumer_group,
        topics=source.topics,
        egress=egress,
        mapper=lambda record: record_to_event(record, source),
        ordered=source.ordering == "ordered",
        initial_offset=source.initial_offset,
        commit_interval=commit_interval,
        max_poll_records=max_poll_records,
    )
