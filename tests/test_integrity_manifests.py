"""The sealing key's wiring: a Secret mounted where the ConfigMap says, in maintenance only."""

from __future__ import annotations

from manifest_checks import one
from openg2p_audit.settings import load_settings

BASE = "base"
SERVING = "serving.knative.dev"


def test_maintenance_mounts_the_signing_key_secret_where_the_setting_points():
    path = one(BASE, "ConfigMap", "audit-settings")["data"]["INTEGRITY_SIGNING_KEY_FILE"]
    service = one(BASE, "Service", "audit-maintenance", SERVING)
    spec = service["spec"]["template"]["spec"]
    [mount] = spec["containers"][0]["volumeMounts"]
    [volume] = spec["volumes"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    assert path.startswith(mount["mountPath"] + "/")
    assert volume["secret"]["secretName"] == "audit-signing-key"
    for other in ("audit-ingest", "audit-writer", "audit-query"):
        assert "volumes" not in one(BASE, "Service", other, SERVING)["spec"]["template"]["spec"]


def test_configmap_digest_settings_are_valid():
    data = one(BASE, "ConfigMap", "audit-settings")["data"]
    s = load_settings(
        **{k.lower(): v for k, v in data.items() if k.startswith(("INTEGRITY", "KAFKA_DIG"))}
    )
    assert s.kafka_digests_topic == "openg2p.audit.digests"
    assert s.integrity_grace_seconds == 600


def test_the_runner_stands_in_a_local_key_for_the_mounted_secret(tmp_path):
    from openg2p_audit.eventing.runner import REPO_ROOT, Runner
    from openg2p_audit.integrity import Signer
    from openg2p_audit.settings import Settings

    mounted = one(BASE, "ConfigMap", "audit-settings")["data"]["INTEGRITY_SIGNING_KEY_FILE"]
    runner = Runner(REPO_ROOT / "knative" / "base", Settings(), workdir=tmp_path / "w")
    env = {"INTEGRITY_SIGNING_KEY_FILE": mounted}
    runner._stand_in_signing_key("audit-maintenance", env)
    key = env["INTEGRITY_SIGNING_KEY_FILE"]
    assert key != mounted and key.startswith(str(tmp_path / "w"))
    assert Signer.from_file("dev", key).verifier.name == "dev"
    again = {"INTEGRITY_SIGNING_KEY_FILE": mounted}
    runner._stand_in_signing_key("audit-maintenance", again)
    assert again == env  # one key per work folder, kept across restarts
    other = {"KAFKA_EVENTS_TOPIC": "x"}
    runner._stand_in_signing_key("audit-ingest", other)
    assert other == {"KAFKA_EVENTS_TOPIC": "x"}  # only a Service that names a key gets one


def test_the_runner_lists_the_key_mount_as_deployment_only():
    from openg2p_audit.eventing.manifests import load
    from openg2p_audit.eventing.runner import REPO_ROOT

    m = load(REPO_ROOT / "knative" / "base")
    found = {str(f) for f in m.deployment_only if f.resource == "Service/audit-maintenance"}
    assert any("volumeMounts" in f for f in found) and any("volumes" in f for f in found)
    assert not m.unsupported
