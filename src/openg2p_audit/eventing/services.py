"""Knative Services as local functions-framework processes.

Each Service's container env is rebuilt from the manifests (literal values,
ConfigMap and Secret keys, `envFrom`), so a function runs locally with the
settings the cluster would give it. Only what points at infrastructure is
overridden: KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL name the local
services, PORT the local port. functions-framework reads FUNCTION_TARGET,
FUNCTION_SIGNATURE_TYPE and FUNCTION_SOURCE itself; FUNCTION_SOURCE is
relative to the repository root, the image's working directory.

A Service keeps its port across stop()/start()/kill(), so fault tests can
take a function away and bring the same address back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import urllib3

from ..devservices._process import die_with_parent, free_port, tail
from .manifests import ConfigMap, KafkaSource, KService, ManifestError, Manifests, Secret

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    pass


# What the runner itself points at the local Kafka, PostgreSQL and token issuer: the
# manifests' values for these are the cluster's hosts, and the environment's (or the local
# services') are used.
LOCAL_INFRASTRUCTURE = frozenset(
    {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER",
     "DB_PASSWORD", "AUTH_ISSUER", "AUTH_JWKS_URL", "AUTH_TRUSTED_ISSUERS", "WRITER_AUTH_ISSUER",
     "MAINTENANCE_AUTH_ISSUER"}
)  # fmt: skip


def manifest_settings(manifests: Manifests, names: Iterable[str]) -> dict[str, dict[str, str]]:
    """The value each of `names` has in the manifests, and where: {name: {value: resources}}.

    A Service's container env gives the settings the function reads; a
    KafkaSource's topics and consumer group are KAFKA_EVENTS_TOPIC and
    KAFKA_CONSUMER_GROUP as the writer's feed sees them.
    """
    wanted = {n.upper() for n in names} - LOCAL_INFRASTRUCTURE
    found: dict[str, dict[str, list[str]]] = {}

    def add(name: str, value: str, where: str) -> None:
        if name in wanted:
            found.setdefault(name, {}).setdefault(value, []).append(where)

    for svc in manifests.of(KService):
        # Secrets made out of band are no setting the manifests state: left out.
        for name, value in container_env(svc, manifests, lambda _s, _k: None).items():
            add(name, value, svc.key)
    for source in manifests.of(KafkaSource):
        for topic in source.topics:
            add("KAFKA_EVENTS_TOPIC", topic, source.key)
        add("KAFKA_CONSUMER_GROUP", source.consumer_group, source.key)
    return {n: {v: ", ".join(w) for v, w in vs.items()} for n, vs in found.items()}


def environment_conflicts(
    manifests: Manifests, environ: Mapping[str, str], names: Iterable[str]
) -> list[str]:
    """One line per setting whose environment value the manifests contradict.

    The manifests win: the runner runs them as written, as a cluster would,
    so a shell variable must not silently send events to a topic nobody reads.
    """
    lines = []
    for name, values in sorted(manifest_settings(manifests, names).items()):
        have = environ.get(name)
        if not have:
            continue
        for value, where in values.items():
            if value != have:
                lines.append(
                    f"{name}={have} in the environment, but {where} says {value!r}: "
                    "the manifests win (edit them, or pass --manifests, to change it)"
                )
    return lines


def container_env(
    service: KService,
    manifests: Manifests,
    stand_in: Callable[[str, str], str | None] | None = None,
) -> dict[str, str]:
    """The container's environment as Kubernetes would assemble it (envFrom first, then env).

    A `secretKeyRef` to a Secret the manifests do not hold (one created out of band in a
    cluster) takes `stand_in(secret, key)` (None: the variable is left out); without a
    stand-in it is an error.
    """

    def source(kind: str, name: str, optional: bool) -> dict[str, str]:
        res = manifests.find(kind, name)
        if res is None:
            if optional:
                return {}
            raise ManifestError(f"{service.key} needs {kind}/{name}, which is not in the manifests")
        assert isinstance(res, ConfigMap | Secret)
        return res.data

    env: dict[str, str] = {}
    for ref in service.env_from:
        for key, value in source(ref.kind, ref.name, ref.optional).items():
            env[ref.prefix + key] = value
    for var in service.env:
        if var.value is not None:
            env[var.name] = var.value
            continue
        kind, (name, key) = (
            ("ConfigMap", var.config_map_key) if var.config_map_key else ("Secret", var.secret_key)
        )
        if kind == "Secret" and stand_in is not None and manifests.find(kind, name) is None:
            value = stand_in(name, key)
            if value is not None:
                env[var.name] = value
            continue
        data = source(kind, name, var.optional)
        if key in data:
            env[var.name] = data[key]
        elif not var.optional:
            raise ManifestError(f"{service.key}: {kind}/{name} has no key {key!r} for {var.name}")
    return env


class ServiceProcess:
    """One Knative Service as a functions-framework server on 127.0.0.1."""

    def __init__(
        self,
        service: KService,
        env: dict[str, str],
        *,
        repo_root: Path,
        log_dir: Path,
        port: int | None = None,
    ):
        self.service = service
        self.name = service.name
        self.env = env
        self.repo_root = repo_root
        self.port = port or free_port()
        self.log_path = log_dir / f"{service.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        if self.running:
            return self
        env = {**os.environ, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        for needed in ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE"):
            if not env.get(needed):
                raise ManifestError(f"{self.service.key}: container env has no {needed}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "functions_framework"],
            cwd=self.repo_root, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGTERM),
            start_new_session=True,
        )  # fmt: skip
        out.close()
        self._wait_ready(timeout)
        log.info("%s: %s ready at %s", self.service.key, env["FUNCTION_TARGET"], self.url)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready once the readiness path answers anything below 500.

        A cloudevent-signature function answers GET with 405 unless it serves
        the probe path itself; the process is up either way, and the log says so.
        """
        http = urllib3.PoolManager(retries=False)
        url = self.url + self.service.readiness_path
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.service.key} exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                resp = http.request("GET", url, timeout=2.0)
                if resp.status < 500:
                    if resp.status >= 300:
                        log.warning(
                            "%s: readiness path %s answered %s (the function does not serve it)",
                            self.service.key, self.service.readiness_path, resp.status,
                        )  # fmt: skip
                    return
                last = f"HTTP {resp.status}"
            except urllib3.exceptions.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        self.stop()
        raise ServiceError(
            f"{self.service.key} not ready at {url} within {timeout}s ({last}):\n"
            f"{tail(self.log_path)}"
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (gunicorn finishes in-flight requests), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole process group: a crashed pod, requests cut mid-way."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
