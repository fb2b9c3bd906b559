"""A user's own PyTorch code, as the tests of `export --module` and `annotate` bring it: recurrent modules
in PyTorch's convention, a few training steps, and the reference outputs on the whole sequence."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCABULARY = tuple("abcdefghij")


class GRUForecaster(nn.Module):
    """Sensor readings [batch, time, 3] -> next readings [batch, time, 3]: nn.GRU (batch_first, 2 layers) + head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.gru(x, state)
        return self.head(y), state


class CharLSTM(nn.Module):
    """Tokens [time, batch] -> logits [time, batch, vocabulary]: embedding + time-major nn.LSTM + head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCABULARY), 8)
        self.lstm = nn.LSTM(8, 10)
        self.out = nn.Linear(10, len(VOCABULARY))

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.lstm(self.embed(x), state)
        return self.out(y), state


class BidirectionalGRU(nn.Module):
    """A bidirectional GRU tagger: exportable, served by Infer only."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.gru(x, state)
        return self.head(y), state


class NoState(nn.Module):
    """Breaks the convention: forward(x) without a state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class LastStepOnly(nn.Module):
    """Breaks the convention lstmserve needs: y is the last step's output only, [batch, out]."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, state = self.gru(x, state)
        return self.head(y[:, -1]), state


def gru_forecaster() -> GRUForecaster:
    """The factory `lstmserve export --module tests/own_modules.py:gru_forecaster` calls."""
    return GRUForecaster()


def zero_state(module: nn.Module, batch: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrent layer's zero state for `batch` sequences, in the module's convention."""
    layer = next(m for m in module.modules() if isinstance(m, nn.RNNBase))
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    h = torch.zeros(rows, batch, layer.proj_size or layer.hidden_size)
    return (h, torch.zeros(rows, batch, layer.hidden_size)) if isinstance(layer, nn.LSTM) else h


def train_few_steps(module: nn.Module, steps: int = 25, seed: int = 0) -> nn.Module:
    """A few Adam steps on next-step prediction (sines for features, a cyclic text for tokens), then eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    tokens = isinstance(module, CharLSTM)
    t = torch.arange(17, dtype=torch.float32)
    for step in range(steps):
        if tokens:
            ids = (torch.arange(17)[:, None] + torch.randint(0, 10, (1, 4))) % len(VOCABULARY)  # [time, batch]
            logits, _ = module(ids[:-1], zero_state(module, 4))
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[1:].reshape(-1))
        else:
            phase = torch.rand(4, 1, 3) * 6.28
            series = torch.sin(0.4 * t[None, :, None] + phase)  # [batch, time, 3]
            y, _ = module(series[:, :-1], zero_state(module, 4))
            loss = nn.functional.mse_loss(y, series[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        del step
    return module.eval()


def whole_sequence(module: nn.Module, inputs: np.ndarray, batch_first: bool) -> np.ndarray:
    """The module's outputs [positions, out] for one sequence, from zero state, in one call."""
    x = torch.from_numpy(np.asarray(inputs)[np.newaxis] if batch_first else np.asarray(inputs)[:, np.newaxis])
    with torch.no_grad():
        y, _ = module(x, zero_state(module, 1))
    return (y[0] if batch_first else y[:, 0]).numpy()


def export_plain(module: nn.Module, path: Path, args: tuple[torch.Tensor, ...], **options: object) -> Path:
    """`torch.onnx.export` as a user calls it (TorchScript exporter), to `path`."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, **options)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())
    return path


def step_concurrently(address: str, sequences: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """Steps every sequence in its own session, all at once (a thread each), in chunks of 1 to 3
    positions; returns each session's outputs [positions, out]."""
    from concurrent.futures import ThreadPoolExecutor

    from lstmserve.client import Client

    def run(index: int) -> np.ndarray:
        sequence = sequences[index]
        rng = np.random.default_rng(index)
        pieces: list[np.ndarray] = []
        with Client(address, timeout=60) as client, client.session() as session:
            start = 0
            while start < len(sequence):
                end = min(len(sequence), start + int(rng.integers(1, 4)))
                chunk = sequence[start:end]
                out = session.step(chunk.tolist()) if kind == "tokens" else session.step(features=chunk)
                assert out.step == end
                assert out.outputs is not None
                pieces.append(out.outputs)
                start = end
        return np.concatenate(pieces)

    with ThreadPoolExecutor(len(sequences)) as pool:
        return list(pool.map(run, range(len(sequences))))


def random_sequences(kind: str, width: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` random sequences of 5 to 14 positions: token ids below len(VOCABULARY), or float rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 15, size=count)
    if kind == "tokens":
        return [rng.integers(0, len(VOCABULARY), size=n).astype(np.int64) for n in lengths]
    return [rng.standard_normal((n, width)).astype(np.float32) for n in lengths]
