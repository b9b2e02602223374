"""The OIDC identities Knative Eventing gives our sources and triggers.

With the `authentication-oidc` feature on, Knative creates one service account per
resource that sends events, and the tokens it sends name that account as their `sub`.
The account's name is not configurable: knative/eventing `pkg/auth/serviceaccount.go`
(`GetOIDCServiceAccountNameForResource`, since knative-v1.13) derives it as

    strings.ToLower(kmeta.ChildName(name, "-oidc-" + group + "-" + Kind))

and knative/pkg `kmeta/names.go` (`ChildName`) keeps a child name within the 63
characters Kubernetes allows by hashing the parent with MD5. Every place that names
such an identity (the source policy, the writer's and maintenance's accepted subjects,
the local runner's minted tokens, the tests and the docs) goes through `oidc_subject`,
so that none of them can drift from what a cluster will really send.

The receiving side has a derived name too: with the feature on, a Broker or KafkaSink
takes only tokens for its own audience, `<group>/<kind>/<namespace>/<name>` lowercased
(knative/eventing `pkg/auth/audience.go`, `GetAudience`), which the dispatchers put on
every delivery to it, dead letters included.
"""

from __future__ import annotations

import hashlib
import re

# knative/pkg kmeta/names.go: the longest name Kubernetes supports, and how much of the
# parent survives when the whole name must be hashed.
_LONGEST = 63
_MD5_HEX_LEN = 32
_HEAD = _LONGEST - _MD5_HEX_LEN
_ALPHANUMERIC = re.compile(r"[a-zA-Z0-9]")

# The (group, Kind) of each resource kind whose OIDC identity the project names.
TRIGGER = ("eventing.knative.dev", "Trigger")
KAFKA_SOURCE = ("sources.knative.dev", "KafkaSource")
PING_SOURCE = ("sources.knative.dev", "PingSource")

_KINDS = {"trigger": TRIGGER, "kafkasource": KAFKA_SOURCE, "pingsource": PING_SOURCE}


def child_name(parent: str, suffix: str) -> str:
    """knative/pkg `kmeta.ChildName`, byte for byte (names are ASCII, so len is bytes)."""
    if len(parent) <= _LONGEST - len(suffix):
        return parent + suffix
    if _HEAD - len(suffix) <= 0:
        digest = hashlib.md5((parent + suffix).encode(), usedforsecurity=False).hexdigest()
        ret = parent[:_HEAD] + digest
        if (room := _LONGEST - len(ret)) > 0:
            ret += suffix[:room]
        # makeValidName: a name may not end in a non-alphanumeric character.
        while ret and not _ALPHANUMERIC.fullmatch(ret[-1]):
            ret = ret[:-1]
        return ret
    digest = hashlib.md5(parent.encode(), usedforsecurity=False).hexdigest()
    return parent[: _HEAD - len(suffix)] + digest + suffix


def oidc_service_account(name: str, group: str, kind: str) -> str:
    """knative/eventing `auth.GetOIDCServiceAccountNameForResource`."""
    return child_name(name, f"-oidc-{group}-{kind}").lower()


def oidc_subject(namespace: str, kind: str, name: str) -> str:
    """The `sub` of the tokens that resource `name` of `kind` sends from `namespace`.

    `kind` is the manifest's kind, case-insensitive: Trigger, KafkaSource or PingSource.
    """
    try:
        group, kind_name = _KINDS[kind.lower()]
    except KeyError:
        raise ValueError(f"no OIDC identity is known for kind {kind!r}") from None
    return f"system:serviceaccount:{namespace}:{oidc_service_account(name, group, kind_name)}"


# The (group, Kind) of each resource whose ingress checks OIDC tokens for its own audience
# (eventing-kafka-broker control-plane/pkg/reconciler/broker/broker.go and sink/kafka_sink.go).
BROKER = ("eventing.knative.dev", "Broker")
KAFKA_SINK = ("eventing.knative.dev", "KafkaSink")
_INGRESSES = {"broker": BROKER, "kafkasink": KAFKA_SINK}


def ingress_audience(namespace: str, kind: str, name: str) -> str:
    """The audience a Broker's or KafkaSink's ingress requires of a token, with OIDC on.

    knative/eventing `auth.GetAudience`: `<group>/<kind>/<namespace>/<name>`, lowercased
    (what eventing-kafka-broker's broker and sink reconcilers publish as the address's
    audience, and what their receiver checks).
    """
    try:
        group, kind_name = _INGRESSES[kind.lower()]
    except KeyError:
        raise ValueError(f"no ingress audience is known for kind {kind!r}") from None
    return f"{group}/{kind_name}/{namespace}/{name}".lower()
