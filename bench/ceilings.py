"""In-process series without gRPC: ONNX Runtime on batches (the compute ceiling) and PyTorch eager stepping."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.state import HostStateStore


def onnxruntime_steps_per_s(
    model: Path, batch_size: int, *, positions: int = 1, duration_s: float = 1.0, intra_op_threads: int = 0
) -> tuple[float, float]:
    """Steps per second and seconds per call of gather + ONNX Runtime + scatter at one batch size."""
    runner = Runner(model, RunnerOptions(providers=("cpu",), intra_op_threads=intra_op_threads))
    spec = runner.spec
    store = HostStateStore(*spec.state_shape, batch_size)
    slots = np.array([store.allocate() for _ in range(batch_size)], np.int64)
    rng = np.random.default_rng(0)
    if spec.kind == "tokens":
        inputs = rng.integers(0, max(1, len(spec.vocabulary)), size=(batch_size, positions)).astype(np.int64)
    else:
        inputs = rng.standard_normal((batch_size, positions, spec.input_size)).astype(np.float32)

    def call() -> None:
        buffers = store.gather(slots)
        runner.run(inputs, buffers)
        store.scatter(slots, buffers)

    return _rate(call, batch_size, duration_s)


def torch_steps_per_s(
    model: Path, batch_size: int, *, positions: int = 1, duration_s: float = 1.0, intra_op_threads: int = 0
) -> tuple[float, float]:
    """Steps per second and seconds per call of PyTorch eager stepping from the exported checkpoint,
    on `intra_op_threads` threads as ONNX Runtime gets (0: PyTorch's default, one per core)."""
    import torch

    from lstmserve.export import load_checkpoint

    spec = Runner(model, RunnerOptions(providers=("cpu",))).spec
    module = load_checkpoint(model.parent / "model.pt")
    rng = np.random.default_rng(0)
    if spec.kind == "tokens":
        inputs = torch.from_numpy(rng.integers(0, max(1, len(spec.vocabulary)), size=(batch_size, positions)))
    else:
        inputs = torch.from_numpy(rng.standard_normal((batch_size, positions, spec.input_size)).astype(np.float32))
    state = [torch.zeros(spec.state_rows, batch_size, s.width) for s in spec.states]

    def call() -> None:
        with torch.inference_mode():
            outputs = module(inputs, *state)
        state[:] = outputs[1:]

    threads = torch.get_num_threads()
    if intra_op_threads > 0:
        torch.set_num_threads(intra_op_threads)
    try:
        return _rate(call, batch_size, duration_s)
    finally:
        torch.set_num_threads(threads)


def _rate(call: Callable[[], None], batch_size: int, duration_s: float) -> tuple[float, float]:
    for _ in range(3):
        call()
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= duration_s:
            break
    per_call = elapsed / calls
    return batch_size / per_call, per_call
