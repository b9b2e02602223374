"""`openg2p-audit dev up` as a developer uses it: start, paste the curl, see the event, Ctrl-C.

The real functions are not needed to prove the wiring: the manifests here run
stand-in ingest and writer functions with the same targets and signatures.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import urllib3

from eventing_support import (
    Recorder,
    config_map,
    kafka_sink,
    kafka_source,
    service,
    write_manifests,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _until(q: queue.Queue, pattern: str, seen: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(seen[-60:])}")


def test_dev_up_prints_a_curl_that_lands_and_ctrl_c_stops_everything(topics, tmp_path):
    settings = topics
    rec = Recorder(tmp_path)
    ingest = service("audit-ingest", target="ingest")
    writer = service("audit-writer", target="record")
    docs = [
        config_map(settings, rec.file, rec.plan_file),
        ingest,
        writer,
        kafka_sink("audit-dlq", settings.kafka_dlq_topic),
        kafka_source("audit-events-to-writer", settings, sink="audit-writer", dls="audit-dlq"),
    ]
    manifests = write_manifests(tmp_path / "manifests", docs)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "KAFKA_EVENTS_TOPIC": settings.kafka_events_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        # Contradicts the KafkaSource's consumerGroup: said at start, and the manifest wins.
        "KAFKA_CONSUMER_GROUP": "group-from-the-shell",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "openg2p_audit.cli", "dev", "up", "--manifests", str(manifests),
         "--workdir", str(tmp_path / "work"), "--commit-interval", "0.2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        q = _lines(proc)
        conflict = _until(
            q, r"KAFKA_CONSUMER_GROUP=group-from-the-shell in the environment", seen, 60
        )
        assert "KafkaSource/audit-events-to-writer says '" in conflict
        assert "the manifests win" in conflict
        url_line = _until(q, r"curl -i http://127\.0\.0\.1:\d+/", seen, 120)
        data_line = _until(q, r"^\s+-d '", seen, 5)
        _until(q, r"query$", seen, 5)
        _until(q, r"^ready\.", seen, 5)
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", url_line).group(1)
        body = shlex.split(data_line.strip())[1]
        resp = urllib3.PoolManager().request(
            "POST", url, body=body.encode(),
            headers={"Content-Type": "application/cloudevents+json"},
        )  # fmt: skip
        assert resp.status == 202
        event_id = re.search(r'"id":"([^"]+)"', body).group(1)
        line = _until(q, rf"event {event_id} .*-> http://127\.0\.0\.1:\d+ answered 2\d\d", seen, 60)
        assert "KafkaSource/audit-events-to-writer" in line
        ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", "".join(seen))]
        proc.send_signal(signal.SIGINT)
        try:
            # Bounded: every stop step has its own timeout; generous for a loaded CI box.
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            while not q.empty():
                seen.append(q.get() or "")
            tail = "".join(seen)[-3000:]
            raise AssertionError(f"dev up still running 120 s after Ctrl-C:\n{tail}") from None
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "stopped." in "".join(seen) + "".join(iter(lambda: q.get(timeout=5) or "", ""))
    for port in set(ports):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after Ctrl-C"
