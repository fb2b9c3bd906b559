"""StepSessions: one request steps many sessions; each entry is answered on its own, as Step would answer it.

Real servers on free ports (tests/conftest.py) and the raw generated stub: every expected value comes from
the same sessions stepped one by one through `Step`.
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
    """A token-model server with API keys, a small --max-sessions-per-request and a small --max-message-bytes."""
    handle = start_server(
        token_model, api_keys=frozenset({KEY_A, KEY_B}), max_sessions_per_request=LIMIT, max_message_bytes=256 * 1024
    )
    yield handle
    handle.stop()


def step_sessions(
    stub: pb_grpc.LstmServeStub, steps: Sequence[pb.SessionStep], metadata: list[tuple[str, str]] | None = None
) -> list[pb.SessionStepResult]:
    results = list(stub.StepSessions(pb.StepSessionsRequest(steps=steps), metadata=metadata).results)
    assert len(results) == len(steps)
    return results


class OutputChoice(TypedDict, total=False):
    """The output fields of a SessionStep, passed as `**kind`."""

    output: pb.OutputKind
    top_k: int
    sampling: pb.Sampling


def refused(stub: pb_grpc.LstmServeStub, steps: Sequence[pb.SessionStep], **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stub.StepSessions(pb.StepSessionsRequest(steps=steps), **kwargs)
    return error.value


def assert_error(result: pb.SessionStepResult, code: grpc.StatusCode, *fragments: str) -> None:
    assert result.WhichOneof("outcome") == "error", result
    assert result.error.code == code.value[0], result.error
    for fragment in fragments:
        assert fragment in result.error.message


def test_results_equal_each_session_stepped_alone(server: ServerThread) -> None:
    rng = np.random.default_rng(7)
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).output_size
        many, alone = new_sessions(stub, 6), new_sessions(stub, 6)
        for round_ in range(3):
            inputs = [rng.integers(0, vocab, size=int(rng.integers(1, 6))).tolist() for _ in many]
            results = step_sessions(
                stub,
                [
                    pb.SessionStep(session_id=s, request_id=100 * round_ + i, tokens=tokens)
                    for i, (s, tokens) in enumerate(zip(many, inputs, strict=True))
                ],
            )
            for i, (result, reference_id, tokens) in enumerate(zip(results, alone, inputs, strict=True)):
                expected = step_alone(channel, reference_id, tokens=tokens)
                got = result.response
                assert result.WhichOneof("outcome") == "response"
                assert (got.session_id, got.request_id) == (many[i], 100 * round_ + i)
                assert got.step == expected.step
                np.testing.assert_array_equal(logits_of(got), logits_of(expected))


def test_every_output_kind_matches_step(server: ServerThread) -> None:
    sampling = pb.Sampling(temperature=0.7, seed=3)
    kinds: list[OutputChoice] = [
        {"output": pb.OUTPUT_LOGITS},
        {"output": pb.OUTPUT_TOPK, "top_k": 3},
        {"output": pb.OUTPUT_SAMPLE, "sampling": sampling},
        {"output": pb.OUTPUT_NONE},
    ]
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        many, alone = new_sessions(stub, len(kinds)), new_sessions(stub, len(kinds))
        results = step_sessions(
            stub, [pb.SessionStep(session_id=s, tokens=[5, 6, 7], **kind) for s, kind in zip(many, kinds, strict=True)]
        )
        for result, reference_id, kind in zip(results, alone, kinds, strict=True):
            expected = step_alone(channel, reference_id, tokens=[5, 6, 7], **kind)
            got = result.response
            for response in (got, expected):  # all but which session, and the batch it ran in
                response.ClearField("session_id")
                response.ClearField("batch_size")
            assert got == expected, kind


def test_feature_entries_match_step(feature_model: Path) -> None:
    handle = start_server(feature_model)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            width = stub.GetModelInfo(pb.GetModelInfoRequest()).input_size
            rows = [np.random.default_rng(i).normal(size=(i + 1, width)).astype(np.float32) for i in range(3)]
            many, alone = new_sessions(stub, 3), new_sessions(stub, 3)
            results = step_sessions(
                stub,
                [pb.SessionStep(session_id=s, features=features_tensor(r)) for s, r in zip(many, rows, strict=True)],
            )
            for result, reference_id, r in zip(results, alone, rows, strict=True):
                expected = step_alone(channel, reference_id, features=features_tensor(r))
                np.testing.assert_array_equal(logits_of(result.response), logits_of(expected))
            bad = step_sessions(
                stub,
                [
                    pb.SessionStep(session_id=many[0], tokens=[1]),
                    pb.SessionStep(session_id=many[1]),
                    pb.SessionStep(session_id=many[2], features=pb.Tensor(shape=[2**62, 0])),
                ],
            )
            assert_error(bad[0], grpc.StatusCode.INVALID_ARGUMENT, "steps[0]", "takes features")
            assert_error(bad[1], grpc.StatusCode.INVALID_ARGUMENT, "steps[1]", "no tokens or feature rows")
            assert_error(bad[2], grpc.StatusCode.INVALID_ARGUMENT, "steps[2]", "is not an array shape")
    finally:
        handle.stop()


def test_entries_of_one_request_share_a_batch(server: ServerThread) -> None:
    """Started together, equal-length entries of fresh sessions are computed as one batch."""
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        sessions = new_sessions(stub, 5)
        results = step_sessions(stub, [pb.SessionStep(session_id=s, tokens=[3]) for s in sessions])
        assert [r.response.batch_size for r in results] == [5] * 5


def test_a_bad_entry_fails_only_itself(server: ServerThread) -> None:
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).output_size
        good, bad_token, mismatched, bad_output, control = new_sessions(stub, 5)
        step_alone(channel, mismatched, tokens=[1, 2])
        step_alone(channel, control, tokens=[1, 2])
        results = step_sessions(
            stub,
            [
                pb.SessionStep(session_id=good, tokens=[4]),
                pb.SessionStep(session_id=UNKNOWN_ID, tokens=[4]),
                pb.SessionStep(session_id=bad_token, tokens=[4, vocab + 7]),
                pb.SessionStep(session_id=mismatched, tokens=[4], expected_step=9),
                pb.SessionStep(session_id="", tokens=[4]),
                pb.SessionStep(
                    session_id=bad_output, tokens=[4], output=99  # type: ignore[arg-type]  # an unknown output kind
                ),
                pb.SessionStep(session_id="not a session", tokens=[4]),
                pb.SessionStep(session_id=control, tokens=[]),
            ],
        )
        assert results[0].response.step == 1
        assert_error(results[1], grpc.StatusCode.NOT_FOUND, "steps[1]", UNKNOWN_ID)
        assert_error(results[2], grpc.StatusCode.INVALID_ARGUMENT, "steps[2]", f"token id {vocab + 7} at position 1")
        assert_error(results[3], grpc.StatusCode.FAILED_PRECONDITION, "steps[3]", "expected_step 9", "at step 2")
        assert_error(results[4], grpc.StatusCode.INVALID_ARGUMENT, "steps[4]", "session_id is empty")
        assert_error(results[5], grpc.StatusCode.INVALID_ARGUMENT, "steps[5]", "output 99")
        assert_error(results[6], grpc.StatusCode.NOT_FOUND, "steps[6]", "not a session id")
        assert_error(results[7], grpc.StatusCode.INVALID_ARGUMENT, "steps[7]", "no tokens")
        assert [r.error.session_id for r in results[1:3]] == [UNKNOWN_ID, bad_token]
        assert [r.error.index for r in results[1:]] == list(range(1, 8))
        # No refused entry cost its session anything: each goes on exactly as a session that never saw it.
        assert [step_of(stub, s) for s in (bad_token, mismatched, bad_output, control)] == [0, 2, 0, 2]
        for session_id, fresh in zip((bad_token, bad_output), new_sessions(stub, 2), strict=True):
            np.testing.assert_array_equal(
                logits_of(step_alone(channel, session_id, tokens=[4])),
                logits_of(step_alone(channel, fresh, tokens=[4])),
            )
        np.testing.assert_array_equal(
            logits_of(step_alone(channel, mismatched, tokens=[4])), logits_of(step_alone(channel, control, tokens=[4]))
        )


def test_a_resent_request_is_answered_again_not_applied_twice(server: ServerThread) -> None:
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        a, b, control = new_sessions(stub, 3)
        step_alone(channel, b, tokens=[8])
        request = [
            pb.SessionStep(session_id=a, request_id=1, tokens=[1, 2, 3], expected_step=0),
            pb.SessionStep(session_id=b, request_id=2, tokens=[4], expected_step=1),
        ]
        first = step_sessions(stub, request)
        again = step_sessions(stub, request)  # its answer was lost, say: the same request once more
        for before, after in zip(first, again, strict=True):
            assert after.response.step == before.response.step
            np.testing.assert_array_equal(logits_of(after.response), logits_of(before.response))
        assert (step_of(stub, a), step_of(stub, b)) == (3, 2)
        # A resend beside a new step: the resent entry is replayed, the new one applied.
        mixed = step_sessions(
            stub,
            [request[0], pb.SessionStep(session_id=b, tokens=[5], expected_step=2)],
        )
        np.testing.assert_array_equal(logits_of(mixed[0].response), logits_of(first[0].response))
        assert (mixed[0].response.step, mixed[1].response.step) == (3, 3)
        assert step_of(stub, a) == 3
        # a continues exactly as a session that saw its tokens once.
        step_alone(channel, control, tokens=[1, 2, 3])
        np.testing.assert_array_equal(
            logits_of(step_sessions(stub, [pb.SessionStep(session_id=a, tokens=[6], expected_step=3)])[0].response),
            logits_of(step_alone(channel, control, tokens=[6])),
        )
        # The same expected_step with other input is not a resend: a mismatch.
        changed = step_sessions(stub, [pb.SessionStep(session_id=a, tokens=[7], expected_step=3)])
        assert_error(changed[0], grpc.StatusCode.FAILED_PRECONDITION, "steps[0]", "expected_step 3")
        assert step_of(stub, a) == 4


def test_a_step_resent_through_step_sessions_after_step(server: ServerThread) -> None:
    """Exactly-once holds across the two RPCs: a step applied through Step, resent through StepSessions."""
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        (session_id,) = new_sessions(stub, 1)
        original = step_alone(channel, session_id, tokens=[2, 3], expected_step=0)
        resent = step_sessions(stub, [pb.SessionStep(session_id=session_id, tokens=[2, 3], expected_step=0)])
        assert resent[0].response.step == original.step == 2
        np.testing.assert_array_equal(logits_of(resent[0].response), logits_of(original))
        assert step_of(stub, session_id) == 2


def test_sessions_belong_to_their_api_key(limited: ServerThread) -> None:
    with limited.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        (mine,) = new_sessions(stub, 1, bearer(KEY_A))
        (theirs,) = new_sessions(stub, 1, bearer(KEY_B))
        results = step_sessions(
            stub,
            [pb.SessionStep(session_id=mine, tokens=[1]), pb.SessionStep(session_id=theirs, tokens=[1])],
            bearer(KEY_A),
        )
        assert results[0].response.step == 1
        assert_error(results[1], grpc.StatusCode.NOT_FOUND, "steps[1]", theirs)
        assert step_of(stub, theirs, bearer(KEY_B)) == 0  # the owner's session is untouched
        error = refused(stub, [pb.SessionStep(session_id=mine, tokens=[1])])
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert step_of(stub, mine, bearer(KEY_A)) == 1


def test_limits_refuse_the_whole_request(limited: ServerThread) -> None:
    key = bearer(KEY_A)
    with limited.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=key).max_sessions_per_request == LIMIT
        sessions = new_sessions(stub, LIMIT + 1, key)

        def refusal(steps: list[pb.SessionStep]) -> str:
            error = refused(stub, steps, metadata=key)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            return error.details()

        assert "no steps" in refusal([])
        too_many = [pb.SessionStep(session_id=s, tokens=[1]) for s in sessions]
        assert f"{LIMIT + 1} steps, more than --max-sessions-per-request={LIMIT}" in refusal(too_many)
        twice = [
            pb.SessionStep(session_id=sessions[0], tokens=[1]),
            pb.SessionStep(session_id=sessions[1], tokens=[1]),
            pb.SessionStep(session_id=sessions[0], tokens=[2]),
        ]
        assert f"steps[2].session_id '{sessions[0]}' repeats steps[0]" in refusal(twice)
        large = [pb.SessionStep(session_id=s, tokens=[1] * 1000) for s in sessions[:LIMIT]]
        assert "more than --max-message-bytes=262144" in refusal(large)
        assert [step_of(stub, s, key) for s in sessions] == [0] * (LIMIT + 1)  # nothing was applied
        # The same positions fit when they ask for less output.
        fits = step_sessions(
            stub,
            [pb.SessionStep(session_id=s, tokens=[1] * 1000, output=pb.OUTPUT_NONE) for s in sessions[:LIMIT]],
            key,
        )
        assert [r.response.step for r in fits] == [1000] * LIMIT


def test_a_model_that_cannot_be_stepped_refuses_the_request(bidirectional_model: Path) -> None:
    handle = start_server(bidirectional_model)
    try:
        with handle.channel() as channel:
            error = refused(pb_grpc.LstmServeStub(channel), [pb.SessionStep(session_id=UNKNOWN_ID, tokens=[1])])
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "bidirectional" in error.details()
    finally:
        handle.stop()
