"""Isolation under batching: concurrent sessions with random chunking get exactly their own logits."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import start_server
from helpers import CHANNEL_OPTIONS, AsyncStream, features_tensor, logits_of, model_spec, reference_logits

TOLERANCE = 1e-4


def _chunks(rng: random.Random, length: int, max_chunk: int) -> list[tuple[int, int]]:
    """Random [start, end) chunks covering 0..length, mostly single steps."""
    bounds, start = [], 0
    while start < length:
        size = 1 if rng.random() < 0.6 else rng.randint(2, max_chunk)
        end = min(length, start + size)
        bounds.append((start, end))
        start = end
    return bounds


async def _run_session(address: str, inputs: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, int, list[int]]:
    rng = random.Random(seed)
    pieces, batch_sizes = [], []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stream = AsyncStream(channel)
        step = 0
        for start, end in _chunks(rng, len(inputs), 7):
            await asyncio.sleep(rng.random() * 0.002)  # random interleavings
            chunk = inputs[start:end]
            fields = {"tokens": chunk.tolist()} if kind == "tokens" else {"features": features_tensor(chunk)}
            response = await stream.request(**fields)
            assert response.step == step + len(chunk)
            step = response.step
            pieces.append(logits_of(response))
            batch_sizes.append(response.batch_size)
        await stream.close()
    return np.concatenate(pieces), step, batch_sizes


def _random_inputs(model: Path, rng: np.random.Generator, length: int) -> np.ndarray:
    spec = model_spec(model)
    if spec.kind == "tokens":
        return rng.integers(0, len(spec.vocabulary), size=length).astype(np.int64)
    return rng.standard_normal((length, spec.input_size)).astype(np.float32)


@pytest.mark.parametrize(
    ("model_fixture", "placement"),
    [
        ("token_model", "host"),
        ("feature_model", "host"),
        ("projected_model", "host"),
        ("token_model", "device"),
        ("gru_model", "host"),
        ("gru_model", "device"),
        ("rnn_model", "host"),
    ],
)
def test_concurrent_sessions_match_pytorch_whole_sequence(
    model_fixture: str, placement: str, request: pytest.FixtureRequest
) -> None:
    """Also runs the device-state path (ONNX Runtime buffers and row graphs) on the CPU provider."""
    model: Path = request.getfixturevalue(model_fixture)
    kind = model_spec(model).kind
    rng = np.random.default_rng(7)
    sequences = [_random_inputs(model, rng, int(rng.integers(12, 40))) for _ in range(24)]
    handle = start_server(model, max_batch_size=16, state_placement=placement)
    try:

        async def run_all() -> list[tuple[np.ndarray, int, list[int]]]:
            return await asyncio.gather(
                *(_run_session(handle.address, seq, kind, seed) for seed, seq in enumerate(sequences))
            )

        results = asyncio.run(run_all())
    finally:
        handle.stop()
    all_batch_sizes = []
    for sequence, (served, steps, batch_sizes) in zip(sequences, results, strict=True):
        expected = reference_logits(model, sequence)
        assert steps == len(sequence)
        assert served.shape == expected.shape
        assert np.abs(served - expected).max() <= TOLERANCE
        all_batch_sizes += batch_sizes
    # The sessions really were batched together, and never beyond the limit.
    assert max(all_batch_sizes) > 1
    assert max(all_batch_sizes) <= 16
