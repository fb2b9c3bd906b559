"""The PyTorch checkpoint `model.pt`: weights plus the full config, reloadable into the same module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lstmserve.export.config import ExportConfig
from lstmserve.export.errors import ExportError
from lstmserve.export.model import ModelConfig, RecurrentModel

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, model: RecurrentModel, config: ExportConfig, vocabulary: tuple[str, ...]) -> None:
    """Writes the weights, the architecture, the export config and the vocabulary."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "export_config": config.to_dict(),
        "vocabulary": list(vocabulary),
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)


def load_checkpoint(path: str | Path) -> RecurrentModel:
    """Rebuilds the exported module from `model.pt`, in eval mode.

    `module(inputs, *state)` with batch-major inputs returns `(logits, *state)` (state: h0, c0 for an
    LSTM, h0 for a GRU or RNN), exactly what the ONNX model computes.
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{str(path)!r} is not an lstmserve checkpoint (format {CHECKPOINT_FORMAT})")
    model = RecurrentModel(ModelConfig(**payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.vocabulary = tuple(payload["vocabulary"])
    return model.eval()
