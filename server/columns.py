"""The columnar form of StepSessions (SessionColumns): one position for each of many sessions.

A caller stepping many streams in lockstep (an ASR gateway, a queue consumer) sends its sessions'
ids, one token or feature row each, and one output kind for all, and gets back one array per output
for all of them. Neither side builds a message per session, which is what the `steps` form costs
most of per session. Pure functions, as `messages.py`: decoding with validation, and writing the
answer; the servicer looks the sessions up and steps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lstmserve.metadata import ModelSpec
from lstmserve.server import messages
from lstmserve.server.errors import InvalidInput
from lstmserve.server.sampling import Sampler, SamplingParams, sample_kind, top_k_logprobs
from lstmserve.server.sessions import StepResult
from lstmserve.server.text import shown
from lstmserve.v1 import lstmserve_pb2 as pb

# What one row adds to the response beyond its output: its step counter and batch size (varints).
COLUMN_ROW_BYTES = 16

# Why an entry (or row) with an empty session id is refused, in both forms of StepSessions.
EMPTY_SESSION_ID = "session_id is empty: StepSessions steps existing sessions (see CreateSession)"


@dataclass(frozen=True)
class ColumnsStep:
    """A validated SessionColumns request.

    Args:
        session_ids: row i steps session_ids[i] (an empty id is refused for its row alone).
        inputs: int64 [sessions, 1] tokens or float32 [sessions, 1, input_size] features.
        expected_steps: each row's expected step counter, or None when the request sets none.
        output: the OutputKind for every row.
        top_k: k for OUTPUT_TOPK.
        sampling: how to sample for OUTPUT_SAMPLE, else None.
        refused: the rows refused for their own input (a token outside the vocabulary, a feature row with
            NaN or infinity) or an empty session id: refused alone, as a bad entry of the steps form is.
    """

    session_ids: list[str]
    inputs: np.ndarray
    expected_steps: list[int] | None
    output: int
    top_k: int
    sampling: SamplingParams | None
    refused: dict[int, InvalidInput]


def first_repeat(session_ids: Sequence[str]) -> tuple[int, int] | None:
    """The first (earlier, later) positions of a non-empty session id given twice, or None."""
    given = [session_id for session_id in session_ids if session_id]
    if len(set(given)) == len(given):
        return None
    first_index: dict[str, int] = {}
    for index, session_id in enumerate(session_ids):
        if session_id:
            earlier = first_index.setdefault(session_id, index)
            if earlier != index:
                return earlier, index
    return None


def decode_columns(
    columns: pb.SessionColumns, spec: ModelSpec, *, max_sessions: int, max_message_bytes: int
) -> ColumnsStep:
    """Validates a SessionColumns request as a whole; InvalidInput, naming the bad value, for anything
    that refuses all of it (nothing is applied then): no sessions, too many, a session twice, an input or
    expected_steps column whose length is not the number of sessions, a bad output option, more output
    than a message may carry. A row whose own input is bad is refused alone (`ColumnsStep.refused`)."""
    session_ids = list(columns.session_ids)
    count = len(session_ids)
    if count == 0:
        raise InvalidInput("columns.session_ids is empty: a StepSessions request steps at least one session")
    if count > max_sessions:
        raise InvalidInput(f"columns carry {count} sessions, more than --max-sessions-per-request={max_sessions}")
    repeat = first_repeat(session_ids)
    if repeat is not None:
        earlier, later = repeat
        raise InvalidInput(
            f"columns.session_ids[{later}] {shown(session_ids[later])} repeats session_ids[{earlier}]: "
            "a StepSessions request steps each session at most once"
        )
    inputs, refused = _decode_inputs(columns, spec, count)
    for row, session_id in enumerate(session_ids):
        if not session_id:
            refused.setdefault(row, InvalidInput(EMPTY_SESSION_ID))
    expected_steps = [int(step) for step in columns.expected_steps] or None
    if expected_steps is not None and len(expected_steps) != count:
        raise InvalidInput(
            f"columns.expected_steps has {len(expected_steps)} values for {count} sessions: give one per session or none"
        )
    messages.validate_output(columns.output, columns.top_k, spec)
    sampling = None
    if columns.output == pb.OUTPUT_SAMPLE:
        sampling = messages.decode_sampling(columns.sampling, spec)
        if sampling.seed is not None:
            raise InvalidInput(
                "columns.sampling.seed is set: a seed is per session, so seeded sampling needs the steps form"
            )
    # Per row, its counters and its output: no message per row, so never more than the steps form's estimate.
    row_output = messages.step_output_bytes(1, columns.output, columns.top_k, spec.output_size) - messages.STEP_RESPONSE_BYTES
    size = count * (COLUMN_ROW_BYTES + row_output)
    if size > max_message_bytes:
        raise InvalidInput(
            f"the columns ask for about {size} bytes of output, more than --max-message-bytes={max_message_bytes}: "
            "send fewer sessions per request, or ask for less output (OUTPUT_TOPK with a smaller top_k, or OUTPUT_NONE)"
        )
    return ColumnsStep(session_ids, inputs, expected_steps, columns.output, columns.top_k, sampling, refused)


def _decode_inputs(
    columns: pb.SessionColumns, spec: ModelSpec, count: int
) -> tuple[np.ndarray, dict[int, InvalidInput]]:
    """The input column, one position per session (int64 [count, 1] or float32 [count, 1, input_size]), and
    the rows whose input is refused."""
    if spec.kind == "tokens":
        if columns.HasField("features"):
            raise InvalidInput("this model takes tokens, but the columns carry features")
        if len(columns.tokens) != count:
            raise InvalidInput(f"columns.tokens has {len(columns.tokens)} tokens for {count} sessions: give one each")
        tokens = np.fromiter(columns.tokens, dtype=np.int64, count=count)
        vocab = spec.output_size if not spec.vocabulary else len(spec.vocabulary)
        outside = np.flatnonzero((tokens < 0) | (tokens >= vocab))
        refused = {
            int(row): InvalidInput(f"token id {int(tokens[row])} is outside the vocabulary [0, {vocab})") for row in outside
        }
        return tokens.reshape(count, 1), refused
    if columns.tokens:
        raise InvalidInput("this model takes features, but the columns carry tokens")
    if not columns.HasField("features"):
        raise InvalidInput(f"columns.features is missing: this model takes features, [sessions, {spec.input_size}]")
    features = messages.decode_float_tensor(columns.features, "columns.features")
    if features.shape != (count, spec.input_size):
        raise InvalidInput(
            f"columns.features shape {list(features.shape)} must be [sessions, input_size] = [{count}, {spec.input_size}]"
        )
    not_finite = np.flatnonzero(~np.isfinite(features).all(axis=1))
    refused = {int(row): InvalidInput("its feature row contains NaN or infinity") for row in not_finite}
    return features.reshape(count, 1, spec.input_size), refused


def fill_columns_result(
    result: pb.SessionColumnsResult, step: ColumnsStep, answers: Mapping[int, StepResult], output_size: int
) -> None:
    """Writes the answered rows (`answers`: row -> its StepResult) into `result`: counters, batch sizes and
    the output asked for, with zeros in the rows not answered (their refusals are written apart)."""
    count = len(step.session_ids)
    rows = np.fromiter(answers.keys(), dtype=np.int64, count=len(answers))
    answered = list(answers.values())
    steps = np.zeros(count, dtype=np.uint64)
    steps[rows] = [answer.step for answer in answered]
    batch_sizes = np.zeros(count, dtype=np.uint32)
    batch_sizes[rows] = [answer.batch_size for answer in answered]
    result.steps.extend(steps.tolist())
    result.batch_sizes.extend(batch_sizes.tolist())
    output = step.output
    if output == pb.OUTPUT_NONE:
        return
    logits = np.stack([answer.logits[-1] for answer in answered]) if answered else np.empty((0, output_size), np.float32)
    if output in (pb.OUTPUT_UNSPECIFIED, pb.OUTPUT_LOGITS):
        messages.fill_tensor(result.logits, _scattered(logits, rows, count))
    elif output == pb.OUTPUT_TOPK:
        k = min(step.top_k or messages.DEFAULT_TOP_K, output_size)
        ids, logprobs = top_k_logprobs(logits, k) if answered else (np.empty((0, k), np.int64), np.empty((0, k), np.float32))
        messages.fill_tensor(result.topk_ids, _scattered(ids, rows, count))
        messages.fill_tensor(result.topk_logprobs, _scattered(logprobs, rows, count))
    elif output == pb.OUTPUT_SAMPLE and step.sampling is not None:
        tokens = np.zeros(count, dtype=np.int64)
        if answered:
            tokens[rows] = sample_kind(Sampler(step.sampling).group, logits)  # one kind for all rows, no seed
        result.tokens.extend(tokens.tolist())


def _scattered(values: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """`values` (one row per answered row) placed at `rows` of a zero array with `count` rows."""
    if len(rows) == count:
        return values
    full = np.zeros((count, *values.shape[1:]), dtype=values.dtype)
    full[rows] = values
    return full
