"""The SQLite outbox on its own: bounds, claims and leases, rejection, reopening."""

from __future__ import annotations

import sqlite3
import time

import pytest

from openg2p_audit_client import Outbox, OutboxFull


def test_claims_follow_emit_order_within_the_bounds(tmp_path):
    box = Outbox(tmp_path / "q.db")
    box.put((f"e{i}", b"x" * 10) for i in range(10))
    first = box.claim(4, 10_000, lease=30)
    assert [r.id for r in first] == ["e0", "e1", "e2", "e3"]
    # Bytes: the batch body is [a,b,...]: 1 + 11 per event here.
    second = box.claim(100, 1 + 11 * 3, lease=30)
    assert [r.id for r in second] == ["e4", "e5", "e6"]
    box.delete([r.seq for r in first])
    assert box.depth() == (6, 60)


def test_a_claim_is_leased_and_falls_free_when_its_holder_is_gone(tmp_path):
    path = tmp_path / "q.db"
    Outbox(path).put([("e0", b"{}")])
    holder, other = Outbox(path), Outbox(path)
    assert [r.id for r in holder.claim(10, 10_000, lease=0.3)] == ["e0"]
    assert other.claim(10, 10_000, lease=30) == []
    assert 0 < other.next_unclaimed_in() <= 0.3
    time.sleep(0.35)
    assert [r.id for r in other.claim(10, 10_000, lease=30)] == ["e0"]


def test_release_counts_attempts_and_keeps_the_last_error(tmp_path):
    box = Outbox(tmp_path / "q.db")
    box.put([("e0", b"{}")])
    (row,) = box.claim(1, 100, lease=30)
    box.release([row.seq], "ingest answered 503")
    (row,) = box.claim(1, 100, lease=30)
    box.release([row.seq], None)
    db = sqlite3.connect(tmp_path / "q.db")
    assert db.execute("SELECT attempts, last_error, claimed_until FROM outbox").fetchone() == (
        1, "ingest answered 503", 0,
    )  # fmt: skip


def test_the_bounds_refuse_the_new_events_whole(tmp_path):
    box = Outbox(tmp_path / "q.db", max_events=5, max_bytes=100)
    box.put((f"e{i}", b"x" * 10) for i in range(4))
    with pytest.raises(OutboxFull):
        box.put((f"n{i}", b"x") for i in range(2))  # 6 events > 5: neither is queued
    with pytest.raises(OutboxFull, match="100 bytes"):
        box.put([("big", b"x" * 61)])
    assert box.depth() == (4, 40)
    box.put([("fits", b"x" * 60)])
    assert box.depth() == (5, 100)


def test_rejected_events_keep_their_answer_and_can_be_requeued(tmp_path):
    box = Outbox(tmp_path / "q.db")
    box.put([("e0", b'{"id":"e0"}'), ("e1", b'{"id":"e1"}')])
    rows = box.claim(10, 10_000, lease=30)
    box.reject([(rows[1].seq, 403, '{"error":"forbidden"}', "[]")])
    (gone,) = box.rejected()
    assert (gone.id, gone.status, gone.error, gone.event) == (
        "e1", 403, '{"error":"forbidden"}', b'{"id":"e1"}',
    )  # fmt: skip
    assert box.depth()[0] == 1 and box.rejected_count() == 1
    assert box.requeue_rejected(["e1"]) == 1
    assert box.rejected_count() == 0
    assert {r.id for r in box.claim(10, 10_000, lease=30)} == {"e1"}  # e0 is still claimed


def test_an_outbox_from_a_newer_client_is_not_touched(tmp_path):
    path = tmp_path / "q.db"
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(OSError, match="newer"):
        Outbox(path)


def test_a_missing_folder_is_an_error_not_a_new_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Outbox(tmp_path / "absent" / "q.db")
