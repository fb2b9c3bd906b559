"""The exported module: input layer -> `nn.LSTM`, `nn.GRU` or `nn.RNN` -> head, with a batch-major interface.

`RecurrentModel(inputs, *state) -> (logits, *state)` is exactly what the ONNX model
computes: inputs are int64 tokens [B, T] or float32 features [B, T, F], whatever
`batch_first` the recurrent layer itself uses; the state is (h, c) for an LSTM and
(h,) for a GRU or RNN.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lstmserve.export.config import ExportConfig

#: The recurrent layer of each cell kind.
CELL_LAYERS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, enough to rebuild the module from a checkpoint.

    Args:
        kind: "tokens" (embedding input) or "features" (float input).
        input_size: embedding size or feature width.
        output_size: vocabulary size, forecast width or number of classes.
        vocab_size: embedding rows (0 for features).
        hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size: the recurrent layer's arguments (proj_size: LSTM only).
        cell: "lstm", "gru" or "rnn".
        input_norm: standardise the features inside the model, (x - mean) / std (see `normalize`).
        output_norm: the head predicts standardised values, turned back into the data's units
            inside the model, y * std + mean.
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
    cell: str = "lstm"
    input_norm: bool = False
    output_norm: bool = False

    @classmethod
    def from_export(
        cls,
        config: ExportConfig,
        vocab_size: int,
        *,
        input_size: int | None = None,
        output_size: int | None = None,
        input_norm: bool = False,
        output_norm: bool = False,
    ) -> ModelConfig:
        """The architecture an export config asks for (widths and normalisation: when the data sets them)."""
        tokens = config.task == "tokens"
        width = input_size or config.width
        return cls(
            kind="tokens" if tokens else "features",
            input_size=width,
            output_size=output_size or (vocab_size if tokens else width),
            vocab_size=vocab_size if tokens else 0,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            bias=config.bias,
            batch_first=config.batch_first,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            proj_size=config.proj_size,
            cell=config.cell,
            input_norm=input_norm,
            output_norm=output_norm,
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


class RecurrentModel(nn.Module):
    """Embedding (tokens) -> nn.LSTM, nn.GRU or nn.RNN -> linear head, batch-major in and out.

    Args:
        config: the architecture.
    """

    # Buffers registered in __init__ when the config standardises inputs or outputs.
    input_mean: torch.Tensor
    input_std: torch.Tensor
    output_mean: torch.Tensor
    output_std: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vocabulary: tuple[str, ...] = ()
        self.embedding = nn.Embedding(config.vocab_size, config.input_size) if config.kind == "tokens" else None
        options: dict[str, Any] = {"proj_size": config.proj_size} if config.cell == "lstm" else {}
        # Named `lstm` whatever the cell, so that checkpoints keep their parameter names.
        self.lstm = CELL_LAYERS[config.cell](
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            bias=config.bias,
            batch_first=config.batch_first,
            dropout=config.dropout,
            bidirectional=config.bidirectional,
            **options,
        )
        self.head = nn.Linear(config.h_width * config.num_directions, config.output_size)
        if config.input_norm:
            self.register_buffer("input_mean", torch.zeros(config.input_size))
            self.register_buffer("input_std", torch.ones(config.input_size))
        if config.output_norm:
            self.register_buffer("output_mean", torch.zeros(config.output_size))
            self.register_buffer("output_std", torch.ones(config.output_size))

    def normalize(self, normalization: dict[str, list[float]]) -> None:
        """Sets the per-column means and stds (keys input_mean, input_std, output_mean, output_std)."""
        for name, values in normalization.items():
            buffer = getattr(self, name)
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype))

    def standardized(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs (or targets) in the data's units -> standardised units, for the loss (identity without
        output_norm)."""
        if not self.config.output_norm:
            return outputs
        return (outputs - self.output_mean) / self.output_std

    def forward(self, inputs: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """inputs [B, T] (tokens) or [B, T, F]; state h0 (and c0) [rows, B, width] -> (logits [B, T, out], hn[, cn])."""
        x = self.embedding(inputs) if self.embedding is not None else inputs
        if self.config.input_norm:
            x = (x - self.input_mean) / self.input_std
        if not self.config.batch_first:
            x = x.transpose(0, 1)
        if self.config.cell == "lstm":
            out, (hn, cn) = self.lstm(x, (state[0], state[1]))
            final: tuple[torch.Tensor, ...] = (hn, cn)
        else:
            out, hn = self.lstm(x, state[0])
            final = (hn,)
        if not self.config.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out)
        if self.config.output_norm:
            y = y * self.output_std + self.output_mean
        return (y, *final)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zero state for `batch` sequences: (h0, c0) for an LSTM, (h0,) for a GRU or RNN."""
        cfg = self.config
        h0 = torch.zeros(cfg.state_rows, batch, cfg.h_width)
        if cfg.cell != "lstm":
            return (h0,)
        return (h0, torch.zeros(cfg.state_rows, batch, cfg.hidden_size))


LSTMModel = RecurrentModel
"""The former name of RecurrentModel (it has served GRU and RNN cells too since `cell`)."""


def fingerprint(module: nn.Module) -> str:
    """sha256 hex over the state_dict: each tensor's name, dtype, shape and bytes, sorted by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()
