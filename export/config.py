"""What `lstmserve export` trains and where it writes: one frozen, validated config.

Depends only on the standard library, so the command line can build and check a
config without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lstmserve.export.errors import ExportError

Task = Literal["tokens", "features", "classify"]
TASKS: tuple[str, ...] = ("tokens", "features", "classify")
Cell = Literal["lstm", "gru", "rnn"]
CELLS: tuple[str, ...] = ("lstm", "gru", "rnn")

#: Input width used when `input_size` is not given: embedding size or feature width.
DEFAULT_INPUT_SIZE: dict[str, int] = {"tokens": 64, "features": 28}

#: Named starting points; explicit values override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "hidden_size": 16,
        "num_layers": 1,
        "steps": 100,
        "batch_size": 8,
        "seq_len": 16,
        "lr": 1e-2,
        "eval_every": 25,
        "eval_batches": 2,
    },
}


@dataclass(frozen=True)
class ExportConfig:
    """Every option of `lstmserve export`.

    Args:
        task: "tokens" (character language model), "features" (forecast the next row of a
            signal or table) or "classify" (label whole sequences, answering after every row).
        corpus: UTF-8 text file to train on (tokens only); None uses the built-in
            corpus made from the Python standard library sources.
        data: features: a .csv (header row) or .npy file of rows in time order (None: a
            synthetic signal); classify: a .csv with a sequence id column, a label column
            and feature columns (None: scikit-learn's bundled 8x8 digits, row by row).
        columns: the feature columns to read (None: every numeric one).
        targets: features: the columns to forecast (None: the input columns).
        val_fraction: the share held out for validation: the tail of a series, or a seeded
            random share of a classifier's sequences.
        label_column, sequence_column: classify: the CSV's label and sequence id columns.
        classes: classify: the allowed labels in output order (None: the sorted labels seen).
        input_size: embedding size (tokens) or feature width (synthetic features); None
            means 64 for tokens and 28 for features; with --data the width comes from the file.
        cell: the recurrent layer: "lstm" (`nn.LSTM`), "gru" (`nn.GRU`) or "rnn" (`nn.RNN`, tanh).
        hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size: passed to the recurrent layer unchanged (proj_size: LSTM only).
        steps: optimiser steps.
        batch_size: sequences per step.
        seq_len: time steps per training sequence.
        lr: Adam learning rate (cosine-decayed to a tenth over the run).
        seed: seeds data sampling, initialisation and dropout.
        out: output directory (replaced as a whole at the end).
        grad_clip: maximum gradient norm.
        eval_every: steps between validation measurements.
        eval_batches: batches per validation measurement.
        tolerance: largest allowed ONNX-vs-PyTorch difference.
    """

    task: Task = "tokens"
    corpus: Path | None = None
    data: Path | None = None
    columns: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    label_column: str = "label"
    sequence_column: str = "sequence"
    classes: tuple[str, ...] | None = None
    cell: Cell = "lstm"
    input_size: int | None = None
    hidden_size: int = 256
    num_layers: int = 2
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    steps: int = 900
    batch_size: int = 32
    seq_len: int = 96
    lr: float = 3e-3
    seed: int = 0
    out: Path = Path("models/default")
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.input_size is None and not self.from_data:
            object.__setattr__(self, "input_size", DEFAULT_INPUT_SIZE.get(self.task, 0))
        if self.corpus is not None and not isinstance(self.corpus, Path):
            object.__setattr__(self, "corpus", Path(self.corpus))
        if self.data is not None and not isinstance(self.data, Path):
            object.__setattr__(self, "data", Path(self.data))
        for name in ("columns", "targets", "classes"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(v.strip() for v in value.split(",")))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))
        self.validate()

    @property
    def from_data(self) -> bool:
        """Whether the input width comes from the data (a classifier, or features from --data)."""
        return self.task == "classify" or (self.task == "features" and self.data is not None)

    @property
    def width(self) -> int:
        """The resolved input size (0 until the data sets it, for `from_data` configs)."""
        return int(self.input_size or 0)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ExportConfig:
        """The named preset with `overrides` applied on top."""
        if name not in PRESETS:
            raise ExportError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> ExportConfig:
        """A model that trains in a second or two, for tests and smoke runs."""
        return cls.preset("tiny", **overrides)

    def replace(self, **changes: Any) -> ExportConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raises ExportError naming the first bad value."""
        if self.task not in TASKS:
            raise ExportError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.cell not in CELLS:
            raise ExportError(f"--cell {self.cell!r} is not one of {', '.join(CELLS)}")
        for name in ("hidden_size", "num_layers", "steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            _positive_int(name, getattr(self, name))
        if self.input_size is not None or not self.from_data:
            _positive_int("input_size", self.input_size)
        if isinstance(self.proj_size, bool) or not isinstance(self.proj_size, int) or self.proj_size < 0:
            raise ExportError(f"--proj-size must be an integer >= 0, got {self.proj_size!r}")
        if self.proj_size and self.cell != "lstm":
            raise ExportError(f"--proj-size {self.proj_size} only applies to --cell lstm, not {self.cell}")
        if self.proj_size >= self.hidden_size:
            raise ExportError(
                f"--proj-size {self.proj_size} must be smaller than --hidden-size {self.hidden_size}"
            )
        if not _finite(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ExportError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("lr", "grad_clip", "tolerance"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ExportError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if self.task != "tokens" and self.corpus is not None:
            raise ExportError(f"--corpus {str(self.corpus)!r} only applies to --task tokens (use --data)")
        if self.task == "tokens" and self.data is not None:
            raise ExportError(f"--data {str(self.data)!r} applies to --task features or classify (use --corpus for text)")
        if self.task == "features" and self.data is None and (self.columns or self.targets):
            raise ExportError("--columns and --targets select columns of --data FILE")
        if self.task != "features" and self.targets is not None:
            raise ExportError("--targets only applies to --task features")
        if self.task != "classify" and self.classes is not None:
            raise ExportError("--classes only applies to --task classify (or --module)")
        if self.task == "classify" and self.data is None and self.columns:
            raise ExportError("--columns selects columns of --data FILE")
        for name in ("columns", "targets", "classes"):
            value = getattr(self, name)
            if value is not None and (not value or any(not v for v in value) or len(set(value)) != len(value)):
                raise ExportError(f"--{name} must list distinct, non-empty names, got {','.join(value)!r}")
        if not _finite(self.val_fraction) or not 0.0 < self.val_fraction <= 0.5:
            raise ExportError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {str(self.out)!r} exists and is not a directory")
        if self.out.name in ("", ".", ".."):
            raise ExportError(f"--out {str(self.out)!r} must name a directory to create or replace")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings)."""
        data = dataclasses.asdict(self)
        data["corpus"] = None if self.corpus is None else str(self.corpus)
        data["data"] = None if self.data is None else str(self.data)
        data["out"] = str(self.out)
        for name in ("columns", "targets", "classes"):
            data[name] = None if data[name] is None else list(data[name])
        return data


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
