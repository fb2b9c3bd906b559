"""Training: a seeded, deterministic loop with a tqdm progress bar and a loss curve."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lstmserve.export.config import ExportConfig
from lstmserve.export.data import Batch, FeatureData, SequenceData, TokenData, fixed_batches, sample_batch
from lstmserve.export.model import ModelConfig, RecurrentModel

LOSS_NAME = {
    "tokens": "cross-entropy (nats/char)",
    "features": "mean squared error",
    "classify": "cross-entropy (nats/sequence)",
}


@dataclass(frozen=True)
class TrainResult:
    """A trained model and how training went.

    Args:
        model: the trained module, in eval mode.
        train_loss, val_loss: final losses on fixed train and validation windows.
        baseline_val_loss: unigram (tokens) or last-value (features) validation loss.
        curve_train: training loss at each step (1-based).
        val_steps, val_curve: validation loss at each evaluation.
        loss_name: what the losses measure.
        seconds: training wall time.
        metrics: further figures (a classifier's val_accuracy and baseline_val_accuracy).
    """

    model: RecurrentModel
    train_loss: float
    val_loss: float
    baseline_val_loss: float
    curve_train: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_curve: list[float] = field(default_factory=list)
    loss_name: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeds torch and turns on deterministic algorithms, restoring the setting afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def build_model(config: ExportConfig, data: TokenData | FeatureData | SequenceData) -> RecurrentModel:
    """The untrained model for `data`: its vocabulary or widths, and its normalisation baked in."""
    if isinstance(data, TokenData):
        return RecurrentModel(ModelConfig.from_export(config, len(data.vocabulary)))
    if isinstance(data, SequenceData):
        model_config = ModelConfig.from_export(
            config, 0, input_size=data.width, output_size=len(data.classes), input_norm=True
        )
    else:
        normalized = bool(data.normalization)
        model_config = ModelConfig.from_export(
            config, 0, input_size=data.width, output_size=data.output_width, input_norm=normalized,
            output_norm=normalized,
        )
    model = RecurrentModel(model_config)
    model.normalize(data.normalization)
    return model


def train(config: ExportConfig, data: TokenData | FeatureData, *, progress: bool = True) -> TrainResult:
    """Trains the model the config describes on `data`; deterministic for a given seed."""
    start = time.perf_counter()
    select = data.select if isinstance(data, FeatureData) else (lambda batch: batch)
    with deterministic(config.seed):
        model = build_model(config, data)
        loss_fn = _loss_fn(config)
        gen = torch.Generator().manual_seed(config.seed)
        val_batches = [select(b) for b in fixed_batches(data.val, config.eval_batches, config.batch_size, config.seq_len)]

        def train_loss() -> torch.Tensor:
            return _batch_loss(model, loss_fn, select(sample_batch(data.train, config.batch_size, config.seq_len, gen)))

        curve, val_steps, val_curve = fit(config, model, train_loss, lambda: evaluate(model, loss_fn, val_batches),
                                          progress=progress)
        model.eval()
        train_batches = [select(b) for b in fixed_batches(data.train, config.eval_batches, config.batch_size, config.seq_len)]
        train_loss_value = evaluate(model, loss_fn, train_batches)
    return TrainResult(
        model=model,
        train_loss=train_loss_value,
        val_loss=val_curve[-1],
        baseline_val_loss=baseline_loss(config, data, model),
        curve_train=curve,
        val_steps=val_steps,
        val_curve=val_curve,
        loss_name=LOSS_NAME[config.task] + (" (standardised units)" if model.config.output_norm else ""),
        seconds=time.perf_counter() - start,
    )


def fit(
    config: ExportConfig,
    model: nn.Module,
    train_loss: Callable[[], torch.Tensor],
    validate: Callable[[], float],
    *,
    progress: bool,
) -> tuple[list[float], list[int], list[float]]:
    """The optimisation loop: Adam with warm-up and cosine decay, gradient clipping, a validation
    measurement every eval_every steps and at the end. Returns the training curve and the validation steps
    and losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.steps))
    curve: list[float] = []
    val_steps: list[int] = []
    val_curve: list[float] = []
    bar = tqdm(range(1, config.steps + 1), desc="training", unit="step", disable=not progress, leave=True)
    model.train()
    for step in bar:
        loss = train_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        curve.append(float(loss.item()))
        if step % config.eval_every == 0 or step == config.steps:
            val_steps.append(step)
            val_curve.append(validate())
            model.train()
            bar.set_postfix(loss=f"{_smoothed(curve):.4f}", val=f"{val_curve[-1]:.4f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{_smoothed(curve):.4f}", val=f"{val_curve[-1]:.4f}" if val_curve else "-")
    bar.close()
    model.eval()
    return curve, val_steps, val_curve


def evaluate(model: RecurrentModel, loss_fn: nn.Module, batches: list[Batch]) -> float:
    """Mean loss over fixed batches, in eval mode, from a zero state."""
    model.eval()
    with torch.no_grad():
        losses = [float(_batch_loss(model, loss_fn, batch).item()) for batch in batches]
    return sum(losses) / len(losses)


def baseline_loss(config: ExportConfig, data: TokenData | FeatureData, model: RecurrentModel) -> float:
    """The loss a model without memory gets on the validation windows.

    Tokens: cross-entropy of the training unigram distribution (add-one smoothed).
    Features: mean squared error of predicting the last value of each target column again
    (in the model's standardised units when it has them).
    """
    val_batches = fixed_batches(data.val, config.eval_batches, config.batch_size, config.seq_len)
    if isinstance(data, TokenData):
        counts = torch.bincount(data.train, minlength=len(data.vocabulary)).double() + 1.0
        log_probs = torch.log(counts / counts.sum())
        targets = torch.cat([b.targets.reshape(-1) for b in val_batches])
        return float(-log_probs[targets].mean())
    columns = list(data.targets or data.inputs) or list(range(int(data.train.shape[1])))
    with torch.no_grad():
        errors = [
            ((model.standardized(b.inputs[..., columns]) - model.standardized(b.targets[..., columns])) ** 2).mean()
            for b in val_batches
        ]
    return float(torch.stack(errors).mean())


def _loss_fn(config: ExportConfig) -> nn.Module:
    return nn.CrossEntropyLoss() if config.task == "tokens" else nn.MSELoss()


def _batch_loss(model: RecurrentModel, loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch.inputs, *model.initial_state(batch.inputs.shape[0]))[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
    return loss_fn(model.standardized(logits), model.standardized(batch.targets))


def _lr_factor(step: int, steps: int) -> float:
    """Short linear warm-up, then cosine decay to a tenth."""
    warmup = max(1, steps // 50)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _smoothed(curve: list[float], window: int = 20) -> float:
    tail = curve[-window:]
    return sum(tail) / len(tail)
