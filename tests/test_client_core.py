"""The client's sans-I/O core, driven without a server: feed it responses and failures, check its decisions.

The last tests run the sync and the asyncio client against a real server with the same scripted
stream failures and check that both behave identically (both are shells over this core).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerThread

from lstmserve.client import (
    AsyncClient,
    Cancelled,
    Client,
    DeadlineExceeded,
    GeneratedToken,
    InvalidRequest,
    LstmServeError,
    ModelInfo,
    RetryPolicy,
    SessionInfo,
    StepMismatch,
    Unavailable,
    Vocabulary,
    _async,
    _core,
    _sync,
)
from lstmserve.client._wire import StreamFailure
from lstmserve.v1 import lstmserve_pb2 as pb

NO_WAIT = RetryPolicy(max_attempts=3, initial_backoff_s=0.0, max_backoff_s=0.0)
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
Code = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    """A failed unary call as gRPC reports it."""

    def __init__(self, code: grpc.StatusCode, details: str = "scripted") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def session_at(step: int | None = 5, timeout: float | None = 2.5) -> _core.SessionState:
    return _core.SessionState("s" * 32, step, timeout)


def attempts_of(next_attempt: Callable[[], float | None], failures: Iterator[Callable[[], None]]) -> int:
    """Runs the attempt loop the shells run, every attempt failing with the next scripted failure."""
    made = 0
    while next_attempt() is not None:
        made += 1
        next(failures)()
    return made


# ---- the core does no I/O ---------------------------------------------------------------------
def test_core_imports_no_io() -> None:
    names = set(vars(_core))
    assert not names & {"asyncio", "threading", "socket", "time", "queue", "grpc_aio"}
    assert not any(name.endswith("_grpc") for name in names)  # no stubs: it never calls the server


# ---- retry budget and unary calls -------------------------------------------------------------
def test_attempts_first_without_delay_then_backoff_until_the_budget_is_spent() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    attempts = _core.Attempts(policy)
    delays = [attempts.next() for _ in range(5)]
    assert delays[0] == 0.0 and delays[4] is None and attempts.made == 4
    first, second, third = delays[1:4]
    assert first is not None and 0.05 <= first <= 0.1
    assert second is not None and 0.1 <= second <= 0.2
    assert third is not None and 0.15 <= third <= 0.3
    stopped = _core.Attempts(policy)
    assert stopped.next() == 0.0
    stopped.stop()
    assert stopped.next() is None


def test_unary_call_retries_unavailable_within_the_budget() -> None:
    call = _core.UnaryCall(NO_WAIT)
    made = attempts_of(call.next_attempt, iter([lambda: call.failed(FakeRpcError(Code.UNAVAILABLE, "down"))] * 5))
    assert made == NO_WAIT.max_attempts
    error = call.error()
    assert isinstance(error, Unavailable) and error.details == "down"


@pytest.mark.parametrize(
    ("code", "expected"),
    [(Code.NOT_FOUND, LstmServeError), (Code.INVALID_ARGUMENT, InvalidRequest), (Code.CANCELLED, Cancelled)],
)
def test_unary_call_raises_other_codes_at_once(code: grpc.StatusCode, expected: type[LstmServeError]) -> None:
    call = _core.UnaryCall(NO_WAIT)
    made = attempts_of(call.next_attempt, iter([lambda: call.failed(FakeRpcError(code))] * 5))
    assert made == 1 and isinstance(call.error(), expected) and call.error().code == code


def test_unary_call_recovers_after_a_transient_failure() -> None:
    call = _core.UnaryCall(NO_WAIT)
    assert call.next_attempt() == 0.0
    call.failed(FakeRpcError(Code.UNAVAILABLE))
    assert call.next_attempt() is not None  # a second attempt; the shell returns its result


def test_a_create_that_already_exists_falls_back_to_reading_the_session() -> None:
    assert _core.already_created(LstmServeError(Code.ALREADY_EXISTS, "session exists"))
    assert not _core.already_created(LstmServeError(Code.RESOURCE_EXHAUSTED, "max_sessions"))


# ---- one step, exactly once -------------------------------------------------------------------
def test_a_step_carries_the_session_and_the_expected_step() -> None:
    session = session_at(7)
    exchange = session.begin_step(pb.StepRequest(tokens=[1, 2]), NO_WAIT)
    assert exchange.request.session_id == "s" * 32 and exchange.request.expected_step == 7
    assert exchange.next_attempt() == 0.0
    response = exchange.succeeded(pb.StepResponse(step=9))
    assert response.step == 9 and session.step == 9


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.CANCELLED, Code.INTERNAL])
def test_a_broken_stream_resends_the_same_request(code: grpc.StatusCode) -> None:
    session = session_at(3)
    exchange = session.begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    sent = []
    assert exchange.next_attempt() is not None
    sent.append(exchange.request.SerializeToString())
    exchange.failed(StreamFailure(code, "broken"))
    assert exchange.next_attempt() is not None
    sent.append(exchange.request.SerializeToString())
    exchange.succeeded(pb.StepResponse(step=4))
    assert sent[0] == sent[1]  # the same expected_step: the server applies it once
    assert session.step == 4


def test_retries_are_bounded_and_leave_the_counter_unknown() -> None:
    session = session_at(3)
    exchange = session.begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    made = attempts_of(exchange.next_attempt, iter([lambda: exchange.failed(StreamFailure(Code.CANCELLED, "x"))] * 9))
    assert made == NO_WAIT.max_attempts
    assert isinstance(exchange.error(), Cancelled)
    assert session.step is None and session.needs_resync() and not session.needs_resync(resync=False)


def test_a_refused_step_is_not_resent_and_keeps_the_counter() -> None:
    session = session_at(3)
    exchange = session.begin_step(pb.StepRequest(tokens=[10**6]), NO_WAIT)
    failure = StreamFailure(Code.INVALID_ARGUMENT, "token 1000000 is outside the vocabulary")
    made = attempts_of(exchange.next_attempt, iter([lambda: exchange.failed(failure)] * 9))
    assert made == 1 and isinstance(exchange.error(), InvalidRequest) and session.step == 3


def test_a_step_mismatch_forgets_the_counter() -> None:
    session = session_at(3)
    exchange = session.begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    exchange.next_attempt()
    exchange.failed(StreamFailure(Code.FAILED_PRECONDITION, "expected_step 3 but the session is at step 4"))
    assert exchange.next_attempt() is None
    assert isinstance(exchange.error(), StepMismatch) and session.step is None


def test_the_clients_own_timeout_is_not_resent() -> None:
    session = session_at(3, timeout=2.5)
    exchange = session.begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    exchange.next_attempt()
    exchange.failed(StreamFailure(Code.CANCELLED, "cancelled", timed_out=True))
    assert exchange.next_attempt() is None
    error = exchange.error()
    assert isinstance(error, DeadlineExceeded) and "2.5 s" in error.details and session.step is None


def test_an_interrupted_step_forgets_the_counter() -> None:
    session = session_at(3)
    exchange = session.begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    exchange.next_attempt()
    exchange.interrupted()
    assert session.step is None


def test_a_step_needs_a_known_counter() -> None:
    with pytest.raises(RuntimeError, match="unknown"):
        session_at(None).begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)
    with pytest.raises(RuntimeError, match="not open"):
        _core.SessionState(None, 0, None).begin_step(pb.StepRequest(tokens=[1]), NO_WAIT)


# ---- many sessions in one call (StepSessions) -------------------------------------------------
def answered(step: int) -> pb.SessionStepResult:
    return pb.SessionStepResult(response=pb.StepResponse(step=step))


def refused(code: grpc.StatusCode, message: str = "scripted") -> pb.SessionStepResult:
    return pb.SessionStepResult(error=pb.StepError(code=code.value[0], message=message))


def multi(
    *steps: int | None, retry: RetryPolicy = NO_WAIT, tokens: tuple[int, ...] = (1, 2)
) -> tuple[list[_core.SessionState], _core.MultiStepExchange]:
    """Sessions at `steps` (ids "a...", "b...", ...) and an exchange stepping each by `tokens` (two
    positions by default: sent as a SessionStep each; one position goes in columns)."""
    sessions = [_core.SessionState(chr(ord("a") + i) * 32, step, 2.5) for i, step in enumerate(steps)]
    return sessions, _core.MultiStepExchange(sessions, [pb.SessionStep(tokens=tokens) for _ in sessions], retry)


def sent(request: pb.StepSessionsRequest) -> list[tuple[str, int]]:
    return [(step.session_id[0], step.expected_step) for step in request.steps]


def test_step_sessions_stamps_every_entry_and_sets_each_counter_from_its_result() -> None:
    sessions, exchange = multi(3, 0)
    assert exchange.next_attempt() == 0.0
    assert sent(exchange.request()) == [("a", 3), ("b", 0)]
    exchange.answered(pb.StepSessionsResponse(results=[answered(5), answered(1)]))
    assert exchange.next_attempt() is None  # every entry is answered: nothing is resent
    assert [s.step for s in sessions] == [5, 1]
    assert [out.step for out in exchange.outcomes("none")] == [5, 1]  # type: ignore[union-attr]


def columns_answer(steps: list[int], logits: np.ndarray, *errors: pb.StepError) -> pb.StepSessionsResponse:
    result = pb.SessionColumnsResult(steps=steps, batch_sizes=[len(steps)] * len(steps), errors=errors)
    result.logits.shape.extend(logits.shape)
    result.logits.data = logits.astype("<f4").tobytes()
    return pb.StepSessionsResponse(columns=result)


def test_single_position_entries_go_in_columns_and_are_answered_per_row() -> None:
    sessions, exchange = multi(3, 0, 5, tokens=(4,))
    exchange.next_attempt()
    request = exchange.request()
    assert not request.steps
    columns = request.columns
    assert [s[0] for s in columns.session_ids] == ["a", "b", "c"]
    assert (list(columns.tokens), list(columns.expected_steps)) == ([4, 4, 4], [3, 0, 5])
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    mismatch = pb.StepError(index=1, code=Code.FAILED_PRECONDITION.value[0], message="session_ids[1]: expected_step 0")
    moving = pb.StepError(index=2, code=Code.UNAVAILABLE.value[0], message="session_ids[2]: moving")
    exchange.answered(columns_answer([4, 0, 0], logits, mismatch, moving))
    assert [s.step for s in sessions] == [4, None, 5]  # a mismatch is read back; the moving row is resent
    assert exchange.next_attempt() is not None
    resent = exchange.request().columns
    assert ([s[0] for s in resent.session_ids], list(resent.expected_steps)) == (["c"], [5])
    exchange.answered(columns_answer([6], logits[2:]))
    assert exchange.next_attempt() is None
    outcomes = exchange.outcomes("logits")
    assert isinstance(outcomes[1], StepMismatch)
    for row in (0, 2):
        np.testing.assert_array_equal(outcomes[row].logits, logits[row : row + 1])  # type: ignore[union-attr]
    assert [outcomes[0].step, outcomes[2].step] == [4, 6]  # type: ignore[union-attr]
    assert sessions[2].step == 6


def test_a_server_that_does_not_know_columns_gets_the_same_entries_as_steps() -> None:
    """A server older than SessionColumns ignores the field and refuses the call as empty, applying nothing:
    the entries go again as steps, at once and without using up an attempt, and the exchange stays on steps."""
    sessions, exchange = multi(3, 7, tokens=(1,), retry=RetryPolicy(max_attempts=1))
    assert exchange.next_attempt() == 0.0
    assert exchange.request().HasField("columns")
    exchange.failed(FakeRpcError(Code.INVALID_ARGUMENT, "StepSessions request has no steps"))
    assert [s.step for s in sessions] == [3, 7]
    assert exchange.next_attempt() == 0.0
    assert sent(exchange.request()) == [("a", 3), ("b", 7)]
    exchange.answered(pb.StepSessionsResponse(results=[answered(4), refused(Code.UNAVAILABLE, "moving")]))
    assert exchange.next_attempt() is None  # the one attempt was the steps one: the moving entry is not resent
    assert [s.step for s in sessions] == [4, 7]


def test_other_refusals_of_a_columns_call_are_not_taken_for_an_old_server() -> None:
    sessions, exchange = multi(3, tokens=(1,))
    exchange.next_attempt()
    exchange.request()
    exchange.failed(FakeRpcError(Code.INVALID_ARGUMENT, "columns carry 2000 sessions, more than ..."))
    assert exchange.next_attempt() is None
    (outcome,) = exchange.outcomes("logits")
    assert isinstance(outcome, InvalidRequest) and sessions[0].step == 3


@pytest.mark.parametrize(
    "malformed",
    [
        lambda result: result.logits.ClearField("data"),  # no logits for the rows
        lambda result: result.errors.add(index=5, code=Code.NOT_FOUND.value[0]),  # a refusal of no row sent
    ],
)
def test_a_malformed_columns_answer_fails_the_call_in_doubt(malformed: Callable[[pb.SessionColumnsResult], object]) -> None:
    sessions, exchange = multi(3, 7, tokens=(1,))
    exchange.next_attempt()
    exchange.request()
    response = columns_answer([4, 8], np.zeros((2, 3), np.float32))
    malformed(response.columns)
    exchange.answered(response)
    assert exchange.next_attempt() is None
    assert all(o.code == Code.INTERNAL for o in exchange.outcomes("logits"))  # type: ignore[union-attr]
    assert [s.step for s in sessions] == [None, None]  # the server may have applied them: read back next time


def test_entries_that_do_not_fit_columns_go_as_steps() -> None:
    seeded = {"output": pb.OUTPUT_SAMPLE, "sampling": pb.Sampling(temperature=1.0, seed=3)}
    for first, second in (
        ({"tokens": [1]}, {"tokens": [1, 2]}),  # an entry of two positions
        ({"tokens": [1], **seeded}, {"tokens": [1], **seeded}),  # a seed is per session
        ({"tokens": [1]}, {"tokens": [1], "output": pb.OUTPUT_TOPK}),  # two output kinds
        ({"features": pb.Tensor(shape=[1, 3], data=bytes(12))}, {"features": pb.Tensor(shape=[1, 2], data=bytes(8))}),
        ({"features": pb.Tensor(shape=[1, 3], data=bytes(12))}, {"tokens": [1]}),  # the server refuses the tokens
    ):
        states = [_core.SessionState(name * 32, 0, 2.5) for name in "ab"]
        requests = [pb.SessionStep(**first), pb.SessionStep(**second)]
        exchange = _core.MultiStepExchange(states, requests, NO_WAIT)
        exchange.next_attempt()
        request = exchange.request()
        assert len(request.steps) == 2 and not request.HasField("columns")


def test_a_columns_answer_with_the_wrong_row_count_fails_the_call_in_doubt() -> None:
    sessions, exchange = multi(3, 7, tokens=(1,))
    exchange.next_attempt()
    exchange.request()
    exchange.answered(columns_answer([4], np.zeros((1, 2), np.float32)))
    assert exchange.next_attempt() is None
    assert all(o.code == Code.INTERNAL for o in exchange.outcomes("logits"))  # type: ignore[union-attr]
    assert [s.step for s in sessions] == [None, None]


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.CANCELLED, Code.INTERNAL])
def test_step_sessions_resends_the_same_request_after_a_transient_failure(code: grpc.StatusCode) -> None:
    sessions, exchange = multi(3, 7)
    requests = []
    for _ in range(2):
        assert exchange.next_attempt() is not None
        requests.append(exchange.request().SerializeToString())
        exchange.failed(FakeRpcError(code))
        assert [s.step for s in sessions] == [3, 7]  # counters untouched until an answer
    assert exchange.next_attempt() is not None
    requests.append(exchange.request().SerializeToString())
    exchange.answered(pb.StepSessionsResponse(results=[answered(4), answered(8)]))
    assert requests[0] == requests[1] == requests[2]  # the same expected_steps: the server applies each once
    assert exchange.next_attempt() is None and [s.step for s in sessions] == [4, 8]


def test_step_sessions_refusals_are_values_of_the_clients_exception_types() -> None:
    sessions, exchange = multi(1, 2, 3, 4)
    exchange.next_attempt()
    exchange.request()
    results = [
        answered(2),
        refused(Code.NOT_FOUND, "steps[1]: session 'b...' not found"),
        refused(Code.INVALID_ARGUMENT, "steps[2]: token id 99 at position 0 is outside the vocabulary"),
        refused(Code.FAILED_PRECONDITION, "steps[3]: expected_step 4 but the session is at step 6"),
    ]
    exchange.answered(pb.StepSessionsResponse(results=results))
    assert exchange.next_attempt() is None  # a refusal is final: not resent
    outcomes = exchange.outcomes("none")
    assert [type(o).__name__ for o in outcomes] == ["StepOutput", "SessionNotFound", "InvalidRequest", "StepMismatch"]
    assert isinstance(outcomes[2], InvalidRequest) and "token id 99" in outcomes[2].details
    # a refused entry leaves its counter, except a mismatch: that one is read back before the next call
    assert [s.step for s in sessions] == [2, 2, 3, None]


def test_an_entry_refused_as_unavailable_is_resent_alone_with_its_expected_step() -> None:
    sessions, exchange = multi(3, 7)
    exchange.next_attempt()
    exchange.request()
    exchange.answered(pb.StepSessionsResponse(results=[answered(4), refused(Code.UNAVAILABLE, "moving")]))
    assert sessions[0].step == 4 and sessions[1].step == 7
    assert exchange.next_attempt() is not None
    assert sent(exchange.request()) == [("b", 7)]
    exchange.answered(pb.StepSessionsResponse(results=[answered(8)]))
    assert exchange.next_attempt() is None
    assert [o.step for o in exchange.outcomes("none")] == [4, 8]  # type: ignore[union-attr]
    assert sessions[1].step == 8


def test_step_sessions_retries_are_bounded_and_forget_the_counters_of_unanswered_entries() -> None:
    sessions, exchange = multi(3, 7)
    made = 0
    while exchange.next_attempt() is not None:
        made += 1
        exchange.request()
        exchange.failed(FakeRpcError(Code.UNAVAILABLE, "down"))
    assert made == NO_WAIT.max_attempts
    outcomes = exchange.outcomes("logits")
    assert all(isinstance(o, Unavailable) and o.details == "down" for o in outcomes) and len(outcomes) == 2
    assert outcomes[0] is not outcomes[1]  # each entry its own exception instance
    assert [s.step for s in sessions] == [None, None]  # may have been applied: read back before the next call


@pytest.mark.parametrize(
    ("code", "expected", "steps"),
    [
        (Code.INVALID_ARGUMENT, InvalidRequest, [3, 7]),  # refused whole, nothing applied: counters kept
        (Code.DEADLINE_EXCEEDED, DeadlineExceeded, [None, None]),  # the client's own timeout: maybe applied
    ],
)
def test_a_call_that_fails_for_good_is_not_resent(
    code: grpc.StatusCode, expected: type[LstmServeError], steps: list[int | None]
) -> None:
    sessions, exchange = multi(3, 7)
    made = 0
    while exchange.next_attempt() is not None:
        made += 1
        exchange.request()
        exchange.failed(FakeRpcError(code))
    assert made == 1
    assert all(isinstance(o, expected) for o in exchange.outcomes("logits"))
    assert [s.step for s in sessions] == steps


def test_a_refusal_after_an_attempt_that_may_have_applied_the_entry_forgets_its_counter() -> None:
    sessions, exchange = multi(3)
    exchange.next_attempt()
    exchange.request()
    exchange.failed(FakeRpcError(Code.UNAVAILABLE))
    exchange.next_attempt()
    exchange.request()
    exchange.answered(pb.StepSessionsResponse(results=[refused(Code.NOT_FOUND, "expired")]))
    assert exchange.next_attempt() is None
    assert type(exchange.outcomes("logits")[0]).__name__ == "SessionNotFound" and sessions[0].step is None


def test_a_response_with_the_wrong_number_of_results_ends_the_call() -> None:
    sessions, exchange = multi(3, 7)
    exchange.next_attempt()
    exchange.request()
    exchange.answered(pb.StepSessionsResponse(results=[answered(4)]))
    assert exchange.next_attempt() is None
    outcomes = exchange.outcomes("logits")
    assert all(o.code == Code.INTERNAL and "1 results for 2 entries" in o.details for o in outcomes)  # type: ignore[union-attr]
    assert [s.step for s in sessions] == [None, None]


def test_unknown_counters_are_read_back_first_and_a_failed_read_is_that_entrys_outcome() -> None:
    sessions, exchange = multi(None, 2, None)
    assert exchange.needs_resync() == [sessions[0], sessions[2]]
    sessions[0].step = 5  # what the shell read back
    exchange.resync_failed(sessions[2], LstmServeError(Code.NOT_FOUND, "gone"))
    assert exchange.next_attempt() is not None
    assert sent(exchange.request()) == [("a", 5), ("b", 2)]
    exchange.answered(pb.StepSessionsResponse(results=[answered(6), answered(3)]))
    outcomes = exchange.outcomes("none")
    assert [getattr(o, "step", None) for o in outcomes[:2]] == [6, 3]
    assert isinstance(outcomes[2], LstmServeError) and outcomes[2].details == "gone"


def test_an_interrupted_call_forgets_the_counters_of_the_entries_sent() -> None:
    sessions, exchange = multi(3, 7)
    exchange.next_attempt()
    exchange.request()
    exchange.interrupted()
    assert [s.step for s in sessions] == [None, None]


def test_step_sessions_refuses_closed_generating_and_repeated_sessions_before_sending() -> None:
    closed = session_at(3)
    closed.begin_close()
    with pytest.raises(RuntimeError, match="is closed"):
        _core.MultiStepExchange([closed], [pb.SessionStep()], NO_WAIT)
    generating, _ = started_generation(5)
    with pytest.raises(RuntimeError, match="generation in progress"):
        _core.MultiStepExchange([generating], [pb.SessionStep()], NO_WAIT)
    first, again = session_at(3), session_at(3)  # two handles of one server session
    with pytest.raises(ValueError, match="given twice"):
        _core.MultiStepExchange([first, again], [pb.SessionStep(), pb.SessionStep()], NO_WAIT)
    sessions, exchange = multi()
    assert exchange.next_attempt() is None and exchange.outcomes("logits") == []


# ---- session lifecycle ------------------------------------------------------------------------
def test_open_close_and_close_on_exit() -> None:
    session = _core.SessionState(None, None, None)
    session.opened(SessionInfo(id="a" * 32, step=4, idle_s=0.0, expires_in_s=60.0))
    assert session.id == "a" * 32 and session.step == 4
    session.check_open()
    assert session.begin_close() is True  # close it on the server
    assert session.begin_close() is False  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        session.check_open()
    never_opened = _core.SessionState(None, None, None)
    assert never_opened.begin_close() is False and never_opened.closed
    assert _core.close_on_exit(None, None) is True and _core.close_on_exit("id", None) is False
    assert _core.close_on_exit("id", True) is True and _core.close_on_exit(None, False) is False


def test_token_ids() -> None:
    info = ModelInfo(
        kind="tokens", vocabulary=Vocabulary(("a", "b", "ab")), input_size=0, hidden_size=4, num_layers=1,
        num_directions=1, proj_size=0, output_size=3, steppable=True, provider="cpu", fingerprint="",
        head="", max_tokens_per_request=0, max_generate_tokens=0, session_ttl_s=0.0, max_sessions=0,
    )  # fmt: skip
    assert _core.token_ids("abba", info) == [2, 1, 0]
    assert _core.token_ids([3, 4], None) == [3, 4] and _core.token_ids(7, None) == [7]
    with pytest.raises(ValueError, match="empty"):
        _core.token_ids("", info)
    with pytest.raises(ValueError, match="exactly one"):
        _core.require_one_input(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        _core.require_one_input([1], [[0.0]])


# ---- generations ------------------------------------------------------------------------------
def started_generation(step: int = 5) -> tuple[_core.SessionState, _core.GenerationState]:
    session = session_at(step)
    generation = _core.GenerationState(session, pb.StepRequest(tokens=[1], generate=pb.Generate(max_tokens=3)))
    request = session.begin_generation(generation)
    assert request.expected_step == step and request.session_id == session.id
    return session, generation


def test_a_generation_hands_out_coalesced_tokens_in_order_and_sets_the_counter_at_its_end() -> None:
    session, generation = started_generation(5)
    assert session.step is None and session.generation is generation and generation.started
    first = generation.received(pb.StepResponse(tokens=[7, 8], texts=["x", "y"], step=7))
    assert first == GeneratedToken(token=7, text="x")
    assert generation.buffered() == GeneratedToken(token=8, text="y") and generation.buffered() is None
    last = generation.received(pb.StepResponse(tokens=[9], texts=["z"], step=9, finished=True, finish_reason="length"))
    assert last == GeneratedToken(token=9, text="z") and generation.done
    assert session.step == 9 and session.generation is None
    completion = generation.completion()
    assert completion.text == "xyz" and completion.tokens == (7, 8, 9) and completion.finish_reason == "length"
    assert completion.step == 9


@pytest.mark.parametrize("while_sending", [True, False])
def test_a_broken_generation_is_not_resent_and_ends(while_sending: bool) -> None:
    """Sending or reading, a failure ends the generation the same way (the drift the core removed)."""
    session, generation = started_generation(5)
    if not while_sending:
        generation.received(pb.StepResponse(token=7, text="x", step=6))
    error = generation.broken(StreamFailure(Code.UNAVAILABLE, "connection reset"))
    assert isinstance(error, Unavailable) and error.details == "connection reset"
    assert generation.done and session.generation is None
    assert session.step is None and session.needs_resync()  # read back before the next call


def test_an_interrupted_generation_reraises_the_interruption() -> None:
    session, generation = started_generation(5)
    interruption = KeyboardInterrupt()
    assert generation.broken(interruption) is interruption
    assert generation.done and session.generation is None and session.step is None


def test_another_call_drains_a_started_generation_and_forgets_an_unstarted_one() -> None:
    session, generation = started_generation(5)
    assert generation.supersede() is True  # the shell reads the rest before the next call
    generation.received(pb.StepResponse(step=8, finished=True, finish_reason="length"))
    assert session.step == 8
    with pytest.raises(RuntimeError, match="ended early"):
        generation.buffered()
    unstarted = _core.GenerationState(session, pb.StepRequest(tokens=[1]))
    assert unstarted.supersede() is False and unstarted.done and unstarted.buffered() is None


def test_detach_and_close_abandon_a_live_generation() -> None:
    session, generation = started_generation(5)
    session.detach()
    assert generation.done and generation.superseded and session.generation is None and session.step is None
    session.step = 9
    session.detach()  # no live generation: the counter stays known
    assert session.step == 9
    session, generation = started_generation(5)
    assert session.begin_close() and generation.done and session.generation is None


# ---- the sync and asyncio clients behave identically ------------------------------------------
class ScriptedSends:
    """Fails the next sends of a step stream with the scripted codes (before the request leaves);
    counts the sends since `sends` was last zeroed."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.sends = 0

    def fail(self, *codes: grpc.StatusCode) -> None:
        self.codes.extend(codes)

    def next_failure(self) -> StreamFailure | None:
        self.sends += 1
        return StreamFailure(self.codes.pop(0), "scripted") if self.codes else None


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ScriptedSends:
    script = ScriptedSends()
    sync_send, async_send = _sync._Stream.send, _async._AsyncStream.send

    def send(self: _sync._Stream, request: pb.StepRequest) -> None:
        if (failure := script.next_failure()) is not None:
            raise failure
        sync_send(self, request)

    async def asend(self: _async._AsyncStream, request: pb.StepRequest) -> None:
        if (failure := script.next_failure()) is not None:
            raise failure
        await async_send(self, request)

    monkeypatch.setattr(_sync._Stream, "send", send)
    monkeypatch.setattr(_async._AsyncStream, "send", asend)
    return script


Event = tuple[str, str, "int | None", int]  # what was done, what came of it, the position after, sends made


def outcome(call: Callable[[], Any]) -> str:
    """What a call did, comparable across the two clients (an exception by its class)."""
    try:
        result = call()
    except (StopIteration, StopAsyncIteration):
        return "end"
    except Exception as error:  # a StreamFailure here would be a leak of an internal exception
        return type(error).__name__
    return f"token {result.token}" if isinstance(result, GeneratedToken) else f"step {result.step}"


async def async_outcome(call: Callable[[], Awaitable[Any]]) -> str:
    try:
        result = await call()
    except StopAsyncIteration:
        return "end"
    except Exception as error:
        return type(error).__name__
    return f"token {result.token}" if isinstance(result, GeneratedToken) else f"step {result.step}"


def sync_transcript(server: ServerThread, script: ScriptedSends) -> list[Event]:
    events: list[Event] = []
    with Client(server.address, retry=FAST) as client, client.session() as session:

        def record(name: str, call: Callable[[], Any]) -> None:
            script.sends = 0
            result = outcome(call)
            events.append((name, result, session.position, script.sends))

        record("step ab", lambda: session.step("ab"))
        script.fail(Code.UNAVAILABLE)
        broken = session.generate("c", max_tokens=3, temperature=0)
        record("generate, its send fails", lambda: next(broken))
        record("the broken generation", lambda: next(broken))
        record("step d", lambda: session.step("d"))
        script.fail(Code.CANCELLED, Code.INTERNAL)
        record("step e, resent twice", lambda: session.step("e"))
        script.fail(*[Code.UNAVAILABLE] * FAST.max_attempts)
        record("step f, every send fails", lambda: session.step("f"))
        script.fail(Code.INVALID_ARGUMENT)
        record("step g, refused", lambda: session.step("g"))
        record("step h", lambda: session.step("h"))
        generation = session.generate("i", max_tokens=3, temperature=0)
        tokens = [outcome(lambda: next(generation)) for _ in range(4)]  # positions in between depend on coalescing
        events.append((", ".join(tokens), generation.finish_reason or "", session.position, 0))
    return events


def async_transcript(server: ServerThread, script: ScriptedSends) -> list[Event]:
    events: list[Event] = []

    async def main() -> None:
        async with AsyncClient(server.address, retry=FAST) as client, client.session() as session:

            async def record(name: str, call: Callable[[], Awaitable[Any]]) -> None:
                script.sends = 0
                result = await async_outcome(call)
                events.append((name, result, session.position, script.sends))

            await record("step ab", lambda: session.step("ab"))
            script.fail(Code.UNAVAILABLE)
            broken = await session.generate("c", max_tokens=3, temperature=0)
            await record("generate, its send fails", broken.__anext__)
            await record("the broken generation", broken.__anext__)
            await record("step d", lambda: session.step("d"))
            script.fail(Code.CANCELLED, Code.INTERNAL)
            await record("step e, resent twice", lambda: session.step("e"))
            script.fail(*[Code.UNAVAILABLE] * FAST.max_attempts)
            await record("step f, every send fails", lambda: session.step("f"))
            script.fail(Code.INVALID_ARGUMENT)
            await record("step g, refused", lambda: session.step("g"))
            await record("step h", lambda: session.step("h"))
            generation = await session.generate("i", max_tokens=3, temperature=0)
            tokens = [await async_outcome(generation.__anext__) for _ in range(4)]
            events.append((", ".join(tokens), generation.finish_reason or "", session.position, 0))

    asyncio.run(main())
    return events


def test_sync_and_async_clients_behave_identically_on_scripted_failures(
    server: ServerThread, script: ScriptedSends
) -> None:
    sync_events = sync_transcript(server, script)
    assert script.codes == []
    async_events = async_transcript(server, script)
    assert sync_events == async_events
    outcomes = {name: (result, position, sends) for name, result, position, sends in sync_events}
    # a generation whose send fails raises the public error, is over, and is not resent
    assert outcomes["generate, its send fails"] == ("Unavailable", None, 1)
    assert outcomes["the broken generation"] == ("end", None, 0)
    assert outcomes["step d"] == ("step 3", 3, 1)  # the counter was read back: nothing was generated
    assert outcomes["step e, resent twice"] == ("step 4", 4, 3)
    assert outcomes["step f, every send fails"] == ("Unavailable", None, FAST.max_attempts)
    assert outcomes["step g, refused"] == ("InvalidRequest", 4, 1)
    assert outcomes["step h"] == ("step 5", 5, 1)
    generated, finish_reason, position, _ = sync_events[-1]
    assert generated.count("token") == 3 and generated.endswith("end")
    assert finish_reason == "length" and position == 5 + 1 + 3
