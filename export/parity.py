"""The parity check: the ONNX model on ONNX Runtime (CPU) against the PyTorch module.

Whole sequences at batch 1 and batch 3 from a random state; for unidirectional
models also the same sequences fed one step at a time, carrying hn/cn back in.
Every figure is a max absolute difference; any above the tolerance fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstmserve.export.errors import ParityError
from lstmserve.export.model import LSTMModel
from lstmserve.metadata import ModelSpec

BATCH_SIZES = (1, 3)
SEQ_LEN = 24


@dataclass(frozen=True)
class ParityReport:
    """Max absolute differences, keyed like `whole_b3_logits` or `step_b1_hn`."""

    figures: dict[str, float]
    tolerance: float

    @property
    def worst(self) -> float:
        """The largest difference of all."""
        return max(self.figures.values())

    def failures(self) -> dict[str, float]:
        """The figures above the tolerance."""
        return {k: v for k, v in self.figures.items() if not v <= self.tolerance}


def session(path: Path) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for the model file."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_inputs(model: LSTMModel, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random batch-major inputs and a random (non-zero) initial state."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "tokens":
        inputs = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    else:
        inputs = torch.randn(batch, seq_len, cfg.input_size, generator=gen)
    h0 = 0.5 * torch.randn(cfg.state_rows, batch, cfg.h_width, generator=gen)
    c0 = 0.5 * torch.randn(cfg.state_rows, batch, cfg.hidden_size, generator=gen)
    return inputs, h0, c0


def run_onnx(sess: ort.InferenceSession, spec: ModelSpec, inputs: np.ndarray, h: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
    """One ONNX Runtime call: returns [logits, hn, cn]."""
    feeds = {spec.input_name: inputs, spec.h.input_name: h, spec.c.input_name: c}
    return sess.run([spec.output_name, spec.h.output_name, spec.c.output_name], feeds)


def run_stepwise(sess: ort.InferenceSession, spec: ModelSpec, inputs: np.ndarray, h: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
    """Feeds the sequence one step at a time, carrying the state; returns [logits, hn, cn]."""
    steps = []
    for t in range(inputs.shape[1]):
        logits, h, c = run_onnx(sess, spec, inputs[:, t:t + 1], h, c)
        steps.append(logits)
    return [np.concatenate(steps, axis=1), h, c]


def check_parity(model: LSTMModel, onnx_path: Path, spec: ModelSpec, tolerance: float, seed: int = 0) -> ParityReport:
    """Measures ONNX-vs-PyTorch differences; raises ParityError if any exceeds `tolerance`."""
    model.eval()
    sess = session(onnx_path)
    _check_interface(sess, spec)
    figures: dict[str, float] = {}
    for batch in BATCH_SIZES:
        inputs, h0, c0 = sample_inputs(model, batch, SEQ_LEN, seed + batch)
        with torch.no_grad():
            expected = [x.numpy() for x in model(inputs, h0, c0)]
        feeds = (inputs.numpy(), h0.numpy(), c0.numpy())
        modes = {"whole": run_onnx(sess, spec, *feeds)}
        if spec.steppable:
            modes["step"] = run_stepwise(sess, spec, *feeds)
        for mode, got in modes.items():
            for name, want, have in zip(("logits", "hn", "cn"), expected, got):
                if want.shape != have.shape:
                    raise ParityError(f"{mode} b{batch} {name}: ONNX shape {have.shape} != PyTorch {want.shape}")
                figures[f"{mode}_b{batch}_{name}"] = float(np.max(np.abs(want - have)))
    report = ParityReport(figures, tolerance)
    failures = report.failures()
    if failures:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(failures.items()))
        raise ParityError(f"ONNX model differs from PyTorch by more than {tolerance:g}: {shown}")
    return report


def _check_interface(sess: ort.InferenceSession, spec: ModelSpec) -> None:
    inputs = [x.name for x in sess.get_inputs()]
    outputs = [x.name for x in sess.get_outputs()]
    want_in = [spec.input_name, spec.h.input_name, spec.c.input_name]
    want_out = [spec.output_name, spec.h.output_name, spec.c.output_name]
    if inputs != want_in or outputs != want_out:
        raise ParityError(f"ONNX interface {inputs} -> {outputs}, expected {want_in} -> {want_out}")
