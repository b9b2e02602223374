"""`dev up` with the real manifests: read as an investigator with what it prints.

The developer's path: start `dev up`, mint a token with the printed command,
call the printed query URL, open the page, and check the trail against its
signed digests with the printed verifier key and `verify --database` command. Runs
`knative/base` (topics renamed for this module) against the session's Kafka
and PostgreSQL, so the query Service is the real one, connected as the
read-only role that `dev up` creates, trusting the issuer the runner serves.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import urllib3

from openg2p_audit import query
from openg2p_audit.settings import load_settings
from pipeline_support import module_manifests
from test_eventing_dev_up import _lines, _until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dev_up_prints_a_token_command_and_a_query_that_answers(topics, tmp_path):
    """Tokens on everywhere, as knative/base has them: the printed curls work as printed."""
    settings = topics
    manifests = module_manifests(settings, tmp_path / "manifests", ingest_auth=True)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "OPENG2P_AUDIT_CACHE": str(tmp_path / "cache"),
    }
    for name in ("KAFKA_EVENTS_TOPIC", "KAFKA_DLQ_TOPIC", "KAFKA_CONSUMER_GROUP", "DB_HOST"):
        env.pop(name, None)
    # The venv's script, as `./dev up` runs it: the commands it prints name that script.
    cli = str(Path(sys.executable).with_name("openg2p-audit"))
    proc = subprocess.Popen(
        [cli, "dev", "up", "--manifests", str(manifests),
         "--workdir", str(tmp_path / "work"), "--commit-interval", "0.2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: list[str] = []
    http = urllib3.PoolManager()
    try:
        q = _lines(proc)
        service = _until(q, r"^\s+audit-query\s+http://127\.0\.0\.1:\d+", seen, 180)
        url = re.search(r"(http://127\.0\.0\.1:\d+)", service).group(1)
        emitter = _until(q, r"^\s+TOKEN=\S+$", seen, 30).strip().removeprefix("TOKEN=")
        ingest = re.search(r"(http://[^ ]+)", _until(q, r"curl -i http://", seen, 5)).group(1)
        _until(q, r'-H "Authorization: Bearer \$TOKEN"', seen, 5)
        body = shlex.split(_until(q, r"^\s+-d '", seen, 5).strip())[1].encode()
        ce = {"Content-Type": "application/cloudevents+json"}
        resp = http.request("POST", ingest, body=body, headers=ce)
        assert resp.status == 401 and "WWW-Authenticate" in resp.headers
        resp = http.request(
            "POST", ingest, body=body, headers={**ce, "Authorization": f"Bearer {emitter}"}
        )
        assert resp.status == 202, resp.data
        token_line = _until(q, r"TOKEN=\$\(.* token --role audit\.read", seen, 30)
        _until(q, r"curl -H \"Authorization: Bearer \$TOKEN\"", seen, 5)
        query_line = _until(q, r"/v1/audit/events\?from=", seen, 5)
        page_line = _until(q, r"timeline page: http://127\.0\.0\.1:\d+/ui", seen, 5)
        key_line = _until(q, r"^\s+INTEGRITY_VERIFIER_KEYS=\S+$", seen, 5)
        verify_line = _until(q, r" verify --database$", seen, 5)
        _until(q, r"^ready\.", seen, 10)
        assert url in query_line and url in page_line
        assert any(re.search(r"PingSource \S+ fired once at start: answered 200", x) for x in seen)

        # The verifier key and the check, exactly as printed, in a shell that has nothing else:
        # no settings, no sealing key; the trail holds the event sent above, not sealed yet.
        verifier = key_line.strip().removeprefix("INTEGRITY_VERIFIER_KEYS=")
        assert verifier in verify_line
        bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        checked = subprocess.run(verify_line.strip(), shell=True, cwd=REPO, env=bare,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("OK: ") and "chain intact" in checked.stdout
        # The same key is what an investigator would be given: it prints itself back.
        printed = subprocess.run(f"INTEGRITY_VERIFIER_KEYS='{verifier}' {cli} integrity public-key",
                                 shell=True, cwd=REPO, env=bare, capture_output=True, text=True,
                                 timeout=60)  # fmt: skip
        assert printed.stdout.strip() == verifier, printed.stderr

        assert "token --role audit.read --role audit.export)" in token_line
        minted = subprocess.run(
            [sys.executable, "-m", "openg2p_audit.cli", "token", "--role", "audit.read",
             "--role", "audit.export", "--subject", f"dev-{uuid.uuid4().hex[:6]}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        token = minted.stdout.strip()
        target = re.search(r"'(http://[^']+)'", query_line).group(1)
        resp = http.request("GET", target, headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, resp.data
        assert set(json.loads(resp.data)) == {"events", "next_cursor"}
        assert http.request("GET", target).status == 401
        ready = json.loads(http.request("GET", url + "/readyz").data)
        assert ready["read_only_role"] is True  # dev up gave it the manifest's read-only role
        page = http.request("GET", url + "/ui", headers={"Authorization": f"Bearer {token}"})
        assert page.status == 200 and b'id="search"' in page.data

        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not (tmp_path / "cache" / "dev-issuer.json").exists()  # forgotten on stop
    # The role dev up created reads and cannot write.
    kw = settings.pg_connect_kwargs  # the role and password the query manifest names
    reader = f"postgresql://audit_query:change-me@{kw['host']}:{kw['port']}/{kw['database']}"
    conn = query.connect(load_settings(database_url=reader))
    try:
        assert query.can_write(conn) is False
    finally:
        conn.close()
