"""Sustained load through the whole pipeline, as deployed, on one machine.

    .venv/bin/python bench/pipeline_bench.py --duration 60 --rate 2000

ingest → Kafka → KafkaSource (local eventing runner) → writer → PostgreSQL, all on
127.0.0.1, from the real knative/base manifests (topics and group renamed). Starts a
local Kafka broker and PostgreSQL unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point
at existing ones, and runs the Runner in a child process of its own.

Load: `--clients` processes, each an open-loop generator: request k of a client is due
at start + k / (its share of the rate), sent on one of its keep-alive connections that
is free (a request that finds none free goes out late, and is counted as late). Every
request is a batch (`application/cloudevents-batch+json`, `--batch` events; 1 sends
single structured events).

Measured, per second and in total:

- ingest: events answered 202 (each 202 means Kafka acknowledged every event);
- stored: rows in audit_events (`count(*)` once a second);
- emit-to-queryable latency: for one event of every 202-answered request, the time from
  the client reading the 202 to the start of the first poll (every `--poll-ms`) whose
  `SELECT id FROM audit_events WHERE id = ANY(...)` returns it. The row was visible by
  then, and not at the previous poll, so the figure is an upper bound, at most one poll
  interval plus the query's own time above the true one. Same clock (one machine);
- Kafka consumer lag of the KafkaSource's group (committed offsets from the admin client's
  list_group_offsets vs end offsets, every second; the runner commits every 0.5 s);
- CPU used by each process (ingest, writer, maintenance, runner, Kafka, PostgreSQL, load
  generator, this monitor), from /proc.

After the load: how long the pipeline takes to store the backlog (up to `--drain`), then
cold starts: each function started fresh `--cold-repeats` times with `python -m
functions_framework` and the environment the runner gives it, timed from process start
to (a) its first answer to a GET and (b) its first 2xx to a real request.

Writes bench/results/pipeline-<UTC timestamp>.json and, with matplotlib installed
(`pip install -e '.[bench]'`), a plot (`--plot`, default docs/img/pipeline-bench.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pg8000.native
import urllib3
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_support import (
    REPO,
    RunnerProcess,
    cpu_of,
    machine,
    machine_busy,
    service_envs,
    tree_cpu,
)
from openg2p_audit.devservices import LocalKafka, LocalPostgres
from openg2p_audit.devservices.kafka import KAFKA_VERSION
from openg2p_audit.settings import Settings, load_settings
from openg2p_audit.topics import ensure_topics
from pipeline_support import module_manifests  # the tests' copy of knative/base

INGEST, WRITER, MAINTENANCE = "audit-ingest", "audit-writer", "audit-maintenance"
IDLE_RECONNECT_S = 1.0
TARGET_RATE, TARGET_P99_S = 2000, 2.0  # drawn on the plot


# ----------------------------------------------------------------------------- events


def _now_z() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(event_id: str, n: int) -> dict[str, Any]:
    # Shaped like docs/examples/beneficiary-viewed.json (~450 bytes); each its own subject.
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/openg2p/registry",
        "type": "org.openg2p.registry.beneficiary.viewed",
        "subject": f"beneficiary/BEN-{n:09d}",
        "time": _now_z(),
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "data": {
            "actor": {"id": "officer-17", "roles": ["enrollment_officer"], "session_id": "s-1"},
            "action": "view",
            "outcome": "success",
            "resource": {"type": "beneficiary", "id": f"BEN-{n % 100000:06d}"},
        },
    }


def _request(tag: str, client: int, seq: int, batch: int) -> tuple[bytes, str]:
    """One HTTP request, and the id of the event in it whose latency is tracked."""
    base = (client * 10_000_000 + seq) * batch
    ids = [f"{tag}-{client}-{seq}-{i}" for i in range(batch)]
    if batch == 1:
        body = json.dumps(_event(ids[0], base)).encode()
        ctype = "application/cloudevents+json"
    else:
        body = json.dumps([_event(ids[i], base + i) for i in range(batch)]).encode()
        ctype = "application/cloudevents-batch+json"
    head = (
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body, ids[seq % batch]


# ----------------------------------------------------------------------------- load generator


def _client(port, tag, client, batch, req_rate, connections, start_at, stop_at, samples, out):
    """Open loop: request k is due at start_at + k / req_rate; sent on a free connection."""
    sel = selectors.DefaultSelector()
    free: deque[socket.socket] = deque()  # first in, first out: every connection stays warm
    states: dict[socket.socket, dict] = {}

    def connect() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        states[s] = {}
        sel.register(s, selectors.EVENT_READ)
        free.append(s)

    def drop(s: socket.socket) -> None:
        sel.unregister(s)
        s.close()
        del states[s]
        if s in free:
            free.remove(s)

    for _ in range(connections):
        connect()
    acks: list[tuple[float, int, int, float]] = []  # (time of answer, status, events, latency s)
    seq = late = 0
    while time.time() < start_at:
        time.sleep(0.005)
    interval = 1.0 / req_rate
    next_due = start_at
    while True:
        now = time.time()
        while now >= next_due and next_due < stop_at and free:
            s = free.popleft()
            if now - states[s].get("used", now) > IDLE_RECONNECT_S:
                # gunicorn closes keep-alive connections idle for 2 s; a request sent just as
                # it does would fail for a reason that has nothing to do with the pipeline.
                drop(s)
                connect()
                s = free.pop()
            payload, tracked = _request(tag, client, seq, batch)
            seq += 1
            if now - next_due > 0.05:
                late += 1
            states[s].update(t0=now, buf=b"", tracked=tracked, used=now)
            s.sendall(payload)
            next_due += interval
            now = time.time()
        busy = len(states) - len(free)
        if next_due >= stop_at and busy == 0:
            break
        wait = max(0.0, min(next_due - now, 0.5)) if free and next_due < stop_at else 0.5
        for key, _ in sel.select(timeout=wait):
            s = key.fileobj
            st = states[s]
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                # The server closed it: idle (keep-alive timeout) or, mid-request, an error.
                if s not in free:
                    acks.append((time.time(), 0, batch, time.time() - st["t0"]))
                drop(s)
                connect()
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
            t = time.time()
            status = int(head[9:12])
            acks.append((t, status, batch, t - st["t0"]))
            st["used"] = t
            if status == 202:
                samples.put((st["tracked"], t))
            free.append(s)
    t = os.times()
    out.put({"acks": acks, "late": late, "sent": seq, "cpu": t.user + t.system})


# ----------------------------------------------------------------------------- monitor


class Monitor:
    """Threads in this process: sampled-id visibility polls, and once a second the row
    count, the consumer lag and the CPU of every party."""

    def __init__(self, settings: Settings, samples: Any, pids: dict[str, tuple[int, bool]]):
        self.settings = settings
        self.samples = samples
        self.pids = pids  # name -> (pid, whole tree?)
        self.pending: dict[str, float] = {}
        self.visible: list[tuple[str, float, float]] = []  # (id, ack time, seen-by time)
        self.seconds: list[dict[str, Any]] = []
        self.stop_load = threading.Event()
        self.stop_all = threading.Event()
        self.poll_s = 0.1
        self.stopped_at = 0.0
        self._threads: list[threading.Thread] = []
        self.t0 = time.time()

    def start(self, t0: float, poll_ms: int) -> Monitor:
        self.t0, self.poll_s = t0, poll_ms / 1000
        for fn in (self._visibility, self._per_second):
            th = threading.Thread(target=fn, daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> None:
        self.stop_all.set()
        for th in self._threads:
            th.join(30)
        self._drain_samples()
        self.stopped_at = time.time()

    def _drain_samples(self) -> None:
        while True:
            try:
                event_id, t = self.samples.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty from a multiprocessing queue
                return
            self.pending[event_id] = t

    def _visibility(self) -> None:
        conn = pg8000.native.Connection(**self.settings.pg_connect_kwargs)
        try:
            while not self.stop_all.is_set():
                started = time.time()
                self._drain_samples()
                if self.pending:
                    ids = list(self.pending)
                    with contextlib.suppress(Exception):
                        for (found,) in conn.run(
                            "SELECT id FROM audit_events WHERE id = ANY(:ids)", ids=ids
                        ):
                            t_ack = self.pending.pop(found, None)
                            if t_ack is not None:
                                self.visible.append((found, t_ack, started))
                self.stop_all.wait(max(0.0, self.poll_s - (time.time() - started)))
        finally:
            conn.close()

    def _cpu(self) -> dict[str, float]:
        out = {n: (tree_cpu(p) if tree else cpu_of(p, children=False)) for n, (p, tree) in
               self.pids.items()}  # fmt: skip
        busy, total = machine_busy()
        out["_machine_busy"], out["_machine_total"] = busy, total
        return out

    def _per_second(self) -> None:
        s = self.settings
        conn = pg8000.native.Connection(**s.pg_connect_kwargs)
        admin = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers)
        parts = consumer.partitions_for_topic(s.kafka_events_topic) or set()
        tps = [TopicPartition(s.kafka_events_topic, p) for p in sorted(parts)]
        prev_cpu = self._cpu()
        prev_t = time.time()
        tick = self.t0
        try:
            while not self.stop_all.is_set():
                tick += 1.0
                self.stop_all.wait(max(0.0, tick - time.time()))
                row: dict[str, Any] = {"t": round(time.time() - self.t0, 3)}
                try:
                    row["stored"] = conn.run("SELECT count(*) FROM audit_events")[0][0]
                except Exception:  # noqa: BLE001 - the table appears with the first write
                    row["stored"] = 0
                try:
                    ends = consumer.end_offsets(tps)
                    group = s.kafka_consumer_group
                    committed = admin.list_group_offsets(group).get(group, {})
                    row["end"] = sum(ends.values())
                    row["lag"] = sum(
                        e - max(committed[tp].offset, 0) if tp in committed else e
                        for tp, e in ends.items()
                    )
                except Exception as exc:  # noqa: BLE001 - one missed sample is fine
                    row["lag_error"] = repr(exc)
                cpu, now = self._cpu(), time.time()
                dt = now - prev_t
                row["cpu"] = {
                    n: round((cpu[n] - prev_cpu[n]) / dt, 3) for n in cpu if not n.startswith("_")
                }
                row["cpu"]["machine_busy"] = round(
                    (cpu["_machine_busy"] - prev_cpu["_machine_busy"])
                    / max(cpu["_machine_total"] - prev_cpu["_machine_total"], 1e-9),
                    3,
                )
                prev_cpu, prev_t = cpu, now
                row["pending_samples"] = len(self.pending)
                self.seconds.append(row)
        finally:
            conn.close()
            admin.close()
            consumer.close()


# ----------------------------------------------------------------------------- cold starts


def _binary_ce(event_id: str, ce_type: str, source: str, data: dict) -> tuple[dict, bytes]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": ce_type,
        "ce-time": _now_z(),
        "Content-Type": "application/json",
    }
    return headers, json.dumps(data).encode()


def _first_ok(service: str, url: str) -> tuple[str, str, dict[str, str], bytes, tuple]:
    """The GET that shows the server is up, and the real request whose 2xx counts."""
    eid = f"cold-{uuid.uuid4()}"
    if service == INGEST:
        body = json.dumps(_event(eid, 0)).encode()
        return "/healthz", url, {"Content-Type": "application/cloudevents+json"}, body, (202,)
    if service == WRITER:
        ev = _event(eid, 0)
        headers, body = _binary_ce(eid, ev["type"], ev["source"], ev["data"])
        headers.update({"ce-subject": ev["subject"], "ce-time": ev["time"]})
        return "/healthz", url, headers, body, (200, 201)
    headers, body = _binary_ce(
        eid, "dev.knative.sources.ping", "/apis/v1/namespaces/default/pingsources/x", {}
    )
    return "/", url, headers, body, (200, 201, 202, 204)


def cold_start(service: str, env: dict[str, str], workdir: Path) -> dict[str, float]:
    port = _free_port()
    full = {**os.environ, **env, "PORT": str(port), "HOST": "127.0.0.1"}
    url = f"http://127.0.0.1:{port}"
    get_path, post_url, headers, body, ok = _first_ok(service, url)
    http = urllib3.PoolManager(retries=False)
    log = open(workdir / f"cold-{service}.log", "ab")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions_framework"], cwd=REPO, env=full, stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    out: dict[str, float] = {}
    try:
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}")
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                r = http.request("GET", url + get_path, timeout=1.0)
                if r.status < 500:
                    out["first_answer_s"] = time.perf_counter() - t0
                    out["first_answer_status"] = r.status
                    break
            time.sleep(0.005)
        while time.perf_counter() < deadline:
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                r = http.request("POST", post_url, headers=headers, body=body, timeout=5.0)
                if r.status in ok:
                    out["first_2xx_s"] = time.perf_counter() - t0
                    out["first_2xx_status"] = r.status
                    break
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _env_overrides(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    env: dict[str, dict[str, str]] = {}
    for service, workers, threads in (
        (INGEST, args.ingest_workers, args.ingest_threads),
        (WRITER, args.writer_workers, args.writer_threads),
    ):
        over = {}
        if workers:
            over["WORKERS"] = str(workers)
        if threads:
            over["THREADS"] = str(threads)
        if over:
            env[service] = over
    return env


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pipeline-bench-"))
    base = load_settings()
    result: dict[str, Any] = {
        "started": _now_z(),
        "machine": machine(),
        "loadavg_before": os.getloadavg(),
        "command": " ".join([".venv/bin/python", "bench/pipeline_bench.py", *sys.argv[1:]]),
    }
    kafka = pg = None
    runner: RunnerProcess | None = None
    try:
        updates: dict[str, Any] = {}
        if not base.kafka_configured:
            kafka = LocalKafka(workdir / "kafka").start()
            updates["kafka_bootstrap_servers"] = kafka.bootstrap
        if not base.database_configured:
            pg = LocalPostgres(workdir / "postgres").start()
            updates["database_url"] = pg.create_database("openg2p_audit")
        tag = uuid.uuid4().hex[:8]
        settings = base.model_copy(
            update=updates
            | {
                "kafka_events_topic": f"bench.{tag}.events",
                "kafka_dlq_topic": f"bench.{tag}.dlq",
                "kafka_consumer_group": f"bench.{tag}.group",
                "kafka_topic_partitions": args.partitions,
                "db_host": None,
            }
        )
        ensure_topics(settings)
        conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
        result["versions"] = {
            "kafka": KAFKA_VERSION if kafka else "external",
            "postgresql": conn.run("SHOW server_version")[0][0],
        }
        conn.close()
        overrides = _env_overrides(args)
        manifests = module_manifests(settings, workdir / "manifests", env=overrides)
        envs = service_envs(manifests, settings, settings.database_url or "")
        result["service_env"] = {
            n: {k: e.get(k) for k in ("WORKERS", "THREADS")} for n, e in envs.items()
        }
        print(f"workdir {workdir}; service env {result['service_env']}", flush=True)
        runner = RunnerProcess(manifests, settings, workdir).start()
        info = runner.info
        ingest_port = int(info["services"][INGEST].rsplit(":", 1)[1])
        pids: dict[str, tuple[int, bool]] = {
            "ingest": (info["pids"][INGEST], True),
            "writer": (info["pids"][WRITER], True),
            "maintenance": (info["pids"][MAINTENANCE], True),
            "runner": (runner.pid, False),
            "monitor": (os.getpid(), False),
        }
        if kafka is not None:
            pids["kafka"] = (kafka.proc.pid, True)
        if pg is not None:
            pids["postgres"] = (pg.proc.pid, True)
        result.update(_load(args, settings, ingest_port, pids))
        result["runner_status"] = runner.stop().get("status", {}).get("kafkasources")
        runner = None
        if args.cold_repeats:
            result["cold_start"] = _cold_starts(args.cold_repeats, envs, workdir)
    finally:
        if runner is not None:
            runner.stop()
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()
        if not args.workdir and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)  # Kafka and PostgreSQL data, logs
    result["loadavg_after"] = os.getloadavg()
    return result


def _load(args, settings: Settings, port: int, pids: dict[str, tuple[int, bool]]) -> dict:
    ctx = mp.get_context("fork")
    samples, out = ctx.Queue(), ctx.Queue()
    req_rate = args.rate / args.batch / args.clients
    # Warm-up: every process has served a request, the writer has its connection.
    warm_at = time.time() + 0.2
    warm = [
        ctx.Process(target=_client, args=(port, "warm", 90 + c, args.batch, req_rate,
                                          args.connections, warm_at, warm_at + args.warmup,
                                          samples, out))
        for c in range(args.clients)
    ]  # fmt: skip
    for p in warm:
        p.start()
    warm_out = [out.get(timeout=args.warmup + 120) for _ in warm]
    warm_acked = sum(n for r in warm_out for _, st, n, _ in r["acks"] if st == 202)
    for p in warm:
        p.join()
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    deadline = time.time() + 120
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if conn.run("SELECT count(*) FROM audit_events")[0][0] >= warm_acked:
                break
        time.sleep(0.2)
    baseline_rows = conn.run("SELECT count(*) FROM audit_events")[0][0]
    while not samples.empty():
        samples.get()
    print(f"warm-up: {warm_acked} events acknowledged and stored", flush=True)

    start_at = time.time() + 0.5
    stop_at = start_at + args.duration
    monitor = Monitor(settings, samples, pids).start(start_at, args.poll_ms)
    procs = [
        ctx.Process(target=_client, args=(port, "run", c, args.batch, req_rate,
                                          args.connections, start_at, stop_at, samples, out))
        for c in range(args.clients)
    ]  # fmt: skip
    for p in procs:
        p.start()
    clients = [out.get(timeout=args.duration + 120) for _ in procs]
    for p in procs:
        p.join()
    load_end = time.time()
    acked = sum(n for r in clients for _, st, n, _ in r["acks"] if st == 202)
    print(f"load done: {acked} events acknowledged; draining", flush=True)
    drain_deadline = load_end + args.drain
    drained_at = None
    while time.time() < drain_deadline:
        time.sleep(0.5)
        stored = monitor.seconds[-1]["stored"] - baseline_rows if monitor.seconds else 0
        if stored >= acked and not monitor.pending and samples.empty():
            drained_at = time.time()
            break
    time.sleep(1.2)
    monitor.stop()
    final_rows = conn.run("SELECT count(*) FROM audit_events")[0][0] - baseline_rows
    conn.close()
    return _summarise(args, clients, monitor, start_at, load_end, drained_at, baseline_rows,
                      final_rows, warm_acked)  # fmt: skip


def _summarise(args, clients, monitor, start_at, load_end, drained_at, baseline_rows,
               final_rows, warm_acked) -> dict[str, Any]:  # fmt: skip
    duration = load_end - start_at
    acks = [a for r in clients for a in r["acks"]]
    statuses: dict[int, int] = {}
    for _, st, n, _ in acks:
        statuses[st] = statuses.get(st, 0) + n
    acked = statuses.get(202, 0)
    n_sec = int(max(load_end, drained_at or load_end) - start_at) + 2
    ingest_per_s = [0] * n_sec
    for t, st, n, _ in acks:
        if st == 202 and 0 <= t - start_at < n_sec:
            ingest_per_s[int(t - start_at)] += n
    lat_by_sec: dict[int, list[float]] = {}
    all_lat = []
    for _, t_ack, seen in monitor.visible:
        lat = seen - t_ack
        all_lat.append(lat)
        lat_by_sec.setdefault(int(t_ack - start_at), []).append(lat)
    seconds = []
    prev_stored = baseline_rows
    for row in monitor.seconds:
        sec = round(row["t"]) - 1
        stored = row["stored"] - baseline_rows
        lats = lat_by_sec.get(sec, [])
        seconds.append(
            {
                "second": sec,
                "ingest_events": ingest_per_s[sec] if 0 <= sec < n_sec else 0,
                "stored_rows": row["stored"] - prev_stored,
                "stored_total": stored,
                "lag": row.get("lag"),
                **({"lag_error": row["lag_error"]} if "lag_error" in row else {}),
                "latency_p50_s": _pct(lats, 0.5),
                "latency_p99_s": _pct(lats, 0.99),
                "latency_samples": len(lats),
                "cpu": row["cpu"],
            }
        )
        prev_stored = row["stored"]
    in_load = [s for s in seconds if 0 <= s["second"] < int(duration)]
    steady = in_load[min(10, len(in_load) // 4) :]
    cpu_names = list(in_load[0]["cpu"]) if in_load else []
    cpu_avg = {
        n: round(statistics.mean(s["cpu"][n] for s in in_load), 3) for n in cpu_names
    }  # fmt: skip
    cpu_avg["load generator"] = round(sum(r["cpu"] for r in clients) / duration, 3)
    stored_in_load = in_load[-1]["stored_total"] if in_load else 0
    # Samples still not visible when the monitor stopped count at what they had waited by
    # then: the percentiles over all samples are then lower bounds.
    censored = all_lat + [monitor.stopped_at - t for t in monitor.pending.values()]
    latencies = {
        "p50_s_all_samples_at_least": _pct(censored, 0.5) if monitor.pending else None,
        "p99_s_all_samples_at_least": _pct(censored, 0.99) if monitor.pending else None,
        "samples_seen": len(all_lat),
        "samples_not_seen": len(monitor.pending),
        "p50_s": _pct(all_lat, 0.5),
        "p99_s": _pct(all_lat, 0.99),
        "max_s": max(all_lat) if all_lat else None,
        "measured": "client's 202 -> start of the first id poll that sees the row "
        f"(polls every {args.poll_ms} ms)",
    }
    return {
        "settings": {
            "rate": args.rate,
            "duration_s": args.duration,
            "batch": args.batch,
            "mode": "application/cloudevents-batch+json" if args.batch > 1 else "structured",
            "clients": args.clients,
            "connections_per_client": args.connections,
            "partitions": args.partitions,
            "warm_up_events": warm_acked,
        },
        "totals": {
            "load_seconds": round(duration, 2),
            "events_sent": sum(r["sent"] for r in clients) * args.batch,
            "requests_late": sum(r["late"] for r in clients),
            "events_by_status": statuses,
            "ingest_events_per_s": round(acked / duration, 1),
            "ingest_request_p50_ms": round(_pct([a[3] for a in acks], 0.5) * 1000, 1),
            "ingest_request_p99_ms": round(_pct([a[3] for a in acks], 0.99) * 1000, 1),
            "stored_during_load": stored_in_load,
            "stored_rows_per_s_during_load": round(stored_in_load / duration, 1),
            "stored_rows_per_s_steady": round(statistics.mean(s["stored_rows"] for s in steady), 1)
            if steady
            else None,
            "stored_at_end": final_rows,
            "all_stored": final_rows >= acked,
            "drain_seconds_after_load": round(drained_at - load_end, 1) if drained_at else None,
            "max_lag": max((s["lag"] or 0) for s in seconds) if seconds else None,
            "lag_at_load_end": in_load[-1]["lag"] if in_load else None,
        },
        "latency": latencies,
        "cpu_cores_during_load": cpu_avg,
        "per_second": seconds,
    }


def _cold_starts(repeats: int, envs: dict[str, dict[str, str]], workdir: Path) -> dict:
    out: dict[str, Any] = {
        "counted": {
            "first_answer": "GET /healthz 200 (ingest, writer); GET / answered 405 (maintenance,"
            " a cloudevent function: the server is up)",
            "first_2xx": "ingest: 202 for one structured event (Kafka acked); writer: 201 for "
            "one binary CloudEvent delivery (row committed); maintenance: 2xx for a PingSource "
            "CloudEvent",
        }
    }
    for service in (INGEST, WRITER, MAINTENANCE):
        runs = [cold_start(service, envs[service], workdir) for _ in range(repeats)]
        row: dict[str, Any] = {"runs": runs}
        for key in ("first_answer_s", "first_2xx_s"):
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = {
                    "min": round(min(values), 3),
                    "median": round(statistics.median(values), 3),
                    "max": round(max(values), 3),
                }
        out[service] = row
        print(f"cold start {service}: {json.dumps({k: row.get(k) for k in row if k != 'runs'})}")
    return out


# ----------------------------------------------------------------------------- output


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", flush=True)
        return False
    secs = result["per_second"]
    x = [s["second"] for s in secs]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    st = result["settings"]
    load_end = result["totals"]["load_seconds"]
    fig.suptitle(
        f"ingest → Kafka → KafkaSource → writer → PostgreSQL, one {result['machine']['nproc']}"
        f"-core box: {st['rate']:,} events/s offered for {st['duration_s']:.0f} s (accepted "
        f"in {load_end:.0f} s), batches of {st['batch']}",
        fontsize=10,
    )
    a1.plot(x, [s["ingest_events"] for s in secs], label="ingest: events answered 202 /s")
    a1.plot(x, [s["stored_rows"] for s in secs], label="stored: new rows in audit_events /s")
    a1.axhline(TARGET_RATE, color="green", ls="--", lw=1, label=f"target {TARGET_RATE:,}/s")
    a1.axvline(load_end, color="grey", ls=":", lw=1)
    a1.set_ylabel("events/s")
    a1.legend(loc="upper right", fontsize=8)
    lx = [s["second"] for s in secs if s["latency_p50_s"] is not None]
    a2.plot(lx, [s["latency_p50_s"] for s in secs if s["latency_p50_s"] is not None],
            label="p50")  # fmt: skip
    a2.plot(lx, [s["latency_p99_s"] for s in secs if s["latency_p99_s"] is not None],
            label="p99")  # fmt: skip
    a2.axhline(TARGET_P99_S, color="green", ls="--", lw=1, label=f"target p99 {TARGET_P99_S} s")
    a2.set_ylabel("202 → queryable (s)\nby second of the 202")
    a2.axvline(load_end, color="grey", ls=":", lw=1)
    a2.legend(loc="upper left", fontsize=8)
    a3.plot(x, [s["lag"] or 0 for s in secs], color="tab:red", label="consumer lag (records)")
    a3.set_ylabel("KafkaSource lag")
    a3.set_xlabel("seconds since load start (dotted: load ends)")
    a3.axvline(load_end, color="grey", ls=":", lw=1)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(result: dict[str, Any]) -> None:
    t, lat, cpu = result["totals"], result["latency"], result["cpu_cores_during_load"]

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    print("\n| measure | value |\n| --- | --- |")
    print(f"| offered | {result['settings']['rate']:,} events/s for {t['load_seconds']} s |")
    print(f"| ingest (202) | {t['ingest_events_per_s']:,} events/s |")
    print(f"| stored during load | {t['stored_rows_per_s_during_load']:,} rows/s |")
    print(f"| stored, steady seconds | {t['stored_rows_per_s_steady']} rows/s |")
    print(f"| emit-to-queryable p50 / p99 | {s(lat['p50_s'])} / {s(lat['p99_s'])} |")
    print(f"| max lag | {t['max_lag']} |")
    print(f"| drain after load | {t['drain_seconds_after_load']} s |")
    print(f"| CPU (cores) | {', '.join(f'{k} {v}' for k, v in cpu.items())} |")
    for name, row in (result.get("cold_start") or {}).items():
        if name != "counted":
            print(f"| cold start {name} | answer {row.get('first_answer_s')}, "
                  f"2xx {row.get('first_2xx_s')} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load")
    ap.add_argument("--rate", type=int, default=2000, help="offered events/s, all clients")
    ap.add_argument("--batch", type=int, default=50, help="events per request (1: single)")
    ap.add_argument("--clients", type=int, default=2, help="load generator processes")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive, per client")
    ap.add_argument("--partitions", type=int, default=12, help="of the events topic")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of load before measuring")
    ap.add_argument("--drain", type=float, default=600, help="most seconds to wait after load")
    ap.add_argument("--poll-ms", type=int, default=100, help="visibility poll interval")
    ap.add_argument("--cold-repeats", type=int, default=5, help="0: skip cold starts")
    ap.add_argument("--ingest-workers", type=int, help="WORKERS of audit-ingest (bench only)")
    ap.add_argument("--ingest-threads", type=int, help="THREADS of audit-ingest (bench only)")
    ap.add_argument("--writer-workers", type=int, help="WORKERS of audit-writer (bench only)")
    ap.add_argument("--writer-threads", type=int, help="THREADS of audit-writer (bench only)")
    ap.add_argument("--workdir", help="kept afterwards (default: a temporary folder, removed)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder")
    ap.add_argument("--results", default=str(REPO / "bench" / "results"))
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "pipeline-bench.png"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-json", help="no run: summarise and plot a results file again")
    args = ap.parse_args()

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        report(result)
        if not args.no_plot and plot(result, Path(args.plot)):
            print(f"plot: {args.plot}")
        return 0
    result = run(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.results) / f"pipeline-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    report(result)
    print(f"\nresults: {out}")
    if not args.no_plot and plot(result, Path(args.plot)):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
