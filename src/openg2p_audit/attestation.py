"""Proof of origin for the events topic: only what ingest (or the query service) produced is stored.

The trail's invariant is that no row enters `audit_events` unless its event passed
ingest's token, policy and contract checks. Cluster configuration (Kafka ACLs, EventPolicies,
cluster-local Services, NetworkPolicies) narrows who can reach the topics, the dead-letter
sinks and the writer, but a mistake in any of it would let a forged record in. So the
invariant is also held in code: ingest attaches to every record it produces an HMAC-SHA256
(the stdlib `hmac` module) over the event's attributes and its data bytes, keyed by a secret
shared only with the writer, maintenance and the replay command; each of those stores an
event only if its attestation verifies. Anything else (a record written to the topic by
another producer, a Trigger's dead letter, a forged POST to a dead-letter sink, an envelope
smuggled inside `data`) is refused for good or left for an operator, never stored.

The query service audits its own reads by producing to the events topic directly; it has a
key of its own, and an event attested with it is stored only if it is one of the query
service's own events (source `/openg2p/audit/query`, type `org.openg2p.audit.query.*`): a
leaked query key cannot forge an emitter's event.

What is covered is what survives Knative's delivery unchanged (read in
knative-extensions/eventing-kafka-broker and cloudevents/sdk-java 4.0.1):

- every context attribute and extension, by its decoded text value; `time` as the instant it
  names, because the dispatcher parses it (java.time.OffsetDateTime) and writes it again
  (ISO_OFFSET_DATE_TIME trims trailing zeros of the fraction);
- the data bytes: the dispatcher passes a binary-mode record's value through as the body,
  and the dead-letter KafkaSink writes the body back as the record value.

Left out is what Knative adds on the way: `knativekafkapartition` and `knativekafkaoffset`
(CloudEventOverridesMutator adds them to every delivery, since knative-v1.13) and the
dead-letter extensions `knativeerror*` (RecordDispatcherImpl). Those never reach a row.
Anything else the dispatcher would add (a KafkaSource `ceOverrides` extension) breaks the
attestation, so the manifests set none. The HTTP `traceparent` header of the dispatcher's
tracing is a header, not an attribute (`ce-traceparent` is the event's), and is not read.

Keys are text of at least 32 characters (a Secret); a comma-separated list lets keys rotate:
the first attests, every one verifies. The attestation names its key by an id derived from
the key (an HMAC of a fixed label), so no key material leaves the process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# The query service's own events (reserved to it by the policy): what its key may attest.
from .policy import QUERY_SOURCE, QUERY_TYPE_PREFIX
from .settings import Settings, SettingsError

# The extension that carries the attestation: `ce_auditattestation` on Kafka.
EXTENSION = "auditattestation"

# Attributes the data plane adds after ingest attested the event: never covered, never stored.
DELIVERY_METADATA = frozenset({"knativekafkapartition", "knativekafkaoffset"})
DEAD_LETTER_PREFIX = "knativeerror"


_LABEL = b"openg2p-audit attestation v1\n"
_KEY_ID_LABEL = b"openg2p-audit attestation key id"
_VALUE = re.compile(r"^v1:([0-9a-f]{16}):([A-Za-z0-9_-]{43})$")
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$")


class NotAttested(ValueError):
    """The event carries no attestation that this process can verify."""


def is_delivery_metadata(name: str) -> bool:
    """Whether an attribute is one Knative adds in transit (dispatcher or dead-letter sink)."""
    return name in DELIVERY_METADATA or name.startswith(DEAD_LETTER_PREFIX)


def canonical_time(value: str) -> str:
    """An RFC 3339 time as the instant it names: UTC, six fraction digits, `Z`."""
    m = _TIME.match(value)
    if not m:
        raise NotAttested(f"time {value[:40]!r} is not an RFC 3339 timestamp")
    base, fraction, zone = m.groups()
    micros = ((fraction or "") + "000000")[:6]
    moment = datetime.fromisoformat(f"{base}.{micros}{'+00:00' if zone == 'Z' else zone}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(attributes: Mapping[str, str], data: bytes | None) -> bytes:
    """The bytes an attestation signs: each covered attribute and the data, length-prefixed.

    Lengths make the encoding unambiguous whatever the values hold; names are sorted, so
    the order in which headers arrive does not matter.
    """
    parts = [_LABEL]
    for name in sorted(attributes):
        if name == EXTENSION or is_delivery_metadata(name):
            continue
        value = attributes[name]
        if name == "time":
            value = canonical_time(value)
        n, v = name.encode(), value.encode("utf-8", "surrogatepass")
        parts += [len(n).to_bytes(4, "big"), n, len(v).to_bytes(4, "big"), v]
    body = data or b""
    parts += [b"\x00data", len(body).to_bytes(8, "big"), body]
    return b"".join(parts)


def _key_id(key: bytes) -> str:
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def parse_keys(text: str | None) -> list[bytes]:
    """A comma-separated key list (settings already checked each key)."""
    return [k.strip().encode() for k in (text or "").split(",") if k.strip()]


class Attestor:
    """Attests the records one producer (ingest, or the query service) writes."""

    def __init__(self, key: bytes):
        self.key = key
        self.key_id = _key_id(key)

    @classmethod
    def from_keys(cls, text: str | None, setting: str) -> Attestor:
        keys = parse_keys(text)
        if not keys:
            raise SettingsError(
                f"{setting} is not set: the key (Secret audit-attestation) that proves to the "
                "writer that an event passed this service's checks"
            )
        return cls(keys[0])

    def attest(self, attributes: Mapping[str, str], data: bytes | None) -> str:
        mac = hmac.new(self.key, canonical(attributes, data), hashlib.sha256).digest()
        return f"v1:{self.key_id}:{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


@dataclass(frozen=True)
class Origin:
    """Who attested an event: `ingest`, or `query` (its own read events only)."""

    name: str


INGEST = Origin("ingest")
QUERY = Origin("query")


class Verifier:
    """Checks attestations against every key of ingest and of the query service."""

    def __init__(self, ingest_keys: list[bytes], query_keys: list[bytes]):
        self._keys: dict[str, tuple[bytes, Origin]] = {}
        for keys, origin in ((query_keys, QUERY), (ingest_keys, INGEST)):
            for key in keys:
                self._keys[_key_id(key)] = (key, origin)

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """The verifier of the writer, maintenance and replay; SettingsError without keys."""
        missing = [
            name
            for name, value in (
                ("ATTESTATION_INGEST_KEYS", settings.attestation_ingest_keys),
                ("ATTESTATION_QUERY_KEYS", settings.attestation_query_keys),
            )
            if not value
        ]
        if missing:
            raise SettingsError(
                f"{' and '.join(missing)} not set: the keys (Secret audit-attestation) that "
                "prove an event passed ingest's checks (or is the query service's own); "
                "without them nothing could be stored"
            )
        return cls(
            parse_keys(settings.attestation_ingest_keys),
            parse_keys(settings.attestation_query_keys),
        )

    def verify(self, attributes: Mapping[str, str], data: bytes | None) -> Origin:
        """The origin of an event whose attestation verifies; NotAttested otherwise."""
        value = attributes.get(EXTENSION)
        if value is None:
            raise NotAttested("the event carries no attestation (it did not come from ingest)")
        m = _VALUE.match(value)
        if not m:
            raise NotAttested("the attestation is malformed")
        found = self._keys.get(m.group(1))
        if found is None:
            raise NotAttested("the attestation names a key this service does not hold")
        key, origin = found
        expected = hmac.new(key, canonical(attributes, data), hashlib.sha256).digest()
        given = base64.urlsafe_b64decode(m.group(2) + "=")
        if not hmac.compare_digest(expected, given):
            raise NotAttested("the attestation does not match the event (forged or altered)")
        if origin is QUERY and not (
            attributes.get("source") == QUERY_SOURCE
            and attributes.get("type", "").startswith(QUERY_TYPE_PREFIX)
        ):
            raise NotAttested("the query service's key attests only its own read events")
        return origin
