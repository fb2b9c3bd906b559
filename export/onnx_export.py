"""ONNX export: the graph (TorchScript exporter or hand-built Scan graph) plus the ModelSpec metadata.

Without projection the TorchScript exporter (`dynamo=False`) writes ONNX `LSTM`, `GRU`
or `RNN` ops with dynamic batch and time axes. It refuses `proj_size > 0` (and the
dynamo exporter writes a wrong graph), so projected LSTMs use `scan_graph`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

import lstmserve
from lstmserve.export.errors import ParityError
from lstmserve.export.model import RecurrentModel, fingerprint
from lstmserve.export.scan_graph import BATCH, TIME, build_scan_model
from lstmserve.metadata import METADATA_KEY, ModelSpec, ModelSpecError, StateSpec

OPSET = 17
OUTPUT_NAME = "logits"
STATE_NAMES = (("h0", "hn"), ("c0", "cn"))
#: The ONNX ops of the recurrent layers, whose weights must be initializers.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
HEADS = {"tokens": "language_model", "features": "regression"}


def input_name(kind: str) -> str:
    """The graph input carrying the data: `tokens` or `features`."""
    return "tokens" if kind == "tokens" else "features"


def exporter_versions(path_kind: str) -> dict[str, str]:
    """The versions recorded in the metadata and report."""
    return {
        "lstmserve": lstmserve.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": str(OPSET),
        "graph": path_kind,
    }


def graph_kind(model: RecurrentModel) -> str:
    """Which export path a model takes: "torchscript" or "scan"."""
    return "scan" if model.config.proj_size > 0 else "torchscript"


def state_specs(cell: str, h_width: int, hidden_size: int) -> tuple[StateSpec, StateSpec | None]:
    """h (h0 -> hn) and, for an LSTM, c (c0 -> cn)."""
    (h_in, h_out), (c_in, c_out) = STATE_NAMES
    c = StateSpec(c_in, c_out, hidden_size) if cell == "lstm" else None
    return StateSpec(h_in, h_out, h_width), c


def make_spec(model: RecurrentModel, vocabulary: tuple[str, ...], **extra: object) -> ModelSpec:
    """The ModelSpec declaring `model`'s interface, written into the ONNX metadata (`extra`: more fields,
    such as head, classes or normalization)."""
    cfg = model.config
    h, c = state_specs(cfg.cell, cfg.h_width, cfg.hidden_size)
    fields: dict[str, Any] = dict(
        head=HEADS["tokens" if cfg.kind == "tokens" else "features"],
        h=h,
        c=c,
        fingerprint=fingerprint(model),
        exporter=exporter_versions(graph_kind(model)),
        cell=cfg.cell,
    )
    fields.update(extra)
    return ModelSpec(
        kind="tokens" if cfg.kind == "tokens" else "features",
        input_name=input_name(cfg.kind),
        output_name=OUTPUT_NAME,
        vocabulary=vocabulary,
        input_size=cfg.input_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        proj_size=cfg.proj_size,
        bias=cfg.bias,
        batch_first=cfg.batch_first,
        dropout=cfg.dropout,
        bidirectional=cfg.bidirectional,
        output_size=cfg.output_size,
        **fields,
    )


def to_onnx(model: RecurrentModel, spec: ModelSpec) -> onnx.ModelProto:
    """Builds the ONNX model for `model` with `spec` stored as metadata."""
    model.eval()
    if graph_kind(model) == "scan":
        proto = build_scan_model(model, spec.input_name, OPSET)
    else:
        cfg = model.config
        if cfg.kind == "tokens":
            example = torch.zeros(2, 3, dtype=torch.int64)
        else:
            example = torch.zeros(2, 3, cfg.input_size)
        proto = torchscript_export(model, example, model.initial_state(2), spec)
    check_weights_are_initializers(proto)
    set_metadata(proto, spec)
    return proto


def set_metadata(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Stores `spec` as the model's only metadata property."""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = spec.to_json()


def write_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """Saves the model as a single file."""
    onnx.save_model(proto, str(path))


def read_spec(path: Path) -> ModelSpec:
    """The ModelSpec stored in an exported ONNX file; raises ModelSpecError if there is none."""
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return ModelSpec.from_json(entry.value)
    raise ModelSpecError(f"{str(path)!r} has no {METADATA_KEY!r} metadata")


def torchscript_export(
    model: torch.nn.Module, example: torch.Tensor, state: tuple[torch.Tensor, ...], spec: ModelSpec
) -> onnx.ModelProto:
    """Exports a batch-major `model(inputs, *state) -> (output, *state)` with the TorchScript exporter,
    naming its tensors as `spec` says, with dynamic batch and time axes."""
    buffer = io.BytesIO()
    state_axes = {1: BATCH}
    data_axes = {0: BATCH, 1: TIME}
    state_in = [s.input_name for s in spec.states]
    state_out = [s.output_name for s in spec.states]
    with warnings.catch_warnings():
        # The tracer warns about Python bools and batch sizes; the state tensors are inputs, so the
        # batch axis stays dynamic (the parity check runs several batch sizes).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example, *state),
            buffer,  # type: ignore[arg-type]  # torch's annotation says a path; a file object works, as its docs say
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[spec.input_name, *state_in],
            output_names=[spec.output_name, *state_out],
            dynamic_axes={
                spec.input_name: data_axes,
                spec.output_name: data_axes,
                **{name: state_axes for name in state_in + state_out},
            },
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_weights_are_initializers(proto: onnx.ModelProto) -> None:
    """LSTM/GRU/RNN weights must be constant initializers (ONNX Runtime's CUDA kernel caches them only then)."""
    initializers = {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in RECURRENT_OPS:
            weights = [x for x in node.input[1:4] if x]
            missing = [x for x in weights if x not in initializers]
            if missing:
                raise ParityError(
                    f"{node.op_type} node {node.name!r} takes computed weights {missing}; expected initializers"
                )
            if len(node.input) > 4 and node.input[4]:
                raise ParityError(f"{node.op_type} node {node.name!r} has a sequence_lens input {node.input[4]!r}")
