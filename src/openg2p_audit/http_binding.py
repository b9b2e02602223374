"""Reading the CloudEvents HTTP binding, shared by ingest and the writer.

Both read binary-mode attributes from `ce-*` headers themselves instead of
through `cloudevents.http.from_http`: that helper invents an `id` and a `time`
when they are missing (and a redelivery must keep the original ones), and it
leaves percent-encoded header values encoded, which would store `José` as
`Jos%C3%A9`.

Header values reach the function as `str` decoded byte-for-byte as Latin-1,
which is what WSGI and ASGI servers do. The binding (3.1.3.2) says a value
outside printable ASCII is percent-encoded UTF-8, but emitters differ:

- conforming senders (the local eventing runner) percent-encode: `Jos%C3%A9`;
- the Go SDK (sdk-go v2) sends the raw UTF-8 bytes;
- Python's `http.client`, under the Python SDK, sends the characters as Latin-1.

So the bytes are read as UTF-8 when they are valid UTF-8 and as Latin-1
otherwise, and percent escapes are then decoded. `José 50% "q"` arrives as
sent from all three (a `%` not followed by two hex digits stays as it is).
A Latin-1 value whose bytes happen to be valid UTF-8 (such as `Ã©`) is read
as UTF-8; a Latin-1 sender cannot be told apart from that.

The other direction, `transport_value`, is how ingest writes attribute values
on the events topic: percent-encoded like the binding's header values, plus the
characters java.net.URI refuses raw. Knative's Kafka dispatcher copies a
record's `ce_*` headers into HTTP headers as they are (cloudevents/sdk-java's
Vert.x writer does not encode, and Vert.x writes each character as one byte:
Latin-1, or `?` for anything beyond), and parses `source` and `dataschema`
with java.net.URI; an encoded value is plain ASCII that survives both, and
every reader decodes it back (`header_value`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from urllib.parse import quote, unquote

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` → `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def header_value(value: str) -> str:
    """A `ce-*` header value as the emitter meant it (see the module docstring)."""
    if not value.isascii():
        # Not UTF-8 (Latin-1 characters) or not Latin-1-decoded at all: keep them as they are.
        with contextlib.suppress(UnicodeError):
            value = value.encode("latin-1").decode("utf-8")
    return unquote(value) if "%" in value else value


# Printable ASCII but for the space, `"` and `%` (the HTTP binding's rule, 3.1.3.2) and
# `<>[\]^`{|}` (which java.net.URI refuses in a path): everything else is percent-encoded.
_TRANSPORT_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%<>[\\]^`{|}')


def transport_value(value: str) -> str:
    """An attribute value as it travels in a header: ASCII, decoded by `header_value`."""
    return quote(value, safe=_TRANSPORT_SAFE, errors="surrogatepass")


def binary_attributes(
    headers: Iterable[tuple[str, str]], content_type: str | None
) -> dict[str, str]:
    """The context attributes of a binary-mode request; `datacontenttype` from Content-Type."""
    attrs: dict[str, str] = {}
    for name, value in headers:
        if name[:3].lower() == "ce-":
            attrs[name[3:].lower()] = header_value(value)
    if content_type:
        attrs["datacontenttype"] = content_type
    return attrs


def is_binary(names: Iterable[str]) -> bool:
    return any(name[:3].lower() == "ce-" for name in names)
