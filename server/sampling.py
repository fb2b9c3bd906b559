"""Choosing tokens from logits: greedy, temperature, top-k, top-p; and top-k log-probabilities."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
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
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
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


# Unseeded samplers share one generator: seeding a generator per request from the OS costs
# about 30 microseconds, and their draws need no order of their own.
_SHARED_RNG = np.random.default_rng()


class Sampler:
    """Draws tokens with one random generator, so a fixed seed gives a reproducible sequence
    (without a seed, from a generator shared by all unseeded samplers)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed) if params.seed is not None else None
        self.group = (params.temperature, params.top_k, params.top_p)  # rows with the same group sample together

    def sample(self, logits: np.ndarray) -> int:
        """Picks one token id from a logits vector [vocab]."""
        return int(sample_rows([self], logits[np.newaxis])[0])


@functools.lru_cache(maxsize=256)
def _shared_sampler(params: SamplingParams) -> Sampler:
    return Sampler(params)


def sampler_for(params: SamplingParams) -> Sampler:
    """A sampler for `params`: a new one with a seed (its generator's draws are the request's alone), else the one
    that every request with the same params shares (it keeps nothing that changes), so that thousands of
    generations at once do not each keep one."""
    return Sampler(params) if params.seed is not None else _shared_sampler(params)


def common_kind(samplers: Sequence[Sampler]) -> tuple[float, int, float] | None:
    """The (temperature, top-k, top-p) that all of `samplers` share when none has a seed of its own (their rows
    can then be sampled together by `sample_kind`); None otherwise."""
    first = samplers[0].group
    if all(s.group == first and s.rng is None for s in samplers):
        return first
    return None


def sample_kind(kind: tuple[float, int, float], logits: np.ndarray) -> np.ndarray:
    """Picks one token per row of `logits` [rows, vocab] for unseeded rows that all sample the same way."""
    temperature, top_k, top_p = kind
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    return _draw(logits, temperature, top_k, top_p, _SHARED_RNG.random(len(logits)))


def sample_rows(samplers: Sequence[Sampler], logits: np.ndarray) -> np.ndarray:
    """Picks one token per row of `logits` [rows, vocab], row i with `samplers[i]`.

    Rows with the same temperature, top-k and top-p are sampled together in a few
    vectorised numpy calls; a seeded row still draws from its own sampler's generator,
    so a seeded session gets the same tokens whatever else is in the batch.
    """
    if not samplers:
        return np.empty(0, dtype=np.int64)
    kind = common_kind(samplers)
    if kind is not None:  # the common case, one kind of unseeded request: what the loop below does for one group
        return sample_kind(kind, logits)
    picked = np.empty(len(samplers), dtype=np.int64)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, sampler in enumerate(samplers):
        groups.setdefault(sampler.group, []).append(row)
    for (temperature, top_k, top_p), rows in groups.items():
        if temperature == 0:
            picked[rows] = np.argmax(logits[rows], axis=-1)
            continue
        draws = _SHARED_RNG.random(len(rows))
        for index, row in enumerate(rows):  # seeded rows draw from their own generator
            rng = samplers[row].rng
            if rng is not None:
                draws[index] = rng.random()
        picked[rows] = _draw(logits[rows], temperature, top_k, top_p, draws)
    return picked


def _draw(logits: np.ndarray, temperature: float, top_k: int, top_p: float, draws: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling of one token per row, with uniform `draws` in [0, 1)."""
    # In place where the arithmetic allows it (the same operations in the same order as the textbook
    # version, so the same tokens): a batch of 256 rows runs this once per generated token of each.
    vocab = logits.shape[-1]
    scaled = logits.astype(np.float64)
    if temperature != 1.0:
        scaled /= temperature
    if 0 < top_k < vocab:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k, np.newaxis]
        np.copyto(scaled, -np.inf, where=scaled < kth)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled, out=scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(ranked, axis=-1)
        before = np.concatenate([np.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)  # mass ranked above
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=-1)  # the smallest set reaching top_p
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.minimum(_inverse_cdf(probs, draws), vocab - 1)


# From this many rows on, `_inverse_cdf` sums along the vocabulary one column at a time over all rows at once:
# numpy's cumsum along the last axis costs about 3.5 ns an element whatever the batch (1.15 ms for 2,048 rows of
# 164 logits on this project's 2-core machine), the column loop about 0.8 us a column plus a transposed copy
# into a kept buffer (0.5 ms there), and the two break even near 300 rows of 164. Up to this many elements
# only, so that the kept buffer stays small (16 MiB) whatever the vocabulary.
COLUMN_SCAN_ROWS = 384
COLUMN_SCAN_ELEMENTS = 2**21

_scratch = threading.local()


def _column_buffer(vocab: int, rows: int) -> np.ndarray:
    """A float64 [vocab, rows] array to overwrite (vocab * rows at most COLUMN_SCAN_ELEMENTS), kept between
    calls (per thread): a fresh array of a few MiB costs more in page faults than the whole column loop."""
    kept: np.ndarray | None = getattr(_scratch, "buffer", None)
    if kept is None:
        kept = _scratch.buffer = np.empty(COLUMN_SCAN_ELEMENTS, dtype=np.float64)
    return kept[: vocab * rows].reshape(vocab, rows)


def _inverse_cdf(probs: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Per row of `probs` [rows, vocab] (float64, may be overwritten), the number of running sums at or below
    `draws` times the row's total: the token the draw picks, or vocab for a draw at the very top.

    Both ways add each row's probabilities one after another from the first, so they give the same sums to
    the last bit, and the same tokens.
    """
    rows, vocab = probs.shape
    if rows < COLUMN_SCAN_ROWS or rows * vocab > COLUMN_SCAN_ELEMENTS:
        cumulative = np.cumsum(probs, axis=-1, out=probs)
        thresholds = draws * cumulative[:, -1]
        return np.count_nonzero(cumulative <= thresholds[:, np.newaxis], axis=-1)
    columns = _column_buffer(vocab, rows)  # each running sum below adds one contiguous column to the next
    np.copyto(columns, probs.T)
    add = np.add
    for column in range(1, vocab):
        add(columns[column - 1], columns[column], out=columns[column])
    thresholds = draws * columns[-1]
    return np.count_nonzero(columns <= thresholds, axis=0)
