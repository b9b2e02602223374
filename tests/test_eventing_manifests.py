"""Reading knative/ into typed objects, and accounting for every field (no Kafka needed)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from openg2p_audit.eventing import binding
from openg2p_audit.eventing.broker import compile_filter, trigger_filter
from openg2p_audit.eventing.delivery import Response, error_extensions, is_retryable
from openg2p_audit.eventing.dispatcher import OffsetTracker
from openg2p_audit.eventing.manifests import (
    Broker,
    Delivery,
    EventPolicy,
    KafkaSink,
    KafkaSource,
    KService,
    ManifestError,
    PingSource,
    Trigger,
    load,
)
from openg2p_audit.eventing.services import container_env

BASE = Path(__file__).resolve().parents[1] / "knative" / "base"


@pytest.fixture
def base_copy(tmp_path) -> Path:
    target = tmp_path / "base"
    shutil.copytree(BASE, target)
    return target


def _edit(directory: Path, file: str, change) -> None:
    path = directory / file
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_base_manifests_load_as_the_contract_says():
    m = load(BASE)
    services = {s.name: s for s in m.of(KService)}
    assert set(services) == {"audit-ingest", "audit-writer", "audit-maintenance", "audit-query"}
    assert services["audit-writer"].env_value("FUNCTION_TARGET") == "write"
    assert services["audit-maintenance"].env_value("FUNCTION_SIGNATURE_TYPE") == "http"
    [source] = m.of(KafkaSource)
    assert source.consumer_group == "openg2p-audit-consumer"
    assert source.topics == ["openg2p.audit.events"]
    assert source.initial_offset == "earliest"
    assert source.ordering in ("ordered", "unordered")
    assert source.sink.ref is not None and source.sink.ref.name == "audit-writer"
    dls = source.delivery.dead_letter_sink
    assert dls is not None and dls.ref is not None and dls.ref.kind == "KafkaSink"
    sinks = {s.name: s for s in m.of(KafkaSink)}
    assert sinks[dls.ref.name].topic == "openg2p.audit.dlq"
    # The Trigger's dead letters go to a topic of their own (never stored from there).
    assert sinks["audit-broker-dlq"].topic == "openg2p.audit.broker-dlq"
    [ping] = m.of(PingSource)
    assert ping.timezone == "UTC" and ping.sink.ref.name == "audit-maintenance"
    [trigger] = m.of(Trigger)
    assert trigger.broker == m.of(Broker)[0].name and trigger.subscriber.ref.name == "audit-ingest"
    assert trigger.delivery.dead_letter_sink.ref.name == "audit-broker-dlq"
    assert {p.name for p in m.of(EventPolicy)} >= {
        "audit-dlq-from-kafkasource", "audit-broker-dlq-from-trigger",
    }  # fmt: skip
    assert not m.unsupported, [str(f) for f in m.unsupported]


def test_container_env_comes_from_configmap_and_secret():
    m = load(BASE)
    # audit-attestation is created out of band: not in the manifests, it needs a stand-in.
    with pytest.raises(ManifestError, match="audit-attestation"):
        container_env(m.get("Service", "audit-writer"), m)
    env = container_env(m.get("Service", "audit-writer"), m, lambda s, k: f"{s}/{k}")
    assert env["KAFKA_EVENTS_TOPIC"] == "openg2p.audit.events"
    assert env["DB_PASSWORD"]  # from the Secret
    assert env["FUNCTION_SOURCE"] == "functions/writer/main.py"
    assert env["ATTESTATION_INGEST_KEYS"] == "audit-attestation/ingest"


def test_changing_a_manifest_changes_what_is_loaded(base_copy):
    def change(doc):
        doc["spec"]["delivery"].update(retry=1, backoffPolicy="linear", backoffDelay="PT2S")
        doc["spec"]["topics"] = ["other.topic"]
        doc["spec"]["sink"]["ref"]["name"] = "audit-ingest"

    _edit(base_copy, "kafkasource.yaml", change)
    [source] = load(base_copy).of(KafkaSource)
    assert source.delivery.retry == 1 and source.topics == ["other.topic"]
    assert [source.delivery.backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 6.0]
    assert source.sink.ref.name == "audit-ingest"


def test_unsupported_fields_are_reported(base_copy, caplog):
    def source(doc):
        doc["spec"]["delivery"]["retryAfterMax"] = "PT5S"

    def writer(doc):
        c = doc["spec"]["template"]["spec"]["containers"][0]
        c["workingDir"] = "/data"

    def trigger(doc):
        doc["spec"]["filters"] = [{"cesql": "type = 'x'"}]

    _edit(base_copy, "kafkasource.yaml", source)
    _edit(base_copy, "writer.yaml", writer)
    _edit(base_copy, "trigger.yaml", trigger)
    (base_copy / "extra.yaml").write_text(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data}\n"
    )
    _edit(base_copy, "kustomization.yaml", lambda d: d["resources"].append("extra.yaml"))
    m = load(base_copy)
    with caplog.at_level(logging.INFO):
        m.report()
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "KafkaSource/audit-events-to-writer spec.delivery.retryAfterMax" in line
    assert "Service/audit-writer spec.template.spec.containers[].workingDir" in line
    assert "Trigger/audit-to-ingest spec.filters[].cesql" in line
    assert "PersistentVolumeClaim/data (whole resource)" in line
    info = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "spec.template.spec.containers[].resources" in info  # deployment-only, still said


def test_bad_values_are_refused(base_copy):
    _edit(base_copy, "kafkasource.yaml", lambda d: d["spec"].update(ordering="sideways"))
    with pytest.raises(ManifestError, match="ordering"):
        load(base_copy)


def test_bad_duration_is_refused(base_copy):
    _edit(base_copy, "kafkasource.yaml", lambda d: d["spec"]["delivery"].update(backoffDelay="2s"))
    with pytest.raises(ManifestError, match="ISO-8601"):
        load(base_copy)


def test_exponential_backoff_matches_the_dispatcher():
    d = Delivery(retry=3, backoff_delay=0.2)
    assert [d.backoff(n) for n in (1, 2, 3)] == pytest.approx([0.4, 0.8, 1.6])
    assert Delivery().backoff(1) == 0


@pytest.mark.parametrize("code", [500, 502, 503, 404, 408, 409, 429])
def test_retryable_codes(code):
    assert is_retryable(code)


@pytest.mark.parametrize("code", [400, 401, 403, 405, 410, 413, 422, 300])
def test_non_retryable_codes(code):
    assert not is_retryable(code)


def test_error_extensions():
    resp = Response(422, b"x" * 2000, {"KNE-Reason": "schema", "Other": "no"})
    ext = error_extensions("http://127.0.0.1:1/", resp)
    assert ext["knativeerrorcode"] == "422" and ext["knativeerrordest"] == "http://127.0.0.1:1/"
    assert ext["reason"] == "schema" and "other" not in ext
    import base64

    assert base64.b64decode(ext["knativeerrordata"]) == b"x" * 1024
    assert error_extensions("u", Response(None, error="refused")) == {"knativeerrordest": "u"}


def test_offset_tracker_commits_only_contiguous_runs():
    t = OffsetTracker(10)
    for o in (11, 12, 14):
        t.settle(o)
    assert t.to_commit() == 10
    t.settle(10)
    assert t.to_commit() == 13
    t.mark_committed(13)
    t.settle(13)
    assert t.to_commit() == 15


def _ev(**attrs) -> binding.Event:
    return binding.Event({"specversion": "1.0", "id": "1", "source": "s", "type": "t", **attrs})


def test_trigger_filter_dialects():
    f = compile_filter(
        {"any": [{"exact": {"type": "a.b"}}, {"all": [{"prefix": {"source": "/x"}},
                                                      {"not": {"suffix": {"type": ".z"}}}]}]}
    )  # fmt: skip
    assert f(_ev(type="a.b"))
    assert f(_ev(source="/x/1", type="q"))
    assert not f(_ev(source="/x/1", type="q.z"))
    assert not f(_ev(source="/y"))
    with pytest.raises(ManifestError):
        compile_filter({"cesql": "true"})


def test_attributes_filter_empty_value_means_present():
    t = Trigger("Trigger", "v1", "t", "default", "", {}, filter_attributes={"myext": ""})
    f = trigger_filter(t)
    assert f(_ev(myext="anything")) and not f(_ev())


def test_http_binary_values_travel_as_vertx_writes_them():
    """Knative's dispatcher neither encodes nor decodes header values (cloudevents/sdk-java's
    Vert.x binding); Vert.x writes one byte per character: Latin-1, `?` beyond it, and it
    refuses a control character (HttpUtils.validateHeaderValue)."""
    event = _ev(subject='héllo "x" 100%', datacontenttype="application/json")
    event.data = b'{"a":1}'
    headers, body = binding.to_http_binary(event)
    assert headers["ce-subject"] == 'héllo "x" 100%'
    assert headers["Content-Type"] == "application/json"
    back = binding.from_http(headers, body)
    assert back.attributes == event.attributes and back.data == event.data
    assert binding.wire_header_value("₹ 5 \u2013 ok") == "? 5 ? ok"
    assert binding.wire_header_value("%E2%82%B9") == "%E2%82%B9"  # passed through, not decoded
    with pytest.raises(binding.Unsendable):
        binding.to_http_binary(_ev(subject="a\x01b"))


def test_structured_http_keeps_attributes_and_invents_none():
    body = b'{"specversion":"1.0","id":"9","source":"s","type":"t","data":{"k":[1,2]}}'
    event = binding.from_http({"Content-Type": "application/cloudevents+json"}, body)
    assert "time" not in event.attributes
    assert event.data == b'{"k":[1,2]}' and event["datacontenttype"] == "application/json"


def test_not_a_cloudevent():
    with pytest.raises(binding.NotACloudEvent):
        binding.from_http({"Content-Type": "application/json"}, b"{}")
    with pytest.raises(binding.NotACloudEvent, match="id"):
        binding.from_kafka([("ce_specversion", b"1.0"), ("ce_source", b"s")], b"")


def test_ping_schedule_follows_the_manifest_time_zone():
    from datetime import UTC, datetime

    from openg2p_audit.eventing.pingsource import PingScheduler, ping_event

    ping = PingSource("PingSource", "v1", "p", "ns", "", {}, schedule="0 * * * *")
    ping.timezone, ping.content_type, ping.data = "Asia/Kolkata", "application/json", b"{}"
    sched = PingScheduler(ping, "http://127.0.0.1:9")
    nxt = sched.next_fire(datetime(2026, 4, 1, 12, 10, tzinfo=UTC))
    assert nxt.astimezone(UTC) == datetime(2026, 4, 1, 12, 30, tzinfo=UTC)  # UTC+05:30
    event = ping_event(ping)
    assert event["type"] == "dev.knative.sources.ping"
    assert event["source"] == "/apis/v1/namespaces/ns/pingsources/p"
    assert event["datacontenttype"] == "application/json" and event.data == b"{}"
    with pytest.raises(ManifestError):
        PingScheduler(PingSource("PingSource", "v1", "p", "ns", "", {}, schedule="61 * * * *"), "u")


class _Record:
    def __init__(self, value, headers, key=None, partition=3, offset=7, topic="t"):
        self.value, self.headers, self.key = value, headers, key
        self.partition, self.offset, self.topic, self.timestamp = partition, offset, topic, 0


def test_record_mapping_structured_wrapped_and_overrides():
    from openg2p_audit.eventing.kafkasource import record_to_event

    src = KafkaSource("KafkaSource", "v1", "s", "ns", "", {}, ce_overrides={"origin": "kafka"})
    structured = _Record(
        b'{"specversion":"1.0","id":"x","source":"s","type":"t","data":{"a":1}}',
        [("content-type", b"application/cloudevents+json; charset=utf-8")],
    )
    ev = record_to_event(structured, src)
    assert ev.id == "x" and ev.data == b'{"a":1}' and ev["origin"] == "kafka"
    src.key_type = "int"
    wrapped = record_to_event(_Record(None, [], key=(300).to_bytes(4, "big")), src)
    assert wrapped["key"] == "300" and wrapped["partitionkey"] == "300"
    assert wrapped.id == "partition:3/offset:7" and wrapped.data is None
    assert wrapped["time"] == "1970-01-01T00:00:00.000Z"
    # a record claiming to be a CloudEvent but missing attributes is wrapped, not lost
    broken = record_to_event(_Record(b"v", [("ce_specversion", b"1.0")]), src)
    assert broken.type == "dev.knative.kafka.event" and broken["kafkaheadercespecversion"] == "1.0"


def test_environment_settings_the_manifests_contradict_are_named():
    from openg2p_audit.eventing.manifests import load
    from openg2p_audit.eventing.services import environment_conflicts

    manifests = load(Path(__file__).resolve().parents[1] / "knative" / "base")
    environ = {
        "KAFKA_EVENTS_TOPIC": "x",
        "KAFKA_CONSUMER_GROUP": "openg2p-audit-consumer",  # agrees: nothing to say
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # the runner's own business
        "LOG_LEVEL": "DEBUG",
    }
    names = ["KAFKA_EVENTS_TOPIC", "KAFKA_CONSUMER_GROUP", "KAFKA_BOOTSTRAP_SERVERS", "LOG_LEVEL"]
    lines = environment_conflicts(manifests, environ, names)
    assert len(lines) == 2, lines
    [topic] = [line for line in lines if line.startswith("KAFKA_EVENTS_TOPIC=x ")]
    # One line names every place that says otherwise: the Services' ConfigMap and the source.
    assert "Service/audit-ingest" in topic and "KafkaSource/audit-events-to-writer" in topic
    assert "says 'openg2p.audit.events'" in topic and "the manifests win" in topic
    assert any(line.startswith("LOG_LEVEL=DEBUG ") and "'INFO'" in line for line in lines)
