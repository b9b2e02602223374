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

and the export rate (rows/s, JSON lines and CSV) of one month's rows. With
`--http` the same cases run again through the served function (functions-framework
`--asgi`, a local token issuer, a local Kafka broker unless KAFKA_BOOTSTRAP_SERVERS):
HTTP, the token check and the audit event each read emits are then included.

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
import secrets
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


# Shared with the served function, so cursors work on both paths; generated, as the query
# service refuses a key that is plainly not random.
CURSOR_SECRET = secrets.token_hex(32)


def run(settings: Settings, args: argparse.Namespace, tmp: Path) -> dict:
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
            "query_cursor_secret": CURSOR_SECRET,
        }
    )
    conn = query.connect(reader, "openg2p-audit-query-bench")
    codec = query.CursorCodec(CURSOR_SECRET)
    rng = random.Random(7)
    wide = [("from", _ts(end - timedelta(days=reader.query_max_range_days))), ("to", _ts(end))]

    def week_prefix() -> list[tuple[str, str]]:
        lo = end - timedelta(days=reader.query_max_range_days)
        room = (end - lo - timedelta(days=7)).total_seconds()
        start = lo + timedelta(seconds=rng.random() * room)
        return [("from", _ts(start)), ("to", _ts(start + timedelta(days=7))),
                ("type", f"org.openg2p.{rng.choice(FAMILIES)}.*")]  # fmt: skip

    # 50 cursors deep, found once on the in-process path; the same cursor is valid when served.
    request = query.parse_page([*wide, ("limit", "100")], reader, codec)
    for _ in range(50):
        cursor = query.fetch_page(conn, request, codec).next_cursor
        request = query.PageRequest(request.filters, 100, codec.decode(cursor, request.filters))
    deep = [*wide, ("cursor", cursor)]

    cases: dict[str, Callable[[], list[tuple[str, str]]]] = {
        "actor timeline": lambda: [*wide, ("actor_id", rng.choice(picks["actors"]))],
        "resource timeline": lambda: [
            *wide,
            ("resource_type", "beneficiary"),
            ("resource_id", f"BEN-{rng.randrange(BENEFICIARIES):06d}"),
        ],
        "trace lookup": lambda: [*wide, ("trace_id", rng.choice(picks["traces"]))],
        "type prefix, one week": week_prefix,
        "first page": lambda: list(wide),
        "page 50 cursors deep": lambda: list(deep),
    }
    month_start = datetime(*store.month_of(end - timedelta(days=40)).timetuple()[:3], tzinfo=UTC)
    month_end = datetime(*store.add_months(store.month_of(month_start), 1).timetuple()[:3],
                         tzinfo=UTC)  # fmt: skip
    export_range = [("from", _ts(month_start)), ("to", _ts(month_end))]

    def in_process(items: list[tuple[str, str]]) -> Callable[[], object]:
        page_request = query.parse_page([*items, ("limit", "100")], reader, codec)
        return lambda: query.fetch_page(conn, page_request, codec)

    report: dict = {"rows": args.rows, "months": args.months, "seed_seconds": round(seeded_s, 1)}
    report["pages"] = {
        name: _measure_cases(args.samples, lambda make=make: in_process(make()))
        for name, make in cases.items()
    }
    exports = {}
    filters = query.parse_export(export_range, reader)[0]
    for fmt in ("jsonl", "csv"):
        conn.run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        started = time.perf_counter()
        count = query.count_rows(conn, filters, reader.query_export_max_rows)
        size = sum(len(chunk) for chunk in query.export_chunks(conn, filters, fmt, count))
        elapsed = time.perf_counter() - started
        conn.run("COMMIT")
        exports[fmt] = {"rows": count, "bytes": size, "seconds": round(elapsed, 3),
                        "rows_per_s": round(count / elapsed)}  # fmt: skip
    report["export"] = exports
    conn.close()
    if args.http:
        report["http"] = _over_http(reader, cases, export_range, args, tmp)
    return report


def _measure_cases(samples: int, make: Callable[[], Callable[[], object]]) -> dict:
    make()()  # warm the cache once
    return measure(samples, make)


def _over_http(reader: Settings, cases, export_range, args, tmp: Path) -> dict:
    """The same cases through the served function: HTTP, token check and the audit event."""
    from urllib.parse import urlencode

    import urllib3

    from openg2p_audit.devservices import LocalFunction, LocalKafka
    from openg2p_audit.devservices.issuer import LocalIssuer
    from openg2p_audit.topics import ensure_topics

    kafka = None
    if not reader.kafka_configured:
        kafka = LocalKafka(tmp / "kafka").start()
    issuer = LocalIssuer().serve()
    settings = reader.model_copy(
        update={
            "kafka_bootstrap_servers": kafka.bootstrap if kafka else reader.kafka_bootstrap_servers,
            "kafka_events_topic": f"bench.query.{uuid.uuid4().hex[:6]}",
            "kafka_topic_partitions": 3,
            "auth_issuer": issuer.url,
            "auth_jwks_url": issuer.jwks_url,
            "query_export_max_rows": 100_000_000,
        }
    )
    from bench_support import with_attestation_keys

    settings = with_attestation_keys(settings)
    ensure_topics(settings)
    fn = LocalFunction("query", "query", settings, tmp / "function").start()
    http = urllib3.PoolManager(maxsize=1)
    headers = {"Authorization": f"Bearer {issuer.mint('bench', ('audit.read', 'audit.export'))}"}
    try:

        def served(items: list[tuple[str, str]]) -> Callable[[], object]:
            url = f"{fn.url}/v1/audit/events?{urlencode([*items, ('limit', '100')])}"

            def get() -> None:
                resp = http.request("GET", url, headers=headers)
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {resp.data[:200]!r}")

            return get

        out: dict = {"pages": {}}
        for name, make in cases.items():
            out["pages"][name] = _measure_cases(args.samples, lambda make=make: served(make()))
        out["export"] = {}
        for fmt in ("jsonl", "csv"):
            url = f"{fn.url}/v1/audit/export?{urlencode([*export_range, ('format', fmt)])}"
            started = time.perf_counter()
            resp = http.request("GET", url, headers=headers, preload_content=False)
            size = sum(len(chunk) for chunk in resp.stream(1 << 20))
            elapsed = time.perf_counter() - started
            rows = int(resp.headers["X-Audit-Export-Rows"])
            resp.release_conn()
            out["export"][fmt] = {"rows": rows, "bytes": size, "seconds": round(elapsed, 3),
                                  "rows_per_s": round(rows / elapsed)}  # fmt: skip
        return out
    finally:
        fn.stop()
        issuer.stop()
        if kafka is not None:
            kafka.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the seeded database")
    parser.add_argument(
        "--http",
        action="store_true",
        help="also through the served function (starts Kafka unless KAFKA_BOOTSTRAP_SERVERS)",
    )
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
            report = run(settings, args, Path(tmp))
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
    if "http" in report:
        print("\nThrough HTTP (token check and the read's audit event included):\n")
        print("| Query | p50 ms | p99 ms |\n| --- | ---: | ---: |")
        for name, r in report["http"]["pages"].items():
            print(f"| {name} | {r['p50_ms']} | {r['p99_ms']} |")
        print("\n| Export over HTTP | rows | rows/s |\n| --- | ---: | ---: |")
        for fmt, r in report["http"]["export"].items():
            print(f"| {fmt} | {r['rows']:,} | {r['rows_per_s']:,} |")
    print(f"\n{out.relative_to(ROOT)}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
