"""The one settings object, read from environment variables.

Every function, the CLI and the local runner read the same variables, so a
deployment's ConfigMap and a developer's shell mean the same thing. A bad value
must stop the process at start with one line naming the variable: a function
that boots with a wrong topic name would accept events and put them somewhere
nobody reads.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TopicName = Annotated[str, Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")]


# Signature algorithms a token may use: those verified with the issuer's public key.
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


class SettingsError(SystemExit):
    """Raised (and exits the process) when a variable holds an unusable value."""


class Settings(BaseSettings):
    """Field names upper-cased are the environment variable names."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True
    )

    # Kafka. None means "not configured": development and tests then start a local broker.
    kafka_bootstrap_servers: str | None = None
    kafka_events_topic: TopicName = "openg2p.audit.events"
    kafka_dlq_topic: TopicName = "openg2p.audit.dlq"
    # The Trigger's dead letters: Broker events that never passed ingest (never stored).
    kafka_broker_dlq_topic: TopicName = "openg2p.audit.broker-dlq"
    kafka_topic_partitions: int = Field(12, ge=1, le=1000)
    # How `openg2p-audit topics` creates the topics: copies of each partition, and how many
    # of them must hold a record before acks=all answers (so before ingest's 202). One of
    # each suits a one-broker development cluster; production sets 3 and 2.
    kafka_replication_factor: int = Field(1, ge=1, le=32)
    kafka_min_insync_replicas: int = Field(1, ge=1, le=32)
    kafka_consumer_group: str = Field("openg2p-audit-consumer", min_length=1)

    # PostgreSQL: one URL, or the OpenG2P DB_* convention. Neither means "not configured".
    database_url: str | None = None
    db_host: str | None = None
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "openg2p_audit"
    db_user: str = "postgres"
    db_password: str = ""

    # Database timeouts, seconds. The socket timeout outlasts the statement timeout so a
    # slow statement is cancelled cleanly by PostgreSQL before the connection is given up.
    db_statement_timeout: float = Field(10.0, gt=0, le=3600)
    db_socket_timeout: float = Field(15.0, gt=0, le=3600)

    # Writer: group commit and the bulk path.
    writer_batch_max: int = Field(1000, ge=1, le=100_000)
    writer_wait_seconds: float = Field(30.0, gt=0, le=3600)
    replay_batch_size: int = Field(5000, ge=1, le=100_000)

    # Partition upkeep.
    partitions_ahead_months: int = Field(3, ge=1, le=120)
    retention_months: int = Field(84, ge=0, le=1200)

    # Python logging level of the functions (DEBUG adds one line per accepted request).
    log_level: str = Field("INFO", pattern=r"^(?i:DEBUG|INFO|WARNING|ERROR|CRITICAL)$")

    # Ingest: what it refuses (4xx) and how long a caller may wait for Kafka (503).
    ingest_max_event_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    ingest_max_batch_events: int = Field(500, ge=1, le=100_000)
    ingest_max_batch_bytes: int = Field(5 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    ingest_max_depth: int = Field(32, ge=2, le=200)
    ingest_max_clock_skew_seconds: int = Field(300, ge=0, le=7 * 24 * 3600)
    # The event's attributes as binary-mode headers (ce-*, Content-Type), as the KafkaSource
    # delivers them. Knative's Kafka receiver (the dead-letter KafkaSink) takes at most 8 KiB
    # of request headers (Vert.x's default), and a dead letter carries the dispatcher's own
    # (token, knativeerror* with up to 1368 bytes of error data): 4 KiB of attributes fit.
    ingest_max_attribute_bytes: int = Field(4096, ge=512, le=1024 * 1024)
    ingest_ack_timeout_ms: int = Field(1500, ge=50, le=60_000)
    ingest_linger_ms: int = Field(5, ge=0, le=1000)
    ingest_max_pending_events: int = Field(50_000, ge=1, le=10_000_000)
    ingest_retry_after_seconds: int = Field(1, ge=1, le=3600)
    # Every function: the most request-header bytes read before the request is refused with
    # 431 (uvicorn's httptools parser sets no bound of its own; see serving.py).
    http_max_header_bytes: int = Field(64 * 1024, ge=8 * 1024, le=1024 * 1024)

    # Dead-letter redrive, run by the hourly maintenance: its own consumer group on the DLQ
    # topic, and bounds that keep one run well inside a PingSource's patience.
    kafka_redrive_group: str = Field("openg2p-audit-redrive", min_length=1)
    redrive_max_records: int = Field(10_000, ge=0, le=10_000_000)
    redrive_max_seconds: float = Field(20.0, gt=0, le=3600)

    # Tamper evidence (sealing.py): hourly digests signed with the Ed25519 key in this file
    # (PEM, a mounted Secret), named by the origin, which says which deployment they vouch
    # for. Unset key file: maintenance does not seal (and says so in its summary).
    integrity_origin: str = Field(
        "openg2p-audit", min_length=1, max_length=200, pattern=r"^[^\s+]+$"
    )
    integrity_signing_key_file: str | None = None
    integrity_grace_seconds: int = Field(600, ge=0, le=7 * 24 * 3600)
    integrity_max_hours_per_run: int = Field(744, ge=1, le=100_000)
    kafka_digests_topic: TopicName = "openg2p.audit.digests"
    # The verifier key(s) a reader trusts (`name+keyid+base64`, as `integrity public-key`
    # prints them; several separated by spaces, commas or newlines, for rotated keys):
    # `verify` and `evidence` check digests against these, never against a key shipped
    # with what is being checked.
    integrity_verifier_keys: str | None = None

    # Query service (audit-query): what one request may ask for. The cursor secret signs
    # page cursors; unset, each process makes its own, so a cursor only works on the
    # instance that issued it (fine locally, not behind a load balancer).
    query_max_range_days: int = Field(93, ge=1, le=3660)
    query_export_max_rows: int = Field(1_000_000, ge=1, le=100_000_000)
    query_cursor_secret: str | None = Field(None, min_length=32)
    # What one export may hold: its REPEATABLE READ snapshot (and a connection) for at most
    # this long, and a reader that takes no chunk for the idle time is given up on.
    query_export_max_seconds: float = Field(600.0, gt=0, le=86_400)
    query_export_idle_seconds: float = Field(30.0, gt=0, le=3600)
    # Most database connections one query process holds; a read that finds them all busy
    # for a second is a 503 rather than another connection.
    query_db_pool_size: int = Field(8, ge=1, le=1000)

    # Bearer tokens (auth.py): the deployment's OIDC issuer (Keycloak in OpenG2P). Issuer
    # and JWKS URL unset means "not configured": a function that needs tokens refuses to start.
    auth_issuer: str | None = None
    auth_jwks_url: str | None = None
    auth_audience: str = Field("openg2p-audit", min_length=1)
    # Where the roles are: comma-separated dotted paths into the token's claims.
    auth_role_claims: str = Field(
        "realm_access.roles,resource_access.openg2p-audit.roles", min_length=1
    )
    auth_algorithms: str = "RS256,ES256"
    auth_leeway_seconds: int = Field(30, ge=0, le=300)
    auth_jwks_cache_seconds: int = Field(300, ge=10, le=86_400)
    # How long past AUTH_JWKS_CACHE_SECONDS known keys stay usable while the issuer cannot
    # be reached; after that a token that needs them is a 503.
    auth_jwks_max_stale_seconds: int = Field(3600, ge=0, le=7 * 86_400)
    # More issuers whose tokens ingest and the writer accept, as a JSON array of
    # {"issuer", "jwks_url", "audience"}: the cluster's service-account issuer signs the
    # tokens of Knative Eventing's OIDC feature and projected service-account tokens.
    auth_trusted_issuers: str | None = None
    # How many verified tokens a process remembers (until each one's `exp`).
    auth_token_cache_size: int = Field(10_000, ge=0, le=1_000_000)

    # Emitters (ingest) and deliveries (writer) need a token unless these say `disabled`,
    # which is logged at WARNING at start: it leaves the audit trail open to forgery.
    ingest_auth: Literal["required", "disabled"] = "required"
    writer_auth: Literal["required", "disabled"] = "required"
    # The audience a delivery's token must carry: the KafkaSource's `sink.audience`.
    writer_auth_audience: str = Field("openg2p-audit-writer", min_length=1)
    # Whose tokens: the cluster's service-account issuer (one of AUTH_TRUSTED_ISSUERS), and
    # the KafkaSource's OIDC identity (`sub`), comma-separated system:serviceaccount:NS:NAME.
    writer_auth_issuer: str | None = None
    writer_auth_subjects: str | None = None
    # Maintenance takes only its PingSource's pings the same way (its `sink.audience`).
    maintenance_auth: Literal["required", "disabled"] = "required"
    maintenance_auth_audience: str = Field("openg2p-audit-maintenance", min_length=1)
    maintenance_auth_issuer: str | None = None
    maintenance_auth_subjects: str | None = None
    # Attestation keys (attestation.py; Secret audit-attestation): ingest's, and the query
    # service's for its own read events. Comma-separated, the first attests, all verify.
    attestation_ingest_keys: str | None = None
    attestation_query_keys: str | None = None
    # Which `source`s (and `type` prefixes) each caller may emit under: YAML or JSON text
    # (a ConfigMap key), or a file holding it. See policy.py.
    ingest_source_policy: str | None = None
    ingest_source_policy_file: str | None = None
    # Claims of the caller's token copied into the `authclaims` extension of each event.
    ingest_auth_claims: str = "iss,azp,client_id"

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port):
                raise ValueError(f"expected host:port[,host:port...], got {server.strip()!r}")
        return value

    @field_validator("kafka_min_insync_replicas")
    @classmethod
    def _insync_within_replicas(cls, value: int, info: ValidationInfo) -> int:
        replicas = info.data.get("kafka_replication_factor")
        if replicas is not None and value > replicas:
            raise ValueError(f"must not exceed KAFKA_REPLICATION_FACTOR ({replicas})")
        return value

    @field_validator("auth_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: str) -> str:
        # A shared-secret (HS*) or `none` algorithm would let anyone holding the public JWKS
        # sign tokens (key confusion); only signatures made with the issuer's private key count.
        names = [a.strip() for a in value.split(",") if a.strip()]
        if not names or any(a not in ASYMMETRIC_ALGORITHMS for a in names):
            raise ValueError(
                f"expected a comma-separated subset of {','.join(ASYMMETRIC_ALGORITHMS)}"
            )
        return ",".join(names)

    @field_validator(
        "auth_issuer", "auth_jwks_url", "writer_auth_issuer", "maintenance_auth_issuer"
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @field_validator("writer_auth_subjects", "maintenance_auth_subjects")
    @classmethod
    def _subjects(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [s.strip() for s in value.split(",") if s.strip()]
        if not names or any(
            not re.fullmatch(r"system:serviceaccount:[a-z0-9.-]+:[a-z0-9.-]+", n) for n in names
        ):
            raise ValueError("expected comma-separated system:serviceaccount:NAMESPACE:NAME")
        return ",".join(names)

    @field_validator("attestation_ingest_keys", "attestation_query_keys")
    @classmethod
    def _keys(cls, value: str | None) -> str | None:
        if value is None:
            return None
        keys = [k.strip() for k in value.split(",")]
        if any(len(k) < 32 or re.search(r"\s", k) for k in keys):
            raise ValueError("expected comma-separated keys of 32 or more characters each")
        return ",".join(keys)

    @field_validator("auth_trusted_issuers")
    @classmethod
    def _issuer_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            entries = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        keys = {"issuer", "jwks_url", "audience"}
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and set(e) == keys and all(isinstance(e[k], str) and e[k]
                                                           for k in keys)
            for e in entries
        ):  # fmt: skip
            raise ValueError('expected a JSON array of {"issuer", "jwks_url", "audience"}')
        for e in entries:
            _check_http_url(e["issuer"])
            _check_http_url(e["jwks_url"])
        return value

    @field_validator("integrity_verifier_keys")
    @classmethod
    def _verifier_keys(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _parse_verifier_keys(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError("expected postgresql://user:password@host:port/database")
        return value

    @property
    def kafka_configured(self) -> bool:
        return self.kafka_bootstrap_servers is not None

    @property
    def database_configured(self) -> bool:
        return self.database_url is not None or self.db_host is not None

    @property
    def auth_configured(self) -> bool:
        return self.auth_issuer is not None and self.auth_jwks_url is not None

    @property
    def trusted_issuers(self) -> list[dict[str, str]]:
        """The issuer of AUTH_ISSUER (if set) followed by those of AUTH_TRUSTED_ISSUERS."""
        found = []
        if self.auth_configured:
            found.append(
                {"issuer": self.auth_issuer, "jwks_url": self.auth_jwks_url,
                 "audience": self.auth_audience}
            )  # fmt: skip
        found.extend(json.loads(self.auth_trusted_issuers or "[]"))
        return found  # type: ignore[return-value]

    @property
    def verifier_keys(self) -> list:
        """INTEGRITY_VERIFIER_KEYS as `integrity.VerifierKey`s (empty when unset)."""
        if self.integrity_verifier_keys is None:
            return []
        return _parse_verifier_keys(self.integrity_verifier_keys)

    @property
    def bootstrap_servers(self) -> list[str]:
        if self.kafka_bootstrap_servers is None:
            raise SettingsError("KAFKA_BOOTSTRAP_SERVERS is not set: point it at the Kafka brokers")
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",")]

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Settings:
        # A copy must not inherit the cached connection arguments of another database.
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("pg_connect_kwargs", None)
        return copy

    @cached_property
    def pg_connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for pg8000.connect()."""
        if self.database_url is not None:
            parts = urlsplit(self.database_url)
            return {
                "host": parts.hostname,
                "port": parts.port or 5432,
                "database": unquote(parts.path.lstrip("/")) or "postgres",
                "user": unquote(parts.username or "postgres"),
                "password": unquote(parts.password or "") or None,
            }
        if self.db_host is not None:
            return {
                "host": self.db_host,
                "port": self.db_port,
                "database": self.db_name,
                "user": self.db_user,
                "password": self.db_password or None,
            }
        raise SettingsError("DATABASE_URL (or DB_HOST and friends) is not set")

    @property
    def database_dsn(self) -> str:
        """A password-free URL, fit for logs."""
        kw = self.pg_connect_kwargs
        return f"postgresql://{quote(kw['user'])}@{kw['host']}:{kw['port']}/{kw['database']}"


def _parse_verifier_keys(text: str) -> list:
    from .integrity import read_verifier_keys  # cryptography: only for those who need it

    return read_verifier_keys("\n".join(re.split(r"[\s,]+", text.strip())))


# Settings whose values are secrets: an error names the variable, never its value.
SECRET_SETTINGS = frozenset(
    {
        "DB_PASSWORD",
        "DATABASE_URL",
        "QUERY_CURSOR_SECRET",
        "ATTESTATION_INGEST_KEYS",
        "ATTESTATION_QUERY_KEYS",
    }
)


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; on a bad value exit with one line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]).upper() if err["loc"] else "settings"
        shown = "(secret)" if name in SECRET_SETTINGS else repr(err.get("input"))
        raise SettingsError(f"invalid setting {name}={shown}: {err['msg']}") from None
