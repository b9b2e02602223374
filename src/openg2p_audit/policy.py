"""Which caller may emit under which `source`: the source policy ingest loads at start.

A verified token only says who is calling. Without this policy any service
with a token could write events as the payments service, which is the forgery
an audit trail exists to rule out. The policy is text in the `audit-settings`
ConfigMap (INGEST_SOURCE_POLICY, or a file named by INGEST_SOURCE_POLICY_FILE):

    callers:
      openg2p-registry:                # the token's sub or azp
        sources: ["/openg2p/registry", "/openg2p/registry/*"]
        types: ["org.openg2p.registry."]   # optional: allowed `type` prefixes
      system:serviceaccount:openg2p:payments:   # a projected service-account token
        sources: ["/openg2p/payments*"]

A caller is matched by its `sub` first, then by `azp` (Keycloak's client id,
which is what a client-credentials token of a service names). Source patterns
are shell-style (`fnmatch`, case-sensitive, `*` crosses `/`); a pattern list
that is empty allows nothing. A caller the policy does not name may emit
nothing. A policy that cannot be read stops ingest at start with one line,
because a function that boots with a typo in its policy would refuse every
event of a service or, worse, allow one it should not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .settings import Settings, SettingsError


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    types: list[str] | None = None


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    callers: dict[str, _Rule]


# The query service's own audit events ("who read what"): it produces them straight to
# Kafka (producer.py), never through ingest. Ingest refuses this source and type family
# from every caller, whatever the policy says, or an emitter allowed `*` could record reads
# that no investigator made. Compared case-insensitively, so no lookalike gets through.
QUERY_SOURCE = "/openg2p/audit/query"
QUERY_TYPE_PREFIX = "org.openg2p.audit.query."


def reserved(source: str, type_: str) -> tuple[str, str] | None:
    """(field, why) when no caller may emit this event through ingest, else None."""
    kind, origin = type_.casefold(), source.casefold()
    if kind.startswith(QUERY_TYPE_PREFIX) or kind == QUERY_TYPE_PREFIX[:-1]:
        return "type", f"type {type_!r} is reserved: only the query service records reads"
    if origin == QUERY_SOURCE or origin.startswith(QUERY_SOURCE + "/"):
        return "source", f"source {source!r} is reserved: only the query service records reads"
    return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class SourcePolicy:
    """The loaded policy: identities to their source patterns and type prefixes."""

    def __init__(self, callers: dict[str, _Rule]):
        self.callers = callers

    @classmethod
    def parse(cls, text: str, origin: str = "INGEST_SOURCE_POLICY") -> SourcePolicy:
        try:
            doc: Any = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as exc:
            line = str(exc).replace("\n", " ")
            raise SettingsError(f"invalid source policy in {origin}: not YAML: {line}") from None
        try:
            parsed = _Document.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "the document"
            raise SettingsError(
                f"invalid source policy in {origin}: {where}: {err['msg']}"
            ) from None
        for name, rule in parsed.callers.items():
            if not rule.sources:
                raise SettingsError(
                    f"invalid source policy in {origin}: callers.{name}.sources is empty"
                )
            if rule.types is not None and not all(rule.types):
                raise SettingsError(
                    f"invalid source policy in {origin}: callers.{name}.types holds an empty prefix"
                )
        return cls(parsed.callers)

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        """The policy ingest is configured with; SettingsError (one line) if none or bad."""
        if settings.ingest_source_policy_file:
            path = Path(settings.ingest_source_policy_file)
            try:
                text = path.read_text()
            except OSError as exc:
                raise SettingsError(
                    f"invalid setting INGEST_SOURCE_POLICY_FILE={str(path)!r}: {exc.strerror}"
                ) from None
            return cls.parse(text, f"INGEST_SOURCE_POLICY_FILE={path}")
        if settings.ingest_source_policy:
            return cls.parse(settings.ingest_source_policy)
        raise SettingsError(
            "INGEST_SOURCE_POLICY (or INGEST_SOURCE_POLICY_FILE) is not set: ingest requires "
            "tokens, and needs the policy saying which caller may use which source"
        )

    def rule_for(self, claims: dict[str, Any]) -> tuple[str, _Rule] | None:
        for claim in ("sub", "azp"):
            name = claims.get(claim)
            if isinstance(name, str) and name in self.callers:
                return name, self.callers[name]
        return None

    def check(self, claims: dict[str, Any], source: str, type_: str) -> Decision:
        taken = reserved(source, type_)
        if taken:
            return Decision(False, taken[1])
        found = self.rule_for(claims)
        if found is None:
            return Decision(False, "the caller is not named in the source policy")
        name, rule = found
        if not any(fnmatchcase(source, pattern) for pattern in rule.sources):
            return Decision(False, f"caller {name} may not emit under source {source!r}")
        if rule.types is not None and not any(type_.startswith(p) for p in rule.types):
            return Decision(False, f"caller {name} may not emit events of type {type_!r}")
        return Decision(True)


def dumps_claims(claims: dict[str, Any], names: list[str]) -> str | None:
    """The `authclaims` value: the chosen claims as compact JSON, or None when none is present."""
    chosen = {n: claims[n] for n in names if n in claims}
    return json.dumps(chosen, separators=(",", ":"), sort_keys=True) if chosen else None
