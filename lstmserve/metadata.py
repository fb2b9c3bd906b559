"""The contract between `lstmserve export` and the server: what an exported model declares.

The exporter stores a `ModelSpec` as JSON in the ONNX model's metadata property
`METADATA_KEY`; the server reads it back and needs nothing else to serve the model.
This module depends only on the standard library.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

METADATA_KEY = "lstmserve"
FORMAT_VERSION = 2
#: Versions this module reads: 1 (LSTM only, no `cell` and friends) and 2.
READABLE_VERSIONS = (1, 2)

ModelKind = Literal["tokens", "features"]
HeadKind = Literal["language_model", "regression", "classification"]
#: The recurrent cell: "lstm" (state h and c), "gru" and "rnn" (state h only), or "custom" for an
#: annotated ONNX graph whose recurrence is not one ONNX LSTM/GRU/RNN op.
CellKind = Literal["lstm", "gru", "rnn", "custom"]
CELLS: tuple[str, ...] = ("lstm", "gru", "rnn", "custom")


class ModelSpecError(ValueError):
    """The model's metadata is missing, malformed or of an unsupported version."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor, float32 shaped [num_layers * num_directions, batch, width].

    Args:
        input_name: graph input carrying the initial state (`h0` or `c0`).
        output_name: graph output carrying the final state (`hn` or `cn`).
        width: last dimension (proj_size or hidden_size for h, hidden_size for c).
    """

    input_name: str
    output_name: str
    width: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything the server needs to know about an exported model.

    Args:
        kind: "tokens" (input `tokens`, int64 [batch, time]) or "features"
            (input `features`, float32 [batch, time, input_size]).
        input_name: name of the graph input carrying tokens or features.
        output_name: name of the graph output, float32 [batch, time, output_size].
        vocabulary: token id -> text piece; empty for feature models.
        input_size: embedding size (tokens) or feature width (features).
        hidden_size, num_layers, proj_size, bias, batch_first, dropout,
            bidirectional: the recurrent layer's configuration (`nn.LSTM`, `nn.GRU`, `nn.RNN`).
        output_size: width of the output (vocabulary size or head width).
        head: what the output means ("classification": logits over `classes`).
        h: the first state tensor (an LSTM's h, a GRU's or RNN's only state).
        c: the second state tensor (an LSTM's c); None for single-state models.
        fingerprint: sha256 of the exported weights, identifies the model.
        exporter: versions of the tools that wrote the file.
        cell: the recurrent cell (see CellKind).
        time_major: the graph's data input and output are [time, batch, ...] (the server
            transposes; clients always see [batch, time, ...]).
        classes: class names of a classification head (output index -> name).
        input_columns, output_columns: column names of a features model trained on a table.
        normalization: per-column mean and std applied inside the graph (informational:
            clients send raw values and get raw predictions), keys input_mean, input_std,
            output_mean, output_std.
        source: how the file was made: "trained" (lstmserve export), "module" (an
            already-trained PyTorch module) or "annotated" (lstmserve annotate).
    """

    kind: ModelKind
    input_name: str
    output_name: str
    vocabulary: tuple[str, ...]
    input_size: int
    hidden_size: int
    num_layers: int
    proj_size: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    output_size: int
    head: HeadKind
    h: StateSpec
    c: StateSpec | None
    fingerprint: str
    exporter: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    cell: CellKind = "lstm"
    time_major: bool = False
    classes: tuple[str, ...] = ()
    input_columns: tuple[str, ...] = ()
    output_columns: tuple[str, ...] = ()
    normalization: dict[str, list[float]] = field(default_factory=dict)
    source: str = "trained"

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def state_rows(self) -> int:
        """First dimension of every state tensor: num_layers * num_directions."""
        return self.num_layers * self.num_directions

    @property
    def states(self) -> tuple[StateSpec, ...]:
        """The state tensors: (h, c) for an LSTM, (h,) for a GRU or RNN."""
        return (self.h,) if self.c is None else (self.h, self.c)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(rows, h width, c width) of one session's state; c width is 0 without c."""
        return (self.state_rows, self.h.width, 0 if self.c is None else self.c.width)

    @property
    def steppable(self) -> bool:
        """Whether the model can be fed one step at a time (not if bidirectional)."""
        return not self.bidirectional

    def to_json(self) -> str:
        """Serialises the spec for the ONNX metadata property."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parses a spec written by `to_json`; raises ModelSpecError if it is not one."""
        try:
            data: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"model metadata {METADATA_KEY!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelSpecError(f"model metadata {METADATA_KEY!r} is not a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ModelSpecError(
                f"model metadata format_version {version!r} is not supported (expected one of {READABLE_VERSIONS})"
            )
        try:
            for name in ("vocabulary", "classes", "input_columns", "output_columns"):
                if name in data:
                    data[name] = tuple(data[name])
            data["h"] = StateSpec(**data["h"])
            data["c"] = None if data["c"] is None else StateSpec(**data["c"])
            spec = cls(**data)
        except (KeyError, TypeError) as exc:
            raise ModelSpecError(f"model metadata {METADATA_KEY!r} is incomplete: {exc}") from exc
        if spec.cell not in CELLS:
            raise ModelSpecError(f"model metadata cell {spec.cell!r} is not one of {', '.join(CELLS)}")
        if spec.cell == "lstm" and spec.c is None:
            raise ModelSpecError("model metadata declares an LSTM without its c state")
        return spec
