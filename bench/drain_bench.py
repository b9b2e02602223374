"""Drain a pre-filled topic through the local KafkaSource and the writer, as `./dev up` ships them.

    .venv/bin/python bench/drain_bench.py --events 50000

Fills a fresh events topic (12 partitions) with N audit events in ingest's own encoding
(`kafka_binding.encode`, the records ingest produces), then starts knative/base through
the local eventing runner (in a child process of its own, as in pipeline_bench) and times
from the first stored row until every event is a row. Reports rows/s and the CPU each
process used per event over that window.

The control phase runs the same runner and manifests with the writer's container
replaced by a function that does nothing (bench/trivial_function.py, same server), on a
topic of its own, and is timed by the KafkaSource's committed offsets: what the runner
and functions-framework cost without the store.

Starts a local Kafka broker and PostgreSQL unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL
point at existing ones. Writes bench/results/drain-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_support import (
    REPO,
    RunnerProcess,
    cpu_of,
    descendants,
    ingest_attestor,
    machine,
    machine_busy,
    tree_cpu,
    with_attestation_keys,
)
from openg2p_audit.contract import AuditEvent
from openg2p_audit.devservices import LocalKafka, LocalPostgres
from openg2p_audit.kafka_binding import encode
from openg2p_audit.settings import Settings, load_settings
from openg2p_audit.store import connect, ensure_schema
from openg2p_audit.topics import ensure_topics
from pipeline_support import module_manifests  # the tests' copy of knative/base

WRITER = "audit-writer"
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # [bench] extra
CONTROL_ENV = {"FUNCTION_TARGET": "trivial", "FUNCTION_SOURCE": "bench/trivial_function.py"}


def _event(n: int, now: str) -> AuditEvent:
    # Shaped like docs/examples/beneficiary-viewed.json (~450 bytes), each its own subject.
    return AuditEvent.model_validate(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "/openg2p/registry",
            "type": "org.openg2p.registry.beneficiary.viewed",
            "subject": f"beneficiary/BEN-{n:09d}",
            "time": now,
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "data": {
                "actor": {"id": "officer-17", "roles": ["enrollment_officer"]},
                "action": "view",
                "outcome": "success",
                "resource": {"type": "beneficiary", "id": f"BEN-{n % 100000:06d}"},
            },
        }
    )


def fill(settings: Settings, n: int) -> float:
    """Produce n events to the events topic as ingest does; returns the seconds it took."""
    t0 = time.monotonic()
    attestor = ingest_attestor(settings)
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    producer = KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, acks="all", enable_idempotence=True,
        linger_ms=5, batch_size=256 * 1024,
    )  # fmt: skip
    for i in range(n):
        record = encode(_event(i, now), attestor)
        producer.send(
            settings.kafka_events_topic, value=record.value, key=record.key,
            headers=record.headers,
        )  # fmt: skip
    producer.flush()
    producer.close()
    return time.monotonic() - t0


def _committed(settings: Settings) -> int:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    try:
        group = settings.kafka_consumer_group
        return sum(o.offset for o in admin.list_group_offsets(group).get(group, {}).values())
    finally:
        admin.close()


def _rows(conn) -> int:
    return conn.run("SELECT count(*) FROM audit_events")[0][0]


def _profile(procs: dict[str, tuple[int, bool]], directory: Path | None, tag: str) -> list:
    """py-spy on the runner and the writer's worker for the drain window: collapsed stacks of
    the thread holding the GIL, i.e. where the Python CPU goes."""
    if directory is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    spies = []
    for name in ("runner", "writer"):
        pid, tree = procs[name]
        target = descendants(pid)[-1] if tree else pid  # gunicorn's worker, not its arbiter
        out = directory / f"{tag}-{name}.txt"
        spies.append(subprocess.Popen(
            [PY_SPY, "record", "--gil", "-r", "200", "-f", "raw", "-o", str(out), "-p",
             str(target)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    return spies


def phase(
    name: str, base: Settings, workdir: Path, n: int, control: bool, pids: dict,
    profile: Path | None = None, max_poll_records: int = 50,
) -> dict:  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    settings = with_attestation_keys(base).model_copy(
        update={
            "kafka_events_topic": f"drain.{tag}.events",
            "kafka_dlq_topic": f"drain.{tag}.dlq",
            "kafka_consumer_group": f"drain.{tag}.group",
        }
    )
    ensure_topics(settings)
    filled_in = fill(settings, n)
    env = {WRITER: CONTROL_ENV} if control else None
    manifests = module_manifests(settings, workdir / f"manifests-{name}", env=env)
    conn = connect(settings, "drain-bench")
    ensure_schema(conn, settings.partitions_ahead_months)  # as the writer does at start
    before = _rows(conn)
    progress = (lambda: _committed(settings)) if control else (lambda: _rows(conn) - before)
    (workdir / name).mkdir()
    runner = RunnerProcess(manifests, settings, workdir / name, max_poll_records).start()
    try:
        procs = {
            "runner": (runner.pid, False),
            "writer": (runner.info["pids"][WRITER], True),
            **pids,
        }
        deadline = time.monotonic() + 1200
        while (done0 := progress()) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0, cpu0, busy0 = time.monotonic(), _cpu(procs), machine_busy()
        spies = _profile(procs, profile, name)
        while (done := progress()) < n and time.monotonic() < deadline:
            time.sleep(0.1 if control else 0.05)
        t1, cpu1, busy1 = time.monotonic(), _cpu(procs), machine_busy()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        commits = {} if control else _commit_metrics(runner.info["services"][WRITER])
    finally:
        runner.stop()
        conn.close()
    elapsed = t1 - t0
    counted = done - done0
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    return {
        "phase": name,
        "events": n,
        "max_poll_records": max_poll_records,
        "filled_in_s": round(filled_in, 2),
        "measured_events": counted,
        "complete": done >= n,
        "seconds": round(elapsed, 2),
        "per_s": round(counted / elapsed) if elapsed else None,
        "cpu_cores": {k: round(v / elapsed, 2) for k, v in cpu.items()},
        "cpu_us_per_event": {k: round(v / counted * 1e6) for k, v in cpu.items() if counted},
        "machine_busy": round((busy1[0] - busy0[0]) / (busy1[1] - busy0[1]), 2),
        "writer_commits": commits,
    }


def _commit_metrics(writer_url: str) -> dict[str, float]:
    """Group commits over the whole phase, from the writer's /metrics (all workers)."""
    text = urllib.request.urlopen(f"{writer_url}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("audit_writer_batch_size_sum", "audit_writer_batch_size_count",
                    "audit_writer_commit_seconds_sum"):  # fmt: skip
            values[name] = float(value)
    count = values.get("audit_writer_batch_size_count") or 0
    if not count:
        return {}
    return {
        "commits": int(count),
        "mean_batch": round(values["audit_writer_batch_size_sum"] / count, 1),
        "mean_commit_ms": round(values["audit_writer_commit_seconds_sum"] / count * 1000, 2),
    }


def _cpu(procs: dict[str, tuple[int, bool]]) -> dict[str, float]:
    return {k: tree_cpu(pid) if tree else cpu_of(pid, children=False)
            for k, (pid, tree) in procs.items()}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--no-control", action="store_true", help="skip the do-nothing phase")
    ap.add_argument("--max-poll-records", type=int, default=50, help="as dev up --max-poll-records")
    ap.add_argument("--profile", type=Path, help="py-spy the runner and writer into this dir")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="drain-bench-"))
    base = load_settings()
    kafka = pg = None
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "loadavg_before": os.getloadavg(),
        "command": " ".join([".venv/bin/python", "bench/drain_bench.py", *sys.argv[1:]]),
    }
    try:
        updates: dict[str, Any] = {}
        pids: dict[str, tuple[int, bool]] = {}
        if not base.kafka_configured:
            kafka = LocalKafka(workdir / "kafka").start()
            updates["kafka_bootstrap_servers"] = kafka.bootstrap
            pids["kafka"] = (kafka.proc.pid, True)
        if not base.database_configured:
            pg = LocalPostgres(workdir / "postgres").start()
            updates["database_url"] = pg.create_database("openg2p_audit")
            pids["postgres"] = (pg.proc.pid, True)
        base = base.model_copy(update=updates | {"db_host": None})
        result["phases"] = [
            phase(
                "writer",
                base,
                workdir,
                args.events,
                False,
                pids,
                args.profile,
                args.max_poll_records,
            )
        ]
        print(json.dumps(result["phases"][-1]), flush=True)
        if not args.no_control:
            result["phases"].append(
                phase(
                    "control",
                    base,
                    workdir,
                    args.events,
                    True,
                    pids,
                    args.profile,
                    args.max_poll_records,
                )
            )
            print(json.dumps(result["phases"][-1]), flush=True)
    finally:
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    out = REPO / "bench" / "results" / f"drain-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0 if all(p["complete"] for p in result["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
