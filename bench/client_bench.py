"""What `AuditClient.emit` costs the emitting service, per event, with and without the outbox.

Phases, each `--events` events from one thread, timing every `emit` call:

- `prepare only`: building, checking (JSON Schema subset and the contract's rules) and
  encoding an event, nothing kept or sent: the floor under every other phase.
- `outbox, sender idle`: emit into the outbox while the sender has nowhere to send
  (a closed port): the commit (WAL, synchronous=FULL: one fsync per emit) alone.
- `outbox, sender delivering`: the same while the sender delivers to a real ingest, so
  the emitting thread shares the outbox and the GIL with it; then the drain is timed.
- `outbox, emit_events of 100`: one transaction per 100 events.
- `no outbox (synchronous)`: every emit is one HTTP request to ingest that returns once
  Kafka acknowledged it.

Ingest runs as deployed (functions-framework, one worker, a local Kafka broker) with
tokens off: their cost is measured by ingest_bench.py. Prints a Markdown table and
writes bench/results/client-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench_support import REPO, machine
from openg2p_audit.devservices import LocalFunction, LocalKafka
from openg2p_audit.devservices._process import free_port
from openg2p_audit.settings import load_settings
from openg2p_audit.topics import ensure_topics
from openg2p_audit_client import AuditClient
from openg2p_audit_client.event import build_event


def args_for(n: int) -> dict:
    return dict(
        type="org.openg2p.registry.beneficiary.updated", source="/openg2p/registry",
        actor={"type": "user", "id": "officer-17", "roles": ["registrar"]}, action="update",
        outcome="success", resource={"type": "beneficiary", "id": f"BEN-{n:07d}"},
        subject=f"beneficiary/BEN-{n:07d}",
        changes=[{"field": "phone", "old": "+254700000001", "new": "+254700000002"}],
        context={"office": "nairobi-north", "request_id": uuid.uuid4().hex},
    )  # fmt: skip


def summary(name: str, seconds: list[float], extra: dict | None = None) -> dict:
    us = sorted(s * 1e6 for s in seconds)
    out = {
        "name": name,
        "events": len(us),
        "mean_us": round(statistics.fmean(us), 1),
        "p50_us": round(us[len(us) // 2], 1),
        "p99_us": round(us[int(len(us) * 0.99) - 1], 1),
        "events_per_s": round(len(us) / sum(seconds)),
    }
    out.update(extra or {})
    print(json.dumps(out), flush=True)
    return out


def timed(n: int, call) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=5000, help="events per phase")
    ap.add_argument("--workdir", help="where the outboxes and logs go (default: a temp dir)")
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="client-bench-"))
    base = load_settings()
    kafka = None
    if not base.kafka_configured:
        kafka = LocalKafka(workdir / "kafka").start()
        base = base.model_copy(update={"kafka_bootstrap_servers": kafka.bootstrap})
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={"kafka_events_topic": f"bench.{tag}.events", "kafka_dlq_topic": f"bench.{tag}.dlq",
                "kafka_topic_partitions": 12, "ingest_auth": "disabled"}
    )  # fmt: skip
    ensure_topics(settings)
    fn = LocalFunction("ingest", "ingest", settings, workdir).start()
    url = fn.url + "/"
    n = args.events
    results = []
    try:
        probe = AuditClient(url, prometheus=False)
        results.append(summary("prepare only", timed(n, lambda i: probe.prepare(
            build_event(**args_for(i))))))  # fmt: skip

        idle = AuditClient(f"http://127.0.0.1:{free_port()}/", None, workdir / "idle.db",
                           prometheus=False, backoff_initial=30)  # fmt: skip
        results.append(summary("outbox, sender idle", timed(n, lambda i: idle.emit(**args_for(i)))))
        idle.close(timeout=0)

        live = AuditClient(url, None, workdir / "live.db", prometheus=False)
        started = time.perf_counter()
        seconds = timed(n, lambda i: live.emit(**args_for(i)))
        assert live.flush(300), live.metrics()
        drained = time.perf_counter() - started
        extra = {"emit_to_drained_events_per_s": round(n / drained), "events_sent": live.sent}
        results.append(summary("outbox, sender delivering", seconds, extra))
        live.close()

        grouped = AuditClient(url, None, workdir / "grouped.db", prometheus=False)
        per_call = timed(n // 100, lambda i: grouped.emit_events(
            [build_event(**args_for(i * 100 + k)) for k in range(100)]))  # fmt: skip
        assert grouped.flush(300)
        grouped.close()
        results.append(summary("outbox, emit_events of 100", [s / 100 for s in per_call
                                                              for _ in range(100)]))  # fmt: skip

        sync = AuditClient(url, None, prometheus=False)
        results.append(summary("no outbox (synchronous)", timed(n, lambda i: sync.emit(
            **args_for(i)))))  # fmt: skip
    finally:
        fn.stop()
        if kafka is not None:
            kafka.stop()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"client-{stamp}.json"
    out.write_text(json.dumps({"machine": machine(), "events": n, "results": results}, indent=2))
    print(f"\nresults: {out.relative_to(REPO)}\n")
    print("| phase | mean µs/event | p50 µs | p99 µs | events/s (one thread) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['name']} | {r['mean_us']:,} | {r['p50_us']:,} | {r['p99_us']:,} "
              f"| {r['events_per_s']:,} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
