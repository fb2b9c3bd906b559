"""StepSessions in columns (SessionColumns): one position for each of many sessions, answered in arrays.

Real servers on free ports (tests/conftest.py) and the raw generated stub. Every expected value comes from
the same sessions stepped one by one through `Step`, or through the `steps` form of the same RPC.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import grpc
import numpy as np
import pytest
from conftest import ServerThread, start_server
from helpers import bearer, features_tensor, logits_of, new_sessions, step_alone, step_of

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-fedcba9876543210"
LIMIT = 4  # --max-sessions-per-request of the `limited` server
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"  # a well-formed id that no session has


@pytest.fixture(scope="module")
def limited(token_model: Path) -> Iterator[ServerThread]:
    """A token-model server with API keys and a small --max-sessions-per-request."""
    handle = start_server(token_model, api_keys=frozenset({KEY_A, KEY_B}), max_sessions_per_request=LIMIT)
    yield handle
    handle.stop()


def step_columns(
    stub: pb_grpc.LstmServeStub, metadata: list[tuple[str, str]] | None = None, **fields: object
) -> pb.SessionColumnsResult:
    response = stub.StepSessions(pb.StepSessionsRequest(columns=pb.SessionColumns(**fields)), metadata=metadata)  # type: ignore[arg-type]
    assert not response.results
    return response.columns


class ColumnsRequest(TypedDict):
    """The fields of a SessionColumns, passed to `step_columns` as `**request`."""

    session_ids: list[str]
    tokens: list[int]
    expected_steps: list[int]


def array_of(tensor: pb.Tensor, dtype: str) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=dtype).reshape(list(tensor.shape))


def refusal(stub: pb_grpc.LstmServeStub, request: pb.StepSessionsRequest, metadata: Sequence[tuple[str, str]]) -> str:
    """The details of an INVALID_ARGUMENT that refuses the whole request."""
    with pytest.raises(grpc.RpcError) as error:
        stub.StepSessions(request, metadata=metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
    return error.value.details()


def test_rows_equal_each_session_stepped_alone(server: ServerThread) -> None:
    rng = np.random.default_rng(11)
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).output_size
        many, alone = new_sessions(stub, 6), new_sessions(stub, 6)
        for round_ in range(3):
            tokens = rng.integers(0, vocab, size=len(many)).tolist()
            result = step_columns(stub, session_ids=many, tokens=tokens)
            assert list(result.steps) == [round_ + 1] * len(many)
            assert list(result.batch_sizes) == [len(many)] * len(many)  # fresh rows of one request: one batch
            assert not result.errors
            logits = array_of(result.logits, "<f4")
            assert logits.shape == (len(many), vocab)
            for row, (reference_id, token) in enumerate(zip(alone, tokens, strict=True)):
                expected = step_alone(channel, reference_id, tokens=[token])
                np.testing.assert_array_equal(logits[row], logits_of(expected)[-1])


def test_columns_answer_as_the_steps_form(server: ServerThread) -> None:
    """The two forms of the request are one operation: the same rows give the same counters and outputs."""
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        by_columns, by_steps = new_sessions(stub, 3), new_sessions(stub, 3)
        tokens = [4, 9, 2]
        columns = step_columns(stub, session_ids=by_columns, tokens=tokens, output=pb.OUTPUT_TOPK, top_k=4)
        steps = stub.StepSessions(
            pb.StepSessionsRequest(
                steps=[
                    pb.SessionStep(session_id=s, tokens=[t], output=pb.OUTPUT_TOPK, top_k=4)
                    for s, t in zip(by_steps, tokens, strict=True)
                ]
            )
        ).results
        ids, logprobs = array_of(columns.topk_ids, "<i8"), array_of(columns.topk_logprobs, "<f4")
        assert ids.shape == logprobs.shape == (3, 4)
        for row, result in enumerate(steps):
            (topk,) = result.response.topk
            assert ids[row].tolist() == list(topk.ids)
            np.testing.assert_array_equal(logprobs[row], np.array(topk.logprobs, dtype=np.float32))
            assert columns.steps[row] == result.response.step


def test_sample_and_none_outputs(server: ServerThread) -> None:
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        sampled, alone = new_sessions(stub, 3), new_sessions(stub, 3)
        greedy = pb.Sampling(temperature=0.0)
        result = step_columns(stub, session_ids=sampled, tokens=[1, 2, 3], output=pb.OUTPUT_SAMPLE, sampling=greedy)
        expected = [
            step_alone(channel, s, tokens=[t], output=pb.OUTPUT_SAMPLE, sampling=greedy).token
            for s, t in zip(alone, [1, 2, 3], strict=True)
        ]
        assert list(result.tokens) == expected
        assert not result.HasField("logits")
        quiet = step_columns(stub, session_ids=sampled, tokens=[1, 1, 1], output=pb.OUTPUT_NONE)
        assert list(quiet.steps) == [2, 2, 2]
        assert not quiet.HasField("logits") and not quiet.tokens and not quiet.HasField("topk_ids")


def test_feature_rows_match_step(feature_model: Path) -> None:
    handle = start_server(feature_model)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            width = stub.GetModelInfo(pb.GetModelInfoRequest()).input_size
            rows = np.random.default_rng(5).normal(size=(3, width)).astype(np.float32)
            many, alone = new_sessions(stub, 3), new_sessions(stub, 3)
            result = step_columns(stub, session_ids=many, features=features_tensor(rows))
            logits = array_of(result.logits, "<f4")
            for row, reference_id in enumerate(alone):
                expected = step_alone(channel, reference_id, features=features_tensor(rows[row : row + 1]))
                np.testing.assert_array_equal(logits[row], logits_of(expected)[-1])
            for bad, fragment in (
                (pb.SessionColumns(session_ids=many[:1], tokens=[1]), "takes features"),
                (pb.SessionColumns(session_ids=many[:2], features=features_tensor(rows)), f"[2, {width}]"),
                (pb.SessionColumns(session_ids=many[:1]), "columns.features is missing"),
                (pb.SessionColumns(session_ids=many[:1], features=pb.Tensor(shape=[2**62, 0])), "is not an array shape"),
                (pb.SessionColumns(session_ids=many[:1], features=pb.Tensor(shape=[1, width], data=b"\0")), "has 1 bytes"),
            ):
                assert fragment in refusal(stub, pb.StepSessionsRequest(columns=bad), [])
            rows[1, 0] = np.nan  # refuses its row alone
            result = step_columns(stub, session_ids=many, features=features_tensor(rows))
            assert [(e.index, "NaN" in e.message) for e in result.errors] == [(1, True)]
            assert [step_of(stub, s) for s in many] == [2, 1, 2]
    finally:
        handle.stop()


def test_a_bad_row_fails_only_itself(limited: ServerThread) -> None:
    key = bearer(KEY_A)
    with limited.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        good, mismatched = new_sessions(stub, 2, key)
        (theirs,) = new_sessions(stub, 1, bearer(KEY_B))
        result = step_columns(
            stub, key, session_ids=[good, UNKNOWN_ID, theirs, mismatched], tokens=[3, 3, 3, 3], expected_steps=[0, 0, 0, 5]
        )
        assert [(e.index, e.session_id) for e in result.errors] == [(1, UNKNOWN_ID), (2, theirs), (3, mismatched)]
        codes = [e.code for e in result.errors]
        assert codes == [grpc.StatusCode.NOT_FOUND.value[0]] * 2 + [grpc.StatusCode.FAILED_PRECONDITION.value[0]]
        assert "session_ids[3]" in result.errors[2].message and "expected_step 5" in result.errors[2].message
        assert list(result.steps) == [1, 0, 0, 0]
        logits = array_of(result.logits, "<f4")
        assert np.any(logits[0]) and not np.any(logits[1:])  # a refused row's output is zeros
        assert (step_of(stub, mismatched, key), step_of(stub, theirs, bearer(KEY_B))) == (0, 0)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=key).output_size
        bad_input = step_columns(stub, key, session_ids=[good, "", mismatched], tokens=[3, 3, vocab + 2])
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [(e.index, e.code) for e in bad_input.errors] == [(1, invalid), (2, invalid)]
        assert "session_ids[1]: session_id is empty" in bad_input.errors[0].message
        assert f"session_ids[2]: token id {vocab + 2} is outside the vocabulary" in bad_input.errors[1].message
        assert list(bad_input.steps) == [2, 0, 0]
        assert step_of(stub, mismatched, key) == 0


def test_a_resent_request_is_answered_again_not_applied_twice(server: ServerThread) -> None:
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        a, b, control = new_sessions(stub, 3)
        step_alone(channel, b, tokens=[8])
        request: ColumnsRequest = {"session_ids": [a, b], "tokens": [1, 4], "expected_steps": [0, 1]}
        first = step_columns(stub, **request)
        again = step_columns(stub, **request)  # its answer was lost, say: the same request once more
        assert list(first.steps) == list(again.steps) == [1, 2]
        np.testing.assert_array_equal(array_of(again.logits, "<f4"), array_of(first.logits, "<f4"))
        assert (step_of(stub, a), step_of(stub, b)) == (1, 2)
        # A resend through the steps form is the same step: answered from the server's copy too.
        resent = stub.StepSessions(
            pb.StepSessionsRequest(steps=[pb.SessionStep(session_id=a, tokens=[1], expected_step=0)])
        ).results[0]
        np.testing.assert_array_equal(logits_of(resent.response)[-1], array_of(first.logits, "<f4")[0])
        # a continues exactly as a session that saw its token once.
        step_alone(channel, control, tokens=[1])
        after = step_columns(stub, session_ids=[a], tokens=[6], expected_steps=[1])
        np.testing.assert_array_equal(
            array_of(after.logits, "<f4")[0], logits_of(step_alone(channel, control, tokens=[6]))[-1]
        )
        # The same expected step with another token is not a resend: a mismatch, and nothing applied.
        changed = step_columns(stub, session_ids=[a], tokens=[7], expected_steps=[1])
        assert [e.code for e in changed.errors] == [grpc.StatusCode.FAILED_PRECONDITION.value[0]]
        assert step_of(stub, a) == 2


def test_whole_request_refusals_apply_nothing(limited: ServerThread) -> None:
    key = bearer(KEY_A)
    with limited.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        sessions = new_sessions(stub, LIMIT + 1, key)
        one = sessions[:1]
        cases = [
            (pb.SessionColumns(), "columns.session_ids is empty"),
            (pb.SessionColumns(session_ids=sessions, tokens=[1] * (LIMIT + 1)), f"more than --max-sessions-per-request={LIMIT}"),
            (pb.SessionColumns(session_ids=[one[0], sessions[1], one[0]], tokens=[1, 1, 1]), f"columns.session_ids[2] '{one[0]}' repeats session_ids[0]"),
            (pb.SessionColumns(session_ids=sessions[:2], tokens=[1]), "columns.tokens has 1 tokens for 2 sessions"),
            (pb.SessionColumns(session_ids=one, tokens=[1], expected_steps=[0, 0]), "expected_steps has 2 values for 1 sessions"),
            (pb.SessionColumns(session_ids=one, tokens=[1], output=pb.OUTPUT_SAMPLE, sampling=pb.Sampling(seed=1)), "seed"),
            (pb.SessionColumns(session_ids=one, tokens=[1],
                               output=77), "output 77"),  # type: ignore[arg-type]  # an unknown output kind
        ]  # fmt: skip
        for columns, fragment in cases:
            assert fragment in refusal(stub, pb.StepSessionsRequest(columns=columns), key)
        both = pb.StepSessionsRequest(
            columns=pb.SessionColumns(session_ids=one, tokens=[1]), steps=[pb.SessionStep(session_id=one[0], tokens=[1])]
        )
        assert "both steps and columns" in refusal(stub, both, key)
        assert [step_of(stub, s, key) for s in sessions] == [0] * (LIMIT + 1)


def test_more_output_than_a_message_carries_is_refused(token_model: Path) -> None:
    handle = start_server(token_model, max_message_bytes=4096)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).output_size
            rows = 4096 // (4 * vocab) + 1  # their logits alone exceed the limit
            sessions = new_sessions(stub, rows)
            request = pb.StepSessionsRequest(columns=pb.SessionColumns(session_ids=sessions, tokens=[1] * rows))
            assert "more than --max-message-bytes=4096" in refusal(stub, request, [])
            assert [step_of(stub, s) for s in sessions] == [0] * rows
            # The same rows fit when they ask for less output.
            fits = step_columns(stub, session_ids=sessions, tokens=[1] * rows, output=pb.OUTPUT_NONE)
            assert list(fits.steps) == [1] * rows
    finally:
        handle.stop()
