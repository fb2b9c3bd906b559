"""What an export leaves besides the model: `report.json`, `loss.png` and the printed summary."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from lstmserve.export.train import TrainResult


def write_report(path: Path, data: dict[str, Any]) -> None:
    """Writes the report as indented JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def versions(exporter: dict[str, str]) -> dict[str, str]:
    """Tool versions for the report: the exporter's plus Python, ONNX Runtime, numpy."""
    import numpy
    import onnxruntime

    return {**exporter, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__}


def plot_losses(path: Path, result: TrainResult, title: str, baseline: str) -> None:
    """Training loss per step, validation loss, and the baseline, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = list(range(1, len(result.curve_train) + 1))
    ax.plot(steps, result.curve_train, label="train (per step)", linewidth=0.8, alpha=0.7)
    ax.plot(result.val_steps, result.val_curve, "o-", label="validation", markersize=3)
    ax.axhline(result.baseline_val_loss, color="grey", linestyle="--", label=f"{baseline} baseline (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel(result.loss_name)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
