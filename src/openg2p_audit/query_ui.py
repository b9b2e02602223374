"""The investigators' timeline page (placeholder until the page lands)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response


async def handle(request: Request, path: str) -> Response:
    return Response(b'{"error":"not_found"}', 404, media_type="application/json")
