"""The token check every step and generation request passes: refused exactly when an id is outside the vocabulary,
naming the first such id and its position (int64 ids of any sign and size)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lstmserve.server.errors import InvalidInput
from lstmserve.server.messages import decode_inputs
from lstmserve.v1 import lstmserve_pb2 as pb

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@dataclass(frozen=True)
class TokenModel:
    """The fields of a ModelSpec that decode_inputs reads for a token model."""

    vocabulary: tuple[str, ...]
    kind: str = "tokens"

    @property
    def output_size(self) -> int:
        return len(self.vocabulary)


@given(
    vocab=st.integers(min_value=1, max_value=1000),
    tokens=st.lists(st.one_of(INT64, st.integers(min_value=-2, max_value=1002)), min_size=1, max_size=40),
)
def test_a_request_is_refused_exactly_when_a_token_is_outside_the_vocabulary(vocab: int, tokens: list[int]) -> None:
    spec = TokenModel(vocabulary=("x",) * vocab)
    outside = [position for position, token in enumerate(tokens) if not 0 <= token < vocab]
    if not outside:
        assert decode_inputs(tokens, pb.Tensor(), False, spec, 1000).tolist() == tokens  # type: ignore[arg-type]
        return
    first = outside[0]
    expected = f"token id {tokens[first]} at position {first} is outside the vocabulary [0, {vocab})"
    with pytest.raises(InvalidInput, match=re.escape(expected)):
        decode_inputs(tokens, pb.Tensor(), False, spec, 1000)  # type: ignore[arg-type]
