"""Ingest's attestation: what it covers, what survives Knative's delivery, what it refuses."""

from __future__ import annotations

import pytest

from attestation_support import INGEST, INGEST_KEY, QUERY, QUERY_KEY
from openg2p_audit.attestation import Attestor, NotAttested, Verifier, canonical
from openg2p_audit.contract import AuditEvent
from openg2p_audit.kafka_binding import decode_record, encode
from openg2p_audit.settings import SettingsError, load_settings
from pipeline_support import audit_event

VERIFIER = Verifier([INGEST_KEY.encode()], [QUERY_KEY.encode()])


def _record_attrs(event: AuditEvent, attestor: Attestor = INGEST) -> tuple[dict, bytes]:
    rec = encode(event, attestor)
    return decode_record(rec.headers), rec.value


def test_a_record_ingest_produced_verifies_after_the_trip():
    event = AuditEvent.model_validate(
        audit_event(subject='bénéficiaire/₹ 5 "x" 100%', note="a<b>{c}|d", tenantid="t")
    )
    attrs, data = _record_attrs(event)
    assert VERIFIER.verify(attrs, data).name == "ingest"
    # What Knative's dispatcher adds, and how it rewrites `time` (OffsetDateTime, trailing
    # zeros of the fraction trimmed), does not matter.
    moved = {
        **attrs,
        "knativekafkapartition": "3",
        "knativekafkaoffset": "17",
        "knativeerrorcode": "503",
        "knativeerrordest": "http://w",
        "knativeerrordata": "e30=",
    }
    assert VERIFIER.verify(moved, data).name == "ingest"


@pytest.mark.parametrize(
    ("ours", "javas"),
    [("2026-04-01T12:00:00.120000Z", "2026-04-01T12:00:00.12Z"),
     ("2026-04-01T12:00:00Z", "2026-04-01T12:00:00Z"),
     ("2026-04-01T12:00:00.000001Z", "2026-04-01T14:00:00.000001+02:00")],
)  # fmt: skip
def test_time_is_covered_as_the_instant_it_names(ours, javas):
    attrs = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "time": ours}
    assert canonical(attrs, b"{}") == canonical({**attrs, "time": javas}, b"{}")
    assert canonical(attrs, b"{}") != canonical({**attrs, "time": "2026-04-01T12:00:01Z"}, b"{}")


@pytest.mark.parametrize(
    "change",
    [{"source": "/openg2p/payments"}, {"id": "other"}, {"type": "x"}, {"authid": "admin"},
     {"newext": "v"}, {"datacontenttype": "application/vnd.x+json"}],
)  # fmt: skip
def test_any_changed_or_added_attribute_breaks_it(change):
    attrs, data = _record_attrs(AuditEvent.model_validate(audit_event(authid="svc")))
    with pytest.raises(NotAttested, match="does not match"):
        VERIFIER.verify({**attrs, **change}, data)


def test_changed_data_breaks_it_and_a_missing_or_foreign_one_is_refused():
    attrs, data = _record_attrs(AuditEvent.model_validate(audit_event()))
    with pytest.raises(NotAttested, match="does not match"):
        VERIFIER.verify(attrs, data.replace(b"view", b"edit"))
    with pytest.raises(NotAttested, match="no attestation"):
        VERIFIER.verify({k: v for k, v in attrs.items() if k != "auditattestation"}, data)
    forged, _ = _record_attrs(AuditEvent.model_validate(audit_event()), Attestor(b"m" * 40))
    with pytest.raises(NotAttested, match="does not hold"):
        VERIFIER.verify(forged, data)
    with pytest.raises(NotAttested, match="malformed"):
        VERIFIER.verify({**attrs, "auditattestation": "v1:abc"}, data)


def test_the_query_services_key_attests_its_own_read_events_only():
    own = AuditEvent.model_validate(audit_event(
        source="/openg2p/audit/query", type="org.openg2p.audit.query.performed"
    ))  # fmt: skip
    assert VERIFIER.verify(*_record_attrs(own, QUERY)).name == "query"
    for other in (audit_event(), audit_event(source="/openg2p/audit/query"),
                  audit_event(type="org.openg2p.audit.query.performed")):  # fmt: skip
        with pytest.raises(NotAttested, match="its own read events"):
            VERIFIER.verify(*_record_attrs(AuditEvent.model_validate(other), QUERY))


def test_keys_rotate_the_first_attests_every_one_verifies():
    old, new = "o" * 40, "n" * 40
    event = AuditEvent.model_validate(audit_event())
    rotated = Verifier([new.encode(), old.encode()], [QUERY_KEY.encode()])
    assert rotated.verify(*_record_attrs(event, Attestor.from_keys(f"{old}", "X"))).name
    assert rotated.verify(*_record_attrs(event, Attestor.from_keys(f"{new},{old}", "X"))).name
    with pytest.raises(NotAttested):
        Verifier([new.encode()], []).verify(*_record_attrs(event, Attestor(old.encode())))


def test_keys_are_settings_that_never_show_their_value(monkeypatch):
    monkeypatch.setenv("ATTESTATION_INGEST_KEYS", "short-secret")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "ATTESTATION_INGEST_KEYS" in str(err.value)
    assert "short-secret" not in str(err.value)
    monkeypatch.delenv("ATTESTATION_INGEST_KEYS")
    with pytest.raises(SettingsError, match="ATTESTATION_INGEST_KEYS and ATTESTATION_QUERY_KEYS"):
        Verifier.from_settings(load_settings())
