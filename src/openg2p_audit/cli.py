"""`openg2p-audit`: the operator's and developer's command line.

Subcommands are grouped by what they act on; each is a thin shell over the
same core code the functions run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

from .settings import load_settings

log = logging.getLogger("openg2p_audit.cli")


def _cmd_topics(args: argparse.Namespace) -> int:
    from .topics import ensure_topics

    for state in ensure_topics(load_settings()):
        what = (
            "created"
            if state.created
            else f"grown from {state.grown_from}"
            if (state.grown_from)
            else "exists"
        )
        print(f"{state.name}: {state.partitions} partitions ({what})")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .contract import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0


def _sample_event() -> dict:
    from datetime import UTC, datetime

    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/openg2p/dev-up",
        "type": "org.openg2p.audit.user.login",
        "subject": "user/dev",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "datacontenttype": "application/json",
        "data": {"actor": {"type": "user", "id": "dev"}, "action": "login", "outcome": "success"},
    }


def _function_service(runner, target: str) -> str | None:
    from .eventing.manifests import KService

    for svc in runner.manifests.of(KService):
        if svc.env_value("FUNCTION_TARGET") == target:
            return svc.name
    return None


def _print_dev_up(runner, live, cli: str) -> None:
    status = runner.status()
    print("\nservices (Knative Service -> local functions-framework):")
    for name, url in status["services"].items():
        print(f"  {name:24s} {url}   log: {runner.services[name].log_path}")
    for name, url in status["brokers"].items():
        print(f"  Broker {name:17s} {url}")
    for name, url in status["sinks"].items():
        print(f"  KafkaSink {name:14s} {url}")
    for name, src in status["kafkasources"].items():
        print(f"  KafkaSource {name:12s} {','.join(src['topics'])} -> {src['destination']}")
    for name, ping in status["pingsources"].items():
        print(f"  PingSource {name:13s} '{ping['schedule']}', next {ping['next']}")
        print(f"      fire now: curl -X POST {ping['fire']}")
    print(f"  runner status: {status['url']}/status")
    print(f"Kafka {live.kafka_bootstrap_servers}   PostgreSQL {live.database_dsn}")
    ingest = _function_service(runner, "ingest")
    if ingest:
        body = json.dumps(_sample_event(), separators=(",", ":"))
        print("\nsend one audit event (structured mode) to ingest:")
        print(f"  curl -i {runner.service_url(ingest)}/ \\")
        print("    -H 'Content-Type: application/cloudevents+json' \\")
        print(f"    -d '{body}'")
    print("\nsee it arrive: the runner logs a line when the writer answers 2xx, and")
    print(f"  DATABASE_URL='{runner._database_url()}' {cli} query")
    print("\nready. Ctrl-C stops everything.", flush=True)


def _this_command() -> str:
    """How to run this CLI again from here: the venv's script is rarely on PATH."""
    script = Path(sys.argv[0])
    if script.name == "openg2p-audit" and script.exists():
        path = os.path.relpath(script.absolute())
        return path if os.sep in path else f".{os.sep}{path}"
    return "openg2p-audit"


def _as_the_manifests_say(settings, manifest_dir: Path):
    """The settings `dev up` provisions for: the manifests' values win over the environment.

    Each contradiction is said in one line, so `KAFKA_EVENTS_TOPIC=x ./dev up`
    cannot look as if it produced to `x` while the KafkaSource reads another topic.
    """
    from .eventing.manifests import load
    from .eventing.services import environment_conflicts, manifest_settings
    from .settings import Settings

    manifests = load(manifest_dir)
    names = [name.upper() for name in Settings.model_fields]
    for line in environment_conflicts(manifests, os.environ, names):
        log.warning("%s", line)
    chosen = {
        name.lower(): next(iter(values))
        for name, values in manifest_settings(manifests, names).items()
        if len(values) == 1
    }
    return load_settings(**chosen) if chosen else settings


def _cmd_dev_up(args: argparse.Namespace) -> int:
    from .devservices import local_services
    from .eventing.runner import REPO_ROOT, Runner
    from .topics import ensure_topics

    settings = load_settings()
    stop = threading.Event()
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt, so Ctrl-C (or a supervisor's SIGINT) would be lost.
    serving = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: abandon the start, clean up

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="openg2p-audit-"))
    )
    manifests = Path(args.manifests) if args.manifests else REPO_ROOT / "knative" / "base"
    settings = _as_the_manifests_say(settings, manifests)
    print(f"starting local services in {workdir} ...", flush=True)
    try:
        with local_services(settings, workdir) as (live, _kafka, _pg):
            ensure_topics(live)
            runner = Runner(
                manifests, live, workdir=workdir / "runner", port=args.port,
                commit_interval=args.commit_interval, max_in_flight=args.max_in_flight,
            )  # fmt: skip
            try:
                runner.start()
                runner.wait_ready()
                _print_dev_up(runner, live, _this_command())
                serving.set()
                while not stop.wait(0.5):
                    pass
            finally:
                print("stopping ...", flush=True)
                runner.stop()
    except KeyboardInterrupt:
        pass
    print("stopped.", flush=True)
    return 0


def _timestamp(text: str) -> datetime:
    """ISO 8601 with a zone offset; a bare date or time is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _cmd_replay(args: argparse.Namespace) -> int:
    from .observability import configure_logging
    from .replay import ReplayError, describe, replay

    configure_logging()
    settings = load_settings()
    try:
        summary = replay(
            settings, from_offset=args.from_offset, from_time=args.from_time,
            to_offset=args.to_offset, to_time=args.to_time, partitions=args.partition,
            batch_size=args.batch_size, workers=args.workers,
        )  # fmt: skip
    except ReplayError as exc:
        print(json.dumps({"error": str(exc), "resume_from": exc.resume}), file=sys.stderr)
        return 1
    print(json.dumps(describe(summary)))
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    """Recent audit rows, newest first, as JSON lines: no psql needed."""
    import pg8000.native

    settings = load_settings()
    conn = pg8000.native.Connection(**settings.pg_connect_kwargs)
    try:
        columns = [
            r[0]
            for r in conn.run(
                "SELECT column_name FROM information_schema.columns WHERE table_name = :t "
                "ORDER BY ordinal_position",
                t=args.table,
            )
        ]
        if not columns:
            print(
                f"no table {args.table} in {settings.database_dsn} yet "
                "(the writer creates it with its first event)",
                file=sys.stderr,
            )
            return 1
        table = pg8000.native.identifier(args.table)
        order = next((c for c in _ORDER_COLUMNS if c in columns), None)
        sql = f"SELECT * FROM {table}"
        params: dict = {}
        if args.id:
            sql += " WHERE id = :id"
            params["id"] = args.id
        if order:
            sql += f" ORDER BY {pg8000.native.identifier(order)} DESC"
        sql += " LIMIT :n"
        rows = conn.run(sql, n=args.limit, **params)
        names = [c["name"] for c in conn.columns]
        for row in rows:
            print(json.dumps(dict(zip(names, row, strict=True)), default=str, ensure_ascii=False))
        print(f"({len(rows)} row(s) from {settings.database_dsn})", file=sys.stderr)
    finally:
        conn.close()
    return 0


_ORDER_COLUMNS = ("recorded_at", "ingested_at", "received_at", "occurred_at", "time", "created_at")


def _cmd_upkeep(args: argparse.Namespace) -> int:
    from .maintenance import run_maintenance
    from .observability import configure_logging

    configure_logging()
    if args.now is not None and not args.dry_run:
        print(json.dumps({"error": "--now is only allowed with --dry-run"}), file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        summary = run_maintenance(
            settings, now=args.now, dry_run=args.dry_run, redrive_dlq=not args.no_redrive
        )
    except Exception as exc:  # noqa: BLE001 - one line for the operator, exit status 1
        print(json.dumps({"status": "error", "error": f"maintenance failed: {exc}"}))
        return 1
    print(json.dumps(summary.as_dict()))
    return 1 if summary.status == "error" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openg2p-audit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run the pipeline on this machine")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_sub.add_parser("up", help="start Kafka, PostgreSQL and the functions")
    up.add_argument("--workdir", help="folder for local service data (default: a new temp dir)")
    up.add_argument("--manifests", help="kustomization folder to run (default: knative/base)")
    up.add_argument("--port", type=int, default=0, help="runner port (Broker/KafkaSink ingress)")
    up.add_argument(
        "--commit-interval", type=float, default=5.0, help="seconds between offset commits"
    )
    up.add_argument(
        "--max-in-flight", type=int, default=50, metavar="N",
        help="deliveries in flight per unordered KafkaSource (Knative's max.poll.records, 50)",
    )  # fmt: skip
    up.set_defaults(func=_cmd_dev_up)

    query = sub.add_parser("query", help="print recent audit rows (DATABASE_URL / DB_*)")
    query.add_argument("--limit", type=int, default=10)
    query.add_argument("--id", help="only the row(s) with this event id")
    query.add_argument("--table", default="audit_events")
    query.set_defaults(func=_cmd_query)

    topics = sub.add_parser("topics", help="create or grow the events and DLQ topics")
    topics.set_defaults(func=_cmd_topics)

    schema = sub.add_parser(
        "schema", help="print the event contract's JSON Schema (docs/audit-event.schema.json)"
    )
    schema.set_defaults(func=_cmd_schema)

    rp = sub.add_parser(
        "replay",
        help="store a range of the events topic directly (replay, backfill)",
        description="Read a range of the events topic in large batches and store it with the "
        "writer's idempotent insert: records already stored are skipped. Reads without a "
        "consumer group, so the KafkaSource's position is untouched. Prints a JSON summary.",
    )
    start = rp.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, metavar="N", help="first offset, per partition")
    start.add_argument("--from-time", type=_timestamp, metavar="ISO", help="first record time")
    end = rp.add_mutually_exclusive_group()
    end.add_argument("--to-offset", type=int, metavar="N", help="stop before this offset")
    end.add_argument("--to-time", type=_timestamp, metavar="ISO", help="stop before this time")
    rp.add_argument("--partition", type=int, action="append", help="only this partition (repeat)")
    rp.add_argument("--batch-size", type=int, help="records per transaction (REPLAY_BATCH_SIZE)")
    rp.add_argument(
        "--workers", type=int, default=1, help="processes sharing the partitions (default 1)"
    )
    rp.set_defaults(func=_cmd_replay)

    up_keep = sub.add_parser(
        "upkeep",
        help="run the hourly maintenance now (partitions ahead, retention, DLQ redrive)",
        description="Create the monthly partitions ahead, drop those wholly older than the "
        "retention, and store the dead-letter topic's transient failures, as the hourly "
        "maintenance function does. Prints a JSON summary.",
    )
    up_keep.add_argument(
        "--dry-run",
        action="store_true",
        help="only report what would be created, dropped and redriven; change nothing",
    )
    up_keep.add_argument(
        "--no-redrive", action="store_true", help="leave the dead-letter topic alone"
    )
    up_keep.add_argument(
        "--now",
        type=_timestamp,
        metavar="ISO",
        help="with --dry-run: plan as if it were this time (default: the UTC clock)",
    )
    up_keep.set_defaults(func=_cmd_upkeep)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kafka-python logs every refused connection while a broker starts; the runner and the
    # functions report what matters themselves.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    args = build_parser().parse_args(argv)
    from .eventing.manifests import ManifestError
    from .eventing.services import ServiceError

    try:
        return args.func(args)
    except (ManifestError, ServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
