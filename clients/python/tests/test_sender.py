"""AuditClient against a fake ingest over real HTTP: what each answer does to the events."""

from __future__ import annotations

import itertools
import json
import sqlite3
import time

import pytest

from openg2p_audit_client import (
    AuditClient,
    DeliveryFailed,
    EventRejected,
    InvalidEvent,
    OutboxFull,
)

from .fake_ingest import FakeIngest, event_args, free_port

BATCH = "application/cloudevents-batch+json"
STRUCTURED = "application/cloudevents+json"


def quick(url, outbox=None, **kw) -> AuditClient:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    kw.setdefault("prometheus", False)
    return AuditClient(url, "T", outbox, **kw)


def rows(path, table="outbox") -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY seq").fetchall()
    finally:
        db.close()


def test_emitted_events_go_out_in_batches_and_leave_the_outbox(ingest, outbox_path):
    with quick(ingest.url, outbox_path, max_batch_events=50, linger=0.2) as client:
        ids = [client.emit(**event_args(n)) for n in range(120)]
        assert client.flush(10)
        assert client.metrics()["outbox_events"] == 0
    sent = [i for r in ingest.requests for i in r.ids]
    assert sorted(sent) == sorted(ids)
    assert all(len(r.ids) <= 50 for r in ingest.requests)
    assert any(len(r.ids) > 1 for r in ingest.requests)
    multi = [r for r in ingest.requests if len(r.ids) > 1]
    assert all(r.headers["content-type"] == BATCH for r in multi)
    assert all(r.headers["authorization"] == "Bearer T" for r in ingest.requests)
    assert rows(outbox_path) == []


def test_emit_commits_before_it_returns(tmp_path):
    # Nothing listens: the event is only in the outbox, where another connection sees it.
    path = tmp_path / "q.db"
    client = quick(f"http://127.0.0.1:{free_port()}/", path)
    event_id = client.emit(**event_args())
    ((_seq, stored_id, body, *_),) = rows(path)
    assert stored_id == event_id and json.loads(body)["id"] == event_id
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert client.close(timeout=0.1) is False


def test_a_503_is_retried_with_the_same_bytes_after_retry_after(ingest, outbox_path):
    ingest.answers.append((503, {"error": "unavailable"}, {"Retry-After": "1"}))
    with quick(ingest.url, outbox_path) as client:
        event_id = client.emit(**event_args())
        assert client.flush(10)
    first, second = ingest.requests
    assert first.body == second.body and first.ids == [event_id]
    assert client.failed_attempts == 1 and client.sent == 1


def test_the_gap_after_a_503_is_retry_after(ingest, outbox_path):
    stamps: list[float] = []

    def unavailable(seen):
        stamps.append(time.monotonic())
        return 503, {"error": "unavailable"}, {"Retry-After": "1"}

    ingest.answers.extend([unavailable, unavailable])
    ingest.answers.append(lambda seen: (stamps.append(time.monotonic()), (202, {}, {}))[1])
    with quick(ingest.url, outbox_path) as client:
        client.emit(**event_args())
        assert client.flush(10)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == 2 and all(g >= 0.95 for g in gaps), gaps


def test_a_refused_connection_keeps_the_events_until_ingest_is_back(outbox_path):
    port = free_port()
    client = quick(f"http://127.0.0.1:{port}/", outbox_path)
    ids = [client.emit(**event_args(n)) for n in range(10)]
    assert client.flush(0.5) is False
    assert client.failed_attempts >= 1
    assert client.metrics()["outbox_events"] == 10
    fake = FakeIngest(port).start()
    try:
        assert client.flush(10)
        assert sorted(fake.accepted_ids()) == sorted(ids)
    finally:
        client.close()
        fake.stop()


def test_a_batch_refusal_rejects_only_the_named_events(ingest, outbox_path):
    def refuse_two(seen):
        ids = seen.ids
        problems = [
            {"index": 1, "reason": "forbidden", "field": "source", "message": "not yours"},
            {"index": 3, "reason": "time_window", "field": "time", "message": "too old"},
        ]
        refuse_two.ids = ids
        return 403, {"error": "forbidden", "problems": problems}, {}

    ingest.answers.append(refuse_two)
    with quick(ingest.url, outbox_path, linger=0.3) as client:
        ids = client.emit_events([_full(n) for n in range(5)])
        assert client.flush(10)
    assert refuse_two.ids == ids
    resent = ingest.requests[1]
    assert resent.ids == [ids[0], ids[2], ids[4]]
    rejected = rows(outbox_path, "rejected")
    assert [r[1] for r in rejected] == [ids[1], ids[3]]
    (_seq, _id, body, _q, _r, status, error, problems) = rejected[0]
    assert status == 403 and json.loads(body)["id"] == ids[1]
    assert json.loads(error)["error"] == "forbidden"
    assert json.loads(problems) == [
        {"index": 1, "reason": "forbidden", "field": "source", "message": "not yours"}
    ]
    assert client.rejected == 2 and client.sent == 3


def test_a_refusal_without_indexes_is_narrowed_down_by_halves(ingest, outbox_path):
    bad = set()

    def judge(seen):
        if any(i in bad for i in seen.ids):
            return 400, {"error": "invalid events", "problems": [{"reason": "x"}]}, {}
        return 202, {"accepted": seen.ids}, {}

    with quick(ingest.url, outbox_path, linger=0.3) as client:
        ids = client.emit_events([_full(n) for n in range(8)])
        bad.add(ids[5])
        for _ in range(20):
            ingest.answers.append(judge)
        assert client.flush(10)
    assert [r[1] for r in rows(outbox_path, "rejected")] == [ids[5]]
    assert sorted(ingest.accepted_ids()) == sorted(set(ids) - {ids[5]})


def test_a_401_gets_a_fresh_token_once(ingest, outbox_path):
    tokens = iter(["old", "new", "newer"])
    ingest.answers.append((401, {"error": "unauthorized"}, {}))

    class Source:
        invalidated = 0

        def token(self):
            return self.current

        def invalidate(self):
            self.invalidated += 1
            self.current = next(tokens)

    source = Source()
    source.current = next(tokens)
    client = AuditClient(ingest.url, source, outbox_path, prometheus=False)
    client.emit(**event_args())
    assert client.flush(10)
    client.close()
    assert [r.headers["authorization"] for r in ingest.requests] == ["Bearer old", "Bearer new"]
    assert source.invalidated == 1


def test_credentials_refused_for_good_keep_the_events_queued_not_rejected(ingest, outbox_path):
    for _ in range(50):
        ingest.answers.append((401, {"error": "unauthorized"}, {}))
    client = quick(ingest.url, outbox_path)
    client.emit(**event_args())
    assert client.flush(1) is False
    assert client.rejected == 0 and client.failed_attempts >= 1
    assert rows(outbox_path, "rejected") == []
    ((*_, attempts, last_error),) = rows(outbox_path)
    assert attempts >= 1 and "401" in last_error
    client.close(timeout=0)


def test_the_outbox_bound_refuses_new_events_with_a_clear_error(tmp_path):
    client = quick(f"http://127.0.0.1:{free_port()}/", tmp_path / "q.db", max_outbox_events=3)
    for n in range(3):
        client.emit(**event_args(n))
    with pytest.raises(OutboxFull, match=r"is full .*3 events.*nothing was queued"):
        client.emit(**event_args(9))
    assert client.metrics()["outbox_events"] == 3
    client.close(timeout=0)


def test_a_restarted_client_resumes_what_the_outbox_holds(ingest, tmp_path):
    path = tmp_path / "q.db"
    first = quick(f"http://127.0.0.1:{free_port()}/", path)
    ids = [first.emit(**event_args(n)) for n in range(5)]
    first.close(timeout=0)
    second = quick(ingest.url, path)  # no emit: the sender starts on what it finds
    deadline = time.monotonic() + 10
    while sorted(ingest.accepted_ids()) != sorted(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(ingest.accepted_ids()) == sorted(ids)
    assert second.flush(5)
    second.close()


def test_without_an_outbox_emit_is_synchronous_and_raises(ingest):
    client = quick(ingest.url)
    event_id = client.emit(**event_args())
    assert ingest.requests[0].ids == [event_id]
    assert ingest.requests[0].headers["content-type"] == STRUCTURED
    ingest.answers.append((503, {"error": "unavailable"}, {"Retry-After": "3"}))
    with pytest.raises(DeliveryFailed) as failed:
        client.emit(**event_args())
    assert failed.value.status == 503 and failed.value.retry_after == 3
    problem = {"reason": "schema", "field": "data.outcome", "message": "bad outcome"}
    ingest.answers.append((400, {"error": "invalid events", "problems": [problem]}, {}))
    with pytest.raises(EventRejected) as rejected:
        client.emit(**event_args())
    assert rejected.value.status == 400 and rejected.value.problems == [problem]
    with pytest.raises(DeliveryFailed, match="could not be reached"):
        quick(f"http://127.0.0.1:{free_port()}/").emit(**event_args())


def test_an_invalid_event_is_refused_before_anything_is_kept(ingest, outbox_path):
    client = quick(ingest.url, outbox_path)
    with pytest.raises(InvalidEvent, match=r"data\.outcome"):
        client.emit(**event_args(outcome="maybe"))
    with pytest.raises(InvalidEvent):
        client.emit_events([_full(1), {**_full(2), "authid": "me"}])
    assert rows(outbox_path) == [] and ingest.requests == []
    client.close()


def test_single_mode_sends_one_structured_event_per_request(ingest, outbox_path):
    with quick(ingest.url, outbox_path, batch=False, linger=0.2) as client:
        ids = client.emit_events([_full(n) for n in range(4)])
        assert client.flush(10)
    assert [r.ids for r in ingest.requests] == [[i] for i in ids]
    assert {r.headers["content-type"] for r in ingest.requests} == {STRUCTURED}


def test_batches_respect_the_byte_limit(ingest, outbox_path):
    big = "x" * 3000
    with quick(ingest.url, outbox_path, max_batch_bytes=10_000, linger=0.3) as client:
        client.emit_events([_full(n, reason=big) for n in range(10)])
        assert client.flush(10)
    assert all(len(r.body) <= 10_000 for r in ingest.requests)
    assert sum(len(r.ids) for r in ingest.requests) == 10


def test_an_event_over_ingests_size_limit_is_invalid(ingest):
    client = quick(ingest.url, max_event_bytes=4096)
    with pytest.raises(InvalidEvent, match=r"INGEST_MAX_EVENT_BYTES"):
        client.emit(**event_args(reason="x" * 4096))


def test_two_clients_on_one_outbox_do_not_send_the_same_rows_at_once(ingest, outbox_path):
    slow = []

    def hold(seen):
        time.sleep(0.3)
        slow.append(seen.ids)
        return 202, {"accepted": seen.ids}, {}

    for _ in range(40):
        ingest.answers.append(hold)
    a = quick(ingest.url, outbox_path, max_batch_events=5)
    b = quick(ingest.url, outbox_path, max_batch_events=5)
    ids = a.emit_events([_full(n) for n in range(20)])
    b.flush(0)
    assert a.flush(20) and b.flush(20)
    sent = [i for batch in slow for i in batch]
    assert sorted(sent) == sorted(ids)  # each once
    a.close()
    b.close()


def test_metrics_in_prometheus_form(ingest, outbox_path):
    from prometheus_client import generate_latest

    client = AuditClient(ingest.url, "T", outbox_path)
    client.emit(**event_args())
    assert client.flush(10)
    text = generate_latest().decode()
    label = f'outbox="{outbox_path}"'
    assert f"openg2p_audit_client_outbox_events{{{label}}} 0.0" in text
    assert f"openg2p_audit_client_events_sent_total{{{label}}} 1.0" in text
    assert f"openg2p_audit_client_outbox_oldest_age_seconds{{{label}}}" in text
    assert f"openg2p_audit_client_events_rejected_total{{{label}}} 0.0" in text
    client.close()


def _full(n: int, **data) -> dict:
    """A whole CloudEvent dict, as emit_events and the CLI take them."""
    return {
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "subject": f"beneficiary/BEN-{n:06d}",
        "data": {"actor": {"id": "officer-17"}, "action": "view", "outcome": "success", **data},
    }


def test_a_token_source_that_fails_leaves_the_events_queued_and_the_sender_alive(
    ingest, outbox_path
):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("secret store not mounted yet")
        return "T"

    client = AuditClient(ingest.url, flaky, outbox_path, backoff_initial=0.05, prometheus=False)
    event_id = client.emit(**event_args())
    assert client.flush(10)
    assert ingest.accepted_ids() == [event_id] and client.failed_attempts == 0
    client.close()


def test_a_timeout_is_retried_with_the_same_id(ingest, outbox_path):
    def too_slow(seen):
        time.sleep(1.5)  # past the client's timeout: ingest may or may not have kept it
        return 202, {"accepted": seen.ids}, {}

    ingest.answers.append(too_slow)
    with quick(ingest.url, outbox_path, timeout=0.5) as client:
        event_id = client.emit(**event_args())
        assert client.flush(10)
    assert client.failed_attempts == 1
    deadline = time.monotonic() + 5
    while len(ingest.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.ids for r in ingest.requests] == [[event_id], [event_id]]
    assert ingest.requests[0].body == ingest.requests[1].body


def test_a_forked_worker_makes_its_own_connection_and_sender(ingest, outbox_path):
    import multiprocessing

    client = quick(ingest.url, outbox_path)
    parent_id = client.emit(**event_args(0))
    assert client.flush(10)

    def worker(queue) -> None:
        child_id = client.emit(**event_args(1))  # the parent's SQLite connection is not used
        queue.put((child_id, client.flush(10)))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(queue,))
    proc.start()
    child_id, flushed = queue.get(timeout=30)
    proc.join(30)
    assert flushed and proc.exitcode == 0
    assert client.emit(**event_args(2)) and client.flush(10)  # the parent carries on
    assert child_id in ingest.accepted_ids() and parent_id in ingest.accepted_ids()
    assert client.metrics()["outbox_events"] == 0
    client.close()
