"""Investigators' reads against a realistically sized trail: page latency and export rate.

    .venv/bin/python bench/query_bench.py [--rows 2000000] [--months 12] [--samples 200]

Seeds `--rows` rows over `--months` monthly partitions (ending with the
current month) with COPY, at the cardinalities of a mid-sized OpenG2P
deployment: 300 actors (officers and services), 200,000 beneficiaries, 40
event types in 8 families, a trace shared by ~3 events, 5 tenants. Then, on
the query service's read-only session and through its own code
(`openg2p_audit.query`: the same parameter parsing, SQL and cursors), it
measures the p50 and p99 of one 100-row page for:

- an actor's timeline, a beneficiary's timeline and a trace lookup, each over
  the widest range allowed (QUERY_MAX_RANGE_DAYS);
- a type prefix (`org.openg2p.<family>.*`) over one week;
- the first page of everything in that range, and the page 50 cursors deep;

and the export rate (rows/s, JSON lines and CSV) of one month's rows. What is
not measured: HTTP, token checks and the audit event each read emits (one
Kafka round trip, ~2-5 ms here: see the ingest figures in docs/benchmarks.md).

Starts its own PostgreSQL unless DATABASE_URL / DB_HOST point at one; the
seeded database is dropped at the end unless --keep. Prints a Markdown table
and writes bench/results/query-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pg8000.native

from openg2p_audit import query, store
from openg2p_audit.devservices import LocalPostgres
from openg2p_audit.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]

ACTORS = 300
BENEFICIARIES = 200_000
FAMILIES = ["registry", "payment", "grievance", "enrolment", "identity", "program", "auth",
            "document"]  # fmt: skip
ACTIONS = ["viewed", "created", "updated", "approved", "rejected"]
TYPES = [f"org.openg2p.{f}.{a}" for f in FAMILIES for a in ACTIONS]  # 40
TENANTS = [f"district-{i}" for i in range(5)]
OUTCOMES = ["success"] * 8 + ["failure", "denied"]


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _csv_field(value: str | None) -> str:
    if value is None:
        return ""
    return '"' + value.replace('"', '""') + '"'


def generate(rows: int, months: int, end: datetime, seed: int = 1) -> tuple[io.StringIO, dict]:
    """CSV for COPY, and what the queries can look for (actors, beneficiaries, traces)."""
    rng = random.Random(seed)
    start = datetime(*store.add_months(store.month_of(end), -(months - 1)).timetuple()[:3],
                     tzinfo=UTC)  # fmt: skip
    span = (end - start).total_seconds()
    out = io.StringIO()
    traces: list[str] = []
    # Actors are not equally busy: a few officers do most of the work, as in a registry office.
    weights = [1 / (i + 1) ** 0.8 for i in range(ACTORS)]
    actors = [f"officer-{i:03d}" if i < 250 else f"service-{i:03d}" for i in range(ACTORS)]
    for i in range(rows):
        at = start + timedelta(seconds=rng.random() * span)
        kind = TYPES[rng.randrange(len(TYPES))]
        family = kind.split(".")[2]
        ben = f"BEN-{rng.randrange(BENEFICIARIES):06d}"
        if i % 3 == 0 or not traces:
            traces.append(f"{rng.getrandbits(128):032x}")
        trace = traces[-1] if rng.random() < 0.9 else None
        actor = rng.choices(actors, weights)[0]
        details = (
            f'{{"extensions":{{"tenantid":"{TENANTS[rng.randrange(5)]}"}},'
            f'"context":{{"office":"office-{rng.randrange(40)}"}}}}'
        )
        fields = [
            f"{uuid.UUID(int=rng.getrandbits(128))}",
            _ts(at),
            f"/openg2p/{family}",
            kind,
            f"beneficiary/{ben}",
            "user" if actor.startswith("officer") else "service",
            actor,
            "beneficiary",
            ben,
            kind.rsplit(".", 1)[1],
            OUTCOMES[rng.randrange(len(OUTCOMES))],
            None,
            trace,
            details,
        ]
        out.write(",".join(_csv_field(f) for f in fields) + "\n")
    out.seek(0)
    picks = {"actors": actors, "traces": traces[:: max(1, len(traces) // 5000)], "start": start}
    return out, picks


def seed(conn: pg8000.native.Connection, rows: int, months: int, end: datetime) -> dict:
    """Create the schema and its partitions, COPY the rows in, ANALYZE; return the picks."""
    store.ensure_schema(conn, 1)
    first = store.add_months(store.month_of(end), -(months - 1))
    for i in range(months + 1):
        store.ensure_partition(conn, store.add_months(first, i))
    data, picks = generate(rows, months, end)
    conn.run(
        f"COPY {store.TABLE} ({', '.join(store.COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
        stream=data,
    )
    conn.run(f"ANALYZE {store.TABLE}")
    return picks


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(samples: int, make: Callable[[], Callable[[], object]]) -> dict:
    timings = []
    for _ in range(samples):
        run = make()
        started = time.perf_counter()
        run()
        timings.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(percentile(timings, 50), 2),
        "p99_ms": round(percentile(timings, 99), 2),
        "mean_ms": round(statistics.fmean(timings), 2),
        "samples": samples,
    }


def run(settings: Settings, args: argparse.Namespace) -> dict:
    owner = pg8000.native.Connection(**settings.pg_connect_kwargs)
    role = f"audit_query_bench_{uuid.uuid4().hex[:6]}"
    try:
        t0 = time.perf_counter()
        end = datetime.now(UTC)
        picks = seed(owner, args.rows, args.months, end)
        seeded_s = time.perf_counter() - t0
        query.ensure_reader_role(owner, role, "bench")
    finally:
        owner.close()
    kw = settings.pg_connect_kwargs
    reader = settings.model_copy(
        update={
            "database_url": f"postgresql://{role}:bench@{kw['host']}:{kw['port']}/{kw['database']}",
            "db_host": None,
        }
    )
    conn = query.connect(reader, "openg2p-audit-query-bench")
    codec = query.CursorCodec("b" * 40)
    rng = random.Random(7)
    wide_to = end
    wide_from = end - timedelta(days=reader.query_max_range_days)

    def page(params: dict[str, str], after=None) -> Callable[[], object]:
        items = [("from", _ts(wide_from)), ("to", _ts(wide_to)), *params.items()]
        request = query.parse_page(items, reader, codec)
        if after is not None:
            request = query.PageRequest(request.filters, request.limit, after)
        return lambda: query.fetch_page(conn, request, codec)

    def deep_page() -> Callable[[], object]:
        items = [("from", _ts(wide_from)), ("to", _ts(wide_to)), ("limit", "100")]
        request = query.parse_page(items, reader, codec)
        for _ in range(50):
            nxt = query.fetch_page(conn, request, codec).next_cursor
            request = query.PageRequest(request.filters, 100, codec.decode(nxt, request.filters))
        return lambda: query.fetch_page(conn, request, codec)

    def week_prefix() -> Callable[[], object]:
        start = wide_from + timedelta(seconds=rng.random() * (wide_to - wide_from).total_seconds())
        start = min(start, wide_to - timedelta(days=7))
        items = [("from", _ts(start)), ("to", _ts(start + timedelta(days=7))),
                 ("type", f"org.openg2p.{rng.choice(FAMILIES)}.*"), ("limit", "100")]  # fmt: skip
        request = query.parse_page(items, reader, codec)
        return lambda: query.fetch_page(conn, request, codec)

    cases: dict[str, Callable[[], Callable[[], object]]] = {
        "actor timeline": lambda: page({"actor_id": rng.choice(picks["actors"])}),
        "resource timeline": lambda: page(
            {
                "resource_type": "beneficiary",
                "resource_id": f"BEN-{rng.randrange(BENEFICIARIES):06d}",
            }
        ),
        "trace lookup": lambda: page({"trace_id": rng.choice(picks["traces"])}),
        "type prefix, one week": week_prefix,
        "first page": lambda: page({}),
    }
    results: dict[str, dict] = {}
    for name, make in cases.items():
        make()()  # warm the cache once
        results[name] = measure(args.samples, make)
    deep = deep_page()
    results["page 50 cursors deep"] = measure(args.samples, lambda: deep)

    exports = {}
    month_start = datetime(*store.month_of(end - timedelta(days=40)).timetuple()[:3], tzinfo=UTC)
    month_end = datetime(*store.add_months(store.month_of(month_start), 1).timetuple()[:3],
                         tzinfo=UTC)  # fmt: skip
    items = [("from", _ts(month_start)), ("to", _ts(month_end))]
    filters = query.parse_export(items, reader)[0]
    for fmt in ("jsonl", "csv"):
        conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        started = time.perf_counter()
        count = query.count_rows(conn, filters, reader.query_export_max_rows)
        size = sum(len(chunk) for chunk in query.export_chunks(conn, filters, fmt, count))
        elapsed = time.perf_counter() - started
        conn.run("COMMIT")
        exports[fmt] = {"rows": count, "bytes": size, "seconds": round(elapsed, 3),
                        "rows_per_s": round(count / elapsed)}  # fmt: skip
    conn.close()
    return {
        "rows": args.rows,
        "months": args.months,
        "seed_seconds": round(seeded_s, 1),
        "pages": results,
        "export": exports,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the seeded database")
    args = parser.parse_args()
    settings = load_settings()
    server = None
    with tempfile.TemporaryDirectory(prefix="query-bench-") as tmp:
        if not settings.database_configured:
            server = LocalPostgres(Path(tmp) / "postgres").start()
        admin_url = server.url if server else None
        name = f"query_bench_{uuid.uuid4().hex[:8]}"
        if server:
            settings = settings.model_copy(update={"database_url": server.create_database(name)})
        else:
            admin = pg8000.native.Connection(**settings.pg_connect_kwargs)
            admin.run(f"CREATE DATABASE {name}")
            admin.close()
            kw = settings.pg_connect_kwargs
            auth = kw["user"] + (f":{kw['password']}" if kw["password"] else "")
            url = f"postgresql://{auth}@{kw['host']}:{kw['port']}/{name}"
            admin_url = settings.database_url
            settings = settings.model_copy(update={"database_url": url, "db_host": None})
        try:
            report = run(settings, args)
        finally:
            if server is not None:
                server.stop()
            elif not args.keep and admin_url:
                admin = pg8000.native.Connection(
                    **settings.model_copy(update={"database_url": admin_url}).pg_connect_kwargs
                )
                admin.run(f"DROP DATABASE {name} WITH (FORCE)")
                admin.close()
    report["machine"] = {"cpus": _cpus(), "python": platform.python_version()}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"query-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['rows']:,} rows over {report['months']} monthly partitions "
          f"(seeded in {report['seed_seconds']} s); one 100-row page each:\n")  # fmt: skip
    print("| Query | p50 ms | p99 ms |\n| --- | ---: | ---: |")
    for name, r in report["pages"].items():
        print(f"| {name} | {r['p50_ms']} | {r['p99_ms']} |")
    print("\n| Export (one month) | rows | rows/s |\n| --- | ---: | ---: |")
    for fmt, r in report["export"].items():
        print(f"| {fmt} | {r['rows']:,} | {r['rows_per_s']:,} |")
    print(f"\n{out.relative_to(ROOT)}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
