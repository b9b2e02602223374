"""`openg2p-audit`: the operator's and developer's command line.

Subcommands are grouped by what they act on; each is a thin shell over the
same core code the functions run.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

from .settings import load_settings


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


def _cmd_dev_up(args: argparse.Namespace) -> int:
    from .devservices import local_services
    from .topics import ensure_topics

    settings = load_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="openg2p-audit-"))
    )
    print(f"starting local services in {workdir} ...", flush=True)
    with local_services(settings, workdir) as (live, _kafka, _pg):
        ensure_topics(live)
        print(f"Kafka:      {live.kafka_bootstrap_servers}")
        print(f"PostgreSQL: {live.database_dsn}")
        print(f"Topics:     {live.kafka_events_topic}, {live.kafka_dlq_topic}")
        print("ready. Ctrl-C stops everything.", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping ...", flush=True)
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
    up.set_defaults(func=_cmd_dev_up)

    topics = sub.add_parser("topics", help="create or grow the events and DLQ topics")
    topics.set_defaults(func=_cmd_topics)

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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
