"""The exported module: input layer -> `nn.LSTM` -> head, with a batch-major interface.

`LSTMModel(inputs, h0, c0) -> (logits, hn, cn)` is exactly what the ONNX model
computes: inputs are int64 tokens [B, T] or float32 features [B, T, F], whatever
`batch_first` the LSTM itself uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lstmserve.export.config import ExportConfig


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, enough to rebuild the module from a checkpoint.

    Args:
        kind: "tokens" (embedding input) or "features" (float input).
        input_size: embedding size or feature width.
        output_size: vocabulary size or forecast width.
        vocab_size: embedding rows (0 for features).
        hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size: the `nn.LSTM` arguments.
    """

    kind: str
    input_size: int
    output_size: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    proj_size: int

    @classmethod
    def from_export(cls, config: ExportConfig, vocab_size: int) -> ModelConfig:
        """The architecture an export config asks for."""
        tokens = config.task == "tokens"
        return cls(
            kind=config.task,
            input_size=config.width,
            output_size=vocab_size if tokens else config.width,
            vocab_size=vocab_size if tokens else 0,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            bias=config.bias,
            batch_first=config.batch_first,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            proj_size=config.proj_size,
        )

    @property
    def num_directions(self) -> int:
        """2 if bidirectional else 1."""
        return 2 if self.bidirectional else 1

    @property
    def state_rows(self) -> int:
        """First dimension of h and c."""
        return self.num_layers * self.num_directions

    @property
    def h_width(self) -> int:
        """Last dimension of h: proj_size if projected, else hidden_size."""
        return self.proj_size or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint."""
        return dataclasses.asdict(self)


class LSTMModel(nn.Module):
    """Embedding (tokens) -> nn.LSTM -> linear head, batch-major in and out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vocabulary: tuple[str, ...] = ()
        self.embedding = nn.Embedding(config.vocab_size, config.input_size) if config.kind == "tokens" else None
        self.lstm = nn.LSTM(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            bias=config.bias,
            batch_first=config.batch_first,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            proj_size=config.proj_size,
        )
        self.head = nn.Linear(config.h_width * config.num_directions, config.output_size)

    def forward(
        self, inputs: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs [B, T] (tokens) or [B, T, F]; h0/c0 [rows, B, width] -> logits [B, T, out], hn, cn."""
        x = self.embedding(inputs) if self.embedding is not None else inputs
        if not self.config.batch_first:
            x = x.transpose(0, 1)
        out, (hn, cn) = self.lstm(x, (h0, c0))
        if not self.config.batch_first:
            out = out.transpose(0, 1)
        return self.head(out), hn, cn

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero h0 and c0 for `batch` sequences."""
        cfg = self.config
        return (torch.zeros(cfg.state_rows, batch, cfg.h_width), torch.zeros(cfg.state_rows, batch, cfg.hidden_size))


def fingerprint(module: nn.Module) -> str:
    """sha256 hex over the state_dict: each tensor's name, dtype, shape and bytes, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()
