"""Two batches in flight: while one batch runs the model, the scheduler resolves the other and forms
its successor. Every session must still get exactly its own logits, in order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from helpers import model_spec, reference_logits

from lstmserve.server.app import make_store
from lstmserve.server.config import ServerConfig
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.scheduler import LANES, SPLIT_MIN_READY, Scheduler, SchedulerLimits

TOLERANCE = 1e-4


@pytest.mark.parametrize("placement", ["host", "device"])
def test_two_batches_compute_at_once_and_each_session_gets_its_own_logits(token_model: Path, placement: str) -> None:
    spec = model_spec(token_model)
    rng = np.random.default_rng(3)
    sessions = 2 * SPLIT_MIN_READY
    sequences = [rng.integers(0, len(spec.vocabulary), size=int(rng.integers(8, 20))) for _ in range(sessions)]
    in_flight_seen: list[int] = []

    async def run_all() -> list[np.ndarray]:
        runner = Runner(token_model, RunnerOptions(intra_op_threads=1))
        store = make_store(runner, ServerConfig(model=token_model, max_sessions=sessions, state_placement=placement))
        scheduler = Scheduler(runner, store, SchedulerLimits(max_batch_size=256), Metrics())
        model_call = runner.run

        def observed_run(inputs: np.ndarray, state: object, lane: int = 0) -> np.ndarray:
            in_flight_seen.append(scheduler._computing)  # batches started and not yet resolved
            return model_call(inputs, state, lane)  # type: ignore[arg-type]

        runner.run = observed_run  # type: ignore[method-assign]
        scheduler.start()

        async def one(sequence: np.ndarray) -> np.ndarray:
            session = scheduler.create_session()
            pieces = []
            for position, token in enumerate(sequence):
                result = await scheduler.step(session, np.array([token], np.int64))
                assert result.step == position + 1
                pieces.append(result.logits)
            return np.concatenate(pieces)

        try:
            return await asyncio.gather(*(one(sequence) for sequence in sequences))
        finally:
            await scheduler.close()

    served = asyncio.run(run_all())
    assert max(in_flight_seen) == LANES
    for sequence, logits in zip(sequences, served, strict=True):
        assert np.abs(logits - reference_logits(token_model, sequence)).max() <= TOLERANCE
