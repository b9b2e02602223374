"""Shared by the pipeline benchmark: knative/base as deployed, run by the local eventing runner.

- `service_envs`: each Knative Service's environment as the runner gives it (the
  manifests themselves are copied by tests/pipeline_support.module_manifests).
- `RunnerProcess` runs the Runner in a child process of its own: its Kafka
  consumer and its 50 delivery threads then neither share the benchmark's GIL
  nor hide inside its CPU figures.
- CPU accounting from /proc, and a description of the machine.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import platform
from pathlib import Path
from typing import Any

from openg2p_audit.eventing.manifests import KService, load
from openg2p_audit.eventing.runner import Runner
from openg2p_audit.eventing.services import container_env
from openg2p_audit.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- manifests


def service_envs(manifest_dir: Path, settings: Settings, database_url: str) -> dict[str, dict]:
    """Each Knative Service's environment exactly as Runner.start() gives it."""
    manifests = load(manifest_dir)
    out = {}
    secrets = attestation_secrets(settings) or {}

    def stand_in(secret: str, key: str) -> str | None:
        return secrets.get(secret, {}).get(key)

    for svc in manifests.of(KService):
        env = container_env(svc, manifests, stand_in)
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers or ""
        env["DATABASE_URL"] = database_url
        out[svc.name] = env
    return out


# ----------------------------------------------------------------------------- attestation


def with_attestation_keys(settings: Settings) -> Settings:
    """The settings with attestation keys of their own (generated) unless they have some:
    a benchmark's records must be attested as ingest attests them to be stored."""
    import secrets

    if settings.attestation_ingest_keys and settings.attestation_query_keys:
        return settings
    return settings.model_copy(update={
        "attestation_ingest_keys": secrets.token_hex(32),
        "attestation_query_keys": secrets.token_hex(32),
    })  # fmt: skip


def attestation_secrets(settings: Settings) -> dict[str, dict[str, str]] | None:
    """The Secret audit-attestation for a runner, from the settings' keys (None: generated)."""
    if not settings.attestation_ingest_keys:
        return None
    return {"audit-attestation": {"ingest": settings.attestation_ingest_keys,
                                  "query": settings.attestation_query_keys or ""}}  # fmt: skip


def ingest_attestor(settings: Settings):
    from openg2p_audit.attestation import Attestor

    return Attestor.from_keys(settings.attestation_ingest_keys, "ATTESTATION_INGEST_KEYS")


# ----------------------------------------------------------------------------- the runner


def _runner_main(
    manifest_dir: Path, settings: Settings, workdir: Path, conn: Any, max_poll_records: int
) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        filename=str(workdir / "runner.log"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    runner = Runner(
        manifest_dir, settings, workdir=workdir, schedule_pings=False, commit_interval=0.5,
        max_poll_records=max_poll_records, secrets=attestation_secrets(settings),
    )  # fmt: skip
    try:
        runner.start()
        runner.wait_ready(90)
        conn.send(
            {
                "url": runner.url,
                "services": {n: p.url for n, p in runner.services.items()},
                "pids": {n: p.proc.pid for n, p in runner.services.items() if p.proc},
            }
        )
        conn.recv()  # any message: stop
        status = runner.status()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(Exception):
            conn.send({"error": repr(exc)})
        runner.stop()
        return
    runner.stop()
    conn.send({"status": status})


class RunnerProcess:
    """The Runner with knative/base, in a child process; `info` has the service URLs and pids."""

    def __init__(
        self, manifest_dir: Path, settings: Settings, workdir: Path, max_poll_records: int = 50
    ):
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_runner_main,
            args=(manifest_dir, settings, workdir, child, max_poll_records),
            daemon=False,
        )
        self.info: dict[str, Any] = {}
        self.final: dict[str, Any] = {}

    def start(self, timeout: float = 180.0) -> RunnerProcess:
        self.proc.start()
        if not self._conn.poll(timeout):
            self.proc.terminate()
            raise RuntimeError("the runner did not come up")
        self.info = self._conn.recv()
        if "error" in self.info:
            self.proc.join(30)
            raise RuntimeError(f"runner failed: {self.info['error']}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def stop(self) -> dict[str, Any]:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            if self._conn.poll(60):
                with contextlib.suppress(EOFError):
                    self.final = self._conn.recv()
            self.proc.join(60)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(10)
        return self.final


# ----------------------------------------------------------------------------- CPU from /proc


def cpu_of(pid: int, children: bool = True) -> float:
    """CPU seconds of a process (user + system), plus those of its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / TICK


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int) -> float:
    return sum(cpu_of(p) for p in descendants(root))


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
