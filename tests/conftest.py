"""Shared fixtures: small models exported by the project, and real servers on free ports."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cluster import RedisServer

from lstmserve.server.app import LstmServer
from lstmserve.server.config import ServerConfig

T = TypeVar("T")
CHANNEL_OPTIONS = [("grpc.so_reuseport", 0)]
# The provider the test servers use: "cpu" here and in CI; scripts/gpu_check.sh sets "cuda".
TEST_PROVIDERS = tuple(os.environ.get("LSTMSERVE_TEST_PROVIDERS", "cpu").split(","))
TEST_PROVIDER_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[TEST_PROVIDERS[0]]


class ServerThread:
    """A real `LstmServer` on a free port, running on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server = LstmServer(config)
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Runs a coroutine on the server's loop and returns its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def call_soon(self, function: Callable[[], T]) -> T:
        """Runs a plain function on the server's loop (e.g. to touch the scheduler) and returns its result."""

        async def run() -> T:
            return function()

        return self.call(run())

    def channel(self) -> grpc.Channel:
        """A new synchronous channel to the server."""
        return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def stop(self) -> None:
        """Stops the server and its loop."""
        try:
            self.call(self.server.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def start_server(model: Path, **overrides: Any) -> ServerThread:
    """Starts a server for `model` on 127.0.0.1, port 0, with config overrides."""
    config = replace(ServerConfig(model=model, port=0, intra_op_threads=1, providers=TEST_PROVIDERS), **overrides)
    return ServerThread(config)


def _export(tmp_path_factory: pytest.TempPathFactory, name: str, **overrides: Any) -> Path:
    from lstmserve.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("models") / name
    result = export_model(ExportConfig.tiny(out=out, **overrides), progress=False)
    return Path(result.onnx_path)


@pytest.fixture(scope="session")
def token_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-layer character language model, exported by `lstmserve export`."""
    return _export(tmp_path_factory, "tokens", num_layers=2)


@pytest.fixture(scope="session")
def feature_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny feature (regression) model, exported by `lstmserve export --task features`."""
    return _export(tmp_path_factory, "features", task="features")


@pytest.fixture(scope="session")
def bidirectional_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bidirectional language model (not steppable)."""
    return _export(tmp_path_factory, "bidirectional", bidirectional=True)


@pytest.fixture(scope="session")
def projected_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny language model with an LSTM projection (proj_size > 0)."""
    return _export(tmp_path_factory, "projected", proj_size=4, num_layers=2)


@pytest.fixture(scope="session")
def gru_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-layer GRU language model (one state tensor, h), exported by `lstmserve export --cell gru`."""
    return _export(tmp_path_factory, "gru", cell="gru", num_layers=2)


@pytest.fixture(scope="session")
def rnn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain-RNN feature model (one state tensor, h), exported by `lstmserve export --cell rnn`."""
    return _export(tmp_path_factory, "rnn", cell="rnn", task="features")


@pytest.fixture(scope="module")
def server(token_model: Path) -> Iterator[ServerThread]:
    """A server of the tiny token model, shared by a test module."""
    handle = start_server(token_model)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty Docker Compose --env-file: every variable takes the default the compose file gives it."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A throwaway redis-server for one test module (the session store's tests and the scale-out tests)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
