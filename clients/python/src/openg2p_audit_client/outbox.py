"""The durable outbox: a SQLite database in WAL mode beside the emitting service.

`put` commits the event (with `synchronous=FULL`, so it survives a power cut,
not only a crash) before `emit` returns; the sender deletes it only once ingest
answered 202. In between, the row is the only copy, so nothing here may lose
it silently:

- A full outbox refuses the new event (`OutboxFull`), never an old one.
- A sender *claims* the rows it is sending for a lease (`claimed_until`): two
  processes sharing one file (an Odoo server's workers) do not send the same
  rows at once, and rows claimed by a process that died are sent again once
  the lease has run out.
- A refused event moves to `rejected`, with ingest's answer, in the same
  transaction that removes it from `outbox`.

The depth and size are kept in `outbox_stats` by triggers, so the bound is
checked without counting rows on every emit.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import OutboxFull

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    queued_at REAL NOT NULL,
    rejected_at REAL NOT NULL,
    status INTEGER NOT NULL,
    error TEXT NOT NULL,
    problems TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejected_id ON rejected (id);
CREATE TABLE IF NOT EXISTS outbox_stats (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO outbox_stats VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS outbox_counted_in AFTER INSERT ON outbox BEGIN
    UPDATE outbox_stats SET events = events + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS outbox_counted_out AFTER DELETE ON outbox BEGIN
    UPDATE outbox_stats SET events = events - 1, bytes = bytes - OLD.size;
END;
"""


@dataclass(frozen=True)
class Row:
    seq: int
    id: str
    body: bytes


@dataclass(frozen=True)
class RejectedEvent:
    seq: int
    id: str
    event: bytes
    status: int
    error: str
    problems: str
    queued_at: float
    rejected_at: float


class Outbox:
    """One outbox file. Thread-safe; several processes may share the file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        busy_timeout: float = 30.0,
    ):
        if max_events < 1 or max_bytes < 1:
            raise ValueError("the outbox bounds must be positive")
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._db = self._connect()

    # -- the connection ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"outbox folder {self.path.parent} does not exist")
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            db.close()
            raise OSError(f"outbox {self.path}: SQLite refused WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.close()
            raise OSError(
                f"outbox {self.path} was made by a newer openg2p-audit-client "
                f"(schema {version}; this one knows {SCHEMA_VERSION})"
            )
        with _transaction(db):
            for statement in _statements(SCHEMA):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- emitting --------------------------------------------------------------

    def put(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Commit events (id, body) in one transaction, or none of them when they do not fit."""
        items = list(items)
        size = sum(len(b) for _, b in items)
        now = time.time()
        with self._lock, _transaction(self._db) as db:
            events, used = db.execute("SELECT events, bytes FROM outbox_stats").fetchone()
            if events + len(items) > self.max_events or used + size > self.max_bytes:
                raise OutboxFull(
                    f"outbox {self.path} is full ({events} events, {used} bytes; bounds "
                    f"{self.max_events} events, {self.max_bytes} bytes): ingest has not "
                    f"acknowledged events for a while; nothing was queued"
                )
            db.executemany(
                "INSERT INTO outbox (id, body, size, queued_at) VALUES (?, ?, ?, ?)",
                [(i, b, len(b), now) for i, b in items],
            )

    # -- sending ---------------------------------------------------------------

    def claim(self, max_events: int, max_bytes: int, lease: float) -> list[Row]:
        """The oldest unclaimed rows, within `max_events` and `max_bytes` of batch body."""
        now = time.time()
        with self._lock, _transaction(self._db) as db:
            rows: list[Row] = []
            total = 1  # the batch's brackets, and a comma per event after the first
            cursor = db.execute(
                "SELECT seq, id, body FROM outbox WHERE claimed_until < ? ORDER BY seq LIMIT ?",
                (now, max_events),
            )
            for seq, event_id, body in cursor:
                if rows and total + len(body) + 1 > max_bytes:
                    break
                rows.append(Row(seq, event_id, bytes(body)))
                total += len(body) + 1
            cursor.close()
            db.executemany(
                "UPDATE outbox SET claimed_until = ? WHERE seq = ?",
                [(now + lease, r.seq) for r in rows],
            )
        return rows

    def delete(self, seqs: list[int]) -> None:
        """Acknowledged by ingest (202): gone for good."""
        if not seqs:
            return
        with self._lock, _transaction(self._db) as db:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def release(self, seqs: list[int], error: str | None) -> None:
        """Not acknowledged: unclaimed, to be sent again (with the same id and bytes)."""
        if not seqs:
            return
        with self._lock, _transaction(self._db) as db:
            db.executemany(
                "UPDATE outbox SET claimed_until = 0, attempts = attempts + ?, "
                "last_error = coalesce(?, last_error) WHERE seq = ?",
                [(0 if error is None else 1, error, s) for s in seqs],
            )

    def reject(self, refusals: list[tuple[int, int, str, str]]) -> None:
        """Move rows (seq, status, error body, problems JSON) to `rejected`, atomically."""
        if not refusals:
            return
        now = time.time()
        with self._lock, _transaction(self._db) as db:
            for seq, status, error, problems in refusals:
                db.execute(
                    "INSERT OR REPLACE INTO rejected (seq, id, body, queued_at, rejected_at, "
                    "status, error, problems) SELECT seq, id, body, queued_at, ?, ?, ?, ? "
                    "FROM outbox WHERE seq = ?",
                    (now, status, error, problems, seq),
                )
                db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    # -- looking -----------------------------------------------------------------

    def depth(self) -> tuple[int, int]:
        """(events, bytes) waiting to be acknowledged."""
        with self._lock:
            return self._db.execute("SELECT events, bytes FROM outbox_stats").fetchone()

    def oldest_age(self) -> float:
        """Seconds the oldest waiting event has waited (0 when none waits)."""
        with self._lock:
            row = self._db.execute("SELECT queued_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    def next_unclaimed_in(self) -> float | None:
        """Seconds until a row claimed by someone else falls free (None: nothing waits)."""
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT min(claimed_until) FROM outbox").fetchone()
        return None if row[0] is None else max(0.0, row[0] - now)

    def rejected_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM rejected").fetchone()[0]

    def rejected(self, limit: int = 100) -> list[RejectedEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, id, body, status, error, problems, queued_at, rejected_at "
                "FROM rejected ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [RejectedEvent(s, i, bytes(b), st, e, p, q, r) for s, i, b, st, e, p, q, r in rows]

    def requeue_rejected(self, ids: Iterable[str] | None = None) -> int:
        """Put rejected events (all, or those of `ids`) back in the outbox, e.g. after the
        source policy was fixed; returns how many. They keep their ids and bytes."""
        with self._lock, _transaction(self._db) as db:
            where, args = "", ()
            if ids is not None:
                wanted = list(ids)
                where = f"WHERE id IN ({','.join('?' * len(wanted))})" if wanted else "WHERE 0"
                args = tuple(wanted)
            moved = db.execute(
                "INSERT INTO outbox (seq, id, body, size, queued_at) "
                f"SELECT seq, id, body, length(body), queued_at FROM rejected {where}",
                args,
            ).rowcount
            db.execute(f"DELETE FROM rejected {where}", args)
        return moved


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken up front."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _statements(script: str) -> list[str]:
    """Split the schema script into statements (triggers hold `;` inside BEGIN ... END)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or
                                   text.upper().endswith("END;")):  # fmt: skip
            out.append(text)
            current = []
    return out
