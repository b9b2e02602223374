"""Build and run tools/knative-validate, the project's check of its manifests by Knative's Go code.

The Go module pins knative.dev/serving, knative.dev/eventing and sigs.k8s.io/kustomize
(tools/knative-validate/go.mod). `go build` fetches them once per machine from the Go
module proxy into the user's module cache (`go env GOMODCACHE`), and the binary is kept
in the project's cache folder under a hash of the module's sources, so later runs
neither download nor compile. A first build on a fresh machine downloads a few hundred
megabytes, hence the long timeout; Go itself must be installed (./dev test says so).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openg2p_audit.devservices._process import cache_dir

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "tools" / "knative-validate"
BUILD_TIMEOUT = 1800  # seconds: the first download of the modules on a fresh machine
RUN_TIMEOUT = 300


def go() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if Path(p).is_file()), None
    )
    if found is None:
        pytest.fail(
            "Go is not installed: tests/test_knative_validate.py builds tools/knative-validate "
            "(install Go 1.21 or newer from https://go.dev/dl/)"
        )
    return found


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(MODULE.glob("*")):
        if path.suffix == ".go" or path.name in ("go.mod", "go.sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def binary() -> Path:
    """The built tool, from the cache when its sources have not changed."""
    target = cache_dir() / "knative-validate" / _sources_digest() / "knative-validate"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    done = subprocess.run(
        [go(), "build", "-trimpath", "-o", str(partial), "."],
        cwd=MODULE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"building tools/knative-validate failed:\n{done.stderr[-4000:]}")
    partial.replace(target)  # atomic: a concurrent build elsewhere finds a whole binary
    return target


def validate(*paths: Path | str, serving_features: dict[str, str] | None = None) -> Report:
    """Run the tool over kustomization directories or YAML files; its exit status and report."""
    args = [str(binary())]
    if serving_features:
        args += ["-serving-features", ",".join(f"{k}={v}" for k, v in serving_features.items())]
    done = subprocess.run(
        [*args, *map(str, paths)], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert done.returncode in (0, 1), f"knative-validate failed ({done.returncode}):\n{done.stderr}"
    return Report(done.returncode, json.loads(done.stdout))


class Report:
    """The tool's JSON report, with the lookups the tests need."""

    def __init__(self, status: int, doc: dict[str, Any]):
        self.status = status
        self.doc = doc

    def objects(self, path: Path | str | None = None) -> list[dict[str, Any]]:
        return [
            obj
            for entry in self.doc["inputs"]
            if path is None or entry["path"] == str(path)
            for obj in entry["objects"]
        ]

    def one(self, kind: str, name: str, path: Path | str | None = None) -> dict[str, Any]:
        found = [o for o in self.objects(path) if o["kind"] == kind and o["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def refusals(self) -> dict[str, list[str]]:
        """`path Kind/name` -> every error Knative's code gave, over every context."""
        out: dict[str, list[str]] = {}
        for entry in self.doc["inputs"]:
            where = entry["path"]
            if entry.get("error"):
                out[where] = [entry["error"]]
            for obj in entry["objects"]:
                errors = list(obj["decode"])
                errors += [
                    f"[{c['context']}] {e}"
                    for c in obj["checks"]
                    if not c.get("expected")
                    for e in c["errors"]
                ]
                if obj["checked"] == "none":
                    errors.append(obj["why"])
                if errors:
                    out[f"{where} {obj['kind']}/{obj['name']}"] = errors
        return out
