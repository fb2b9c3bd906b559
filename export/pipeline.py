"""`export_model`: load data -> train -> export to ONNX -> check parity -> write files.

Everything is written into a temporary directory beside `config.out`, which replaces
the target only when every step has succeeded, so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lstmserve.export.checkpoint import save_checkpoint
from lstmserve.export.config import ExportConfig
from lstmserve.export.data import FeatureData, SequenceData, TokenData, load_features, load_sequences, load_tokens
from lstmserve.export.errors import ExportError
from lstmserve.export.onnx_export import make_spec, to_onnx, write_onnx
from lstmserve.export.parity import check_parity
from lstmserve.export.report import plot_losses, versions, write_report
from lstmserve.export.train import TrainResult, train
from lstmserve.export.train_classifier import train_classifier
from lstmserve.metadata import ModelSpec

BASELINE_NAME = {"tokens": "unigram", "features": "repeat last value", "classify": "class frequencies"}
ONNX_NAME, CHECKPOINT_NAME, REPORT_NAME, PLOT_NAME = "model.onnx", "model.pt", "report.json", "loss.png"


@dataclass(frozen=True)
class ExportResult:
    """What an export produced.

    Args:
        onnx_path, checkpoint_path, report_path, plot_path: the files written.
        spec: the ModelSpec stored in the ONNX metadata.
        parity: max absolute ONNX-vs-PyTorch differences by check.
        train_loss, val_loss: final losses (cross-entropy or MSE).
        baseline_val_loss: unigram (tokens), last-value (features) or class-frequency (classify)
            validation loss.
        loss_name: what the losses measure.
        seconds: wall time of the whole export.
        metrics: further figures (a classifier's accuracies).
        warnings: what the user should know, such as a model worse than its baseline.
    """

    onnx_path: Path
    checkpoint_path: Path
    report_path: Path
    plot_path: Path
    spec: ModelSpec
    parity: dict[str, float]
    train_loss: float
    val_loss: float
    baseline_val_loss: float
    loss_name: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """A few lines for the terminal."""
        worst = max(self.parity.values())
        task = "classify" if self.spec.head == "classification" else self.spec.kind
        lines = [
            f"{self.spec.cell.upper()} {task} model: {self.loss_name}",
            f"  train loss      {self.train_loss:.4f}",
            f"  val loss        {self.val_loss:.4f}",
            f"  baseline (val)  {self.baseline_val_loss:.4f}  ({BASELINE_NAME[task]})",
        ]
        if "val_accuracy" in self.metrics:
            lines.append(
                f"  val accuracy    {self.metrics['val_accuracy']:.3f}  (baseline {self.metrics['baseline_val_accuracy']:.3f}: "
                f"always the most frequent class; {len(self.spec.classes)} classes)"
            )
        lines += [
            f"  parity          max |ONNX - PyTorch| = {worst:.3g} over {len(self.parity)} checks"
            + ("" if self.spec.steppable else " (bidirectional: whole sequence only)"),
            f"  fingerprint     {self.spec.fingerprint[:16]}",
            f"  took            {self.seconds:.1f} s",
        ]
        lines += [f"  wrote           {p}" for p in (self.onnx_path, self.checkpoint_path, self.report_path, self.plot_path)]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def export_model(config: ExportConfig, *, progress: bool = True) -> ExportResult:
    """Trains, exports, verifies and writes model.onnx, model.pt, report.json and loss.png."""
    start = time.perf_counter()
    config.validate()
    data: TokenData | FeatureData | SequenceData
    if config.task == "tokens":
        data = load_tokens(config)
    elif config.task == "features":
        data = load_features(config)
    else:
        data = load_sequences(config)
    vocabulary = data.vocabulary if isinstance(data, TokenData) else ()
    if isinstance(data, SequenceData):
        trained = train_classifier(config, data, progress=progress)
    else:
        trained = train(config, data, progress=progress)
    model = trained.model
    model.vocabulary = vocabulary
    spec = make_spec(model, vocabulary, **_spec_extras(data))
    baseline = BASELINE_NAME[config.task]
    warnings = _warnings(trained, baseline)
    out = config.out
    with staging_dir(out) as stage:
        write_onnx(to_onnx(model, spec), stage / ONNX_NAME)
        parity = check_parity(model, stage / ONNX_NAME, spec, config.tolerance, seed=config.seed)
        save_checkpoint(stage / CHECKPOINT_NAME, model, config, vocabulary)
        plot_losses(stage / PLOT_NAME, trained, f"lstmserve export: {config.task}, {data.source}", baseline)
        seconds = time.perf_counter() - start
        report: dict[str, Any] = {
            "config": config.to_dict(),
            "data": _data_report(data),
            "metrics": trained.metrics,
            "warnings": list(warnings),
            "loss": {
                "name": trained.loss_name,
                "train": trained.train_loss,
                "val": trained.val_loss,
                "baseline_val": trained.baseline_val_loss,
                "baseline": baseline,
                "curve_train": trained.curve_train,
                "curve_val_steps": trained.val_steps,
                "curve_val": trained.val_curve,
            },
            "parity": {"tolerance": config.tolerance, "max_abs_diff": parity.figures, "worst": parity.worst},
            "spec": {"fingerprint": spec.fingerprint, "steppable": spec.steppable,
                     "input_name": spec.input_name, "output_size": spec.output_size},
            "versions": versions(spec.exporter),
            "seconds": {"train": trained.seconds, "total": seconds},
            "files": [ONNX_NAME, CHECKPOINT_NAME, REPORT_NAME, PLOT_NAME],
        }
        write_report(stage / REPORT_NAME, report)
    return ExportResult(
        onnx_path=out / ONNX_NAME,
        checkpoint_path=out / CHECKPOINT_NAME,
        report_path=out / REPORT_NAME,
        plot_path=out / PLOT_NAME,
        spec=spec,
        parity=parity.figures,
        train_loss=trained.train_loss,
        val_loss=trained.val_loss,
        baseline_val_loss=trained.baseline_val_loss,
        loss_name=trained.loss_name,
        seconds=seconds,
        metrics=trained.metrics,
        warnings=warnings,
    )


def _spec_extras(data: TokenData | FeatureData | SequenceData) -> dict[str, Any]:
    """The metadata fields the data decides: a classifier's head and classes, columns, normalisation."""
    if isinstance(data, SequenceData):
        return {"head": "classification", "classes": data.classes, "input_columns": data.input_columns,
                "normalization": data.normalization}
    if isinstance(data, FeatureData):
        return {"input_columns": data.input_columns, "output_columns": data.output_columns,
                "normalization": data.normalization}
    return {}


def _data_report(data: TokenData | FeatureData | SequenceData) -> dict[str, Any]:
    if isinstance(data, SequenceData):
        return {"source": data.source, "train_sequences": len(data.train_y), "val_sequences": len(data.val_y),
                "classes": list(data.classes), "columns": list(data.input_columns),
                "longest_sequence": int(data.train_x.shape[1])}
    report: dict[str, Any] = {"source": data.source, "train_len": len(data.train), "val_len": len(data.val)}
    if isinstance(data, TokenData):
        report["vocabulary_size"] = len(data.vocabulary)
    else:
        report.update(input_columns=list(data.input_columns), output_columns=list(data.output_columns),
                      normalization=data.normalization)
    return report


def _warnings(trained: TrainResult, baseline: str) -> tuple[str, ...]:
    """A model that does worse on validation data than its baseline is worth a warning, not a failure."""
    if trained.val_loss > trained.baseline_val_loss:
        return (
            f"the model is worse than the {baseline} baseline on validation data "
            f"(loss {trained.val_loss:.4f} > {trained.baseline_val_loss:.4f}): train longer (--steps), "
            "change the model, or check the data",
        )
    return ()


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temp dir beside `target` that replaces it on success and is removed on failure."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"--out {str(target)!r} exists and is not a directory")
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {str(target)!r}: cannot create {str(parent)!r}: {exc}") from exc
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        stage.chmod(0o755)
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
        target.rename(old / target.name)
    stage.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
