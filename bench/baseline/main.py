"""The cheapest useful HTTP function, for comparison with ingest on the same machine.

It parses and validates the event with the same model and answers 202 without
touching Kafka: what the HTTP server alone allows on this machine, right now.
"""

import json

from openg2p_audit.contract import AuditEvent


def baseline(request):
    if request.path == "/healthz":
        return "ok", 200
    event = AuditEvent.model_validate_json(request.get_data())
    return json.dumps({"accepted": [event.id]}), 202, {"Content-Type": "application/json"}
