"""The images built and the compose files run on a real Docker engine.

Skipped, with the reason, when no engine answers (`bash scripts/docker_engine.sh start` starts one; .ci/run
does, and under CI=true these tests fail instead of skipping). Nothing is pulled: every image is built on the
base image LSTMSERVE_BASE_IMAGE (default local/debian:bookworm, scripts/docker_base_image.sh), and the export
image takes torch from the machine's local wheel (tests/docker_cli.py finds it through pip's configuration).

- The README's compose command (CPU variant, with the export one-shot) builds both images and serves; the
  Python client on the host streams a generation and steps, checked against ONNX Runtime on the exported
  model; `docker compose down` sends SIGTERM, the drain writes every session into the `state` volume, and
  `up` again restores them all (read back through the client).
- The scale-out file (deploy/compose/docker-compose.scale.yml + its CPU override): three replicas behind
  Envoy with Redis, every image built here; sessions stepping through Envoy while one replica is stopped
  (SIGTERM: it drains into Redis) lose no step and compute the same logits as ONNX Runtime.
- The images run as non-root users, and the server image has no torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import pytest
from docker_cli import Compose, base_image, docker, remove_replaced_test_images, require_engine, torch_wheels_context
from helpers import model_spec, wait_until

from lstmserve.client import Client, RetryPolicy, Session

ROOT = Path(__file__).resolve().parents[1]
CPU = ("docker-compose.yml", "docker-compose.cpu.yml")
SCALE_CPU = ("deploy/compose/docker-compose.scale.yml", "deploy/compose/docker-compose.scale.cpu.yml")
# A model in seconds (the default one trains for minutes).
TINY_EXPORT_ARGS = "--preset tiny --steps 20"
# Logits from the server (batched, stepwise) and from ONNX Runtime here (whole sequence) agree this closely.
TOLERANCE = 1e-4
# A build from nothing (no layer cache) on 2 busy cores, packages downloaded from PyPI.
BUILD_TIMEOUT_S = 1800
HEALTHY_TIMEOUT_S = 180
# The unprivileged users the images run as.
IMAGE_USERS = {"server": "10001:10001", "export": "10001:10001", "envoy": "10101:10101", "redis": "redis"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """What a user sets in .env here: the local base image, the local torch wheel, a tiny model. Afterwards,
    the images this module's builds replaced are removed (about 1.9 GB a run otherwise stays on the disk)."""
    require_engine()
    yield {
        "LSTMSERVE_BASE_IMAGE": base_image(),
        "LSTMSERVE_WHEELS_DIR": str(torch_wheels_context(tmp_path_factory.mktemp("wheels"))),
        "LSTMSERVE_EXPORT_ARGS": TINY_EXPORT_ARGS,
    }
    remove_replaced_test_images()


def readme_compose_command() -> list[str]:
    """The README's command that builds and starts the CPU variant, as words."""
    text = (ROOT / "README.md").read_text()
    [line] = [x.strip() for x in text.splitlines()
              if x.strip().startswith("docker compose -f docker-compose.yml -f docker-compose.cpu.yml up")]
    words = shlex.split(line.split("#", 1)[0])
    assert words[:2] == ["docker", "compose"]
    return words[2:]


def stack(project: str, files: tuple[str, ...], env: dict[str, str], folder: Path) -> Iterator[Compose]:
    env_file = folder / "empty.env"
    env_file.write_text("")
    compose = Compose(project, files, env_file, env)
    try:
        yield compose
    finally:
        # Shown with the test's output when it failed.
        print(compose("logs", "--no-color", "--tail", "60", check=False, timeout=60).stdout)
        compose.down()


@pytest.fixture
def single(settings: dict[str, str], tmp_path: Path) -> Iterator[Compose]:
    env = {**settings, "LSTMSERVE_PORT": str(free_port()), "LSTMSERVE_METRICS_PORT": str(free_port())}
    yield from stack(f"lstmserve-test-{os.getpid()}", CPU, env, tmp_path)


@pytest.fixture
def scaled(settings: dict[str, str], tmp_path: Path) -> Iterator[Compose]:
    env = {**settings, "LSTMSERVE_PROXY_PORT": str(free_port()), "LSTMSERVE_ENVOY_ADMIN_PORT": str(free_port())}
    yield from stack(f"lstmserve-scale-test-{os.getpid()}", SCALE_CPU, env, tmp_path)


def wait_healthy(compose: Compose, service: str, replicas: int = 1) -> list[str]:
    """The names of the service's containers once all `replicas` report healthy; fails if one exits."""

    def healthy() -> list[str] | None:
        names = [row["Name"] for row in compose.containers(service)]
        states = [compose.inspect(n, "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}") for n in names]
        for name, state in zip(names, states):
            assert not state.startswith(("exited", "dead")), f"{name} stopped: {state}"
        return names if len(names) == replicas and all(s == "running healthy" for s in states) else None

    return wait_until(healthy, HEALTHY_TIMEOUT_S, f"{replicas} healthy {service} container(s)", interval=1)


def images(compose: Compose) -> dict[str, str]:
    """Service name -> image name, from the resolved compose configuration."""
    config = json.loads(compose("config", "--format", "json").stdout)
    return {name: service["image"] for name, service in config["services"].items()}


def check_images_are_unprivileged(compose: Compose) -> None:
    for service, image in images(compose).items():
        user = docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user == IMAGE_USERS[service], (image, user)


def copy_model(compose: Compose, container: str, folder: Path) -> Path:
    """The model the export service wrote into the `models` volume, copied out of a container."""
    target = folder / "model.onnx"
    docker("cp", f"{container}:/models/default/model.onnx", str(target))
    return target


class Reference:
    """ONNX Runtime on the exported model, here on the host: whole sequences from zero state."""

    def __init__(self, model: Path) -> None:
        self.spec = model_spec(model)
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [positions, output_size]."""
        spec = self.spec
        ids = np.asarray(tokens, np.int64)
        feeds = {spec.input_name: ids[:, np.newaxis] if spec.time_major else ids[np.newaxis, :]}
        for state in spec.states:
            feeds[state.input_name] = np.zeros((spec.state_rows, 1, state.width), np.float32)
        [out] = self.session.run([spec.output_name], feeds)
        return out[:, 0] if spec.time_major else out[0]

    def check_steps(self, history: list[int], stepped: list[np.ndarray]) -> None:
        """`stepped[i]` is the server's logits for the last len(stepped) positions of `history`, in order."""
        whole = self.logits(history)
        got = np.concatenate(stepped)
        np.testing.assert_allclose(got, whole[len(history) - len(got):], rtol=0, atol=TOLERANCE)


def vocabulary_size(client: Client) -> int:
    return len(client.model_info().vocabulary)


# ----------------------------------------------------------------------------------------------
# The README's command: one server, its drain into the state volume, and the restart that restores it


def test_readme_compose_command_serves_drains_and_restores(single: Compose, tmp_path: Path) -> None:
    compose = single
    compose(*readme_compose_command(), timeout=BUILD_TIMEOUT_S)
    [server] = wait_healthy(compose, "server")
    [export] = compose.containers("export")
    assert compose.inspect(export["Name"], "{{.State.ExitCode}}") == "0"
    assert "exported: /models/default/model.onnx" in compose("logs", "--no-color", "export").stdout

    # Non-root images, and the processes in them; Docker's init as PID 1 forwards SIGTERM to the server.
    check_images_are_unprivileged(compose)
    assert compose("exec", "-T", "server", "id", "-u").stdout.strip() == "10001"
    assert compose("exec", "-T", "server", "cat", "/proc/1/comm").stdout.strip() == "docker-init"
    # The server image has ONNX Runtime and no torch.
    found = docker("run", "--rm", "--entrypoint", "python3", images(compose)["server"], "-c",
                   "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)")
    assert found.stdout.split() == ["True", "True"]
    # Sessions are written only by the drain here (no checkpoint interval), so a restored session proves the drain.
    environment = compose.inspect(server, "{{json .Config.Env}}")
    assert "LSTMSERVE_STATE_DIR=/state" in json.loads(environment)
    assert not any(v.startswith("LSTMSERVE_CHECKPOINT_INTERVAL_S=") for v in json.loads(environment))

    reference = Reference(copy_model(compose, server, tmp_path))
    target = f"127.0.0.1:{compose.env['LSTMSERVE_PORT']}"
    histories: dict[str, list[int]] = {}
    with Client(target, timeout=30) as client:
        size = vocabulary_size(client)
        # A greedy generation, streamed token by token: each token is the best one by ONNX Runtime's logits.
        prompt = [1 % size, 5 % size, 9 % size]
        session = client.session()
        generated = [item.token for item in session.generate(prompt, max_tokens=12, temperature=0.0)]
        assert len(generated) == 12
        history = prompt + generated
        whole = reference.logits(history)
        for i, token in enumerate(generated):
            row = whole[len(prompt) - 1 + i]
            assert row[token] >= row.max() - TOLERANCE, (i, token, int(row.argmax()))
        # A few steps after it: the state carried on from the generation.
        stepped: list[np.ndarray] = []
        for token in (2, 3, 4):
            out = session.step([token % size])
            assert out.logits is not None
            stepped.append(out.logits)
            history.append(token % size)
        reference.check_steps(history, stepped)
        histories[session.id] = history
        session.detach()
        # Two more sessions, of other lengths.
        for length in (1, 7):
            other = client.session()
            tokens = [(3 * i + length) % size for i in range(length)]
            out = other.step(tokens)
            assert out.logits is not None
            reference.check_steps(tokens, [out.logits])
            histories[other.id] = tokens
            other.detach()

    # SIGTERM through `docker compose down`: the server drains into the state volume, which `down` keeps.
    compose("down", timeout=180)
    assert compose.containers("server") == []
    compose(*readme_compose_command(), timeout=BUILD_TIMEOUT_S)
    [server] = wait_healthy(compose, "server")
    assert "model already exported" in compose("logs", "--no-color", "export").stdout
    with Client(target, timeout=30) as client:
        for session_id, history in histories.items():
            with client.session(resume=session_id) as resumed:
                assert resumed.info().step == len(history)
                token = 6 % size
                out = resumed.step([token])
                assert out.logits is not None
                reference.check_steps(history + [token], [out.logits])


# ----------------------------------------------------------------------------------------------
# Scale-out: three replicas behind Envoy with Redis, one stopped while sessions step


def metric(container: str, name: str) -> float:
    """A metric of one replica, read inside its container (replicas publish no ports)."""
    script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=10).read().decode())"
    text = docker("exec", container, "python3", "-c", script, timeout=60).stdout
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in {container}'s metrics"
    return float(match.group(1))


def envoy_healthy_endpoints(admin_port: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=10) as response:
        text = response.read().decode()
    return len(re.findall(r"^lstmserve::[\d.]+:50051::health_flags::healthy$", text, re.MULTILINE))


class Stepper(threading.Thread):
    """Steps one session one token at a time, recording what it sent and got back: until `stopped` is set
    (or BEFORE_STOP_CAP steps), then AFTER_STOP more steps, which all run once the replica has exited."""

    def __init__(self, session: Session, seed: int, size: int, stopped: threading.Event) -> None:
        super().__init__(name=f"stepper-{seed}")
        self.session, self.seed, self.size, self.stopped = session, seed, size, stopped
        self.sent: list[int] = []
        self.logits: list[np.ndarray] = []
        self.steps_after_stop = 0
        self.started_stepping = threading.Event()
        self.error: BaseException | None = None

    def step(self) -> None:
        token = (11 * self.seed + 3 * len(self.sent)) % self.size
        out = self.session.step([token])
        assert out.logits is not None
        self.logits.append(out.logits)
        self.sent.append(token)

    def run(self) -> None:
        try:
            while not self.stopped.is_set() and len(self.sent) < BEFORE_STOP_CAP:
                self.step()
                if len(self.sent) == 3:
                    self.started_stepping.set()
            self.stopped.wait()
            for _ in range(AFTER_STOP):
                self.step()
                self.steps_after_stop += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
        finally:
            self.started_stepping.set()


# Each session steps until the replica has exited (at most this many steps), then this many more.
BEFORE_STOP_CAP = 1500
AFTER_STOP = 10


def test_scaled_out_replica_stop_loses_no_session(scaled: Compose, tmp_path: Path) -> None:
    compose = scaled
    compose("up", "-d", "--build", "--scale", "server=3", timeout=BUILD_TIMEOUT_S)
    replicas = wait_healthy(compose, "server", replicas=3)
    check_images_are_unprivileged(compose)
    admin = compose.env["LSTMSERVE_ENVOY_ADMIN_PORT"]
    wait_until(lambda: envoy_healthy_endpoints(admin) == 3, HEALTHY_TIMEOUT_S, "Envoy to see 3 healthy replicas", interval=1)

    reference = Reference(copy_model(compose, replicas[0], tmp_path))
    target = f"127.0.0.1:{compose.env['LSTMSERVE_PROXY_PORT']}"
    with Client(target, timeout=30, retry=RetryPolicy(max_attempts=12)) as client:
        size = vocabulary_size(client)
        sessions = [client.session() for _ in range(6)]
        first = {s.id: [(7 * i) % size] for i, s in enumerate(sessions)}
        first_logits = {s.id: cast("np.ndarray", s.step(first[s.id]).logits) for s in sessions}
        # The replica holding the most sessions (at least 2 of 6 on one of 3) is the one stopped.
        held = {name: metric(name, "lstmserve_active_sessions") for name in replicas}
        assert sum(held.values()) == len(sessions), held
        victim = max(replicas, key=lambda name: held[name])
        assert held[victim] >= 2

        # Every session steps while the replica is stopped, and again once it has exited.
        stopped = threading.Event()
        steppers = [Stepper(session, i, size, stopped) for i, session in enumerate(sessions)]
        for stepper in steppers:
            stepper.start()
        for stepper in steppers:
            assert stepper.started_stepping.wait(120), "a session did not step"
        # `docker compose stop` stops every replica of a service: one replica is stopped as it would stop
        # one (SIGTERM, then SIGKILL after the container's stop timeout, compose's stop_grace_period).
        try:
            docker("stop", victim, timeout=120)
        finally:
            stopped.set()
            for stepper in steppers:
                stepper.join(300)
        assert not any(stepper.is_alive() for stepper in steppers)
        assert [s.error for s in steppers if s.error] == []
        assert compose.inspect(victim, "{{.State.Running}} {{.State.ExitCode}}") == "false 0"  # drained, not killed

        survivors = [name for name in replicas if name != victim]
        for session, stepper in zip(sessions, steppers):
            assert stepper.steps_after_stop == AFTER_STOP
            history = first[session.id] + stepper.sent
            assert session.info().step == len(history)  # no acknowledged step lost, none applied twice
            reference.check_steps(history, [first_logits[session.id], *stepper.logits])
        # The victim's sessions live on the two other replicas now.
        assert sum(metric(name, "lstmserve_active_sessions") for name in survivors) == len(sessions)
