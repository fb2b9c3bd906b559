"""`Client.step_sessions` and `AsyncClient.step_sessions` against a real server: one script run by both clients.

The script steps three sessions together, with a session the server no longer knows, a bad token, a
session stepped behind the client's back, and a call whose answer is lost (the server applied it; the
client resends it and gets the server's copy). Its first call goes as a SessionStep per session, the
others (one token per session) in columns. Both clients must give the same outcomes, and every
logit must equal the same session stepped alone through `Session.step`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
from conftest import ServerThread

from lstmserve.client import (
    AsyncClient,
    Client,
    LstmServeError,
    RetryPolicy,
    StepOutput,
)
from lstmserve.v1 import lstmserve_pb2 as pb

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
Outcome: TypeAlias = StepOutput | LstmServeError
Event = tuple[str, list[str], list["int | None"], int]  # the call, each entry's outcome, the positions after, sends
Logits = dict[tuple[str, str], np.ndarray]  # (call, session label) -> the entry's logits


class AnswerLost(grpc.RpcError):
    """UNAVAILABLE after the server applied the call: its answer never reached the client."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the connection dropped before the answer arrived"


class Recorder:
    """Counts StepSessions sends, notes the form of the last (columns or steps), and loses the answer of
    the next `lose` of them."""

    def __init__(self) -> None:
        self.sends = 0
        self.lose = 0
        self.form = ""

    def sent(self, request: pb.StepSessionsRequest) -> None:
        self.sends += 1
        self.form = "columns" if request.HasField("columns") else "steps"
        if self.lose:
            self.lose -= 1
            raise AnswerLost()


def describe(outcome: Outcome) -> str:
    return f"step {outcome.step}" if isinstance(outcome, StepOutput) else type(outcome).__name__


class Transcript:
    """What a script's calls returned, comparable across the two clients."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.events: list[Event] = []
        self.logits: Logits = {}
        self.forms: dict[str, str] = {}  # the call -> the form its request went in

    def record(self, call: str, labels: list[str], outcomes: list[Outcome], positions: list[int | None]) -> None:
        assert len(outcomes) == len(labels)
        for label, outcome in zip(labels, outcomes, strict=True):
            if isinstance(outcome, StepOutput):
                assert outcome.logits is not None
                self.logits[call, label] = outcome.logits
        self.events.append((call, [describe(o) for o in outcomes], positions, self.recorder.sends))
        self.forms[call] = self.recorder.form
        self.recorder.sends = 0


def script_inputs(vocab: int) -> list[tuple[str, dict[str, Any]]]:
    """The calls of the script: each a name and each session's input (labels a, b, c and ghost)."""
    return [
        ("first", {"a": "ab", "b": [1, 2, 3], "c": [4]}),
        ("with bad entries", {"a": [5], "ghost": [6], "b": [vocab + 7], "c": [7]}),
        # here another handle steps c by [8]: the client's counter for c is now wrong
        ("after c moved on", {"a": [9], "c": [1]}),
        ("c read back", {"c": [1], "b": [2]}),
        ("answer lost once", {"a": [3], "b": [4], "c": [5]}),
    ]


def sync_script(server: ServerThread) -> Transcript:
    recorder = Recorder()
    transcript = Transcript(recorder)
    with Client(server.address, retry=FAST) as client:
        real = client._stub.StepSessions

        def step_sessions(request: pb.StepSessionsRequest, **kwargs: Any) -> pb.StepSessionsResponse:
            response = real(request, **kwargs)
            recorder.sent(request)
            return response

        client._stub.StepSessions = step_sessions
        vocab = client.model_info().output_size
        with client.session() as a, client.session() as b, client.session() as c, client.session() as ghost:
            client.session(resume=ghost.id).close()  # the server no longer knows it; this handle does not know that
            sessions = {"a": a, "b": b, "c": c, "ghost": ghost}
            for call, inputs in script_inputs(vocab):
                if call == "after c moved on":
                    other = client.session(resume=c.id)
                    other.step([8])
                    other.detach()
                if call == "answer lost once":
                    recorder.lose = 1
                outcomes = client.step_sessions({sessions[label]: tokens for label, tokens in inputs.items()})
                transcript.record(call, list(inputs), outcomes, [sessions[label].position for label in inputs])
    return transcript


def async_script(server: ServerThread) -> Transcript:
    recorder = Recorder()
    transcript = Transcript(recorder)

    async def main() -> None:
        async with AsyncClient(server.address, retry=FAST) as client:
            real = client._stub.StepSessions

            async def step_sessions(request: pb.StepSessionsRequest, **kwargs: Any) -> pb.StepSessionsResponse:
                response = await real(request, **kwargs)
                recorder.sent(request)
                return response

            client._stub.StepSessions = step_sessions
            vocab = (await client.model_info()).output_size
            async with client.session() as a, client.session() as b, client.session() as c:
                ghost = await client.session()
                await (await client.session(resume=ghost.id)).close()
                sessions = {"a": a, "b": b, "c": c, "ghost": ghost}
                for call, inputs in script_inputs(vocab):
                    if call == "after c moved on":
                        other = await client.session(resume=c.id)
                        await other.step([8])
                        await other.detach()
                    if call == "answer lost once":
                        recorder.lose = 1
                    outcomes = await client.step_sessions({sessions[label]: tokens for label, tokens in inputs.items()})
                    transcript.record(call, list(inputs), outcomes, [sessions[label].position for label in inputs])
                await ghost.close()

    asyncio.run(main())
    return transcript


def reference_logits(server: ServerThread) -> Logits:
    """Each session's applied inputs, stepped alone through `Session.step` on fresh sessions."""
    logits: Logits = {}
    with Client(server.address) as client:
        vocab = client.model_info().output_size
        with client.session() as a, client.session() as b, client.session() as c:
            sessions = {"a": a, "b": b, "c": c}
            for call, inputs in script_inputs(vocab):
                if call == "after c moved on":
                    c.step([8])
                for label, tokens in inputs.items():
                    refused = label == "ghost" or (call, label) in {("with bad entries", "b"), ("after c moved on", "c")}
                    if not refused:
                        output = sessions[label].step(tokens)
                        assert output.logits is not None
                        logits[call, label] = output.logits
    return logits


@pytest.fixture(scope="module")
def transcripts(server: ServerThread) -> Iterator[tuple[Transcript, Transcript, Logits]]:
    yield sync_script(server), async_script(server), reference_logits(server)


def test_sync_and_async_clients_give_identical_outcomes(transcripts: tuple[Transcript, Transcript, Logits]) -> None:
    sync, asynchronous, _ = transcripts
    assert sync.events == asynchronous.events
    assert sync.forms == asynchronous.forms
    assert sync.logits.keys() == asynchronous.logits.keys()
    for key, logits in sync.logits.items():
        np.testing.assert_array_equal(asynchronous.logits[key], logits, err_msg=str(key))


def test_one_token_per_session_goes_in_columns(transcripts: tuple[Transcript, Transcript, Logits]) -> None:
    """The first call feeds longer inputs (a SessionStep each); the others one token each (SessionColumns),
    so the outcomes below hold for both forms of the request, resends and refusals included."""
    forms = transcripts[0].forms
    assert forms == {call: "columns" for call in forms} | {"first": "steps"}


def test_outcomes_and_counters(transcripts: tuple[Transcript, Transcript, Logits]) -> None:
    events = {call: (outcomes, positions, sends) for call, outcomes, positions, sends in transcripts[0].events}
    assert events["first"] == (["step 2", "step 3", "step 1"], [2, 3, 1], 1)
    # an unknown session and a bad token are values; the other entries are stepped as if they were not there
    assert events["with bad entries"] == (["step 3", "SessionNotFound", "InvalidRequest", "step 2"], [3, 0, 3, 2], 1)
    # c was stepped behind the client's back: a mismatch, and its counter is read back before its next call
    assert events["after c moved on"] == (["step 4", "StepMismatch"], [4, None], 1)
    assert events["c read back"] == (["step 4", "step 4"], [4, 4], 1)
    # the answer was lost after the server applied the call: resent once, answered from its copy, applied once
    assert events["answer lost once"] == (["step 5", "step 5", "step 5"], [5, 5, 5], 2)


def test_every_logit_equals_the_session_stepped_alone(transcripts: tuple[Transcript, Transcript, Logits]) -> None:
    sync, _, reference = transcripts
    assert sync.logits.keys() == reference.keys()
    for key, logits in reference.items():
        np.testing.assert_array_equal(sync.logits[key], logits, err_msg=str(key))


def test_client_side_refusals_send_nothing(server: ServerThread) -> None:
    with Client(server.address) as client, Client(server.address) as stranger:
        with client.session() as a, client.session() as b, stranger.session() as theirs:
            calls: list[pb.StepSessionsRequest] = []
            real = client._stub.StepSessions

            def counted(request: pb.StepSessionsRequest, **kwargs: Any) -> pb.StepSessionsResponse:
                calls.append(request)
                return real(request, **kwargs)

            client._stub.StepSessions = counted
            generation = a.generate("a", max_tokens=3, temperature=0)
            next(generation)
            refusals: list[tuple[type[Exception], str, Callable[[], object]]] = [
                (RuntimeError, "generation in progress", lambda: client.step_sessions({b: [1], a: [1]})),
                (ValueError, "not a Session of this client", lambda: client.step_sessions({b: [1], theirs: [1]})),
                (ValueError, "given twice", lambda: client.step_sessions({b: [1], client.session(resume=b.id): [1]})),
                (ValueError, "exactly one", lambda: client.step_sessions({b: [1]}, features={b: [0.0]})),
                (ValueError, "output must be", lambda: client.step_sessions({b: [1]}, output="bogus")),  # type: ignore[arg-type]
            ]
            for error, message, call in refusals:
                with pytest.raises(error, match=message):
                    call()
            list(generation)  # finished: a can be stepped with the others again
            b.close()
            with pytest.raises(RuntimeError, match="is closed"):
                client.step_sessions({a: [1], b: [1]})
            assert calls == [] and theirs.position == 0
            assert client.step_sessions({}) == []
            (out,) = client.step_sessions({a: [1]}, output="topk", k=3)
            assert isinstance(out, StepOutput) and out.topk_ids is not None and out.topk_ids.shape == (1, 3)


def test_async_client_side_refusals(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            async with client.session() as a, client.session() as b:
                generation = await a.generate("a", max_tokens=3, temperature=0)
                await generation.__anext__()
                with pytest.raises(RuntimeError, match="generation in progress"):
                    await client.step_sessions({b: [1], a: [1]})
                async for _ in generation:
                    pass
                unopened = client.session()  # opened by the call
                outcomes = await client.step_sessions({a: [2], b: [3], unopened: [4]}, output="none")
                assert [describe(o) for o in outcomes] == ["step 5", "step 1", "step 1"]
                await unopened.close()
                with pytest.raises(RuntimeError, match="is closed"):
                    await client.step_sessions({a: [1], unopened: [1]})

    asyncio.run(main())


def test_feature_model_sessions(feature_model: Any) -> None:
    from conftest import start_server

    handle = start_server(feature_model)
    try:
        with Client(handle.address) as client:
            width = client.model_info().input_size
            rows = [np.random.default_rng(i).normal(size=(i + 1, width)).astype(np.float32) for i in range(3)]
            many = [client.session() for _ in rows]
            alone = [client.session() for _ in rows]
            outcomes = client.step_sessions(features=dict(zip(many, rows, strict=True)))
            for outcome, session, features in zip(outcomes, alone, rows, strict=True):
                assert isinstance(outcome, StepOutput) and outcome.logits is not None
                expected = session.step(features=features).logits
                np.testing.assert_array_equal(outcome.logits, expected)
            (bad,) = client.step_sessions({many[0]: [1]})
            assert type(bad).__name__ == "InvalidRequest" and many[0].position == 1
            # One row each, of the model's width, goes in columns, and equals Session.step alone.
            forms: list[str] = []
            real = client._stub.StepSessions

            def recording(request: pb.StepSessionsRequest, **kwargs: Any) -> pb.StepSessionsResponse:
                forms.append("columns" if request.HasField("columns") else "steps")
                return real(request, **kwargs)

            client._stub.StepSessions = recording
            fresh, solo = [client.session() for _ in range(3)], [client.session() for _ in range(3)]
            one_row = [np.random.default_rng(10 + i).normal(size=(1, width)).astype(np.float32) for i in range(3)]
            outcomes = client.step_sessions(features=dict(zip(fresh, one_row, strict=True)))
            for outcome, session, features in zip(outcomes, solo, one_row, strict=True):
                assert isinstance(outcome, StepOutput) and outcome.logits is not None
                np.testing.assert_array_equal(outcome.logits, session.step(features=features).logits)
            # Rows of the wrong width go as steps (not glued into one column), each refused on its own.
            widths = (width, width - 1, width + 1)
            uneven = [np.random.default_rng(20 + i).normal(size=(1, w)).astype(np.float32) for i, w in enumerate(widths)]
            outcomes = client.step_sessions(features=dict(zip(fresh, uneven, strict=True)))
            assert isinstance(outcomes[0], StepOutput)
            assert [type(o).__name__ for o in outcomes[1:]] == ["InvalidRequest", "InvalidRequest"]
            assert [s.position for s in fresh] == [2, 1, 1]  # the refused rows changed nothing
            assert forms == ["columns", "steps"]
            for session in fresh + solo:
                session.close()
            for session in many + alone:
                session.close()
    finally:
        handle.stop()
