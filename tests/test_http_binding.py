"""Binary-mode header values as the CloudEvents SDKs and the runner put them on the wire."""

from __future__ import annotations

import pytest

from openg2p_audit.http_binding import binary_attributes, header_value

NOTE = 'José 50% "q"'


def as_received(wire: bytes) -> str:
    """What a WSGI or ASGI server hands the function: the header bytes as Latin-1."""
    return wire.decode("latin-1")


@pytest.mark.parametrize(
    "wire",
    [
        NOTE.encode("utf-8"),  # sdk-go: raw UTF-8
        NOTE.encode("latin-1"),  # the Python SDK over http.client: Latin-1
        b"Jos%C3%A9%2050%25%20%22q%22",  # the binding's percent-encoding (the runner)
        b'Jos%C3%A9 50% "q"',  # partly encoded: a lone % stays as it is
    ],
    ids=["utf-8", "latin-1", "percent-encoded", "mixed"],
)
def test_every_senders_bytes_read_as_sent(wire):
    assert header_value(as_received(wire)) == NOTE


def test_plain_ascii_is_untouched_and_attributes_are_lower_cased():
    headers = [("Ce-Id", "e-1"), ("ce-TenantId", "t_1"), ("traceparent", "x"), ("Host", "h")]
    assert binary_attributes(headers, "application/json") == {
        "id": "e-1",
        "tenantid": "t_1",
        "datacontenttype": "application/json",
    }
