"""Test helpers: raw protobuf stepping over a real channel, and the PyTorch reference."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypedDict

import grpc
import numpy as np
import pytest

from lstmserve.metadata import METADATA_KEY, ModelSpec
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [("grpc.so_reuseport", 0)]


class Tolerance(TypedDict):
    """The `rtol` and `atol` of `np.testing.assert_allclose`, passed as `**tolerance`."""

    rtol: float
    atol: float


def logits_of(response: pb.StepResponse) -> np.ndarray:
    """The logits of a response as a float32 array [positions, output_size]."""
    return np.frombuffer(response.logits.data, dtype="<f4").reshape(tuple(response.logits.shape))


def features_tensor(array: np.ndarray) -> pb.Tensor:
    """A float32 array as a Tensor message."""
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=array.shape, data=array.tobytes())


class AsyncStream:
    """One Step stream on a grpc.aio channel: send a request, read its response."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = pb_grpc.LstmServeStub(channel).Step()

    async def request(self, **fields: object) -> pb.StepResponse:
        await self.call.write(pb.StepRequest(**fields))  # type: ignore[arg-type]
        return await self.call.read()

    async def close(self) -> None:
        await self.call.done_writing()


class SyncStream:
    """One Step stream on a synchronous channel, driven request by request."""

    def __init__(self, channel: grpc.Channel) -> None:
        import queue

        self._queue: queue.Queue[pb.StepRequest | None] = queue.Queue()
        self._responses = pb_grpc.LstmServeStub(channel).Step(iter(self._queue.get, None))

    def request(self, **fields: object) -> pb.StepResponse:
        self._queue.put(pb.StepRequest(**fields))  # type: ignore[arg-type]
        return next(self._responses)

    def send(self, **fields: object) -> None:
        self._queue.put(pb.StepRequest(**fields))  # type: ignore[arg-type]

    def read(self) -> pb.StepResponse:
        return next(self._responses)

    def cancel(self) -> None:
        self._responses.cancel()

    def close(self) -> None:
        self._queue.put(None)


def bearer(key: str) -> list[tuple[str, str]]:
    """Call metadata carrying an API key."""
    return [("authorization", f"Bearer {key}")]


def new_sessions(stub: pb_grpc.LstmServeStub, count: int, metadata: list[tuple[str, str]] | None = None) -> list[str]:
    """The ids of `count` new sessions."""
    return [stub.CreateSession(pb.CreateSessionRequest(), metadata=metadata).session_id for _ in range(count)]


def step_of(stub: pb_grpc.LstmServeStub, session_id: str, metadata: list[tuple[str, str]] | None = None) -> int:
    """A session's step counter, as GetSession reports it."""
    return stub.GetSession(pb.SessionRef(session_id=session_id), metadata=metadata).step


def step_alone(channel: grpc.Channel, session_id: str, **fields: object) -> pb.StepResponse:
    """One request of `session_id` on a Step stream of its own."""
    stream = SyncStream(channel)
    try:
        return stream.request(session_id=session_id, **fields)
    finally:
        stream.close()


def reference_logits(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Whole-sequence logits [positions, output_size] from the exported PyTorch checkpoint, zero state."""
    import torch

    from lstmserve.export import load_checkpoint

    module = load_checkpoint(model_path.parent / "model.pt")
    spec = model_spec(model_path)
    with torch.no_grad():
        batch = torch.from_numpy(np.asarray(inputs)[np.newaxis])
        state = [torch.zeros(spec.state_rows, 1, s.width) for s in spec.states]
        logits = module(batch, *state)[0]
    return logits[0].numpy()


def model_spec(model_path: Path) -> ModelSpec:
    """The ModelSpec stored in an exported model."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return ModelSpec.from_json(props[METADATA_KEY])


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Polls `condition()` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def stored_sessions(model_path: Path, state_dir: Path) -> dict[str, int]:
    """Session id -> step counter of every session a state directory holds now (read as a server start would)."""
    from lstmserve.server.persistence import StateDir

    spec = model_spec(model_path)
    assert spec.c is not None  # an LSTM model: h and c
    shape = (spec.state_rows, spec.h.width, spec.c.width)
    directory = StateDir(state_dir, fingerprint=spec.fingerprint, shape=shape, secret=None)
    return {stored.session_id: stored.step for stored in directory.read_all()}


LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


def serve_process(
    model: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    file_size_limit: int | None = None,
    keep_log: bool = False,
) -> tuple[subprocess.Popen[str], str]:
    """Starts `lstmserve serve --model MODEL --port 0 EXTRA...` as a process and returns it with its address,
    once it says where it serves. With `keep_log`, its stderr (the log) is piped for the test to read at the end
    (keep such a run short: nobody reads the pipe meanwhile). `file_size_limit` caps the size of any file it
    writes (RLIMIT_FSIZE: a write beyond fails with EFBIG, as one fails with ENOSPC on a full disk)."""

    def limit_files() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    process = subprocess.Popen(
        [LSTMSERVE, "serve", "--model", str(model), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if keep_log else subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=limit_files if file_size_limit is not None else None,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"serving on \S+:(\d+)", line)
    if match is None:
        process.kill()
        _, log = process.communicate(timeout=30)
        raise AssertionError(f"server did not start: {line!r} {log or ''}")
    return process, f"127.0.0.1:{match.group(1)}"
