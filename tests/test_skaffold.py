"""skaffold.yaml, checked without skaffold, Docker or a cluster.

Skaffold publishes a JSON schema per config version (v4beta14 for skaffold
2.19), but no package registry reachable here ships it, so the test cannot load
the published file. SKAFFOLD_SUBSET below is written by hand from the
published v4beta14 definitions, for exactly the fields this project uses, with
the same `additionalProperties: false` the published schema has: a misspelt
or misplaced key fails here as `skaffold diagnose` would fail on it. Beyond
the schema, the test checks what skaffold would only find at run time: the
Dockerfile targets exist, every image the manifests run is built, and each
profile's kustomization renders.
"""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from manifest_checks import KNATIVE, REPO, render, stages

CONFIG = yaml.safe_load((REPO / "skaffold.yaml").read_text())
API_VERSION = "skaffold/v4beta14"


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STRINGS = {"type": "array", "items": {"type": "string"}}
_EMPTY = _obj({})
_DOCKER_ARTIFACT = _obj({"dockerfile": {"type": "string"}, "target": {"type": "string"}})
_ARTIFACT = _obj(
    {"image": {"type": "string"}, "context": {"type": "string"}, "docker": _DOCKER_ARTIFACT},
    required=("image",),
)
_GIT_TAGGER = _obj(
    {
        "variant": {"enum": ["Tags", "CommitSha", "AbbrevCommitSha", "TreeSha", "AbbrevTreeSha"]},
        "prefix": {"type": "string"},
        "ignoreChanges": {"type": "boolean"},
    }
)
_BUILD = _obj(
    {
        "artifacts": {"type": "array", "items": _ARTIFACT},
        "tagPolicy": _obj({"inputDigest": _EMPTY, "gitCommit": _GIT_TAGGER, "sha256": _EMPTY}),
        "local": _obj(
            {
                "push": {"type": "boolean"},
                "useBuildkit": {"type": "boolean"},
                "concurrency": {"type": "integer"},
            }
        ),
    }
)
_MANIFESTS = _obj({"kustomize": _obj({"paths": _STRINGS, "buildArgs": _STRINGS})})
_DEPLOY = _obj(
    {
        "kubectl": _obj(
            {
                "defaultNamespace": {"type": "string"},
                "flags": _obj({"global": _STRINGS, "apply": _STRINGS, "delete": _STRINGS}),
            }
        ),
        "statusCheck": {"type": "boolean"},
    }
)
_ACTIVATION = _obj(
    {"env": {"type": "string"}, "kubeContext": {"type": "string"}, "command": {"type": "string"}}
)
_PROFILE = _obj(
    {
        "name": {"type": "string"},
        "activation": {"type": "array", "items": _ACTIVATION},
        "build": _BUILD,
        "manifests": _MANIFESTS,
        "deploy": _DEPLOY,
    },
    required=("name",),
)
SKAFFOLD_SUBSET = _obj(
    {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "Config"},
        "metadata": _obj({"name": {"type": "string"}}),
        "build": _BUILD,
        "manifests": _MANIFESTS,
        "deploy": _DEPLOY,
        "profiles": {"type": "array", "items": _PROFILE},
    },
    required=("apiVersion", "kind"),
)


def _errors(config: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SKAFFOLD_SUBSET)
    return [
        f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def _profile(name: str) -> dict:
    found = [p for p in CONFIG["profiles"] if p["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_config_uses_the_current_schema_version_and_passes_it():
    assert CONFIG["apiVersion"] == API_VERSION
    assert _errors(CONFIG) == []


def test_schema_check_rejects_unknown_and_misplaced_keys():
    config = copy.deepcopy(CONFIG)
    config["build"]["artifacts"][0]["docker"]["targets"] = "ingest"
    config["profiles"][0]["kustomize"] = {"paths": ["x"]}
    config["apiVersion"] = "skaffold/v2beta29"
    errors = _errors(config)
    assert any("artifacts.0.docker" in e and "'targets' was unexpected" in e for e in errors)
    assert any("profiles.0" in e and "'kustomize' was unexpected" in e for e in errors)
    assert any(e.startswith("apiVersion:") for e in errors)
    assert len(errors) == 3


def test_builds_each_function_image_from_its_dockerfile_target():
    targets = set(stages())
    for artifact in CONFIG["build"]["artifacts"]:
        assert artifact["context"] == "."
        assert (REPO / artifact["docker"]["dockerfile"]).is_file()
        assert artifact["docker"]["target"] in targets


@pytest.mark.parametrize("overlay", ["overlays/quiet", "overlays/production"])
def test_every_image_the_manifests_run_is_built(overlay):
    built = {a["image"] for a in CONFIG["build"]["artifacts"]}
    used = {
        container["image"]
        for obj in render(overlay)
        if obj["kind"] in ("Service", "Job")  # the Knative Services and the topics Job
        for container in obj["spec"]["template"]["spec"]["containers"]
    }
    assert used == built


def test_deploys_the_kustomization_with_kubectl():
    assert "kubectl" in CONFIG["deploy"]
    assert CONFIG["manifests"]["kustomize"]["paths"] == ["knative/overlays/quiet"]


@pytest.mark.parametrize(
    "profile,overlay",
    [("dev", "knative/overlays/quiet"), ("prod", "knative/overlays/production")],
)
def test_profiles_pick_their_overlay(profile, overlay):
    paths = _profile(profile)["manifests"]["kustomize"]["paths"]
    assert paths == [overlay]
    assert (REPO / overlay / "kustomization.yaml").is_file()
    assert render(str((REPO / overlay).relative_to(KNATIVE)))


def test_dev_profile_is_what_skaffold_dev_uses():
    assert _profile("dev")["activation"] == [{"command": "dev"}]


def test_prod_profile_pushes_images():
    assert _profile("prod")["build"]["local"]["push"] is True
