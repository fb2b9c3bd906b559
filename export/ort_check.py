"""Running an lstmserve ONNX model on ONNX Runtime (CPU), whole or one step at a time. No torch.

Shared by the parity check against PyTorch (`parity`) and by `lstmserve annotate`, which has
no PyTorch module to compare with and checks that stepping the graph one position at a time,
carrying the state, gives what the whole sequence gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from lstmserve.metadata import ModelSpec


def session(path: Path | bytes) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for a model file (or serialized model)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: the callers report failed runs themselves, in one line
    options.intra_op_num_threads = 1
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_inputs(spec: ModelSpec, batch: int, seq_len: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Batch-major random inputs (features in the data's units when the model standardises them) and a
    random (non-zero) initial state for every state tensor."""
    rng = np.random.default_rng(seed)
    inputs: np.ndarray
    if spec.kind == "tokens":
        inputs = rng.integers(0, max(1, len(spec.vocabulary)), size=(batch, seq_len)).astype(np.int64)
    else:
        inputs = rng.standard_normal((batch, seq_len, spec.input_size))
        if "input_mean" in spec.normalization:
            inputs = inputs * np.asarray(spec.normalization["input_std"]) + np.asarray(spec.normalization["input_mean"])
        inputs = inputs.astype(np.float32)
    states = [(0.5 * rng.standard_normal((spec.state_rows, batch, s.width))).astype(np.float32) for s in spec.states]
    return inputs, states


def run_whole(sess: ort.InferenceSession, spec: ModelSpec, inputs: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
    """One call on batch-major inputs: returns [output (batch-major), *final states]."""
    data = np.swapaxes(inputs, 0, 1) if spec.time_major else inputs
    feeds = {spec.input_name: np.ascontiguousarray(data)}
    feeds.update({s.input_name: value for s, value in zip(spec.states, states, strict=True)})
    names = [spec.output_name, *(s.output_name for s in spec.states)]
    output, *final = sess.run(names, feeds)
    if spec.time_major:
        output = np.swapaxes(output, 0, 1)
    return [np.asarray(output), *final]


def run_stepwise(
    sess: ort.InferenceSession, spec: ModelSpec, inputs: np.ndarray, states: list[np.ndarray]
) -> list[np.ndarray]:
    """Feeds the sequence one position at a time, carrying the state: [output, *final states]."""
    outputs = []
    for t in range(inputs.shape[1]):
        output, *states = run_whole(sess, spec, inputs[:, t : t + 1], states)
        outputs.append(output)
    return [np.concatenate(outputs, axis=1), *states]


def result_names(spec: ModelSpec) -> list[str]:
    """Names for the figures of [output, *states]: "logits" then each state's output name."""
    return ["logits", *(s.output_name for s in spec.states)]


def output_scale(spec: ModelSpec) -> np.ndarray:
    """What output differences are divided by: each column's std when the model predicts in the data's
    units (float32 carries about 7 digits, so 1e-4 of a column in the thousands is below its precision), else 1."""
    return np.asarray(spec.normalization.get("output_std", [1.0]), dtype=np.float64)


def stepwise_differences(
    sess: ort.InferenceSession, spec: ModelSpec, *, batch: int, seq_len: int, seed: int
) -> dict[str, float]:
    """Max |whole - stepwise| for the output and each final state, keyed `step_b{batch}_{name}`."""
    inputs, states = random_inputs(spec, batch, seq_len, seed)
    whole = run_whole(sess, spec, inputs, states)
    step = run_stepwise(sess, spec, inputs, states)
    scales = [output_scale(spec)] + [1.0] * len(spec.states)
    return {
        f"step_b{batch}_{name}": float(np.max(np.abs(a - b) / scale))
        for name, a, b, scale in zip(result_names(spec), whole, step, scales, strict=True)
    }
