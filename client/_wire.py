"""Protobuf <-> plain values, request building and channel settings, shared by the sync and async clients.

The only client module that builds and reads protobuf messages; `_core` stamps the session id and
`expected_step` on the requests built here, and `_sync` and `_async` send them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from lstmserve.client._errors import DeadlineExceeded, LstmServeError, error_for
from lstmserve.client._types import (
    GeneratedToken,
    ModelInfo,
    OutputKind,
    SessionInfo,
    StepOutput,
    Vocabulary,
)
from lstmserve.v1 import lstmserve_pb2 as pb

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# The call metadata that carries a session's id on every call of that session: a proxy in front of
# several replicas (Envoy, ring hash) routes on it, so every call of a session reaches the same replica.
SESSION_HEADER = "lstmserve-session"

# Codes after which a step is resent on a new stream (safe: every step carries expected_step).
STREAM_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL})
# Codes after which an idempotent unary call is retried.
UNARY_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

_OUTPUTS: dict[str, int] = {
    "logits": pb.OUTPUT_LOGITS,
    "topk": pb.OUTPUT_TOPK,
    "sample": pb.OUTPUT_SAMPLE,
    "none": pb.OUTPUT_NONE,
}


def normalize_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """Call metadata as a tuple of (key, value) pairs; keys are lowercased as gRPC requires."""
    return tuple((str(key).lower(), value) for key, value in (metadata or ()))


def new_session_id() -> str:
    """A session id for the client to propose: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def with_session(metadata: tuple[tuple[str, str | bytes], ...], session_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """`metadata` plus the session header (what every call of a session carries)."""
    return (*metadata, (SESSION_HEADER, session_id)) if session_id else metadata


def call_metadata(metadata: tuple[tuple[str, str | bytes], ...], request: Any) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata for a unary call: with the session header when the request names a session."""
    return with_session(metadata, getattr(request, "session_id", ""))


def model_info(message: pb.ModelInfo) -> ModelInfo:
    """A ModelInfo message as a plain ModelInfo."""
    return ModelInfo(
        kind=message.kind,
        vocabulary=Vocabulary(tuple(message.vocabulary)),
        input_size=message.input_size,
        hidden_size=message.hidden_size,
        num_layers=message.num_layers,
        num_directions=message.num_directions,
        proj_size=message.proj_size,
        output_size=message.output_size,
        steppable=message.steppable,
        provider=message.provider,
        fingerprint=message.fingerprint,
        head=message.head,
        max_tokens_per_request=message.max_tokens_per_request,
        max_generate_tokens=message.max_generate_tokens,
        session_ttl_s=message.session_ttl_s,
        max_sessions=message.max_sessions,
        cell=message.cell or "lstm",
        classes=tuple(message.classes),
        state_tensors=message.state_tensors or 2,
    )


def session_info(message: pb.SessionInfo) -> SessionInfo:
    """A SessionInfo message as a plain SessionInfo."""
    return SessionInfo(
        id=message.session_id, step=message.step, idle_s=message.idle_s, expires_in_s=message.expires_in_s
    )


def encode_features(features: np.ndarray) -> pb.Tensor:
    """float32 features as a Tensor (little-endian, row-major)."""
    array = np.ascontiguousarray(features, dtype="<f4")
    return pb.Tensor(shape=array.shape, data=array.tobytes())


def decode_logits(tensor: pb.Tensor) -> np.ndarray:
    """A float32 Tensor as a read-only numpy array of its shape."""
    shape = tuple(int(d) for d in tensor.shape)
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32, copy=False)


def sampling(temperature: float, top_k: int, top_p: float, seed: int | None) -> pb.Sampling:
    """A Sampling message; ValueError for values the server would refuse."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    message = pb.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        message.seed = seed
    return message


def step_request(
    *,
    tokens: list[int] | None,
    features: np.ndarray | None,
    output: OutputKind,
    k: int,
    sample: pb.Sampling | None,
) -> pb.StepRequest:
    """A StepRequest for one step (session id and expected_step are set when it is sent)."""
    return _step_fields(pb.StepRequest(), tokens, features, output, k, sample)


def session_step(
    *,
    tokens: list[int] | None,
    features: np.ndarray | None,
    output: OutputKind,
    k: int,
    sample: pb.Sampling | None,
) -> pb.SessionStep:
    """A SessionStep, one entry of a StepSessions request: the fields of `step_request` (session id and
    expected_step are set when it is sent)."""
    return _step_fields(pb.SessionStep(), tokens, features, output, k, sample)


_Step = TypeVar("_Step", pb.StepRequest, pb.SessionStep)


def _step_fields(
    request: _Step,
    tokens: list[int] | None,
    features: np.ndarray | None,
    output: OutputKind,
    k: int,
    sample: pb.Sampling | None,
) -> _Step:
    """Fills the input and output fields that StepRequest and SessionStep share."""
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}")
    request.output = _OUTPUTS[output]  # type: ignore[assignment]
    if tokens is not None:
        request.tokens.extend(tokens)
    if features is not None:
        request.features.CopyFrom(encode_features(features))
    if output == "topk":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        request.top_k = k
    if sample is not None and output == "sample":
        request.sampling.CopyFrom(sample)
    return request


def generate_request(prompt: list[int], max_tokens: int, sample: pb.Sampling, stop: Sequence[str]) -> pb.StepRequest:
    """A StepRequest that feeds `prompt` and then generates."""
    if not prompt:
        raise ValueError("prompt is empty: generation needs at least one prompt token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(stop, str):
        stop = (stop,)
    return pb.StepRequest(
        tokens=prompt, generate=pb.Generate(max_tokens=max_tokens, sampling=sample, stop=list(stop), coalesce=True)
    )


def step_output(response: pb.StepResponse, output: OutputKind) -> StepOutput:
    """The plain result of a step response, for the output kind that was asked for."""
    logits = topk_ids = topk_logprobs = None
    token = None
    if output == "logits":
        logits = decode_logits(response.logits)
    elif output == "topk":
        topk_ids = np.array([list(row.ids) for row in response.topk], dtype=np.int64)
        topk_logprobs = np.array([list(row.logprobs) for row in response.topk], dtype=np.float32)
        for array in (topk_ids, topk_logprobs):
            array.flags.writeable = False  # read-only, as StepOutput says (and as the logits and the columns form are)
    elif output == "sample":
        token = int(response.token)
    return StepOutput(
        step=int(response.step),
        batch_size=int(response.batch_size),
        logits=logits,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        token=token,
    )


def session_columns(steps: Sequence[pb.SessionStep]) -> pb.SessionColumns | None:
    """The stamped entries of a StepSessions call as one SessionColumns, which costs both sides less per
    session; None where they do not fit it: an entry of more than one position, feature rows of different
    shapes (each is then checked, and refused if it must be, on its own), entries asking for different
    outputs, seeded sampling (a seed is per session), expected steps on some entries only."""
    first = steps[0]
    if first.sampling.HasField("seed"):
        return None
    has_features = first.HasField("features")
    has_expected = first.HasField("expected_step")
    feature_shape = list(first.features.shape)
    if has_features and (len(feature_shape) != 2 or feature_shape[0] != 1):
        return None
    for step in steps:
        if (
            step.HasField("features") != has_features
            or (list(step.features.shape) != feature_shape or len(step.features.data) != len(first.features.data))
            or (not has_features and len(step.tokens) != 1)
            or step.HasField("expected_step") != has_expected
            or (step.output, step.top_k) != (first.output, first.top_k)
            or step.sampling != first.sampling
        ):
            return None
    columns = pb.SessionColumns(session_ids=[step.session_id for step in steps], output=first.output, top_k=first.top_k)
    if first.HasField("sampling"):
        columns.sampling.CopyFrom(first.sampling)
    if has_expected:
        columns.expected_steps.extend(step.expected_step for step in steps)
    if has_features:
        columns.features.shape.extend((len(steps), first.features.shape[1]))
        columns.features.data = b"".join(step.features.data for step in steps)
    else:
        columns.tokens.extend(step.tokens[0] for step in steps)
    return columns


# What a server older than SessionColumns answers a request in columns: it does not know the field, so it
# sees a request without steps and refuses it whole, having applied nothing.
_NO_STEPS_REFUSAL = "StepSessions request has no steps"


def columns_not_understood(error: LstmServeError) -> bool:
    """Whether a StepSessions call in columns was refused by a server that does not know the columns form."""
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and _NO_STEPS_REFUSAL in error.details


def column_outputs(result: pb.SessionColumnsResult, output: int) -> list[StepOutput]:
    """Each row of a SessionColumnsResult (for the OutputKind number `output`) as the StepOutput its entry
    would have had in the steps form (arrays of one position); a refused row's too (its zeros): the caller
    reads `result.errors` first."""
    count = len(result.steps)
    logits = topk_ids = topk_logprobs = tokens = None
    if output in (pb.OUTPUT_UNSPECIFIED, pb.OUTPUT_LOGITS):
        logits = _rows(decode_logits(result.logits), count)
    elif output == pb.OUTPUT_TOPK:
        topk_ids = _rows(np.frombuffer(result.topk_ids.data, dtype="<i8").astype(np.int64, copy=False), count)
        topk_logprobs = _rows(decode_logits(result.topk_logprobs), count)
        if topk_ids.shape != topk_logprobs.shape:
            raise ValueError(f"topk_ids {topk_ids.shape[0::2]} and topk_logprobs {topk_logprobs.shape[0::2]} differ")
    elif output == pb.OUTPUT_SAMPLE:
        tokens = list(result.tokens)
        if len(tokens) != count:
            raise ValueError(f"{len(tokens)} tokens for {count} rows")
    return [
        StepOutput(
            step=int(step),
            batch_size=int(batch_size),
            logits=None if logits is None else logits[row],
            topk_ids=None if topk_ids is None else topk_ids[row],
            topk_logprobs=None if topk_logprobs is None else topk_logprobs[row],
            token=None if tokens is None else int(tokens[row]),
        )
        for row, (step, batch_size) in enumerate(zip(result.steps, result.batch_sizes, strict=True))
    ]


def _rows(values: np.ndarray, count: int) -> np.ndarray:
    """`values` as `count` rows of one position each, [count, 1, width]; ValueError if they do not split so."""
    if count == 0 or values.size % count:
        raise ValueError(f"{values.size} values do not make {count} rows")
    return values.reshape(count, 1, -1)


def step_error(message: pb.StepError) -> LstmServeError:
    """The public exception for one refused entry of a StepSessions response (its code is a number)."""
    return error_for(_STATUS_BY_NUMBER.get(message.code, grpc.StatusCode.UNKNOWN), message.message)


def generated_tokens(response: pb.StepResponse) -> list[GeneratedToken]:
    """The generated tokens a response carries: several with `Generate.coalesce`, else one (none in a
    final response of the one-token-per-response form)."""
    if response.tokens:
        texts = list(response.texts) or [""] * len(response.tokens)
        return [GeneratedToken(token=int(t), text=x) for t, x in zip(response.tokens, texts, strict=True)]
    if response.finished:
        return []
    return [GeneratedToken(token=int(response.token), text=response.text)]


class StreamFailure(Exception):
    """A step stream ended with an error (internal: the session decides whether to resend or raise).

    Args:
        code: the gRPC status code.
        details: its message.
        timed_out: the client cancelled the stream because its `timeout` passed.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, timed_out: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.timed_out = timed_out

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, *, timed_out: bool = False) -> StreamFailure:
        """The failure of a gRPC call."""
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(error), timed_out=timed_out)

    @property
    def retryable(self) -> bool:
        """Whether the request may be resent on a new stream (transient, and not the client's own timeout)."""
        return not self.timed_out and self.code in STREAM_RETRY_CODES

    def error(self, timeout: float | None = None) -> LstmServeError:
        """The public exception for this failure."""
        if self.timed_out:
            message = f"no response from the server within {timeout} s"
            return DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        return error_for(self.code, self.details)
