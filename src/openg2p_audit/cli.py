"""`openg2p-audit`: the operator's and developer's command line.

Subcommands are grouped by what they act on; each is a thin shell over the
same core code the functions run.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
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


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .contract import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
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

    schema = sub.add_parser(
        "schema", help="print the event contract's JSON Schema (docs/audit-event.schema.json)"
    )
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
