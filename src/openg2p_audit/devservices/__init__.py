"""Real Kafka and PostgreSQL servers, started by the project itself.

Development (`dev up`) and the tests use these when the settings point at no
existing broker or database. Nothing here is used in a deployment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..settings import Settings
from .function import LocalFunction, settings_env
from .kafka import LocalKafka, kafka_libs
from .postgres import LocalPostgres

__all__ = [
    "LocalFunction",
    "LocalKafka",
    "LocalPostgres",
    "kafka_libs",
    "local_services",
    "settings_env",
]


@contextlib.contextmanager
def local_services(
    settings: Settings, workdir: Path
) -> Iterator[tuple[Settings, LocalKafka | None, LocalPostgres | None]]:
    """Start whatever the settings leave unconfigured; yield settings that point at it."""
    kafka = pg = None
    overrides: dict[str, str] = {}
    try:
        if not settings.kafka_configured:
            kafka = LocalKafka(workdir / "kafka").start()
            overrides["kafka_bootstrap_servers"] = kafka.bootstrap
        if not settings.database_configured:
            pg = LocalPostgres(workdir / "postgres").start()
            overrides["database_url"] = pg.create_database("openg2p_audit")
        yield settings.model_copy(update=overrides), kafka, pg
    finally:
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()
