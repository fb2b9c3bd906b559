"""The parity check: the ONNX model on ONNX Runtime (CPU) against the PyTorch module.

Whole sequences at batch 1 and batch 3 from a random state; for unidirectional
models also the same sequences fed one step at a time, carrying the state back in.
Every figure is a max absolute difference (for a model that predicts in the data's
units, in units of each output column's std); any above the tolerance fails the export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstmserve.export.errors import ParityError
from lstmserve.export.ort_check import output_scale, random_inputs, result_names, run_stepwise, run_whole, session
from lstmserve.metadata import ModelSpec

BATCH_SIZES = (1, 3)
SEQ_LEN = 24

BatchMajorModule = Callable[..., tuple[torch.Tensor, ...]]
"""`module(inputs, *state) -> (output, *state)`, batch-major: what the ONNX graph computes."""


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


def check_parity(
    model: BatchMajorModule, onnx_path: Path, spec: ModelSpec, tolerance: float, seed: int = 0
) -> ParityReport:
    """Measures ONNX-vs-PyTorch differences; raises ParityError if any exceeds `tolerance`."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    sess = session(onnx_path)
    _check_interface(sess, spec)
    figures: dict[str, float] = {}
    names = result_names(spec)
    scales = [output_scale(spec)] + [1.0] * len(spec.states)
    for batch in BATCH_SIZES:
        inputs, states = random_inputs(spec, batch, SEQ_LEN, seed + batch)
        with torch.no_grad():
            expected = [x.numpy() for x in model(torch.from_numpy(inputs), *map(torch.from_numpy, states))]
        modes = {"whole": run_whole(sess, spec, inputs, states)}
        if spec.steppable:
            modes["step"] = run_stepwise(sess, spec, inputs, states)
        for mode, got in modes.items():
            for name, want, have, scale in zip(names, expected, got, scales, strict=True):
                if want.shape != have.shape:
                    raise ParityError(f"{mode} b{batch} {name}: ONNX shape {have.shape} != PyTorch {want.shape}")
                figures[f"{mode}_b{batch}_{name}"] = float(np.max(np.abs(want - have) / scale))
    report = ParityReport(figures, tolerance)
    failures = report.failures()
    if failures:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(failures.items()))
        raise ParityError(f"ONNX model differs from PyTorch by more than {tolerance:g}: {shown}")
    return report


def _check_interface(sess: ort.InferenceSession, spec: ModelSpec) -> None:
    inputs = [x.name for x in sess.get_inputs()]
    outputs = [x.name for x in sess.get_outputs()]
    want_in = [spec.input_name, *(s.input_name for s in spec.states)]
    want_out = [spec.output_name, *(s.output_name for s in spec.states)]
    if inputs != want_in or outputs != want_out:
        raise ParityError(f"ONNX interface {inputs} -> {outputs}, expected {want_in} -> {want_out}")
