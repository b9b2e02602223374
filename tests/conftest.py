"""Real services for the tests: one Kafka broker and one PostgreSQL per session.

When KAFKA_BOOTSTRAP_SERVERS or DATABASE_URL/DB_HOST point at existing
servers those are used instead. Each test module gets its own topics and its
own database, so modules cannot see each other's events or rows.
"""

from __future__ import annotations

import re
import uuid

import pg8000.native
import pytest

from attestation_support import INGEST_KEY, QUERY_KEY
from openg2p_audit.devservices import LocalKafka, LocalPostgres
from openg2p_audit.devservices.issuer import LocalIssuer
from openg2p_audit.settings import Settings, load_settings
from openg2p_audit.topics import ensure_topics


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def kafka_broker(base_settings, tmp_path_factory):
    """The local broker, or None when an existing one is configured."""
    if base_settings.kafka_configured:
        yield None
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server(base_settings, tmp_path_factory):
    """The local PostgreSQL, or None when an existing one is configured."""
    if base_settings.database_configured:
        yield None
        return
    server = LocalPostgres(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bootstrap_servers(base_settings, kafka_broker) -> str:
    return kafka_broker.bootstrap if kafka_broker else base_settings.kafka_bootstrap_servers


def _module_tag(request) -> str:
    name = request.module.__name__.rsplit(".", 1)[-1]
    return re.sub(r"[^a-z0-9]+", "_", name.lower())[:30] + "_" + uuid.uuid4().hex[:8]


def _new_database(base_settings: Settings, server: LocalPostgres | None, name: str) -> str:
    if server is not None:
        return server.create_database(name)
    kw = base_settings.pg_connect_kwargs
    conn = pg8000.native.Connection(**{**kw, "database": kw["database"]})
    try:
        conn.run(f"CREATE DATABASE {pg8000.native.identifier(name)}")
    finally:
        conn.close()
    user = kw["user"] + (f":{kw['password']}" if kw["password"] else "")
    return f"postgresql://{user}@{kw['host']}:{kw['port']}/{name}"


@pytest.fixture(scope="module")
def settings(request, base_settings, bootstrap_servers, postgres_server) -> Settings:
    """Settings for this module: its own topics and its own database.

    Tokens are off here, explicitly (and logged at WARNING by each function):
    these modules test what happens to events; test_ingest_auth,
    test_writer_auth, test_pipeline_auth and test_write_boundaries turn tokens
    on and test who may send them. Attestation has no off switch.
    """
    tag = _module_tag(request)
    database_url = _new_database(base_settings, postgres_server, f"t_{tag}")
    return base_settings.model_copy(
        update={
            "kafka_bootstrap_servers": bootstrap_servers,
            "kafka_events_topic": f"t.{tag}.events",
            "kafka_dlq_topic": f"t.{tag}.dlq",
            "kafka_broker_dlq_topic": f"t.{tag}.broker-dlq",
            "kafka_digests_topic": f"t.{tag}.digests",
            "kafka_topic_partitions": 3,
            "kafka_consumer_group": f"t.{tag}.group",
            "database_url": database_url,
            "db_host": None,
            "ingest_auth": "disabled",
            "writer_auth": "disabled",
            "maintenance_auth": "disabled",
            # Ingest attests what it produces and the writer stores nothing else, tokens or
            # not: every module has the keys (attestation_support holds them).
            "attestation_ingest_keys": INGEST_KEY,
            "attestation_query_keys": QUERY_KEY,
        }
    )


@pytest.fixture(scope="module")
def topics(settings) -> Settings:
    """The module's events and DLQ topics, created."""
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="module")
def issuer():
    """A local token issuer serving its JWKS; modules that need another kind define their own."""
    issuer = LocalIssuer().serve()
    yield issuer
    issuer.stop()


@pytest.fixture
def pg(settings):
    """A native connection to the module's database."""
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    yield conn
    conn.close()
