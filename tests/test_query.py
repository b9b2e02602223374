"""The query service as deployed: `knative/base` run by the local runner, real data.

Ingest, the writer and the query service run from the manifests; the query
service connects as the read-only role and trusts a local token issuer. Rows
are seeded with the store's insert path over three monthly partitions, and
every answer is compared with `query_support.expected`, the query semantics in
plain Python. Each read's own audit event is followed through Kafka and the
writer into `audit_events`.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pg8000.native
import pytest
from pg8000.exceptions import DatabaseError

from ingest_support import end_offsets, request
from openg2p_audit import query, store
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices._process import free_port
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.eventing.runner import Runner
from openg2p_audit.topics import ensure_topics
from pipeline_support import module_manifests
from query_support import (
    ACTORS,
    BENEFICIARIES,
    TENANTS,
    TRACES,
    as_event,
    expected,
    full_range,
    months_back,
    reader_role,
    seed,
    seed_rows,
    url_with,
    wait_rows,
)

QUERY = "audit-query"
EXPORT_CAP = 150
ROWS = seed_rows(200)


@pytest.fixture(scope="module")
def reader(settings):
    seed(settings, ROWS)
    return reader_role(settings, f"audit_query_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def issuer():
    return LocalIssuer()


@pytest.fixture(scope="module")
def pipeline(settings, reader, issuer, tmp_path_factory):
    ensure_topics(settings)
    workdir = tmp_path_factory.mktemp("query")
    runner = Runner(
        module_manifests(settings, workdir / "manifests"),
        settings,
        workdir=workdir,
        schedule_pings=False,
        commit_interval=0.5,
        issuer=issuer,
        service_env={
            QUERY: {
                "DATABASE_URL": reader.database_url,
                "QUERY_EXPORT_MAX_ROWS": str(EXPORT_CAP),
            }
        },
    )
    runner.start()
    runner.wait_ready(90)
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def base(pipeline) -> str:
    return pipeline.service_url(QUERY)


def auth(issuer, *roles: str, subject: str = "investigator-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(subject, roles or ('audit.read',))}"}


def get(base: str, path: str, params=None, headers=None):
    url = url_with(base, path, params or {})
    return request(base, url.removeprefix(base), method="GET", headers=headers or {})


def ids_of(reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [e["id"] for e in reply.json["events"]]


def all_pages(base: str, issuer, params: dict[str, str], limit: int) -> list[list[str]]:
    pages, cursor = [], None
    headers = auth(issuer)
    while True:
        p = {**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        reply = get(base, "/v1/audit/events", p, headers)
        pages.append(ids_of(reply))
        cursor = reply.json["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 500


# ------------------------------------------------------------------ filters and pages


FILTERS = [
    {},
    {"actor_id": ACTORS[0]},
    {"resource_type": "beneficiary"},
    {"resource_type": "beneficiary", "resource_id": BENEFICIARIES[3]},
    {"type": "org.openg2p.payment.approved"},
    {"type": "org.openg2p.registry.*"},
    {"type": "org.openg2p.registry.beneficiary.view*"},
    {"outcome": "denied"},
    {"source": "/openg2p/payments"},
    {"subject": f"beneficiary/{BENEFICIARIES[0]}"},
    {"trace_id": TRACES[1]},
    {"tenant": TENANTS[0]},
    {"actor_id": ACTORS[1], "outcome": "success", "tenant": TENANTS[1]},
    {"type": "org.openg2p.registry.*", "resource_type": "beneficiary",
     "resource_id": BENEFICIARIES[5], "source": "/openg2p/registry"},
]  # fmt: skip


@pytest.mark.parametrize("extra", FILTERS, ids=lambda f: ",".join(f) or "range-only")
def test_every_filter_selects_what_it_says(base, issuer, extra):
    params = {**full_range(), **extra}
    want = expected(ROWS, params)
    assert want or extra.get("trace_id"), "the seed should make every filter select something"
    got = [i for page in all_pages(base, issuer, params, 1000) for i in page]
    assert got == want


def test_events_are_the_rows_with_details_as_json(base, issuer):
    reply = get(base, "/v1/audit/events", {**full_range(), "limit": "1000"}, auth(issuer))
    by_id = {r.id: as_event(r) for r in ROWS}
    for event in reply.json["events"]:
        ingested = event.pop("ingested_at")
        assert ingested.endswith("Z")
        assert event == by_id[event["id"]]
    with_context = [e for e in reply.json["events"] if "context" in (e["details"] or {})]
    assert with_context and isinstance(with_context[0]["details"]["context"]["nested"], dict)


def test_a_narrow_range_selects_only_its_rows(base, issuer):
    start = months_back(2)
    params = {  # an offset instead of Z works too (sent as %2B)
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": (start + timedelta(days=14)).isoformat(),
    }
    got = [i for page in all_pages(base, issuer, params, 1000) for i in page]
    assert got == expected(ROWS, params)
    assert len(got) > 5  # the boundary ties are in, the rows before `from` are not


@pytest.mark.parametrize("limit", [1, 3, 7, 100])
def test_keyset_pages_cross_partitions_without_gaps_or_duplicates(base, issuer, limit):
    params = full_range()
    pages = all_pages(base, issuer, params, limit)
    flat = [i for page in pages for i in page]
    assert flat == expected(ROWS, params)
    assert len(flat) == len(set(flat))
    assert all(len(p) == limit for p in pages[:-1]) and 0 < len(pages[-1]) <= limit
    months = {next(r for r in ROWS if r.id == i).month for i in flat}
    assert len(months) == 3


def test_default_limit_is_100_and_last_page_has_no_cursor(base, issuer):
    reply = get(base, "/v1/audit/events", full_range(), auth(issuer))
    assert len(reply.json["events"]) == 100 and reply.json["next_cursor"]
    one = {**full_range(), "actor_id": ACTORS[2], "limit": "1000"}
    assert get(base, "/v1/audit/events", one, auth(issuer)).json["next_cursor"] is None


def test_one_event_by_id(base, issuer):
    row = ROWS[42]
    reply = get(base, f"/v1/audit/events/{row.id}", headers=auth(issuer))
    assert reply.status == 200
    [event] = reply.json["events"]
    event.pop("ingested_at")
    assert event == as_event(row)
    missing = get(base, "/v1/audit/events/no-such-event", headers=auth(issuer))
    assert missing.status == 404 and missing.json["error"] == "not_found"


# ------------------------------------------------------------------ bad input


def _cursor(base, issuer, params) -> str:
    reply = get(base, "/v1/audit/events", {**params, "limit": "2"}, auth(issuer))
    return reply.json["next_cursor"]


BAD = [
    ({"to": "2026-01-01T00:00:00Z"}, "from"),
    ({"from": "2026-01-01T00:00:00Z"}, "to"),
    ({"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, "from"),
    ({"from": "2026-01-01", "to": "2026-01-02T00:00:00Z"}, "from"),
    ({"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00Z"}, "from"),
    ({"from": "2026-02-30T00:00:00Z", "to": "2026-03-02T00:00:00Z"}, "from"),
    ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00 01:00"}, "to"),
    ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
    ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
    ({"from": "2026-01-01T00:00:00Z", "to": "2026-04-05T00:00:00Z"}, "to"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-5"}, "limit"),
    ({"cursor": "garbage"}, "cursor"),
    ({"cursor": "a.b"}, "cursor"),
    ({"outcome": "maybe"}, "outcome"),
    ({"type": "*"}, "type"),
    ({"type": "org.*.viewed"}, "type"),
    ({"trace_id": "not-hex"}, "trace_id"),
    ({"resource_id": "BEN-001"}, "resource_id"),
    ({"actor_id": ""}, "actor_id"),
    ({"actor_id": "x" * 3000}, "actor_id"),
    ({"actor": "officer-1"}, "actor"),
    ({"offset": "100"}, "offset"),
]


@pytest.mark.parametrize("params,named", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_parameter(base, issuer, settings, params, named):
    query_params = params if "from" in params or "to" in params else {**full_range(), **params}
    before = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)
    reply = get(base, "/v1/audit/events", query_params, auth(issuer))
    assert reply.status == 400, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json["error"] == "invalid_parameter"
    assert reply.json["parameter"] == named
    assert reply.json["message"]
    after = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)
    assert after == before  # nothing was read, so nothing was audited


def test_a_repeated_parameter_is_a_400(base, issuer):
    params = [*full_range().items(), ("actor_id", "a"), ("actor_id", "b")]
    url = url_with(base, "/v1/audit/events", params)
    reply = request(base, url.removeprefix(base), method="GET", headers=auth(issuer))
    assert reply.status == 400 and reply.json["parameter"] == "actor_id"


def test_a_tampered_cursor_is_a_400(base, issuer):
    cursor = _cursor(base, issuer, full_range())
    payload, mac = cursor.split(".")
    raw = query._unb64(payload).replace(b"evt-", b"evt-9")
    forged = [
        query._b64(raw) + "." + mac,  # another key, the old signature
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),  # signature altered
        payload,  # no signature
        cursor + "x",
    ]
    for bad in forged:
        params = {**full_range(), "cursor": bad}
        reply = get(base, "/v1/audit/events", params, auth(issuer))
        assert reply.status == 400, bad
        assert reply.json["parameter"] == "cursor"


def test_a_cursor_works_only_with_the_filters_it_was_issued_for(base, issuer):
    cursor = _cursor(base, issuer, full_range())
    other = {**full_range(), "actor_id": ACTORS[0], "cursor": cursor}
    reply = get(base, "/v1/audit/events", other, auth(issuer))
    assert reply.status == 400 and reply.json["parameter"] == "cursor"
    assert "other filters" in reply.json["message"]


def test_bad_export_input_is_a_400(base, issuer):
    headers = auth(issuer, "audit.read", "audit.export")
    for params, named in [
        ({**full_range(), "format": "xml"}, "format"),
        ({**full_range(), "limit": "10"}, "limit"),
        ({**full_range(), "cursor": "x"}, "cursor"),
        ({"from": full_range()["from"]}, "to"),
    ]:
        reply = get(base, "/v1/audit/export", params, headers)
        assert reply.status == 400 and reply.json["parameter"] == named
    reply = get(base, f"/v1/audit/events/{ROWS[0].id}", {"x": "1"}, auth(issuer))
    assert reply.status == 400 and reply.json["parameter"] == "x"


# ------------------------------------------------------------------ auth over HTTP


def test_every_read_endpoint_needs_a_token(base, issuer):
    for path in ("/v1/audit/events", f"/v1/audit/events/{ROWS[0].id}", "/v1/audit/export"):
        reply = get(base, path, full_range() if "events/" not in path else {})
        assert reply.status == 401
        assert reply.json == {
            "error": "unauthorized",
            "message": "a valid bearer token is required",
        }
        assert reply.headers["www-authenticate"] == 'Bearer realm="openg2p-audit"'
    bad = get(base, "/v1/audit/events", full_range(), {"Authorization": "Bearer x.y.z"})
    assert bad.status == 401
    assert bad.headers["www-authenticate"].endswith('error="invalid_token"')
    # Bad parameters from someone without a token learn nothing about the parameters.
    assert get(base, "/v1/audit/events", {"offset": "1"}).status == 401


def test_roles_decide_access(base, issuer):
    none = auth(issuer, "offline_access")
    reply = get(base, "/v1/audit/events", full_range(), none)
    assert reply.status == 403
    assert reply.json["error"] == "forbidden" and "www-authenticate" not in reply.headers
    read_only = auth(issuer, "audit.read")
    assert get(base, "/v1/audit/events", full_range(), read_only).status == 200
    export = get(base, "/v1/audit/export", full_range(), read_only)
    assert export.status == 403  # exporting needs audit.export as well
    assert get(base, "/v1/audit/export", full_range(), auth(issuer, "audit.export")).status == 403
    both = auth(issuer, "audit.read", "audit.export")
    assert get(base, "/v1/audit/export", full_range(), both).status == 200


def test_client_roles_count_too(base, issuer):
    token = issuer.sign(
        issuer.claims(
            "client-role-user",
            roles=(),
            resource_access={"openg2p-audit": {"roles": ["audit.read"]}},
        )
    )
    reply = get(base, "/v1/audit/events", full_range(), {"Authorization": f"Bearer {token}"})
    assert reply.status == 200


def test_probes_need_no_token(base):
    assert request(base, "/healthz", method="GET").status == 200
    ready = request(base, "/readyz", method="GET")
    assert ready.status == 200 and ready.json["read_only_role"] is True
    assert request(base, "/metrics", method="GET").status == 200


# ------------------------------------------------------------------ export


def test_export_jsonl_is_every_row_of_the_range_as_the_api_gives_it(base, issuer):
    params = {**full_range(), "actor_id": ACTORS[0]}
    headers = auth(issuer, "audit.read", "audit.export")
    reply = get(base, "/v1/audit/export", params, headers)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    assert reply.headers.get("transfer-encoding") == "chunked"  # streamed, not buffered
    lines = [json.loads(line) for line in reply.body.decode().splitlines()]
    api = get(base, "/v1/audit/events", {**params, "limit": "1000"}, auth(issuer)).json
    assert lines == api["events"]
    assert [e["id"] for e in lines] == expected(ROWS, params)
    assert reply.headers["x-audit-export-rows"] == str(len(lines))
    assert reply.headers["x-audit-export-truncated"] == "false"


def test_export_csv_has_a_header_and_details_as_json_text(base, issuer):
    params = {**full_range(), "resource_type": "beneficiary", "resource_id": BENEFICIARIES[1],
              "format": "csv"}  # fmt: skip
    reply = get(base, "/v1/audit/export", params, auth(issuer, "audit.read", "audit.export"))
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(reply.body.decode())))
    assert table[0] == list(query.CSV_COLUMNS)
    records = [dict(zip(table[0], r, strict=True)) for r in table[1:]]
    assert [r["id"] for r in records] == expected(ROWS, params)
    by_id = {r.id: as_event(r) for r in ROWS}
    for record in records:
        want = by_id[record["id"]]
        assert json.loads(record["details"]) == want["details"]
        assert record["occurred_at"] == want["occurred_at"]
        assert record["reason"] == (want["reason"] or "")


def test_export_stops_at_the_cap_and_says_so(base, issuer):
    reply = get(base, "/v1/audit/export", full_range(), auth(issuer, "audit.read", "audit.export"))
    lines = reply.body.decode().splitlines()
    assert len(lines) == EXPORT_CAP < len(ROWS)
    assert [json.loads(x)["id"] for x in lines] == expected(ROWS, full_range())[:EXPORT_CAP]
    assert reply.headers["x-audit-export-truncated"] == "true"
    assert reply.headers["x-audit-export-rows"] == str(EXPORT_CAP)


# ------------------------------------------------------------------ reads are audited


def _audit_rows(settings, subject: str, kind: str, count: int = 1, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        rows = wait_rows(
            settings,
            "SELECT actor_id, type, action, details, source, resource_type, resource_id"
            " FROM audit_events WHERE actor_id = :a AND type = :t",
            timeout=timeout,
            a=subject,
            t=kind,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_a_query_is_itself_audited_and_lands_as_a_row(base, issuer, settings):
    subject = f"investigator-{uuid.uuid4().hex[:8]}"
    params = {**full_range(), "resource_type": "beneficiary", "resource_id": BENEFICIARIES[4]}
    reply = get(base, "/v1/audit/events", {**params, "limit": "3"}, auth(issuer, subject=subject))
    assert reply.status == 200
    [row] = _audit_rows(settings, subject, "org.openg2p.audit.query.performed")
    actor, _type, action, details, source, rtype, _ = row
    assert (actor, action, source, rtype) == (subject, "query", "/openg2p/audit/query",
                                             "audit_events")  # fmt: skip
    context = details["context"]
    assert context["endpoint"] == "/v1/audit/events"
    assert set(context["filters"]) == {"from", "to", "resource_type", "resource_id"}
    assert context["filters"]["resource_id"] == BENEFICIARIES[4]
    assert context["rows"] == len(reply.json["events"]) == 3
    # "Who looked at beneficiary X, and when" is now a query like any other.
    recent = {"from": months_back(1).isoformat(), "to": months_back(-1).isoformat(),
              "type": "org.openg2p.audit.query.*", "actor_id": subject}  # fmt: skip
    found = get(base, "/v1/audit/events", recent, auth(issuer))
    assert [e["details"]["context"]["filters"]["resource_id"] for e in found.json["events"]] == [
        BENEFICIARIES[4]
    ]


def test_an_export_and_a_lookup_are_audited_with_their_row_counts(base, issuer, settings):
    subject = f"exporter-{uuid.uuid4().hex[:8]}"
    headers = auth(issuer, "audit.read", "audit.export", subject=subject)
    params = {**full_range(), "actor_id": ACTORS[3], "format": "csv"}
    reply = get(base, "/v1/audit/export", params, headers)
    assert reply.status == 200
    [row] = _audit_rows(settings, subject, "org.openg2p.audit.query.exported")
    context = row[3]["context"]
    assert row[2] == "export"
    assert (
        context["rows"] == len(expected(ROWS, params)) == int(reply.headers["x-audit-export-rows"])
    )
    assert context["format"] == "csv" and context["truncated"] is False
    assert context["filters"]["actor_id"] == ACTORS[3]

    lookup = get(base, f"/v1/audit/events/{ROWS[7].id}", headers=headers)
    assert lookup.status == 200
    [row] = _audit_rows(settings, subject, "org.openg2p.audit.query.performed")
    assert row[6] == ROWS[7].id  # the event looked at is the audit event's resource
    assert row[3]["context"]["rows"] == 1


# ------------------------------------------------------------------ Kafka down: 503


@pytest.fixture(scope="module")
def no_kafka(pipeline, reader, issuer, tmp_path_factory):
    """The query service with its Kafka gone: nothing listens at the broker address."""
    down = reader.model_copy(
        update={
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
            "auth_issuer": issuer.url,
            "auth_jwks_url": issuer.jwks_url,
            "ingest_ack_timeout_ms": 800,
        }
    )
    fn = LocalFunction("query", "query", down, tmp_path_factory.mktemp("query-no-kafka"))
    fn.start()
    yield fn
    fn.stop()


def test_a_read_that_cannot_be_audited_fails_with_503(no_kafka, issuer):
    fn = no_kafka
    headers = auth(issuer, "audit.read", "audit.export")
    for path, params in [
        ("/v1/audit/events", full_range()),
        (f"/v1/audit/events/{ROWS[0].id}", {}),
        ("/v1/audit/export", full_range()),
    ]:
        started = time.monotonic()
        reply = get(fn.url, path, params, headers)
        assert reply.status == 503, (path, reply.body)
        assert time.monotonic() - started < 5
        assert reply.json["cause"] == "audit_unavailable"
        assert "events" not in reply.json and reply.headers.get("retry-after")
        assert ROWS[0].id.encode() not in reply.body
    assert request(fn.url, "/readyz", method="GET").status == 503


# ------------------------------------------------------------------ the read-only role


def test_the_query_role_cannot_change_the_trail(reader, settings):
    conn = query.connect(reader)
    try:
        assert query.can_write(conn) is False
        insert = (
            "INSERT INTO audit_events (id, occurred_at, source, type, actor_type, actor_id,"
            " action, outcome) VALUES ('x', now(), 's', 't', 'user', 'a', 'b', 'success')"
        )
        with pytest.raises(DatabaseError) as first:
            conn.run(insert)
        assert store.sqlstate(first.value) == "25006"  # the session is read-only
        # Even a session that turns read-only off has no privilege to write.
        conn.run("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        for sql in (
            insert,
            f"UPDATE audit_events SET outcome = 'denied' WHERE id = '{ROWS[0].id}'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            f"SELECT count(*) FROM {store.partition_name(ROWS[20].month)}",
            "CREATE TABLE sneaky (x int)",
            # Temporary tables too: PostgreSQL grants TEMP on a database to PUBLIC.
            "CREATE TEMP TABLE sneaky (x int)",
            "CREATE TEMPORARY TABLE audit_events (LIKE public.audit_events)",
            "CREATE SCHEMA sneaky",
        ):
            with pytest.raises(DatabaseError) as denied:
                conn.run(sql)
            assert store.sqlstate(denied.value) == "42501", sql  # insufficient_privilege
        assert conn.run("SELECT count(*) FROM audit_events")[0][0] >= len(ROWS)
    finally:
        conn.close()
    owner = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        assert query.can_write(owner) is True
        assert owner.run("SELECT count(*) FROM audit_events WHERE id = 'x'")[0][0] == 0
    finally:
        owner.close()


def test_the_role_statements_are_idempotent(settings, reader):
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        role = reader.pg_connect_kwargs["user"]
        query.ensure_reader_role(conn, role, "reader-pw")
        grants = conn.run(
            "SELECT privilege_type FROM information_schema.role_table_grants"
            " WHERE grantee = :r ORDER BY 1",
            r=role,
        )
        assert grants == [["SELECT"]]
        database = conn.run("SELECT current_database()")[0][0]
        for privilege in ("TEMPORARY", "CREATE"):
            assert conn.run(
                "SELECT has_database_privilege(:r, :d, :p)", r=role, d=database, p=privilege
            ) == [[False]], privilege
        assert conn.run("SELECT has_schema_privilege(:r, 'public', 'CREATE')", r=role) == [[False]]
    finally:
        conn.close()


def test_abandoned_exports_give_their_connections_back(base, issuer, settings):
    """A client that hangs up mid-export leaves no open transaction or connection behind."""
    import http.client

    headers = auth(issuer, "audit.read", "audit.export")
    path = url_with(base, "/v1/audit/export", full_range()).removeprefix(base)
    host, port = base.removeprefix("http://").split(":")
    for _ in range(8):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read(10)  # then hang up with the rest unread
        conn.close()
    reply = get(base, "/v1/audit/export", full_range(), headers)
    assert reply.status == 200 and len(reply.body.decode().splitlines()) == EXPORT_CAP
    deadline = time.monotonic() + 10
    while True:
        owner = pg8000.native.Connection(**settings.pg_connect_kwargs)
        try:
            sessions = owner.run(
                "SELECT state FROM pg_stat_activity WHERE application_name = 'openg2p-audit-query'"
                " AND datname = current_database()"
            )
        finally:
            owner.close()
        states = [s[0] for s in sessions]
        if "idle in transaction" not in states or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "idle in transaction" not in states
    assert len(states) <= 8  # the pool's size: nothing leaked


# ------------------------------------------------------------------ the published API


def _openapi():
    import yaml
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "query.openapi.yaml")
                         .read_text())  # fmt: skip
    registry = Registry().with_resource(
        "urn:query-openapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )

    def validator(name: str) -> Draft202012Validator:
        ref = {"$ref": f"urn:query-openapi#/components/schemas/{name}"}
        return Draft202012Validator(ref, registry=registry)

    return doc, validator


def test_the_openapi_document_lists_exactly_the_parameters_taken():
    doc, _ = _openapi()

    def names(path: str) -> set[str]:
        out = set()
        for p in doc["paths"][path]["get"]["parameters"]:
            if "$ref" in p:
                p = doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
            out.add(p["name"])
        return out

    assert names("/v1/audit/events") == set(query.PAGE_PARAMS)
    assert names("/v1/audit/export") == set(query.EXPORT_PARAMS)
    event = doc["components"]["schemas"]["Event"]
    assert list(event["required"]) == list(query.EVENT_COLUMNS)


def test_real_answers_match_the_openapi_document(base, issuer, no_kafka):
    _, schema = _openapi()
    page = get(base, "/v1/audit/events", {**full_range(), "limit": "1000"}, auth(issuer))
    schema("Page").validate(page.json)
    one = get(base, f"/v1/audit/events/{ROWS[0].id}", headers=auth(issuer))
    schema("Events").validate(one.json)
    export = get(base, "/v1/audit/export", full_range(), auth(issuer, "audit.read", "audit.export"))
    for line in export.body.decode().splitlines():
        schema("Event").validate(json.loads(line))
    schema("BadParameter").validate(get(base, "/v1/audit/events", {}, auth(issuer)).json)
    schema("Error").validate(get(base, "/v1/audit/events", full_range()).json)
    schema("Error").validate(get(base, "/v1/audit/events", full_range(), auth(issuer, "x")).json)
    down = get(no_kafka.url, "/v1/audit/events", full_range(), auth(issuer))
    assert down.status == 503
    schema("Unavailable").validate(down.json)
