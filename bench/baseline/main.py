"""The cheapest useful HTTP function, for comparison with ingest on the same machine.

It parses and validates the event with the same model and answers 202 without
touching Kafka: what the HTTP server alone allows on this machine, right now.
An aio function under the same server as ingest (functions-framework `--asgi`).
"""

import json

from starlette.responses import Response

from openg2p_audit.contract import AuditEvent


async def baseline(request):
    if request.url.path == "/healthz":
        return Response("ok")
    event = AuditEvent.model_validate_json(await request.body())
    return Response(json.dumps({"accepted": [event.id]}), 202, media_type="application/json")
