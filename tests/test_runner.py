"""The runner's kept IO bindings for single-position batches: any order of batch sizes, growth of
the shared buffers, and a new state object all give the logits of running the whole sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.state import HostStateStore


def test_single_steps_in_changing_batches_equal_whole_sequences(token_model: Path) -> None:
    runner = Runner(token_model, RunnerOptions(intra_op_threads=1))
    spec = runner.spec
    assert spec.c is not None  # an LSTM: two state tensors
    store = HostStateStore(spec.state_rows, spec.h.width, spec.c.width, capacity=40)
    slots = [store.allocate() for _ in range(40)]
    rng = np.random.default_rng(0)
    fed: list[list[int]] = [[] for _ in slots]
    # Batch sizes out of order, past the buffers' first capacity (growth), and back to small ones.
    for batch in (1, 3, 1, 8, 2, 33, 5, 1, 40, 3):
        rows = rng.choice(len(slots), size=batch, replace=False)
        tokens = rng.integers(0, len(spec.vocabulary), size=(batch, 1))
        buffers = store.gather(np.array([slots[r] for r in rows]))
        logits = runner.run(tokens, buffers).copy()
        store.scatter(np.array([slots[r] for r in rows]), buffers)
        for row, token, got in zip(rows, tokens[:, 0], logits, strict=True):
            fed[row].append(int(token))
            whole = runner.run_stateless(np.array([fed[row]]))
            np.testing.assert_allclose(got[0], whole[0, -1], atol=1e-5)


def test_a_new_state_object_for_a_batch_size_is_bound_anew(token_model: Path) -> None:
    runner = Runner(token_model, RunnerOptions(intra_op_threads=1))
    spec = runner.spec
    assert spec.c is not None  # an LSTM: two state tensors
    first = HostStateStore(spec.state_rows, spec.h.width, spec.c.width, capacity=4)
    second = HostStateStore(spec.state_rows, spec.h.width, spec.c.width, capacity=4)
    slot = np.array([first.allocate()])
    second.allocate()
    tokens = np.array([[3]])
    buffers = first.gather(slot)
    runner.run(tokens, buffers)
    first.scatter(slot, buffers)
    first.gather(slot)  # the first store's batch buffers now hold a state that is not zero
    fresh = second.gather(slot)
    zero_state = runner.run(tokens, fresh)  # same batch size, other buffers: must read the second store's zeros
    np.testing.assert_allclose(zero_state[0, 0], runner.run_stateless(tokens)[0, -1], atol=1e-5)
