"""The whole pipeline as deployed: `knative/base` run by the local eventing runner.

Tests isolate modules by topic, consumer group and database, so the manifests
are copied with the module's names put in place of the deployed ones; every
other field (services, sinks, retries, ordering, schedules) is what a cluster
gets. A test may also shorten the KafkaSource's retry budget, which is the
point of having the manifests in charge.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pg8000.native
import yaml

from openg2p_audit.eventing.runner import Runner
from openg2p_audit.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "knative" / "base"
SOURCE = "audit-events-to-writer"
PING = "audit-maintenance-hourly"
INGEST = "audit-ingest"
WRITER = "audit-writer"
MAINTENANCE = "audit-maintenance"
BROKER = "audit"


def module_manifests(
    settings: Settings,
    directory: Path,
    delivery: dict[str, Any] | None = None,
    env: dict[str, dict[str, str]] | None = None,
    ingest_auth: bool = False,
) -> Path:
    """knative/base with this module's topics and group.

    `delivery` patches the KafkaSource's delivery; `env[service]` sets container env of
    that Knative Service (the benchmarks tune WORKERS and THREADS this way).
    Unless `ingest_auth`, ingest takes events without a token (INGEST_AUTH=disabled):
    the modules that post to it directly test what becomes of events, and
    test_pipeline_auth tests who may send them. The writer keeps its check either
    way, so every pipeline test goes through the runner's delivery tokens.
    """
    names = {
        "openg2p.audit.events": settings.kafka_events_topic,
        "openg2p.audit.dlq": settings.kafka_dlq_topic,
        "openg2p.audit.broker-dlq": settings.kafka_broker_dlq_topic,
        "openg2p.audit.digests": settings.kafka_digests_topic,
        "openg2p-audit-consumer": settings.kafka_consumer_group,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for path in BASE.iterdir():
        text = path.read_text()
        for deployed, local in names.items():
            text = text.replace(deployed, local)
        if not ingest_auth and path.name == "configmap.yaml":
            assert "\n  INGEST_AUTH: required\n" in text
            text = text.replace("\n  INGEST_AUTH: required\n", "\n  INGEST_AUTH: disabled\n")
        docs = list(yaml.safe_load_all(text)) if path.suffix == ".yaml" else []
        doc = docs[0] if len(docs) == 1 else None  # several (EventPolicies): left as they are
        if delivery and path.name == "kafkasource.yaml":
            doc["spec"]["delivery"].update(delivery)
            text = yaml.safe_dump(doc, sort_keys=False)
        extra = (env or {}).get(doc.get("metadata", {}).get("name")) if doc else None
        if doc and doc.get("kind") == "Service" and extra:
            container = doc["spec"]["template"]["spec"]["containers"][0]
            current = [e for e in container.get("env", []) if e["name"] not in extra]
            container["env"] = current + [{"name": k, "value": v} for k, v in extra.items()]
            text = yaml.safe_dump(doc, sort_keys=False)
        (directory / path.name).write_text(text)
    return directory


def start_pipeline(settings: Settings, workdir: Path, **kw: Any) -> Runner:
    manifests = module_manifests(
        settings, workdir / "manifests", kw.pop("delivery", None),
        ingest_auth=kw.pop("ingest_auth", False),
    )  # fmt: skip
    # The Secret audit-attestation holds the session's keys, so that tests can attest
    # records as ingest does (attestation_support).
    kw.setdefault("secrets", {"audit-attestation": {
        "ingest": settings.attestation_ingest_keys, "query": settings.attestation_query_keys,
    }})  # fmt: skip
    runner = Runner(
        manifests, settings, workdir=workdir, schedule_pings=False, commit_interval=0.5, **kw
    )
    runner.start()
    runner.wait_ready(90)
    return runner


def broker_sender(runner: Runner, sender: str = "openg2p-registry") -> dict[str, str]:
    """The token of a service that may send to the Broker (knative/base/eventpolicies.yaml):
    its projected service-account token for the Broker's audience, as Knative's OIDC feature
    wants at the Broker's ingress."""
    token = runner.issuer.mint(
        f"system:serviceaccount:default:{sender}", (), aud=runner.ingress_audience("Broker", BROKER)
    )
    return {"Authorization": f"Bearer {token}"}


def now_z() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_event(event_id: str | None = None, **over: Any) -> dict[str, Any]:
    event = {
        "specversion": "1.0",
        "id": event_id or f"e2e-{uuid.uuid4()}",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "subject": "beneficiary/BEN-000482",
        "time": now_z(),
        "data": {
            "actor": {"type": "user", "id": "officer-17"},
            "action": "view",
            "outcome": "success",
            "resource": {"type": "beneficiary", "id": "BEN-000482"},
        },
    }
    event.update(over)
    return event


def stored_ids(settings: Settings, ids: list[str]) -> dict[str, int]:
    """How many rows each of `ids` has (absent ids are left out)."""
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        exists = conn.run("SELECT to_regclass('audit_events') IS NOT NULL")[0][0]
        if not exists:
            return {}
        rows = conn.run(
            "SELECT id, count(*) FROM audit_events WHERE id = ANY(:ids) GROUP BY id", ids=ids
        )
        return {r[0]: r[1] for r in rows}
    finally:
        conn.close()


def wait_stored(settings: Settings, ids: list[str], timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    found: dict[str, int] = {}
    while time.monotonic() < deadline:
        found = stored_ids(settings, ids)
        if len(found) == len(set(ids)):
            return found
        time.sleep(0.25)
    missing = sorted(set(ids) - set(found))
    raise AssertionError(f"{len(missing)} of {len(set(ids))} ids not stored, e.g. {missing[:3]}")
