"""Batched sampling: each row gets exactly the token its own sampler would draw alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmserve.server import sampling
from lstmserve.server.sampling import Sampler, SamplingParams, sample_rows


def reference_sample(params: SamplingParams, logits: np.ndarray, draw: float) -> int:
    """The textbook one-row algorithm: temperature, top-k, top-p (smallest set reaching p), inverse CDF."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[0]:
        kth = np.sort(scaled)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, draw * cumulative[-1], side="right"))
    return min(index, probs.shape[0] - 1)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    seed=st.integers(0, 2**32 - 1),
)


unseeded_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 1.0, 1.7]),
    top_k=st.sampled_from([0, 3]),
    top_p=st.sampled_from([1.0, 0.9]),
)


@settings(max_examples=60, deadline=None)
@given(
    params=st.one_of(
        st.lists(unseeded_strategy, min_size=1, max_size=12),  # mixed kinds of request
        st.tuples(unseeded_strategy, st.integers(1, 12)).map(lambda pair: [pair[0]] * pair[1]),  # one kind
    ),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_unseeded_rows_draw_from_the_shared_generator_kind_by_kind(params: list[SamplingParams], data_seed: int) -> None:
    """Unseeded rows take their draws from the shared generator: one per row, rows of one kind of request
    (temperature, top-k, top-p) in row order, kinds in order of first appearance, none for greedy rows."""
    logits = np.random.default_rng(data_seed).normal(scale=3.0, size=(len(params), 40)).astype(np.float32)
    replay = np.random.Generator(np.random.PCG64())
    replay.bit_generator.state = sampling._SHARED_RNG.bit_generator.state
    batched = sample_rows([Sampler(p) for p in params], logits)
    kinds: dict[tuple[float, int, float], list[int]] = {}
    for row, p in enumerate(params):
        kinds.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    for rows in kinds.values():
        draws = replay.random(len(rows)) if params[rows[0]].temperature else np.zeros(len(rows))
        for row, draw in zip(rows, draws, strict=True):
            assert batched[row] == reference_sample(params[row], logits[row], draw), (row, params[row])
    assert sampling._SHARED_RNG.bit_generator.state == replay.bit_generator.state  # no draw more or less


@settings(max_examples=60, deadline=None)
@given(params=st.lists(params_strategy, min_size=1, max_size=12), data_seed=st.integers(0, 2**32 - 1))
def test_a_batch_draws_what_each_row_would_draw_alone(params: list[SamplingParams], data_seed: int) -> None:
    logits = np.random.default_rng(data_seed).normal(scale=3.0, size=(len(params), 40)).astype(np.float32)
    batched = sample_rows([Sampler(p) for p in params], logits)
    for row, p in enumerate(params):
        draw = np.random.default_rng(p.seed).random() if p.temperature else 0.0
        assert batched[row] == reference_sample(p, logits[row], draw), (row, p)


def test_a_seeded_sampler_gives_the_same_tokens_alone_or_in_a_batch() -> None:
    logits = np.random.default_rng(1).normal(size=(5, 30)).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=9)
    alone = Sampler(params)
    batched = [Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=2))]
    for _ in range(20):
        together = sample_rows(batched, np.stack([logits[0], logits[1]]))
        assert together[0] == alone.sample(logits[0])


def test_greedy_rows_take_the_argmax() -> None:
    logits = np.random.default_rng(2).normal(size=(8, 30)).astype(np.float32)
    samplers = [Sampler(SamplingParams(temperature=0.0)) for _ in range(8)]
    np.testing.assert_array_equal(sample_rows(samplers, logits), logits.argmax(axis=-1))


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from([(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 1.0), (1.0, 0, 0.8)]),
    rows=st.sampled_from([sampling.COLUMN_SCAN_ROWS - 1, sampling.COLUMN_SCAN_ROWS, 1000]),
    vocab=st.sampled_from([2, 40, 164]),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_a_large_batch_draws_the_textbook_token_for_every_row(
    kind: tuple[float, int, float], rows: int, vocab: int, data_seed: int
) -> None:
    """From COLUMN_SCAN_ROWS rows on the running sums are taken a column at a time across rows: the tokens must
    be those of the one-row reference, bit for bit, on both sides of that size."""
    temperature, top_k, top_p = kind
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = np.random.default_rng(data_seed).normal(scale=4.0, size=(rows, vocab)).astype(np.float32)
    replay = np.random.Generator(np.random.PCG64())
    replay.bit_generator.state = sampling._SHARED_RNG.bit_generator.state
    picked = sampling.sample_kind(kind, logits)
    draws = replay.random(rows)
    expected = [reference_sample(params, logits[row], draws[row]) for row in range(rows)]
    np.testing.assert_array_equal(picked, expected)


def test_draws_at_the_ends_pick_the_first_and_the_last_possible_token() -> None:
    """A draw of 0 picks the first token with any probability; a draw just below 1 the last one."""
    rows = sampling.COLUMN_SCAN_ROWS
    logits = np.full((rows, 6), -np.inf, dtype=np.float32)
    logits[:, 1:4] = 0.0  # tokens 1, 2 and 3 only
    for draw, token in ((0.0, 1), (np.nextafter(1.0, 0.0), 3)):
        np.testing.assert_array_equal(sampling._draw(logits, 1.0, 0, 1.0, np.full(rows, draw)), np.full(rows, token))
        np.testing.assert_array_equal(sampling._draw(logits[:2], 1.0, 0, 1.0, np.full(2, draw)), np.full(2, token))


def switch_points(logits: np.ndarray, temperature: float, top_k: int = 0) -> np.ndarray:
    """Per row, the draws at which the float64 way switches from one token to the next: its running sums of
    probabilities over their total."""
    sums = np.cumsum(sampling.probabilities(logits, temperature, top_k, 1.0), axis=-1)
    return sums / sums[:, -1:]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.sampled_from([1, sampling.CHECKED_DRAW_ROWS, sampling.COLUMN_SCAN_ROWS, 1000]),
    vocab=st.sampled_from([2, 7, 164, 1000]),
    scale=st.sampled_from([0.01, 1.0, 4.0, 30.0, 1000.0]),
    offset=st.sampled_from([0.0, 60.0, -1e4]),
    temperature=st.sampled_from([1.0, 0.7, 1.7, 0.01, 100.0]),
    top_k=st.sampled_from([0, 0, 1, 3, 50]),
    nudge=st.sampled_from([-2, -1, 0, 1, 2]),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_draws_on_a_boundary_between_two_tokens_pick_the_float64_token(
    rows: int, vocab: int, scale: float, offset: float, temperature: float, top_k: int, nudge: int, data_seed: int
) -> None:
    """Sampling without top-p takes its exponentials in float32 and checks each row against the float64 way: a
    draw within a few units in the last place of where the float64 running sums switch tokens, where the float32
    sums may fall on the other side, must still pick the float64 token (with the check's margin at zero, this
    fails in most examples)."""
    rng = np.random.default_rng(data_seed)
    logits = (rng.normal(scale=scale, size=(rows, vocab)) + offset).astype(np.float32)
    sums = switch_points(logits, temperature, top_k)
    boundaries = sums[np.arange(rows), rng.integers(0, vocab, size=rows)]
    draws = boundaries.copy()
    for _ in range(abs(nudge)):
        draws = np.nextafter(draws, np.inf if nudge > 0 else -np.inf)
    draws = np.clip(draws, 0.0, np.nextafter(1.0, 0.0))
    picked = sampling._draw(logits, temperature, top_k, 1.0, draws)
    np.testing.assert_array_equal(picked, sampling._draw_exact(logits, temperature, top_k, 1.0, draws))
    for row in range(min(rows, 9)):  # and the float64 way is the textbook's
        params = SamplingParams(temperature=temperature, top_k=top_k)
        assert picked[row] == reference_sample(params, logits[row], float(draws[row])), row


def test_the_float32_way_decides_almost_every_row_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random draws seldom fall near a boundary: the float64 way redraws under 1% of 4,096 rows of 164 logits."""
    assert sampling._fast_exp_is_accurate()  # numpy's float32 exponential is within EXP_ULPS here
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(4096, 164)).astype(np.float32)
    draws = rng.random(4096)
    redrawn: list[int] = []
    exact = sampling._draw_exact

    def counting(rows: np.ndarray, *args: object) -> np.ndarray:
        redrawn.append(len(rows))
        return exact(rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "_draw_exact", counting)
    picked = sampling._draw(logits, 1.0, 0, 1.0, draws)
    assert sum(redrawn) < 41, redrawn
    monkeypatch.setattr(sampling, "_draw_exact", exact)
    np.testing.assert_array_equal(picked, exact(logits, 1.0, 0, 1.0, draws))


def test_rows_the_float32_way_cannot_check_are_drawn_the_float64_way() -> None:
    """Rows of -inf or +inf logits, float64 logits and temperatures whose reciprocal is no full float32 give the
    float64 way's tokens."""
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(sampling.COLUMN_SCAN_ROWS, 40)).astype(np.float32)
    logits[3] = -np.inf
    logits[5, 7] = np.inf
    draws = rng.random(len(logits))
    for batch, temperature in ((logits, 1.0), (logits, 2.0**70), (logits.astype(np.float64), 1.0), (logits[:5], 1.0)):
        np.testing.assert_array_equal(
            sampling._draw(batch, temperature, 0, 1.0, draws[: len(batch)]),
            sampling._draw_exact(batch, temperature, 0, 1.0, draws[: len(batch)]),
        )


def test_without_an_accurate_float32_exponential_every_row_is_drawn_the_float64_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sampling, "_fast_exp_is_accurate", lambda: False)
    monkeypatch.setattr(sampling, "_draw_checked", None)  # calling it would raise
    rows = sampling.CHECKED_DRAW_ROWS
    logits = np.random.default_rng(5).normal(size=(rows, 30)).astype(np.float32)
    draws = np.random.default_rng(6).random(rows)
    expected = [reference_sample(SamplingParams(), logits[row], float(draws[row])) for row in range(rows)]
    np.testing.assert_array_equal(sampling._draw(logits, 1.0, 0, 1.0, draws), expected)


@settings(max_examples=40, deadline=None)
@given(
    top_p=st.sampled_from([0.3, 0.9, 0.99]),
    kind=st.sampled_from(["equal", "duplicates", "minus_inf", "tiny"]),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_top_p_keeps_the_textbook_tokens_when_probabilities_tie(top_p: float, kind: str, data_seed: int) -> None:
    """Top-p ranks tokens by a quicksort of the logits and falls back to the stable sort for rows whose
    probabilities tie: equal logits, repeated logits, logits of -inf, and logits so small that distinct ones
    give the same probability. Every row must keep and draw what the textbook's stable ranking gives."""
    rng = np.random.default_rng(data_seed)
    rows, vocab = 70, 40
    logits = rng.normal(scale=2.0, size=(rows, vocab)).astype(np.float32)
    if kind == "equal":
        logits[:] = 0.5
    elif kind == "duplicates":
        logits = rng.choice(np.array([-1.0, 0.0, 0.25, 1.0], dtype=np.float32), size=(rows, vocab))
    elif kind == "minus_inf":
        logits[rng.random((rows, vocab)) < 0.5] = -np.inf
        logits[:, 0] = 0.0  # at least one finite logit a row
    else:
        logits = (logits * np.float32(1e-30)).astype(np.float32)
    draws = rng.random(rows)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    picked = sampling._draw_exact(logits, 1.0, 0, top_p, draws)
    expected = [reference_sample(params, logits[row], float(draws[row])) for row in range(rows)]
    np.testing.assert_array_equal(picked, expected)
