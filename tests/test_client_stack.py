"""The emitter client (clients/python) against the real stack, as a service would use it.

knative/base runs under the local eventing runner with tokens on and the
ConfigMap's source policy: ingest and the writer are functions-framework
processes, Kafka and PostgreSQL are real, and tokens come from the runner's
local issuer (directly, through a Keycloak-style token endpoint, or from a
token file). Every case ends by counting rows in `audit_events`: each event
whose `emit` returned must be exactly one row, and a refused one none.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client_support import EMITTER, REGISTRY, SECRET, TokenEndpoint
from openg2p_audit.devservices._process import free_port
from openg2p_audit.topics import ensure_topics
from openg2p_audit_client import AuditClient, ClientCredentials, TokenFile
from pipeline_support import BROKER, INGEST, broker_sender, start_pipeline, stored_ids, wait_stored

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

VIEWED = "org.openg2p.registry.beneficiary.viewed"
CLI = Path(sys.executable).with_name("openg2p-audit-emit")


@pytest.fixture(scope="module")
def pipeline(settings, tmp_path_factory):
    ensure_topics(settings)
    runner = start_pipeline(settings, tmp_path_factory.mktemp("client-stack"), ingest_auth=True)
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def ingest_url(pipeline) -> str:
    return pipeline.service_url(INGEST) + "/"


@pytest.fixture
def token(pipeline) -> str:
    """A Keycloak client-credentials token of the registry's client (the policy names it)."""
    return pipeline.issuer.mint(f"service-account-{REGISTRY}", (), azp=REGISTRY)


@pytest.fixture
def endpoint(pipeline):
    ep = TokenEndpoint(pipeline.issuer)
    yield ep
    ep.stop()


def viewed(n: int, prefix: str, **over) -> dict:
    args = dict(
        type=VIEWED, source="/openg2p/registry", actor="officer-17", action="view",
        outcome="success", resource={"type": "beneficiary", "id": f"BEN-{n}"},
        subject=f"beneficiary/BEN-{n}", id=f"{prefix}-{n:05d}",
    )  # fmt: skip
    args.update(over)
    return args


def exactly_once(settings, ids: list[str], timeout: float = 120.0) -> None:
    counts = wait_stored(settings, ids, timeout)
    assert counts == dict.fromkeys(ids, 1), {i: c for i, c in counts.items() if c != 1}


def test_2000_events_while_ingest_is_stopped_and_restarted_twice(
    pipeline, settings, ingest_url, token, tmp_path
):
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    client = AuditClient(ingest_url, token, tmp_path / "q.db", backoff_max=1.0)
    ids: list[str] = []

    def emit_all() -> None:
        for n in range(2000):
            ids.append(client.emit(**viewed(n, prefix)))
            time.sleep(0.004)  # a busy service: about 200 events a second, for ~10 s

    emitter = threading.Thread(target=emit_all)
    emitter.start()
    depth_while_down = []
    for _ in range(2):
        time.sleep(1.5)
        pipeline.stop_service(INGEST)
        time.sleep(2.0)
        depth_while_down.append(client.metrics()["outbox_events"])
        pipeline.start_service(INGEST)
    emitter.join(120)
    assert len(ids) == 2000
    assert client.flush(120), client.metrics()
    exactly_once(settings, ids)
    assert client.failed_attempts > 0 and min(depth_while_down) > 0  # the outages were felt
    assert client.rejected == 0 and client.sent >= 2000
    client.close()


def test_sigkill_mid_stream_then_restart_on_the_same_outbox(pipeline, settings, ingest_url, token,
                                                             tmp_path):  # fmt: skip
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    outbox = tmp_path / "q.db"
    argv = [sys.executable, "-c", EMITTER, ingest_url, token, str(outbox)]
    proc = subprocess.Popen([*argv, "5000", prefix], stdout=subprocess.PIPE, text=True)
    promised: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        promised.append(line.strip())
        if len(promised) == 800:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    db = sqlite3.connect(outbox)
    (left,) = db.execute("SELECT count(*) FROM outbox").fetchone()
    db.close()

    again = subprocess.run([*argv, "0", prefix], capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == "flushed"
    exactly_once(settings, promised)
    assert left > 0, "the kill came after everything was delivered: nothing was resumed"


def test_refused_events_land_in_rejected_and_the_rest_of_their_batch_is_stored(
    settings, ingest_url, token, tmp_path
):
    prefix = f"refused-{uuid.uuid4().hex[:8]}"
    long_ago = datetime.now(UTC) - timedelta(days=365 * 10)  # beyond RETENTION_MONTHS: 400
    batch = [
        viewed(0, prefix),
        viewed(1, prefix, time=long_ago),
        viewed(2, prefix),
        viewed(3, prefix, source="/openg2p/payments"),  # not the registry's source: 403
        viewed(4, prefix),
    ]
    with AuditClient(ingest_url, token, tmp_path / "q.db", linger=0.5) as client:
        from openg2p_audit_client.event import build_event

        ids = client.emit_events([build_event(**args) for args in batch])
        assert client.flush(60)
    good = [ids[0], ids[2], ids[4]]
    exactly_once(settings, good)
    assert stored_ids(settings, [ids[1], ids[3]]) == {}
    db = sqlite3.connect(tmp_path / "q.db")
    rows = db.execute("SELECT id, status, error, problems FROM rejected ORDER BY id").fetchall()
    db.close()
    assert [(r[0], r[1]) for r in rows] == [(ids[1], 400), (ids[3], 403)]
    too_old, forbidden = (json.loads(r[2]) for r in rows)
    assert too_old["problems"][0]["reason"] == "time_window"
    assert forbidden["error"] == "forbidden"
    assert "may not emit under source '/openg2p/payments'" in json.loads(rows[1][3])[0]["message"]
    assert client.rejected == 2 and client.sent == 3


def test_client_credentials_token_is_refreshed_on_expiry(settings, ingest_url, endpoint, tmp_path):
    endpoint.lifetime = 3  # renewed a tenth of its lifetime before it runs out
    tokens = ClientCredentials(endpoint.url, REGISTRY, SECRET)
    prefix = f"expiry-{uuid.uuid4().hex[:8]}"
    with AuditClient(ingest_url, tokens, tmp_path / "q.db") as client:
        first = [client.emit(**viewed(n, prefix)) for n in range(3)]
        assert client.flush(30)
        assert len(endpoint.issued) == 1
        time.sleep(3.0)
        second = [client.emit(**viewed(n, prefix)) for n in range(3, 6)]
        assert client.flush(30)
    assert len(endpoint.issued) == 2
    exactly_once(settings, first + second)


def test_a_401_fetches_a_fresh_token_and_the_events_are_delivered(
    settings, ingest_url, endpoint, tmp_path
):
    endpoint.audiences = ["openg2p-registry"]  # the first token is not for ingest: 401
    tokens = ClientCredentials(endpoint.url, REGISTRY, SECRET)
    prefix = f"401-{uuid.uuid4().hex[:8]}"
    with AuditClient(ingest_url, tokens, tmp_path / "q.db") as client:
        ids = [client.emit(**viewed(n, prefix)) for n in range(3)]
        assert client.flush(30)
    assert len(endpoint.issued) == 2
    assert client.failed_attempts == 0 and client.rejected == 0
    exactly_once(settings, ids)


def test_a_projected_token_file_is_reread_when_the_kubelet_rotates_it(
    pipeline, settings, ingest_url, token, tmp_path
):
    path = tmp_path / "token"
    path.write_text(pipeline.issuer.mint(f"service-account-{REGISTRY}", (), azp=REGISTRY,
                                         aud="some-other-audience"))  # fmt: skip
    prefix = f"file-{uuid.uuid4().hex[:8]}"
    client = AuditClient(ingest_url, TokenFile(path), tmp_path / "q.db", backoff_max=0.5)
    ids = [client.emit(**viewed(n, prefix)) for n in range(3)]
    assert client.flush(2) is False  # 401 with the token the file holds: kept, not rejected
    assert client.rejected == 0 and client.metrics()["outbox_events"] == 3
    fresh = tmp_path / "token.new"
    fresh.write_text(token)
    os.replace(fresh, path)
    assert client.flush(30)
    client.close()
    exactly_once(settings, ids)


def test_the_cli_queues_against_a_closed_port_and_flush_only_stores_every_event_once(
    settings, ingest_url, token, tmp_path
):
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    from openg2p_audit_client.event import build_event

    events = [build_event(**viewed(n, prefix)) for n in range(25)]
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in events))
    closed = f"http://127.0.0.1:{free_port()}/"

    def emit(*args: str, stdin=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CLI), *args], stdin=stdin or subprocess.DEVNULL, capture_output=True,
            text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip

    with jsonl.open() as stdin:
        queued = emit("--url", closed, "--token", "T", "--outbox", "q.db", "--timeout", "1",
                      stdin=stdin)  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.strip() == "0 accepted, 25 queued, 0 rejected"
    flushed = emit("--url", ingest_url, "--token", token, "--outbox", "q.db", "--flush-only")
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.strip() == "25 accepted, 0 queued, 0 rejected"
    exactly_once(settings, [e["id"] for e in events])

    # Client credentials on the command line, and a refusal: exit status 1.
    refused = build_event(**viewed(99, prefix, source="/openg2p/payments"))
    endpoint_events = tmp_path / "refused.jsonl"
    endpoint_events.write_text(json.dumps(refused) + "\n")
    with endpoint_events.open() as stdin:
        result = emit("--url", ingest_url, "--token", token, stdin=stdin)
    assert result.returncode == 1
    assert result.stdout.strip() == "0 accepted, 0 queued, 1 rejected"
    assert "may not emit under source" in result.stderr


def test_the_cli_gets_its_token_by_client_credentials(settings, ingest_url, endpoint, tmp_path):
    from openg2p_audit_client.event import build_event

    event = build_event(**viewed(0, f"cli-cc-{uuid.uuid4().hex[:8]}"))
    result = subprocess.run(
        [str(CLI), "--url", ingest_url, "--token-url", endpoint.url, "--client-id", REGISTRY],
        input=json.dumps(event) + "\n", capture_output=True, text=True, timeout=60,
        env={**os.environ, "OPENG2P_AUDIT_CLIENT_SECRET": SECRET},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 accepted, 0 queued, 0 rejected"
    assert len(endpoint.issued) == 1
    exactly_once(settings, [event["id"]])


def test_single_mode_through_the_broker_path(pipeline, settings, tmp_path):
    # A Broker's ingress takes one event per request and, with OIDC on, a token for its own
    # audience from a sender its EventPolicies name; the Trigger delivers the event to ingest
    # with its own OIDC identity, so the emitter needs no token of ingest's here.
    prefix = f"broker-{uuid.uuid4().hex[:8]}"
    token = broker_sender(pipeline)["Authorization"].removeprefix("Bearer ")
    with AuditClient(pipeline.broker_url(BROKER), token, tmp_path / "q.db", batch=False) as client:
        ids = [client.emit(**viewed(n, prefix)) for n in range(3)]
        assert client.flush(30)
    exactly_once(settings, ids)
