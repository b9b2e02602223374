"""Faults against the real pipeline: zero loss, no duplicates, 503 rather than silence.

Each case runs a known stream of events with unique ids through
`knative/base` (ingest → Kafka → KafkaSource → writer → PostgreSQL) while
one part fails, then accounts for every id (`fault_support.account`) and
prints its counts. The KafkaSource's retry budget is shortened through its
manifest (4 retries from 0.5 s, about 7.5 s) so an outage can outlast it in
a test; the cluster's budget is minutes.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from attestation_support import attested_headers
from eventing_support import produce
from fault_support import Load, account, dlq_records, wait_for_rows
from openg2p_audit.replay import replay
from openg2p_audit.topics import ensure_topics
from pipeline_support import (
    INGEST,
    PING,
    SOURCE,
    WRITER,
    audit_event,
    start_pipeline,
    stored_ids,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

RETRY_BUDGET = {"retry": 4, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S"}


def emitter(pipeline) -> str:
    """The registry's token: ingest requires one, as knative/base has it."""
    return pipeline.issuer.mint("service-account-openg2p-registry", (), azp="openg2p-registry")


@pytest.fixture(scope="module")
def pipeline(settings, tmp_path_factory):
    ensure_topics(settings)
    runner = start_pipeline(
        settings, tmp_path_factory.mktemp("faults"), delivery=RETRY_BUDGET, ingest_auth=True
    )
    yield runner
    runner.stop()


@pytest.fixture
def report(capsys):
    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n[faults] {line}", flush=True)

    return emit


def _later(delay: float, action) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _redrive_until_stored(pipeline, settings, ids: set[str], timeout: float = 90.0) -> None:
    """Fire the maintenance PingSource (DLQ redrive) until every id is a row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(stored_ids(settings, sorted(ids))) >= ids:
            return
        outcome = pipeline.fire_ping(PING)
        assert outcome.delivered, outcome
        time.sleep(1.0)


def test_postgresql_outage_longer_than_the_retry_budget(
    pipeline, settings, postgres_server, report
):
    if postgres_server is None:
        pytest.skip("the database is configured externally; this case stops the local server")
    load = Load(
        pipeline.service_url(INGEST), token=emitter(pipeline), total=600, batch=10, rate=100
    ).start()
    time.sleep(0.5)
    postgres_server.stop()
    try:
        time.sleep(15)  # twice the KafkaSource's retry budget
    finally:
        postgres_server.start()
    load.wait()
    _redrive_until_stored(pipeline, settings, load.acked)
    counts = account(settings, load, "postgresql outage", report)
    assert counts["dlq"] > 0, "the outage should have outlasted the retry budget"
    assert counts["stored"] == counts["acknowledged"] == counts["sent"]


def test_writer_killed_mid_load(pipeline, settings, report):
    load = Load(
        pipeline.service_url(INGEST), token=emitter(pipeline), total=2000, batch=10, rate=400
    ).start()
    time.sleep(1.5)
    pipeline.kill_service(WRITER)
    time.sleep(1.0)
    pipeline.start_service(WRITER)
    load.wait()
    wait_for_rows(settings, load.acked, 60)
    _redrive_until_stored(pipeline, settings, load.acked)
    counts = account(settings, load, "writer SIGKILL", report)
    assert counts["stored"] == counts["sent"]


def test_kafka_broker_restart_mid_load(pipeline, settings, kafka_broker, report):
    if kafka_broker is None:
        pytest.skip("Kafka is configured externally; this case restarts the local broker")
    load = Load(
        pipeline.service_url(INGEST), token=emitter(pipeline), total=1500, batch=10, rate=150
    ).start()
    time.sleep(2.0)
    stopping = time.monotonic()
    kafka_broker.stop()
    stopped = time.monotonic()
    time.sleep(4.0)
    kafka_broker.start()
    report(
        f"broker stop took {stopped - stopping:.1f} s, down for "
        f"{time.monotonic() - stopped:.1f} s including its restart"
    )
    load.wait()
    _redrive_until_stored(pipeline, settings, load.acked)
    counts = account(settings, load, "broker restart", report)
    assert load.answers[503] > 0, "ingest should have answered 503 while the broker was down"
    assert counts["stored"] == counts["sent"]


def test_ingest_sigterm_drains(pipeline, settings, report):
    load = Load(
        pipeline.service_url(INGEST),
        token=emitter(pipeline),
        total=1500,
        batch=10,
        rate=300,
        threads=8,
    ).start()
    time.sleep(1.5)
    pipeline.stop_service(INGEST)  # SIGTERM: finish in-flight requests, flush, exit
    pipeline.start_service(INGEST)
    counts = account(settings, load, "ingest SIGTERM", report)
    assert counts["stored"] == counts["sent"]


def test_redelivery_and_replay_from_zero_add_no_rows(pipeline, settings, pg, report):
    load = Load(
        pipeline.service_url(INGEST), token=emitter(pipeline), total=300, batch=10, rate=300
    ).start()
    account(settings, load, "redelivery (first delivery)", report)
    before = pg.run("SELECT count(*) FROM audit_events")[0][0]

    outcomes = []
    for partition in range(settings.kafka_topic_partitions):
        outcomes += pipeline.redeliver(SOURCE, partition, 0)
    statuses = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    assert statuses.get(201, 0) == 0, f"a redelivered event became a new row: {statuses}"
    assert statuses.get(200, 0) >= len(load.ids)

    summary = replay(settings, from_offset=0)
    after = pg.run("SELECT count(*) FROM audit_events")[0][0]
    report(
        f"redelivered {len(outcomes)} records (answers {statuses}); replay from 0: "
        f"{summary.records} records, {summary.inserted} inserted, {summary.duplicates} "
        f"duplicates; rows {before} -> {after}"
    )
    assert summary.inserted == 0
    assert summary.duplicates >= len(load.ids)
    assert after == before
    assert set(stored_ids(settings, load.ids).values()) == {1}


def _poison_headers(event_id: str, specversion: bytes = b"1.0") -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", specversion),
        ("ce_id", event_id.encode()),
        ("ce_source", b"/openg2p/registry"),
        ("ce_type", b"org.openg2p.registry.beneficiary.viewed"),
        ("ce_time", b"2026-11-28T08:00:00Z"),
        ("content-type", b"application/json"),
    ]


def test_poison_records_are_dead_lettered_and_stay_there(pipeline, settings, report):
    good = audit_event()
    data = json.dumps(good["data"]).encode()
    tag = good["id"]
    poison = {
        f"{tag}-bad-json": (b'{"actor": {"id": "officer-17"}, "action": ', b"1.0"),
        f"{tag}-no-actor": (b'{"action": "view", "outcome": "success"}', b"1.0"),
        f"{tag}-nul": (data.replace(b'"view"', b'"vi\\u0000ew"'), b"1.0"),
        f"{tag}-specversion": (data, b"0.3"),
        f"{tag}-surrogate": (data.replace(b'"view"', b'"vi\\ud800ew"'), b"1.0"),
        f"{tag}-nan": (data.replace(b'"view"', b'"view", "score": NaN'), b"1.0"),
    }
    records = [(None, value, _poison_headers(i, sv)) for i, (value, sv) in poison.items()]
    # The good one as ingest produced it: attested (the poison ones are not even that).
    records.append((None, data, attested_headers(_poison_headers(good["id"]), data)))
    produce(settings.bootstrap_servers, settings.kafka_events_topic, records)

    assert wait_for_rows(settings, {good["id"]}, 60) == {good["id"]: 1}
    deadline = time.monotonic() + 30
    dead = {}
    while time.monotonic() < deadline and len(dead) < len(poison):
        dead = dlq_records(settings, set(poison), timeout=2)
    # A redrive run leaves permanent failures where they are.
    assert pipeline.fire_ping(PING).delivered
    stored = stored_ids(settings, list(poison))
    report(
        f"poison records: sent={len(poison)}, dlq={len(dead)}, stored={len(stored)}; codes "
        + ", ".join(
            f"{i.removeprefix(tag + '-')}={h[0]['ce_knativeerrorcode']}" for i, h in dead.items()
        )
    )
    assert set(dead) == set(poison)
    for event_id, copies in dead.items():
        h = copies[0]
        assert h["ce_knativeerrorcode"] in {"400", "422"}, (event_id, h)
        assert h["ce_knativeerrordest"] == pipeline.service_url(WRITER)
        assert h.get("ce_knativeerrordata"), f"{event_id} carries no reason"
    assert stored == {}
    assert set(dlq_records(settings, set(poison))) == set(poison)
