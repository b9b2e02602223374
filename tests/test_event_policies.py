"""The manifests' closed doors: EventPolicies, cluster-local Services, pinned identities.

The Trigger delivers every Broker event to ingest under its one OIDC identity, so ingest's
source policy cannot tell the Broker's senders apart: the Broker's EventPolicies must hold
each sender to its own sources, and the Trigger's entry in the source policy must allow
exactly the union of those sources, no wildcard beyond them. These tests keep the two
equal, and check the rest of what the threat model (docs/threat-model.md) leaves to the
cluster's configuration as the manifests state it.
"""

from __future__ import annotations

import pytest
import yaml

from manifest_checks import objects, one
from openg2p_audit.eventing.ingress import IngressAuth
from openg2p_audit.eventing.manifests import load
from openg2p_audit.knative_identity import ingress_audience, oidc_subject
from openg2p_audit.policy import SourcePolicy
from pipeline_support import BASE

TRIGGER_SUB = oidc_subject("default", "Trigger", "audit-to-ingest")


def _settings() -> dict[str, str]:
    return one("base", "ConfigMap", "audit-settings")["data"]


def _policies(kind: str, name: str) -> list[dict]:
    return [
        p for p in objects("base", "EventPolicy")
        if any((t.get("ref") or {}).get("kind") == kind and t["ref"]["name"] == name
               for t in p["spec"].get("to", []))
    ]  # fmt: skip


def _source_patterns(filters: list[dict]) -> set[str]:
    """The `source` values a list of SubscriptionsAPI filters (all must pass) lets through,
    as ingest's source-policy patterns: exact X is X, prefix P is P*."""
    found: set[str] | None = None
    for f in filters:
        here = _one_filter(f)
        if here is not None:
            found = here if found is None else found & here
    assert found, f"no filter holds the source: {filters}"
    return found


def _one_filter(f: dict) -> set[str] | None:
    ((dialect, node),) = f.items()
    if dialect == "exact" and "source" in node:
        return {node["source"]}
    if dialect == "prefix" and "source" in node:
        return {node["source"] + "*"}
    if dialect == "any":
        parts = [_one_filter(sub) for sub in node]
        assert all(p is not None for p in parts), f"any mixes source and other filters: {node}"
        return set().union(*parts)
    return None  # a filter on something else (type)


def test_each_broker_sender_has_one_policy_holding_it_to_its_sources():
    policies = _policies("Broker", "audit")
    assert policies
    senders = []
    for p in policies:
        froms = p["spec"]["from"]
        assert [set(f) for f in froms] == [{"sub"}], f"{p['metadata']['name']}: one sub each"
        sub = froms[0]["sub"]
        assert not sub.endswith("*"), f"{p['metadata']['name']}: a wildcard sender"
        senders.append(sub)
        assert p["spec"].get("filters"), f"{p['metadata']['name']}: no filter on its sources"
        _source_patterns(p["spec"]["filters"])
    # Knative applies the first policy that names a sender (knative/eventing
    # auth.SubjectAndFiltersPass); one policy per sender means none shadows another.
    assert len(senders) == len(set(senders))
    assert TRIGGER_SUB not in senders


def test_the_triggers_source_policy_entry_is_exactly_the_brokers_senders_sources():
    allowed = set()
    for p in _policies("Broker", "audit"):
        allowed |= _source_patterns(p["spec"]["filters"])
    policy = yaml.safe_load(_settings()["INGEST_SOURCE_POLICY"])
    entry = policy["callers"][TRIGGER_SUB]
    assert set(entry["sources"]) == allowed
    assert len(entry["sources"]) == len(allowed)
    # And it works as a policy: a source no Broker sender has is refused under the Trigger.
    parsed = SourcePolicy.parse(_settings()["INGEST_SOURCE_POLICY"])
    assert parsed.check({"sub": TRIGGER_SUB}, "/openg2p/registry/x", "t").allowed
    assert not parsed.check({"sub": TRIGGER_SUB}, "/openg2p/query", "t").allowed
    assert not parsed.check({"sub": TRIGGER_SUB}, "/openg2p/audit/query", "t").allowed


@pytest.mark.parametrize(
    "sink,kind,name",
    [("audit-dlq", "KafkaSource", "audit-events-to-writer"),
     ("audit-broker-dlq", "Trigger", "audit-to-ingest")],
)  # fmt: skip
def test_each_dead_letter_sink_takes_only_the_dispatcher_that_uses_it(sink, kind, name):
    [policy] = _policies("KafkaSink", sink)
    assert policy["spec"]["from"] == [
        {"ref": {"apiVersion": one("base", kind, name)["apiVersion"], "kind": kind, "name": name}}
    ]
    assert "filters" not in policy["spec"]
    dls = one("base", kind, name)["spec"]["delivery"]["deadLetterSink"]["ref"]
    assert (dls["kind"], dls["name"]) == ("KafkaSink", sink)
    # Binary mode: the redrive reads the event's own attributes and data bytes.
    assert one("base", "KafkaSink", sink)["spec"]["contentMode"] == "binary"


@pytest.mark.parametrize("path", ["base", "overlays/quiet", "overlays/production"])
def test_the_writer_and_maintenance_are_cluster_local(path):
    for name in ("audit-writer", "audit-maintenance"):
        labels = one(path, "Service", name)["metadata"].get("labels", {})
        assert labels.get("networking.knative.dev/visibility") == "cluster-local", name


def test_only_the_knative_sources_identities_may_deliver_and_ping():
    data = _settings()
    source = one("base", "KafkaSource", "audit-events-to-writer")
    ping = one("base", "PingSource", "audit-maintenance-hourly")
    assert data["WRITER_AUTH_SUBJECTS"].split(",") == [
        oidc_subject("default", "KafkaSource", "audit-events-to-writer")
    ]
    assert data["MAINTENANCE_AUTH_SUBJECTS"].split(",") == [
        oidc_subject("default", "PingSource", "audit-maintenance-hourly")
    ]
    assert source["spec"]["sink"]["audience"] == data["WRITER_AUTH_AUDIENCE"]
    assert ping["spec"]["sink"]["audience"] == data["MAINTENANCE_AUTH_AUDIENCE"]
    assert data["MAINTENANCE_AUTH"] == "required" and data["WRITER_AUTH"] == "required"
    trusted = {i["issuer"] for i in yaml.safe_load(data["AUTH_TRUSTED_ISSUERS"])}
    assert {data["WRITER_AUTH_ISSUER"], data["MAINTENANCE_AUTH_ISSUER"]} <= trusted
    # An extension the dispatcher added would not be covered by ingest's attestation.
    assert "ceOverrides" not in source["spec"]


def test_the_runner_applies_the_policies_as_knatives_receiver_does():
    class Issuer:  # accepts any token naming its subject; the signature is another test's
        def verify(self, token: str, audience: str) -> dict:
            sub, _, aud = token.partition("|")
            assert aud == audience, (aud, audience)
            return {"sub": sub}

    m = load(BASE)
    auth = IngressAuth(m, Issuer())
    broker = m.get("Broker", "audit")
    aud = ingress_audience("default", "Broker", "audit")

    def status(sub: str, source: str, type_: str = "org.openg2p.registry.viewed") -> int | None:
        headers = {"Authorization": f"Bearer {sub}|{aud}", "ce-specversion": "1.0",
                   "ce-id": "1", "ce-source": source, "ce-type": type_}  # fmt: skip
        return auth.refusal(broker, headers, b"{}")

    registry = "system:serviceaccount:default:openg2p-registry"
    payments = "system:serviceaccount:default:openg2p-payments"
    assert status(registry, "/openg2p/registry") is None
    assert status(registry, "/openg2p/registry/households") is None
    assert status(registry, "/openg2p/payments") == 403
    assert status(registry, "/openg2p/registryx") == 403
    assert status(payments, "/openg2p/payments", "org.openg2p.payments.approved") is None
    assert status(payments, "/openg2p/payments", "org.openg2p.registry.viewed") == 403
    assert status("system:serviceaccount:default:anyone", "/openg2p/registry") == 403
    assert auth.refusal(broker, {"ce-specversion": "1.0"}, b"{}") == 401
    dlq = m.get("KafkaSink", "audit-dlq")
    dlq_aud = ingress_audience("default", "KafkaSink", "audit-dlq")
    source_sub = oidc_subject("default", "KafkaSource", "audit-events-to-writer")
    ok = {"Authorization": f"Bearer {source_sub}|{dlq_aud}", "ce-specversion": "1.0"}
    assert auth.refusal(dlq, ok, b"") is None
    bad = {"Authorization": f"Bearer {TRIGGER_SUB}|{dlq_aud}", "ce-specversion": "1.0"}
    assert auth.refusal(dlq, bad, b"") == 403
