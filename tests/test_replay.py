"""The bulk path: a topic range from the real broker into the real table, without duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kafka import KafkaProducer

from attestation_support import record as encode
from function_server import settings_env
from openg2p_audit.replay import replay
from test_writer import make_event


def produce(settings, events, *, extra: list[tuple[bytes, bytes, list]] = ()) -> list:
    """Send events (binary mode, as ingest does) plus raw records; return their metadata."""
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", enable_idempotence=True
    )
    metas = []
    try:
        for event in events:
            rec = encode(event)
            fut = producer.send(
                settings.kafka_events_topic, key=rec.key, value=rec.value, headers=rec.headers
            )
            metas.append(fut.get(timeout=30))
        for key, value, headers in extra:
            fut = producer.send(settings.kafka_events_topic, key=key, value=value, headers=headers)
            metas.append(fut.get(timeout=30))
    finally:
        producer.close()
    return metas


def count(pg) -> int:
    return pg.run("SELECT count(*) FROM audit_events")[0][0]


def test_replay_stores_a_topic_range_once(topics, pg):
    events = [make_event(subject=f"beneficiary/{i % 7}") for i in range(300)]
    legacy = make_event(source="legacy/odoo")
    structured = json.dumps({**legacy.attributes(), "data": legacy.data_json()}).encode()
    produce(
        topics,
        events + events[:50],  # the first 50 were produced twice (a producer retry, say)
        extra=[
            (b"legacy", structured, [("content-type", b"application/json")]),
            (b"junk", b"not an event", []),
            (b"nul", *_binary_with_nul()),
            (b"untimed", *_structured_without_time()),
        ],
    )
    rejected = []
    summary = replay(topics, batch_size=64, workers=2, on_reject=rejected.append)

    assert summary.records == 300 + 50 + 4
    assert (summary.inserted, summary.duplicates, summary.rejected) == (300, 50, 4)
    # Only ingest's own records are stored: a legacy producer's structured record, junk and
    # a structured event are not ingest's (no binary-mode attestation); a record whose data
    # was changed after ingest attested it does not verify.
    assert sorted(r.reason for r in rejected) == [
        "not_attested", "not_binary", "not_binary", "not_binary",
    ]  # fmt: skip
    assert count(pg) == 300
    ids = {r[0] for r in pg.run("SELECT id FROM audit_events")}
    assert ids == {e.id for e in events}

    again = replay(topics, batch_size=1000)
    assert (again.inserted, again.duplicates) == (0, 350)
    assert count(pg) == 300


def _structured_without_time() -> tuple[bytes, list]:
    event = make_event()
    attrs = {k: v for k, v in event.attributes().items() if k != "time"}
    body = json.dumps({**attrs, "data": event.data_json()}).encode()
    return body, [("content-type", b"application/cloudevents+json")]


def _binary_with_nul() -> tuple[bytes, list]:
    rec = encode(make_event())
    value = json.loads(rec.value)
    value["context"] = {"x": "a\u0000b"}
    return json.dumps(value).encode(), rec.headers


def test_replay_from_offset_and_time_ranges(settings, pg, tmp_path):
    """A fresh topic and table: the range options pick exactly the records in range."""
    s = settings.model_copy(
        update={
            "kafka_events_topic": settings.kafka_events_topic + ".ranges",
            "kafka_topic_partitions": 1,
        }
    )
    from openg2p_audit.topics import ensure_topics

    ensure_topics(s)
    pg.run("TRUNCATE audit_events")
    first = [make_event() for _ in range(10)]
    produce(s, first)
    time.sleep(0.05)
    boundary = datetime.now(UTC)
    time.sleep(0.05)
    second = [make_event() for _ in range(10)]
    produce(s, second)

    summary = replay(s, from_offset=3, to_offset=7)
    assert summary.ranges == {0: (3, 7)}
    assert {r[0] for r in pg.run("SELECT id FROM audit_events")} == {e.id for e in first[3:7]}

    summary = replay(s, from_time=boundary)
    assert summary.ranges == {0: (10, 20)}
    stored = {r[0] for r in pg.run("SELECT id FROM audit_events")}
    assert stored == {e.id for e in first[3:7] + second}

    # Through the command line, as an operator runs it: the rest, before the boundary.
    out = subprocess.run(
        [str(Path(sys.executable).parent / "openg2p-audit"), "replay",
         "--to-time", boundary.isoformat(), "--batch-size", "4"],
        env={**settings_env(s), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ranges"] == {"0": [0, 10]}
    assert (report["records"], report["inserted"], report["duplicates"]) == (10, 6, 4)
    assert pg.run("SELECT count(*) FROM audit_events") == [[20]]

    # A range in the future holds nothing and ends at once.
    empty = replay(s, from_time=datetime.now(UTC) + timedelta(days=1))
    assert (empty.records, empty.ranges) == (0, {0: (20, 20)})


def test_replay_keeps_extensions_and_invents_no_partitionkey(topics, pg):
    """Replay stores what the writer stores: every extension, and only those the emitter sent."""
    sent = make_event(subject="beneficiary/9", tenantid="t_1", note='José 50% "q"')
    keyed = make_event(subject="beneficiary/9", partitionkey="household/3")
    produce(topics, [sent, keyed])  # both have the record key "beneficiary/9"
    replay(topics, batch_size=64)
    got = dict(
        pg.run("SELECT id, details FROM audit_events WHERE id = ANY(:ids)", ids=[sent.id, keyed.id])
    )
    assert got[sent.id] == {"extensions": {"tenantid": "t_1", "note": 'José 50% "q"'}}
    assert got[keyed.id] == {"extensions": {"partitionkey": "household/3"}}
