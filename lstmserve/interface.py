"""Does a model's lstmserve metadata match its graph? Names, dtypes, ranks and fixed sizes.

The server runs this check when it loads a model, and `lstmserve annotate` before it
writes one, so that metadata that does not fit the graph is refused up front with one
line naming the tensor and both shapes, instead of an ONNX Runtime error at the first step.
Depends only on the standard library: the caller lists the graph's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lstmserve.metadata import ModelSpec, ModelSpecError

Dim = int | str | None
"""One dimension as ONNX Runtime reports it: a fixed size, a symbolic name, or unknown."""

FLOAT, INT64 = "tensor(float)", "tensor(int64)"


class ModelInterfaceError(ModelSpecError):
    """The metadata does not match the graph; the message names the tensor and both shapes."""


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output as declared in the ONNX file.

    Args:
        name: the tensor's name.
        dtype: ONNX Runtime's type string, e.g. "tensor(float)".
        shape: its dimensions (ints for fixed sizes, names or None for dynamic ones).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class _Expected:
    role: str
    name: str
    dtype: str
    shape: tuple[Dim, ...]  # ints must match; "batch"/"time" must be dynamic in the graph


def show_shape(shape: Sequence[Dim]) -> str:
    """A shape for messages: fixed sizes as numbers, dynamic ones by name (or '?')."""
    return "[" + ", ".join("?" if d is None or d == "" else str(d) for d in shape) + "]"


def expected_tensors(spec: ModelSpec) -> tuple[list[_Expected], list[_Expected]]:
    """What the metadata says the graph's inputs and outputs are."""
    data: tuple[Dim, ...] = ("batch", "time") if spec.kind == "tokens" else ("batch", "time", spec.input_size)
    out: tuple[Dim, ...] = ("batch", "time", spec.output_size)
    if spec.time_major:
        data = (data[1], data[0], *data[2:])
        out = (out[1], out[0], *out[2:])
    role = "token input" if spec.kind == "tokens" else "feature input"
    inputs = [_Expected(role, spec.input_name, INT64 if spec.kind == "tokens" else FLOAT, data)]
    outputs = [_Expected("output", spec.output_name, FLOAT, out)]
    for index, state in enumerate(spec.states, start=1):
        shape = (spec.state_rows, "batch", state.width)
        inputs.append(_Expected(f"state {index} input", state.input_name, FLOAT, shape))
        outputs.append(_Expected(f"state {index} output", state.output_name, FLOAT, shape))
    return inputs, outputs


def check_graph(
    spec: ModelSpec, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], where: str = "model"
) -> None:
    """Raises ModelInterfaceError (one line) at the first way the metadata and the graph disagree."""
    want_in, want_out = expected_tensors(spec)
    names = [w.name for w in want_in + want_out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelInterfaceError(f"{where}: the metadata names tensor {duplicates[0]!r} twice")
    graph_in = {t.name: t for t in inputs}
    graph_out = {t.name: t for t in outputs}
    declared = {w.name for w in want_in}
    for tensor in inputs:
        if tensor.name not in declared:
            raise ModelInterfaceError(
                f"{where}: graph input {tensor.name!r} {show_shape(tensor.shape)} is not in the metadata "
                f"(declared inputs: {', '.join(sorted(declared))})"
            )
    for wanted, graph, kind in [(w, graph_in, "input") for w in want_in] + [(w, graph_out, "output") for w in want_out]:
        found = graph.get(wanted.name)
        if found is None:
            raise ModelInterfaceError(
                f"{where}: the metadata's {wanted.role} {wanted.name!r} is not a graph {kind} "
                f"(graph {kind}s: {', '.join(sorted(graph)) or 'none'})"
            )
        _check_tensor(wanted, found, where)


def _check_tensor(wanted: _Expected, tensor: GraphTensor, where: str) -> None:
    head = f"{where}: {wanted.role} {wanted.name!r}"
    if tensor.dtype != wanted.dtype:
        raise ModelInterfaceError(f"{head} is {tensor.dtype} in the graph, but the metadata says {wanted.dtype}")
    pairs = list(zip(tensor.shape, wanted.shape))
    wrong_size = any(isinstance(w, int) and isinstance(h, int) and h != w for h, w in pairs)
    # A fixed batch or time size: the server could not batch sessions, or feed several positions.
    fixed_axis = any(isinstance(w, str) and isinstance(h, int) for h, w in pairs)
    if len(tensor.shape) != len(wanted.shape) or wrong_size or fixed_axis:
        raise ModelInterfaceError(
            f"{head} has shape {show_shape(tensor.shape)} in the graph, but the metadata says {show_shape(wanted.shape)}"
            + (" (batch and time must be dynamic axes)" if fixed_axis and not wrong_size else "")
        )
