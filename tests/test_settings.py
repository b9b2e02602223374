import subprocess
import sys

import pytest

from openg2p_audit.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_design(monkeypatch):
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "DB_HOST"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.kafka_events_topic == "openg2p.audit.events"
    assert s.kafka_dlq_topic == "openg2p.audit.dlq"
    assert s.kafka_topic_partitions == 12
    assert s.kafka_consumer_group == "openg2p-audit-consumer"
    assert s.partitions_ahead_months == 3
    assert s.retention_months == 84
    assert s.kafka_redrive_group == "openg2p-audit-redrive"
    assert (s.redrive_max_records, s.redrive_max_seconds) == (10_000, 20.0)
    assert not s.kafka_configured and not s.database_configured


def test_database_url_is_parsed(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://audit:s%40cret@db.example:6543/audit")
    kw = load_settings().pg_connect_kwargs
    assert kw == {
        "host": "db.example",
        "port": 6543,
        "database": "audit",
        "user": "audit",
        "password": "s@cret",
    }


def test_openg2p_db_convention(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DB_HOST", "pg")
    monkeypatch.setenv("DB_PORT", "5433")
    monkeypatch.setenv("DB_NAME", "auditdb")
    monkeypatch.setenv("DB_USER", "auditor")
    monkeypatch.setenv("DB_PASSWORD", "pw")
    s = load_settings()
    assert s.database_configured
    assert s.pg_connect_kwargs == {
        "host": "pg",
        "port": 5433,
        "database": "auditdb",
        "user": "auditor",
        "password": "pw",
    }
    assert s.database_dsn == "postgresql://auditor@pg:5433/auditdb"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KAFKA_TOPIC_PARTITIONS", "twelve"),
        ("KAFKA_TOPIC_PARTITIONS", "0"),
        ("KAFKA_REPLICATION_FACTOR", "0"),
        ("KAFKA_MIN_INSYNC_REPLICAS", "2"),  # more than the default replication factor, 1
        ("RETENTION_MONTHS", "-1"),
        ("REDRIVE_MAX_SECONDS", "0"),
        ("KAFKA_BOOTSTRAP_SERVERS", "broker-without-port"),
        ("KAFKA_EVENTS_TOPIC", "bad topic name"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("DB_PORT", "99999"),
        ("INGEST_AUTH", "off"),
        ("WRITER_AUTH", "no"),
        ("AUTH_TRUSTED_ISSUERS", "not json"),
        ("AUTH_TRUSTED_ISSUERS", '[{"issuer": "https://k8s"}]'),
        ("AUTH_TRUSTED_ISSUERS", '[{"issuer": "k8s", "jwks_url": "https://k/j", "audience": "a"}]'),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert message.startswith(f"invalid setting {var}=")
    assert "\n" not in message


def test_invalid_value_stops_a_process_with_one_line():
    env = {"KAFKA_TOPIC_PARTITIONS": "many", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", "from openg2p_audit.settings import load_settings; load_settings()"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("invalid setting KAFKA_TOPIC_PARTITIONS='many'")


def test_unconfigured_services_say_which_variable():
    s = Settings(kafka_bootstrap_servers=None)
    with pytest.raises(SettingsError, match="KAFKA_BOOTSTRAP_SERVERS"):
        _ = s.bootstrap_servers
