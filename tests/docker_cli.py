"""A real Docker engine in tests: whether one answers, and `docker compose` on a project of the test's own.

Used by tests/test_containers_run.py. The engine is the machine's (`bash scripts/docker_engine.sh start`
installs and starts one, and builds the base image); nothing here starts or stops it. Nothing is pulled:
every image is built on the base image LSTMSERVE_BASE_IMAGE (default local/debian:bookworm, built from
Debian's packages by scripts/docker_base_image.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from compose_cli import clean_environ

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
LOCAL_BASE_IMAGE = "local/debian:bookworm"
# The Compose projects the container tests name (tests/test_containers_run.py), a process id after each.
TEST_PROJECT_PREFIXES = ("lstmserve-test-", "lstmserve-scale-test-")
START_HINT = "`bash scripts/docker_engine.sh start` installs and starts one (root, Debian)"
# The torch wheel the export image installs without a download (docker/export.Dockerfile): the `export`
# extra's torch, CPU build, for the base image's Python (Debian 12: CPython 3.11).
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-cp311-*.whl"
# Docker Compose's `!reset` and `!override` need 2.24.
OLDEST_COMPOSE = (2, 24)
# Where the docker CLI finds the engine: kept from the caller's environment (a rootless engine, a context).
ENGINE_VARIABLES = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


def unavailable(what: str) -> NoReturn:
    """Skips the test, or fails it under CI=true (.ci/run starts an engine, so CI must run these tests)."""
    if IN_CI:
        pytest.fail(f"{what}; CI must run the container tests (.ci/run starts the engine)")
    pytest.skip(what)


def docker(*args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Runs the docker CLI; with `check`, fails the test (with its output) on a non-zero exit."""
    environ = clean_environ()
    environ.update({k: os.environ[k] for k in ENGINE_VARIABLES if k in os.environ})
    environ.update(env or {})
    result = subprocess.run(["docker", *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def base_image() -> str:
    return os.environ.get("LSTMSERVE_BASE_IMAGE") or LOCAL_BASE_IMAGE


def require_engine() -> None:
    """Skips (fails under CI) unless a Docker engine, Compose v2.24+ and the base image are there."""
    if shutil.which("docker") is None:
        unavailable(f"no docker command; {START_HINT}")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers (docker info: {info.stderr.strip()[:200]}); {START_HINT}")
    version = docker("compose", "version", "--short", check=False, timeout=30)
    match = re.match(r"v?(\d+)\.(\d+)", version.stdout.strip())
    if version.returncode != 0 or match is None:
        unavailable(f"no Docker Compose v2 plugin (`docker compose version`: {version.stderr.strip()[:200]}); {START_HINT}")
    if (int(match.group(1)), int(match.group(2))) < OLDEST_COMPOSE:
        unavailable(f"Docker Compose {version.stdout.strip()} is older than 2.24")
    if docker("image", "inspect", base_image(), check=False, timeout=30).returncode != 0:
        unavailable(f"the engine has no base image {base_image()} (never pulled): `bash scripts/docker_base_image.sh` builds it")


def pip_find_links() -> list[Path]:
    """The folders that this machine's pip configuration names as find-links."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    folders: list[Path] = []
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += [Path(v) for v in value.strip().strip("'\"").split() if not v.startswith(("http:", "https:"))]
    return folders


def torch_wheels_context(folder: Path) -> Path:
    """`folder`, holding a link to (or copy of) the local torch wheel, for the export image's `wheels`
    build context; the repository's empty docker/wheels (torch then downloaded) when none is found."""
    candidates = [Path(os.environ["LSTMSERVE_WHEELS_DIR"])] if os.environ.get("LSTMSERVE_WHEELS_DIR") else []
    candidates += pip_find_links()
    for candidate in candidates:
        wheels = sorted(candidate.glob(TORCH_WHEEL_GLOB)) if candidate.is_dir() else []
        if wheels:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / wheels[-1].name
            if not target.exists():
                try:
                    os.link(wheels[-1], target)
                except OSError:
                    shutil.copyfile(wheels[-1], target)
            return folder
    return ROOT / "docker" / "wheels"


@dataclass
class Compose:
    """`docker compose -p PROJECT -f FILE...` run from the repository root, as the docs do, with `env` as
    the settings (what a user's shell or .env would give); the project is the test's own. `env_file` stands
    in for the repository's .env, so a developer's own .env never changes what the tests run."""

    project: str
    files: tuple[str, ...]
    env_file: Path
    env: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        words = ["compose", "-p", self.project, "--env-file", str(self.env_file)]
        for name in self.files:
            words += ["-f", name]
        return [*words, *args]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return docker(*self.command(*args), timeout=timeout, check=check, env=self.env)

    def containers(self, service: str) -> list[dict[str, Any]]:
        """`docker compose ps --all --format json` rows of `service` (running or not), by replica number."""
        output = self("ps", "--all", "--format", "json", service).stdout.strip()
        if output.startswith("["):
            rows = json.loads(output)
        else:  # one JSON object per line (Compose 2.21 and newer)
            rows = [json.loads(line) for line in output.splitlines() if line.strip()]
        return sorted(rows, key=lambda row: int(row.get("Name", "").rsplit("-", 1)[-1] or 0))

    def inspect(self, container: str, template: str) -> str:
        return docker("inspect", "--format", template, container, timeout=30).stdout.strip()

    def down(self) -> None:
        """Removes the project's containers, networks and volumes (its images stay: the build cache)."""
        self("down", "--volumes", "--remove-orphans", "--timeout", "30", timeout=180, check=False)


def remove_replaced_test_images() -> None:
    """Removes the images an earlier test run built and a later build replaced (dangling: their tags moved on).

    Each run of the container tests rebuilds the same tags; the images they replace hold about 1.9 GB a
    run and nothing ever uses them again. Only dangling images that Compose built for a test project
    (its label names it) are removed: a user's own images, and the tagged images, stay."""
    listed = docker("images", "--quiet", "--no-trunc", "--filter", "dangling=true",
                    "--filter", "label=com.docker.compose.project", timeout=60, check=False)
    for image in sorted(set(listed.stdout.split())):
        project = docker("image", "inspect", "--format", '{{index .Config.Labels "com.docker.compose.project"}}',
                         image, timeout=30, check=False).stdout.strip()
        if project.startswith(TEST_PROJECT_PREFIXES):
            docker("image", "rm", image, timeout=120, check=False)
