"""ONNX export: the graph (TorchScript exporter or hand-built Scan graph) plus the ModelSpec metadata.

Without projection the TorchScript exporter (`dynamo=False`) writes ONNX `LSTM` ops
with dynamic batch and time axes. It refuses `proj_size > 0` (and the dynamo
exporter writes a wrong graph), so projected models use `scan_graph`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

import lstmserve
from lstmserve.export.errors import ParityError
from lstmserve.export.model import LSTMModel, fingerprint
from lstmserve.export.scan_graph import BATCH, TIME, build_scan_model
from lstmserve.metadata import METADATA_KEY, ModelSpec, ModelSpecError, StateSpec

OPSET = 17
OUTPUT_NAME = "logits"
STATE_NAMES = (("h0", "hn"), ("c0", "cn"))


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


def graph_kind(model: LSTMModel) -> str:
    """Which export path a model takes: "torchscript" or "scan"."""
    return "scan" if model.config.proj_size > 0 else "torchscript"


def make_spec(model: LSTMModel, vocabulary: tuple[str, ...]) -> ModelSpec:
    """The ModelSpec declaring `model`'s interface, written into the ONNX metadata."""
    cfg = model.config
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
        head="language_model" if cfg.kind == "tokens" else "regression",
        h=StateSpec("h0", "hn", cfg.h_width),
        c=StateSpec("c0", "cn", cfg.hidden_size),
        fingerprint=fingerprint(model),
        exporter=exporter_versions(graph_kind(model)),
    )


def to_onnx(model: LSTMModel, spec: ModelSpec) -> onnx.ModelProto:
    """Builds the ONNX model for `model` with `spec` stored as metadata."""
    model.eval()
    if graph_kind(model) == "scan":
        proto = build_scan_model(model, spec.input_name, OPSET)
    else:
        proto = _torchscript_export(model, spec.input_name)
    _check_weights_are_initializers(proto)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = spec.to_json()
    return proto


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


def _torchscript_export(model: LSTMModel, name: str) -> onnx.ModelProto:
    cfg = model.config
    batch, time = 2, 3
    if cfg.kind == "tokens":
        example = torch.zeros(batch, time, dtype=torch.int64)
    else:
        example = torch.zeros(batch, time, cfg.input_size)
    h0, c0 = model.initial_state(batch)
    buffer = io.BytesIO()
    state_axes = {1: BATCH}
    with warnings.catch_warnings():
        # The tracer warns about Python bools and batch sizes; h0/c0 are inputs, so the
        # batch axis stays dynamic (the parity check runs several batch sizes).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example, h0, c0),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[name, "h0", "c0"],
            output_names=[OUTPUT_NAME, "hn", "cn"],
            dynamic_axes={
                name: {0: BATCH, 1: TIME},
                "h0": state_axes,
                "c0": state_axes,
                OUTPUT_NAME: {0: BATCH, 1: TIME},
                "hn": state_axes,
                "cn": state_axes,
            },
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _check_weights_are_initializers(proto: onnx.ModelProto) -> None:
    """LSTM weights must be constant initializers (ONNX Runtime's CUDA kernel caches them only then)."""
    initializers = {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "LSTM":
            weights = [x for x in node.input[1:4] if x]
            missing = [x for x in weights if x not in initializers]
            if missing:
                raise ParityError(f"LSTM node {node.name!r} takes computed weights {missing}; expected initializers")
            if len(node.input) > 4 and node.input[4]:
                raise ParityError(f"LSTM node {node.name!r} has a sequence_lens input {node.input[4]!r}")
