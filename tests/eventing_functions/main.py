"""Stand-in functions for the eventing runner tests (the real ones live in functions/).

`record` (http signature) appends every request it receives to RECORD_FILE as
one JSON line and answers as PLAN_FILE says, so a test can script failures:

    {"default": {"status": 202},
     "ids": {"<ce-id>": [{"status": 503, "body": "busy"}, {"status": 202}]},
     "delay": {"<ce-id>": 0.5}}

The n-th delivery of an id gets the n-th entry (the last one repeats). The
attempt count comes from the record file, not from memory, so it is right
whatever gunicorn thread or worker answers. `record_cloudevent`
(cloudevent signature) records the events it is given.
"""

import base64
import fcntl
import json
import os
import time

import flask


def _plan() -> dict:
    path = os.environ.get("PLAN_FILE")
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _append(entry_for_attempt) -> dict:
    with open(os.environ["RECORD_FILE"], "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        lines = [json.loads(line) for line in f if line.strip()]
        entry = entry_for_attempt(lines)
        f.write(json.dumps(entry) + "\n")
        f.flush()
        return entry


def record(request: flask.Request):
    if request.method == "GET":
        return "ok", 200
    plan = _plan()
    body = request.get_data()
    headers = {k.lower(): v for k, v in request.headers.items()}
    event_id = headers.get("ce-id", "")

    def entry(lines):
        attempt = 1 + sum(1 for line in lines if line["id"] == event_id)
        steps = plan.get("ids", {}).get(event_id) or [plan.get("default", {"status": 202})]
        step = steps[min(attempt, len(steps)) - 1]
        return {
            "t": time.time(),
            "id": event_id,
            "attempt": attempt,
            "path": request.path,
            "headers": headers,
            "body_b64": base64.b64encode(body).decode(),
            "status": step.get("status", 202),
            "reply": step.get("body", ""),
            "delay": plan.get("delay", {}).get(event_id, 0),
        }

    e = _append(entry)
    if e["delay"]:
        time.sleep(e["delay"])
    return e["reply"], e["status"], {"kne-testhint": "scripted"} if e["status"] >= 300 else {}


def record_cloudevent(cloud_event):
    data = cloud_event.get_data()
    _append(
        lambda lines: {
            "t": time.time(),
            "id": cloud_event["id"],
            "attributes": dict(cloud_event.get_attributes()),
            "data": data if not isinstance(data, bytes) else data.decode("utf-8", "replace"),
        }
    )


_producer = None


def ingest(request: flask.Request):
    """Stand-in ingest: any CloudEvent to KAFKA_EVENTS_TOPIC (binary mode), 202 once acked."""
    from kafka import KafkaProducer

    from openg2p_audit.eventing.binding import NotACloudEvent, from_http, to_kafka_binary

    global _producer
    if request.method == "GET":
        return "ok", 200
    try:
        event = from_http(dict(request.headers), request.get_data())
    except NotACloudEvent as exc:
        return {"error": str(exc)}, 400
    if _producer is None:
        _producer = KafkaProducer(
            bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"], acks="all"
        )
    headers, value = to_kafka_binary(event)
    _producer.send(os.environ["KAFKA_EVENTS_TOPIC"], value=value, headers=headers).get(timeout=10)
    return "", 202


def accept(request: flask.Request):
    """Answers 202 and does nothing else: for measuring the runner itself."""
    return "", 202
