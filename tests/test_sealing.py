"""Sealing and verifying against the real PostgreSQL and Kafka: the promises of issue 14.

Rows go in through the one insert path (`store.insert_events`); hours are then
sealed, exported (by the query service's own export and by `integrity events`)
and verified offline. Each kind of tampering a database administrator could do
must then make `verify` fail, naming the hour.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pg8000.native
import pytest
from kafka import KafkaConsumer, TopicPartition

from conftest import _new_database
from openg2p_audit import cli, integrity, maintenance, query, sealing, store
from openg2p_audit.topics import ensure_topics

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
HOURS = [NOW - timedelta(hours=h) for h in (6, 5, 3)]  # hour NOW-4h stays empty


def _row(i: int, occurred_at: datetime | None = None, **over) -> store.Row:
    values = dict(
        id=f"evt-{i:04d}-{uuid.uuid4().hex[:6]}",
        occurred_at=occurred_at or NOW - timedelta(hours=6, minutes=i % 50),
        source="/openg2p/registry", type="org.openg2p.audit.beneficiary.update",
        subject=None, actor_type="user", actor_id=f"officer-{i % 4}",
        resource_type="beneficiary", resource_id=f"b-{i}", action="update",
        outcome="success", reason=None, trace_id=None,
        details=json.dumps({"changes": [{"field": "phone", "old": "1", "new": str(i)}]}),
    )  # fmt: skip
    values.update(over)
    return store.Row(**values)


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("key1.pem", "key2.pem"):
        path = folder / name
        path.write_bytes(integrity.generate_pem())
        paths.append(str(path))
    return paths


@pytest.fixture
def db(request, settings, postgres_server, base_settings, key_files):
    """Settings on a fresh database of this test's own, with the first signing key."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    url = _new_database(base_settings, postgres_server, name)
    s = settings.model_copy(
        update={
            "database_url": url,
            "integrity_signing_key_file": key_files[0],
            "integrity_origin": "audit.test.openg2p.org/sealing",
            "integrity_grace_seconds": 0,
            "kafka_digests_topic": f"t.{name}.digests",
        }
    )
    ensure_topics(s)
    return s


def _connect(s):
    return store.connect(s)


def _fill(s, per_hour=(20, 15, 10)) -> list[store.Row]:
    """Rows through insert_events, then placed in past hours of ingestion (test setup)."""
    conn = _connect(s)
    rows = []
    try:
        store.ensure_schema(conn)
        n = 0
        for hour, count in zip(HOURS, per_hour, strict=True):
            batch = [_row(n + i) for i in range(count)]
            n += count
            store.insert_events(conn, batch)
            for i, row in enumerate(batch):
                conn.run(
                    "UPDATE audit_events SET ingested_at = :t WHERE id = :id",
                    t=hour + timedelta(seconds=30 * i, microseconds=i), id=row.id,
                )  # fmt: skip
            rows += batch
    finally:
        conn.close()
    return rows


def _seal(s, **kw) -> sealing.SealSummary:
    conn = _connect(s)
    try:
        return sealing.seal(s, conn, **kw)
    finally:
        conn.close()


def _env(monkeypatch, s, key_file=None):
    monkeypatch.setenv("DATABASE_URL", s.database_url)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", s.kafka_bootstrap_servers)
    monkeypatch.setenv("KAFKA_DIGESTS_TOPIC", s.kafka_digests_topic)
    monkeypatch.setenv("INTEGRITY_ORIGIN", s.integrity_origin)
    monkeypatch.setenv("INTEGRITY_SIGNING_KEY_FILE", key_file or s.integrity_signing_key_file)


def _files(monkeypatch, capsys, s, tmp_path, *, key_file=None):
    """events.jsonl, digests.jsonl and key.pub written by the CLI, as an operator would."""
    _env(monkeypatch, s, key_file)
    events, digests, pub = tmp_path / "events.jsonl", tmp_path / "digests.jsonl", tmp_path / "pub"
    assert cli.main(["integrity", "events", "-o", str(events)]) == 0
    assert cli.main(["integrity", "digests", "-o", str(digests)]) == 0
    capsys.readouterr()
    assert cli.main(["integrity", "public-key"]) == 0
    pub.write_text(capsys.readouterr().out)
    return events, digests, pub


def _verify(capsys, events, digests, pub) -> tuple[int, str]:
    code = cli.main(["verify", "--events", str(events), "--digests", str(digests),
                     "--public-key", str(pub)])  # fmt: skip
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip()


def _h(moment: datetime) -> str:
    return integrity.hour_text(moment)


# --------------------------------------------------------------------------- the good path


def test_seal_export_and_verify_pass_and_sealing_is_idempotent(db, monkeypatch, capsys, tmp_path):
    _fill(db)
    _env(monkeypatch, db)
    # --grace 0: the hour before NOW is closed, whatever the minute the test runs at.
    assert cli.main(["seal", "--through", NOW.isoformat(), "--grace", "0"]) == 0
    line = capsys.readouterr().out.strip()
    # Every hour from the first row's to the last closed one, the empty one included.
    assert line.startswith(f"sealed 6 hour(s) {_h(HOURS[0])} .. {_h(NOW - timedelta(hours=1))}")
    assert "(45 row(s))" in line
    assert cli.main(["seal", "--through", NOW.isoformat(), "--grace", "0"]) == 0
    assert capsys.readouterr().out.startswith("no hour to seal")

    conn = _connect(db)
    try:
        table = conn.run("SELECT seq, kind, hour, row_count, published_at IS NOT NULL"
                         " FROM audit_digests ORDER BY seq")  # fmt: skip
    finally:
        conn.close()
    assert [r[0] for r in table] == list(range(6))
    assert [r[3] for r in table] == [20, 15, 0, 10, 0, 0]  # empty hours have digests too
    assert all(r[4] for r in table)

    events, digests, pub = _files(monkeypatch, capsys, db, tmp_path)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 0, out
    assert out.startswith("OK: 45 row(s) in 6 hour(s)")

    # The investigators' export (query service format) verifies just the same.
    conn = query.connect(db)
    try:
        filters = query.Filters(from_=NOW - timedelta(days=1), to=NOW + timedelta(hours=1))
        exported = b"".join(query.export_chunks(conn, filters, "jsonl", 10_000))
    finally:
        conn.close()
    (tmp_path / "export.jsonl").write_bytes(exported)
    code, out = _verify(capsys, tmp_path / "export.jsonl", digests, pub)
    assert code == 0, out

    # Online, against the table.
    assert cli.main(["verify", "--database"]) == 0
    assert capsys.readouterr().out.startswith("OK: 45 row(s)")


def test_digests_are_on_the_kafka_topic_as_in_the_table(db):
    _fill(db)
    summary = _seal(db, through=NOW)
    assert summary.published == 6 and summary.publish_error is None
    consumer = KafkaConsumer(bootstrap_servers=db.bootstrap_servers, enable_auto_commit=False)
    try:
        tp = TopicPartition(db.kafka_digests_topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records = []
        while len(records) < 6:
            for batch in consumer.poll(timeout_ms=5000).values():
                records += batch
    finally:
        consumer.close()
    conn = _connect(db)
    try:
        notes = sealing.digests(conn)
    finally:
        conn.close()
    assert [r.key for r in records] == [str(i).encode() for i in range(6)]
    assert [json.loads(r.value)["note"] for r in records] == notes
    # A second run publishes nothing again.
    assert _seal(db, through=NOW).published == 0


def test_a_row_committing_into_a_sealed_hour_gets_a_supplement(db, monkeypatch, capsys, tmp_path):
    _fill(db)
    slow = _connect(db)
    late = _row(999)
    try:
        # A transaction that started in HOURS[1] and commits only after that hour is sealed.
        slow.run("BEGIN")
        slow.run(
            "INSERT INTO audit_events (id, occurred_at, source, type, actor_type, actor_id,"
            " action, outcome, ingested_at) VALUES (:id, :o, '/s', 't.late', 'user', 'slow',"
            " 'update', 'success', :i)",
            id=late.id, o=late.occurred_at, i=HOURS[1] + timedelta(minutes=59),
        )  # fmt: skip
        first = _seal(db, through=NOW)
        assert first.sealed and not first.supplements
        slow.run("COMMIT")
    finally:
        slow.close()
    second = _seal(db, through=NOW)
    assert second.sealed == []
    assert second.supplements == [{"hour": _h(HOURS[1]), "rows": 1, "seq": 6}]
    assert _seal(db, through=NOW).supplements == []  # covered once, never again

    events, digests, pub = _files(monkeypatch, capsys, db, tmp_path)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 0, out
    assert out.startswith("OK: 46 row(s)")


def test_rotation_old_digests_verify_with_the_old_key(db, key_files, monkeypatch, capsys, tmp_path):
    _fill(db)
    _seal(db, through=HOURS[1] + timedelta(hours=1))
    rotated = db.model_copy(update={"integrity_signing_key_file": key_files[1]})
    summary = _seal(rotated, through=NOW)
    assert summary.sealed and summary.key_id != _seal(db, through=NOW).key_id

    events, digests, pub = _files(monkeypatch, capsys, rotated, tmp_path)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 1 and f"hour {_h(HOURS[0])}" in out, out  # only the new key given
    _env(monkeypatch, db)
    assert cli.main(["integrity", "public-key"]) == 0
    old = capsys.readouterr().out
    pub.write_text(old + pub.read_text())
    code, out = _verify(capsys, events, digests, pub)
    assert code == 0, out
    assert "from 2 key(s)" in out


# --------------------------------------------------------------------------- tampering


def _tamper_update(conn, rows):
    conn.run("UPDATE audit_events SET actor_id = 'someone-else' WHERE id = :id", id=rows[17].id)
    return HOURS[0]


def _tamper_delete(conn, rows):
    conn.run("DELETE FROM audit_events WHERE id = :id", id=rows[25].id)
    return HOURS[1]


def _tamper_insert(conn, rows):
    forged = _row(5000)
    store.insert_events(conn, [forged])
    conn.run("UPDATE audit_events SET ingested_at = :t WHERE id = :id",
             t=HOURS[2] + timedelta(minutes=3), id=forged.id)  # fmt: skip
    return HOURS[2]


def _tamper_delete_digest(conn, rows):
    conn.run("DELETE FROM audit_digests WHERE seq = 2")
    return NOW - timedelta(hours=4)


def _tamper_resign(conn, rows):
    note = conn.run("SELECT note FROM audit_digests WHERE seq = 1")[0][0]
    body = note.rpartition("\n\n")[0] + "\n"
    other = integrity.Signer.from_pem("audit.test.openg2p.org/sealing", integrity.generate_pem())
    conn.run("UPDATE audit_digests SET note = :n WHERE seq = 1", n=other.sign(body))
    return HOURS[1]


def _tamper_swap(conn, rows):
    conn.run("UPDATE audit_digests SET seq = -1 WHERE seq = 1")
    conn.run("UPDATE audit_digests SET seq = 1 WHERE seq = 3")
    conn.run("UPDATE audit_digests SET seq = 3 WHERE seq = -1")
    return None


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (_tamper_update, "root does not match the rows"),
        (_tamper_delete, "covers 15 row(s) but 14 are present"),
        (_tamper_insert, "covers 10 row(s) but 11 are present"),
        (_tamper_delete_digest, "chain gap: digest 3 follows digest 1"),
        (_tamper_resign, "digest signature"),
        (_tamper_swap, "chain"),
    ],
    ids=["update-actor", "delete-row", "forged-insert", "deleted-digest", "resigned", "swapped"],
)
def test_tampering_makes_verify_fail_naming_the_hour(
    db, monkeypatch, capsys, tmp_path, tamper, expected
):
    rows = _fill(db)
    _seal(db, through=NOW)
    conn = _connect(db)
    try:
        hour = tamper(conn, rows)
    finally:
        conn.close()
    events, digests, pub = _files(monkeypatch, capsys, db, tmp_path)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 1, out
    assert out.startswith("FAILED: hour ")
    assert expected in out
    if hour is not None:
        assert out.startswith(f"FAILED: hour {_h(hour)}"), out
    assert cli.main(["verify", "--database"]) == 1
    assert capsys.readouterr().out.startswith("FAILED: hour ")


def test_a_deletion_after_sealing_is_reported_by_the_next_run(db):
    rows = _fill(db)
    _seal(db, through=NOW)
    conn = _connect(db)
    try:
        conn.run("DELETE FROM audit_events WHERE id = :id", id=rows[0].id)
    finally:
        conn.close()
    summary = _seal(db, through=NOW)
    assert summary.missing == [{"hour": _h(HOURS[0]), "present": 19, "sealed": 20}]
    assert "ROWS MISSING" in summary.line()


# --------------------------------------------------------------------------- maintenance


def test_the_hourly_run_seals_and_a_dropped_partition_leaves_a_verifiable_chain(
    db, monkeypatch, capsys, tmp_path
):
    old_month = store.add_months(store.month_of(NOW), -3)
    old = datetime(old_month.year, old_month.month, 10, tzinfo=UTC)
    rows = _fill(db)
    conn = _connect(db)
    try:
        # Rows of a month past retention, ingested in the first sealed hour beside others.
        backfill = [_row(7000 + i, occurred_at=old + timedelta(minutes=i)) for i in range(3)]
        store.insert_events(conn, backfill)
        conn.run("UPDATE audit_events SET ingested_at = :t WHERE occurred_at < :cut",
                 t=HOURS[0] + timedelta(minutes=40), cut=old + timedelta(days=1))  # fmt: skip
    finally:
        conn.close()
    s = db.model_copy(update={"retention_months": 2})
    first = maintenance.run_maintenance(s.model_copy(update={"retention_months": 0}),
                                        redrive_dlq=False)  # fmt: skip
    assert first.status == "ok", first.error
    assert first.seal["sealed"][0] == _h(HOURS[0])
    assert first.seal["rows"] == len(rows) + 3

    second = maintenance.run_maintenance(s, redrive_dlq=False)
    assert second.status == "ok", second.error
    assert second.dropped == [store.partition_name(old_month)]
    assert len(second.retired) == 1

    events, digests, pub = _files(monkeypatch, capsys, s, tmp_path)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 0, out
    assert f"partitions dropped by retention: {old_month:%Y-%m}" in out


def test_maintenance_without_a_key_says_sealing_is_skipped(db):
    s = db.model_copy(update={"integrity_signing_key_file": None})
    summary = maintenance.run_maintenance(s, redrive_dlq=False)
    assert summary.status == "ok"
    assert summary.seal == {"skipped": "INTEGRITY_SIGNING_KEY_FILE is not set"}


def test_bad_input_gets_a_clear_error(db, monkeypatch, capsys, tmp_path):
    _env(monkeypatch, db, key_file=str(tmp_path / "missing.pem"))
    assert cli.main(["seal"]) == 2
    assert "INTEGRITY_SIGNING_KEY_FILE: cannot read" in capsys.readouterr().err
    (tmp_path / "e").write_text("not json\n")
    (tmp_path / "d").write_text("")
    (tmp_path / "k").write_text("nonsense\n")
    assert cli.main(["verify", "--events", str(tmp_path / "e"), "--digests",
                     str(tmp_path / "d"), "--public-key", str(tmp_path / "k")]) == 2  # fmt: skip
    assert "name+hash+base64" in capsys.readouterr().err
    assert cli.main(["verify", "--events", str(tmp_path / "e")]) == 2
    assert "--public-key" in capsys.readouterr().err


def test_rows_the_writer_path_stores_use_pg8000_types(db):
    """The leaf is computed from PostgreSQL's text, never from driver values."""
    conn = pg8000.native.Connection(**db.pg_connect_kwargs)
    try:
        store.ensure_schema(conn)
        store.insert_events(conn, [_row(1, details=None, reason="línea\nnueva")])
        line = conn.run(f"SELECT {query._JSON_LINE} FROM audit_events")[0][0]
    finally:
        conn.close()
    row = json.loads(line)
    assert row["details"] is None and row["reason"] == "línea\nnueva"
    assert row["ingested_at"].endswith("Z") and len(row["ingested_at"]) == 27
    assert integrity.leaf_hash(line) == integrity.leaf_hash(row)


# --------------------------------------------------------------------------- evidence


def _verifier(s) -> str:
    return str(
        integrity.Signer.from_file(s.integrity_origin, s.integrity_signing_key_file).verifier
    )


def _investigator(monkeypatch, s, verifier: str) -> None:
    """An investigator's environment: read access and the published verifier key only."""
    _env(monkeypatch, s)
    monkeypatch.delenv("INTEGRITY_SIGNING_KEY_FILE")
    monkeypatch.setenv("INTEGRITY_VERIFIER_KEYS", verifier)


def _bundle(monkeypatch, capsys, s, path, actor="officer-1") -> None:
    since, until = (NOW - timedelta(days=1)).isoformat(), NOW.isoformat()
    assert cli.main(["evidence", "--actor-id", actor, "--from", since, "--to", until,
                     "-o", str(path)]) == 0, capsys.readouterr().err  # fmt: skip


def test_an_evidence_bundle_verifies_and_fails_once_an_event_is_edited(
    db, monkeypatch, capsys, tmp_path
):
    import zipfile

    rows = _fill(db)
    _seal(db, through=NOW)
    verifier = _verifier(db)
    _investigator(monkeypatch, db, verifier)
    bundle = tmp_path / "bundle.zip"
    _bundle(monkeypatch, capsys, db, bundle)
    selected = [r for r in rows if r.actor_id == "officer-1"]
    assert f"{len(selected)} event(s)" in capsys.readouterr().out
    assert cli.main(["verify", "--bundle", str(bundle)]) == 0  # INTEGRITY_VERIFIER_KEYS
    assert capsys.readouterr().out.startswith(f"OK: {len(selected)} event(s) proven included")
    with zipfile.ZipFile(bundle) as z:
        files = {n: z.read(n).decode() for n in z.namelist()}
    assert set(files) == {"events.jsonl", "proofs.jsonl", "digests.jsonl", "public-key.txt",
                          "README.txt"}  # fmt: skip
    assert "officer-1" in files["README.txt"]
    assert files["public-key.txt"] == verifier + "\n"

    lines = files["events.jsonl"].splitlines()
    target = json.loads(lines[3])
    target["reason"] = "inserted later"
    lines[3] = json.dumps(target)
    files["events.jsonl"] = "\n".join(lines) + "\n"
    edited = tmp_path / "edited.zip"
    with zipfile.ZipFile(edited, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    assert cli.main(["verify", "--bundle", str(edited)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: hour ") and target["id"] in out and "was changed" in out
    # The bundle spans several hours, each proven in its own tree.
    assert len({json.loads(x)["hour"] for x in files["proofs.jsonl"].splitlines()}) == 3


def test_a_bundle_is_never_checked_against_its_own_key(
    db, key_files, monkeypatch, capsys, tmp_path, settings, postgres_server, base_settings
):
    """A forger seals forged rows with a key of their own and ships it in the bundle: with no
    trusted key `verify` refuses (exit 2) instead of saying OK, and against the deployment's
    key the forgery fails, naming the bundle's own key as untrusted."""
    _fill(db)
    _seal(db, through=NOW)
    real = _verifier(db)
    # The forger's trail: same origin, rows that say what they like, their own sealing key.
    name = f"s_{uuid.uuid4().hex[:12]}"
    forger = db.model_copy(update={
        "database_url": _new_database(base_settings, postgres_server, name),
        "integrity_signing_key_file": key_files[1], "kafka_digests_topic": f"t.{name}.digests",
    })  # fmt: skip
    ensure_topics(forger)
    _fill(forger)
    _seal(forger, through=NOW)
    forged = tmp_path / "forged.zip"
    _investigator(monkeypatch, forger, _verifier(forger))
    _bundle(monkeypatch, capsys, forger, forged)
    capsys.readouterr()

    monkeypatch.delenv("INTEGRITY_VERIFIER_KEYS")
    assert cli.main(["verify", "--bundle", str(forged)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "no trusted verifier key" in err and "public-key.txt proves nothing" in err

    (tmp_path / "real.pub").write_text(real + "\n")
    assert cli.main(["verify", "--bundle", str(forged), "--public-key",
                     str(tmp_path / "real.pub")]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("FAILED: hour ") and "digest signature" in out
    assert f"bundle names its own key {_verifier(forger)}" in out
    monkeypatch.setenv("INTEGRITY_VERIFIER_KEYS", real)  # the setting trusts the same way
    assert cli.main(["verify", "--bundle", str(forged)]) == 1


def test_evidence_and_the_public_key_need_only_the_verifier_key(db, monkeypatch, capsys, tmp_path):
    """No INTEGRITY_SIGNING_KEY_FILE anywhere: an investigator has read access and the key."""
    _fill(db)
    _seal(db, through=NOW)
    verifier = _verifier(db)
    _investigator(monkeypatch, db, verifier)
    assert cli.main(["integrity", "public-key"]) == 0
    assert capsys.readouterr().out == verifier + "\n"
    bundle = tmp_path / "bundle.zip"
    _bundle(monkeypatch, capsys, db, bundle)
    assert capsys.readouterr().out.startswith(f"wrote {bundle}")
    assert cli.main(["verify", "--bundle", str(bundle)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    # With neither key, both say what to set.
    monkeypatch.delenv("INTEGRITY_VERIFIER_KEYS")
    assert cli.main(["integrity", "public-key"]) == 2
    assert "INTEGRITY_VERIFIER_KEYS" in capsys.readouterr().err
    since, until = (NOW - timedelta(days=1)).isoformat(), NOW.isoformat()
    assert cli.main(["evidence", "--actor-id", "officer-1", "--from", since, "--to", until,
                     "-o", str(tmp_path / "b2.zip")]) == 2  # fmt: skip
    assert "INTEGRITY_VERIFIER_KEYS" in capsys.readouterr().err
    # A key that did not sign the digests: no bundle that could not be checked.
    other = integrity.Signer("audit.test.openg2p.org/sealing",
                             integrity.Ed25519PrivateKey.generate()).verifier  # fmt: skip
    monkeypatch.setenv("INTEGRITY_VERIFIER_KEYS", str(other))
    assert cli.main(["evidence", "--actor-id", "officer-1", "--from", since, "--to", until,
                     "-o", str(tmp_path / "b3.zip")]) == 1  # fmt: skip
    assert "does not verify with the given verifier keys" in capsys.readouterr().err
    assert not (tmp_path / "b3.zip").exists()


def test_a_key_printed_under_another_origin_is_named_as_such(db, monkeypatch, capsys, tmp_path):
    """The sealing key's material, printed with a wrong INTEGRITY_ORIGIN: the verifier says
    that the material matches and the name does not, and what the name should be."""
    _fill(db)
    _seal(db, through=NOW)
    events, digests, pub = _files(monkeypatch, capsys, db, tmp_path)
    monkeypatch.setenv("INTEGRITY_ORIGIN", "audit.example.org")
    assert cli.main(["integrity", "public-key"]) == 0
    pub.write_text(capsys.readouterr().out)
    code, out = _verify(capsys, events, digests, pub)
    assert code == 1
    assert "same key material but the name 'audit.example.org'" in out, out
    assert "INTEGRITY_ORIGIN=audit.test.openg2p.org/sealing" in out


def test_the_digests_topic_keeps_everything(db):
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=db.bootstrap_servers)
    try:
        result = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, db.kafka_digests_topic)]
        )
        [partitions] = [len(t["partitions"]) for t in admin.describe_topics(
            [db.kafka_digests_topic])]  # fmt: skip
    finally:
        admin.close()
    assert partitions == 1  # the chain is one ordered sequence
    configs = next(iter(next(iter(result.values())).values()))
    assert configs["cleanup.policy"]["value"] == "compact"
    assert configs["retention.ms"]["value"] == "-1"
