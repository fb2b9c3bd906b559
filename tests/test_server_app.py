"""The server as users run it: health, reflection, metrics, the CLI, SIGTERM drain, env configuration."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ServerThread, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import SyncStream, serve_process

from lstmserve.cli import main
from lstmserve.server.config import ConfigError, ServerConfig
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


def _health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_reflection_and_metrics(token_model: Path) -> None:
    handle = start_server(token_model, metrics_port=0)
    try:
        with handle.channel() as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert _health(channel, "lstmserve.v1.LstmServe") == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            services = {s.name for s in answers[0].list_services_response.service}
            assert {"lstmserve.v1.LstmServe", "grpc.health.v1.Health"} <= services
            stream = SyncStream(channel)
            stream.request(tokens=[1, 2, 3])
            with pytest.raises(grpc.RpcError):
                stream.request(tokens=[10_000])
        url = f"http://127.0.0.1:{handle.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert re.search(r"^lstmserve_active_sessions 1\.0$", text, re.M)
        assert re.search(r"^lstmserve_tokens_total 3\.0$", text, re.M)
        assert re.search(r'^lstmserve_errors_total\{code="INVALID_ARGUMENT"\} 1\.0$', text, re.M)
        assert "lstmserve_batch_size_bucket" in text and "lstmserve_step_latency_seconds_bucket" in text
    finally:
        handle.stop()


def test_drain_reports_not_serving_and_refuses_new_sessions(token_model: Path) -> None:
    handle = start_server(token_model)
    try:
        with handle.channel() as channel:
            stream = SyncStream(channel)
            opened = stream.request(tokens=[1])
            server, scheduler = handle.server, handle.server.scheduler
            assert scheduler is not None
            handle.call(server.health.enter_graceful_shutdown())
            handle.call_soon(scheduler.stop_accepting)
            assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.LstmServeStub(channel).CreateSession(pb.CreateSessionRequest())
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert stream.request(tokens=[2]).step == 2  # existing sessions still step
            assert opened.session_id
    finally:
        handle.stop()


def test_health_of_an_unknown_service_names_it(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    """grpc.health.v1 answers NOT_FOUND with no message: the command's error said only "NOT_FOUND: "."""
    assert main(["health", "--target", server.address, "--service", "nope"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "lstmserve health: error: NOT_FOUND: the server's health service knows no service 'nope'"


def test_cli_serve_drains_on_sigterm(token_model: Path) -> None:
    process, address = serve_process(token_model, "--grace-s", "5", env={"LSTMSERVE_MAX_SESSIONS": "3"})
    try:
        with grpc.insecure_channel(address, options=[("grpc.so_reuseport", 0)]) as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            info = pb_grpc.LstmServeStub(channel).GetModelInfo(pb.GetModelInfoRequest())
            assert info.max_sessions == 3  # from the environment variable
            assert SyncStream(channel).request(tokens=[1, 2]).step == 2
        assert main(["health", "--target", address]) == 0
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 6
    finally:
        if process.poll() is None:
            process.kill()
    assert main(["health", "--target", address, "--timeout", "0.5"]) == 1


def _serve_error(*args: str, env: dict[str, str] | None = None) -> str:
    """Runs `lstmserve serve ARGS`, which must fail at start with exit status 2 and one line, no traceback;
    returns that line."""
    result = subprocess.run(
        [LSTMSERVE, "serve", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )
    ours = [line for line in result.stderr.splitlines() if line.startswith("lstmserve serve: error:") or "usage:" in line]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert ours, result.stderr
    return ours[-1]


def test_cli_serve_errors(tmp_path: Path, token_model: Path) -> None:
    assert "none.onnx" in _serve_error("--model", str(tmp_path / "none.onnx"))
    assert "holds no model.onnx" in _serve_error("--model", str(tmp_path))
    assert "max_batch_size must be at least 1, got 0" in _serve_error("--model", str(token_model), "--max-batch-size", "0")
    assert "idle_spin_us must be in 0..100000, got -5" in _serve_error("--model", str(token_model), "--idle-spin-us", "-5")
    assert "LSTMSERVE_PORT='eighty'" in _serve_error("--model", str(token_model), env={"LSTMSERVE_PORT": "eighty"})
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an ONNX model")
    assert "corrupt.onnx" in _serve_error("--model", str(corrupt))
    assert "LOUD" in _serve_error("--model", str(token_model), "--log-level", "LOUD")
    assert "cuda" in _serve_error("--model", str(token_model), "--providers", "cuda").lower()
    # NaN passed every `< 0` check: the server started, then its drain raised and lost the sessions.
    line = _serve_error("--model", str(token_model), "--max-message-bytes", "10")
    assert "max_message_bytes 10 is less than a one-position answer of this model" in line
    line = _serve_error("--model", str(token_model), "--grace-s", "nan")
    assert "grace_s must be a number of seconds in 0..315,360,000, got nan" in line


@pytest.mark.parametrize("name", ["session_ttl_s", "grace_s", "checkpoint_interval_s", "drain_delay_s"])
@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0, 4e8])
def test_durations_must_be_finite_seconds(name: str, seconds: float) -> None:
    """A drain delay of infinity never ends the drain, a TTL of NaN stops the batching loop: all refused at start."""
    with pytest.raises(ConfigError, match=f"{name} must be a number of seconds in 0..315,360,000, got {seconds}"):
        settings: dict[str, Any] = {name: seconds}
        ServerConfig(model=Path("m.onnx"), state_dir=Path("state"), **settings)


def test_ports_in_use_are_one_line_naming_the_address_and_the_port(token_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = _serve_error("--model", str(token_model), "--port", port)
        assert f"cannot listen on 127.0.0.1:{port}, the gRPC port (--port): Address already in use" in line
        line = _serve_error("--model", str(token_model), "--port", "0", "--metrics-port", port)
        assert f"cannot listen on 127.0.0.1:{port}, the metrics port (--metrics-port): " in line
        assert "Address already in use" in line


def test_serve_takes_the_model_folder(token_model: Path) -> None:
    process, address = serve_process(token_model.parent)
    try:
        with grpc.insecure_channel(address, options=[("grpc.so_reuseport", 0)]) as channel:
            assert SyncStream(channel).request(tokens=[1, 2]).step == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_help_lists_every_option() -> None:
    result = subprocess.run([LSTMSERVE, "serve", "--help"], capture_output=True, text=True)
    assert "default: None" not in result.stdout and "default: )" not in result.stdout
    for flag in ("--model", "--port", "--max-batch-size", "--max-wait-us", "--idle-spin-us", "--max-sessions", "--session-ttl-s",
                 "--providers", "--intra-op-threads", "--metrics-port", "LSTMSERVE_MAX_SESSIONS"):
        assert flag in result.stdout
