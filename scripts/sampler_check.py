"""How often the float32 sampler hands a row back to the float64 way, and whether it ever picks another token.

Usage: .venv/bin/python scripts/sampler_check.py [MARGIN]

Forty random batches (64 to 4,096 rows, vocabularies of 2 to 1,000, logit scales of 0.1 to 1,000, offsets,
temperatures of 0.01 to 100, and no top-k or a top-k of 1, 5 or 40). For each, draws are put on the float64
reference's running sums and 1 or 2 units in the last place either side, and the tokens of `sampling._draw` are
compared with `sampling._draw_exact`'s; then random draws count the rows drawn again the float64 way. With
MARGIN, the check's margin is replaced by MARGIN times each row's total, to see the comparison fail (0 gives
tens of thousands of differing tokens).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from lstmserve.server import sampling


def switch_points(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """Per row, the draws at which the float64 way switches from one token to the next."""
    sums = np.cumsum(sampling.probabilities(logits, temperature, top_k, 1.0), axis=-1)
    return sums / sums[:, -1:]


def main() -> None:
    if len(sys.argv) > 1:
        factor = float(sys.argv[1])

        def margin(totals: np.ndarray, top_over_temperature: np.ndarray, vocab: int) -> np.ndarray:
            return factor * totals

        sampling._margin = margin
    rng = np.random.default_rng(5)
    exact = sampling._draw_exact
    differing = redrawn = rows_drawn = 0
    for _ in range(40):
        rows = int(rng.choice([64, 384, 1000, 4096]))
        vocab = int(rng.choice([2, 5, 40, 164, 1000]))
        scale = float(rng.choice([0.1, 1, 3, 10, 40, 1000]))
        temperature = float(rng.choice([1.0, 0.7, 1.7, 0.01, 100.0]))
        top_k = int(rng.choice([0, 0, 1, 5, 40]))
        logits = (rng.standard_normal((rows, vocab)) * scale + rng.choice([0, 50, -1e4])).astype(np.float32)
        bounds = switch_points(logits, temperature, top_k)[np.arange(rows), rng.integers(0, vocab, rows)]
        for nudge in (-2, -1, 0, 1, 2):
            draws = bounds.copy()
            for _ in range(abs(nudge)):
                draws = np.nextafter(draws, np.inf if nudge > 0 else -np.inf)
            draws = np.clip(draws, 0.0, np.nextafter(1.0, 0.0))
            picked = sampling._draw(logits, temperature, top_k, 1.0, draws)
            differing += int(np.count_nonzero(picked != exact(logits, temperature, top_k, 1.0, draws)))
        draws = rng.random(rows)
        counted: list[int] = []

        def counting(unsure: np.ndarray, *args: Any, counted: list[int] = counted) -> np.ndarray:
            counted.append(len(unsure))
            return exact(unsure, *args)

        sampling._draw_exact = counting  # type: ignore[assignment]
        picked = sampling._draw(logits, temperature, top_k, 1.0, draws)
        sampling._draw_exact = exact
        differing += int(np.count_nonzero(picked != exact(logits, temperature, top_k, 1.0, draws)))
        redrawn += sum(counted)
        rows_drawn += rows
    print(f"tokens differing from the float64 way: {differing}")
    print(f"rows drawn again the float64 way on random draws: {redrawn} of {rows_drawn} ({redrawn / rows_drawn:.2%})")


if __name__ == "__main__":
    main()
