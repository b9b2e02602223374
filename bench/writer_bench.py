"""Writer throughput against the real PostgreSQL: HTTP deliveries, the bulk path, and COPY.

    .venv/bin/python bench/writer_bench.py [--events 50000] [--duration 15]
        [--http 1:64,1:256,2:256]   # WORKERS:CONNECTIONS (functions-framework --asgi)

Needs `wrk` (Debian package `wrk`) as the load generator for the HTTP path:
it sends binary CloudEvents as a KafkaSource does (bench/writer_deliveries.lua),
each with a new id. Starts its own PostgreSQL and Kafka unless DATABASE_URL /
KAFKA_BOOTSTRAP_SERVERS point at existing ones.

Besides rows/s (wall clock, sensitive to whatever else runs on the machine)
it reports CPU time per 1000 rows for the writer processes, PostgreSQL and
the load generator, read from /proc: those figures say what bounds a path on
a machine of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kafka import KafkaProducer  # noqa: E402

from bench_support import (  # noqa: E402
    cpu_of,
    descendants,
    ingest_attestor,
    machine_busy,
    with_attestation_keys,
)
from function_server import request, settings_env  # noqa: E402
from openg2p_audit import store  # noqa: E402
from openg2p_audit.contract import AuditEvent  # noqa: E402
from openg2p_audit.devservices import (  # noqa: E402
    LocalFunction,
    LocalKafka,
    LocalPostgres,
)
from openg2p_audit.kafka_binding import encode  # noqa: E402
from openg2p_audit.replay import replay  # noqa: E402
from openg2p_audit.settings import load_settings  # noqa: E402
from openg2p_audit.topics import ensure_topics  # noqa: E402

MONTH = datetime(2026, 4, 1, tzinfo=UTC)
# The run's attestor and settings: its records are attested as ingest attests them.
ATTESTOR: list = []


# --------------------------------------------------------------------------- CPU accounting


def tree_cpu(root: int | None) -> float:
    if root == os.getpid():
        # This process and the replay workers it reaped, not the local Kafka and
        # PostgreSQL servers that also run as its children.
        return cpu_of(root)
    return sum(cpu_of(p) for p in descendants(root)) if root else 0.0


@dataclass
class Cpu:
    """CPU seconds spent by each party during one measurement."""

    writer: float = 0.0
    postgres: float = 0.0
    loadgen: float = 0.0
    machine: float = 0.0
    wall: float = 0.0

    def per_k(self, rows: int) -> str:
        k = max(rows, 1) / 1000
        return (
            f"writer {self.writer / k * 1000:.0f} ms, PostgreSQL {self.postgres / k * 1000:.0f} ms"
            + (f", load generator {self.loadgen / k * 1000:.0f} ms" if self.loadgen else "")
        )


class Meter:
    def __init__(self, writer_pid: int | None, pg_pid: int | None, loadgen_pid=None):
        self.pids = (writer_pid, pg_pid)
        self.loadgen_pid = loadgen_pid

    def __enter__(self) -> Meter:
        self.start = (tree_cpu(self.pids[0]), tree_cpu(self.pids[1]), *machine_busy())
        self.t0 = time.perf_counter()
        return self

    def stop(self, loadgen_cpu: float = 0.0) -> Cpu:
        wall = time.perf_counter() - self.t0
        busy, total = machine_busy()
        return Cpu(
            writer=tree_cpu(self.pids[0]) - self.start[0],
            postgres=tree_cpu(self.pids[1]) - self.start[1],
            loadgen=loadgen_cpu,
            machine=(busy - self.start[2]) / max(total - self.start[3], 1e-9),
            wall=wall,
        )

    def __exit__(self, *exc: object) -> None:
        pass


# --------------------------------------------------------------------------- data


def make_events(n: int) -> list[AuditEvent]:
    events = []
    for i in range(n):
        events.append(
            AuditEvent.model_validate(
                {
                    "specversion": "1.0",
                    "id": str(uuid.uuid4()),
                    "source": "openg2p/registry",
                    "type": "org.openg2p.payment.created",
                    "subject": f"beneficiary/{i % 5000}",
                    "time": f"2026-04-{1 + i % 28:02d}T12:{i % 60:02d}:00Z",
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "data": {
                        "actor": {"id": f"officer-{i % 40}", "type": "user", "session_id": "s"},
                        "action": "create",
                        "outcome": "success",
                        "resource": {
                            "type": "payment",
                            "id": f"pay-{i}",
                            "amount": 125.5,
                            "currency": "PHP",
                        },
                        "context": {"bank": "BDO"},
                    },
                }
            )
        )
    return events


def copy_text(rows: list[store.Row]) -> str:
    buf = io.StringIO()
    out = csv.writer(buf)
    for r in rows:
        out.writerow(
            [
                r.occurred_at.isoformat() if c == "occurred_at" else getattr(r, c)
                for c in store.COLUMNS
            ]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- runs


def run_http(settings, pg_pid, workers, connections, duration, logdir, trivial=False) -> dict:
    conn = store.connect(settings)
    conn.run("TRUNCATE audit_events")
    env = settings_env(settings)
    if workers > 1:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(logdir / f"metrics-{uuid.uuid4().hex[:6]}")
    source, target = (
        ("bench/trivial_function.py", "trivial")
        if trivial
        else ("functions/writer/main.py", "write")
    )
    server = LocalFunction(
        "writer", target, None, logdir, workers=workers, env=env, source=source,
        log_path=logdir / f"writer-{workers}w-{connections}c.log",
    )  # fmt: skip
    with server:
        if not trivial:
            request(server.url, "GET", "/readyz")  # schema and connection before timing
        before = conn.run("SELECT count(*) FROM audit_events")[0][0]
        meter = Meter(server.proc.pid, pg_pid).__enter__()
        wrk = subprocess.Popen(
            ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s",
             "--latency", "--timeout", "30s", "-s", str(ROOT / "bench/writer_deliveries.lua"),
             server.url + "/"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "RUN_ID": uuid.uuid4().hex[:8]},
        )  # fmt: skip
        wrk_cpu = 0.0
        while wrk.poll() is None:
            wrk_cpu = max(wrk_cpu, cpu_of(wrk.pid))
            time.sleep(0.2)
        out = wrk.stdout.read()
        cpu = meter.stop(wrk_cpu)
        after = conn.run("SELECT count(*) FROM audit_events")[0][0]
        metrics = "" if trivial else request(server.url, "GET", "/metrics")[1]
    conn.close()
    rows = after - before
    if trivial:  # nothing stored: count the answered requests instead
        done = re.search(r"(\d+) requests in", out)
        rows = int(done.group(1)) if done else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    batches = _metric(metrics, "audit_writer_batch_size_count")
    return {
        "path": ("CONTROL: do-nothing function, " if trivial else "HTTP writer, ")
        + f"{workers} uvicorn worker(s), {connections} concurrent",
        "rows": rows,
        "rows_per_s": rows / cpu.wall,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
        "latency": f"p50 {p50.group(1) if p50 else '?'}, p99 {p99.group(1) if p99 else '?'}",
        "mean_batch": rows / batches if batches else 0,
        "cpu": cpu,
    }


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_bulk(settings, pg_pid, batch, workers) -> dict:
    conn = store.connect(settings)
    conn.run("TRUNCATE audit_events")
    conn.close()
    meter = Meter(os.getpid(), pg_pid).__enter__()
    summary = replay(settings, batch_size=batch, workers=workers)
    cpu = meter.stop()
    return {
        "path": f"bulk replay from Kafka, {workers} process(es), {batch} rows/transaction",
        "rows": summary.inserted,
        "rows_per_s": summary.inserted / cpu.wall,
        "cpu": cpu,
    }


def run_consume_only(settings, batch) -> dict:
    """kafka-python reading the same records and doing nothing with them."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
        max_poll_records=batch, fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )  # fmt: skip
    tps = [TopicPartition(settings.kafka_events_topic, p)
           for p in consumer.partitions_for_topic(settings.kafka_events_topic)]  # fmt: skip
    ends = consumer.end_offsets(tps)
    consumer.assign(tps)
    consumer.seek_to_beginning()
    meter = Meter(os.getpid(), None).__enter__()
    n = 0
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        for records in consumer.poll(timeout_ms=500, max_records=batch).values():
            n += len(records)
    cpu = meter.stop()
    consumer.close()
    return {"path": "stage: Kafka consume only (kafka-python), no decoding", "rows": n,
            "rows_per_s": n / cpu.wall, "cpu": cpu}  # fmt: skip


def run_decode_only(events) -> dict:
    """The per-record CPU work between Kafka and the INSERT: decode, validate, map to a row."""
    from openg2p_audit.attestation import Verifier
    from openg2p_audit.replay import event_from_record

    records = [encode(e, ATTESTOR[0]) for e in events]
    verifier = Verifier.from_settings(ATTESTOR[1])
    meter = Meter(os.getpid(), None).__enter__()
    for r in records:
        store.event_to_row(event_from_record(r.headers, r.value, verifier))
    cpu = meter.stop()
    return {"path": "stage: decode + validate + map to row, records in memory",
            "rows": len(records), "rows_per_s": len(records) / cpu.wall, "cpu": cpu}  # fmt: skip


def run_insert_only(settings, pg_pid, rows, batch) -> dict:
    conn = store.connect(settings)
    conn.run("TRUNCATE audit_events")
    meter = Meter(os.getpid(), pg_pid).__enter__()
    for i in range(0, len(rows), batch):
        store.insert_events(conn, rows[i : i + batch])
    cpu = meter.stop()
    conn.close()
    return {
        "path": f"insert_events alone (rows prepared), {batch} rows/transaction",
        "rows": len(rows),
        "rows_per_s": len(rows) / cpu.wall,
        "cpu": cpu,
    }


def run_copy(settings, pg_pid, rows, batch) -> dict:
    conn = store.connect(settings)
    conn.run("TRUNCATE audit_events")
    texts = [copy_text(rows[i : i + batch]) for i in range(0, len(rows), batch)]
    sql = f"COPY audit_events ({', '.join(store.COLUMNS)}) FROM STDIN WITH (FORMAT csv)"
    meter = Meter(os.getpid(), pg_pid).__enter__()
    for text in texts:
        conn.run("BEGIN")
        conn.run(sql, stream=io.StringIO(text))
        conn.run("COMMIT")
    cpu = meter.stop()
    conn.close()
    return {
        "path": f"COPY FROM STDIN (CSV prepared), {batch} rows/transaction (ceiling)",
        "rows": len(rows),
        "rows_per_s": len(rows) / cpu.wall,
        "cpu": cpu,
    }


def produce(settings, events) -> None:
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", linger_ms=5,
        batch_size=256 * 1024, enable_idempotence=True,
    )  # fmt: skip
    for e in events:
        rec = encode(e, ATTESTOR[0])
        producer.send(settings.kafka_events_topic, key=rec.key, value=rec.value,
                      headers=rec.headers)  # fmt: skip
    producer.flush(120)
    producer.close()


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, "
        f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=5000, help="rows per transaction, bulk and COPY")
    ap.add_argument("--duration", type=int, default=15, help="seconds per HTTP run")
    ap.add_argument("--http", default="1:64,1:256,2:256", help="WORKERS:CONNECTIONS runs")
    ap.add_argument("--control", default="1:64,2:256", help="do-nothing function runs")
    ap.add_argument("--bulk-workers", default="1,2")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed for the HTTP runs: apt-get install wrk", file=sys.stderr)
        return 2

    base = load_settings()
    work = Path(tempfile.mkdtemp(prefix="writer-bench-"))
    pg = kafka = None
    try:
        overrides: dict = {}
        if not base.database_configured:
            pg = LocalPostgres(work / "pg").start()
            overrides["database_url"] = pg.create_database("bench")
        if not args.skip_bulk and not base.kafka_configured:
            kafka = LocalKafka(work / "kafka").start()
            overrides["kafka_bootstrap_servers"] = kafka.bootstrap
        settings = with_attestation_keys(base).model_copy(
            update={
                **overrides,
                "kafka_events_topic": f"bench.{uuid.uuid4().hex[:8]}.events",
                "kafka_topic_partitions": 3,
                "db_statement_timeout": 60,
                "db_socket_timeout": 90,
                # wrk's deliveries carry no token: this measures the write path. The token
                # check is the same cached lookup ingest_bench times (auth.py).
                "writer_auth": "disabled",
            }
        )
        ATTESTOR[:] = [ingest_attestor(settings), settings]
        pg_pid = pg.proc.pid if pg else None
        conn = store.connect(settings)
        store.ensure_schema(conn)
        store.ensure_partition(conn, MONTH.date())
        conn.close()

        print(f"machine: {machine()}", flush=True)
        results = []
        runs = [(spec, True) for spec in args.control.split(",") if spec]
        runs += [(spec, False) for spec in args.http.split(",") if spec]
        for spec, trivial in runs:
            wt, conns = spec.split(":")
            workers = int(wt)
            results.append(
                run_http(settings, pg_pid, workers, int(conns), args.duration, work, trivial)
            )
            _print(results[-1])

        events = make_events(args.events)
        rows = [store.event_to_row(e) for e in events]
        if not args.skip_bulk:
            ensure_topics(settings)
            produce(settings, events)
            for w in args.bulk_workers.split(","):
                results.append(run_bulk(settings, pg_pid, args.batch, int(w)))
                _print(results[-1])
            results.append(run_consume_only(settings, args.batch))
            _print(results[-1])
        results.append(run_decode_only(events))
        _print(results[-1])
        results.append(run_insert_only(settings, pg_pid, rows, args.batch))
        _print(results[-1])
        results.append(run_copy(settings, pg_pid, rows, args.batch))
        _print(results[-1])

        print("\n| path | rows | rows/s | machine busy | CPU per 1000 rows | notes |")
        print("| --- | ---: | ---: | ---: | --- | --- |")
        for r in results:
            notes = []
            if "latency" in r:
                notes.append(f"latency {r['latency']}")
                if r["mean_batch"]:
                    notes.append(f"mean batch {r['mean_batch']:.0f}")
                if r["non_2xx"] or r["socket_errors"]:
                    notes.append(f"non-2xx {r['non_2xx']} {r['socket_errors']}".strip())
            print(
                f"| {r['path']} | {r['rows']} | {r['rows_per_s']:,.0f} | "
                f"{r['cpu'].machine:.0%} | {r['cpu'].per_k(r['rows'])} | {'; '.join(notes)} |"
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps([{**r, "cpu": r["cpu"].__dict__} for r in results], indent=2)
            )
        return 0
    finally:
        if kafka:
            kafka.stop()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def _print(r: dict) -> None:
    print(f"{r['path']}: {r['rows']} rows, {r['rows_per_s']:,.0f} rows/s, "
          f"{r['cpu'].per_k(r['rows'])} per 1000 rows, machine {r['cpu'].machine:.0%} busy",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
