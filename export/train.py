"""Training: a seeded, deterministic loop with a tqdm progress bar and a loss curve."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lstmserve.export.config import ExportConfig
from lstmserve.export.data import Batch, FeatureData, TokenData, fixed_batches, sample_batch
from lstmserve.export.model import ModelConfig, RecurrentModel

LOSS_NAME = {"tokens": "cross-entropy (nats/char)", "features": "mean squared error"}


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


def train(config: ExportConfig, data: TokenData | FeatureData, *, progress: bool = True) -> TrainResult:
    """Trains the model the config describes on `data`; deterministic for a given seed."""
    start = time.perf_counter()
    vocab_size = len(data.vocabulary) if isinstance(data, TokenData) else 0
    with deterministic(config.seed):
        model = RecurrentModel(ModelConfig.from_export(config, vocab_size))
        loss_fn = _loss_fn(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.steps))
        gen = torch.Generator().manual_seed(config.seed)
        val_batches = fixed_batches(data.val, config.eval_batches, config.batch_size, config.seq_len)
        curve: list[float] = []
        val_steps: list[int] = []
        val_curve: list[float] = []
        bar = tqdm(range(1, config.steps + 1), desc="training", unit="step", disable=not progress, leave=True)
        model.train()
        for step in bar:
            batch = sample_batch(data.train, config.batch_size, config.seq_len, gen)
            loss = _batch_loss(model, loss_fn, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            curve.append(float(loss.item()))
            if step % config.eval_every == 0 or step == config.steps:
                val_steps.append(step)
                val_curve.append(evaluate(model, loss_fn, val_batches))
                model.train()
                bar.set_postfix(loss=f"{_smoothed(curve):.4f}", val=f"{val_curve[-1]:.4f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{_smoothed(curve):.4f}", val=f"{val_curve[-1]:.4f}" if val_curve else "-")
        bar.close()
        model.eval()
        train_batches = fixed_batches(data.train, config.eval_batches, config.batch_size, config.seq_len)
        train_loss = evaluate(model, loss_fn, train_batches)
    return TrainResult(
        model=model,
        train_loss=train_loss,
        val_loss=val_curve[-1],
        baseline_val_loss=baseline_loss(config, data, val_batches),
        curve_train=curve,
        val_steps=val_steps,
        val_curve=val_curve,
        loss_name=LOSS_NAME[config.task],
        seconds=time.perf_counter() - start,
    )


def evaluate(model: RecurrentModel, loss_fn: nn.Module, batches: list[Batch]) -> float:
    """Mean loss over fixed batches, in eval mode, from a zero state."""
    model.eval()
    with torch.no_grad():
        losses = [float(_batch_loss(model, loss_fn, batch).item()) for batch in batches]
    return sum(losses) / len(losses)


def baseline_loss(config: ExportConfig, data: TokenData | FeatureData, val_batches: list[Batch]) -> float:
    """The loss a model without memory gets on the validation windows.

    Tokens: cross-entropy of the training unigram distribution (add-one smoothed).
    Features: mean squared error of predicting the last value again.
    """
    if isinstance(data, TokenData):
        counts = torch.bincount(data.train, minlength=len(data.vocabulary)).double() + 1.0
        log_probs = torch.log(counts / counts.sum())
        targets = torch.cat([b.targets.reshape(-1) for b in val_batches])
        return float(-log_probs[targets].mean())
    errors = [((b.inputs - b.targets) ** 2).mean() for b in val_batches]
    return float(torch.stack(errors).mean())


def _loss_fn(config: ExportConfig) -> nn.Module:
    return nn.CrossEntropyLoss() if config.task == "tokens" else nn.MSELoss()


def _batch_loss(model: RecurrentModel, loss_fn: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch.inputs, *model.initial_state(batch.inputs.shape[0]))[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
    return loss_fn(logits, batch.targets)


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
