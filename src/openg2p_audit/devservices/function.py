"""A function served exactly as in a deployment: functions-framework in its own process.

Tests and benchmarks drive the functions over real HTTP through the same
server a Knative Service runs (functions-framework's ASGI mode: gunicorn with
`WORKERS` uvicorn workers, its signal handling), so what they prove holds there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..settings import Settings
from ._process import die_with_parent, free_port, stop_process, tail

REPO_ROOT = Path(__file__).resolve().parents[3]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce `settings` in another process."""
    return {
        name.upper(): str(value)
        for name, value in settings.model_dump().items()
        if value is not None and not isinstance(value, dict)
    }


class LocalFunction:
    """`functions-framework --asgi --source functions/<name>/main.py --target <target>`.

    On 127.0.0.1, in a process group of its own so that stopping it stops
    gunicorn's workers too. `source` (relative to the repository root) serves
    another file, e.g. a benchmark baseline. `settings=None` passes only `env`.
    """

    def __init__(
        self,
        name: str,
        target: str,
        settings: Settings | None,
        workdir: Path,
        *,
        signature_type: str = "http",
        workers: int = 1,
        env: dict[str, str] | None = None,
        source: str | None = None,
        log_path: Path | None = None,
    ):
        self.name, self.target, self.signature_type = name, target, signature_type
        self.settings = settings
        self.workdir = Path(workdir)
        self.port = free_port()
        self.workers = workers
        self.extra_env = env or {}
        self.source = source or f"functions/{name}/main.py"
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(log_path) if log_path else self.workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, ready_path: str = "/healthz") -> LocalFunction:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **(settings_env(self.settings) if self.settings is not None else {}),
            "WORKERS": str(self.workers),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        cli = Path(sys.executable).with_name("functions-framework")
        out = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [str(cli), "--asgi", "--source", self.source, "--target", self.target,
             "--signature-type", self.signature_type, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGKILL),
            start_new_session=True,
        )  # fmt: skip
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as resp:
                    if 200 <= resp.status < 300:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout}s:\n{tail(self.log_path)}")

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends it: the server drains and exits on its own."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains in-flight requests), then SIGKILL to the whole group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process(proc, signal.SIGTERM, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers a killed master left behind

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LocalFunction:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
