"""The plans of the investigators' common queries: their indexes, and only their partitions.

Twelve monthly partitions are seeded with the benchmark's generator
(`bench/query_bench.py`, COPY, realistic cardinalities) and analysed; then
`EXPLAIN` is run, as the read-only role and with bound parameters exactly as
the service sends them, on the SQL `openg2p_audit.query` builds. A timeline
over the widest allowed range must touch only the partitions of that range
and reach each through its index, never a sequential scan of a month.
"""

from __future__ import annotations

import importlib.util
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pg8000.native
import pytest

from openg2p_audit import query, store
from query_support import reader_role

ROWS = 60_000
MONTHS = 12


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "query_bench.py"
    spec = importlib.util.spec_from_file_location("query_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeded(settings):
    bench = _bench()
    end = datetime.now(UTC)
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        picks = bench.seed(conn, ROWS, MONTHS, end)
    finally:
        conn.close()
    reader = reader_role(settings, f"audit_explain_{uuid.uuid4().hex[:8]}")
    return reader, picks, end


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(reader, filters: dict[str, str], end: datetime, days: int):
    params = [
        ("from", (end - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("to", end.strftime("%Y-%m-%dT%H:%M:%SZ")),
        *filters.items(),
    ]
    request = query.parse_page(params, reader, query.CursorCodec(None))
    sql, bound = query.page_sql(request.filters, request.limit + 1, request.after)
    conn = query.connect(reader)
    try:
        [[doc]] = conn.run(f"EXPLAIN (FORMAT JSON) {sql}", **bound)
    finally:
        conn.close()
    plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
    scans = [n for n in _nodes(plan) if "Relation Name" in n]
    return request.filters, scans


def _months_of(filters) -> set[str]:
    month = store.month_of(filters.from_)
    names = set()
    while datetime(month.year, month.month, 1, tzinfo=UTC) < filters.to:
        names.add(store.partition_name(month))
        month = store.add_months(month, 1)
    return names


CASES = {
    "actor": (lambda picks, rng: {"actor_id": rng.choice(picks["actors"][:50])}, "actor_id"),
    "resource": (
        lambda picks, rng: {
            "resource_type": "beneficiary",
            "resource_id": f"BEN-{rng.randrange(200_000):06d}",
        },
        "resource_type",
    ),
    "trace": (lambda picks, rng: {"trace_id": rng.choice(picks["traces"])}, "trace_id"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("days", [7, 93])
def test_timeline_uses_its_index_and_only_its_partitions(seeded, case, days):
    reader, picks, end = seeded
    make, column = CASES[case]
    filters, scans = _explain(reader, make(picks, random.Random(days)), end, days)
    assert scans, "no relation scanned"
    scanned = {n["Relation Name"] for n in scans}
    assert scanned <= _months_of(filters), scanned  # pruned: no month outside the range
    assert len(scanned) < MONTHS
    for node in scans:
        assert node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), node
    index_names = {n["Index Name"] for n in _nodes({"Plans": scans}) if "Index Name" in n}
    assert index_names and all(column in name for name in index_names), index_names


def test_a_page_deep_in_the_range_still_reads_through_the_index(seeded):
    """The keyset condition is an index condition, not a filter over everything before it."""
    reader, picks, end = seeded
    params = [
        ("from", (end - timedelta(days=93)).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("to", end.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("actor_id", picks["actors"][0]),
    ]
    request = query.parse_page(params, reader, query.CursorCodec(None))
    after = (end - timedelta(days=40), "m", "/openg2p/registry")  # the key has source too
    sql, bound = query.page_sql(request.filters, 101, after)
    conn = query.connect(reader)
    try:
        [[doc]] = conn.run(f"EXPLAIN (FORMAT JSON) {sql}", **bound)
    finally:
        conn.close()
    plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
    scans = [n for n in _nodes(plan) if "Relation Name" in n]
    conditions = " ".join(n.get("Index Cond", "") + n.get("Recheck Cond", "") for n in scans)
    assert "after_at" not in conditions  # bound, not a literal name
    assert "occurred_at <=" in conditions or "occurred_at <" in conditions, scans
    # Months after the cursor's time are pruned too.
    assert {n["Relation Name"] for n in scans} <= _months_of(request.filters)
