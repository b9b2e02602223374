"""The local eventing runner: the `knative/` manifests, run on one machine.

Reads a kustomization, starts every Knative Service as a functions-framework
process, and wires them together exactly as the manifests say: KafkaSources
and Triggers as Kafka consumer groups delivering over HTTP, KafkaSinks and
the Broker ingress as producers behind one local HTTP endpoint, PingSources
on their cron schedules.

The runner's own HTTP endpoint (`Runner.url`) serves:

- `POST /<namespace>/<name>`: the ingress of a Broker or KafkaSink
  (binary or structured CloudEvents; 202 once in Kafka);
- `POST /pingsources/<name>/fire`: send one ping now;
- `POST /kafkasources/<name>/redeliver?partition=P&start=S[&end=E][&topic=T]`;
- `GET /status`: URLs, ports and delivery counters, as JSON;
- `GET /healthz`;
- `GET /issuer/...`: the local token issuer's JWKS. Every Service trusts that
  issuer in place of the cluster's, and a KafkaSource, Trigger or PingSource whose
  sink names an OIDC `audience` delivers with a token minted here for it, as Knative
  Eventing does with its `authentication-oidc` feature on (`oidc=True`, the
  default); dead letters go with a token for the dead-letter sink's audience, and
  the Broker and KafkaSink ingress check tokens and EventPolicies (ingress.py).
  `oidc=False` is the feature off: nothing is checked, and a source whose sink names
  an audience fails every delivery before sending, as Knative's dispatcher does.

Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urljoin, urlsplit

from kafka import KafkaAdminClient

from ..integrity import generate_pem
from ..knative_identity import ingress_audience, oidc_subject
from ..query import cursor_secret_problem
from ..settings import Settings
from .broker import broker_topic, trigger_dispatcher, trigger_filter
from .delivery import Outcome
from .dispatcher import MAX_POLL_RECORDS, KafkaDispatcher
from .ingress import IngressAuth
from .kafkasink import TopicWriter, ensure_topic
from .kafkasource import kafka_source_dispatcher
from .manifests import (
    Broker,
    Destination,
    KafkaSink,
    KafkaSource,
    KService,
    ManifestError,
    Manifests,
    PingSource,
    Resource,
    Trigger,
    load,
)
from .pingsource import PingScheduler
from .services import ServiceProcess, container_env

if TYPE_CHECKING:
    from ..devservices.issuer import LocalIssuer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]

# Knative's delivery tokens: requested for an hour, and used until five minutes before they
# expire (eventing-kafka-broker data-plane dispatcher/impl/auth/TokenProvider.java, a cache
# of 3600 - 300 s; knative/eventing pkg/auth/token_provider.go, the same for the PingSource).
TOKEN_LIFETIME = 3600
TOKEN_RENEW_BEFORE = 300


class Runner:
    """Start with `start()` (or `with Runner(...) as r:`); `stop()` ends every process it began."""

    def __init__(
        self,
        manifest_dir: str | Path,
        settings: Settings,
        *,
        workdir: str | Path,
        repo_root: str | Path | None = None,
        port: int = 0,
        commit_interval: float = 5.0,
        on_dead_letter_failure: str = "retry",
        schedule_pings: bool = True,
        service_ports: dict[str, int] | None = None,
        max_poll_records: int = MAX_POLL_RECORDS,
        issuer: LocalIssuer | None = None,
        service_env: dict[str, dict[str, str]] | None = None,
        oidc: bool = True,
        secrets: dict[str, dict[str, str]] | None = None,
    ):
        self.manifests: Manifests = load(manifest_dir)
        self.settings = settings
        self.workdir = Path(workdir)
        self.repo_root = Path(repo_root) if repo_root else REPO_ROOT
        self.commit_interval = commit_interval
        self.max_poll_records = max_poll_records  # unordered sources: Knative's max.poll.records
        self.on_dead_letter_failure = on_dead_letter_failure
        self.schedule_pings = schedule_pings
        self._service_ports = dict(service_ports or {})
        # A devservices.issuer.LocalIssuer: its JWKS is served here, and every Service
        # trusts it (AUTH_ISSUER, AUTH_JWKS_URL) in place of the cluster's OIDC issuer and
        # service-account issuer. Without one given, the runner makes its own: the writer
        # of the manifests takes only deliveries with a token, which someone must mint.
        if issuer is None:
            from ..devservices.issuer import LocalIssuer

            issuer = LocalIssuer(audience=settings.auth_audience)
        self.issuer: LocalIssuer = issuer
        # Knative Eventing's `authentication-oidc` feature, cluster-wide.
        self.oidc = oidc
        self.ingress_auth = IngressAuth(self.manifests, issuer, oidc=oidc)
        # Per-Service env applied last (dev up: the query service's read-only role).
        self._service_env = {k: dict(v) for k, v in (service_env or {}).items()}
        # Values for Secrets made out of band in a cluster (else generated: _stand_in_secret).
        self._secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self._port = port
        self.services: dict[str, ServiceProcess] = {}
        self.sinks: dict[str, TopicWriter] = {}
        self.brokers: dict[str, TopicWriter] = {}
        self.sources: dict[str, KafkaDispatcher] = {}
        self.triggers: dict[str, KafkaDispatcher] = {}
        self.pings: dict[str, PingScheduler] = {}
        self._server: ThreadingHTTPServer | None = None
        self._server_thread: threading.Thread | None = None

    # --- addresses ---------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "runner not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def service_url(self, name: str) -> str:
        return self.services[name].url

    def service_port(self, name: str) -> int:
        return self.services[name].port

    def broker_url(self, name: str) -> str:
        broker = self.manifests.get("Broker", name)
        return f"{self.url}/{broker.namespace}/{broker.name}"

    def sink_url(self, name: str) -> str:
        sink = self.manifests.get("KafkaSink", name)
        return f"{self.url}/{sink.namespace}/{sink.name}"

    def audience_of(self, dest: Destination) -> str | None:
        """The OIDC audience a delivery to `dest` is for: the Destination's own `audience`, else
        a Broker's or KafkaSink's (published in its address only with the feature on)."""
        if dest.audience is not None:
            return dest.audience
        if self.oidc and dest.ref is not None and dest.ref.kind in ("KafkaSink", "Broker"):
            res = self.manifests.get(dest.ref.kind, dest.ref.name)
            return ingress_audience(res.namespace, res.kind, res.name)
        return None

    def _sign_deliveries(self, egress, destination: Destination, dead_letter: Destination | None,
                         namespace: str, kind: str, name: str) -> None:  # fmt: skip
        """Tokens on a source's deliveries, as Knative's dispatcher sends them."""
        audience = self.audience_of(destination)
        egress.token = self.oidc_token(audience, namespace, kind, name)
        egress.no_oidc_service_account = audience is not None and not self.oidc
        if dead_letter is not None:
            egress.dead_letter_token = self.oidc_token(
                self.audience_of(dead_letter), namespace, kind, name
            )

    def resolve(self, dest: Destination, where: str) -> str:
        """A Destination as a local URL."""
        if dest.ref is None:
            assert dest.uri is not None
            return dest.uri
        ref = dest.ref
        if ref.kind == "Service" and ref.api_version.startswith("serving.knative.dev"):
            if ref.name not in self.services:
                raise ManifestError(f"{where}: Service {ref.name} is not in the manifests")
            base = self.services[ref.name].url
        elif ref.kind in ("KafkaSink", "Broker"):
            res = self.manifests.get(ref.kind, ref.name)
            base = f"{self.url}/{res.namespace}/{res.name}"
        else:
            raise ManifestError(f"{where}: the runner cannot resolve a ref to {ref.kind}")
        return urljoin(base + "/", dest.uri.lstrip("/")) if dest.uri else base

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> Runner:
        self.manifests.report(log)
        bootstrap = self.settings.bootstrap_servers
        try:
            self._start_server()
            self.issuer.url = f"{self.url}/issuer"
            for svc in self.manifests.of(KService):
                env = container_env(svc, self.manifests, self._stand_in_secret)
                env["KAFKA_BOOTSTRAP_SERVERS"] = self.settings.kafka_bootstrap_servers or ""
                if self.settings.database_configured:
                    env["DATABASE_URL"] = self._database_url()
                env["AUTH_ISSUER"] = self.issuer.url
                env["AUTH_JWKS_URL"] = self.issuer.jwks_url
                env["AUTH_TRUSTED_ISSUERS"] = ""  # the local issuer stands in for all
                # ... the cluster's service-account issuer too, whose tokens name the sources
                env["WRITER_AUTH_ISSUER"] = self.issuer.url
                env["MAINTENANCE_AUTH_ISSUER"] = self.issuer.url
                self._stand_in_signing_key(svc.name, env)
                self._stand_in_cursor_secret(svc.name, env)
                env.update(self._service_env.get(svc.name, {}))
                self.services[svc.name] = ServiceProcess(
                    svc, env, repo_root=self.repo_root, log_dir=self.workdir / "logs",
                    port=self._service_ports.get(svc.name),
                )  # fmt: skip
            for proc in self.services.values():
                proc.start()
            for sink in self.manifests.of(KafkaSink):
                ensure_topic(bootstrap, sink.topic, sink.num_partitions or 1)
                self.sinks[sink.name] = TopicWriter(
                    sink.key, bootstrap, sink.topic, sink.content_mode
                )
            for broker in self.manifests.of(Broker):
                if broker.broker_class != "Kafka":
                    log.info("%s: class %s runs locally as a Kafka broker", broker.key,
                             broker.broker_class)  # fmt: skip
                ensure_topic(bootstrap, broker_topic(broker), 1)
                self.brokers[broker.name] = TopicWriter(
                    broker.key, bootstrap, broker_topic(broker), "binary"
                )
            self._start_triggers(bootstrap)
            self._start_sources(bootstrap)
            for ping in self.manifests.of(PingSource):
                sched = PingScheduler(ping, self.resolve(ping.sink, f"{ping.key} sink"))
                self._sign_deliveries(sched.egress, ping.sink, None, ping.namespace,
                                      "pingsource", ping.name)  # fmt: skip
                if sched.egress.no_oidc_service_account:
                    # The ping adapter sends without a token when it has none (knative/eventing
                    # pkg/adapter/v2 cloudevents.go); only the Kafka dispatcher fails instead.
                    sched.egress.no_oidc_service_account = False
                self.pings[ping.name] = sched.start() if self.schedule_pings else sched
        except BaseException:
            self.stop()
            raise
        return self

    def _database_url(self) -> str:
        kw = self.settings.pg_connect_kwargs
        if self.settings.database_url:
            return self.settings.database_url
        auth = kw["user"] + (f":{kw['password']}" if kw["password"] else "")
        return f"postgresql://{auth}@{kw['host']}:{kw['port']}/{kw['database']}"

    def _start_sources(self, bootstrap: list[str]) -> None:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        try:
            existing = set(admin.list_topics())
        finally:
            admin.close()
        for source in self.manifests.of(KafkaSource):
            missing = [t for t in source.topics if t not in existing]
            if missing:
                log.warning("%s: topic(s) %s do not exist yet; nothing to consume until they do",
                            source.key, ", ".join(missing))  # fmt: skip
            self.start_source(source.name)

    def _stand_in_secret(self, secret: str, key: str) -> str:
        """A Secret created out of band in a cluster (not in the manifests, such as
        audit-attestation) is stood in with a random value, generated once in the work folder
        and shared by every Service that reads it (development and tests only)."""
        given = self._secrets.get(secret, {}).get(key)
        if given is not None:
            return given
        path = self.workdir / "secrets" / secret / key
        if not path.exists():
            import secrets as random

            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(random.token_hex(32))
            path.chmod(0o600)
        return path.read_text()

    def _stand_in_signing_key(self, service: str, env: dict[str, str]) -> None:
        """A deployment mounts the Secret audit-signing-key; here a key generated once in the
        work folder (development and tests only, never a deployment's) takes its place."""
        configured = env.get("INTEGRITY_SIGNING_KEY_FILE")
        if not configured or Path(configured).is_file():
            return
        path = self.workdir / "secrets" / f"{service}-signing-key.pem"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(generate_pem())
            path.chmod(0o600)
        env["INTEGRITY_SIGNING_KEY_FILE"] = str(path)

    def _stand_in_cursor_secret(self, service: str, env: dict[str, str]) -> None:
        """The Secret audit-query in the manifests holds a placeholder, which the query
        service refuses (anyone with a clone could sign cursors with it); here a key
        generated once in the work folder takes its place, as a deployment's own would."""
        configured = env.get("QUERY_CURSOR_SECRET")
        if not configured or cursor_secret_problem(configured) is None:
            return
        path = self.workdir / "secrets" / f"{service}-cursor-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["QUERY_CURSOR_SECRET"] = path.read_text()
        log.info("Service/%s: the manifests' QUERY_CURSOR_SECRET is a placeholder; using a key "
                 "generated for this runner (%s)", service, path)  # fmt: skip

    def start_source(self, name: str) -> KafkaDispatcher:
        """(Re)start one KafkaSource's dispatcher from its manifest; it joins its group anew."""
        source = self.manifests.get("KafkaSource", name)
        assert isinstance(source, KafkaSource)
        old = self.sources.get(name)
        if old is not None and old.running:
            return old
        dls = source.delivery.dead_letter_sink
        dispatcher = kafka_source_dispatcher(
            source,
            bootstrap_servers=self.settings.bootstrap_servers,
            destination=self.resolve(source.sink, f"{source.key} sink"),
            dead_letter=self.resolve(dls, f"{source.key} deadLetterSink") if dls else None,
            on_dead_letter_failure=self.on_dead_letter_failure,
            commit_interval=self.commit_interval,
            max_poll_records=self.max_poll_records,
        )
        self._sign_deliveries(dispatcher.egress, source.sink, dls, source.namespace,
                              "kafkasource", name)  # fmt: skip
        self.sources[name] = dispatcher.start()
        log.info("%s: %s %s -> %s (group %s, %s, retry %d, backoff %s %.3fs)",
                 source.key, ",".join(source.topics), "ordered" if dispatcher.ordered
                 else "unordered", dispatcher.egress.destination, source.consumer_group,
                 source.initial_offset, source.delivery.retry, source.delivery.backoff_policy,
                 source.delivery.backoff_delay)  # fmt: skip
        return dispatcher

    def stop_source(self, name: str, commit: bool = True) -> None:
        """Stop one KafkaSource; `commit=False` simulates a dispatcher crash."""
        self.sources[name].stop(commit=commit)

    def _start_triggers(self, bootstrap: list[str]) -> None:
        for trigger in self.manifests.of(Trigger):
            broker = self.manifests.find("Broker", trigger.broker)
            if not isinstance(broker, Broker):
                log.warning("%s: broker %s is not in the manifests; trigger not started",
                            trigger.key, trigger.broker)  # fmt: skip
                continue
            try:
                trigger_filter(trigger)
            except ManifestError as exc:
                log.warning("%s: %s; trigger not started", trigger.key, exc)
                continue
            delivery = trigger.delivery or broker.delivery
            dls = delivery.dead_letter_sink if delivery else None
            dispatcher = trigger_dispatcher(
                trigger, broker, bootstrap_servers=bootstrap,
                destination=self.resolve(trigger.subscriber, f"{trigger.key} subscriber"),
                dead_letter=self.resolve(dls, f"{trigger.key} deadLetterSink") if dls else None,
                on_dead_letter_failure=self.on_dead_letter_failure,
                commit_interval=self.commit_interval,
            )  # fmt: skip
            self._sign_deliveries(dispatcher.egress, trigger.subscriber, dls, trigger.namespace,
                                  "trigger", trigger.name)  # fmt: skip
            self.triggers[trigger.name] = dispatcher.start()

    def oidc_token(
        self, audience: str | None, namespace: str, kind: str, name: str
    ) -> Callable[[], str] | None:
        """What Knative Eventing's OIDC feature sends: a token of the sender's own service
        account, for the destination's audience. None when there is no audience.

        A token lives TOKEN_LIFETIME and is reused until TOKEN_RENEW_BEFORE its expiry, as
        Knative caches its tokens; the writer then pays its check once, not per delivery.
        """
        if audience is None or not self.oidc:
            return None
        issuer = self.issuer
        subject = oidc_subject(namespace, kind, name)
        current: list[Any] = [None, 0.0]

        def token() -> str:
            now = time.time()
            if current[1] - now <= TOKEN_RENEW_BEFORE:
                current[1] = now + TOKEN_LIFETIME
                current[0] = issuer.mint(subject, (), lifetime=TOKEN_LIFETIME, aud=audience)
            return current[0]

        return token

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every source and trigger owns its partitions."""
        for dispatcher in [*self.sources.values(), *self.triggers.values()]:
            dispatcher.wait_assigned(timeout)

    def stop(self) -> None:
        """Stop sources first (they commit what is settled), then sinks, services, the server."""
        for group in (self.pings, self.sources, self.triggers):
            for item in group.values():
                with contextlib.suppress(Exception):
                    item.stop()
        for writer in [*self.sinks.values(), *self.brokers.values()]:
            with contextlib.suppress(Exception):
                writer.close()
        for proc in self.services.values():
            with contextlib.suppress(Exception):
                proc.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Runner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- operator and test actions -------------------------------------------------

    def stop_service(self, name: str) -> None:
        self.services[name].stop()

    def kill_service(self, name: str) -> None:
        self.services[name].kill()

    def start_service(self, name: str) -> None:
        self.services[name].start()

    def fire_ping(self, name: str) -> Outcome:
        return self.pings[name].fire()

    def redeliver(
        self, source: str, partition: int, start: int, end: int | None = None,
        topic: str | None = None,
    ) -> list[Outcome]:  # fmt: skip
        dispatcher = self.sources[source]
        return dispatcher.redeliver(topic or dispatcher.topics[0], partition, start, end)

    def rewind(self, source: str, partition: int, offset: int, topic: str | None = None) -> None:
        dispatcher = self.sources[source]
        dispatcher.rewind(topic or dispatcher.topics[0], partition, offset)

    def status(self) -> dict[str, Any]:
        def counters(d: KafkaDispatcher) -> dict[str, Any]:
            s = d.stats
            return {
                "group": d.group, "topics": d.topics, "destination": d.egress.destination,
                "received": s.received, "delivered": s.delivered,
                "dead_lettered": s.dead_lettered, "dropped": s.dropped, "filtered": s.filtered,
            }  # fmt: skip

        return {
            "url": self.url,
            "services": {n: p.url for n, p in self.services.items()},
            "brokers": {n: self.broker_url(n) for n in self.brokers},
            "sinks": {n: self.sink_url(n) for n in self.sinks},
            "kafkasources": {n: counters(d) for n, d in self.sources.items()},
            "triggers": {n: counters(d) for n, d in self.triggers.items()},
            "pingsources": {
                n: {
                    "schedule": p.source.schedule,
                    "next": p.next_fire().isoformat(),
                    "fire": f"{self.url}/pingsources/{n}/fire",
                }
                for n, p in self.pings.items()
            },
        }

    # --- the runner's HTTP endpoint ----------------------------------------------

    def _start_server(self) -> None:
        runner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

            def _answer(self, status: int, body: bytes = b"", ctype: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, doc: Any) -> None:
                self._answer(status, json.dumps(doc, default=str).encode())

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path in ("/healthz", "/readyz"):
                    self._answer(200, b"ok", "text/plain")
                elif path.startswith("/issuer/") and runner.issuer is not None:
                    self._answer(*runner.issuer.answer(path))
                elif path == "/status":
                    self._json(200, runner.status())
                else:
                    self._json(404, {"error": f"no such path {path}"})

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                segs = [s for s in parts.path.split("/") if s]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if len(segs) == 3 and segs[0] == "pingsources" and segs[2] == "fire":
                        if segs[1] not in runner.pings:
                            return self._json(404, {"error": f"no PingSource {segs[1]}"})
                        return self._json(200, asdict(runner.fire_ping(segs[1])))
                    if len(segs) == 3 and segs[0] == "kafkasources" and segs[2] == "redeliver":
                        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                        if segs[1] not in runner.sources:
                            return self._json(404, {"error": f"no KafkaSource {segs[1]}"})
                        outcomes = runner.redeliver(
                            segs[1], int(q["partition"]), int(q["start"]),
                            int(q["end"]) if "end" in q else None, q.get("topic"),
                        )  # fmt: skip
                        return self._json(200, [asdict(o) for o in outcomes])
                    if len(segs) == 2:
                        found = runner._ingress(segs[0], segs[1])
                        if found is not None:
                            resource, writer = found
                            headers = dict(self.headers.items())
                            refused = runner.ingress_auth.refusal(resource, headers, body)
                            if refused is not None:
                                return self._answer(refused)
                            status, out = writer.handle_http(headers, body)
                            return self._answer(status, out)
                    self._json(404, {"error": f"no Broker, KafkaSink or action at {parts.path}"})
                except (KeyError, ValueError) as exc:
                    self._json(400, {"error": f"bad request: {exc!r}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, name="runner-http", daemon=True
        )
        self._server_thread.start()

    def _ingress(self, namespace: str, name: str) -> tuple[Resource, TopicWriter] | None:
        for kind, writers in (("Broker", self.brokers), ("KafkaSink", self.sinks)):
            res = self.manifests.find(kind, name)
            if res is not None and res.namespace == namespace and name in writers:
                return res, writers[name]
        return None

    def ingress_audience(self, kind: str, name: str) -> str:
        """The audience a token for this Broker's or KafkaSink's ingress must carry."""
        res = self.manifests.get(kind, name)
        return ingress_audience(res.namespace, res.kind, res.name)
