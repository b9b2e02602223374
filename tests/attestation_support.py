"""The attestation keys of the test session, and records attested as ingest attests them.

One pair of keys per session: the module settings (conftest) hand them to every function
they start, so a record attested here is one the writer, the redrive and the replay store.
"""

from __future__ import annotations

import secrets

from openg2p_audit.attestation import Attestor
from openg2p_audit.contract import AuditEvent
from openg2p_audit.kafka_binding import KafkaRecord, encode

INGEST_KEY = secrets.token_hex(32)
QUERY_KEY = secrets.token_hex(32)
INGEST = Attestor(INGEST_KEY.encode())
QUERY = Attestor(QUERY_KEY.encode())


def record(event: AuditEvent) -> KafkaRecord:
    """The record ingest would produce for `event`."""
    return encode(event, INGEST)


def reattest(headers: dict[str, str], body: bytes) -> dict[str, str]:
    """A binary-mode delivery's headers with an attestation made for them as they are now.

    Ingest never attests an event it refuses; the writer checks the contract again all the
    same, and tests reach those checks with deliveries attested here, bad as they are.
    """
    from openg2p_audit.attestation import EXTENSION
    from openg2p_audit.http_binding import header_value

    kept = {k: v for k, v in headers.items() if k.lower() != f"ce-{EXTENSION}"}
    attrs = {k[3:].lower(): header_value(v) for k, v in kept.items() if k.lower()[:3] == "ce-"}
    for k, v in kept.items():
        if k.lower() == "content-type":
            attrs["datacontenttype"] = v
    return {**kept, f"ce-{EXTENSION}": INGEST.attest(attrs, body)}


def attested_headers(headers: list[tuple[str, bytes]], value: bytes) -> list[tuple[str, bytes]]:
    """A Kafka record's headers with ingest's attestation for them and `value` added."""
    from openg2p_audit.attestation import EXTENSION
    from openg2p_audit.kafka_binding import decode_record

    proof = INGEST.attest(decode_record(headers), value)
    return [*headers, (f"ce_{EXTENSION}", proof.encode())]
