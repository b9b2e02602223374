"""`openg2p-audit query` and `openg2p-audit token`: the operator's side of the same reads.

The CLI takes the query service's filters as options and goes through the same
validation and SQL (`openg2p_audit.query`) on a read-only session, so its
answers are compared with the same reference model as the service's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import uuid
from datetime import UTC, timedelta

import pg8000.native
import pytest

from openg2p_audit import query, store
from openg2p_audit.cli import main
from openg2p_audit.devservices.issuer import LocalIssuer
from query_support import (
    ACTORS,
    BENEFICIARIES,
    as_event,
    expected,
    full_range,
    months_back,
    seed,
    seed_rows,
)

ROWS = seed_rows(120, seed=5)


@pytest.fixture(scope="module")
def seeded(settings):
    seed(settings, ROWS)
    return settings


@pytest.fixture
def env(seeded, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", seeded.database_url)
    monkeypatch.delenv("DB_HOST", raising=False)
    monkeypatch.delenv("QUERY_CURSOR_SECRET", raising=False)
    return seeded


def store_z(moment) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _range_args() -> list[str]:
    r = full_range()
    return ["--from", r["from"], "--to", r["to"]]


def _jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line]


def test_no_table_yet_says_so(settings, monkeypatch, capsys):
    name = f"t_empty_{uuid.uuid4().hex[:8]}"
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        conn.run(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    kw = settings.pg_connect_kwargs
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://{kw['user']}@{kw['host']}:{kw['port']}/{name}"
    )
    monkeypatch.delenv("DB_HOST", raising=False)
    assert main(["query"]) == 1
    assert "no table audit_events" in capsys.readouterr().err


def test_filters_select_what_the_service_would(env, capsys):
    cases = [
        [],
        ["--actor-id", ACTORS[1]],
        ["--resource-type", "beneficiary", "--resource-id", BENEFICIARIES[2]],
        ["--type", "org.openg2p.registry.*", "--outcome", "success"],
        ["--tenant", "district-north", "--source", "/openg2p/registry"],
    ]
    names = {"--actor-id": "actor_id", "--resource-type": "resource_type",
             "--resource-id": "resource_id", "--type": "type", "--outcome": "outcome",
             "--tenant": "tenant", "--source": "source"}  # fmt: skip
    for extra in cases:
        params = {**full_range(), **dict(zip(map(names.get, extra[::2]), extra[1::2], strict=True))}
        assert main(["query", *_range_args(), *extra, "--all"]) == 0
        captured = capsys.readouterr()
        assert [e["id"] for e in _jsonl(captured.out)] == expected(ROWS, params), extra
        assert f"({len(expected(ROWS, params))} row(s)" in captured.err


def test_rows_are_the_services_events(env, capsys):
    assert main(["query", *_range_args(), "--limit", "1000"]) == 0
    by_id = {r.id: as_event(r) for r in ROWS}
    for event in _jsonl(capsys.readouterr().out):
        event.pop("ingested_at")
        assert event == by_id[event["id"]]


def test_pages_print_the_next_cursor(env, capsys):
    assert main(["query", *_range_args(), "--limit", "7"]) == 0
    captured = capsys.readouterr()
    assert [e["id"] for e in _jsonl(captured.out)] == expected(ROWS, full_range())[:7]
    cursor = captured.err.split("--cursor ", 1)[1].split()[0]
    # Without QUERY_CURSOR_SECRET each process signs with a key of its own, so the next
    # process refuses the cursor rather than guess (see the next test for the shared key).
    assert main(["query", *_range_args(), "--limit", "7", "--cursor", cursor]) == 2
    assert "--cursor: is not a cursor this service issued" in capsys.readouterr().err


def test_a_cursor_carries_over_with_the_shared_secret(env, monkeypatch, capsys):
    monkeypatch.setenv("QUERY_CURSOR_SECRET", "s" * 40)
    assert main(["query", *_range_args(), "--limit", "7"]) == 0
    cursor = capsys.readouterr().err.split("--cursor ", 1)[1].split()[0]
    assert main(["query", *_range_args(), "--limit", "7", "--cursor", cursor]) == 0
    second = [e["id"] for e in _jsonl(capsys.readouterr().out)]
    assert second == expected(ROWS, full_range())[7:14]


def test_all_with_small_pages_returns_every_row_once(env, capsys):
    assert main(["query", *_range_args(), "--limit", "9", "--all"]) == 0
    ids = [e["id"] for e in _jsonl(capsys.readouterr().out)]
    assert ids == expected(ROWS, full_range())
    assert len(ids) == len(set(ids)) == len(ROWS)


def test_csv_has_the_flat_columns_and_details_as_json(env, capsys):
    assert main(["query", *_range_args(), "--all", "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0][:3] == ["id", "occurred_at", "source"] and table[0][-1] == "ingested_at"
    by_id = {r.id: as_event(r) for r in ROWS}
    assert [row[0] for row in table[1:]] == expected(ROWS, full_range())
    for row in table[1:]:
        record = dict(zip(table[0], row, strict=True))
        assert json.loads(record["details"]) == by_id[record["id"]]["details"]


def test_one_event_by_id(env, capsys):
    assert main(["query", "--id", ROWS[3].id]) == 0
    [event] = _jsonl(capsys.readouterr().out)
    assert event["id"] == ROWS[3].id


@pytest.mark.parametrize(
    "args,option",
    [
        (["--from", "yesterday"], "--from"),
        (["--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"], "--to"),
        (["--limit", "5000"], "--limit"),
        (["--type", "*"], "--type"),
        (["--resource-id", "BEN-001"], "--resource-id"),
        (["--cursor", "forged.cursor"], "--cursor"),
    ],
)
def test_bad_options_name_the_option(env, capsys, args, option):
    assert main(["query", *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {option}: ")


def test_token_comes_only_from_dev_ups_local_issuer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENG2P_AUDIT_CACHE", str(tmp_path))
    assert main(["token"]) == 2
    assert "start `./dev up` first" in capsys.readouterr().err
    issuer = LocalIssuer("http://127.0.0.1:9/issuer")
    issuer.save_state()
    assert main(["token", "--role", "audit.read", "--role", "audit.export", "--subject", "x"]) == 0
    token = capsys.readouterr().out.strip()
    import jwt

    claims = jwt.decode(token, issuer.public_pem(), algorithms=["RS256"], audience="openg2p-audit")
    assert claims["sub"] == "x" and claims["realm_access"]["roles"] == [
        "audit.read",
        "audit.export",
    ]
    assert claims["iss"] == issuer.url
    state = json.loads((tmp_path / "dev-issuer.json").read_text())
    state["issuer"] = "https://keycloak.example/realms/openg2p"
    (tmp_path / "dev-issuer.json").write_text(json.dumps(state))
    assert main(["token"]) == 2  # never for an issuer other than a local one
    LocalIssuer.forget_state()
    assert not (tmp_path / "dev-issuer.json").exists()


def test_dev_up_gives_the_query_service_its_read_only_role(settings):
    """What `dev up` does before starting the runner: the role the query manifest names."""
    from openg2p_audit import query
    from openg2p_audit.cli import _query_role
    from openg2p_audit.settings import load_settings
    from pipeline_support import BASE

    env = _query_role(settings, BASE)
    assert set(env) == {"audit-query"}
    url = env["audit-query"]["DATABASE_URL"]
    assert url.startswith("postgresql://audit_query:")
    conn = query.connect(load_settings(database_url=url))
    try:
        assert query.can_write(conn) is False
        assert conn.run("SELECT count(*) FROM audit_events")[0][0] >= 0
    finally:
        conn.close()


def test_query_settings_are_checked_at_start():
    from openg2p_audit.settings import SettingsError, load_settings

    assert load_settings().query_max_range_days == 93
    for bad in (
        {"query_cursor_secret": "too-short"},
        {"query_max_range_days": 0},
        {"query_export_max_rows": 0},
        {"auth_issuer": "keycloak/realms/x"},
        {"auth_jwks_url": "ftp://x/certs"},
        {"auth_leeway_seconds": 3600},
    ):
        with pytest.raises(SettingsError):
            load_settings(**bad)


def test_a_type_prefix_is_literal_text_not_a_like_pattern(env, capsys):
    for prefix in ("org_openg2p.*", "org%*", "%*", "org.openg2p.registry.beneficiary.view_d*"):
        assert main(["query", *_range_args(), "--type", prefix, "--all"]) == 0
        assert _jsonl(capsys.readouterr().out) == [], prefix
    assert main(["query", *_range_args(), "--type", "org.openg2p.*", "--all"]) == 0
    assert len(_jsonl(capsys.readouterr().out)) == len(ROWS)


def test_csv_lines_written_by_postgresql_are_what_the_csv_module_writes(env):
    """The export's CSV is built in SQL; it must quote, escape and leave NULLs empty
    exactly as Python's csv module (QUOTE_MINIMAL) would for the same values."""
    at = months_back(9) + timedelta(days=3)
    values = [
        ('say "hi"', "a, b", 'x "y", z'),
        ("line\nbreak", "cr\rhere", "tab\there"),
        ("plain", None, "ü €"),
        ("", "trailing,", ""),
    ]
    awkward = [
        dataclasses.replace(
            ROWS[i],
            id=f"csv-{i}",
            occurred_at=at + timedelta(seconds=i),
            subject=subject,
            reason=reason,
            details=json.dumps({"note": note}),
        )
        for i, (subject, reason, note) in enumerate(values)
    ]
    window = {"from": store_z(at), "to": store_z(at + timedelta(minutes=1))}
    conn = pg8000.native.Connection(**env.pg_connect_kwargs)
    try:
        store.insert_events(conn, awkward)
        chunks = query.export_chunks(conn, query.parse_filters(window, env), "csv", 100)
        out = b"".join(chunks).decode()
    finally:
        conn.close()
    table = list(csv.reader(io.StringIO(out, newline="")))
    again = io.StringIO()
    csv.writer(again, lineterminator="\r\n").writerows(table)
    assert out == again.getvalue()  # byte for byte what csv.writer makes of the same values
    header, *rows = table
    got = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert sorted(got) == sorted(r.id for r in awkward)
    for row in awkward:
        line = got[row.id]
        assert line["subject"] == row.subject and line["reason"] == (row.reason or "")
        assert json.loads(line["details"]) == json.loads(row.details)
