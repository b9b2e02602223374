"""Throughput and latency of the ingest function, over real HTTP, against a real broker.

One command, from the repository root:

    .venv/bin/python bench/ingest_bench.py

It starts a local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS points at one),
creates fresh topics, serves the ingest function with functions-framework
exactly as a deployment does (ASGI mode, WORKERS as given), then drives it with
keep-alive HTTP clients in separate processes: first single-event requests,
then batches. Every request waits for Kafka's acknowledgement (acks=all), as
in production. It prints requests/s, events/s, p50 and p99 latency per phase.

Options: --workers (functions-framework --asgi), --clients (client
processes), --connections (per client), --seconds (per phase), --batch
(events per batch request), --linger (INGEST_LINGER_MS), --only single|batch,
--no-auth (INGEST_AUTH=disabled, to see what tokens cost).

Tokens are on by default, as deployed: every request carries one service's
bearer token from a local issuer, so after the first request of each worker
the check is the per-token cache. Before the HTTP phases the benchmark also
times the check itself in this process (first verification with the JWKS
cached, then a repeated token), which is the per-request cost of
authentication; the target is at most 30 µs for a repeated token.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from openg2p_audit.auth import TokenVerifier
from openg2p_audit.devservices import LocalFunction, LocalKafka
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.settings import load_settings
from openg2p_audit.topics import ensure_topics


def _event(client: int, seq_placeholder: str) -> dict:
    # Shaped like docs/examples/beneficiary-viewed.json (about 450 bytes as JSON).
    return {
        "specversion": "1.0",
        "id": f"bench-{client:03d}-{seq_placeholder}",
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "subject": f"beneficiary/BEN-{seq_placeholder}",
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "data": {
            "actor": {"id": "officer-17", "roles": ["enrollment_officer"], "session_id": "s-1"},
            "action": "view",
            "outcome": "success",
            "resource": {"type": "beneficiary", "id": "BEN-000482", "program_id": "PRG-1"},
        },
    }


SEQ = "%(seq)012d"
# The request header line carrying the callers' token ("" with --no-auth); set in main()
# before the client processes fork.
AUTH_LINE = ""
POLICY = 'callers:\n  openg2p-registry:\n    sources: ["/openg2p/registry"]\n'


def _templates(client: int, batch: int) -> tuple[bytes, int]:
    """An HTTP request with `batch` events whose ids are filled in per request."""
    if batch == 1:
        body = json.dumps(_event(client, SEQ))
        ctype = "application/cloudevents+json"
    else:
        body = json.dumps([_event(client, SEQ.replace("seq", f"s{i}")) for i in range(batch)])
        ctype = "application/cloudevents-batch+json"
    length = len(body % _seq_values(0, batch))
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{AUTH_LINE}"
        f"Content-Length: {length}\r\n\r\n"
    )
    return (head + body).encode(), batch


def _seq_values(n: int, batch: int) -> dict[str, int]:
    if batch == 1:
        return {"seq": n}
    return {f"s{i}": n * batch + i for i in range(batch)}


def _client(port, client, batch, connections, start_at, stop_at, out):
    """One process: `connections` keep-alive connections, each one request at a time."""
    template, _ = _templates(client, batch)
    template = template.decode()
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    seq = 0

    def send(sock, state):
        nonlocal seq
        seq += 1
        state["t0"] = time.perf_counter()
        state["buf"] = b""
        sock.sendall((template % _seq_values(seq, batch)).encode())

    while time.time() < start_at:
        time.sleep(0.01)
    states = {}
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        states[s] = {}
        sel.register(s, selectors.EVENT_READ)
        send(s, states[s])
    while states:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            st = states[s]
            chunk = s.recv(65536)
            if not chunk:
                sel.unregister(s)
                del states[s]
                continue
            st["buf"] += chunk
            head, sep, rest = st["buf"].partition(b"\r\n\r\n")
            if not sep:
                continue
            lower = head.lower()
            i = lower.find(b"content-length:")
            length = int(lower[i + 15 : lower.find(b"\r\n", i)]) if i >= 0 else 0
            if len(rest) < length:
                continue
            latencies.append(time.perf_counter() - st["t0"])
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
            if time.time() >= stop_at or b"connection: close" in lower:
                sel.unregister(s)
                s.close()
                del states[s]
            else:
                send(s, st)
    t = os.times()
    out.put((latencies, statuses, t.user + t.system))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by these processes and their children (Linux /proc)."""
    total = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    seen = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


def run_phase(port, batch, clients, connections, seconds, watch, warmup=2.0):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.5
    # Warm-up requests are made but not counted.
    warm = [
        ctx.Process(target=_client, args=(port, 900 + c, batch, connections, start_at,
                                          start_at + warmup, out))
        for c in range(clients)
    ]  # fmt: skip
    for p in warm:
        p.start()
    for _ in warm:
        out.get()
    for p in warm:
        p.join()
    start_at = time.time() + 0.3
    stop_at = start_at + seconds
    procs = [
        ctx.Process(target=_client, args=(port, c, batch, connections, start_at, stop_at, out))
        for c in range(clients)
    ]
    for p in procs:
        p.start()
    cpu_before = {name: cpu_seconds(pids) for name, pids in watch.items()}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    client_cpu = 0.0
    for _ in procs:
        lat, st, used = out.get()
        client_cpu += used
        latencies.extend(lat)
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    cpu_after = {name: cpu_seconds(pids) for name, pids in watch.items()}
    for p in procs:
        p.join()
    elapsed = time.time() - start_at
    latencies.sort()
    ok = statuses.get(202, 0)

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "batch": batch,
        "requests": len(latencies),
        "statuses": statuses,
        "seconds": round(elapsed, 2),
        "req_per_s": round(ok / elapsed),
        "events_per_s": round(ok * batch / elapsed),
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        # Share of one core each part used during the phase.
        "cpu": {
            **{n: round((cpu_after[n] - cpu_before[n]) / elapsed, 2) for n in watch},
            "clients": round(client_cpu / elapsed, 2),
        },
    }


def measure_auth(settings, issuer: LocalIssuer, rounds: int = 20_000) -> dict[str, float]:
    """Microseconds per check: a new token (JWKS already cached), and a repeated one."""
    verifier = TokenVerifier.for_settings(settings)
    verifier.verify(issuer.mint("warm-up", ()))  # fetches the JWKS once
    fresh = [issuer.mint(f"caller-{i}", ()) for i in range(200)]
    started = time.perf_counter()
    for token in fresh:
        verifier.verify(token)
    first = (time.perf_counter() - started) / len(fresh) * 1e6
    token = fresh[0]
    started = time.perf_counter()
    for _ in range(rounds):
        verifier.cached(token)
    repeated = (time.perf_counter() - started) / rounds * 1e6
    return {"new token (RS256 verify)": first, "repeated token (cache)": repeated}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, "
        f"load average before the run {load[0]:.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32, help="per client process")
    ap.add_argument("--batch-connections", type=int, default=4, help="per client, batch phase")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--linger", type=int, default=None, help="INGEST_LINGER_MS")
    ap.add_argument("--only", choices=["single", "batch"])
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also serve bench/baseline (validate, no Kafka) with the same settings and load",
    )
    ap.add_argument("--no-auth", action="store_true", help="INGEST_AUTH=disabled")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-log", action="store_true", help="print the function's log path")
    args = ap.parse_args()

    print(f"machine: {machine()}", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    base = load_settings()
    kafka = None
    if not base.kafka_configured:
        kafka = LocalKafka(workdir / "kafka").start()
        base = base.model_copy(update={"kafka_bootstrap_servers": kafka.bootstrap})
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "kafka_events_topic": f"bench.{tag}.events",
            "kafka_dlq_topic": f"bench.{tag}.dlq",
            "kafka_topic_partitions": 12,
            "ingest_max_pending_events": 1_000_000,
        }
        | ({"ingest_linger_ms": args.linger} if args.linger is not None else {})
    )
    ensure_topics(settings)
    issuer = None
    auth_costs: dict[str, float] = {}
    if args.no_auth:
        settings = settings.model_copy(update={"ingest_auth": "disabled"})
    else:
        global AUTH_LINE
        issuer = LocalIssuer().serve()
        settings = settings.model_copy(
            update={
                "ingest_auth": "required", "ingest_source_policy": POLICY,
                "auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url,
            }
        )  # fmt: skip
        token = issuer.mint("service-account-openg2p-registry", (), azp="openg2p-registry")
        AUTH_LINE = f"Authorization: Bearer {token}\r\n"
        auth_costs = measure_auth(settings, issuer)
        print(
            "authentication, per request: "
            + ", ".join(f"{k} {v:.1f} µs" for k, v in auth_costs.items()),
            flush=True,
        )
    from bench_support import with_attestation_keys

    settings = with_attestation_keys(settings)
    fn = LocalFunction("ingest", "ingest", settings, workdir, workers=args.workers)
    fn.start()
    results: list[dict] = []
    print(
        f"ingest: WORKERS={args.workers} (uvicorn workers) "
        f"INGEST_LINGER_MS={settings.ingest_linger_ms}; clients: {args.clients} processes",
        flush=True,
    )
    watch = {"ingest": [fn.proc.pid]}
    if kafka is not None:
        watch["kafka"] = [kafka.proc.pid]
    try:
        if args.baseline:
            base_fn = LocalFunction(
                "baseline", "baseline", settings, workdir, workers=args.workers,
                source="bench/baseline/main.py",
            ).start()  # fmt: skip
            try:
                r = run_phase(
                    base_fn.port, 1, args.clients, args.connections, args.seconds,
                    {"baseline": [base_fn.proc.pid]},
                )  # fmt: skip
            finally:
                base_fn.stop()
            r["connections"] = args.clients * args.connections
            r["name"] = "baseline: validate only, no Kafka"
            results.append(r)
            print(f"baseline: {json.dumps(r)}", flush=True)
        if args.only in (None, "single"):
            r = run_phase(fn.port, 1, args.clients, args.connections, args.seconds, watch)
            r["connections"] = args.clients * args.connections
            results.append(r)
            print(f"single events: {json.dumps(r)}", flush=True)
        for size in args.batch if args.only in (None, "batch") else []:
            r = run_phase(fn.port, size, args.clients, args.batch_connections, args.seconds, watch)
            r["connections"] = args.clients * args.batch_connections
            results.append(r)
            print(f"batches of {size}: {json.dumps(r)}", flush=True)
    finally:
        fn.stop()
        if args.keep_log:
            print(f"function log: {fn.log_path}")
        if kafka is not None:
            kafka.stop()
        if issuer is not None:
            issuer.stop()
    if auth_costs:
        print("\n| authentication | µs per request |")
        print("| --- | --- |")
        for k, v in auth_costs.items():
            print(f"| {k} | {v:.1f} |")
    print(f"\ntokens: {'off (INGEST_AUTH=disabled)' if args.no_auth else 'on'}")
    print("\n| phase | connections | requests/s | events/s | p50 ms | p99 ms | non-202 | CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        bad = sum(v for k, v in r["statuses"].items() if k != 202)
        name = r.get("name") or ("single event" if r["batch"] == 1 else f"batch of {r['batch']}")
        print(
            f"| {name} | {r['connections']} | {r['req_per_s']:,} | {r['events_per_s']:,} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {bad} "
            f"| {', '.join(f'{k} {v}' for k, v in r['cpu'].items())} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
