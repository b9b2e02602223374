"""KafkaSink: CloudEvents over HTTP into a Kafka topic, as the Knative Kafka sink receiver does.

The receiver answers 202 only once the broker acknowledged the record
(acks=all), 400 when the request is not a CloudEvent and 503 when Kafka
cannot take it. The record is written in the sink's content mode; its key
is the event's `partitionkey` extension (the CloudEvents SDK's
PartitionKeyExtensionInterceptor), so a dead-lettered wrapped record keeps
its original key.
"""

from __future__ import annotations

import json
import logging
import threading

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from .binding import Event, NotACloudEvent, from_http, to_kafka_binary, to_kafka_structured

log = logging.getLogger(__name__)


def ensure_topic(bootstrap_servers: list[str], topic: str, partitions: int) -> None:
    """Knative's sink and broker controllers create their topics; so does the runner."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000)
    try:
        if topic not in set(admin.list_topics()):
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
                log.info("created topic %s with %d partition(s)", topic, partitions)
            except TopicAlreadyExistsError:
                pass
        admin.wait_for_topics([topic], timeout_ms=30000)
    finally:
        admin.close()


class TopicWriter:
    """A producer for one topic that answers like the Knative receiver."""

    def __init__(self, name: str, bootstrap_servers: list[str], topic: str, content_mode: str):
        self.name = name
        self.topic = topic
        self.content_mode = content_mode
        self._bootstrap = bootstrap_servers
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()

    def _get_producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    linger_ms=1,
                    max_block_ms=10000,
                    request_timeout_ms=10000,
                    client_id=f"openg2p-audit-runner-{self.name}",
                )
            return self._producer

    def send(self, event: Event, timeout: float = 15.0) -> tuple[int, int]:
        """Write one event; returns (partition, offset) once acknowledged."""
        if self.content_mode == "structured":
            headers, value = to_kafka_structured(event)
        else:
            headers, value = to_kafka_binary(event)
        key = event.get("partitionkey")
        meta = (
            self._get_producer()
            .send(self.topic, value=value, key=key.encode() if key else None, headers=headers)
            .get(timeout=timeout)
        )
        return meta.partition, meta.offset

    def handle_http(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        try:
            event = from_http(headers, body)
        except NotACloudEvent as exc:
            return 400, json.dumps({"error": str(exc)}).encode()
        try:
            partition, offset = self.send(event)
        except KafkaError as exc:
            log.warning("%s: cannot write event %s to %s: %s", self.name, event.id, self.topic, exc)
            return 503, json.dumps({"error": f"Kafka unavailable: {exc}"}).encode()
        log.info(
            "%s: event %s (%s) written to %s-%d@%d",
            self.name, event.id, event.type, self.topic, partition, offset,
        )  # fmt: skip
        return 202, b""

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None
