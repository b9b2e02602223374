"""The runner as a whole: PingSource, Broker/Trigger, KafkaSink, services, manifests in charge."""

from __future__ import annotations

import json
import logging
import time
import uuid

import pytest
import urllib3

from eventing_support import (
    Recorder,
    config_map,
    headers_of,
    kafka_sink,
    kafka_source,
    ksvc_ref,
    produce,
    read_topic,
    service,
    write_manifests,
)
from openg2p_audit.eventing.kafkasink import ensure_topic
from openg2p_audit.eventing.runner import Runner

HTTP = urllib3.PoolManager(retries=False)


def _trigger(name: str, path: str, **spec) -> dict:
    return {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {"broker": "audit", "subscriber": {**ksvc_ref("recorder"), "uri": path}, **spec},
    }


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    return Recorder(tmp_path_factory.mktemp("recorder"))


@pytest.fixture(scope="module")
def runner(topics, recorder, tmp_path_factory):
    settings = topics
    docs = [
        config_map(settings, recorder.file, recorder.plan_file),
        service("recorder"),
        service("pinged", target="record_cloudevent", signature="cloudevent"),
        kafka_sink("dlq", settings.kafka_dlq_topic),
        {
            "apiVersion": "sources.knative.dev/v1",
            "kind": "PingSource",
            "metadata": {"name": "hourly"},
            "spec": {
                "schedule": "0 * * * *",
                "timezone": "UTC",
                "contentType": "application/json",
                "data": '{"task": "partitions"}',
                "sink": ksvc_ref("pinged"),
            },
        },
        {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "metadata": {"name": "audit"},
            "spec": {"delivery": {"retry": 1, "backoffDelay": "PT0.05S"}},
        },
        _trigger("exact", "/exact", filter={"attributes": {"type": "org.openg2p.audit.login"}}),
        _trigger("prefix", "/prefix", filters=[{"prefix": {"type": "org.openg2p."}}]),
        _trigger(
            "notlegacy",
            "/notlegacy",
            filters=[
                {"all": [{"suffix": {"type": ".login"}}, {"not": {"exact": {"source": "x"}}}]}
            ],
        ),
        _trigger("everything", "/all"),
    ]
    directory = write_manifests(tmp_path_factory.mktemp("manifests"), docs)
    r = Runner(directory, settings, workdir=tmp_path_factory.mktemp("run"), commit_interval=0.2)
    r.start()
    r.wait_ready()
    yield r
    r.stop()


def test_pingsource_fire_now_reaches_its_sink(runner, recorder):
    outcome = runner.fire_ping("hourly")
    assert outcome.delivered and outcome.status == 200
    got = recorder.for_id(outcome.event_id)[0]
    assert got["attributes"]["type"] == "dev.knative.sources.ping"
    assert got["attributes"]["source"] == "/apis/v1/namespaces/default/pingsources/hourly"
    assert got["data"] == {"task": "partitions"}
    # the same through the runner's HTTP endpoint
    resp = HTTP.request("POST", f"{runner.url}/pingsources/hourly/fire")
    assert resp.status == 200 and json.loads(resp.data)["delivered"] is True
    assert runner.pings["hourly"].next_fire().minute == 0


def _token(runner, kind: str, name: str) -> dict[str, str]:
    """With Knative's OIDC feature on, the Broker's and KafkaSink's ingress want a token for
    their own audience; with no EventPolicy, any service account of the namespace may send."""
    sub = "system:serviceaccount:default:sender"
    token = runner.issuer.mint(sub, (), aud=runner.ingress_audience(kind, name))
    return {"Authorization": f"Bearer {token}"}


def _send(url: str, attrs: dict, structured: bool, auth: dict[str, str]) -> int:
    data = {"hello": "world"}
    if structured:
        body = json.dumps({**attrs, "specversion": "1.0", "data": data}).encode()
        headers = {"Content-Type": "application/cloudevents+json"}
    else:
        body = json.dumps(data).encode()
        headers = {"Content-Type": "application/json", "ce-specversion": "1.0"}
        headers.update({f"ce-{k}": v for k, v in attrs.items()})
    return HTTP.request("POST", url, body=body, headers={**headers, **auth}).status


def test_broker_fans_out_to_matching_triggers(runner, recorder):
    url = runner.broker_url("audit")
    login = {"id": str(uuid.uuid4()), "source": "svc", "type": "org.openg2p.audit.login"}
    legacy = {"id": str(uuid.uuid4()), "source": "x", "type": "org.openg2p.audit.login"}
    other = {"id": str(uuid.uuid4()), "source": "svc", "type": "com.example.other"}
    auth = _token(runner, "Broker", "audit")
    assert _send(url, login, structured=True, auth={}) == 401  # OIDC on: a token is needed
    assert _send(url, login, structured=True, auth=auth) == 202
    assert _send(url, legacy, structured=False, auth=auth) == 202
    assert _send(url, other, structured=False, auth=auth) == 202
    ids = {e["id"] for e in (login, legacy, other)}
    want = {
        "/exact": {login["id"], legacy["id"]},
        "/prefix": {login["id"], legacy["id"]},
        "/notlegacy": {login["id"]},
        "/all": ids,
    }

    def by_path(entries: list[dict]) -> dict[str, set]:
        out: dict[str, set] = {p: set() for p in want}
        for e in entries:
            if e["id"] in ids:
                out[e["path"]].add(e["id"])
        return out

    recorder.wait(lambda es: all(by_path(es)[p] >= w for p, w in want.items()), what="fan-out")
    time.sleep(0.5)  # anything that should not arrive has had its chance
    entries = recorder.entries()
    assert by_path(entries) == want
    # delivered in binary mode, structured input included
    got = next(e for e in entries if e["id"] == login["id"] and e["path"] == "/all")
    assert got["headers"]["ce-type"] == "org.openg2p.audit.login"
    assert Recorder.body(got) == b'{"hello":"world"}'


def test_broker_refuses_what_is_not_a_cloudevent(runner):
    headers = {"Content-Type": "application/json", **_token(runner, "Broker", "audit")}
    resp = HTTP.request("POST", runner.broker_url("audit"), body=b"{}", headers=headers)
    assert resp.status == 400 and "ce-specversion" in json.loads(resp.data)["error"]


def test_kafkasink_ingress_writes_binary_records(runner, topics):
    event_id = str(uuid.uuid4())
    attrs = {"id": event_id, "source": "s", "type": "t", "partitionkey": "k9"}
    auth = _token(runner, "KafkaSink", "dlq")
    assert _send(runner.sink_url("dlq"), attrs, structured=True, auth=auth) == 202
    records = read_topic(topics.bootstrap_servers, topics.kafka_dlq_topic, 50, timeout=3)
    [rec] = [r for r in records if headers_of(r).get("ce_id") == event_id]
    assert rec.key == b"k9" and headers_of(rec)["content-type"] == "application/json"
    assert rec.value == b'{"hello":"world"}'


def test_service_keeps_its_port_across_stop_kill_and_start(runner):
    port = runner.service_port("pinged")
    runner.kill_service("pinged")
    assert runner.fire_ping("hourly").status is None  # nobody listening
    runner.start_service("pinged")
    assert runner.service_port("pinged") == port
    assert runner.fire_ping("hourly").delivered
    runner.stop_service("pinged")
    runner.start_service("pinged")
    assert runner.fire_ping("hourly").delivered


@pytest.mark.parametrize("retry", [1, 3])
def test_retry_count_comes_from_the_manifest(retry, topics, tmp_path, caplog):
    settings = topics
    topic = f"{settings.kafka_events_topic}.retry{retry}"
    ensure_topic(settings.bootstrap_servers, topic, 1)
    rec = Recorder(tmp_path)
    event_id = str(uuid.uuid4())
    rec.plan({"ids": {event_id: [{"status": 503}]}})
    source = kafka_source("src", settings, retry=retry, backoff="PT0.01S", topics=[topic])
    source["spec"]["delivery"]["retryAfterMax"] = "PT1S"  # allowed by the CRD, not emulated
    directory = write_manifests(
        tmp_path / "m",
        [config_map(settings, rec.file, rec.plan_file), service("recorder"),
         kafka_sink("dlq", settings.kafka_dlq_topic), source],
    )  # fmt: skip
    headers = [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()),
               ("ce_source", b"s"), ("ce_type", b"t")]  # fmt: skip
    produce(settings.bootstrap_servers, topic, [(None, b"{}", headers)])
    with caplog.at_level(logging.INFO), Runner(directory, settings, workdir=tmp_path / "w") as r:
        dead = None
        for _ in range(60):
            dead = next(
                (x for x in r.sources["src"].stats.outcomes if x.event_id == event_id), None
            )
            if dead:
                break
            time.sleep(0.25)
    assert dead is not None and dead.dead_lettered
    assert [e["status"] for e in rec.for_id(event_id)] == [503] * (retry + 1)
    unsupported = [r for r in caplog.records if "UNSUPPORTED" in r.getMessage()]
    assert (
        unsupported and "KafkaSource/src spec.delivery.retryAfterMax" in unsupported[0].getMessage()
    )
