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
FORMAT_VERSION = 1

ModelKind = Literal["tokens", "features"]
HeadKind = Literal["language_model", "regression", "classification"]


class ModelSpecError(ValueError):
    """The model's metadata is missing, malformed or of an unsupported version."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor, shaped [num_layers * num_directions, batch, width].

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
            bidirectional: the `nn.LSTM` configuration.
        output_size: width of the output (vocabulary size or head width).
        head: what the output means.
        h, c: the two state tensors.
        fingerprint: sha256 of the exported weights, identifies the model.
        exporter: versions of the tools that wrote the file.
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
    c: StateSpec
    fingerprint: str
    exporter: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional LSTM, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def state_rows(self) -> int:
        """First dimension of h and c: num_layers * num_directions."""
        return self.num_layers * self.num_directions

    @property
    def steppable(self) -> bool:
        """Whether the model can be fed one step at a time (not if bidirectional)."""
        return not self.bidirectional

    def to_json(self) -> str:
        """Serialises the spec for the ONNX metadata property."""
        data = asdict(self)
        data["vocabulary"] = list(self.vocabulary)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parses a spec written by `to_json`; raises ModelSpecError if it is not one."""
        try:
            data: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"model metadata {METADATA_KEY!r} is not valid JSON: {exc}") from exc
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelSpecError(
                f"model metadata format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            data["vocabulary"] = tuple(data["vocabulary"])
            data["h"] = StateSpec(**data["h"])
            data["c"] = StateSpec(**data["c"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ModelSpecError(f"model metadata {METADATA_KEY!r} is incomplete: {exc}") from exc
