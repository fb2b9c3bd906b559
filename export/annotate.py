"""`lstmserve annotate`: make an ONNX model that lstmserve did not write servable, by describing it.

Finds (or takes from the user) the data input, the output and the recurrent state pairs,
writes the lstmserve metadata into a copy of the model, and checks on ONNX Runtime that
feeding a sequence one position at a time, carrying the state, gives what the whole
sequence gives (and that batch rows do not mix) before anything is written.

State tensors are float32 [rows, batch, width] with fixed rows and width; the data input is
int64 tokens [batch, time] or float32 features [batch, time, width], or time-major
[time, batch, ...] (the server transposes). Fixed batch and time sizes in the file's
declared inputs and outputs are made dynamic; a graph that still cannot run at other sizes
is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

import lstmserve
from lstmserve.export.errors import ExportError, ParityError
from lstmserve.export.onnx_export import set_metadata, write_onnx
from lstmserve.export.ort_check import random_inputs, run_whole, session, stepwise_differences
from lstmserve.export.pipeline import REPORT_NAME, staging_dir
from lstmserve.export.report import write_report
from lstmserve.export.state_pairs import StatePair, pair_states
from lstmserve.export.vocabulary import read_vocabulary
from lstmserve.interface import FLOAT, INT64, GraphTensor, check_graph, show_shape
from lstmserve.metadata import CellKind, HeadKind, ModelSpec, StateSpec

Layout = Literal["batch-major", "time-major"]
LAYOUTS: tuple[str, ...] = ("batch-major", "time-major")
ONNX_NAME = "model.onnx"
BATCH_SIZES = (1, 3)
SEQ_LEN = 16
HEADS: tuple[str, ...] = ("language_model", "regression", "classification")
CELL_OPS: dict[str, CellKind] = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
MAX_BYTES = 2**31 - 1
HOW = {"given": "given with --state", "name": "paired by name", "shape": "paired by shape"}  # protobuf's limit for a single-file model


@dataclass(frozen=True)
class AnnotateResult:
    """What `annotate` wrote.

    Args:
        onnx_path, report_path: the files written.
        spec: the metadata stored in the model.
        pairs: the state pairs and how each was found ("given", "name" or "shape").
        layout: "batch-major" or "time-major" (the data input's layout in the graph).
        checks: max |whole sequence - stepwise| (`step_b*`) and |batch - one row at a time| (`rows_b3_*`).
        ignored_outputs: graph outputs the server does not use.
        seconds: wall time.
    """

    onnx_path: Path
    report_path: Path
    spec: ModelSpec
    pairs: tuple[StatePair, ...]
    layout: str
    checks: dict[str, float]
    ignored_outputs: tuple[str, ...]
    seconds: float

    def summary(self) -> str:
        """A few lines for the terminal."""
        spec = self.spec
        lines = [
            f"annotated {spec.cell} model: {spec.kind} input {spec.input_name!r} ({self.layout}), "
            f"output {spec.output_name!r} ({spec.output_size} wide, {spec.head})",
        ]
        for pair in self.pairs:
            lines.append(
                f"  state           {pair.input.name} -> {pair.output.name} [{spec.state_rows}, batch, "
                f"{pair.input.shape[-1]}]  ({HOW[pair.how]})"
            )
        what = "batch rows independent" if not spec.steppable else "stepwise == whole sequence, batch rows independent"
        lines += [
            f"  checked         {what}: max difference {max(self.checks.values()):.3g} over {len(self.checks)} checks",
            f"  fingerprint     {spec.fingerprint[:16]}",
        ]
        if self.ignored_outputs:
            lines.append(f"  ignored outputs {', '.join(self.ignored_outputs)}")
        lines += [f"  took            {self.seconds:.1f} s", f"  wrote           {self.onnx_path}",
                  f"  wrote           {self.report_path}"]
        return "\n".join(lines)


def annotate(
    model: str | Path,
    out: str | Path | None = None,
    *,
    input: str | None = None,
    states: Sequence[tuple[str, str]] = (),
    output: str | None = None,
    vocabulary: Sequence[str] | str | Path | None = None,
    head: HeadKind | None = None,
    classes: Sequence[str] = (),
    layout: Layout | None = None,
    bidirectional: bool = False,
    tolerance: float = 1e-4,
) -> AnnotateResult:
    """Writes `out`/model.onnx: a copy of `model` with lstmserve metadata, after checking it (see module doc).

    Args:
        model: the ONNX file.
        out: output directory (default models/<file stem>), replaced only when everything succeeded.
        input: the data input's name (None: the one input that is not a state).
        states: (input, output) name pairs; the rest are paired by name, then by shape.
        output: the output's name (None: the one output that is not a state).
        vocabulary: token models: the text of each token id (a list, or a .json or text file).
        head: what the output means (default language_model for tokens, regression for features).
        classes: class names of a classification head (default "0", "1", ...).
        layout: "batch-major" or "time-major"; None: found from the axes' names or sizes, or by trying.
        bidirectional: the model reads whole sequences both ways: served by Infer only, no stepwise check.
        tolerance: largest allowed difference in the checks.
    Raises:
        ExportError: a bad argument or a model lstmserve cannot serve (one line naming why).
        ParityError: the model does not give the same results stepwise as on the whole sequence.
    """
    start = time.perf_counter()
    path = Path(model)
    proto = _load(path)
    target = Path(out) if out is not None else Path("models") / path.stem
    graph_inputs, graph_outputs = _declared(proto)
    data_in, pairs, data_out, ignored = _roles(graph_inputs, graph_outputs, input, states, output)
    kind = "tokens" if data_in.dtype == INT64 else "features"
    _check_roles(data_in, pairs, data_out, kind)
    if head is not None and head not in HEADS:
        raise ExportError(f"--head {head!r} is not one of {', '.join(HEADS)}")
    chosen_head: HeadKind = head or ("language_model" if kind == "tokens" else "regression")
    vocab = _vocabulary(kind, vocabulary)
    base = _spec(proto, data_in, pairs, data_out, kind, chosen_head, vocab, bidirectional)
    chosen, relaxed = _layout(proto, base, data_in, pairs, data_out, layout)
    spec = replace(base, time_major=chosen == "time-major", classes=_classes(chosen_head, classes, base.output_size))
    set_metadata(relaxed, spec)
    serialized = relaxed.SerializeToString()
    sess = session(serialized)
    check_graph(spec, _ort_tensors(sess.get_inputs()), _ort_tensors(sess.get_outputs()), where=str(path))
    checks = _check(sess, spec, tolerance, pairs)
    with staging_dir(target) as stage:
        write_onnx(relaxed, stage / ONNX_NAME)
        seconds = time.perf_counter() - start
        write_report(stage / REPORT_NAME, {
            "source": {"model": str(path), "producer": f"{proto.producer_name} {proto.producer_version}".strip()},
            "layout": chosen,
            "states": [{"input": p.input.name, "output": p.output.name, "width": p.input.shape[-1], "found_by": p.how}
                       for p in pairs],
            "checks": {"tolerance": tolerance, "max_abs_diff": checks, "worst": max(checks.values())},
            "ignored_outputs": list(ignored),
            "spec": {"fingerprint": spec.fingerprint, "steppable": spec.steppable, "cell": spec.cell,
                     "kind": spec.kind, "output_size": spec.output_size, "head": spec.head},
            "seconds": {"total": seconds},
            "files": [ONNX_NAME, REPORT_NAME],
        })
    return AnnotateResult(target / ONNX_NAME, target / REPORT_NAME, spec, tuple(pairs), chosen, checks,
                          tuple(ignored), seconds)


# ---- reading the graph ------------------------------------------------------------------------


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist or is not a file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx's DecodeError and friends share no base class
        raise ExportError(f"{str(path)!r} is not an ONNX model: {exc}") from exc
    if not proto.graph.node:
        raise ExportError(f"{str(path)!r} is not an ONNX model (it has no graph nodes)")
    if proto.ByteSize() > MAX_BYTES:
        raise ExportError(f"{str(path)!r} is larger than 2 GB, which a single-file ONNX model cannot be")
    return proto


def _dtype(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    return f"tensor({onnx.TensorProto.DataType.Name(elem).lower()})"


def _tensor(value: onnx.ValueInfoProto) -> GraphTensor:
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return GraphTensor(value.name, _dtype(value), tuple(dims))


def _declared(proto: onnx.ModelProto) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The graph's real inputs (initializers left out) and its outputs."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [_tensor(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [_tensor(v) for v in proto.graph.output]


def _ort_tensors(args: list[ort.NodeArg]) -> list[GraphTensor]:
    return [GraphTensor(a.name, a.type, tuple(a.shape)) for a in args]


def _names(tensors: Sequence[GraphTensor]) -> str:
    return ", ".join(f"{t.name!r} {show_shape(t.shape)}" for t in tensors) or "none"


# ---- which tensor is which ----------------------------------------------------------------------


def _roles(
    inputs: list[GraphTensor],
    outputs: list[GraphTensor],
    input_name: str | None,
    given: Sequence[tuple[str, str]],
    output_name: str | None,
) -> tuple[GraphTensor, list[StatePair], GraphTensor, list[str]]:
    """The data input, the state pairs, the output, and the outputs left unused."""
    by_in, by_out = {t.name: t for t in inputs}, {t.name: t for t in outputs}
    if input_name is not None and input_name not in by_in:
        raise ExportError(f"--input {input_name!r} is not a graph input ({_names(inputs)})")
    if output_name is not None and output_name not in by_out:
        raise ExportError(f"--output {output_name!r} is not a graph output ({_names(outputs)})")
    state_in = [t for t in inputs if t.name != input_name and (_state_like(t) or t.name in dict(given))]
    state_out = [t for t in outputs if t.name != output_name and (_state_like(t) or t.name in dict(given).values())]
    pairs = pair_states(state_in, state_out, given)
    if not pairs:
        raise ExportError(
            f"the model has no recurrent state: no input is carried forward by an output of the same shape "
            f"(inputs {_names(inputs)}; outputs {_names(outputs)}); name the pairs with --state IN:OUT"
        )
    paired_in = {p.input.name for p in pairs}
    paired_out = {p.output.name for p in pairs}
    if input_name is None:
        rest = [t for t in inputs if t.name not in paired_in]
        if len(rest) != 1:
            raise ExportError(
                f"cannot tell the data input among {_names(rest)}; name it with --input NAME"
                if rest else "every input is paired as a state, so none is left for the data; name it with --input NAME"
            )
        input_name = rest[0].name
    extra = [t for t in inputs if t.name != input_name and t.name not in paired_in]
    if extra:
        raise ExportError(
            f"graph input {extra[0].name!r} {show_shape(extra[0].shape)} is neither the data input nor a state, "
            "and lstmserve cannot feed it"
        )
    if output_name is None:
        rest_out = [t for t in outputs if t.name not in paired_out]
        if len(rest_out) != 1:
            raise ExportError(
                f"cannot tell the output among {_names(rest_out)}; name it with --output NAME"
                if rest_out else "every output is paired as a state, so none is left for the result; name it with --output NAME"
            )
        output_name = rest_out[0].name
    ignored = [t.name for t in outputs if t.name != output_name and t.name not in paired_out]
    return by_in[input_name], pairs, by_out[output_name], ignored


def _state_like(tensor: GraphTensor) -> bool:
    """float32 [rows, batch, width] with fixed rows and width (a data tensor's first axis is dynamic)."""
    shape = tensor.shape
    return tensor.dtype == FLOAT and len(shape) == 3 and isinstance(shape[0], int) and isinstance(shape[2], int)


def _check_roles(data_in: GraphTensor, pairs: list[StatePair], data_out: GraphTensor, kind: str) -> None:
    if len(pairs) > 2:
        names = ", ".join(f"{p.input.name} -> {p.output.name}" for p in pairs)
        raise ExportError(f"lstmserve serves models with one or two state tensors; this one has {len(pairs)}: {names}")
    rows = {p.input.shape[0] for p in pairs}
    for pair in pairs:
        tensor = pair.input
        if not isinstance(tensor.shape[0], int) or not isinstance(tensor.shape[2], int):
            raise ExportError(
                f"state {tensor.name!r} has shape {show_shape(tensor.shape)}: lstmserve keeps state as "
                "[rows, batch, width] with fixed rows and width"
            )
    if len(rows) > 1:
        raise ExportError(f"the state tensors have different numbers of rows: {_names([p.input for p in pairs])}")
    if kind == "tokens" and len(data_in.shape) != 2:
        raise ExportError(f"token input {data_in.name!r} has shape {show_shape(data_in.shape)}; expected [batch, time]")
    if kind == "features":
        if data_in.dtype != FLOAT or len(data_in.shape) != 3:
            raise ExportError(
                f"data input {data_in.name!r} is {data_in.dtype} {show_shape(data_in.shape)}; lstmserve takes int64 "
                "tokens [batch, time] or float32 features [batch, time, width]"
            )
        if not isinstance(data_in.shape[2], int):
            raise ExportError(f"feature input {data_in.name!r} has shape {show_shape(data_in.shape)}: its width must be fixed")
    if data_out.dtype != FLOAT or len(data_out.shape) != 3:
        raise ExportError(
            f"output {data_out.name!r} is {data_out.dtype} {show_shape(data_out.shape)}; lstmserve needs float32 "
            "[batch, time, width], an output for every position"
        )
    if not isinstance(data_out.shape[2], int):
        raise ExportError(f"output {data_out.name!r} has shape {show_shape(data_out.shape)}: its width must be fixed")


# ---- the metadata -------------------------------------------------------------------------------


def _spec(
    proto: onnx.ModelProto,
    data_in: GraphTensor,
    pairs: list[StatePair],
    data_out: GraphTensor,
    kind: str,
    head: HeadKind,
    vocabulary: tuple[str, ...],
    bidirectional: bool,
) -> ModelSpec:
    rows = int(pairs[0].input.shape[0])  # type: ignore[arg-type]
    if bidirectional and rows % 2:
        raise ExportError(f"--bidirectional: the state has {rows} rows, not num_layers * 2")
    states = [StateSpec(p.input.name, p.output.name, int(p.input.shape[2])) for p in pairs]  # type: ignore[arg-type]
    ops = {CELL_OPS[n.op_type] for n in proto.graph.node if n.op_type in CELL_OPS}
    cell: CellKind = "custom"
    if len(ops) == 1:
        (op,) = ops
        cell = op if (op == "lstm") == (len(states) == 2) else "custom"
    return ModelSpec(
        kind="tokens" if kind == "tokens" else "features",
        input_name=data_in.name,
        output_name=data_out.name,
        vocabulary=vocabulary,
        input_size=int(data_in.shape[2]) if kind == "features" else 0,  # type: ignore[arg-type]
        hidden_size=max(s.width for s in states),
        num_layers=rows // 2 if bidirectional else rows,
        proj_size=0,
        bias=True,
        batch_first=True,
        dropout=0.0,
        bidirectional=bidirectional,
        output_size=int(data_out.shape[2]),  # type: ignore[arg-type]
        head=head,
        h=states[0],
        c=states[1] if len(states) > 1 else None,
        fingerprint=_fingerprint(proto),
        exporter={"lstmserve": lstmserve.__version__, "onnx": onnx.__version__, "graph": "annotated",
                  "producer": f"{proto.producer_name} {proto.producer_version}".strip()},
        cell=cell,
        source="annotated",
    )


def _fingerprint(proto: onnx.ModelProto) -> str:
    """sha256 over the weights (name, type, dims, bytes, sorted by name) and the nodes (op, inputs, outputs)."""
    digest = hashlib.sha256()
    for init in sorted(proto.graph.initializer, key=lambda i: i.name):
        array = onnx.numpy_helper.to_array(init)
        digest.update(f"{init.name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    for node in proto.graph.node:
        digest.update(f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)}\n".encode())
    return digest.hexdigest()


def _vocabulary(kind: str, vocabulary: Sequence[str] | str | Path | None) -> tuple[str, ...]:
    if kind == "features":
        if vocabulary is not None:
            raise ExportError("--vocab only applies to token models; this model takes float features")
        return ()
    if vocabulary is None:
        raise ExportError("this model takes int64 tokens: give its vocabulary with --vocab FILE (.json list, or one piece a line)")
    return read_vocabulary(vocabulary)


def _classes(head: str, classes: Sequence[str], output_size: int) -> tuple[str, ...]:
    names = tuple(str(c) for c in classes)
    if head != "classification":
        if names:
            raise ExportError(f"--classes only applies to --head classification, not {head!r}")
        return ()
    if names and len(names) != output_size:
        raise ExportError(f"{len(names)} class names given, but the output has {output_size} values per position")
    return names or tuple(str(i) for i in range(output_size))


# ---- layout and dynamic axes ----------------------------------------------------------------------


def _relaxed(proto: onnx.ModelProto, data_in: str, data_out: str, states: list[StatePair], layout: str) -> onnx.ModelProto:
    """A copy whose declared batch and time axes are dynamic ("batch", "time"), without stale inner shapes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    batch_axis, time_axis = (0, 1) if layout == "batch-major" else (1, 0)
    axes = {data_in: {batch_axis: "batch", time_axis: "time"}, data_out: {batch_axis: "batch", time_axis: "time"}}
    for pair in states:
        axes[pair.input.name] = {1: "batch"}
        axes[pair.output.name] = {1: "batch"}
    for value in list(copy.graph.input) + list(copy.graph.output):
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
    del copy.graph.value_info[:]
    return copy


def _layout_hint(data_in: GraphTensor, pairs: list[StatePair]) -> list[str]:
    """The layouts the declared shapes allow: the state's batch axis equals the data's axis 0 or 1."""
    batch = pairs[0].input.shape[1]
    first, second = data_in.shape[0], data_in.shape[1]
    if batch is not None and batch != "":
        if first == batch and second != batch:
            return ["batch-major"]
        if second == batch and first != batch:
            return ["time-major"]
    return list(LAYOUTS)


def _layout(
    proto: onnx.ModelProto,
    spec: ModelSpec,
    data_in: GraphTensor,
    pairs: list[StatePair],
    data_out: GraphTensor,
    layout: str | None,
) -> tuple[str, onnx.ModelProto]:
    """The data layout (given, read off the shapes, or the only one ONNX Runtime runs) and the relaxed graph."""
    if layout is not None and layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    candidates = [layout] if layout is not None else _layout_hint(data_in, pairs)
    runs: dict[str, onnx.ModelProto] = {}
    errors: dict[str, str] = {}
    for candidate in candidates:
        relaxed = _relaxed(proto, data_in.name, data_out.name, pairs, candidate)
        probe = replace(spec, time_major=candidate == "time-major")
        try:
            sess = session(relaxed.SerializeToString())
            inputs, states = random_inputs(probe, 3, 2, seed=0)
            output, *finals = run_whole(sess, probe, inputs, states)
        except Exception as exc:  # ONNX Runtime's errors share no base class
            errors[candidate] = _first_line(exc)
            continue
        if output.shape[:2] != (3, 2) or any(f.shape != s.shape for f, s in zip(finals, states, strict=True)):
            errors[candidate] = f"output shape {list(output.shape)} for batch 3 and 2 positions"
            continue
        runs[candidate] = relaxed
    if len(runs) == 1:
        (chosen, relaxed), = runs.items()
        return chosen, relaxed
    if not runs:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise ExportError(
            f"ONNX Runtime cannot run the model at batch 3 and 2 positions ({detail}); export it with dynamic "
            "batch and time axes (torch.onnx.export(..., dynamic_axes=...))"
        )
    raise ExportError(
        f"cannot tell whether {data_in.name!r} {show_shape(data_in.shape)} is [batch, time, ...] or [time, batch, ...]: "
        "pass --layout batch-major or --layout time-major"
    )


# ---- the checks ---------------------------------------------------------------------------------


def _check(sess: ort.InferenceSession, spec: ModelSpec, tolerance: float, pairs: list[StatePair]) -> dict[str, float]:
    """Stepwise == whole sequence (unless bidirectional) and batch rows independent, within `tolerance`."""
    figures: dict[str, float] = {}
    try:
        if spec.steppable:
            for batch in BATCH_SIZES:
                figures.update(stepwise_differences(sess, spec, batch=batch, seq_len=SEQ_LEN, seed=batch))
        figures.update(_row_differences(sess, spec))
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime cannot run the annotated model: {_first_line(exc)}; export it with dynamic batch and time axes"
        ) from exc
    failures = {k: v for k, v in figures.items() if not v <= tolerance}
    if failures:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(failures.items()))
        pairs_text = ", ".join(f"{p.input.name}:{p.output.name}" for p in pairs)
        raise ParityError(
            f"the model does not give the same result stepwise as on the whole sequence ({shown} > {tolerance:g}) "
            f"with the state pairs {pairs_text}: if a pair is wrong, name them with --state IN:OUT"
            if any(k.startswith("step_") for k in failures)
            else f"batch rows influence each other ({shown} > {tolerance:g}): lstmserve batches sessions together"
        )
    return figures


def _row_differences(sess: ort.InferenceSession, spec: ModelSpec) -> dict[str, float]:
    """Max |row i of a batch of 3 - the same sequence alone|, for the output and each final state."""
    inputs, states = random_inputs(spec, 3, SEQ_LEN, seed=7)
    together = run_whole(sess, spec, inputs, states)
    names = ["logits", *(s.output_name for s in spec.states)]
    worst = dict.fromkeys(names, 0.0)
    for row in range(3):
        alone = run_whole(sess, spec, inputs[row : row + 1], [s[:, row : row + 1] for s in states])
        for index, name in enumerate(names):
            part = together[index][row : row + 1] if index == 0 else together[index][:, row : row + 1]
            worst[name] = max(worst[name], float(np.max(np.abs(part - alone[index]))))
    return {f"rows_b3_{name}": value for name, value in worst.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
