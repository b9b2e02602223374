"""The write side's trust boundaries, attacked on the running stack, and the table checked after.

`knative/base` as deployed (ingest requires tokens and its source policy, the writer and
maintenance take only their Knative sources' OIDC identities, the Broker and the
dead-letter sinks are closed by EventPolicies), run by the local eventing runner against
real Kafka and PostgreSQL. Each test sends an attack and then looks where a forged or
dropped event would show: the rows of `audit_events`, the topics, status codes and bodies.

The invariant: no row enters the trail unless its event passed ingest's token, policy and
contract checks, and no 202 is given for an event that will not be stored.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
import uuid
from urllib.parse import urlsplit

import pg8000.native
import pytest
import urllib3
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from attestation_support import record as attested
from eventing_support import read_topic
from ingest_support import end_offsets, request
from openg2p_audit import store
from openg2p_audit.attestation import Attestor
from openg2p_audit.contract import AuditEvent
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.kafka_binding import encode
from openg2p_audit.knative_identity import oidc_subject
from openg2p_audit.topics import ensure_topics
from pipeline_support import (
    BROKER,
    INGEST,
    MAINTENANCE,
    PING,
    WRITER,
    audit_event,
    broker_sender,
    start_pipeline,
    stored_ids,
    wait_stored,
)
from query_support import reader_role

QUERY = "audit-query"
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
HTTP = urllib3.PoolManager(retries=False)


@pytest.fixture(scope="module")
def pipeline(settings, tmp_path_factory):
    ensure_topics(settings)
    reader = reader_role(settings, f"audit_query_{uuid.uuid4().hex[:8]}")
    runner = start_pipeline(
        settings,
        tmp_path_factory.mktemp("boundaries"),
        ingest_auth=True,
        service_env={QUERY: {"DATABASE_URL": reader.database_url}},
    )
    yield runner
    runner.stop()


def emitter(runner, client: str = "openg2p-registry") -> dict[str, str]:
    """A Keycloak client-credentials token of an emitter the ConfigMap's source policy names."""
    token = runner.issuer.mint(f"service-account-{client}", (), azp=client)
    return {"Authorization": f"Bearer {token}"}


def topic_end(settings, topic: str | None = None) -> dict[int, int]:
    return end_offsets(settings.kafka_bootstrap_servers, topic or settings.kafka_events_topic)


def rows_with_source(settings, event_id: str) -> list[str]:
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        return [
            r[0]
            for r in conn.run(
                "SELECT source FROM audit_events WHERE id = :i ORDER BY source", i=event_id
            )
        ]
    finally:
        conn.close()


def maintain(runner) -> None:
    """One hourly run now, fired by the PingSource with its own token."""
    outcome = runner.fire_ping(PING)
    assert outcome.delivered and outcome.status == 200, outcome


def metric(runner, service: str, line_start: str) -> float:
    reply = request(runner.service_url(service), "/metrics", method="GET")
    for line in reply.body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def produce(settings, topic: str, records: list[tuple[bytes | None, bytes, list]]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    try:
        for key, value, headers in records:
            producer.send(topic, key=key, value=value, headers=headers).get(timeout=30)
    finally:
        producer.close()


def settle(settings, marker_events: list[dict], runner) -> None:
    """Send good events after an attack and wait for them: the pipeline has moved past it."""
    for e in marker_events:
        assert (
            request(runner.service_url(INGEST), "/", e, {**STRUCTURED, **emitter(runner)}).status
            == 202
        )
    wait_stored(settings, [e["id"] for e in marker_events])


def dlq_ids(settings, topic: str, timeout: float = 5.0) -> list[str]:
    """The event ids in a dead-letter topic: a record's `ce_id`, and for one the KafkaSource
    had wrapped (its own id is partition:P/offset:O), the id of the event its value holds."""
    found = []
    for r in read_topic(settings.bootstrap_servers, topic, 10**6, timeout=timeout):
        h = {k: (v or b"").decode() for k, v in r.headers}
        found.append(h.get("ce_id", ""))
        if h.get("ce_type") == "dev.knative.kafka.event":
            with contextlib.suppress(ValueError, AttributeError):
                found.append(json.loads(r.value).get("id", ""))
    return found


def raw_post(url: str, head: bytes, send_at_most: int, timeout: float = 10.0) -> tuple[bytes, int]:
    """Send up to `send_at_most` bytes of a request head on a raw socket, then read the answer.

    Returns (answer bytes, bytes sent). The server may answer (and close) before the client
    has sent everything: the point of the test.
    """
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sent = 0
    head = head[:send_at_most]
    try:
        for i in range(0, len(head), 16384):
            try:
                sock.sendall(head[i : i + 16384])
                sent += len(head[i : i + 16384])
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer, sent
    finally:
        sock.close()


# --------------------------------------------------------------- 1. smuggled envelopes


def inner_forgery() -> dict:
    """The event an attacker wants stored: another service's source, type and id."""
    return audit_event(
        f"forged-{uuid.uuid4()}",
        source="/openg2p/payments",
        type="org.openg2p.payments.payment.approved",
        authtype="service_account",
        authid="system:serviceaccount:openg2p:payments",
    )


@pytest.mark.parametrize(
    "media",
    [
        "application/cloudevents+json",
        "Application/CloudEvents+JSON; charset=utf-8",
        "application/cloudevents-batch+json",
        "application/cloudevents-foo+json",
    ],
)
def test_an_event_smuggled_inside_data_is_refused_and_stored_nowhere(pipeline, settings, media):
    inner = inner_forgery()
    # The data is a valid audit record and, read as an envelope, a whole other event.
    outer = audit_event(
        datacontenttype=media, data={**inner, **inner["data"], "specversion": "1.0"}
    )
    before = topic_end(settings)
    reply = request(pipeline.service_url(INGEST), "/", outer, {**STRUCTURED, **emitter(pipeline)})
    assert reply.status == 400, reply.body
    [problem] = reply.json["problems"]
    assert (problem["reason"], problem["field"]) == ("unsupported_media_type", "datacontenttype")
    # The same in binary mode, where the data's type is the Content-Type header.
    if "+json" in media.split(";")[0] and "batch" not in media and media.islower():
        headers = {
            f"ce-{k}": str(v) for k, v in outer.items() if k not in ("data", "datacontenttype")
        }
        reply = request(
            pipeline.service_url(INGEST),
            "/",
            inner,
            {**headers, "Content-Type": media, **emitter(pipeline)},
        )
        assert 400 <= reply.status < 500, reply.body
    assert topic_end(settings) == before
    settle(settings, [audit_event()], pipeline)
    assert stored_ids(settings, [inner["id"], outer["id"]]) == {}


def test_a_record_without_cloudevents_headers_is_dead_lettered_and_never_stored(pipeline, settings):
    """Someone who can write to the events topic (a legacy producer, a leaked credential)
    writes a whole structured event as a record's value: the KafkaSource delivers it wrapped
    as dev.knative.kafka.event; it is refused for good, and the redrive does not take it."""
    inner = inner_forgery()
    value = json.dumps({**inner, "specversion": "1.0"}).encode()
    produce(
        settings,
        settings.kafka_events_topic,
        [(b"k", value, [("content-type", b"application/json")])],
    )
    # A structured-mode record (no ce_ headers, a CloudEvents content type) too.
    structured = inner_forgery()
    produce(
        settings,
        settings.kafka_events_topic,
        [
            (
                b"k",
                json.dumps(structured).encode(),
                [("content-type", b"application/cloudevents+json")],
            )
        ],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = dlq_ids(settings, settings.kafka_dlq_topic, timeout=2)
        if inner["id"] in ids and structured["id"] in ids:
            break
    else:
        raise AssertionError("the refused records did not reach the dead-letter topic")
    maintain(pipeline)
    settle(settings, [audit_event()], pipeline)
    assert stored_ids(settings, [inner["id"], structured["id"]]) == {}
    assert (
        metric(
            pipeline, MAINTENANCE, 'audit_maintenance_dlq_permanent_total{reason="not_attested"}'
        )
        >= 1
    )


def test_a_genuine_record_altered_on_the_topic_is_never_stored(pipeline, settings):
    """An attestation copied from a genuine record does not cover another event."""
    genuine = AuditEvent.model_validate(audit_event())
    rec = attested(genuine)
    forged_headers = [(k, b"/openg2p/payments" if k == "ce_source" else v) for k, v in rec.headers]
    forged_id = [(k, b"forged-" + v if k == "ce_id" else v) for k, v in rec.headers]
    produce(
        settings,
        settings.kafka_events_topic,
        [(rec.key, rec.value, forged_headers), (rec.key, rec.value, forged_id)],
    )
    settle(settings, [audit_event()], pipeline)
    assert rows_with_source(settings, genuine.id) == []
    assert stored_ids(settings, [f"forged-{genuine.id}"]) == {}


# --------------------------------------------------------------- 2. who may deliver, who may ping


def test_the_writer_takes_deliveries_only_from_its_kafkasource(pipeline, settings):
    issuer = pipeline.issuer
    event = AuditEvent.model_validate(audit_event())
    rec = attested(event)  # even an event ingest really attested
    headers = {"Content-Type": "application/json"}
    headers.update({f"ce-{k[3:]}": v.decode() for k, v in rec.headers if k.startswith("ce_")})
    for sub, status in (
        ("system:serviceaccount:evil-ns:attacker", 403),
        (oidc_subject("default", "Trigger", "audit-to-ingest"), 403),
        (oidc_subject("default", "PingSource", "audit-maintenance-hourly"), 403),
    ):
        token = issuer.mint(sub, (), aud="openg2p-audit-writer")
        reply = request(
            pipeline.service_url(WRITER),
            "/",
            rec.value,
            {**headers, "Authorization": f"Bearer {token}"},
        )
        assert reply.status == status, (sub, reply.body)
    reply = request(pipeline.service_url(WRITER), "/", rec.value, headers)
    assert reply.status == 401
    assert stored_ids(settings, [event.id]) == {}


def test_maintenance_runs_only_for_its_pingsource(pipeline):
    url = pipeline.service_url(MAINTENANCE)
    ping = {
        "ce-specversion": "1.0",
        "ce-id": "p1",
        "ce-source": "/evil",
        "ce-type": "dev.knative.sources.ping",
        "Content-Type": "application/json",
    }
    assert request(url, "/", b"{}", ping).status == 401
    token = pipeline.issuer.mint(
        "system:serviceaccount:evil-ns:attacker", (), aud="openg2p-audit-maintenance"
    )
    reply = request(url, "/", b"{}", {**ping, "Authorization": f"Bearer {token}"})
    assert reply.status == 403
    runs = metric(pipeline, MAINTENANCE, 'audit_maintenance_runs_total{status="ok"}')
    maintain(pipeline)  # the PingSource's own token
    assert metric(pipeline, MAINTENANCE, 'audit_maintenance_runs_total{status="ok"}') == runs + 1


# --------------------------------------------------------------- 3. dead letters


def test_the_dead_letter_sinks_take_only_their_own_dispatchers(pipeline, settings):
    forged = inner_forgery()
    body = json.dumps(forged["data"]).encode()
    headers = {f"ce-{k}": str(v) for k, v in forged.items() if k != "data"}
    headers["Content-Type"] = "application/json"
    for sink, topic in (
        ("audit-dlq", settings.kafka_dlq_topic),
        ("audit-broker-dlq", settings.kafka_broker_dlq_topic),
    ):
        before = topic_end(settings, topic)
        aud = pipeline.ingress_audience("KafkaSink", sink)
        reply = HTTP.request("POST", pipeline.sink_url(sink), body=body, headers=headers)
        assert reply.status == 401
        for sub in (
            "system:serviceaccount:default:openg2p-registry",
            oidc_subject(
                "default",
                "Trigger" if sink == "audit-dlq" else "KafkaSource",
                "audit-to-ingest" if sink == "audit-dlq" else "audit-events-to-writer",
            ),
        ):
            token = pipeline.issuer.mint(sub, (), aud=aud)
            reply = HTTP.request(
                "POST",
                pipeline.sink_url(sink),
                body=body,
                headers={**headers, "Authorization": f"Bearer {token}"},
            )
            assert reply.status == 403, (sink, sub)
        assert topic_end(settings, topic) == before


def test_a_forged_dead_letter_in_the_topic_is_never_stored(pipeline, settings):
    """Should a forged dead letter get into the topic anyway (an open sink, a Kafka
    credential), without an error code, as a transient failure would be: the redrive does
    not store it. A genuine one beside it (ingest's, dead-lettered for a 401) is stored."""
    forged = AuditEvent.model_validate(inner_forgery())
    rec = encode(forged, Attestor(b"mallory-" * 5))
    unattested = [(k, v) for k, v in rec.headers if k != "ce_auditattestation"]
    genuine = AuditEvent.model_validate(audit_event())
    real = attested(genuine)
    produce(
        settings,
        settings.kafka_dlq_topic,
        [
            (rec.key, rec.value, rec.headers),
            (rec.key, rec.value, unattested),
            (
                real.key,
                real.value,
                [
                    *real.headers,
                    ("ce_knativeerrorcode", b"401"),
                    ("ce_knativeerrordest", b"http://audit-writer"),
                ],
            ),
        ],
    )
    maintain(pipeline)
    assert stored_ids(settings, [forged.id]) == {}
    assert stored_ids(settings, [genuine.id]) == {genuine.id: 1}


def test_a_broker_event_ingest_refused_is_counted_and_never_stored(pipeline, settings):
    bad = audit_event(data={"actor": {"id": "officer-1"}, "action": "view", "outcome": "maybe"})
    headers = {f"ce-{k}": str(v) for k, v in bad.items() if k != "data"}
    headers.update({"Content-Type": "application/json", **broker_sender(pipeline)})
    reply = HTTP.request(
        "POST", pipeline.broker_url(BROKER), body=json.dumps(bad["data"]), headers=headers
    )
    assert reply.status == 202  # the Broker took it; ingest refuses it (400)
    deadline = time.monotonic() + 60
    while bad["id"] not in dlq_ids(settings, settings.kafka_broker_dlq_topic, timeout=2):
        assert time.monotonic() < deadline, "the Trigger did not dead-letter the refused event"
    counted = 'audit_maintenance_dlq_permanent_total{reason="broker_dead_letter"}'
    before = metric(pipeline, MAINTENANCE, counted)
    maintain(pipeline)
    assert metric(pipeline, MAINTENANCE, counted) >= before + 1
    assert stored_ids(settings, [bad["id"]]) == {}


# --------------------------------------------------------------- 4. the Broker


def test_the_broker_takes_each_sender_under_its_own_sources_only(pipeline, settings):
    def send(event: dict, auth: dict[str, str]) -> int:
        headers = {f"ce-{k}": str(v) for k, v in event.items() if k != "data"}
        return HTTP.request(
            "POST",
            pipeline.broker_url(BROKER),
            body=json.dumps(event["data"]),
            headers={**headers, "Content-Type": "application/json", **auth},
        ).status

    payments = audit_event(source="/openg2p/payments", type="org.openg2p.payments.approved")
    laundered = [
        payments,
        audit_event(source="/openg2p/payments/refunds", type="org.openg2p.payments.reversed"),
    ]
    assert send(payments, {}) == 401  # no token: nobody
    for event in laundered:  # the registry may not send as payments
        assert send(event, broker_sender(pipeline, "openg2p-registry")) == 403
    # payments may send under its sources only with its types
    odd = audit_event(source="/openg2p/payments", type="org.openg2p.registry.beneficiary.viewed")
    assert send(odd, broker_sender(pipeline, "openg2p-payments")) == 403
    # a service account of the namespace that no EventPolicy names
    assert send(audit_event(), broker_sender(pipeline, "some-other-service")) == 403
    allowed = audit_event(source="/openg2p/registry/households")
    assert send(allowed, broker_sender(pipeline, "openg2p-registry")) == 202
    assert wait_stored(settings, [allowed["id"]]) == {allowed["id"]: 1}
    assert stored_ids(settings, [e["id"] for e in [*laundered, odd]]) == {}


# --------------------------------------------------------------- 5. source + id


def test_the_same_id_from_another_source_is_stored_as_its_own_event(pipeline, settings):
    shared = f"shared-{uuid.uuid4()}"
    first = audit_event(shared, source="/openg2p/registry")
    second = audit_event(shared, source="/openg2p/auth", time=first["time"])
    url = pipeline.service_url(INGEST)
    assert request(url, "/", first, {**STRUCTURED, **emitter(pipeline)}).status == 202
    assert (
        request(url, "/", second, {**STRUCTURED, **emitter(pipeline, "openg2p-auth")}).status == 202
    )
    deadline = time.monotonic() + 60
    while rows_with_source(settings, shared) != ["/openg2p/auth", "/openg2p/registry"]:
        assert time.monotonic() < deadline, rows_with_source(settings, shared)
        time.sleep(0.25)
    # each source's re-send is still a duplicate of its own row
    assert (
        request(url, "/", second, {**STRUCTURED, **emitter(pipeline, "openg2p-auth")}).status == 202
    )
    settle(settings, [audit_event()], pipeline)
    assert rows_with_source(settings, shared) == ["/openg2p/auth", "/openg2p/registry"]


# --------------------------------------------------------------- 6. the table's limits


def test_every_index_limit_is_checked_at_ingest_and_every_202_is_a_row(pipeline, settings):
    from test_index_limits import noise

    url = pipeline.service_url(INGEST)
    at_limit = audit_event(data={**audit_event()["data"], "actor": {"id": noise(2684)}})
    # The longest id beside this source: the key (id, source, occurred_at) also keys the
    # conflict log, whose entries hold a hash more.
    sizes = {**dict.fromkeys(store.EVENT_FIELDS, 10), "source": len("/openg2p/registry")}
    longest = next(n for n in range(2700, 0, -1) if not store.oversized_indexes({**sizes, "id": n}))
    long_id = noise(longest + 1)
    at_key_limit = audit_event(long_id[:longest])
    for event in (at_limit, at_key_limit):
        reply = request(url, "/", event, {**STRUCTURED, **emitter(pipeline)})
        assert reply.status == 202, reply.body
    before = topic_end(settings)
    over = [
        (
            audit_event(data={**audit_event()["data"], "actor": {"id": noise(2685)}}),
            "data.actor.id",
        ),
        (
            audit_event(
                data={**audit_event()["data"], "resource": {"type": noise(2000), "id": noise(700)}}
            ),
            "data.resource.type",
        ),
        (audit_event(type="org.openg2p.registry." + noise(2700)), "type"),
        (audit_event(long_id), "id"),
    ]
    for event, field in over:
        reply = request(url, "/", event, {**STRUCTURED, **emitter(pipeline)})
        assert reply.status == 400, (field, reply.body)
        assert [p["field"] for p in reply.json["problems"]] == [field]
        assert reply.json["problems"][0]["reason"] == "too_large"
    assert topic_end(settings) == before
    ids = [at_limit["id"], at_key_limit["id"]]
    assert wait_stored(settings, ids) == dict.fromkeys(ids, 1)


# --------------------------------------------------------------- 7. headers


def test_oversized_headers_are_a_431_before_any_token_is_read(pipeline):
    url = pipeline.service_url(INGEST)
    for size in (600 * 1024, 8 * 1024 * 1024):
        head = (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"ce-specversion: 1.0\r\nce-id: big\r\nce-source: /openg2p/registry\r\n"
            b"ce-type: t\r\nce-big: " + b"x" * size + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        # The answer comes before the client could send 200 KB of it: nothing more is read.
        answer, sent = raw_post(url, head, send_at_most=200 * 1024)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 431"), answer[:200]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["problems"][0]["field"] == "headers"
        assert sent <= 200 * 1024
    # Every function has the bound.
    for service in (WRITER, MAINTENANCE, QUERY):
        head = b"POST / HTTP/1.1\r\nHost: x\r\nx-pad: " + b"y" * 100_000 + b"\r\n\r\n"
        answer, _ = raw_post(pipeline.service_url(service), head, send_at_most=len(head))
        assert answer.startswith(b"HTTP/1.1 431"), (service, answer[:100])


def test_a_binary_mode_event_is_sized_with_its_headers(pipeline, settings):
    url = pipeline.service_url(INGEST)
    before = topic_end(settings)
    event = audit_event()
    headers = {f"ce-{k}": str(v) for k, v in event.items() if k != "data"}
    # Attributes a dead letter could not carry (Knative's Kafka receiver reads 8 KiB of
    # headers): refused before the 202, naming the limit.
    big = {
        **headers,
        "ce-note": "n" * 5000,
        "Content-Type": "application/json",
        **emitter(pipeline),
    }
    reply = request(url, "/", json.dumps(event["data"]), big)
    assert reply.status == 413, reply.body
    assert "binary-mode headers" in reply.json["problems"][0]["message"]
    # A body just under the 256 KiB limit, and 3 KiB more in headers: over, as a whole.
    data = {**event["data"], "context": {"pad": "p" * 259_000}}
    wide = {
        **headers,
        **{f"ce-x{i}": "v" * 900 for i in range(3)},
        "Content-Type": "application/json",
        **emitter(pipeline),
    }
    wide["ce-id"] = f"wide-{uuid.uuid4()}"
    reply = request(url, "/", json.dumps(data), wide)
    assert reply.status == 413, reply.body
    assert topic_end(settings) == before


@pytest.fixture(scope="module")
def small_topic_ingest(settings, tmp_path_factory):
    """Ingest producing to a topic whose brokers take records up to 100 kB only (a Kafka
    set up with a smaller max.message.bytes than INGEST_MAX_EVENT_BYTES allows)."""
    topic = f"{settings.kafka_events_topic}.small"
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "100000"})])
    finally:
        admin.close()
    s = settings.model_copy(update={"kafka_events_topic": topic})
    fn = LocalFunction("ingest", "ingest", s, tmp_path_factory.mktemp("small-topic"))
    with fn:
        yield fn, s


def test_a_record_too_large_for_kafka_is_a_413_and_the_producer_stays(small_topic_ingest):
    fn, _ = small_topic_ingest
    small = audit_event()
    assert request(fn.url, "/", small, STRUCTURED).status == 202
    for _ in range(3):
        large = audit_event(data={**audit_event()["data"], "context": {"pad": "p" * 150_000}})
        reply = request(fn.url, "/", large, STRUCTURED)
        assert reply.status == 413, reply.body
        assert reply.json["problems"][0]["reason"] == "too_large"
    after = audit_event()
    assert request(fn.url, "/", after, STRUCTURED).status == 202
    log = fn.log_path.read_text()
    assert "replacing the Kafka producer" not in log
    assert log.count("Kafka producer ready") == 1


# --------------------------------------------------------------- the query service's own events


def test_the_query_services_own_read_events_are_stored(pipeline, settings):
    """Attested with the query service's own key, its audit of a read is stored."""
    token = pipeline.issuer.mint(f"investigator-{uuid.uuid4().hex[:6]}", ("audit.read",))
    target = f"looked-up-{uuid.uuid4()}"
    reply = request(
        pipeline.service_url(QUERY),
        f"/v1/audit/events/{target}",
        method="GET",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert reply.status == 404, reply.body
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = conn.run(
                "SELECT type, source FROM audit_events WHERE resource_id = :r", r=target
            )
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    finally:
        conn.close()
    assert found == [["org.openg2p.audit.query.performed", "/openg2p/audit/query"]]


def test_ingest_refuses_what_only_ingest_or_knative_may_set(pipeline, settings):
    before = topic_end(settings)
    for name in ("auditattestation", "knativeerrorcode", "authid"):
        event = audit_event(**{name: "v1:0000000000000000:" + "A" * 43})
        reply = request(
            pipeline.service_url(INGEST), "/", event, {**STRUCTURED, **emitter(pipeline)}
        )
        assert reply.status == 400, (name, reply.body)
        assert reply.json["problems"][0]["field"] == name
    assert topic_end(settings) == before


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
