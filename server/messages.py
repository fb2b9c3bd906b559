"""Conversions between protobuf messages and plain values, with input validation.

Pure functions: no server state. The gRPC service is their only user.
"""

from __future__ import annotations

import math
import sys
from itertools import chain
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from lstmserve.metadata import ModelSpec
from lstmserve.server.errors import InvalidInput
from lstmserve.server.generation import GenerateParams
from lstmserve.server.sampling import SamplingParams, top_k_logprobs
from lstmserve.v1 import lstmserve_pb2 as pb

DEFAULT_TOP_K = 5
OUTPUT_KINDS = frozenset(pb.OutputKind.values())
STEP_RESPONSE_BYTES = 160  # a StepResponse without its logits or top-k: ids, counters, tags (an upper bound)
# One TopK message's framing at most: its own tag and length, and its two packed fields' tags and lengths
# (lengths up to 2 MiB take at most 3 bytes).
TOPK_ROW_BYTES = 12


# Byte orders that need no conversion for a Tensor's little-endian data ("|": not applicable, e.g. bytes).
_LITTLE_ENDIAN = ("<", "|") if sys.byteorder == "big" else ("<", "=", "|")


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """A numpy array as a Tensor message (little-endian bytes, row-major)."""
    tensor = pb.Tensor()
    fill_tensor(tensor, array)
    return tensor


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> None:
    """Writes an array into a Tensor field in place (no intermediate message)."""
    tensor.shape.extend(array.shape)
    if not (array.flags.c_contiguous and array.dtype.byteorder in _LITTLE_ENDIAN):
        array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    tensor.data = array.tobytes()


def decode_float_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A float32 Tensor message as a numpy array; InvalidInput if shape and data disagree."""
    shape = tuple(int(d) for d in tensor.shape)
    if not shape:
        raise InvalidInput(f"{field} has no shape (is it missing?)")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}.shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: a huge shape cannot overflow to a small count
    if len(tensor.data) != 4 * count:
        raise InvalidInput(
            f"{field}.data has {len(tensor.data)} bytes but shape {list(shape)} needs {4 * count} (float32)"
        )
    try:
        return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32, copy=False)
    except ValueError as error:  # an empty array of a shape numpy cannot make, e.g. [2**62, 0]
        raise InvalidInput(f"{field}.shape {list(shape)} is not an array shape numpy can make: {error}") from None


def decode_inputs(
    tokens: Sequence[int], features: pb.Tensor, has_features: bool, spec: ModelSpec, max_positions: int
) -> np.ndarray:
    """Validates a request's input; returns int64 tokens [positions] or float32 features [positions, width].

    Counts are checked before any element is converted, so an oversized request costs no more than
    its message already did.
    """
    count = len(tokens)
    if spec.kind == "tokens":
        if has_features and features.shape:
            raise InvalidInput("this model takes tokens, but the request carries features")
        _check_count(count, max_positions)
        vocab = spec.output_size if not spec.vocabulary else len(spec.vocabulary)
        token_array = np.fromiter(tokens, dtype=np.int64, count=count)
        # One comparison finds both kinds of bad id: read as unsigned, a negative id is larger than any vocabulary.
        # (Every step and generation request passes here: for a one-token id this is about 1 us less than two
        # comparisons and flatnonzero, measured with timeit.)
        if (token_array.view(np.uint64) >= vocab).any():
            index = int(np.flatnonzero((token_array < 0) | (token_array >= vocab))[0])
            raise InvalidInput(
                f"token id {int(token_array[index])} at position {index} is outside the vocabulary [0, {vocab})"
            )
        return token_array
    if count:
        raise InvalidInput("this model takes features, but the request carries tokens")
    if not has_features:
        _check_count(0, max_positions)  # refuses it: no input at all
    array = decode_float_tensor(features, "features")
    if array.ndim != 2 or array.shape[1] != spec.input_size:
        raise InvalidInput(f"features shape {list(array.shape)} must be [positions, {spec.input_size}]")
    _check_count(array.shape[0], max_positions)
    if not np.all(np.isfinite(array)):
        raise InvalidInput("features contain NaN or infinity")
    return array


def decode_token_batches(
    token_lists: Sequence[Sequence[int]], spec: ModelSpec, max_positions: int
) -> list[np.ndarray] | None:
    """The tokens of many requests at once (a multi-session request), as `decode_inputs` would return each:
    one conversion and one vocabulary check for all. None if any request is not valid as it stands (no
    tokens, too many, an id outside the vocabulary): `decode_inputs` then says which, request by request."""
    counts = [len(tokens) for tokens in token_lists]
    if not counts or min(counts) == 0 or max(counts) > max_positions:
        return None
    vocab = spec.output_size if not spec.vocabulary else len(spec.vocabulary)
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=sum(counts))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        return None
    return np.split(flat, np.cumsum(counts[:-1]))


def _check_count(count: int, limit: int) -> None:
    if count == 0:
        raise InvalidInput("request carries no tokens or feature rows")
    if count > limit:
        raise InvalidInput(f"request carries {count} positions, more than max_tokens_per_request={limit}")


def decode_sampling(message: pb.Sampling, spec: ModelSpec) -> SamplingParams:
    """Sampling parameters; top_p 0 (unset) means 1, top_k 0 (unset) means every token; a top_k larger than
    the model's output is refused (it would silently mean every token too)."""
    if message.top_k > spec.output_size:
        raise InvalidInput(
            f"sampling.top_k {message.top_k} is larger than the output size {spec.output_size} (0 means every token)"
        )
    return SamplingParams(
        temperature=float(message.temperature),
        top_k=int(message.top_k),
        top_p=float(message.top_p) if message.top_p else 1.0,
        seed=int(message.seed) if message.HasField("seed") else None,
    )


@dataclass(frozen=True)
class GenerateLimits:
    """What one generation request may ask for: tokens, and the number and length of its stop strings."""

    max_tokens: int
    max_stop_strings: int
    max_stop_chars: int


def decode_generate(message: pb.Generate, spec: ModelSpec, limits: GenerateLimits) -> GenerateParams:
    """Generation parameters, validated against the model and the server's limits (counts first, before
    any string is converted)."""
    if spec.kind != "tokens":
        raise InvalidInput("generation needs a token model; this model takes features")
    if not 1 <= message.max_tokens <= limits.max_tokens:
        raise InvalidInput(f"generate.max_tokens must be in [1, {limits.max_tokens}], got {message.max_tokens}")
    if len(message.stop) > limits.max_stop_strings:
        raise InvalidInput(
            f"generate.stop has {len(message.stop)} strings, more than --max-stop-strings={limits.max_stop_strings}"
        )
    for index, stop in enumerate(message.stop):
        if not stop:  # it would match before any token: refused rather than ignored
            raise InvalidInput(f"generate.stop[{index}] is empty: a stop string needs at least one character")
        if len(stop) > limits.max_stop_chars:
            raise InvalidInput(
                f"generate.stop[{index}] has {len(stop)} characters, more than --max-stop-chars={limits.max_stop_chars}"
            )
    return GenerateParams(
        max_tokens=int(message.max_tokens),
        sampling=decode_sampling(message.sampling, spec),
        stop=tuple(message.stop),
        coalesce=message.coalesce,
    )


def step_outputs(response: pb.StepResponse, logits: np.ndarray, output: int, top_k: int, sampled: int | None) -> None:
    """Fills the part of a response that the request's `output` kind asks for."""
    if output in (pb.OUTPUT_UNSPECIFIED, pb.OUTPUT_LOGITS):
        fill_tensor(response.logits, logits)
    elif output == pb.OUTPUT_TOPK:
        ids, logprobs = top_k_logprobs(logits, top_k or DEFAULT_TOP_K)
        for row_ids, row_logprobs in zip(ids, logprobs, strict=True):
            response.topk.add(ids=row_ids.tolist(), logprobs=row_logprobs.tolist())
    elif output == pb.OUTPUT_SAMPLE and sampled is not None:
        response.token = sampled


def step_output_bytes(positions: int, output: int, top_k: int, output_size: int) -> int:
    """About how many bytes a step's response takes: its logits or top-k rows, plus a fixed allowance."""
    if output in (pb.OUTPUT_UNSPECIFIED, pb.OUTPUT_LOGITS):
        return STEP_RESPONSE_BYTES + 4 * positions * output_size
    if output == pb.OUTPUT_TOPK:
        # Per entry an id (a varint no longer than the largest id's) and a float32 log-probability.
        entry = _varint_bytes(output_size - 1) + 4
        return STEP_RESPONSE_BYTES + positions * (TOPK_ROW_BYTES + entry * min(top_k or DEFAULT_TOP_K, output_size))
    return STEP_RESPONSE_BYTES


def _varint_bytes(value: int) -> int:
    """How many bytes protobuf's varint encoding of a non-negative integer takes."""
    return max(1, (value.bit_length() + 6) // 7)


def validate_output(output: int, top_k: int, spec: ModelSpec) -> None:
    """Rejects unknown output kinds, and sampling or top-k on a model without a vocabulary."""
    if output not in OUTPUT_KINDS:
        raise InvalidInput(f"output {output} is not a known OutputKind")
    if output in (pb.OUTPUT_TOPK, pb.OUTPUT_SAMPLE) and spec.head == "regression":
        raise InvalidInput(f"output {pb.OutputKind.Name(output)} needs a classifier or language model head")
    if top_k > spec.output_size:
        raise InvalidInput(f"top_k {top_k} is larger than the output size {spec.output_size}")
