"""`openg2p-audit`: the operator's and developer's command line.

Subcommands are grouped by what they act on; each is a thin shell over the
same core code the functions run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from datetime import UTC, datetime, timedelta
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


# The emitter dev up's printed token speaks for (a caller of knative/base's source policy).
DEV_EMITTER = "openg2p-registry"


def _sample_event() -> dict:
    from datetime import UTC, datetime

    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/openg2p/registry",
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
        env = runner.services[ingest].env
        tokens = env.get("INGEST_AUTH", "required") == "required"
        if tokens:
            # The registry's client as Keycloak would name it; the ConfigMap's source policy
            # lets it emit under /openg2p/registry. Only this dev up trusts the issuer.
            token = runner.issuer.mint(
                f"service-account-{DEV_EMITTER}", (), lifetime=12 * 3600, azp=DEV_EMITTER
            )
            print(
                f"\nsend one audit event (structured mode) to ingest as the emitter {DEV_EMITTER}"
            )
            print(f"(token from the local issuer {runner.issuer.url}; more with")
            print(f"`{cli} token --emitter {DEV_EMITTER}`):")
            print(f"  TOKEN={token}")
        else:
            print("\nsend one audit event (structured mode) to ingest (INGEST_AUTH=disabled):")
        print(f"  curl -i {runner.service_url(ingest)}/ \\")
        if tokens:
            print('    -H "Authorization: Bearer $TOKEN" \\')
        print("    -H 'Content-Type: application/cloudevents+json' \\")
        print(f"    -d '{body}'")
    print("\nsee it arrive: the runner logs a line when the writer answers 2xx, and")
    print(f"  DATABASE_URL='{runner._database_url()}' {cli} query")
    reader = _function_service(runner, "query")
    if reader and runner.issuer is not None:
        url = runner.service_url(reader)
        now = datetime.now(UTC)
        since = (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
        until = (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"\nread it as an investigator ({reader}; tokens from the local issuer")
        print(f"{runner.issuer.url}, which only this dev up trusts):")
        print(f"  TOKEN=$({cli} token --role audit.read --role audit.export)")
        print('  curl -H "Authorization: Bearer $TOKEN" \\')
        print(f"    '{url}/v1/audit/events?from={since}&to={until}'")
        print(f"  timeline page: {url}/ui   (paste the token once)")
    verifier = _dev_verifier_key(runner)
    if verifier is not None:
        print("\ntamper evidence: maintenance seals each closed hour with this dev up's own key")
        print("(it ran once at start; each PingSource fire seals what has closed since). The")
        print("verifier key, and the check of the trail against the signed digests:")
        print(f"  INTEGRITY_VERIFIER_KEYS={verifier}")
        print(f"  DATABASE_URL='{runner._database_url()}' INTEGRITY_VERIFIER_KEYS='{verifier}' "
              f"{cli} verify --database")  # fmt: skip
    print("\nready. Ctrl-C stops everything.", flush=True)


def _dev_verifier_key(runner):
    """The verifier key of the sealing key the runner gave the maintenance Service, if any."""
    from .integrity import Signer

    for name, proc in runner.services.items():
        path = proc.env.get("INTEGRITY_SIGNING_KEY_FILE")
        if proc.env.get("FUNCTION_TARGET") == "maintain" and path and Path(path).is_file():
            try:
                origin = proc.env.get("INTEGRITY_ORIGIN") or "openg2p-audit"
                return Signer.from_file(origin, path).verifier
            except ValueError as exc:
                log.warning("Service/%s: no verifier key to print: %s", name, exc)
    return None


def _first_maintenance(runner) -> None:
    """Fire each PingSource once, as an hour of waiting would: the partitions ahead, and the
    first signed digest, so that the printed `verify --database` holds from the start."""
    for name in runner.pings:
        outcome = runner.fire_ping(name)
        status = outcome.status if outcome.status is not None else outcome.error
        print(f"PingSource {name} fired once at start: answered {status}", flush=True)


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


def _query_role(live, manifest_dir: Path) -> dict[str, dict[str, str]]:
    """Give the query service its read-only role, as a deployment does (README).

    The runner points every Service at the local database as its owner; the
    query Service's manifest names a role of its own (DB_USER, DB_PASSWORD), so
    that role is created here with SELECT on the table only and the Service
    connects as it. Returns the runner's per-Service env.
    """
    from urllib.parse import quote

    from . import query, store
    from .eventing.manifests import KService, load
    from .eventing.services import container_env

    manifests = load(manifest_dir)
    wanted: dict[str, dict[str, str]] = {}
    for svc in manifests.of(KService):
        if svc.env_value("FUNCTION_TARGET") != "query":
            continue
        env = container_env(svc, manifests, lambda _secret, _key: None)  # only its role
        role, password = env.get("DB_USER"), env.get("DB_PASSWORD")
        if not role or role == live.pg_connect_kwargs["user"]:
            continue
        try:
            conn = store.connect(live, application_name="openg2p-audit-dev-up")
            try:
                store.ensure_schema(conn, live.partitions_ahead_months)
                query.ensure_reader_role(conn, role, password)
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - dev up goes on with the owner's role
            log.warning("%s: cannot create its read-only role %s (%s); it reads as the "
                        "table's owner", svc.key, role, exc)  # fmt: skip
            continue
        kw = live.pg_connect_kwargs
        auth = quote(role, safe="") + (f":{quote(password, safe='')}" if password else "")
        url = f"postgresql://{auth}@{kw['host']}:{kw['port']}/{kw['database']}"
        wanted[svc.name] = {"DATABASE_URL": url}
    return wanted


def _cmd_dev_up(args: argparse.Namespace) -> int:
    from .devservices import local_services
    from .devservices.issuer import LocalIssuer
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
            issuer = LocalIssuer(audience=live.auth_audience)
            runner = Runner(
                manifests, live, workdir=workdir / "runner", port=args.port,
                commit_interval=args.commit_interval, max_poll_records=args.max_poll_records,
                issuer=issuer, service_env=_query_role(live, manifests),
            )  # fmt: skip
            try:
                runner.start()
                runner.wait_ready()
                issuer.save_state()
                _first_maintenance(runner)
                _print_dev_up(runner, live, _this_command())
                serving.set()
                while not stop.wait(0.5):
                    pass
            finally:
                print("stopping ...", flush=True)
                LocalIssuer.forget_state()
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


# `openg2p-audit query` option -> the query service's parameter of the same meaning.
_QUERY_OPTIONS = {
    "from_": "from", "to": "to", "actor_id": "actor_id", "resource_type": "resource_type",
    "resource_id": "resource_id", "type": "type", "outcome": "outcome", "source": "source",
    "subject": "subject", "trace_id": "trace_id", "tenant": "tenant", "cursor": "cursor",
}  # fmt: skip


def _query_items(args: argparse.Namespace, settings) -> list[tuple[str, str]]:
    """The command line as the service's request parameters, with the CLI's default range."""
    to = args.to or (
        datetime.now(UTC) + timedelta(seconds=settings.ingest_max_clock_skew_seconds)
    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    items = []
    for option, name in _QUERY_OPTIONS.items():
        value = getattr(args, option)
        if name == "to":
            value = to
        elif name == "from" and value is None:
            from .query import parse_time

            try:
                start = parse_time("to", to) - timedelta(days=settings.query_max_range_days)
            except ValueError:
                start = datetime.now(UTC)  # `to` itself is reported as the bad one
            value = start.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if value is not None:
            items.append((name, value))
    items.append(("limit", str(args.limit or (1000 if args.all else 10))))
    return items


def _cmd_query(args: argparse.Namespace) -> int:
    """Audit rows, newest first, as JSON lines or CSV: the query service's reads, for operators.

    Same parameters, same validation and the same SQL as `audit-query`
    (`openg2p_audit.query`), straight from the database on a read-only session.
    """
    from . import query

    settings = load_settings()
    codec = query.CursorCodec(settings.query_cursor_secret)
    conn = query.connect(settings, application_name="openg2p-audit-cli")
    try:
        if not conn.run("SELECT to_regclass(:t) IS NOT NULL", t=query.TABLE)[0][0]:
            print(
                f"no table {query.TABLE} in {settings.database_dsn} yet "
                "(the writer creates it with its first event)",
                file=sys.stderr,
            )
            return 1
        if args.id:
            try:
                event_id = query.parse_event_id(args.id)
            except query.BadParameter as exc:
                print(f"error: --id: {exc.message}", file=sys.stderr)
                return 2
            pages = iter([query.Page(query.fetch_event(conn, event_id), None)])
        else:
            try:
                request = query.parse_page(_query_items(args, settings), settings, codec)
            except query.BadParameter as exc:
                option = "--" + exc.parameter.replace("_", "-")
                print(f"error: {option}: {exc.message}", file=sys.stderr)
                return 2
            pages = _pages(conn, request, codec, follow=args.all)
        # CSV cells as the service's export writes them, formulas neutralised alike.
        csv = args.format == "csv"
        if csv:
            print(query.csv_line(query.CSV_COLUMNS))
        count, cursor = 0, None
        for page in pages:
            for event in page.events:
                if not csv:
                    print(json.dumps(event, ensure_ascii=False))
                else:
                    details = event["details"]
                    event = {**event, "details": None if details is None else json.dumps(details)}
                    print(query.csv_line([event[c] for c in query.CSV_COLUMNS]))
            count += len(page.events)
            cursor = page.next_cursor
        print(f"({count} row(s) from {settings.database_dsn})", file=sys.stderr)
        if cursor and not args.all:
            print(f"more: --cursor {cursor}   (or --all)", file=sys.stderr)
    finally:
        conn.close()
    return 0


def _pages(conn, request, codec, follow: bool):
    from dataclasses import replace

    from . import query

    while True:
        page = query.fetch_page(conn, request, codec)
        yield page
        if not follow or page.next_cursor is None:
            return
        request = replace(request, after=codec.decode(page.next_cursor, request.filters))


def _cmd_token(args: argparse.Namespace) -> int:
    """A bearer token from `dev up`'s local issuer, which nothing but that dev up trusts."""
    from .devservices.issuer import LocalIssuer

    try:
        issuer = LocalIssuer.from_state()
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(
            f"error: no local issuer ({exc}); start `./dev up` first. Tokens for a deployment "
            "come from its OIDC issuer (Keycloak), never from this command.",
            file=sys.stderr,
        )
        return 2
    if args.emitter:
        # What Keycloak's client-credentials grant gives a service: its client id in `azp`.
        print(issuer.mint(f"service-account-{args.emitter}", (), lifetime=args.minutes * 60,
                          azp=args.emitter))  # fmt: skip
        return 0
    roles = tuple(args.role or ["audit.read"])
    print(issuer.mint(args.subject, roles, lifetime=args.minutes * 60))
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


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    """The dead letters left for an operator, and those the redrive stores, as JSON lines."""
    from .maintenance import dead_letters

    settings = load_settings()
    for topic_is_broker in [True] if args.broker else [False, True]:
        for entry in dead_letters(settings, broker=topic_is_broker, limit=args.limit):
            if args.all or entry["disposition"] == "left":
                print(json.dumps(entry, ensure_ascii=False))
    return 0


def _cmd_seal(args: argparse.Namespace) -> int:
    """Seal by hand, under the maintenance run's lock, so it never races the hourly run."""
    from . import maintenance, sealing, store

    settings = load_settings()
    try:
        sealing.signer(settings)
    except sealing.SealingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    conn = store.connect(settings, application_name="openg2p-audit-seal")
    try:
        if not maintenance._try_lock(conn, maintenance.LOCK_WAIT_SECONDS):
            print("error: a maintenance run holds the lock; try again shortly", file=sys.stderr)
            return 1
        try:
            summary = sealing.seal(settings, conn, through=args.through, grace=args.grace)
        finally:
            maintenance._unlock(conn)
    finally:
        conn.close()
    print(summary.line())
    if summary.publish_error:
        print(f"warning: digests not published: {summary.publish_error}", file=sys.stderr)
    return 1 if summary.missing else 0


def _cmd_public_key(args: argparse.Namespace) -> int:
    """The verifier key(s): INTEGRITY_VERIFIER_KEYS, else the sealing key's public half."""
    from . import sealing

    settings = load_settings()
    keys = settings.verifier_keys
    if not keys:
        if settings.integrity_signing_key_file is None:
            print("error: set INTEGRITY_VERIFIER_KEYS (the deployment's published verifier key) "
                  "or, where the digests are sealed, INTEGRITY_SIGNING_KEY_FILE",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            keys = [sealing.signer(settings).verifier]
        except sealing.SealingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif settings.integrity_signing_key_file is not None:
        try:
            own = sealing.signer(settings).verifier
        except sealing.SealingError:
            own = None
        if own is not None and own not in keys:
            print(f"warning: the sealing key's verifier key {own} is not among "
                  "INTEGRITY_VERIFIER_KEYS", file=sys.stderr)  # fmt: skip
    for key in keys:
        print(key)
    return 0


def _out(path: str | None):
    return open(path, "w", encoding="utf-8") if path else contextlib.nullcontext(sys.stdout)


def _cmd_digests(args: argparse.Namespace) -> int:
    from . import sealing, store

    settings = load_settings()
    conn = store.connect(settings, application_name="openg2p-audit-cli")
    try:
        sealing.ensure_schema(conn)
        lines = sealing.digest_lines(sealing.digests(conn, args.from_, args.to))
    finally:
        conn.close()
    with _out(args.output) as out:
        for line in lines:
            out.write(line + "\n")
    print(f"({len(lines)} digest(s))", file=sys.stderr)
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    from . import sealing, store

    settings = load_settings()
    conn = store.connect(settings, application_name="openg2p-audit-cli")
    count = 0
    try:
        with _out(args.output) as out:
            for line in sealing.event_lines(conn, args.from_, args.to):
                out.write(line + "\n")
                count += 1
    finally:
        conn.close()
    print(f"({count} row(s))", file=sys.stderr)
    return 0


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 with one line, 1 naming the first bad hour (and row), 2 for unusable input."""
    from . import integrity

    try:
        keys = _keys(args)
        if args.bundle:
            from . import evidence

            result = evidence.verify_bundle(args.bundle, keys)
            print(result)
            return 0
        if args.database:
            from . import sealing, store

            settings = load_settings()
            conn = store.connect(settings, application_name="openg2p-audit-verify")
            try:
                sealing.ensure_schema(conn)
                notes = sealing.digests(conn)
                result = integrity.verify(sealing.event_lines(conn), notes, keys)
            finally:
                conn.close()
        else:
            if not (args.events and args.digests):
                print("error: give --events and --digests (or --database, or --bundle)",
                      file=sys.stderr)  # fmt: skip
                return 2
            notes = integrity.read_digest_lines(_read_lines(args.digests))
            result = integrity.verify(_read_lines(args.events), notes, keys)
    except integrity.IntegrityError as exc:
        print(f"FAILED: {exc}")
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _cmd_evidence(args: argparse.Namespace) -> int:
    from . import evidence, query

    settings = load_settings()
    items = [("from", args.from_), ("to", args.to)]
    for option in ("actor_id", "resource_type", "resource_id", "trace_id"):
        if getattr(args, option) is not None:
            items.append((option, getattr(args, option)))
    if len(items) == 2:
        print("error: select with --actor-id, --resource-type/--resource-id or --trace-id",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        keys = _keys(args)
        filters = query.parse_filters(dict(items), settings)
        # An investigator's tool: a read-only session, and the verifier key only.
        conn = query.connect(settings, application_name="openg2p-audit-evidence")
        try:
            count = evidence.build(settings, conn, filters, args.output, keys)
        finally:
            conn.close()
    except query.BadParameter as exc:
        print(f"error: --{exc.parameter.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    except evidence.EvidenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {count} event(s) with their proofs")
    return 0


def _keys(args: argparse.Namespace) -> list:
    """The verifier keys to trust: --public-key FILE, else INTEGRITY_VERIFIER_KEYS.

    Never a key that comes with what is checked: a bundle's public-key.txt is
    made by whoever made the bundle. Only `verify --database`, run where the
    digests are sealed, may fall back to the sealing key's public half.
    ValueError (exit 2) when there is no key to trust.
    """
    from . import integrity, sealing

    if args.public_key:
        return integrity.read_verifier_keys("\n".join(_read_lines(args.public_key)))
    settings = load_settings()
    if settings.verifier_keys:
        return settings.verifier_keys
    if getattr(args, "database", False) and settings.integrity_signing_key_file:
        try:
            return [sealing.signer(settings).verifier]
        except sealing.SealingError as exc:
            raise ValueError(f"{exc}; or give --public-key FILE") from None
    what = "a bundle's own public-key.txt proves nothing, " if getattr(args, "bundle", None) else ""
    raise ValueError(
        f"no trusted verifier key: {what}give --public-key FILE or set INTEGRITY_VERIFIER_KEYS "
        "to the key the deployment publishes (`openg2p-audit integrity public-key`)"
    )


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
        "--max-poll-records", type=int, default=50, metavar="N",
        help="an unordered KafkaSource polls N more records whenever fewer than N are in "
        "flight, so up to 2N-1 are (Knative's max.poll.records, 50)",
    )  # fmt: skip
    up.set_defaults(func=_cmd_dev_up)

    query = sub.add_parser(
        "query",
        help="print audit rows, newest first (DATABASE_URL / DB_*)",
        description="The query service's filters, straight from the database (read-only). "
        "Without --from/--to: the last QUERY_MAX_RANGE_DAYS days.",
    )
    query.add_argument("--from", dest="from_", metavar="RFC3339", help="first time (inclusive)")
    query.add_argument("--to", metavar="RFC3339", help="end time (exclusive; default now)")
    for name in ("actor-id", "resource-type", "resource-id", "source", "subject", "trace-id",
                 "tenant"):  # fmt: skip
        query.add_argument(f"--{name}")
    query.add_argument("--type", help="exact type, or a prefix ending in *")
    query.add_argument("--outcome", choices=("success", "failure", "denied"))
    query.add_argument(
        "--limit", type=int, help="rows per page, 1-1000 (default 10; 1000 with --all)"
    )
    query.add_argument("--cursor", help="continue after a page (printed on stderr)")
    query.add_argument("--all", action="store_true", help="follow the cursor to the last page")
    query.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    query.add_argument("--id", help="only the row(s) with this event id")
    query.set_defaults(func=_cmd_query)

    token = sub.add_parser(
        "token",
        help="mint a bearer token from dev up's local issuer (development only)",
        description="Print a token signed by the issuer that `./dev up` runs; only that "
        "dev up's services trust it.",
    )
    token.add_argument(
        "--role", action="append", help="a role to grant (repeat; default audit.read)"
    )
    token.add_argument("--subject", default="dev-investigator", help="the token's subject")
    token.add_argument("--minutes", type=int, default=60, help="lifetime (default 60)")
    token.add_argument(
        "--emitter", metavar="CLIENT",
        help="a service's token for ingest instead (azp=CLIENT, as the source policy names it)",
    )  # fmt: skip
    token.set_defaults(func=_cmd_token)

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
        "retention, seal the closed hours, and store the dead letters ingest attested, as the "
        "hourly maintenance function does. Prints a JSON summary.",
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

    dl = sub.add_parser(
        "dead-letters",
        help="list the dead letters the redrive leaves for an operator",
        description="Read the dead-letter topics (KAFKA_DLQ_TOPIC, and the Trigger's "
        "KAFKA_BROKER_DLQ_TOPIC) from the start, without a consumer group, and print one JSON "
        "line per record the hourly redrive does not store, with the reason: no attestation "
        "(not produced by ingest), a Broker event that never passed ingest, a contract "
        "violation. Stores nothing.",
    )
    dl.add_argument("--broker", action="store_true", help="the Trigger's dead letters only")
    dl.add_argument("--all", action="store_true", help="also those the redrive stores")
    dl.add_argument("--limit", type=int, default=None, help="at most N records per topic")
    dl.set_defaults(func=_cmd_dead_letters)

    seal = sub.add_parser(
        "seal",
        help="seal the closed hours now (signed, chained hourly digests)",
        description="Seal every closed hour of ingested_at older than the grace period, as "
        "the hourly maintenance does, under its lock; write supplements for late rows and "
        "publish the digests. Prints the hours sealed.",
    )
    seal.add_argument("--through", type=_timestamp, metavar="ISO",
                      help="seal no hour ending after this time")  # fmt: skip
    seal.add_argument("--grace", type=float, metavar="SECONDS",
                      help="how long an hour must be closed (INTEGRITY_GRACE_SECONDS)")  # fmt: skip
    seal.set_defaults(func=_cmd_seal)

    integ = sub.add_parser("integrity", help="the signing key's public half, digests, rows")
    integ_sub = integ.add_subparsers(dest="integrity_command", required=True)
    pk = integ_sub.add_parser(
        "public-key",
        help="print the verifier key(s) (C2SP signed-note): INTEGRITY_VERIFIER_KEYS, else the "
        "sealing key's public half",
    )
    pk.set_defaults(func=_cmd_public_key)
    for name, func, what in (
        ("digests", _cmd_digests, "digests whose hour lies in [--from, --to), as JSON lines"),
        ("events", _cmd_events, "rows ingested in [--from, --to), in the export's JSON lines"),
    ):
        p = integ_sub.add_parser(name, help=what, description=what)
        p.add_argument("--from", dest="from_", type=_timestamp, metavar="ISO")
        p.add_argument("--to", type=_timestamp, metavar="ISO")
        p.add_argument("-o", "--output", help="write here instead of standard output")
        p.set_defaults(func=func)

    ev = sub.add_parser(
        "evidence",
        help="write an evidence bundle: selected events, their proofs, digests, public key",
        description="The events of one actor, resource or trace in [--from, --to), each with "
        "its RFC 6962 inclusion proof in a signed hourly digest, as a zip that "
        "`verify --bundle` checks offline.",
    )
    ev.add_argument("--actor-id")
    ev.add_argument("--resource-type")
    ev.add_argument("--resource-id")
    ev.add_argument("--trace-id")
    ev.add_argument("--from", dest="from_", required=True, metavar="RFC3339")
    ev.add_argument("--to", required=True, metavar="RFC3339")
    ev.add_argument("-o", "--output", required=True, metavar="ZIP")
    ev.add_argument(
        "--public-key", metavar="FILE",
        help="verifier key(s), one per line (default: INTEGRITY_VERIFIER_KEYS)",
    )  # fmt: skip
    ev.set_defaults(func=_cmd_evidence)

    ver = sub.add_parser(
        "verify",
        help="check rows against the signed digests (offline, or --database)",
        description="Check the digests' signatures and chain, and recompute every sealed "
        "hour's tree from the rows. Exit 0 with a summary; 1 naming the first bad hour "
        "(and row); 2 for unusable input.",
    )
    ver.add_argument("--events", metavar="FILE", help="rows, JSON lines (the export format)")
    ver.add_argument("--digests", metavar="FILE", help="digests, JSON lines")
    ver.add_argument(
        "--public-key", metavar="FILE",
        help="trusted verifier key(s), one per line (default: INTEGRITY_VERIFIER_KEYS)",
    )  # fmt: skip
    ver.add_argument("--database", action="store_true",
                     help="read rows and digests from the database instead")  # fmt: skip
    ver.add_argument("--bundle", metavar="ZIP", help="an evidence bundle")
    ver.set_defaults(func=_cmd_verify)
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
