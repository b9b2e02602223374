"""The writer function over real HTTP, fed as a KafkaSource feeds it, into real PostgreSQL.

As deployed, the module's writer takes only deliveries with a token for its audience: every
POST here carries one, as the KafkaSource's would (test_writer_auth tests the refusals).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from attestation_support import reattest
from attestation_support import record as encode
from function_server import request as _request
from kafkasource import binary_delivery, wrapped_delivery
from openg2p_audit import store
from openg2p_audit.contract import AuditEvent
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.knative_identity import oidc_subject

# The cluster's service-account issuer, as far as this module's writer knows.
ISSUER = LocalIssuer(audience="openg2p-audit-writer")
SOURCE_SA = oidc_subject("default", "KafkaSource", "audit-events-to-writer")

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_event(**overrides) -> AuditEvent:
    raw = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "openg2p/registry",
        "type": "org.openg2p.user.login",
        "time": "2026-04-01T12:00:00Z",
        "data": {
            "actor": {"id": "user-1", "type": "user"},
            "action": "login",
            "outcome": "success",
        },
    }
    data = overrides.pop("data", None)
    raw.update(overrides)
    if data is not None:
        raw["data"] = data
    return AuditEvent.model_validate(raw)


def request(url, method, path, body=None, headers=None, **kw):
    """A POST carries the KafkaSource's delivery token; probes go without one."""
    if method == "POST" and ISSUER.url is not None:
        headers = {**(headers or {}), "Authorization": f"Bearer {ISSUER.mint(SOURCE_SA, ())}"}
    return _request(url, method, path, body, headers, **kw)


def deliver(server: LocalFunction, event: AuditEvent):
    headers, body = binary_delivery(encode(event))
    return request(server.url, "POST", "/", body, headers)


def rows(pg, *ids: str) -> list[dict]:
    cols = [*store.COLUMNS, "ingested_at", "tableoid::regclass::text AS part"]
    result = pg.run(
        f"SELECT {', '.join(cols)} FROM audit_events WHERE id = ANY(:ids) ORDER BY id",
        ids=list(ids),
    )
    names = [*store.COLUMNS, "ingested_at", "partition"]
    return [dict(zip(names, r, strict=True)) for r in result]


@pytest.fixture(scope="module")
def writer(settings, tmp_path_factory):
    ISSUER.serve()
    auth = settings.model_copy(
        update={
            "writer_auth": "required",
            "auth_issuer": ISSUER.url,
            "auth_jwks_url": ISSUER.jwks_url,
            "writer_auth_issuer": ISSUER.url,
            "writer_auth_subjects": SOURCE_SA,
        }
    )
    server = LocalFunction("writer", "write", auth, tmp_path_factory.mktemp("writer"))
    try:
        with server:
            yield server
    finally:
        ISSUER.stop()


def test_binary_deliveries_become_rows_with_every_column(writer, pg):
    plain = make_event(subject="user/user-1")
    rich = make_event(
        type="org.openg2p.payment.created",
        time="2026-04-30T23:59:59.123456+02:00",
        subject="beneficiary/42",
        traceparent=TRACEPARENT,
        data={
            "actor": {"id": "officer-7", "type": "service", "name": "Disbursal", "roles": []},
            "action": "create",
            "outcome": "failure",
            "reason": "insufficient funds",
            "resource": {"type": "payment", "id": "pay-9", "amount": 125.5, "currency": "PHP"},
            "changes": [{"field": "status", "from": "draft", "to": "failed"}],
            "context": {"bank": "BDO"},
            "program_id": "prog-3",
            "note": "",
            "tags": [],
        },
    )
    empty_extras = make_event(
        data={
            "actor": {"id": "user-2", "type": "anonymous", "name": "", "roles": []},
            "action": "view",
            "outcome": "denied",
            "resource": {"type": "beneficiary", "id": "b-1"},
            "changes": [],
            "context": {},
            "comment": "",
        }
    )
    for event in (plain, rich, empty_extras):
        status, body, _ = deliver(writer, event)
        assert (status, body) == (201, {"status": "stored", "id": event.id})

    got = {r["id"]: r for r in rows(pg, plain.id, rich.id, empty_extras.id)}
    now = datetime.now(UTC)

    p = got[plain.id]
    assert abs(now - p.pop("ingested_at")) < timedelta(minutes=5)
    assert p == {
        "id": plain.id,
        "occurred_at": datetime(2026, 4, 1, 12, tzinfo=UTC),
        "source": "openg2p/registry",
        "type": "org.openg2p.user.login",
        "subject": "user/user-1",
        "actor_type": "user",
        "actor_id": "user-1",
        "resource_type": None,
        "resource_id": None,
        "action": "login",
        "outcome": "success",
        "reason": None,
        "trace_id": None,
        "details": None,
        "partition": "audit_events_2026_04",
    }

    r = got[rich.id]
    r.pop("ingested_at")
    assert r == {
        "id": rich.id,
        # 23:59 at +02:00 on 30 April is still April in UTC
        "occurred_at": datetime(2026, 4, 30, 21, 59, 59, 123456, tzinfo=UTC),
        "source": "openg2p/registry",
        "type": "org.openg2p.payment.created",
        "subject": "beneficiary/42",
        "actor_type": "service",
        "actor_id": "officer-7",
        "resource_type": "payment",
        "resource_id": "pay-9",
        "action": "create",
        "outcome": "failure",
        "reason": "insufficient funds",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "details": {
            "actor": {"name": "Disbursal"},
            "resource": {"amount": 125.5, "currency": "PHP"},
            "changes": [{"field": "status", "from": "draft", "to": "failed"}],
            "context": {"bank": "BDO"},
            "program_id": "prog-3",
        },
        "partition": "audit_events_2026_04",
    }

    e = got[empty_extras.id]
    assert (e["actor_type"], e["resource_type"], e["resource_id"], e["outcome"]) == (
        "anonymous",
        "beneficiary",
        "b-1",
        "denied",
    )
    assert e["details"] is None  # empty strings, lists and objects are not extras


def test_the_event_trace_is_stored_not_the_dispatchers(writer, pg):
    event = make_event(traceparent=TRACEPARENT)
    headers, body = binary_delivery(encode(event))
    assert headers["traceparent"] != TRACEPARENT  # the dispatcher's own span
    assert request(writer.url, "POST", "/", body, headers)[0] == 201
    assert rows(pg, event.id)[0]["trace_id"] == TRACEPARENT.split("-")[1]


def test_sequential_duplicate_delivery_leaves_one_row(writer, pg):
    event = make_event()
    assert deliver(writer, event)[:2] == (201, {"status": "stored", "id": event.id})
    assert deliver(writer, event)[:2] == (200, {"status": "duplicate", "id": event.id})
    assert deliver(writer, event)[0] == 200
    assert len(rows(pg, event.id)) == 1


def test_concurrent_duplicate_delivery_leaves_one_row(writer, pg):
    event = make_event()
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(lambda _: deliver(writer, event)[0], range(24)))
    assert sorted(statuses) == [200] * 23 + [201]
    assert len(rows(pg, event.id)) == 1


def test_same_id_at_another_time_is_another_row(writer, pg):
    first = make_event()
    later = make_event(id=first.id, time="2026-04-02T12:00:00Z")
    assert deliver(writer, first)[0] == 201
    assert deliver(writer, later)[0] == 201
    assert len(rows(pg, first.id)) == 2


def test_concurrent_distinct_deliveries_are_all_stored(writer, pg):
    events = [make_event(data={"actor": {"id": f"u{i}"}, "action": "a", "outcome": "success"})
              for i in range(64)]  # fmt: skip
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda e: deliver(writer, e)[:2], events))
    assert answers == [(201, {"status": "stored", "id": e.id}) for e in events]
    assert len(rows(pg, *(e.id for e in events))) == 64


def test_event_for_a_month_without_partition_is_stored(writer, pg):
    month = store.month_of(datetime(2019, 2, 1, tzinfo=UTC))
    assert month not in store.list_partitions(pg)
    event = make_event(time="2019-02-28T23:30:00-01:00")  # March 1st 00:30 UTC
    assert deliver(writer, event)[0] == 201
    stored = rows(pg, event.id)
    assert stored[0]["partition"] == "audit_events_2019_03"
    assert store.month_of(datetime(2019, 3, 1, tzinfo=UTC)) in store.list_partitions(pg)


def test_a_record_wrapped_by_the_kafkasource_is_refused_for_good(writer, pg):
    """A record without ce_ headers was not produced by ingest: whatever its value holds (here
    a whole structured event), it is refused with a status the KafkaSource does not retry,
    so it goes to the dead-letter topic, and nothing is stored."""
    inner = make_event(source="legacy/odoo", subject="beneficiary/7")
    structured = {**inner.attributes(), "data": inner.data_json()}
    headers, body = wrapped_delivery(json.dumps(structured).encode(), offset=17)
    status, answer, _ = request(writer.url, "POST", "/", body, headers)
    assert (status, answer["error"]) == (422, "not_attested")
    assert "dev.knative.kafka.event" in answer["message"]
    assert rows(pg, inner.id) == []
    assert pg.run("SELECT count(*) FROM audit_events WHERE id LIKE 'partition:%'") == [[0]]


def test_a_structured_mode_delivery_is_refused(writer, pg):
    """The KafkaSource delivers binary mode; an envelope in a body is never read as an event."""
    event = make_event()
    body = json.dumps({**event.attributes(), "data": event.data_json()}).encode()
    for media in ("application/cloudevents+json", "Application/CloudEvents+JSON; charset=x"):
        status, answer, _ = request(writer.url, "POST", "/", body, {"Content-Type": media})
        assert (status, answer["error"]) == (400, "not_a_cloudevent")
    assert rows(pg, event.id) == []


def _rejected(writer, pg, headers, body, status, error):
    before = pg.run("SELECT count(*) FROM audit_events")[0][0]
    got, answer, resp_headers = request(writer.url, "POST", "/", body, headers)
    assert got == status, answer
    assert resp_headers["Content-Type"] == "application/json"
    assert answer["error"] == error and answer["message"]
    assert pg.run("SELECT count(*) FROM audit_events")[0][0] == before
    return answer


def test_malformed_deliveries_get_4xx_with_a_reason(writer, pg):
    good_headers, good_body = binary_delivery(encode(make_event()))

    # not a CloudEvent at all
    _rejected(
        writer, pg, {"Content-Type": "application/json"}, b'{"a": 1}', 400, "not_a_cloudevent"
    )
    # Each bad delivery below is attested as it is (reattest), so that it reaches the checks
    # behind the attestation: ingest never attests such events, the writer checks anyway.
    # data that is not JSON
    _rejected(writer, pg, reattest(good_headers, b"{not json"), b"{not json", 400, "data_not_json")
    # a contract violation names the field
    bad = json.dumps({**json.loads(good_body), "outcome": "maybe"}).encode()
    answer = _rejected(writer, pg, reattest(good_headers, bad), bad, 422, "invalid_event")
    assert answer["errors"][0]["field"] == "data.outcome"
    # no time: a redelivery could not be told from a new event
    no_time = reattest({k: v for k, v in good_headers.items() if k != "ce-time"}, good_body)
    _rejected(writer, pg, no_time, good_body, 422, "missing_time")
    # a NUL character PostgreSQL cannot store
    nul = json.dumps({**json.loads(good_body), "context": {"note": "a\u0000b"}}).encode()
    answer = _rejected(writer, pg, reattest(good_headers, nul), nul, 422, "unstorable")
    assert "NUL" in answer["message"]
    # a wrapped record whose value is not a CloudEvent
    headers, body = wrapped_delivery(b'{"hello": "world"}')
    _rejected(writer, pg, headers, body, 422, "not_attested")
    # an id too long to index
    long_headers = reattest({**good_headers, "ce-id": "x" * 5000}, good_body)
    _rejected(writer, pg, long_headers, good_body, 422, "unstorable")
    # anything changed after ingest attested it
    _rejected(writer, pg, {**good_headers, "ce-source": "/openg2p/payments"}, good_body, 422,
              "not_attested")  # fmt: skip


def test_health_readiness_and_metrics(writer):
    assert request(writer.url, "GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert request(writer.url, "GET", "/readyz")[:2] == (200, {"status": "ready"})
    deliver(writer, make_event())
    request(writer.url, "POST", "/", b"x", {"Content-Type": "text/plain"})
    status, text, headers = request(writer.url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in (
        "audit_writer_rows_inserted_total",
        "audit_writer_duplicates_total",
        'audit_writer_rejections_total{reason="not_a_cloudevent"}',
        "audit_writer_batch_size_bucket",
        "audit_writer_commit_seconds_bucket",
    ):
        assert name in text
    inserted = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("audit_writer_rows_inserted_total ")
    )
    assert inserted >= 1


def test_rows_of_one_batch_share_one_transaction(settings, pg):
    """Group commit, in-process: rows queued together are one INSERT in one transaction."""
    from openg2p_audit.writer import GroupCommitter, _Pending

    committer = GroupCommitter(settings)
    events = [make_event() for _ in range(10)]
    items = [_Pending(store.event_to_row(e)) for e in events]
    for item in items:
        committer._queue.put(item)  # queued before the committer starts: one batch
    committer._ensure_thread()
    for item in items:
        assert item.wait(30)
    assert [i.status for i in items] == ["stored"] * 10
    # now() is the transaction's start time: one value means one transaction
    stamps = pg.run(
        "SELECT count(DISTINCT ingested_at) FROM audit_events WHERE id = ANY(:ids)",
        ids=[e.id for e in events],
    )
    assert stamps == [[1]]


def test_one_refused_row_does_not_fail_its_batch(settings, pg):
    from openg2p_audit.writer import GroupCommitter, _Pending

    good = [make_event() for _ in range(3)]
    rows_ = [store.event_to_row(e) for e in good]
    # A row PostgreSQL refuses even though it passed our checks (constructed directly).
    poison = dataclasses.replace(rows_[0], id="poison", details="{bad json")
    committer = GroupCommitter(settings)
    items = [_Pending(r) for r in [rows_[0], poison, rows_[1], rows_[2]]]
    for item in items:
        committer._queue.put(item)
    committer._ensure_thread()
    for item in items:
        assert item.wait(30)
    assert [i.status for i in items] == ["stored", "rejected", "stored", "stored"]
    assert "invalid input syntax for type json" in items[1].detail
    assert len(rows(pg, *(e.id for e in good))) == 3


def test_store_helpers_months_and_names():
    jan = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    assert store.month_of(jan).isoformat() == "2026-01-01"
    assert store.month_of(jan.astimezone(timezone_plus(5))).isoformat() == "2026-01-01"
    assert store.add_months(store.month_of(jan), 1).isoformat() == "2026-02-01"
    assert store.add_months(store.month_of(jan), -13).isoformat() == "2024-12-01"
    assert store.partition_name(store.month_of(jan)) == "audit_events_2026_01"
    assert store.partition_month("audit_events_2026_01") == store.month_of(jan)
    assert store.partition_month("audit_events_2026_13") is None
    assert store.partition_month("audit_events") is None
    start, end = store.month_bounds(store.month_of(datetime(2024, 12, 5, tzinfo=UTC)))
    assert (start.isoformat(), end.isoformat()) == (
        "2024-12-01T00:00:00+00:00",
        "2025-01-01T00:00:00+00:00",
    )


def timezone_plus(hours: int):
    from datetime import timezone

    return timezone(timedelta(hours=hours))


def test_concurrent_partition_creation_for_one_month(settings):
    """Many processes' connections asking for the same new month at once: one creates it."""
    conns = [store.connect(settings) for _ in range(6)]
    try:
        store.ensure_schema(conns[0])
        month = store.month_of(datetime(2011, 6, 1, tzinfo=UTC))
        store.forget_partitions(conns[0])
        barrier = threading.Barrier(len(conns))
        results: list[object] = [None] * len(conns)

        def create(i):
            barrier.wait()
            try:
                results[i] = store.ensure_partition(conns[i], month)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion
                results[i] = exc

        threads = [threading.Thread(target=create, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r in (True, False) for r in results), results
        assert results.count(True) == 1
        assert month in store.list_partitions(conns[0])
    finally:
        for c in conns:
            c.close()


def test_metrics_add_up_across_gunicorn_workers(settings, tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    events = [make_event() for _ in range(12)]
    with LocalFunction("writer", "write", settings, tmp_path, workers=2, env=env) as server:
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda e: deliver(server, e)[0], events))
        assert statuses == [201] * 12
        deliver(server, events[0])
        text = request(server.url, "GET", "/metrics")[1]
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("audit_writer_rows_inserted_total", "audit_writer_duplicates_total"))
    }
    assert values == {
        "audit_writer_rows_inserted_total": 12.0,
        "audit_writer_duplicates_total": 1.0,
    }


def _fresh_database(settings, pg, name: str):
    """Settings for a new, empty database on the module's server."""
    pg.run(f"CREATE DATABASE {name}")
    url = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    return settings.model_copy(update={"database_url": url})


def test_a_freshly_started_writer_has_the_partitions_ahead(settings, pg, tmp_path):
    """The schema step at start creates the current month and the next N-1, as upkeep would."""
    fresh = _fresh_database(settings, pg, f"w_ahead_{uuid.uuid4().hex[:8]}")
    env = {"PARTITIONS_AHEAD_MONTHS": "5"}
    with LocalFunction("writer", "write", fresh, tmp_path, env=env) as w:
        assert request(w.url, "GET", "/readyz")[:2] == (200, {"status": "ready"})
    conn = store.connect(fresh)
    try:
        have = store.list_partitions(conn)
    finally:
        conn.close()
    want = store.months_ahead(datetime.now(UTC), 5)
    assert sorted(have) == want, sorted(have)


def test_concurrent_schema_steps_create_each_month_once(settings, pg):
    """Writers starting together on an empty database: every one succeeds, no month twice."""
    fresh = _fresh_database(settings, pg, f"w_race_{uuid.uuid4().hex[:8]}")
    conns = [store.connect(fresh) for _ in range(5)]
    barrier = threading.Barrier(len(conns))
    results: list[object] = [None] * len(conns)

    def start(i):
        barrier.wait()
        try:
            results[i] = store.ensure_schema(conns[i], 3)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            results[i] = exc

    try:
        threads = [threading.Thread(target=start, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(isinstance(r, list) for r in results), results
        created = sorted(name for r in results for name in r)
        want = [store.partition_name(m) for m in store.months_ahead(datetime.now(UTC), 3)]
        assert created == want  # each month created by exactly one of them
        assert sorted(store.list_partitions(conns[0]).values()) == want
        assert store.ensure_schema(conns[0], 3) == []  # idempotent
    finally:
        for c in conns:
            c.close()
