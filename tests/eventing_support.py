"""Building blocks for the eventing runner tests: manifests, stand-in services, Kafka peeks."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from openg2p_audit.settings import Settings

FUNCTIONS = "tests/eventing_functions/main.py"


def config_map(settings: Settings, record_file: Path, plan_file: Path) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {
            "KAFKA_EVENTS_TOPIC": settings.kafka_events_topic,
            "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
            "RECORD_FILE": str(record_file),
            "PLAN_FILE": str(plan_file),
        },
    }


def service(name: str, target: str = "record", signature: str = "http") -> dict:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "image": "stand-in",
                            "env": [
                                {"name": "FUNCTION_TARGET", "value": target},
                                {"name": "FUNCTION_SIGNATURE_TYPE", "value": signature},
                                {"name": "FUNCTION_SOURCE", "value": FUNCTIONS},
                            ],
                            "envFrom": [{"configMapRef": {"name": "settings"}}],
                            "readinessProbe": {"httpGet": {"path": "/healthz"}},
                        }
                    ]
                }
            }
        },
    }


def ksvc_ref(name: str) -> dict:
    return {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": name}}


def kafka_sink(name: str, topic: str) -> dict:
    return {
        "apiVersion": "eventing.knative.dev/v1alpha1",
        "kind": "KafkaSink",
        "metadata": {"name": name},
        "spec": {"topic": topic, "bootstrapServers": ["elsewhere:9092"], "contentMode": "binary"},
    }


def kafka_source(
    name: str,
    settings: Settings,
    *,
    sink: str = "recorder",
    ordering: str = "ordered",
    retry: int = 2,
    backoff: str = "PT0.05S",
    dls: str | None = "dlq",
    group: str | None = None,
    topics: list[str] | None = None,
) -> dict:
    delivery: dict[str, Any] = {
        "retry": retry,
        "backoffPolicy": "exponential",
        "backoffDelay": backoff,
        "timeout": "PT10S",
    }
    if dls:
        delivery["deadLetterSink"] = {
            "ref": {"apiVersion": "eventing.knative.dev/v1alpha1", "kind": "KafkaSink", "name": dls}
        }
    return {
        "apiVersion": "sources.knative.dev/v1",
        "kind": "KafkaSource",
        "metadata": {"name": name},
        "spec": {
            "consumerGroup": group or _group(settings, name),
            "bootstrapServers": ["elsewhere:9092"],
            "topics": topics or [settings.kafka_events_topic],
            "initialOffset": "earliest",
            "ordering": ordering,
            "delivery": delivery,
            "sink": ksvc_ref(sink),
        },
    }


def _group(settings: Settings, name: str) -> str:
    return f"{settings.kafka_consumer_group}.{name}.{uuid.uuid4().hex[:6]}"


def write_manifests(directory: Path, docs: list[dict]) -> Path:
    """One file per resource plus the kustomization listing them."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i, doc in enumerate(docs):
        name = f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        (directory / name).write_text(yaml.safe_dump(doc, sort_keys=False))
        names.append(name)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": names,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


class Recorder:
    """The stand-in subscriber's record file and plan file."""

    def __init__(self, directory: Path):
        self.file = directory / "deliveries.jsonl"
        self.plan_file = directory / "plan.json"
        self.file.touch()

    def plan(self, plan: dict) -> None:
        tmp = self.plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan))
        tmp.replace(self.plan_file)

    def entries(self) -> list[dict]:
        """Complete lines only: the subscriber may be halfway through writing the last one."""
        text = self.file.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def for_id(self, event_id: str) -> list[dict]:
        return [e for e in self.entries() if e["id"] == event_id]

    def wait(self, predicate, timeout: float = 30.0, what: str = "deliveries") -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entries = self.entries()
            if predicate(entries):
                return entries
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; have {self.entries()}")

    @staticmethod
    def body(entry: dict) -> bytes:
        return base64.b64decode(entry["body_b64"])


def produce(
    bootstrap: list[str], topic: str, records: list[tuple], partition: int | None = 0
) -> list[int]:
    """records: (key, value, headers); returns their offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [
            producer.send(topic, key=k, value=v, headers=h or [], partition=partition)
            for k, v, h in records
        ]
        return [f.get(timeout=15).offset for f in futures]
    finally:
        producer.close()


def read_topic(bootstrap: list[str], topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )  # fmt: skip
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


def committed(bootstrap: list[str], group: str) -> dict[tuple[str, int], int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {
            (tp.topic, tp.partition): meta.offset
            for tp, meta in admin.list_group_offsets(group).get(group, {}).items()
        }
    finally:
        admin.close()


def wait_committed(
    bootstrap: list[str], group: str, topic: str, partition: int, offset: int, timeout: float = 20.0
) -> int:
    deadline = time.monotonic() + timeout
    have = -1
    while time.monotonic() < deadline:
        have = committed(bootstrap, group).get((topic, partition), -1)
        if have >= offset:
            return have
        time.sleep(0.1)
    raise AssertionError(f"group {group} committed {have} on {topic}-{partition}, want {offset}")


def headers_of(record: Any) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in record.headers}
