"""Hourly maintenance against the real broker and the real table: partitions, retention, redrive."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import pg8000.native
import pytest
from cloudevents.http import CloudEvent
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from attestation_support import record as encode
from function_server import request, settings_env
from openg2p_audit import store
from openg2p_audit.devservices import LocalFunction
from openg2p_audit.maintenance import (
    RUN_LOCK,
    MaintenanceError,
    handle_ping,
    redrive,
    run_maintenance,
    upkeep,
)
from test_writer import make_event

WRITER_URL = "http://audit-writer.openg2p.svc.cluster.local"


# --------------------------------------------------------------------------- helpers


def partitions(pg) -> list[str]:
    """Partition names attached to audit_events, straight from pg_inherits."""
    rows = pg.run(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass('audit_events') ORDER BY 1"
    )
    return [r[0] for r in rows]


def table_exists(pg, name: str) -> bool:
    return pg.run("SELECT count(*) FROM pg_class WHERE relname = :n", n=name)[0][0] == 1


def fresh_table(pg) -> None:
    """No table at all: the next upkeep starts from an empty database."""
    pg.run("DROP TABLE IF EXISTS audit_events CASCADE")
    store.forget_partitions(pg)


def add_month(pg, year: int, month: int) -> str:
    store.ensure_schema(pg)
    store.forget_partitions(pg, [date(year, month, 1)])
    store.ensure_partition(pg, date(year, month, 1))
    return store.partition_name(date(year, month, 1))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def with_dlq(settings, partitions: int = 1):
    """Settings with a dead-letter topic and redrive group of their own, the topic created."""
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={
            "kafka_dlq_topic": f"{settings.kafka_dlq_topic}.{tag}",
            "kafka_redrive_group": f"{settings.kafka_consumer_group}.redrive.{tag}",
        }
    )
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(s.kafka_dlq_topic, partitions, 1)])
    finally:
        admin.close()
    return s


def dead_letter(event, code: str | None, body: dict | None = None):
    """A record as a KafkaSink dead-letter sink writes it: binary mode plus knativeerror*."""
    rec = encode(event)
    headers = list(rec.headers)
    if code is not None:
        headers.append(("ce_knativeerrorcode", code.encode()))
    headers.append(("ce_knativeerrordest", WRITER_URL.encode()))
    if body is not None:
        headers.append(("ce_knativeerrordata", base64.b64encode(json.dumps(body).encode())))
    return rec.key, rec.value, headers


def forged_dead_letter(event, code: str | None):
    """What an attacker posts to the dead-letter sink: the record ingest would make, but
    attested with a key of the attacker's own (and, for good measure, any error code)."""
    from openg2p_audit.attestation import Attestor
    from openg2p_audit.kafka_binding import encode as encode_with

    rec = encode_with(event, Attestor(b"mallory" * 8))
    headers = list(rec.headers)
    if code is not None:
        headers.append(("ce_knativeerrorcode", code.encode()))
    return rec.key, rec.value, headers


def produce_dlq(settings, records, partition: int | None = None) -> None:
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", enable_idempotence=True
    )
    try:
        for key, value, headers in records:
            producer.send(
                settings.kafka_dlq_topic, key=key, value=value, headers=headers,
                partition=partition,
            ).get(timeout=30)  # fmt: skip
    finally:
        producer.close()


def committed_offsets(settings) -> dict[int, int | None]:
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.kafka_redrive_group,
        enable_auto_commit=False,
    )
    try:
        parts = consumer.partitions_for_topic(settings.kafka_dlq_topic) or set()
        return {
            p: consumer.committed(TopicPartition(settings.kafka_dlq_topic, p))
            for p in sorted(parts)
        }
    finally:
        consumer.close(autocommit=False)


def stored_ids(pg, ids) -> list[str]:
    rows = pg.run("SELECT id FROM audit_events WHERE id = ANY(:ids) ORDER BY id", ids=list(ids))
    return [r[0] for r in rows]


def invalid_event_body(event_id: str) -> dict:
    """What the writer answers (and the dead-letter sink keeps) for a contract violation."""
    return {"error": "invalid_event", "message": "the event violates the contract", "id": event_id}


# --------------------------------------------------------------------------- partitions ahead


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # The last instant of January, in UTC: January is still current.
        ("2026-01-31T23:59:59.999Z", ["2026_01", "2026_02", "2026_03"]),
        # 01:00 on 1 February in UTC+2 is still 31 January in UTC.
        ("2026-02-01T01:00:00+02:00", ["2026_01", "2026_02", "2026_03"]),
        # The end of the year: the next months are in the next year.
        ("2026-12-31T23:59:59Z", ["2026_12", "2027_01", "2027_02"]),
        ("2027-01-01T00:00:00Z", ["2027_01", "2027_02", "2027_03"]),
    ],
)
def test_partitions_ahead_at_month_and_year_ends(settings, pg, now, expected):
    fresh_table(pg)
    summary = upkeep(settings, pg, now=at(now))
    names = [f"audit_events_{m}" for m in expected]
    assert summary.created == names
    assert summary.dropped == []
    assert summary.kept == names
    assert partitions(pg) == names
    assert sorted(store.list_partitions(pg).values()) == names


def test_partitions_ahead_follow_the_setting(settings, pg):
    fresh_table(pg)
    s = settings.model_copy(update={"partitions_ahead_months": 14})
    summary = upkeep(s, pg, now=at("2026-11-15T08:00:00Z"))
    assert len(summary.created) == 14
    assert summary.created[0] == "audit_events_2026_11"
    assert summary.created[-1] == "audit_events_2027_12"
    assert len(partitions(pg)) == 14


def test_upkeep_is_idempotent(settings, pg):
    fresh_table(pg)
    now = at("2026-12-31T23:59:59Z")
    first = upkeep(settings, pg, now=now)
    second = upkeep(settings, pg, now=now)
    assert len(first.created) == 3
    assert (second.created, second.dropped) == ([], [])
    assert second.kept == first.kept == partitions(pg)


def test_a_partition_dropped_behind_the_process_is_recreated(settings, pg):
    """The store's per-process cache must not hide a missing month from maintenance."""
    fresh_table(pg)
    now = at("2026-05-10T00:00:00Z")
    upkeep(settings, pg, now=now)
    pg.run("DROP TABLE audit_events_2026_06")
    summary = upkeep(settings, pg, now=now)
    assert summary.created == ["audit_events_2026_06"]
    assert "audit_events_2026_06" in partitions(pg)


# --------------------------------------------------------------------------- retention


def test_retention_drops_only_partitions_wholly_before_the_cutoff(settings, pg):
    fresh_table(pg)
    store.ensure_schema(pg)
    for year, month in [(2024, 12), (2025, 4), (2025, 5), (2025, 6), (2025, 7)]:
        add_month(pg, year, month)
    # Tables the maintenance must never drop: a default partition, and a partition whose
    # name is not a month's (both attached, both with an old range or none).
    pg.run("CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT")
    pg.run(
        "CREATE TABLE audit_events_archive_2019 PARTITION OF audit_events"
        " FOR VALUES FROM ('2019-01-01 00:00+00') TO ('2019-02-01 00:00+00')"
    )
    old = make_event(time="2025-05-31T23:59:59.999999Z")
    boundary = make_event(time="2025-06-01T00:00:00Z")
    later = make_event(time="2025-07-15T12:00:00Z")
    store.insert_events(pg, [old, boundary, later])

    # Retention 12 on 15 June 2026: the cutoff is 1 June 2025. May 2025 ends exactly at the
    # cutoff and goes; June 2025 starts exactly at the cutoff and stays.
    s = settings.model_copy(update={"retention_months": 12})
    summary = upkeep(s, pg, now=at("2026-06-15T10:00:00Z"))

    assert summary.cutoff == "2025-06-01T00:00:00+00:00"
    assert summary.dropped == [
        "audit_events_2024_12",
        "audit_events_2025_04",
        "audit_events_2025_05",
    ]
    assert summary.created == [
        "audit_events_2026_06",
        "audit_events_2026_07",
        "audit_events_2026_08",
    ]
    assert summary.kept == [
        "audit_events_2025_06",
        "audit_events_2025_07",
        "audit_events_2026_06",
        "audit_events_2026_07",
        "audit_events_2026_08",
    ]
    # Only monthly partitions are reported; the others are left as they are.
    assert partitions(pg) == [*summary.kept, "audit_events_archive_2019", "audit_events_default"]
    for name in summary.dropped:
        assert not table_exists(pg, name)  # DROP TABLE, not an emptied or detached table
    assert table_exists(pg, "audit_events_default")
    assert stored_ids(pg, [old.id, boundary.id, later.id]) == sorted([boundary.id, later.id])

    # Nothing left to drop the second time.
    again = upkeep(s, pg, now=at("2026-06-15T11:00:00Z"))
    assert (again.created, again.dropped) == ([], [])


def test_retention_zero_drops_nothing(settings, pg):
    fresh_table(pg)
    store.ensure_schema(pg)
    for year in (2000, 2010, 2020):
        add_month(pg, year, 1)
    s = settings.model_copy(update={"retention_months": 0})
    summary = upkeep(s, pg, now=at("2026-06-15T10:00:00Z"))
    assert summary.cutoff is None
    assert summary.dropped == []
    assert {"audit_events_2000_01", "audit_events_2010_01", "audit_events_2020_01"} <= set(
        partitions(pg)
    )


def test_default_retention_keeps_seven_years(settings, pg):
    fresh_table(pg)
    store.ensure_schema(pg)
    add_month(pg, 2019, 5)  # ends 2019-06-01: exactly 84 months before June 2026
    add_month(pg, 2019, 6)  # starts at the cutoff
    summary = upkeep(settings, pg, now=at("2026-06-01T00:00:00Z"))
    assert summary.dropped == ["audit_events_2019_05"]
    assert "audit_events_2019_06" in partitions(pg)


# --------------------------------------------------------------------------- runs and locks


def test_concurrent_runs_both_succeed(settings, pg):
    fresh_table(pg)
    s = settings.model_copy(update={"retention_months": 1})
    store.ensure_schema(pg)
    add_month(pg, 2026, 1)  # expired on 15 March with a one-month retention
    now = at("2026-03-15T00:00:00Z")
    results, errors = [], []
    gate = threading.Barrier(4)

    def run():
        try:
            gate.wait()
            results.append(run_maintenance(s, now=now, redrive_dlq=False))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 4
    assert {r.status for r in results} <= {"ok", "skipped"}
    created = sorted(n for r in results for n in r.created)
    dropped = sorted(n for r in results for n in r.dropped)
    assert created == ["audit_events_2026_03", "audit_events_2026_04", "audit_events_2026_05"]
    assert dropped == ["audit_events_2026_01"]
    assert partitions(pg) == created


def test_a_run_overlapping_another_reports_skipped(settings, pg):
    fresh_table(pg)
    holder = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        assert store.try_advisory_lock(holder, RUN_LOCK)
        summary = run_maintenance(settings, redrive_dlq=False, lock_wait=0.3)
        assert (summary.status, summary.skipped) == ("skipped", "another run holds the lock")
        assert summary.created == []
        assert partitions(pg) == []
    finally:
        holder.close()  # a closed session releases its advisory locks
    summary = run_maintenance(settings, redrive_dlq=False)
    assert summary.status == "ok"
    assert len(summary.created) == settings.partitions_ahead_months


def test_unreachable_database_fails_the_run(settings, monkeypatch):
    from openg2p_audit.devservices._process import free_port

    down = settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/none"}
    )
    for name, value in settings_env(down).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MaintenanceError, match="database unavailable"):
        handle_ping(ping())


# --------------------------------------------------------------------------- dead letters


def test_redrive_stores_attested_dead_letters_whatever_their_code_and_leaves_the_rest(settings, pg):
    """The rule: a dead letter is stored only if ingest's attestation verifies; its
    knativeerror* extensions (anyone who can write to the topic can write them) decide
    nothing, so a 503, a 401 of a misconfigured writer and no code at all (Knative's
    OIDC feature off: the dispatcher failed before sending) are stored alike."""
    s = with_dlq(settings, partitions=2)
    store.ensure_schema(pg)
    unavailable = make_event()  # the writer answered 503
    timed_out = make_event(time="2026-02-28T23:59:59Z")  # no answer at all: no code
    throttled = make_event()  # 429, but its row is stored already
    refused = make_event()  # 401 from a writer with the wrong token settings: stored
    forged = make_event()  # no code (as if transient), but not attested by ingest: stays
    unprocessable = make_event()  # attested, but altered on the way: stays
    store.insert_events(pg, [throttled])
    broken = dead_letter(make_event(), "503")
    broken_id = make_event().id
    broken = (  # transient-coded, attested, but its data breaks the contract: stays
        broken[0],
        json.dumps({"action": "login"}).encode(),
        [(k, broken_id.encode() if k == "ce_id" else v) for k, v in broken[2]],
    )
    altered = dead_letter(unprocessable, "422", invalid_event_body(unprocessable.id))
    altered = (altered[0], altered[1].replace(b"login", b"logout"), altered[2])
    produce_dlq(
        s,
        [
            dead_letter(unavailable, "503", {"error": "database_unavailable"}),
            dead_letter(timed_out, None),
            dead_letter(throttled, "429"),
            dead_letter(refused, "401", {"error": "unauthorized"}),
            forged_dead_letter(forged, None),
            altered,
            broken,
        ],
        partition=0,
    )
    produce_dlq(s, [dead_letter(unavailable, "503")], partition=1)  # redriven twice over

    summary = redrive(s, pg)

    assert summary.error is None
    assert summary.dlq_seen == 8
    assert (summary.redriven, summary.inserted, summary.duplicates) == (5, 3, 2)
    assert summary.dlq_permanent_seen == 3
    report = {p["id"]: (p["code"], p["reason"]) for p in summary.permanent}
    assert report == {
        forged.id: (None, "not_attested"),
        unprocessable.id: ("422", "not_attested"),
        broken_id: ("503", "not_attested"),
    }
    assert summary.committed == {0: 7, 1: 1}
    assert summary.remaining == 0
    assert committed_offsets(s) == {0: 7, 1: 1}
    ids = [unavailable.id, timed_out.id, throttled.id, refused.id, forged.id,
           unprocessable.id, broken_id]  # fmt: skip
    assert stored_ids(pg, ids) == sorted([unavailable.id, timed_out.id, throttled.id, refused.id])
    assert pg.run("SELECT count(*) FROM audit_events WHERE id = :i", i=unavailable.id) == [[1]]
    row = pg.run("SELECT occurred_at FROM audit_events WHERE id = :i", i=timed_out.id)
    assert row == [[datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)]]

    # The next run finds nothing new: nothing redriven, nothing re-counted as permanent.
    again = redrive(s, pg)
    assert (again.dlq_seen, again.redriven, again.dlq_permanent_seen) == (0, 0, 0)
    assert again.permanent == []

    # A later dead letter is the only one the run after that handles.
    late = make_event()
    produce_dlq(s, [dead_letter(late, "502")], partition=1)
    third = redrive(s, pg)
    assert (third.dlq_seen, third.redriven, third.inserted) == (1, 1, 1)
    assert stored_ids(pg, [late.id]) == [late.id]
    assert committed_offsets(s) == {0: 7, 1: 2}


def test_redrive_commits_nothing_while_the_database_is_down(settings, pg):
    s = with_dlq(settings)
    store.ensure_schema(pg)
    event, refused = make_event(), make_event()
    produce_dlq(s, [dead_letter(event, "503"), forged_dead_letter(refused, "403")])
    gone = store.connect(s)
    gone.close()  # a connection the database no longer answers on
    summary = redrive(s, gone)
    assert summary.error and "database unavailable" in summary.error
    assert (summary.redriven, summary.dlq_permanent_seen) == (0, 0)
    assert committed_offsets(s) == {0: None}
    assert stored_ids(pg, [event.id]) == []

    # The next run handles both records, each once.
    summary = redrive(s, pg)
    assert (summary.error, summary.dlq_seen, summary.inserted) == (None, 2, 1)
    assert [(p["id"], p["code"]) for p in summary.permanent] == [(refused.id, "403")]
    assert committed_offsets(s) == {0: 2}


def test_unreachable_broker_is_reported_after_the_partitions_are_done(settings, pg):
    from openg2p_audit.devservices._process import free_port

    fresh_table(pg)
    s = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    summary = run_maintenance(s)
    assert summary.status == "error"
    assert "dead-letter topic unavailable" in summary.error
    assert len(summary.created) == 3
    assert partitions(pg) == summary.created


def test_redrive_is_bounded_and_resumes(settings, pg):
    s = with_dlq(settings).model_copy(update={"redrive_max_records": 3})
    events = [make_event() for _ in range(7)]
    produce_dlq(s, [dead_letter(e, "503") for e in events])
    first = redrive(s, pg)
    assert (first.dlq_seen, first.inserted, first.remaining) == (3, 3, 4)
    assert committed_offsets(s) == {0: 3}
    second = redrive(s, pg)
    third = redrive(s, pg)
    assert (second.dlq_seen, third.dlq_seen, third.remaining) == (3, 1, 0)
    assert stored_ids(pg, [e.id for e in events]) == sorted(e.id for e in events)


def test_redrive_never_stores_a_wrapped_record(settings, pg):
    """A record without ce_ headers, wrapped by the KafkaSource as dev.knative.kafka.event,
    was not produced by ingest: even holding a whole structured event, it stays."""
    s = with_dlq(settings)
    legacy = make_event(source="legacy/odoo")
    original = json.dumps({**legacy.attributes(), "data": legacy.data_json()}).encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"partition:0/offset:17"),
        ("ce_source", b"/apis/v1/namespaces/openg2p/kafkasources/audit-events#events"),
        ("ce_type", b"dev.knative.kafka.event"),
        ("ce_time", b"2026-04-01T12:00:00.000Z"),
        ("ce_knativeerrorcode", b"422"),
        ("content-type", b"application/json"),
    ]
    produce_dlq(s, [(b"legacy", original, headers)])
    summary = redrive(s, pg)
    assert (summary.redriven, summary.inserted, summary.dlq_permanent_seen) == (0, 0, 1)
    assert [p["reason"] for p in summary.permanent] == ["not_attested"]
    assert stored_ids(pg, [legacy.id, "partition:0/offset:17"]) == []


def test_redrive_never_reads_an_envelope_from_a_structured_dead_letter(settings, pg):
    """The dead-letter sinks write binary mode; a structured record (its envelope is data
    of the record, anyone's to write) is left, counted."""
    s = with_dlq(settings)
    retry, refused = make_event(), make_event()

    def structured(event, code):
        envelope = {**event.attributes(), "data": event.data_json(), "knativeerrorcode": code}
        return (
            b"k",
            json.dumps(envelope).encode(),
            [("content-type", b"application/cloudevents+json; charset=utf-8")],
        )

    produce_dlq(s, [structured(retry, "500"), structured(refused, "413")])
    summary = redrive(s, pg)
    assert (summary.redriven, summary.inserted, summary.dlq_permanent_seen) == (0, 0, 2)
    assert [(p["id"], p["code"], p["reason"]) for p in summary.permanent] == [
        (retry.id, "500", "not_binary"),
        (refused.id, "413", "not_binary"),
    ]
    assert stored_ids(pg, [retry.id, refused.id]) == []


def test_the_triggers_dead_letters_are_counted_and_never_stored(settings, pg):
    """Broker events that ingest refused (or never received) never passed its checks."""
    s = with_dlq(settings)
    admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    s = s.model_copy(update={"kafka_broker_dlq_topic": s.kafka_dlq_topic + ".broker"})
    try:
        admin.create_topics([NewTopic(s.kafka_broker_dlq_topic, 1, 1)])
    finally:
        admin.close()
    event = make_event()
    rec = dead_letter(event, "403", {"error": "forbidden"})
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
    try:
        producer.send(s.kafka_broker_dlq_topic, key=rec[0], value=rec[1], headers=rec[2]).get(30)
    finally:
        producer.close()
    summary = redrive(s, pg, broker=True)
    assert (summary.dlq_seen, summary.redriven, summary.dlq_permanent_seen) == (1, 0, 1)
    [sample] = summary.permanent
    assert (sample["id"], sample["code"], sample["reason"]) == (
        event.id,
        "403",
        "broker_dead_letter",
    )
    assert "forbidden" in sample["message"]
    assert stored_ids(pg, [event.id]) == []


def test_the_dead_letters_left_for_an_operator_are_listed(settings, pg):
    s = with_dlq(settings)
    genuine, forged = make_event(), make_event()
    produce_dlq(s, [dead_letter(genuine, "503"), forged_dead_letter(forged, None)])
    exe = str(Path(sys.executable).parent / "openg2p-audit")
    env = {**settings_env(s), "PATH": "/usr/bin:/bin"}

    def listed(*args: str) -> list[dict]:
        out = subprocess.run([exe, "dead-letters", *args], env=env, capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    left = listed()
    assert [(e["id"], e["disposition"], e["reason"]) for e in left] == [
        (forged.id, "left", "not_attested")
    ]
    every = listed("--all")
    assert {(e["id"], e["disposition"]) for e in every} == {
        (genuine.id, "redriven"), (forged.id, "left"),
    }  # fmt: skip
    assert stored_ids(pg, [genuine.id, forged.id]) == []  # listing stores nothing


# --------------------------------------------------------------------------- dry run


def test_dry_run_changes_nothing(settings, pg):
    s = with_dlq(settings).model_copy(update={"retention_months": 6})
    fresh_table(pg)
    store.ensure_schema(pg)
    add_month(pg, 2025, 1)
    before = partitions(pg)
    transient, permanent = make_event(), make_event()
    produce_dlq(s, [dead_letter(transient, "503"), forged_dead_letter(permanent, "400")])

    summary = run_maintenance(s, now=at("2026-04-02T00:00:00Z"), dry_run=True)

    assert summary.dry_run and summary.status == "ok"
    assert summary.created == [
        "audit_events_2026_04",
        "audit_events_2026_05",
        "audit_events_2026_06",
    ]
    assert summary.dropped == ["audit_events_2025_01"]
    assert (summary.redrive.dlq_seen, summary.redrive.redriven) == (2, 1)
    assert summary.redrive.dlq_permanent_seen == 1
    assert partitions(pg) == before
    assert committed_offsets(s) == {0: None}
    assert stored_ids(pg, [transient.id, permanent.id]) == []

    # The real run then does what the dry run said.
    real = run_maintenance(s, now=at("2026-04-02T00:00:00Z"))
    assert (real.created, real.dropped) == (summary.created, summary.dropped)
    assert (real.redrive.redriven, real.redrive.dlq_permanent_seen) == (1, 1)
    assert stored_ids(pg, [transient.id, permanent.id]) == [transient.id]


def test_dry_run_on_an_empty_database_creates_no_table(settings, pg):
    fresh_table(pg)
    summary = run_maintenance(settings, dry_run=True, redrive_dlq=False)
    assert len(summary.created) == settings.partitions_ahead_months
    assert pg.run("SELECT to_regclass('audit_events') IS NULL") == [[True]]


# --------------------------------------------------------------------------- the function


def ping() -> CloudEvent:
    return CloudEvent(
        {
            "type": "dev.knative.sources.ping",
            "source": "/apis/v1/namespaces/openg2p/pingsources/audit-maintenance",
            "time": "2001-01-01T00:00:00Z",  # a stale ping must not move the clock
        },
        {"purpose": "hourly maintenance"},
    )


def test_maintain_in_process(settings, pg, monkeypatch):
    s = with_dlq(settings)
    for name, value in settings_env(s).items():
        monkeypatch.setenv(name, value)
    fresh_table(pg)
    event = make_event()
    produce_dlq(s, [dead_letter(event, "504")])
    report = handle_ping(ping())
    assert report["status"] == "ok"
    current = store.month_of(datetime.now(UTC))
    expected = [store.partition_name(store.add_months(current, i)) for i in range(3)]
    assert report["created"] == expected
    # The redriven event's month (April 2026) was created on demand by the insert.
    assert partitions(pg) == sorted({*expected, "audit_events_2026_04"})
    assert report["redrive"]["inserted"] == 1
    assert stored_ids(pg, [event.id]) == [event.id]
    assert report["duration_ms"] >= 0
    json.dumps(report)  # the summary is plain JSON


def test_maintain_through_functions_framework(settings, pg, tmp_path):
    """The function as Knative serves it: functions-framework's ASGI mode, pinged over HTTP."""
    s = with_dlq(settings)
    fresh_table(pg)
    headers = {
        "ce-specversion": "1.0",
        "ce-id": str(uuid.uuid4()),
        "ce-source": "/apis/v1/namespaces/openg2p/pingsources/audit-maintenance",
        "ce-type": "dev.knative.sources.ping",
        "ce-time": "2026-11-28T09:00:00Z",
        "Content-Type": "application/json",
    }
    body = b'{"purpose":"hourly maintenance"}'
    with LocalFunction("maintenance", "maintain", s, tmp_path) as fn:
        status, report, _ = request(fn.url, "POST", "/", body, headers)
        assert status == 200, report
        assert report["status"] == "ok"
        current = store.month_of(datetime.now(UTC))
        assert store.partition_name(current) in partitions(pg)
        assert len(partitions(pg)) == 3

        status, text, _ = request(fn.url, "GET", "/metrics")
        assert status == 200
        assert 'audit_maintenance_runs_total{status="ok"}' in text
        assert request(fn.url, "GET", "/healthz")[0] == 200
        assert request(fn.url, "GET", "/readyz")[0] == 200
        status, answer, _ = request(fn.url, "POST", "/", b"{}", {"Content-Type": "text/plain"})
        assert (status, answer["error"]) == (400, "not_a_cloudevent")

    # A database that cannot be reached: 500, so the PingSource retries.
    from openg2p_audit.devservices._process import free_port

    down = s.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/none"}
    )
    with LocalFunction("maintenance", "maintain", down, tmp_path / "down") as fn:
        status, answer, _ = request(fn.url, "POST", "/", b"{}", headers)
        assert status == 500 and answer["error"] == "maintenance_failed"


# --------------------------------------------------------------------------- the command line


def test_upkeep_command(settings, pg):
    s = with_dlq(settings)
    fresh_table(pg)
    exe = str(Path(sys.executable).parent / "openg2p-audit")
    env = {**settings_env(s), "PATH": "/usr/bin:/bin"}

    def upkeep_cli(*args):
        out = subprocess.run(
            [exe, "upkeep", *args], env=env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        lines = out.stdout.strip().splitlines()
        return out.returncode, json.loads(lines[-1]) if lines else None, out.stderr

    event = make_event()
    produce_dlq(s, [dead_letter(event, "503")])
    code, dry, err = upkeep_cli("--dry-run", "--now", "2030-01-31T23:00:00Z")
    assert code == 0, err
    assert dry["dry_run"] is True
    assert dry["created"] == [
        "audit_events_2030_01",
        "audit_events_2030_02",
        "audit_events_2030_03",
    ]
    assert dry["redrive"]["redriven"] == 1
    assert pg.run("SELECT to_regclass('audit_events') IS NULL") == [[True]]

    code, _, err = upkeep_cli("--now", "2030-01-31T23:00:00Z")
    assert code == 2 and "--dry-run" in err

    code, report, err = upkeep_cli("--no-redrive")
    assert code == 0, err
    assert (report["status"], report["redrive"]) == ("ok", None)
    assert len(partitions(pg)) == 3
    assert committed_offsets(s) == {0: None}

    code, report, err = upkeep_cli()
    assert code == 0, err
    assert report["created"] == []
    assert (report["redrive"]["redriven"], report["redrive"]["inserted"]) == (1, 1)
    assert stored_ids(pg, [event.id]) == [event.id]
