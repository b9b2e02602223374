"""The `knative/` manifests as typed objects, with every field accounted for.

The manifests are the single source of truth for the cluster and for a
developer's machine. The local runner reads the same kustomization and
behaves as it says: topics, consumer group, ordering, retries, backoff,
sinks, schedules, filters. A field the runner cannot honour must never be
dropped silently, or a developer would trust local behaviour the cluster
does not have (or the reverse). Every field is therefore sorted into one of
three bins:

- honoured: it changes what the runner does;
- deployment-only: it only has meaning in a cluster (images, resources,
  autoscaling, credentials, replica counts) and is listed at start;
- unsupported: anything else the CRD schema allows; reported as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
KEY_TYPE_LABEL = "kafkasources.sources.knative.dev/key-type"
BROKER_CLASS_ANNOTATION = "eventing.knative.dev/broker.class"
DELIVERY_ORDER_ANNOTATION = "kafka.eventing.knative.dev/delivery.order"

_DURATION = TypeAdapter(timedelta)


class ManifestError(ValueError):
    """A manifest the runner cannot act on at all (bad YAML, missing name, bad value)."""


@dataclass(frozen=True)
class Finding:
    resource: str  # Kind/name
    path: str
    file: str

    def __str__(self) -> str:
        return f"{self.resource} {self.path}"


# --- typed resources ---------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    kind: str
    name: str
    api_version: str = ""
    namespace: str | None = None


@dataclass(frozen=True)
class Destination:
    """A Knative Destination: a ref (resolved locally), an absolute URI, or ref + relative URI."""

    ref: Ref | None = None
    uri: str | None = None
    # The OIDC audience of the destination: with Knative's `authentication-oidc` feature
    # each delivery carries a token for it (the runner mints one from its local issuer).
    audience: str | None = None


@dataclass(frozen=True)
class Delivery:
    retry: int = 0
    backoff_policy: str = "exponential"  # exponential | linear
    backoff_delay: float = 0.0  # seconds
    timeout: float | None = None  # seconds per attempt
    dead_letter_sink: Destination | None = None
    format: str = "binary"  # binary | structured (Trigger only)

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (1-based), as the Kafka dispatcher does.

        Exponential is delay * 2**n (so the first retry already waits twice the
        delay); linear is delay * n.
        """
        if self.backoff_delay <= 0:
            return 0.0
        if self.backoff_policy == "linear":
            return self.backoff_delay * retry_number
        return self.backoff_delay * (2**retry_number)


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None = None
    config_map_key: tuple[str, str] | None = None
    secret_key: tuple[str, str] | None = None
    optional: bool = False


@dataclass(frozen=True)
class EnvFrom:
    kind: str  # ConfigMap | Secret
    name: str
    prefix: str = ""
    optional: bool = False


@dataclass
class Resource:
    kind: str
    api_version: str
    name: str
    namespace: str
    file: str
    raw: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def labels(self) -> dict[str, str]:
        return dict((self.raw.get("metadata") or {}).get("labels") or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict((self.raw.get("metadata") or {}).get("annotations") or {})


@dataclass
class ConfigMap(Resource):
    data: dict[str, str] = field(default_factory=dict)


@dataclass
class Secret(Resource):
    data: dict[str, str] = field(default_factory=dict)


@dataclass
class KService(Resource):
    env: list[EnvVar] = field(default_factory=list)
    env_from: list[EnvFrom] = field(default_factory=list)
    container_port: int = 8080
    readiness_path: str = "/healthz"
    liveness_path: str = "/healthz"

    def env_value(self, name: str) -> str | None:
        """A literal `value:` env var (FUNCTION_TARGET and friends)."""
        for var in self.env:
            if var.name == name:
                return var.value
        return None


@dataclass
class KafkaSource(Resource):
    consumer_group: str = ""
    topics: list[str] = field(default_factory=list)
    initial_offset: str = "latest"
    ordering: str = "ordered"
    delivery: Delivery = field(default_factory=Delivery)
    sink: Destination = field(default_factory=Destination)
    ce_overrides: dict[str, str] = field(default_factory=dict)
    key_type: str = "string"


@dataclass
class KafkaSink(Resource):
    topic: str = ""
    content_mode: str = "binary"
    num_partitions: int | None = None


@dataclass
class PingSource(Resource):
    schedule: str = ""
    timezone: str = "UTC"
    content_type: str | None = None
    data: bytes | None = None
    sink: Destination = field(default_factory=Destination)
    ce_overrides: dict[str, str] = field(default_factory=dict)


@dataclass
class Broker(Resource):
    delivery: Delivery | None = None
    broker_class: str = "MTChannelBasedBroker"


@dataclass
class EventPolicy(Resource):
    """Who may send to a Broker or KafkaSink (eventing.knative.dev/v1alpha1), and what.

    `to` empty means every such resource of the namespace. `subjects` are OIDC `sub`s
    (a trailing `*` matches any suffix); `senders` are references to Knative resources,
    whose OIDC identities they stand for; `filters` are SubscriptionsAPI filters the
    event must pass.
    """

    to: list[Ref] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    senders: list[Ref] = field(default_factory=list)
    filters: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trigger(Resource):
    broker: str = ""
    subscriber: Destination = field(default_factory=Destination)
    delivery: Delivery | None = None
    filter_attributes: dict[str, str] = field(default_factory=dict)
    filters: list[dict[str, Any]] = field(default_factory=list)
    ordering: str = "unordered"


# --- which fields the runner honours ----------------------------------------

_COMMON_HONOURED = ("apiVersion", "kind", "metadata.name", "metadata.namespace")
_COMMON_DEPLOYMENT = ("metadata.labels", "metadata.annotations")
_DEST = ("ref.apiVersion", "ref.kind", "ref.name", "ref.namespace", "uri", "audience")
_DEST_DEPLOYMENT = ("CACerts",)
_DELIVERY = (
    "retry",
    "backoffPolicy",
    "backoffDelay",
    "timeout",
    *tuple(f"deadLetterSink.{p}" for p in _DEST),
)
_DELIVERY_DEPLOYMENT = tuple(f"deadLetterSink.{p}" for p in _DEST_DEPLOYMENT)
_CONTAINER = "spec.template.spec.containers[]"


def _under(prefix: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in paths)


# kind -> (honoured, deployment-only). A pattern covers every path it prefixes.
SUPPORT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ConfigMap": (("data",), ("immutable",)),
    # The topics Job (audit-topics) runs `openg2p-audit topics`; dev up takes that same step
    # itself before it starts the runner, so the Job has no local meaning.
    "Job": ((), ("spec",)),
    "Secret": (("data", "stringData"), ("type", "immutable")),
    "Service": (
        (
            f"{_CONTAINER}.env",
            f"{_CONTAINER}.envFrom",
            f"{_CONTAINER}.ports[].containerPort",
            f"{_CONTAINER}.readinessProbe.httpGet.path",
            f"{_CONTAINER}.livenessProbe.httpGet.path",
        ),
        (
            "spec.template.metadata",
            "spec.template.spec.containerConcurrency",
            "spec.template.spec.timeoutSeconds",
            "spec.template.spec.responseStartTimeoutSeconds",
            "spec.template.spec.idleTimeoutSeconds",
            "spec.template.spec.serviceAccountName",
            "spec.template.spec.enableServiceLinks",
            "spec.template.spec.securityContext",
            "spec.template.spec.imagePullSecrets",
            # Mounted Secrets (the sealing key): credentials. The runner points the setting
            # that names the file at a key of its own instead (Runner._stand_in_signing_key).
            "spec.template.spec.volumes",
            f"{_CONTAINER}.volumeMounts",
            "spec.traffic",
            f"{_CONTAINER}.name",
            f"{_CONTAINER}.image",
            f"{_CONTAINER}.imagePullPolicy",
            f"{_CONTAINER}.resources",
            f"{_CONTAINER}.securityContext",
            f"{_CONTAINER}.ports[].name",
            f"{_CONTAINER}.ports[].protocol",
            f"{_CONTAINER}.readinessProbe",
            f"{_CONTAINER}.livenessProbe",
            f"{_CONTAINER}.startupProbe",
            f"{_CONTAINER}.terminationMessagePolicy",
            f"{_CONTAINER}.terminationMessagePath",
        ),
    ),
    "KafkaSource": (
        (
            "spec.consumerGroup",
            "spec.topics",
            "spec.initialOffset",
            "spec.ordering",
            "spec.ceOverrides.extensions",
            *_under("spec.sink", _DEST),
            *_under("spec.delivery", _DELIVERY),
        ),
        (
            "spec.bootstrapServers",  # replaced by the local broker
            "spec.consumers",
            "spec.net",
            *_under("spec.sink", _DEST_DEPLOYMENT),
            *_under("spec.delivery", _DELIVERY_DEPLOYMENT),
        ),
    ),
    "KafkaSink": (
        ("spec.topic", "spec.contentMode", "spec.numPartitions"),
        ("spec.bootstrapServers", "spec.replicationFactor", "spec.auth"),
    ),
    "PingSource": (
        (
            "spec.schedule",
            "spec.timezone",
            "spec.contentType",
            "spec.data",
            "spec.dataBase64",
            "spec.ceOverrides.extensions",
            *_under("spec.sink", _DEST),
        ),
        _under("spec.sink", _DEST_DEPLOYMENT),
    ),
    "Broker": (
        _under("spec.delivery", _DELIVERY),
        ("spec.config", *_under("spec.delivery", _DELIVERY_DEPLOYMENT)),
    ),
    "Trigger": (
        (
            "spec.broker",
            "spec.brokerRef.name",
            "spec.filter.attributes",
            "spec.filters[].exact",
            "spec.filters[].prefix",
            "spec.filters[].suffix",
            "spec.filters[].all",
            "spec.filters[].any",
            "spec.filters[].not",
            "spec.delivery.format",
            *_under("spec.subscriber", _DEST),
            *_under("spec.delivery", _DELIVERY),
        ),
        (
            "spec.brokerRef.apiVersion",
            "spec.brokerRef.kind",
            "spec.brokerRef.namespace",
            *_under("spec.subscriber", _DEST_DEPLOYMENT),
            *_under("spec.delivery", _DELIVERY_DEPLOYMENT),
        ),
    ),
}

SUPPORT["EventPolicy"] = (
    (
        "spec.to[].ref.apiVersion",
        "spec.to[].ref.kind",
        "spec.to[].ref.name",
        "spec.from[].ref.apiVersion",
        "spec.from[].ref.kind",
        "spec.from[].ref.name",
        "spec.from[].ref.namespace",
        "spec.from[].sub",
        "spec.filters[].exact",
        "spec.filters[].prefix",
        "spec.filters[].suffix",
        "spec.filters[].all",
        "spec.filters[].any",
        "spec.filters[].not",
    ),
    (),
)

KUSTOMIZATION_HONOURED = ("apiVersion", "kind", "resources", "namespace")
KUSTOMIZATION_DEPLOYMENT = ("labels", "commonLabels", "commonAnnotations", "images", "metadata")


def _split(pattern: str) -> list[str]:
    return pattern.split(".")


def _leaf_paths(node: Any, prefix: list[str]) -> Iterator[list[str]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, [*prefix, str(key)])
    elif isinstance(node, list) and node:
        for item in node:
            yield from _leaf_paths(item, [*prefix[:-1], prefix[-1] + "[]"])
    else:
        yield prefix


def _seg(text: str) -> str:
    return text.removesuffix("[]")


def _match(path: list[str], patterns: tuple[str, ...]) -> str | None:
    """The first pattern that covers `path` (segment-wise prefix; `*` is any one segment)."""
    for pattern in patterns:
        segs = _split(pattern)
        if len(segs) <= len(path) and all(
            s == "*" or _seg(s) == _seg(p) for s, p in zip(segs, path, strict=False)
        ):
            return pattern
    return None


def classify(
    doc: dict[str, Any], honoured: tuple[str, ...], deployment: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """(deployment-only patterns present, unsupported leaf paths) of `doc`, de-duplicated.

    Deployment-only fields are named by the pattern that covers them (short);
    unsupported ones by their full path (so they can be found in the file).
    """
    dep: list[str] = []
    bad: list[str] = []
    for path in _leaf_paths(doc, []):
        if not path or _match(path, honoured):
            continue
        pattern = _match(path, deployment)
        text = pattern if pattern else ".".join(path)
        target = dep if pattern else bad
        if text not in target:
            target.append(text)
    return dep, bad


# --- parsing helpers ---------------------------------------------------------


def _duration(value: Any, where: str) -> float:
    try:
        return _DURATION.validate_python(value).total_seconds()
    except ValidationError:
        raise ManifestError(
            f"{where}: {value!r} is not an ISO-8601 duration (e.g. PT0.2S)"
        ) from None


def _destination(node: Any, where: str) -> Destination:
    if not isinstance(node, dict) or not (node.get("ref") or node.get("uri")):
        raise ManifestError(f"{where}: needs a ref or a uri")
    ref = None
    if node.get("ref"):
        r = node["ref"]
        if not r.get("kind") or not r.get("name"):
            raise ManifestError(f"{where}.ref: needs kind and name")
        ref = Ref(r["kind"], r["name"], r.get("apiVersion", ""), r.get("namespace"))
    audience = node.get("audience")
    if audience is not None and (not isinstance(audience, str) or not audience):
        raise ManifestError(f"{where}.audience: must be a non-empty string")
    return Destination(ref, node.get("uri"), audience)


def _delivery(node: Any, where: str) -> Delivery | None:
    if not node:
        return None
    policy = str(node.get("backoffPolicy", "exponential")).lower()
    if policy not in ("exponential", "linear"):
        raise ManifestError(f"{where}.backoffPolicy: expected exponential or linear")
    retry = int(node.get("retry", 0) or 0)
    if retry < 0:
        raise ManifestError(f"{where}.retry: must be >= 0")
    dls = node.get("deadLetterSink")
    fmt = str(node.get("format", "binary")).lower()
    if fmt not in ("binary", "json", "structured"):
        raise ManifestError(f"{where}.format: expected binary or json")
    return Delivery(
        retry=retry,
        backoff_policy=policy,
        backoff_delay=_duration(node["backoffDelay"], f"{where}.backoffDelay")
        if node.get("backoffDelay")
        else 0.0,
        timeout=_duration(node["timeout"], f"{where}.timeout") if node.get("timeout") else None,
        dead_letter_sink=_destination(dls, f"{where}.deadLetterSink") if dls else None,
        format="binary" if fmt == "binary" else "structured",
    )


def _env(container: dict[str, Any]) -> tuple[list[EnvVar], list[EnvFrom]]:
    env: list[EnvVar] = []
    for item in container.get("env") or []:
        src = item.get("valueFrom") or {}
        cm = src.get("configMapKeyRef")
        sec = src.get("secretKeyRef")
        env.append(
            EnvVar(
                name=item["name"],
                value=None if src else str(item.get("value", "")),
                config_map_key=(cm["name"], cm["key"]) if cm else None,
                secret_key=(sec["name"], sec["key"]) if sec else None,
                optional=bool((cm or sec or {}).get("optional", False)),
            )
        )
    env_from: list[EnvFrom] = []
    for item in container.get("envFrom") or []:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if item.get(key):
                env_from.append(
                    EnvFrom(
                        kind,
                        item[key]["name"],
                        item.get("prefix", ""),
                        bool(item[key].get("optional", False)),
                    )
                )
    return env, env_from


def _build(kind: str, base: dict[str, Any], doc: dict[str, Any]) -> Resource:
    spec = doc.get("spec") or {}
    where = f"{kind}/{base['name']} spec"
    if kind == "ConfigMap":
        return ConfigMap(**base, data={k: str(v) for k, v in (doc.get("data") or {}).items()})
    if kind == "Secret":
        import base64

        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update({k: str(v) for k, v in (doc.get("stringData") or {}).items()})
        return Secret(**base, data=data)
    if kind == "Job":
        return Resource(**base)
    if kind == "Service":
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        if len(containers) != 1:
            raise ManifestError(f"{where}: expected exactly one container, got {len(containers)}")
        c = containers[0]
        env, env_from = _env(c)
        ports = c.get("ports") or [{}]
        ready = ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path")
        live = ((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path")
        return KService(
            **base,
            env=env,
            env_from=env_from,
            container_port=int(ports[0].get("containerPort", 8080)),
            readiness_path=ready or live or "/healthz",
            liveness_path=live or ready or "/healthz",
        )
    if kind == "KafkaSource":
        ordering = str(spec.get("ordering", "ordered")).lower()
        if ordering not in ("ordered", "unordered"):
            raise ManifestError(f"{where}.ordering: expected ordered or unordered")
        initial = str(spec.get("initialOffset", "latest")).lower()
        if initial not in ("earliest", "latest"):
            raise ManifestError(f"{where}.initialOffset: expected earliest or latest")
        if not spec.get("topics") or not spec.get("consumerGroup"):
            raise ManifestError(f"{where}: topics and consumerGroup are required")
        res = KafkaSource(
            **base,
            consumer_group=str(spec["consumerGroup"]),
            topics=[str(t) for t in spec["topics"]],
            initial_offset=initial,
            ordering=ordering,
            delivery=_delivery(spec.get("delivery"), f"{where}.delivery") or Delivery(),
            sink=_destination(spec.get("sink"), f"{where}.sink"),
            ce_overrides={
                k: str(v)
                for k, v in ((spec.get("ceOverrides") or {}).get("extensions") or {}).items()
            },
        )
        res.key_type = res.labels.get(KEY_TYPE_LABEL, "string")
        if res.key_type not in ("string", "int", "float", "byte-array"):
            raise ManifestError(f"{res.key}: label {KEY_TYPE_LABEL}={res.key_type!r} is unknown")
        return res
    if kind == "KafkaSink":
        if not spec.get("topic"):
            raise ManifestError(f"{where}.topic is required")
        mode = str(spec.get("contentMode", "binary")).lower()
        if mode not in ("binary", "structured"):
            raise ManifestError(f"{where}.contentMode: expected binary or structured")
        return KafkaSink(
            **base,
            topic=str(spec["topic"]),
            content_mode=mode,
            num_partitions=int(spec["numPartitions"]) if spec.get("numPartitions") else None,
        )
    if kind == "PingSource":
        if not spec.get("schedule"):
            raise ManifestError(f"{where}.schedule is required")
        data: bytes | None = None
        if spec.get("dataBase64"):
            import base64

            data = base64.b64decode(spec["dataBase64"])
        elif spec.get("data") is not None:
            data = str(spec["data"]).encode()
        return PingSource(
            **base,
            schedule=str(spec["schedule"]),
            timezone=str(spec.get("timezone") or "UTC"),
            content_type=spec.get("contentType"),
            data=data,
            sink=_destination(spec.get("sink"), f"{where}.sink"),
            ce_overrides={
                k: str(v)
                for k, v in ((spec.get("ceOverrides") or {}).get("extensions") or {}).items()
            },
        )
    if kind == "Broker":
        res_b = Broker(**base, delivery=_delivery(spec.get("delivery"), f"{where}.delivery"))
        res_b.broker_class = res_b.annotations.get(BROKER_CLASS_ANNOTATION, "MTChannelBasedBroker")
        return res_b
    if kind == "EventPolicy":
        to = []
        for entry in spec.get("to") or []:
            ref = entry.get("ref")
            if ref:
                to.append(Ref(str(ref["kind"]), str(ref["name"]), str(ref.get("apiVersion", ""))))
        subjects, senders = [], []
        for entry in spec.get("from") or []:
            if entry.get("sub"):
                subjects.append(str(entry["sub"]))
            elif entry.get("ref"):
                r = entry["ref"]
                senders.append(Ref(str(r["kind"]), str(r["name"]), str(r.get("apiVersion", "")),
                                   r.get("namespace")))  # fmt: skip
        return EventPolicy(
            **base,
            to=to,
            subjects=subjects,
            senders=senders,
            filters=list(spec.get("filters") or []),
        )
    if kind == "Trigger":
        broker = spec.get("broker") or (spec.get("brokerRef") or {}).get("name")
        if not broker:
            raise ManifestError(f"{where}.broker is required")
        res_t = Trigger(
            **base,
            broker=str(broker),
            subscriber=_destination(spec.get("subscriber"), f"{where}.subscriber"),
            delivery=_delivery(spec.get("delivery"), f"{where}.delivery"),
            filter_attributes={
                k: str(v) for k, v in ((spec.get("filter") or {}).get("attributes") or {}).items()
            },
            filters=list(spec.get("filters") or []),
        )
        res_t.ordering = res_t.annotations.get(DELIVERY_ORDER_ANNOTATION, "unordered").lower()
        return res_t
    raise AssertionError(kind)  # pragma: no cover - callers check SUPPORT first


# --- loading -----------------------------------------------------------------


@dataclass
class Manifests:
    """Everything a kustomization lists, typed, plus what could not be honoured."""

    root: Path
    resources: list[Resource] = field(default_factory=list)
    unsupported: list[Finding] = field(default_factory=list)
    deployment_only: list[Finding] = field(default_factory=list)

    def of(self, cls: type[Any]) -> list[Any]:
        return [r for r in self.resources if isinstance(r, cls)]

    def get(self, kind: str, name: str) -> Resource:
        for r in self.resources:
            if r.kind == kind and r.name == name:
                return r
        raise ManifestError(f"{kind}/{name} is not in the manifests under {self.root}")

    def find(self, kind: str, name: str) -> Resource | None:
        try:
            return self.get(kind, name)
        except ManifestError:
            return None

    def report(self, logger: logging.Logger = log) -> None:
        """One log line per bin, so nothing the runner skips goes unsaid."""
        if self.deployment_only:
            grouped: dict[str, list[str]] = {}
            for f in self.deployment_only:
                grouped.setdefault(f.resource, []).append(f.path)
            logger.info(
                "manifest fields with meaning only in a cluster (not emulated locally): %s",
                "; ".join(f"{res}: {', '.join(paths)}" for res, paths in grouped.items()),
            )
        if self.unsupported:
            logger.warning(
                "UNSUPPORTED manifest fields, ignored by the local runner: %s",
                "; ".join(str(f) for f in self.unsupported),
                extra={"unsupported": [str(f) for f in self.unsupported]},
            )


def _resource_files(directory: Path, out: Manifests, seen: set[Path]) -> Iterator[tuple[Path, str]]:
    """Files listed by `directory`/kustomization.yaml, following nested kustomizations."""
    directory = directory.resolve()
    if directory in seen:
        raise ManifestError(f"kustomization cycle at {directory}")
    seen.add(directory)
    kfile = next(
        (directory / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
         if (directory / n).exists()),
        None,
    )  # fmt: skip
    if kfile is None:
        raise ManifestError(f"no kustomization.yaml in {directory}")
    doc = yaml.safe_load(kfile.read_text()) or {}
    dep, bad = classify(doc, KUSTOMIZATION_HONOURED, KUSTOMIZATION_DEPLOYMENT)
    out.deployment_only += [Finding("Kustomization", p, str(kfile)) for p in dep]
    out.unsupported += [Finding("Kustomization", p, str(kfile)) for p in bad]
    namespace = doc.get("namespace") or ""
    for entry in doc.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            for file, ns in _resource_files(path, out, seen):
                yield file, namespace or ns
        elif path.exists():
            yield path, namespace
        else:
            raise ManifestError(f"{kfile}: resource {entry!r} does not exist")


def load(directory: str | Path) -> Manifests:
    """Load the resources a kustomization lists; raise ManifestError on what cannot be used."""
    root = Path(directory)
    out = Manifests(root=root)
    for file, kustom_ns in _resource_files(root, out, set()):
        try:
            docs = [d for d in yaml.safe_load_all(file.read_text()) if d]
        except yaml.YAMLError as exc:
            raise ManifestError(f"{file}: not valid YAML: {exc}") from None
        for doc in docs:
            kind = doc.get("kind", "")
            meta = doc.get("metadata") or {}
            name = meta.get("name")
            if not name:
                raise ManifestError(f"{file}: a {kind or 'resource'} without metadata.name")
            base = {
                "kind": kind,
                "api_version": doc.get("apiVersion", ""),
                "name": str(name),
                "namespace": kustom_ns or meta.get("namespace") or DEFAULT_NAMESPACE,
                "file": str(file),
                "raw": doc,
            }
            if kind not in SUPPORT:
                out.unsupported.append(Finding(f"{kind}/{name}", "(whole resource)", str(file)))
                continue
            honoured, deployment = SUPPORT[kind]
            dep, bad = classify(doc, _COMMON_HONOURED + honoured, _COMMON_DEPLOYMENT + deployment)
            out.deployment_only += [Finding(f"{kind}/{name}", p, str(file)) for p in dep]
            out.unsupported += [Finding(f"{kind}/{name}", p, str(file)) for p in bad]
            try:
                out.resources.append(_build(kind, base, doc))
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, ManifestError):
                    raise
                raise ManifestError(f"{file}: {kind}/{name}: {exc!r}") from None
    return out
