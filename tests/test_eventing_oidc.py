"""What the runner sends where Knative's `authentication-oidc` feature would, and how pings retry.

Checked against upstream (docs/eventing-runner.md, "Fidelity"): every sender's token names
the identity Knative derives for it and the audience of where it goes, dead-letter sinks
included (eventing-kafka-broker RecordDispatcherImpl, ConsumerVerticleBuilder); a token is
used until five minutes before its hour is up (TokenProvider.java, token_provider.go); a
PingSource sends with its own identity and retries a few times within seconds by the
CloudEvents SDK's rule (knative/eventing pkg/adapter/mtping/runner.go).
"""

from __future__ import annotations

import jwt
import pytest

from eventing_support import (
    Recorder,
    config_map,
    kafka_sink,
    kafka_source,
    ksvc_ref,
    produce,
    service,
    write_manifests,
)
from openg2p_audit.eventing import runner as runner_module
from openg2p_audit.eventing.kafkasink import ensure_topic
from openg2p_audit.eventing.runner import TOKEN_LIFETIME, TOKEN_RENEW_BEFORE, Runner
from openg2p_audit.knative_identity import ingress_audience, oidc_subject

SINK_AUDIENCE = "recorder-audience"
DLS_AUDIENCE = "dead-letters-audience"
PING_AUDIENCE = "maintenance-audience"


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    return Recorder(tmp_path_factory.mktemp("recorder"))


@pytest.fixture(scope="module")
def runner(topics, recorder, tmp_path_factory):
    settings = topics
    to_service = kafka_source("to-service", settings, ordering="unordered", retry=1)
    to_service["spec"]["sink"]["audience"] = SINK_AUDIENCE
    to_service["spec"]["delivery"]["deadLetterSink"] = {
        **ksvc_ref("recorder"), "uri": "/dead-letters", "audience": DLS_AUDIENCE,
    }  # fmt: skip
    other = settings.kafka_events_topic + ".other"
    ensure_topic(settings.bootstrap_servers, other, 1)
    to_sink = kafka_source("to-sink", settings, topics=[other])
    docs = [
        config_map(settings, recorder.file, recorder.plan_file),
        service("recorder"),
        kafka_sink("dlq", settings.kafka_dlq_topic),
        to_service,
        to_sink,
        {
            "apiVersion": "sources.knative.dev/v1",
            "kind": "PingSource",
            "metadata": {"name": "hourly"},
            "spec": {
                "schedule": "0 * * * *",
                "sink": {**ksvc_ref("recorder"), "audience": PING_AUDIENCE},
            },
        },
    ]
    directory = write_manifests(tmp_path_factory.mktemp("manifests"), docs)
    r = Runner(directory, settings, workdir=tmp_path_factory.mktemp("run"), commit_interval=0.2,
               schedule_pings=False)  # fmt: skip
    r.start()
    r.wait_ready()
    yield r
    r.stop()


def _claims(runner: Runner, header: str, aud: str) -> dict:
    assert header.startswith("Bearer ")
    return jwt.decode(header[7:], runner.issuer.public_pem(), algorithms=["RS256"], audience=aud)


def test_a_dead_letter_goes_with_a_token_for_the_dead_letter_sinks_audience(runner, recorder,
                                                                            topics):  # fmt: skip
    event_id = "oidc-dead-letter-1"
    recorder.plan({"ids": {event_id: [{"status": 400, "body": "refused"}, {"status": 202}]}})
    headers = [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()),
               ("ce_source", b"/test"), ("ce_type", b"t")]  # fmt: skip
    produce(topics.bootstrap_servers, topics.kafka_events_topic, [(None, b"{}", headers)])
    first, second = recorder.wait(lambda e: len([x for x in e if x["id"] == event_id]) >= 2,
                                  what="a delivery and its dead letter")[-2:]  # fmt: skip
    subject = oidc_subject("default", "KafkaSource", "to-service")
    assert first["path"] == "/" and second["path"] == "/dead-letters"
    to_sink = _claims(runner, first["headers"]["authorization"], SINK_AUDIENCE)
    to_dls = _claims(runner, second["headers"]["authorization"], DLS_AUDIENCE)
    assert to_sink["sub"] == to_dls["sub"] == subject
    assert second["headers"]["ce-knativeerrorcode"] == "400"


def test_a_kafkasink_or_broker_destination_gets_the_audience_knative_derives(runner):
    """No `audience` in the manifest: the KafkaSink's own (knative/pkg addressable_resolver.go
    takes the addressable's status.address.audience), as tests/test_knative_validate.py
    pins against Knative's Go code."""
    egress = runner.sources["to-sink"].egress
    token = egress.dead_letter_token()
    claims = _claims(runner, f"Bearer {token}", "eventing.knative.dev/kafkasink/default/dlq")
    assert claims["sub"] == oidc_subject("default", "KafkaSource", "to-sink")
    assert egress.token is None  # a Knative Service publishes no audience
    assert (
        ingress_audience("default", "KafkaSink", "dlq")
        == "eventing.knative.dev/kafkasink/default/dlq"
    )
    broker = ingress_audience("default", "Broker", "audit")
    assert broker == "eventing.knative.dev/broker/default/audit"
    with pytest.raises(ValueError, match="no ingress audience"):
        ingress_audience("default", "Service", "audit-writer")


def test_a_ping_carries_the_pingsources_own_token(runner, recorder):
    recorder.plan({"default": {"status": 200}})
    outcome = runner.fire_ping("hourly")
    assert outcome.delivered and outcome.attempts == 1
    [got] = recorder.for_id(outcome.event_id)
    claims = _claims(runner, got["headers"]["authorization"], PING_AUDIENCE)
    assert claims["sub"] == oidc_subject("default", "PingSource", "hourly")


def test_a_ping_is_retried_five_times_within_seconds_on_what_the_sdk_retries(runner, recorder):
    recorder.plan({"default": {"status": 503}})
    outcome = runner.fire_ping("hourly")
    assert not outcome.delivered and outcome.attempts == 6 and outcome.status == 503
    times = [e["t"] for e in recorder.for_id(outcome.event_id)]
    assert len(times) == 6
    # 50 ms x 2^n before the n-th retry: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s.
    assert 3.0 <= times[-1] - times[0] < 10
    recorder.plan({"default": {"status": 500}})  # not in the SDK's list: not retried
    outcome = runner.fire_ping("hourly")
    assert not outcome.delivered and outcome.attempts == 1 and outcome.status == 500
    recorder.plan({"default": {"status": 200}})


def test_a_token_is_used_until_five_minutes_before_it_expires(settings, tmp_path, monkeypatch):
    r = Runner(runner_module.REPO_ROOT / "knative" / "base", settings, workdir=tmp_path)
    r.issuer.url = "http://issuer.invalid/issuer"
    minted = []
    real_mint = r.issuer.mint

    def mint(*args, **kwargs):
        minted.append(kwargs["lifetime"])
        return real_mint(*args, **kwargs)

    monkeypatch.setattr(r.issuer, "mint", mint)
    now = [1_000_000.0]
    monkeypatch.setattr(runner_module.time, "time", lambda: now[0])
    token = r.oidc_token("aud", "default", "kafkasource", "audit-events-to-writer")
    token()
    assert minted == [TOKEN_LIFETIME] == [3600]
    now[0] += TOKEN_LIFETIME - TOKEN_RENEW_BEFORE - 1  # 54 min 59 s later: still the same
    token()
    assert len(minted) == 1
    now[0] += 2  # within five minutes of its expiry: a new one
    token()
    assert len(minted) == 2 and TOKEN_RENEW_BEFORE == 300
