"""The Knative manifests: valid for the cluster, and keeping the pipeline's promises.

Each overlay is rendered with the real kustomize (kubectl's) and every object
is validated strictly: against the Knative CRD schemas for Knative kinds (an
undeclared field is an error, as `kubectl apply --validate=strict` reports it)
and against the Kubernetes schemas for ConfigMap and Secret. Then the promises
the rest of the system relies on are checked by name: topics, consumer group,
dead-letter sink, retry policy, ordering, schedule, scaling per overlay, and a
ConfigMap that the settings object accepts.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from pydantic import TypeAdapter

from manifest_checks import KNATIVE, REPO, objects, one, render, stages, validation_errors
from openg2p_audit import query
from openg2p_audit.eventing.dispatcher import MAX_POLL_RECORDS
from openg2p_audit.policy import SourcePolicy
from openg2p_audit.settings import Settings, load_settings

BASE = "base"
QUIET = "overlays/quiet"
PRODUCTION = "overlays/production"
RENDERED = (BASE, QUIET, PRODUCTION)

SERVING = "serving.knative.dev"
SERVICES = {
    # Knative Service -> (FUNCTION_TARGET, FUNCTION_SIGNATURE_TYPE, FUNCTION_SOURCE)
    "audit-ingest": ("ingest", "http", "functions/ingest/main.py"),
    "audit-writer": ("write", "http", "functions/writer/main.py"),
    "audit-maintenance": ("maintain", "http", "functions/maintenance/main.py"),
    "audit-query": ("query", "http", "functions/query/main.py"),
}
# Knative Service -> the Secret its database password comes from.
DB_USERS = {
    "audit-writer": "audit-db",
    "audit-maintenance": "audit-db",
    "audit-query": "audit-query",
}
SECRETS = {"audit-db", "audit-query"}
KAFKA_SINK_REF = {"apiVersion": "eventing.knative.dev/v1alpha1", "kind": "KafkaSink"}
SERVICE_REF = {"apiVersion": "serving.knative.dev/v1", "kind": "Service"}

# Settings that deliberately stay out of the ConfigMap.
NOT_IN_CONFIGMAP = {
    "DB_PASSWORD": "comes from the Secret audit-db",
    "DATABASE_URL": "would carry the password; the DB_* variables are used instead",
    "QUERY_CURSOR_SECRET": "comes from the Secret audit-query",
    "ATTESTATION_INGEST_KEYS": "comes from the Secret audit-attestation (created out of band)",
    "ATTESTATION_QUERY_KEYS": "comes from the Secret audit-attestation (created out of band)",
    "INGEST_SOURCE_POLICY_FILE": "the policy is the ConfigMap's INGEST_SOURCE_POLICY",
    "INTEGRITY_VERIFIER_KEYS": "a reader's setting (verify, evidence); no function uses it",
}

KEDA = "autoscaling.eventing.knative.dev"
KEDA_CLASS = "keda.autoscaling.knative.dev"
ISO_DURATION = TypeAdapter(timedelta)


def _annotations(service: dict) -> dict[str, str]:
    return service["spec"]["template"]["metadata"]["annotations"]


def _container(service: dict) -> dict:
    containers = service["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, service["metadata"]["name"]
    return containers[0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _settings_env() -> dict[str, str]:
    return one(BASE, "ConfigMap", "audit-settings")["data"]


# ---------------------------------------------------------------- validity


@pytest.mark.parametrize("path", RENDERED)
def test_every_object_passes_strict_schema_validation(path):
    rendered = render(path)
    assert rendered
    problems = {
        f"{o['kind']}/{o['metadata']['name']}": errs
        for o in rendered
        if (errs := validation_errors(o))
    }
    assert problems == {}


@pytest.mark.parametrize("path", RENDERED)
def test_every_object_is_of_a_kind_with_a_schema_here(path):
    kinds = {(o["apiVersion"], o["kind"]) for o in render(path)}
    assert kinds <= {
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("batch/v1", "Job"),
        ("serving.knative.dev/v1", "Service"),
        ("sources.knative.dev/v1", "KafkaSource"),
        ("sources.knative.dev/v1", "PingSource"),
        ("eventing.knative.dev/v1alpha1", "KafkaSink"),
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
        ("eventing.knative.dev/v1alpha1", "EventPolicy"),
    }


def test_validator_rejects_an_undeclared_field_anywhere():
    source = objects(QUIET, "KafkaSource")[0]
    source["spec"]["orderingg"] = "unordered"  # a typo kubectl --validate=strict reports
    assert validation_errors(source) == [
        "spec: Additional properties are not allowed ('orderingg' was unexpected)"
    ]

    service = objects(QUIET, "Service", SERVING)[0]
    _container(service)["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] = 0
    service["status"] = {"url": "http://x"}  # declared by the CRD: allowed
    service["spec"]["bogus"] = True
    errors = validation_errors(service)
    assert any("'paht' was unexpected" in e for e in errors), errors
    assert any("'bogus' was unexpected" in e for e in errors), errors
    assert any("min-scale" in e and "not of type 'string'" in e for e in errors), errors
    assert len(errors) == 3, errors


def test_validator_rejects_undeclared_root_and_metadata_fields():
    sink = objects(QUIET, "KafkaSink")[0]  # its CRD schema declares no root fields at all
    assert validation_errors(sink) == []
    sink["metadata"]["labelz"] = {"a": "b"}
    sink["specification"] = {}
    errors = validation_errors(sink)
    assert "(root): Additional properties are not allowed ('specification' was unexpected)" in (
        errors
    )
    assert "metadata: Additional properties are not allowed ('labelz' was unexpected)" in errors


def test_validator_allows_what_the_crd_preserves_and_checks_what_it_declares():
    trigger = objects(QUIET, "Trigger")[0]
    trigger["spec"]["filter"] = {"attributes": {"type": "x", "anyattribute": "y"}}
    assert validation_errors(trigger) == []  # attributes: x-kubernetes-preserve-unknown-fields
    trigger["spec"]["filter"]["prefix"] = {"type": "x"}
    assert validation_errors(trigger) == [
        "spec.filter: Additional properties are not allowed ('prefix' was unexpected)"
    ]


def test_validator_checks_configmap_and_secret_like_the_api_server():
    config = objects(QUIET, "ConfigMap")[0]
    config["data"]["KAFKA_TOPIC_PARTITIONS"] = 12  # unquoted YAML number
    config["data"]["not a key"] = "x"
    config["metadata"]["name"] = "Audit_Settings"
    errors = validation_errors(config)
    assert "data.KAFKA_TOPIC_PARTITIONS: 12 is not a string" in errors
    assert "data.not a key: not a valid key" in errors
    assert "metadata.name: 'Audit_Settings' is not a DNS-1123 subdomain" in errors

    secret = objects(QUIET, "Secret")[0]
    secret["stringdata"] = secret.pop("stringData")
    assert validation_errors(secret) == [
        "(root): Additional properties are not allowed ('stringdata' was unexpected)"
    ]


# ---------------------------------------------------------------- layout


def test_base_lists_exactly_the_files_beside_it():
    """The local runner reads knative/base through its resource list."""
    base = KNATIVE / "base"
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    assert set(present) == {
        "configmap.yaml",
        "secret.yaml",
        "ingest.yaml",
        "writer.yaml",
        "maintenance.yaml",
        "query.yaml",
        "query-secret.yaml",
        "kafkasource.yaml",
        "dlq-sink.yaml",
        "broker-dlq-sink.yaml",
        "pingsource.yaml",
        "broker.yaml",
        "trigger.yaml",
        "topics-job.yaml",
        "eventpolicies.yaml",
    }


@pytest.mark.parametrize("path", (QUIET, PRODUCTION))
def test_overlays_build_on_the_base_and_keep_every_object_but_the_secrets(path):
    assert yaml.safe_load((KNATIVE / path / "kustomization.yaml").read_text())["resources"] == [
        "../../base"
    ]
    names = lambda p: {(o["kind"], o["metadata"]["name"]) for o in render(p)}  # noqa: E731
    assert names(path) | {("Secret", s) for s in SECRETS} == names(BASE)


# ---------------------------------------------------------------- services


@pytest.mark.parametrize("path", RENDERED)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_runs_its_function_with_settings_and_probes(path, name):
    service = one(path, "Service", name, SERVING)
    container = _container(service)
    env = _env(container)
    target, signature, source = SERVICES[name]
    assert env["FUNCTION_TARGET"] == {"name": "FUNCTION_TARGET", "value": target}
    assert env["FUNCTION_SIGNATURE_TYPE"]["value"] == signature
    assert env["FUNCTION_SOURCE"]["value"] == source
    assert container["envFrom"] == [{"configMapRef": {"name": "audit-settings"}}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    requests = container["resources"]["requests"]
    assert set(requests) >= {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_function_source_defines_the_target(name):
    target, _, source = SERVICES[name]
    tree = ast.parse((REPO / source).read_text())
    defined = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom | ast.Import)
        for alias in node.names
    } | {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert target in defined


@pytest.mark.parametrize("path", RENDERED)
@pytest.mark.parametrize("name", sorted(DB_USERS))
def test_database_password_comes_from_the_secret(path, name):
    env = _env(_container(one(path, "Service", name, SERVING)))
    assert env["DB_PASSWORD"] == {
        "name": "DB_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": DB_USERS[name], "key": "DB_PASSWORD"}},
    }
    secret = one(BASE, "Secret", DB_USERS[name])
    assert "DB_PASSWORD" in secret["stringData"]


def test_only_database_users_get_the_password():
    env = _env(_container(one(BASE, "Service", "audit-ingest", SERVING)))
    assert "DB_PASSWORD" not in env


@pytest.mark.parametrize("path", RENDERED)
def test_query_service_reads_with_its_own_role_and_cursor_key(path):
    """Not the writer's role: the query role holds SELECT only (README, 'The read-only role')."""
    env = _env(_container(one(path, "Service", "audit-query", SERVING)))
    assert env["DB_USER"]["value"] != _settings_env()["DB_USER"]
    assert env["QUERY_CURSOR_SECRET"] == {
        "name": "QUERY_CURSOR_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "audit-query", "key": "QUERY_CURSOR_SECRET"}},
    }
    for other in set(SERVICES) - {"audit-query"}:
        other_env = _env(_container(one(path, "Service", other, SERVING)))
        assert "QUERY_CURSOR_SECRET" not in other_env and "DB_USER" not in other_env


SECRET_IN_TEXT = r"QUERY_CURSOR_SECRET[\"']?\s*[:=]\s*[\"']?([^\s\"']+)"


def test_every_committed_cursor_key_is_one_the_query_service_refuses():
    """Anything under knative/ is readable by anyone with a clone: none of it may sign cursors
    (tests/test_query_attacks.py starts the service with the placeholder and sees it refuse)."""
    found = set()
    for path in KNATIVE.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for text in _strings(doc):
                found.update(re.findall(SECRET_IN_TEXT, text))
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                data = {
                    **doc.get("stringData", {}),
                    **{k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()},
                }
                if "QUERY_CURSOR_SECRET" in data:
                    found.add(data["QUERY_CURSOR_SECRET"])
    found.discard("...")
    assert one(BASE, "Secret", "audit-query")["stringData"]["QUERY_CURSOR_SECRET"] in found
    assert found <= query.COMMITTED_CURSOR_SECRETS  # each named as committed when refused
    for secret in found:
        assert "committed" in query.cursor_secret_problem(secret), secret


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


@pytest.mark.parametrize("path", RENDERED)
def test_query_exports_may_stream_for_minutes(path):
    spec = one(path, "Service", "audit-query", SERVING)["spec"]["template"]["spec"]
    assert 300 <= spec["timeoutSeconds"] <= 600  # Knative's default max-revision-timeout


@pytest.mark.parametrize("path", RENDERED)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_function_is_served_in_asgi_mode(path, name):
    """An aio function on uvicorn workers: waiting requests hold no thread, so none starves
    the probes; without FUNCTION_USE_ASGI functions-framework would serve Flask on gthread."""
    env = _env(_container(one(path, "Service", name, SERVING)))
    assert env["FUNCTION_USE_ASGI"]["value"] == "true"
    assert int(env["WORKERS"]["value"]) >= 1
    assert "THREADS" not in env


def test_writer_takes_many_deliveries_at_once_for_group_commit():
    writer = one(BASE, "Service", "audit-writer", SERVING)
    concurrency = writer["spec"]["template"]["spec"]["containerConcurrency"]
    target = int(_annotations(writer)["autoscaling.knative.dev/target"])
    assert concurrency >= 50
    # Scale out only once an instance is mostly busy, so batches stay large.
    assert concurrency * 0.5 <= target < concurrency


def test_maintenance_runs_one_at_a_time():
    maintenance = one(BASE, "Service", "audit-maintenance", SERVING)
    assert maintenance["spec"]["template"]["spec"]["containerConcurrency"] == 1
    assert _annotations(maintenance)["autoscaling.knative.dev/max-scale"] == "1"


@pytest.mark.parametrize("path", RENDERED)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_scale_bounds_are_sensible(path, name):
    notes = _annotations(one(path, "Service", name, SERVING))
    low = int(notes["autoscaling.knative.dev/min-scale"])
    high = int(notes["autoscaling.knative.dev/max-scale"])
    assert 0 <= low <= high <= 20
    assert high >= 1


@pytest.mark.parametrize("path", (BASE, QUIET))
def test_quiet_scales_everything_to_zero(path):
    services = objects(path, "Service", SERVING)
    assert {s["metadata"]["name"] for s in services} == set(SERVICES)
    for service in services:
        assert _annotations(service)["autoscaling.knative.dev/min-scale"] == "0"
    annotations = [key for o in render(path) for key in o["metadata"].get("annotations", {})]
    assert not any(KEDA in key for key in annotations)


def test_production_keeps_ingest_warm():
    notes = _annotations(one(PRODUCTION, "Service", "audit-ingest", SERVING))
    assert int(notes["autoscaling.knative.dev/min-scale"]) >= 1


@pytest.mark.parametrize("path", RENDERED)
def test_tokens_are_required_with_an_issuer_and_a_valid_policy(path):
    data = one(path, "ConfigMap", "audit-settings")["data"]
    assert data["INGEST_AUTH"] == "required" and data["WRITER_AUTH"] == "required"
    assert data["AUTH_ISSUER"] and data["AUTH_JWKS_URL"]
    policy = SourcePolicy.parse(data["INGEST_SOURCE_POLICY"])
    assert policy.check({"azp": "openg2p-registry"}, "/openg2p/registry", "x").allowed
    assert not policy.check({"azp": "openg2p-registry"}, "/openg2p/payments", "x").allowed


def test_production_pins_tokens_on_in_its_own_patch():
    text = (KNATIVE / PRODUCTION / "kustomization.yaml").read_text()
    assert "INGEST_AUTH: required" in text and "WRITER_AUTH: required" in text


def test_production_does_not_deploy_the_placeholder_secrets():
    assert objects(PRODUCTION, "Secret") == []
    assert one(QUIET, "Secret", "audit-db")["stringData"]["DB_PASSWORD"]
    # The query service refuses the placeholder cursor key, so no cluster gets it: an
    # apply of either overlay must not reset the key created out of band.
    assert [s["metadata"]["name"] for s in objects(QUIET, "Secret")] == ["audit-db"]


# ---------------------------------------------------------------- settings


def test_configmap_holds_every_setting_and_nothing_else():
    fields = {name.upper() for name in Settings.model_fields}
    data = _settings_env()
    assert set(data) == fields - set(NOT_IN_CONFIGMAP)


def test_configmap_and_secret_are_valid_settings(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for key, value in _settings_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DB_PASSWORD", one(BASE, "Secret", "audit-db")["stringData"]["DB_PASSWORD"])
    query_secret = one(BASE, "Secret", "audit-query")["stringData"]
    monkeypatch.setenv("QUERY_CURSOR_SECRET", query_secret["QUERY_CURSOR_SECRET"])
    settings = load_settings()
    assert settings.auth_configured
    assert settings.kafka_configured and settings.database_configured
    assert settings.kafka_events_topic == "openg2p.audit.events"
    assert settings.kafka_dlq_topic == "openg2p.audit.dlq"
    assert settings.kafka_consumer_group == "openg2p-audit-consumer"
    assert settings.pg_connect_kwargs["password"] == "change-me"


# ---------------------------------------------------------------- eventing


@pytest.mark.parametrize("path", RENDERED)
def test_kafkasource_reads_the_events_topic_from_the_start(path):
    spec = one(path, "KafkaSource", "audit-events-to-writer")["spec"]
    data = _settings_env()
    assert spec["consumerGroup"] == "openg2p-audit-consumer" == data["KAFKA_CONSUMER_GROUP"]
    assert spec["topics"] == ["openg2p.audit.events"] == [data["KAFKA_EVENTS_TOPIC"]]
    assert spec["bootstrapServers"] == data["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert spec["initialOffset"] == "earliest"
    # Knative's OIDC feature: the token of each delivery is for the audience the writer checks.
    assert spec["sink"] == {
        "audience": data["WRITER_AUTH_AUDIENCE"],
        "ref": {**SERVICE_REF, "name": "audit-writer"},
    }


@pytest.mark.parametrize("path", RENDERED)
def test_kafkasource_ordering_is_explicit(path):
    # unordered: see docs/deployment.md ("Why unordered delivery").
    assert one(path, "KafkaSource", "audit-events-to-writer")["spec"]["ordering"] == "unordered"


@pytest.mark.parametrize(
    "kind,name", [("KafkaSource", "audit-events-to-writer"), ("Trigger", "audit-to-ingest")]
)
def test_failed_deliveries_retry_with_backoff_then_go_to_the_dlq(kind, name):
    delivery = one(BASE, kind, name)["spec"]["delivery"]
    assert delivery["backoffPolicy"] == "exponential"
    first = ISO_DURATION.validate_python(delivery["backoffDelay"])
    assert timedelta(milliseconds=50) <= first <= timedelta(seconds=5)
    assert isinstance(delivery["retry"], int) and delivery["retry"] >= 3
    # Exponential: delay * 2^n after the n-th failure. Outlast a database failover.
    total = sum((first * 2**n for n in range(1, delivery["retry"] + 1)), timedelta())
    assert timedelta(minutes=5) <= total <= timedelta(hours=1)
    # The Trigger's dead letters (Broker events ingest never took) have a topic of their own.
    dlq = "audit-dlq" if kind == "KafkaSource" else "audit-broker-dlq"
    assert delivery["deadLetterSink"] == {"ref": {**KAFKA_SINK_REF, "name": dlq}}


@pytest.mark.parametrize("path", RENDERED)
def test_dead_letter_sink_writes_the_dlq_topic(path):
    sink = one(path, "KafkaSink", "audit-dlq")
    data = _settings_env()
    assert sink["spec"]["topic"] == "openg2p.audit.dlq" == data["KAFKA_DLQ_TOPIC"]
    assert sink["spec"]["bootstrapServers"] == data["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert sink["spec"]["contentMode"] == "binary"


@pytest.mark.parametrize("path", RENDERED)
def test_pingsource_fires_maintenance_hourly_in_utc(path):
    spec = one(path, "PingSource", "audit-maintenance-hourly")["spec"]
    minute, *rest = spec["schedule"].split()
    assert rest == ["*", "*", "*", "*"] and 0 <= int(minute) <= 59
    zone = zoneinfo.ZoneInfo(spec["timezone"])
    for month in (1, 7):  # no daylight-saving offset either
        assert datetime(2026, month, 1, tzinfo=zone).utcoffset() == timedelta(0)
    assert datetime(2026, 1, 1, tzinfo=zone).astimezone(UTC).hour == 0
    # Knative's OIDC feature: each ping's token is for the audience maintenance checks.
    assert spec["sink"] == {
        "audience": _settings_env()["MAINTENANCE_AUTH_AUDIENCE"],
        "ref": {**SERVICE_REF, "name": "audit-maintenance"},
    }


@pytest.mark.parametrize("path", RENDERED)
def test_broker_is_durable_and_its_trigger_feeds_ingest_unfiltered(path):
    broker = one(path, "Broker", "audit")
    assert broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == "Kafka"
    spec = one(path, "Trigger", "audit-to-ingest")["spec"]
    assert spec["broker"] == "audit"
    data = _settings_env()
    assert spec["subscriber"] == {
        "audience": data["AUTH_AUDIENCE"],
        "ref": {**SERVICE_REF, "name": "audit-ingest"},
    }
    # ingest trusts the cluster's service-account issuer (which signs Knative's OIDC tokens)
    # for that audience
    trusted = json.loads(data["AUTH_TRUSTED_ISSUERS"])
    assert any(i["audience"] == data["AUTH_AUDIENCE"] for i in trusted)
    assert "filter" not in spec and "filters" not in spec


@pytest.mark.parametrize("path", RENDERED)
def test_every_reference_resolves_within_the_rendered_objects(path):
    present = {(o["kind"], o["metadata"]["name"]) for o in render(path)}
    wanted: set[tuple[str, str]] = set()
    for obj in render(path):
        spec = obj.get("spec", {})
        for holder in (spec, spec.get("delivery", {})):
            for field in ("sink", "subscriber", "deadLetterSink"):
                if ref := holder.get(field, {}).get("ref"):
                    wanted.add((ref["kind"], ref["name"]))
        if obj["kind"] == "Trigger":
            wanted.add(("Broker", spec["broker"]))
        if obj["kind"] == "Service":
            container = _container(obj)
            for source in container.get("envFrom", []):
                wanted.add(("ConfigMap", source["configMapRef"]["name"]))
            for var in container.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    wanted.add(("Secret", ref["name"]))
        if obj["kind"] == "EventPolicy":
            for entry in spec.get("to", []) + spec.get("from", []):
                if ref := entry.get("ref"):
                    wanted.add((ref["kind"], ref["name"]))
    missing = wanted - present
    # Created out of band, by design: no key or password of a deployment is in the repository,
    # and every Secret in production, audit-query everywhere.
    out_of_band = {("Secret", "audit-attestation")}
    if path == PRODUCTION:
        assert missing == out_of_band | {("Secret", s) for s in SECRETS}
    elif path == QUIET:
        assert missing == out_of_band | {("Secret", "audit-query")}
    else:
        assert missing == out_of_band


# ---------------------------------------------------------------- autoscaling


def test_production_kafkasource_scales_on_consumer_lag_with_keda():
    notes = one(PRODUCTION, "KafkaSource", "audit-events-to-writer")["metadata"]["annotations"]
    assert notes[f"{KEDA}/class"] == KEDA_CLASS
    low, high = int(notes[f"{KEDA}/min-scale"]), int(notes[f"{KEDA}/max-scale"])
    partitions = int(_settings_env()["KAFKA_TOPIC_PARTITIONS"])
    # Consumers, not pods: one past the partition count would sit idle.
    assert 1 <= low <= high <= partitions
    lag = int(notes[f"{KEDA}/lag-threshold"])
    assert lag > 0
    # About one consumer's in-flight window: unordered, a consumer polls again while fewer
    # than max.poll.records (50) are in flight, so up to 2 x 50 - 1 are.
    assert lag == 2 * MAX_POLL_RECORDS
    assert int(notes[f"{KEDA}/polling-interval"]) > 0
    assert int(notes[f"{KEDA}/cooldown-period"]) > 0
    known = {
        "class",
        "min-scale",
        "max-scale",
        "polling-interval",
        "cooldown-period",
        "lag-threshold",
    }
    # Not activation-lag-threshold: eventing-kafka-broker copies it to the ConsumerGroup but
    # never hands it to KEDA (control-plane/pkg/autoscaler/keda/keda.go), so it would only
    # look as if it did something.
    assert {key.split("/", 1)[1] for key in notes if key.startswith(f"{KEDA}/")} <= known


# ---------------------------------------------------------------- topics


@pytest.mark.parametrize("path", RENDERED)
def test_a_job_creates_the_topics_from_the_configmap_settings(path):
    """The KafkaSink audit-dlq names no partitions or replication, so its topic must exist
    before it can be Ready: the deployment itself runs `openg2p-audit topics`."""
    job = one(path, "Job", "audit-topics")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["openg2p-audit", "topics"]
    assert "args" not in container  # every setting it uses comes from the ConfigMap
    assert container["envFrom"] == [{"configMapRef": {"name": "audit-settings"}}]
    assert "env" not in container  # no Secret: the command never touches the database
    writer = _container(one(path, "Service", "audit-writer", SERVING))
    assert container["image"] == writer["image"]
    assert pod["restartPolicy"] == "Never"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "memory" in container["resources"]["limits"]
    # Bounded, and gone once done so that the next deploy's new image can create it again.
    assert 0 < spec["backoffLimit"] <= 6
    assert 0 < spec["activeDeadlineSeconds"] <= 600
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    sink = one(path, "KafkaSink", "audit-dlq")["spec"]
    assert "numPartitions" not in sink and "replicationFactor" not in sink


def test_the_job_command_is_on_the_images_path():
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'openg2p-audit = "openg2p_audit.cli:main"' in scripts
    runtime = dict(stages()["runtime"]["instructions"])
    assert "PATH=/opt/venv/bin:$PATH" in runtime["ENV"]
    build = " ".join(v for i, v in stages()["build"]["instructions"] if i == "RUN")
    assert "/opt/venv/bin/pip install --no-cache-dir ." in build


def test_the_topics_the_job_creates_are_the_ones_the_manifests_use(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    settings = Settings(**{k.lower(): v for k, v in _settings_env().items()})
    kafkasource = one(BASE, "KafkaSource", "audit-events-to-writer")["spec"]
    sink = one(BASE, "KafkaSink", "audit-dlq")["spec"]
    assert kafkasource["topics"] == [settings.kafka_events_topic]
    assert sink["topic"] == settings.kafka_dlq_topic


def test_production_replicates_every_topic():
    data = one(PRODUCTION, "ConfigMap", "audit-settings")["data"]
    replicas, insync = int(data["KAFKA_REPLICATION_FACTOR"]), int(data["KAFKA_MIN_INSYNC_REPLICAS"])
    assert replicas >= 3 and 2 <= insync < replicas  # one broker down still takes writes
    base = _settings_env()
    assert base["KAFKA_REPLICATION_FACTOR"] == base["KAFKA_MIN_INSYNC_REPLICAS"] == "1"


# ---------------------------------------------------------------- placement


def test_production_leaves_spreading_warm_ingest_instances_to_serving():
    """Serving (knative-v1.15 and later) gives every revision a preferred pod anti-affinity
    over nodes unless the Service sets an affinity of its own; tests/test_knative_validate.py
    reads that default from Serving's code. Setting `affinity` or
    `topologySpreadConstraints` would replace it, and needs a feature flag."""
    notes = _annotations(one(PRODUCTION, "Service", "audit-ingest", SERVING))
    assert int(notes["autoscaling.knative.dev/min-scale"]) >= 2
    for path in RENDERED:
        for service in objects(path, "Service", SERVING):
            pod = service["spec"]["template"]["spec"]
            assert "affinity" not in pod and "topologySpreadConstraints" not in pod
