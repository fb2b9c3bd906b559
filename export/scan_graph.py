"""A hand-built ONNX graph for `nn.LSTM` models the exporters cannot handle (proj_size > 0).

Per layer and direction: the input projection for all time steps as one MatMul,
then a `Scan` over time whose body is the LSTM cell (MatMul/Add/Sigmoid/Tanh, plus
the projection MatMul when proj_size > 0). Every weight is a constant initializer.
The interface matches the TorchScript export: tokens|features, h0, c0 -> logits, hn, cn,
all batch-major, batch and time dynamic. Works for proj_size == 0 too (used as a cross-check).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lstmserve.export.model import RecurrentModel

BATCH, TIME = "batch", "time"


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}{stem}_{self._count}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(array.copy(order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, outputs: int = 1, **attrs: Any) -> list[str]:
        names = [self.name(stem or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], stem: str | None = None, **attrs: object) -> str:
        return self.op(op_type, inputs, stem, 1, **attrs)[0]


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def _cell_body(w_hh_t: str, w_hr_t: str | None, hidden: int, width: int) -> onnx.GraphProto:
    """Scan body: (h [B,width], c [B,hidden], xg [B,4*hidden]) -> (h', c', h' as scan output)."""
    b = _Builder(prefix="cell_")
    recurrent = b.op1("MatMul", ["h_prev", w_hh_t], "rec")
    gates = b.op1("Add", ["xg_t", recurrent], "gates")
    i, f, g, o = b.op("Split", [gates], "gate", outputs=4, axis=1)
    i, f, o = (b.op1("Sigmoid", [x]) for x in (i, f, o))
    g = b.op1("Tanh", [g])
    c_new = b.op1("Add", [b.op1("Mul", [f, "c_prev"]), b.op1("Mul", [i, g])], "c")
    h_full = b.op1("Mul", [o, b.op1("Tanh", [c_new])], "h_full")
    h_new = b.op1("MatMul", [h_full, w_hr_t], "h_proj") if w_hr_t is not None else h_full
    b.nodes.append(helper.make_node("Identity", [h_new], ["h_out"], name="h_out"))
    b.nodes.append(helper.make_node("Identity", [c_new], ["c_out"], name="c_out"))
    b.nodes.append(helper.make_node("Identity", [h_new], ["y_out"], name="y_out"))
    f32 = TensorProto.FLOAT
    return helper.make_graph(
        b.nodes,
        "lstm_cell",
        [
            helper.make_tensor_value_info("h_prev", f32, [None, width]),
            helper.make_tensor_value_info("c_prev", f32, [None, hidden]),
            helper.make_tensor_value_info("xg_t", f32, [None, 4 * hidden]),
        ],
        [
            helper.make_tensor_value_info("h_out", f32, [None, width]),
            helper.make_tensor_value_info("c_out", f32, [None, hidden]),
            helper.make_tensor_value_info("y_out", f32, [None, width]),
        ],
    )


def build_scan_model(model: RecurrentModel, input_name: str, opset: int) -> onnx.ModelProto:
    """The ONNX model for `model`, built node by node (no tracing)."""
    cfg = model.config
    lstm = model.lstm
    b = _Builder()
    width = cfg.h_width
    f32 = TensorProto.FLOAT

    if model.embedding is not None:
        table = b.const("embedding", _np(model.embedding.weight))
        x = b.op1("Gather", [table, input_name], "embedded", axis=0)
        graph_input = helper.make_tensor_value_info(input_name, TensorProto.INT64, [BATCH, TIME])
    else:
        x = input_name
        graph_input = helper.make_tensor_value_info(input_name, f32, [BATCH, TIME, cfg.input_size])
        if cfg.input_norm:  # (x - mean) / std, as RecurrentModel.forward
            x = b.op1("Sub", [x, b.const("input_mean", _np(model.input_mean))], "centred")
            x = b.op1("Div", [x, b.const("input_std", _np(model.input_std))], "standardised")
    x = b.op1("Transpose", [x], "time_major", perm=[1, 0, 2])  # [T, B, in]

    h_finals: list[str] = []
    c_finals: list[str] = []
    for layer in range(cfg.num_layers):
        outputs = []
        for direction in range(cfg.num_directions):
            suffix = f"l{layer}" + ("_reverse" if direction else "")
            row = layer * cfg.num_directions + direction
            w_ih = _np(getattr(lstm, f"weight_ih_{suffix}"))
            w_hh = _np(getattr(lstm, f"weight_hh_{suffix}"))
            xg = b.op1("MatMul", [x, b.const(f"w_ih_{suffix}_t", w_ih.T)], f"xw_{suffix}")
            if cfg.bias:
                bias = _np(getattr(lstm, f"bias_ih_{suffix}")) + _np(getattr(lstm, f"bias_hh_{suffix}"))
                xg = b.op1("Add", [xg, b.const(f"b_{suffix}", bias)], f"xg_{suffix}")
            w_hh_t = b.const(f"w_hh_{suffix}_t", w_hh.T)
            w_hr_t = b.const(f"w_hr_{suffix}_t", _np(getattr(lstm, f"weight_hr_{suffix}")).T) if cfg.proj_size else None
            index = b.const(f"row_{row}", np.array(row, dtype=np.int64))
            h_init = b.op1("Gather", ["h0", index], f"h0_{suffix}", axis=0)
            c_init = b.op1("Gather", ["c0", index], f"c0_{suffix}", axis=0)
            h_last, c_last, y = b.op(
                "Scan",
                [h_init, c_init, xg],
                f"scan_{suffix}",
                outputs=3,
                body=_cell_body(w_hh_t, w_hr_t, cfg.hidden_size, width),
                num_scan_inputs=1,
                scan_input_directions=[direction],
                scan_output_directions=[direction],
            )
            outputs.append(y)
            axis0 = b.const("axis0", np.array([0], dtype=np.int64))
            h_finals.append(b.op1("Unsqueeze", [h_last, axis0], f"hn_{suffix}"))
            c_finals.append(b.op1("Unsqueeze", [c_last, axis0], f"cn_{suffix}"))
        x = outputs[0] if len(outputs) == 1 else b.op1("Concat", outputs, f"y_l{layer}", axis=2)

    batch_major = b.op1("Transpose", [x], "batch_major", perm=[1, 0, 2])
    logits = b.op1("MatMul", [batch_major, b.const("head_w_t", _np(model.head.weight).T)], "head")
    if cfg.output_norm:  # y * std + mean, as RecurrentModel.forward
        logits = b.op1("Add", [logits, b.const("head_b", _np(model.head.bias))], "head_out")
        logits = b.op1("Mul", [logits, b.const("output_std", _np(model.output_std))], "scaled")
        b.nodes.append(helper.make_node("Add", [logits, b.const("output_mean", _np(model.output_mean))], ["logits"], name="logits"))
    else:
        b.nodes.append(helper.make_node("Add", [logits, b.const("head_b", _np(model.head.bias))], ["logits"], name="logits"))
    b.nodes.append(helper.make_node("Concat", h_finals, ["hn"], name="hn", axis=0))
    b.nodes.append(helper.make_node("Concat", c_finals, ["cn"], name="cn", axis=0))

    rows = cfg.state_rows
    graph = helper.make_graph(
        b.nodes,
        "lstmserve",
        [
            graph_input,
            helper.make_tensor_value_info("h0", f32, [rows, BATCH, width]),
            helper.make_tensor_value_info("c0", f32, [rows, BATCH, cfg.hidden_size]),
        ],
        [
            helper.make_tensor_value_info("logits", f32, [BATCH, TIME, cfg.output_size]),
            helper.make_tensor_value_info("hn", f32, [rows, BATCH, width]),
            helper.make_tensor_value_info("cn", f32, [rows, BATCH, cfg.hidden_size]),
        ],
        initializer=b.initializers,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lstmserve")
    onnx_model.ir_version = min(onnx_model.ir_version, 10)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model
