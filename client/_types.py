"""Plain values the client returns: frozen dataclasses, no protobuf."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np

OutputKind = Literal["logits", "topk", "sample", "none"]
"""What a step returns: full logits, the top-k tokens, one sampled token, or nothing but the counter."""


@dataclass(frozen=True)
class Vocabulary:
    """A token model's vocabulary: token id -> text piece, with encode/decode helpers.

    Encoding is greedy longest match over the pieces (for a character model, one
    token per character); the first id of a repeated piece wins.

    Args:
        pieces: the text of each token id.
    """

    pieces: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)
    _longest: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids: dict[str, int] = {}
        for index, piece in enumerate(self.pieces):
            if piece:
                ids.setdefault(piece, index)
        object.__setattr__(self, "_ids", ids)
        object.__setattr__(self, "_longest", max((len(p) for p in ids), default=0))

    def __len__(self) -> int:
        return len(self.pieces)

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self.pieces[index]

    def __contains__(self, piece: object) -> bool:
        return piece in self._ids

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; ValueError naming the first character no piece covers."""
        if not self.pieces:
            raise ValueError("this model has no vocabulary (it takes features); pass features, not text")
        ids: list[int] = []
        position = 0
        while position < len(text):
            for size in range(min(self._longest, len(text) - position), 0, -1):
                token = self._ids.get(text[position : position + size])
                if token is not None:
                    ids.append(token)
                    position += size
                    break
            else:
                raise ValueError(
                    f"character {text[position]!r} at position {position} of the text is not in the "
                    f"model's vocabulary ({len(self.pieces)} pieces)"
                )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; ValueError for an id outside the vocabulary."""
        pieces = []
        for token in ids:
            token = int(token)
            if not 0 <= token < len(self.pieces):
                raise ValueError(f"token id {token} is outside the vocabulary [0, {len(self.pieces)})")
            pieces.append(self.pieces[token])
        return "".join(pieces)


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves.

    Args:
        kind: "tokens" or "features".
        vocabulary: token id -> text piece (empty for feature models).
        input_size: embedding size (tokens) or feature width (features).
        hidden_size: LSTM hidden size.
        num_layers: LSTM layers.
        num_directions: 2 for a bidirectional model, else 1.
        proj_size: LSTM projection size (0 = none).
        output_size: width of the logits (vocabulary size or the head's width).
        steppable: False for bidirectional models, which cannot be stepped.
        provider: the ONNX Runtime execution provider the server runs on.
        fingerprint: identifies the exported weights.
        head: "language_model", "regression" or "classification".
        max_tokens_per_request: most tokens (or feature rows) one step may carry.
        max_generate_tokens: most tokens one generation may ask for.
        session_ttl_s: an idle session is closed after this many seconds.
        max_sessions: most live sessions on the server.
        cell: the recurrent layer: "lstm", "gru", "rnn", or "custom" (an annotated ONNX model).
        classes: a classifier's class names, in output order (index `probabilities` with them).
        state_tensors: recurrent state tensors the server keeps per session (2 for an LSTM, 1 for GRU/RNN).
    """

    kind: str
    vocabulary: Vocabulary
    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    proj_size: int
    output_size: int
    steppable: bool
    provider: str
    fingerprint: str
    head: str
    max_tokens_per_request: int
    max_generate_tokens: int
    session_ttl_s: float
    max_sessions: int
    cell: str = "lstm"
    classes: tuple[str, ...] = ()
    state_tensors: int = 2

    @property
    def bidirectional(self) -> bool:
        """Whether the LSTM is bidirectional (and so cannot be stepped)."""
        return self.num_directions == 2


@dataclass(frozen=True)
class SessionInfo:
    """A live session as the server sees it.

    Args:
        id: the session id (pass it to `Client.session(resume=...)`).
        step: positions consumed since creation or the last reset.
        idle_s: seconds since the session was last used.
        expires_in_s: seconds left before the idle TTL closes it.
    """

    id: str
    step: int
    idle_s: float
    expires_in_s: float


@dataclass(frozen=True, eq=False)
class StepOutput:
    """The result of one `Session.step`. The arrays are read-only (copy them to modify).

    Args:
        step: the session's step counter after this step.
        batch_size: how many sessions the server batched into the call that computed it.
        logits: float32 [positions, output_size] (output="logits"), else None; `outputs` is the same
            array under a neutral name, and `probabilities` its softmax.
        topk_ids: int64 [positions, k] token ids, best first (output="topk"), else None.
        topk_logprobs: float32 [positions, k] their log-probabilities (output="topk"), else None.
        token: the token sampled from the last position (output="sample"), else None.
    """

    step: int
    batch_size: int
    logits: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    token: int | None = None

    @property
    def outputs(self) -> np.ndarray | None:
        """The model's output for every fed position, float32 [positions, output_size] (output="logits"):
        a language model's logits, a regression model's predictions, a classifier's class logits.
        The same array as `logits`, under a name that fits every kind of model."""
        return self.logits

    @property
    def probabilities(self) -> np.ndarray | None:
        """Softmax of the outputs over the last axis (output="logits"), float32 [positions, output_size]:
        for a classifier, each row is the class probabilities given the sequence so far; for a
        language model, the next-token distribution. Meaningless for a regression model."""
        if self.logits is None:
            return None
        shifted = self.logits - self.logits.max(axis=-1, keepdims=True)
        exp = np.exp(shifted, dtype=np.float32)
        return exp / exp.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a generation and its text (the text may be shortened just before a stop string).

    Args:
        token: the token id.
        text: its text piece.
    """

    token: int
    text: str


@dataclass(frozen=True)
class Completion:
    """A whole generation (see `Session.complete`).

    Args:
        text: the generated text (without the prompt or the stop string).
        tokens: the generated token ids, in order.
        finish_reason: "length" (max_tokens reached) or "stop" (a stop string was generated).
        step: the session's step counter after the generation.
    """

    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    step: int


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures (UNAVAILABLE, and broken step streams) are retried.

    The delay before retry n (n >= 1) is min(max_backoff_s, initial_backoff_s * multiplier**(n-1)),
    scaled by a random factor in [0.5, 1].

    Args:
        max_attempts: attempts in all, the first included (1 = no retries).
        initial_backoff_s: delay before the first retry.
        max_backoff_s: largest delay.
        multiplier: growth of the delay per retry.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff delays must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, retry - 1))
        return base * (0.5 + 0.5 * random.random())


def as_token_list(tokens: int | Sequence[int] | np.ndarray) -> list[int]:
    """Token ids as a flat list of ints; TypeError/ValueError for anything else."""
    if isinstance(tokens, (bool, np.bool_)):
        raise TypeError("tokens must be an int, a sequence of ints or a str, not bool")
    if isinstance(tokens, (int, np.integer)):
        return [int(tokens)]
    array = np.asarray(tokens)
    if array.size == 0:
        raise ValueError("tokens is empty: a step needs at least one token")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"tokens must be a flat sequence of ints, got {array.dtype} of shape {list(array.shape)}")
    return [int(t) for t in array]


def as_features(features: object) -> np.ndarray:
    """Features as float32 [positions, input_size] (one row may be given as [input_size])."""
    array = np.asarray(features, dtype=np.float32)
    if array.ndim == 1:
        array = array[np.newaxis]
    if array.ndim != 2:
        raise ValueError(f"features must be [positions, input_size] or [input_size], got shape {list(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError("features has no rows: a step needs at least one position")
    return np.ascontiguousarray(array)
