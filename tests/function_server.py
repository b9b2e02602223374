"""Run a function under functions-framework, as Knative runs it, for tests and benchmarks.

Each server is a real `functions-framework` process (gunicorn, threads) on a
free 127.0.0.1 port with the settings passed as environment variables, so the
code under test sees exactly what a deployed function sees.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from openg2p_audit.devservices._process import free_port
from openg2p_audit.devservices.function import settings_env

__all__ = ["FunctionServer", "request", "settings_env"]

ROOT = Path(__file__).resolve().parents[1]


class FunctionServer:
    def __init__(
        self,
        source: str,
        target: str,
        env: dict[str, str],
        *,
        signature: str = "http",
        threads: int = 16,
        workers: int = 1,
        log_path: Path | None = None,
    ):
        self.source, self.target, self.signature = source, target, signature
        self.port = free_port()
        self.env = {
            **os.environ,
            **env,
            "THREADS": str(threads),
            "WORKERS": str(workers),
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> FunctionServer:
        exe = Path(sys.executable).parent / "functions-framework"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(exe), "--source", str(ROOT / self.source), "--target", self.target,
             "--signature-type", self.signature, "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"functions-framework exited with {self.proc.returncode}")
            try:
                request(self.url, "GET", "/healthz", timeout=2)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"functions-framework did not answer on {self.url} in {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> FunctionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, Any, dict[str, str]]:
    """One HTTP request on a new connection; the body is parsed when it is JSON."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        parsed: Any = json.loads(raw) if "json" in ctype and raw else raw.decode()
        return resp.status, parsed, dict(resp.getheaders())
    finally:
        conn.close()
