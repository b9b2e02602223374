"""The manifests, judged by Knative's own Go code (tools/knative-validate).

tests/test_manifests.py checks every object against the CRD schemas, which is what the
API server does. A cluster does more: Knative's admission webhooks default and validate
each object with Knative's Go code, and its controllers derive values nobody writes down
(the OIDC identity of each source, the autoscaler's real target). tools/knative-validate
runs that code: it renders knative/base and both overlays in-process with kustomize,
decodes each object strictly, runs SetDefaults and Validate under apis.WithinCreate
(Serving with its shipped config plus the features the cluster must enable; Eventing with
and without `authentication-oidc`), and prints what Knative derives. These tests assert
no refusal, and that every OIDC identity a manifest names is one Knative gives.

KafkaSource and KafkaSink are not judged by Knative's code here: their Go types are in
knative.dev/eventing-kafka-broker, whose module the Go module proxy refuses to serve, so
they stay on their CRD schemas (tests/test_manifests.py, tests/schemas/knative). Their
OIDC identity and audience are still derived on the Go side, with knative/eventing's
`auth` functions, which eventing-kafka-broker's reconcilers call with the same
GroupVersionKinds (control-plane/pkg/reconciler/source/source.go, sink/kafka_sink.go).

The Go side is the authority on what Knative derives; the identities the project names
are read from the same rendering (the ConfigMap's INGEST_SOURCE_POLICY, parsed by ingest's
own policy parser, WRITER_AUTH_SUBJECTS and MAINTENANCE_AUTH_SUBJECTS when present, and
every EventPolicy's from[]).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from knative_go import REPO, Report, validate
from openg2p_audit.knative_identity import oidc_subject
from openg2p_audit.policy import SourcePolicy

# The first build downloads the Go modules on a fresh machine (tests/knative_go.py).
pytestmark = pytest.mark.timeout(1800)

KNATIVE = REPO / "knative"
RENDERED = [KNATIVE / "base", KNATIVE / "overlays" / "quiet", KNATIVE / "overlays" / "production"]
SA = "system:serviceaccount:"

# What docs/deployment.md ("What the cluster must enable") asks of Knative Serving's
# config-features. Nothing today: Serving's shipped defaults accept every Service.
SERVING_FEATURES: dict[str, str] = {}

# The three identities Knative gives our senders in `default` (docs/deployment.md).
IDENTITIES = {
    ("Trigger", "audit-to-ingest"): (
        "system:serviceaccount:default:audit-to-ingest-oidc-eventing.knative.dev-trigger"
    ),
    ("KafkaSource", "audit-events-to-writer"): (
        "system:serviceaccount:default:audit-events-to-writer-oidc-sources.knative.dev-kafkasource"
    ),
    ("PingSource", "audit-maintenance-hourly"): (
        "system:serviceaccount:default:audit-maintenance-hourly-oidc-sources.knative.dev-pingsource"
    ),
}

# Settings naming the identities a function accepts, by the FUNCTION_TARGET that reads them.
SUBJECT_KEYS = {"write": "WRITER_AUTH_SUBJECTS", "maintain": "MAINTENANCE_AUTH_SUBJECTS"}


@pytest.fixture(scope="module")
def report() -> Report:
    return validate(*RENDERED, serving_features=SERVING_FEATURES)


# ---------------------------------------------------------------- the identity rule


def _senders_to(objects: list[dict[str, Any]], kind: str, name: str, namespace: str) -> set[str]:
    """The identities Knative derives for every sender that delivers to kind/name."""
    return {
        obj["derived"]["oidcSubject"]
        for obj in objects
        if obj["derived"].get("oidcSubject")
        for dest in obj["derived"].get("deliversTo", [])
        if (dest["kind"], dest["name"], dest["namespace"]) == (kind, name, namespace)
    }


def _named(objects: list[dict[str, Any]]) -> list[tuple[str, str, tuple[str, str, str] | None]]:
    """(where, subject, receiver) for every OIDC identity the manifests name. The receiver
    is the object the identity is accepted by; None for an EventPolicy's selector."""
    services = {
        o["derived"].get("functionTarget"): (o["kind"], o["name"], o["namespace"])
        for o in objects
        if o["kind"] == "Service"
    }
    named = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['name']}"
        data = obj["derived"].get("data") or {}
        if "INGEST_SOURCE_POLICY" in data:
            for caller in SourcePolicy.parse(data["INGEST_SOURCE_POLICY"]).callers:
                if caller.startswith(SA):
                    named.append((f"{where} INGEST_SOURCE_POLICY", caller, services["ingest"]))
        for target, key in SUBJECT_KEYS.items():
            for subject in (s.strip() for s in data.get(key, "").split(",")):
                if subject:
                    named.append((f"{where} {key}", subject, services[target]))
        policy = obj["derived"].get("eventPolicy")
        if policy is None:
            continue
        # A Broker's policy names who may send to the Broker: services outside this
        # deployment, whose identities Knative does not derive. Every other target of ours
        # is sent to by our own sources and triggers only.
        if policy["to"] and all(t.get("kind") == "Broker" for t in policy["to"]):
            continue
        receivers = [
            None if t.get("selector") else (t["kind"], t["name"], t["namespace"])
            for t in policy["to"]
        ] or [None]
        for i, entry in enumerate(policy["from"]):
            subject = entry.get("sub") or entry.get("resolved")
            if entry.get("kind") and not entry.get("resolved"):
                subject = f"(a {entry['kind']}, which has no OIDC identity of its own)"
            if subject is None or (entry.get("sub") and not subject.startswith(SA)):
                continue
            for receiver in receivers:
                named.append((f"{where} spec.from[{i}]", subject, receiver))
    return named


def identity_problems(report: Report, path: Path | str) -> list[str]:
    """Every named identity that Knative would not give to a sender of that receiver."""
    objects = report.objects(str(path))
    everyone = {o["derived"]["oidcSubject"] for o in objects if o["derived"].get("oidcSubject")}
    problems = []
    for where, subject, receiver in _named(objects):
        allowed = everyone if receiver is None else _senders_to(objects, *receiver)
        if subject not in allowed:
            to = "anything here" if receiver is None else f"{receiver[0]}/{receiver[1]}"
            problems.append(
                f"{where}: {subject!r} is not an identity Knative gives to what sends to {to} "
                f"(it gives: {', '.join(sorted(allowed)) or 'none'})"
            )
    return problems


# ---------------------------------------------------------------- the manifests as shipped


def test_knatives_code_accepts_base_and_both_overlays(report):
    assert report.refusals() == {}
    assert report.status == 0
    for path in RENDERED:
        kinds = {o["kind"] for o in report.objects(str(path))}
        assert {"Service", "PingSource", "Broker", "Trigger", "KafkaSource", "KafkaSink"} <= kinds
    warnings = {
        f"{o['kind']}/{o['name']} [{c['context']}]": c["warnings"]
        for o in report.objects()
        for c in o["checks"]
        if c["warnings"]
    }
    assert warnings == {}


def test_each_knative_object_is_judged_by_knatives_code_or_its_crd_schema(report):
    checked = {(o["apiVersion"], o["kind"]): o["checked"] for o in report.objects()}
    for (api_version, kind), by in checked.items():
        if kind in ("KafkaSource", "KafkaSink"):
            assert by == "crd-schema", kind  # tests/test_manifests.py
        elif api_version in ("v1", "batch/v1"):
            assert by == "core", kind  # the Kubernetes schemas, tests/test_manifests.py
        else:
            assert by == "knative", kind
    eventing = [o for o in report.objects() if o["kind"] in ("Trigger", "PingSource", "Broker")]
    for obj in eventing:  # with and without the OIDC feature
        contexts = {c["context"] for c in obj["checks"]}
        assert contexts == {
            "eventing features=defaults",
            "eventing features=authentication-oidc",
        }


def test_knative_gives_our_senders_the_identities_the_docs_name(report):
    for path in RENDERED:
        for (kind, name), subject in IDENTITIES.items():
            assert report.one(kind, name, str(path))["derived"]["oidcSubject"] == subject
            # The project's port of kmeta.ChildName (the runner, the tests) agrees.
            assert oidc_subject("default", kind, name) == subject
    docs = (REPO / "docs" / "deployment.md").read_text()
    assert all(subject in docs for subject in IDENTITIES.values())


def test_every_identity_the_manifests_name_is_one_knative_gives(report):
    for path in RENDERED:
        named = _named(report.objects(str(path)))
        assert any("INGEST_SOURCE_POLICY" in where for where, _, _ in named), named
        assert identity_problems(report, path) == []


def test_the_ports_of_kmeta_childname_agree_with_knatives_own_for_long_names(tmp_path):
    """Names past 63 characters are hashed (knative/pkg kmeta/names.go): the Python port
    that the runner uses must hash as Knative does."""
    names = ["a" * 20, "b" * 40, "audit-" + "c" * 50, "d" * 63, "e-" * 31 + "f"]
    docs = []
    for name in names:
        for kind, api in (("Trigger", "eventing.knative.dev/v1"),
                          ("PingSource", "sources.knative.dev/v1")):  # fmt: skip
            spec = (
                {"broker": "audit", "subscriber": {"uri": "http://ingest.example"}}
                if kind == "Trigger"
                else {"schedule": "0 * * * *", "sink": {"uri": "http://maintenance.example"}}
            )
            docs.append({"apiVersion": api, "kind": kind, "metadata": {"name": name},
                         "spec": spec})  # fmt: skip
        docs.append({
            "apiVersion": "sources.knative.dev/v1", "kind": "KafkaSource",
            "metadata": {"name": name}, "spec": {"topics": ["t"]},
        })  # fmt: skip
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    objects = validate(path).objects()
    assert len(objects) == 3 * len(names)
    for obj in objects:
        derived = obj["derived"]["oidcSubject"]
        assert derived == oidc_subject("default", obj["kind"], obj["name"]), obj["name"]
        assert len(derived.rsplit(":", 1)[1]) <= 63


# ---------------------------------------------------------------- what Serving derives


def test_autoscaling_targets_are_the_ones_the_manifests_state(report):
    """Serving aims for target x target-utilization (70% unless the revision says otherwise):
    ingest, the writer and the query service state their targets as meant."""
    for path in RENDERED:
        for name in ("audit-ingest", "audit-writer", "audit-query"):
            service = report.one("Service", name, str(path))
            revision = service["derived"]["revision"]
            assert revision["utilization"] == 1.0, name
            assert revision["target"] == revision["total"] < revision["containerConcurrency"]
        writer = report.one("Service", "audit-writer", str(path))["derived"]["revision"]
        assert (writer["target"], writer["containerConcurrency"]) == (80, 100)
        maintenance = report.one("Service", "audit-maintenance", str(path))["derived"]["revision"]
        assert maintenance["containerConcurrency"] == 1 and maintenance["maxScale"] == "1"


def test_an_export_may_stream_for_as_long_as_serving_allows_and_no_longer(report):
    """The queue-proxy ends every request at timeoutSeconds, streaming or not
    (knative/serving pkg/http/handler/timeout.go): the query service asks for the most that
    config-defaults allows, and docs/deployment.md states that bound."""
    for path in RENDERED:
        revision = report.one("Service", "audit-query", str(path))["derived"]["revision"]
        assert revision["timeoutSeconds"] == revision["maxRevisionTimeoutSeconds"] == 600
    assert "600 s" in (REPO / "docs" / "deployment.md").read_text()


def test_serving_spreads_each_revisions_pods_over_nodes(report):
    """No affinity of our own: Serving's default (config-deployment default-affinity-type)
    prefers one revision's pods on different nodes, which keeps production's two warm
    ingest instances apart where the cluster has two nodes."""
    for path in RENDERED:
        for service in (o for o in report.objects(str(path)) if o["kind"] == "Service"):
            assert service["derived"]["revision"]["podAntiAffinity"] == (
                "prefer-spread-revision-over-nodes"
            )


def test_topology_spread_would_need_a_serving_feature_the_cluster_must_enable(tmp_path):
    """Why the production overlay sets no topologySpreadConstraints: Serving refuses the field
    unless config-features enables kubernetes.podspec-topologyspreadconstraints."""
    copy = _knative_copy(tmp_path)
    path = copy / "base" / "ingest.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["template"]["spec"]["topologySpreadConstraints"] = [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"serving.knative.dev/service": "audit-ingest"}},
    }]  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    refused = validate(copy / "base")
    assert refused.status == 1
    assert list(refused.refusals().values()) == [
        ["[serving] must not set the field(s): spec.template.spec.topologySpreadConstraints"]
    ]
    enabled = validate(
        copy / "base", serving_features={"kubernetes.podspec-topologyspreadconstraints": "enabled"}
    )
    assert enabled.status == 0 and enabled.refusals() == {}


# ---------------------------------------------------------------- broken copies fail loudly


def _knative_copy(tmp_path: Path) -> Path:
    target = tmp_path / "knative"
    shutil.copytree(KNATIVE, target)
    return target


def _add_to_base(copy: Path, name: str, docs: list[dict[str, Any]]) -> None:
    (copy / "base" / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    kustomization = copy / "base" / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    doc["resources"].append(name)
    kustomization.write_text(yaml.safe_dump(doc, sort_keys=False))


def _event_policy(name: str, to: dict[str, str], senders: list[dict[str, Any]]) -> dict:
    return {
        "apiVersion": "eventing.knative.dev/v1alpha1",
        "kind": "EventPolicy",
        "metadata": {"name": name},
        "spec": {"to": [{"ref": to}], "from": senders},
    }


DLQ = {"apiVersion": "eventing.knative.dev/v1alpha1", "kind": "KafkaSink", "name": "audit-dlq"}
BROKER = {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "audit"}
WRONG_TRIGGER = "system:serviceaccount:default:oidc-trigger-audit-to-ingest"
WRONG_NAMESPACE = (
    "system:serviceaccount:openg2p:audit-events-to-writer-oidc-sources.knative.dev-kafkasource"
)


def test_a_manifest_naming_an_identity_knative_would_not_give_fails_loudly(tmp_path):
    """The names this project once used, or a right name in the wrong place, are caught:
    in the source policy, in the writer's and maintenance's accepted subjects, and in an
    EventPolicy guarding something our own senders send to."""
    copy = _knative_copy(tmp_path)
    configmap = copy / "base" / "configmap.yaml"
    text = configmap.read_text()
    right = IDENTITIES[("Trigger", "audit-to-ingest")]
    assert right in text
    text = text.replace(right, WRONG_TRIGGER)
    # The writer told to take the PingSource's identity (maintenance keeps its own).
    writer_line = (
        f"  WRITER_AUTH_SUBJECTS: {IDENTITIES[('KafkaSource', 'audit-events-to-writer')]}\n"
    )
    assert writer_line in text
    text = text.replace(
        writer_line,
        f"  WRITER_AUTH_SUBJECTS: {IDENTITIES[('PingSource', 'audit-maintenance-hourly')]}\n",
    )
    configmap.write_text(text)
    kafkasource = {"apiVersion": "sources.knative.dev/v1", "kind": "KafkaSource",
                   "name": "audit-events-to-writer"}  # fmt: skip
    _add_to_base(copy, "policies.yaml", [
        _event_policy("audit-dlq-senders", DLQ, [
            {"ref": kafkasource},
            # The KafkaSource again, by its subject (the Trigger has a dead-letter sink of its own).
            {"sub": IDENTITIES[("KafkaSource", "audit-events-to-writer")]},
            {"sub": WRONG_NAMESPACE},
        ]),
        # Who may send to the Broker is for the deployer to say: not derived, not asserted.
        _event_policy("audit-broker-senders", BROKER, [
            {"sub": "system:serviceaccount:openg2p:openg2p-registry"},
        ]),
    ])  # fmt: skip
    report = validate(copy / "base", copy / "overlays" / "production")
    assert report.status == 0, report.refusals()  # valid objects, wrong names
    for path in (copy / "base", copy / "overlays" / "production"):
        problems = identity_problems(report, path)
        assert [p.split(":", 1)[0] for p in problems] == [
            "ConfigMap/audit-settings INGEST_SOURCE_POLICY",
            "ConfigMap/audit-settings WRITER_AUTH_SUBJECTS",
            "EventPolicy/audit-dlq-senders spec.from[2]",
        ], problems
        assert WRONG_TRIGGER in problems[0] and right in problems[0]
        assert "Service/audit-writer" in problems[1]
        assert IDENTITIES[("KafkaSource", "audit-events-to-writer")] in problems[1]
        assert WRONG_NAMESPACE in problems[2]
    with pytest.raises(AssertionError, match="oidc-trigger-audit-to-ingest"):
        assert identity_problems(report, copy / "base") == []


def test_event_policies_are_validated_by_knatives_code_when_present(tmp_path):
    """The EventPolicy kind (eventing.knative.dev/v1alpha1) is judged like every other: with
    OIDC on it must validate; with it off Knative refuses every EventPolicy on create
    (eventpolicy_validation.go), which is expected, not a fault of the object."""
    copy = _knative_copy(tmp_path)
    _add_to_base(copy, "policies.yaml", [
        _event_policy("good", DLQ, [{"sub": IDENTITIES[("Trigger", "audit-to-ingest")]}]),
        _event_policy("bad", DLQ, [{"sub": "system:serviceaccount:*:audit"}]),
    ])  # fmt: skip
    report = validate(copy / "base")
    assert report.status == 1
    good = report.one("EventPolicy", "good")
    assert {c["context"]: (c["errors"], c.get("expected", False)) for c in good["checks"]} == {
        "eventing features=authentication-oidc": ([], False),
        "eventing features=defaults": (["oidc-authentication feature not enabled"], True),
    }
    [(where, errors)] = report.refusals().items()
    assert where.endswith("EventPolicy/bad")
    assert errors == [
        "[eventing features=authentication-oidc] invalid value: system:serviceaccount:*:audit: "
        "spec.from[0].sub\n'*' is only allowed as suffix"
    ]


def test_an_object_knatives_code_refuses_fails_the_check(tmp_path):
    copy = _knative_copy(tmp_path)
    trigger = copy / "base" / "trigger.yaml"
    doc = yaml.safe_load(trigger.read_text())
    doc["spec"]["subscriber"]["audiense"] = "openg2p-audit"  # a typo the CRD would prune
    trigger.write_text(yaml.safe_dump(doc, sort_keys=False))
    writer = copy / "base" / "writer.yaml"
    doc = yaml.safe_load(writer.read_text())
    doc["spec"]["template"]["spec"]["containerConcurrency"] = 5000  # Serving's limit is 1000
    writer.write_text(yaml.safe_dump(doc, sort_keys=False))
    report = validate(copy / "base")
    assert report.status == 1
    refusals = report.refusals()
    assert set(refusals) == {
        f"{copy / 'base'} Trigger/audit-to-ingest",
        f"{copy / 'base'} Service/audit-writer",
    }
    assert any('unknown field "audiense"' in e
               for e in refusals[f"{copy / 'base'} Trigger/audit-to-ingest"])  # fmt: skip
    assert any("containerConcurrency" in e
               for e in refusals[f"{copy / 'base'} Service/audit-writer"])  # fmt: skip
