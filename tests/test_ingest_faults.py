"""Ingest when Kafka goes away, when it is overloaded, and when it is told to stop.

The broker-fault cases stop and restart a broker of their own so the rest of
the suite keeps the session broker.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest

from ingest_support import read_topic
from ingest_support import request as _request
from openg2p_audit.devservices import LocalFunction, LocalKafka
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.topics import ensure_topics

pytestmark = pytest.mark.faults

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
# The promise: a refusal arrives within 2 s. The function's own bound (the ack
# timeout, 1.5 s by default) is tighter; the rest is slack for a busy machine.
BOUND_SECONDS = 2.0


# Tokens on, as deployed: one caller whose policy entry allows the events posted here.
ISSUER = LocalIssuer()
POLICY = 'callers:\n  fault-tests:\n    sources: ["/openg2p/registry"]\n'
TOKEN: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def issuer():
    ISSUER.serve()
    TOKEN["Authorization"] = f"Bearer {ISSUER.mint('fault-tests', ())}"
    yield ISSUER
    TOKEN.clear()
    ISSUER.stop()


def with_tokens(settings):
    return settings.model_copy(
        update={
            "ingest_auth": "required", "ingest_source_policy": POLICY,
            "auth_issuer": ISSUER.url, "auth_jwks_url": ISSUER.jwks_url,
        }
    )  # fmt: skip


def request(url, path, body=None, headers=None, method="POST", **kw):
    """A POST carries the caller's token."""
    if method == "POST":
        headers = {**TOKEN, **(headers or {})}
    return _request(url, path, body, headers, method=method, **kw)


def event(**over):
    base = {
        "specversion": "1.0",
        "id": f"evt-{uuid.uuid4()}",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "time": datetime.now(UTC).isoformat(),
        "data": {"actor": {"id": "officer-7"}, "action": "view", "outcome": "success"},
    }
    base.update(over)
    return base


def timed(url, path, body, headers):
    started = time.monotonic()
    reply = request(url, path, body, headers, method="POST" if body is not None else "GET")
    return reply, time.monotonic() - started


def until_accepted(url, timeout=90.0):
    """Post fresh events until one is accepted (the broker is back); its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = event()
        if request(url, "/", e, STRUCTURED).status == 202:
            return e["id"]
        time.sleep(0.5)
    raise AssertionError("ingest did not accept events again after the broker came back")


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory):
    broker = LocalKafka(tmp_path_factory.mktemp("faults-kafka")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def fault_settings(settings, own_kafka):
    s = with_tokens(settings).model_copy(update={"kafka_bootstrap_servers": own_kafka.bootstrap})
    ensure_topics(s)
    return s


@pytest.fixture
def broker_back(own_kafka):
    """Whatever a test does to the broker, it is running again afterwards."""
    yield own_kafka
    if not own_kafka.running:
        own_kafka.start()


def test_broker_stopped_gets_503_with_retry_after_within_the_bound(
    fault_settings, broker_back, tmp_path
):
    own_kafka = broker_back
    with LocalFunction("ingest", "ingest", fault_settings, tmp_path) as fn:
        before = event()
        assert request(fn.url, "/", before, STRUCTURED).status == 202

        own_kafka.stop()
        for body, headers in ((event(), STRUCTURED), ([event(), event(), event()], BATCH)):
            reply, took = timed(fn.url, "/", body, headers)
            assert reply.status == 503, reply.body
            assert took < BOUND_SECONDS, f"503 took {took:.2f}s"
            assert int(reply.headers["retry-after"]) >= 1
            assert reply.json["cause"] == "broker_unavailable"
            assert reply.json["message"]

        ready, took = timed(fn.url, "/readyz", None, {})
        assert ready.status == 503 and ready.json["ready"] is False
        assert took < BOUND_SECONDS
        assert request(fn.url, "/healthz", method="GET").status == 200
        metrics = request(fn.url, "/metrics", method="GET").body.decode()
        assert 'audit_ingest_unavailable_responses_total{cause="broker_unavailable"} 2.0' in metrics

        own_kafka.start()
        after = until_accepted(fn.url)
        assert request(fn.url, "/readyz", method="GET").status == 200

    ids = {dict(r.headers)["ce_id"].decode() for r in read_topic(
        own_kafka.bootstrap, fault_settings.kafka_events_topic)}  # fmt: skip
    assert {before["id"], after} <= ids


def test_function_started_while_the_broker_is_down(fault_settings, broker_back, tmp_path):
    own_kafka = broker_back
    own_kafka.stop()
    with LocalFunction("ingest", "ingest", fault_settings, tmp_path) as fn:
        for _ in range(3):
            reply, took = timed(fn.url, "/", event(), STRUCTURED)
            assert reply.status == 503 and took < BOUND_SECONDS
            assert reply.headers["retry-after"]
        assert request(fn.url, "/readyz", method="GET").status == 503
        own_kafka.start()
        until_accepted(fn.url)


def test_full_buffer_is_refused_at_once(fault_settings, broker_back, tmp_path):
    own_kafka = broker_back
    limited = fault_settings.model_copy(update={"ingest_max_pending_events": 5})
    with LocalFunction("ingest", "ingest", limited, tmp_path) as fn:
        assert request(fn.url, "/", event(), STRUCTURED).status == 202
        own_kafka.stop()
        # These four wait in the producer for a broker that is gone ...
        first = request(fn.url, "/", [event() for _ in range(4)], BATCH)
        assert first.status == 503 and first.json["cause"] == "broker_unavailable"
        # ... so four more would overflow the bound: refused without waiting.
        reply, took = timed(fn.url, "/", [event() for _ in range(4)], BATCH)
        assert reply.status == 503 and reply.json["cause"] == "overloaded"
        assert took < 0.5 * BOUND_SECONDS
        assert reply.headers["retry-after"]
        own_kafka.start()
        until_accepted(fn.url)


class Load:
    """Client threads posting fresh events until the server stops answering."""

    def __init__(self, url: str, threads: int, deadline: float):
        self.url, self.deadline = url, deadline
        self.accepted: list[str] = []
        self.refused = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, i: int) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        n = 0
        while time.monotonic() < self.deadline:
            n += 1
            events = [event() for _ in range(1 + (n + i) % 3)]
            body, headers = (events[0], STRUCTURED) if len(events) == 1 else (events, BATCH)
            try:
                reply = request_on(conn, body, headers)
            except OSError:
                # The server closed the connection (draining) or stopped listening.
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    conn.connect()
                except OSError:
                    return
                continue
            with self.lock:
                if reply == 202:
                    self.accepted.extend(e["id"] for e in events)
                else:
                    self.refused += 1
        conn.close()


def request_on(conn: http.client.HTTPConnection, body, headers) -> int:
    import json

    conn.request("POST", "/", body=json.dumps(body), headers={**TOKEN, **headers})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_sigterm_during_load_loses_nothing_that_was_answered_202(topics, tmp_path):
    fn = LocalFunction("ingest", "ingest", with_tokens(topics), tmp_path, workers=2).start()
    try:
        load = Load(fn.url, threads=12, deadline=time.monotonic() + 60)
        for t in load.threads:
            t.start()
        while len(load.accepted) < 300 and time.monotonic() < load.deadline:
            time.sleep(0.05)
        fn.terminate()
        assert fn.wait(timeout=45) == 0, fn.log_text()[-3000:]
        for t in load.threads:
            t.join(timeout=70)
    finally:
        fn.stop()

    assert len(load.accepted) >= 300
    on_topic = {
        dict(r.headers)["ce_id"].decode()
        for r in read_topic(topics.kafka_bootstrap_servers, topics.kafka_events_topic)
    }
    missing = set(load.accepted) - on_topic
    assert not missing, f"{len(missing)} of {len(load.accepted)} ids answered 202 are not stored"
    # Each worker that opened a producer (on its first request) flushed and closed it.
    log_text = fn.log_text()
    opened = log_text.count('"msg": "Kafka producer ready"')
    assert opened >= 1
    assert log_text.count('"msg": "Kafka producer closed"') == opened
