"""Talking to a served function (`openg2p_audit.devservices.LocalFunction`) over HTTP."""

from __future__ import annotations

import http.client
import json
from typing import Any

from openg2p_audit.devservices.function import settings_env

__all__ = ["request", "settings_env"]


def request(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, Any, http.client.HTTPMessage]:
    """One HTTP request on a new connection; the body is parsed when it is JSON."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
        parsed: Any = json.loads(raw) if "json" in ctype and raw else raw.decode()
        return resp.status, parsed, resp.headers  # names match in any case
    finally:
        conn.close()
