"""Choosing tokens from logits: greedy, temperature, top-k, top-p; and top-k log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstmserve.server.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    """How to pick a token. temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")
        if not np.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities along the last axis, computed stably in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For logits [positions, vocab]: the k best ids per position (best first) and their log-probabilities."""
    k = min(k, logits.shape[-1])
    logprobs = log_softmax(logits)
    ids = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    picked = np.take_along_axis(logprobs, ids, axis=-1)
    order = np.argsort(-picked, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(picked, order, axis=-1).astype(np.float32)


class Sampler:
    """Draws tokens with one random generator, so a fixed seed gives a reproducible sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """Picks one token id from a logits vector [vocab]."""
        p = self.params
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < scaled.shape[0]:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            filtered = np.zeros_like(probs)
            filtered[keep] = probs[keep]
            probs = filtered / filtered.sum()
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return min(index, probs.shape[0] - 1)
