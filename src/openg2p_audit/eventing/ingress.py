"""Who may send to a Broker or a KafkaSink: their ingress with Knative's OIDC feature on.

As knative-extensions/eventing-kafka-broker's receiver does it (`AuthHandler`,
`AuthVerifierImpl`, `EventPolicy`) with the contract its control plane builds
(`control-plane/pkg/core/config/utils.go`, `EventPoliciesFromAppliedEventPoliciesStatus`):

- every request needs a bearer token from the cluster's issuer (here the runner's
  local issuer) for the resource's own audience, `<group>/<kind>/<ns>/<name>`
  lowercased (knative/eventing `auth.GetAudience`); without one, or with a bad one,
  401 and an empty body;
- the EventPolicies of the resource's namespace that apply to it (`spec.to` names
  it, or is empty) decide: a policy matches the token when its `from` holds the
  token's `sub` (exactly, or as a prefix when it ends in `*`; a `from.ref` stands for
  that Knative resource's OIDC identity), and the request is allowed when the event
  passes every filter of at least one matching policy; otherwise 403 and an empty body;
- with no EventPolicy applying, the default authorization mode decides;
  `allow-same-namespace` (knative/eventing's default in `config-features`) lets any
  service account of the resource's namespace send.

With the feature off the ingress checks nothing, as Knative's does. A policy whose
`from.ref` cannot be resolved is not Ready in Knative and is left out of the
contract; the runner leaves it out too and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jwt

from ..knative_identity import ingress_audience, oidc_subject
from .binding import NotACloudEvent, from_http
from .broker import compile_filter
from .manifests import EventPolicy, ManifestError, Manifests, Resource

log = logging.getLogger(__name__)

DEFAULT_AUTHORIZATION_MODE = "allow-same-namespace"
_SA_PREFIX = "system:serviceaccount"


def _bearer(headers: Mapping[str, str]) -> str | None:
    for name, value in headers.items():
        if name.lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


class IngressAuth:
    """The OIDC and EventPolicy check of every Broker and KafkaSink of some manifests."""

    def __init__(self, manifests: Manifests, issuer, *, oidc: bool = True,
                 default_mode: str = DEFAULT_AUTHORIZATION_MODE):  # fmt: skip
        self.manifests = manifests
        self.issuer = issuer
        self.oidc = oidc
        self.default_mode = default_mode
        self.policies = [p for p in manifests.of(EventPolicy) if self._resolvable(p)]

    def _resolvable(self, policy: EventPolicy) -> bool:
        try:
            self._subjects(policy)
        except ValueError as exc:
            log.warning("%s: %s; like a policy that is not Ready, it is not applied",
                        policy.key, exc)  # fmt: skip
            return False
        return True

    def _subjects(self, policy: EventPolicy) -> list[str]:
        subjects = list(policy.subjects)
        for ref in policy.senders:
            subjects.append(oidc_subject(ref.namespace or policy.namespace, ref.kind, ref.name))
        return subjects

    def applying(self, resource: Resource) -> list[EventPolicy]:
        """The EventPolicies that apply to `resource`, by name (Knative sorts them so)."""
        group = _group(resource.api_version)
        found = [
            p for p in self.policies
            if p.namespace == resource.namespace and (
                not p.to or any(
                    r.kind.lower() == resource.kind.lower() and r.name == resource.name
                    and _group(r.api_version) == group for r in p.to
                )
            )
        ]  # fmt: skip
        return sorted(found, key=lambda p: p.name)

    def audience(self, resource: Resource) -> str:
        return ingress_audience(resource.namespace, resource.kind, resource.name)

    def refusal(self, resource: Resource, headers: Mapping[str, str], body: bytes) -> int | None:
        """None when the request may pass; else the status the receiver answers (401/403)."""
        if not self.oidc:
            return None
        token = _bearer(headers)
        if token is None:
            return 401
        try:
            claims = self.issuer.verify(token, self.audience(resource))
        except jwt.InvalidTokenError as exc:
            log.info("%s: refused a token: %s", resource.key, exc)
            return 401
        sub = str(claims.get("sub", ""))
        policies = self.applying(resource)
        if not policies:
            if self.default_mode == "allow-all":
                return None
            if self.default_mode == "allow-same-namespace" and sub.startswith(
                f"{_SA_PREFIX}:{resource.namespace}:"
            ):
                return None
            log.info("%s: %s refused (no EventPolicy; default mode %s)",
                     resource.key, sub, self.default_mode)  # fmt: skip
            return 403
        matching = [p for p in policies if any(_matches(s, sub) for s in self._subjects(p))]
        if not matching:
            log.info("%s: %s is named by no EventPolicy", resource.key, sub)
            return 403
        try:
            event = from_http(headers, body)
        except NotACloudEvent:
            return None  # the ingress itself answers 400
        for policy in matching:
            try:
                if all(compile_filter(f)(event) for f in policy.filters):
                    return None
            except ManifestError as exc:
                log.warning("%s: filter not emulated: %s", policy.key, exc)
        log.info("%s: event %s from %s passes no filter of its EventPolicies",
                 resource.key, event.id, sub)  # fmt: skip
        return 403


def _matches(pattern: str, sub: str) -> bool:
    if pattern.endswith("*"):
        return sub.startswith(pattern[:-1])
    return pattern == sub
