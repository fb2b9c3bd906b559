"""Training a sequence classifier: the output at each sequence's last row is its class.

As in the LSTM tutorial that classifies images row by row, the recurrent layer reads a
sequence and the head's output at its last position is trained with cross-entropy. The
head runs at every position, so the served model answers after every row: the class
probabilities given the rows so far.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lstmserve.export.config import ExportConfig
from lstmserve.export.data import SequenceData
from lstmserve.export.model import RecurrentModel
from lstmserve.export.train import LOSS_NAME, TrainResult, build_model, deterministic, fit

EVAL_BATCH = 256


def last_logits(model: RecurrentModel, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The logits at each sequence's last row, [batch, classes] (padding after it is never read)."""
    longest = int(lengths.max())
    logits = model(inputs[:, :longest], *model.initial_state(inputs.shape[0]))[0]
    return logits[torch.arange(len(lengths)), lengths - 1]


def measure(model: RecurrentModel, inputs: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all the sequences, in eval mode."""
    model.eval()
    losses, correct = [], 0
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH):
            part = slice(start, start + EVAL_BATCH)
            logits = last_logits(model, inputs[part], lengths[part])
            losses.append(nn.functional.cross_entropy(logits, labels[part], reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels[part]).sum())
    return float(torch.stack(losses).sum()) / len(labels), correct / len(labels)


def baseline(data: SequenceData) -> tuple[float, float]:
    """A classifier that ignores its input: the training class frequencies (add-one smoothed) as
    probabilities; its validation cross-entropy and accuracy (always the most frequent class)."""
    counts = torch.bincount(data.train_y, minlength=len(data.classes)).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    loss = float(-log_probs[data.val_y].mean())
    accuracy = float((data.val_y == int(counts.argmax())).double().mean())
    return loss, accuracy


def train_classifier(config: ExportConfig, data: SequenceData, *, progress: bool = True) -> TrainResult:
    """Trains the classifier the config describes on `data`; deterministic for a given seed."""
    start = time.perf_counter()
    with deterministic(config.seed):
        model = build_model(config, data)
        gen = torch.Generator().manual_seed(config.seed)

        def train_loss() -> torch.Tensor:
            picks = torch.randint(0, len(data.train_y), (config.batch_size,), generator=gen)
            logits = last_logits(model, data.train_x[picks], data.train_len[picks])
            return nn.functional.cross_entropy(logits, data.train_y[picks])

        def validate() -> float:
            return measure(model, data.val_x, data.val_len, data.val_y)[0]

        curve, val_steps, val_curve = fit(config, model, train_loss, validate, progress=progress)
        train_loss_value, train_accuracy = measure(model, data.train_x, data.train_len, data.train_y)
        val_loss, val_accuracy = measure(model, data.val_x, data.val_len, data.val_y)
    baseline_loss, baseline_accuracy = baseline(data)
    return TrainResult(
        model=model,
        train_loss=train_loss_value,
        val_loss=val_loss,
        baseline_val_loss=baseline_loss,
        curve_train=curve,
        val_steps=val_steps,
        val_curve=val_curve,
        loss_name=LOSS_NAME["classify"],
        seconds=time.perf_counter() - start,
        metrics={"train_accuracy": train_accuracy, "val_accuracy": val_accuracy,
                 "baseline_val_accuracy": baseline_accuracy},
    )
