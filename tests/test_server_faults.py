"""Faults that must not lose, repeat or leak state: closes during generation, resends during compute,
a failing batch group, and a drain with work in progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import start_server
from helpers import SyncStream, logits_of, wait_until

from lstmserve.server.runner import PreparedCall

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


def test_closing_a_generating_session_stops_it_and_never_touches_the_next_owner_of_its_slot(token_model: Path) -> None:
    handle = start_server(token_model, max_generate_tokens=20_000)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            control = logits_of(SyncStream(channel).request(tokens=[1, 2, 3]))
            generating = SyncStream(channel)
            generating.send(tokens=[1], generate=pb.Generate(max_tokens=20_000, sampling=pb.Sampling(temperature=1)))
            first = generating.read()
            for _ in range(4):
                generating.read()
            stub.CloseSession(pb.SessionRef(session_id=first.session_id))
            fresh = SyncStream(channel)
            for _ in range(20):  # step the new session while the old generation would still be running
                newcomer = fresh.request(tokens=[1, 2, 3])
                np.testing.assert_array_equal(logits_of(newcomer), control)
                stub.ResetSession(pb.SessionRef(session_id=newcomer.session_id))
            with pytest.raises(grpc.RpcError) as error:
                while not generating.read().finished:
                    pass
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        handle.stop()


def test_resend_while_the_original_is_still_computing_is_answered_once(token_model: Path) -> None:
    handle = start_server(token_model, max_tokens_per_request=300_000, max_message_bytes=64 * 1024 * 1024)
    tokens = np.random.default_rng(0).integers(0, 20, size=200_000).tolist()
    try:
        with handle.channel() as channel:
            opened = SyncStream(channel).request()  # open only: step 0
            first = SyncStream(channel)
            first.send(session_id=opened.session_id, tokens=tokens, expected_step=0, output=pb.OUTPUT_NONE)
            time.sleep(0.02)
            first.cancel()  # the stream breaks while the step is queued or computing
            again = SyncStream(channel).request(
                session_id=opened.session_id, tokens=tokens, expected_step=0, output=pb.OUTPUT_NONE
            )
            assert again.step == len(tokens)
            info = pb_grpc.LstmServeStub(channel).GetSession(pb.SessionRef(session_id=opened.session_id))
            assert info.step == len(tokens)  # applied exactly once
    finally:
        handle.stop()


def test_a_failing_group_fails_only_its_own_requests_and_changes_no_state(token_model: Path) -> None:
    handle = start_server(token_model)
    runner = handle.server.runner
    original = runner.execute

    def failing_execute(call: PreparedCall) -> None:
        if call.positions == 3:
            raise RuntimeError("injected failure for 3-position rows")
        original(call)

    runner.execute = failing_execute
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            victim = SyncStream(channel)
            opened = victim.request(tokens=[4])
            bystander = SyncStream(channel)
            bystander.request(tokens=[4])
            errors: list[grpc.RpcError] = []

            def fail() -> None:
                try:
                    victim.request(tokens=[1, 2, 3])
                except grpc.RpcError as error:
                    errors.append(error)

            thread = threading.Thread(target=fail)
            thread.start()
            bystander_step = bystander.request(tokens=[5])
            thread.join(10)
            assert errors and errors[0].code() == grpc.StatusCode.INTERNAL
            assert "injected failure" in (errors[0].details() or "")
            assert bystander_step.step == 2
            assert stub.GetSession(pb.SessionRef(session_id=opened.session_id)).step == 1
            resumed = SyncStream(channel).request(session_id=opened.session_id, tokens=[5])
            control = SyncStream(channel).request(tokens=[4, 5])
            np.testing.assert_array_equal(logits_of(resumed)[0], logits_of(control)[1])
    finally:
        runner.execute = original
        handle.stop()


def test_drain_lets_a_generation_in_progress_finish_within_the_grace(token_model: Path) -> None:
    handle = start_server(token_model, grace_s=20.0)
    try:
        with handle.channel() as channel:
            stream = SyncStream(channel)
            stream.send(tokens=[1], generate=pb.Generate(max_tokens=3000, sampling=pb.Sampling(temperature=1)))
            stream.read()
            drained = threading.Event()

            def drain() -> None:
                handle.call(handle.server.drain(), timeout=60)
                drained.set()

            threading.Thread(target=drain).start()
            count = 1
            while True:
                response = stream.read()
                if response.finished:
                    break
                count += 1
            assert response.finish_reason == "length" and count == 3000
            assert drained.wait(30)
    finally:
        handle.loop.call_soon_threadsafe(handle.loop.stop)


def test_a_step_for_a_closed_session_object_is_refused(token_model: Path) -> None:
    """What a generation holding its Session object meets after a close: NOT_FOUND, no compute."""
    handle = start_server(token_model)
    scheduler = handle.server.scheduler
    assert scheduler is not None
    try:

        async def scenario() -> str:
            stale = scheduler.create_session()
            await scheduler.step(stale, np.array([1], np.int64))  # makes it the solo session (fast path)
            await scheduler.close_session(stale.id)
            newcomer = scheduler.create_session()
            assert newcomer.slot == stale.slot  # the freed slot is handed out again
            try:
                await scheduler.step(stale, np.array([2], np.int64))
            except Exception as error:  # noqa: BLE001 - the type is what the test checks
                return type(error).__name__
            return "stepped"

        assert handle.call(scenario()) == "SessionNotFound"
    finally:
        handle.stop()


def test_one_session_cannot_queue_more_than_its_inflight_limit(token_model: Path) -> None:
    handle = start_server(token_model, max_inflight_per_session=2)
    scheduler = handle.server.scheduler
    assert scheduler is not None
    try:

        async def flood() -> list[object]:
            import asyncio

            session = scheduler.create_session()
            other = scheduler.create_session()
            steps = [scheduler.step(session, np.array([1], np.int64)) for _ in range(6)]
            steps.append(scheduler.step(other, np.array([1], np.int64)))
            results = await asyncio.gather(*steps, return_exceptions=True)
            return [type(r).__name__ for r in results] + [session.step, other.step]

        outcome = handle.call(flood())
        # All seven requests arrive before the batcher runs: two fit the session's limit.
        assert outcome[:7] == ["StepResult"] * 2 + ["Overloaded"] * 4 + ["StepResult"]
        assert outcome[7:] == [2, 1]  # refused requests changed nothing; the other session is not refused
    finally:
        handle.stop()


def test_a_step_whose_deadline_passed_while_queued_is_not_computed(token_model: Path) -> None:
    """The compute worker is held (a task of the test's own occupies its one thread), so a batch waits for it
    and the step behind it stays queued past its deadline: it is dropped, never computed. Nothing depends on
    how fast the machine is."""
    handle = start_server(token_model)
    scheduler = handle.server.scheduler
    service = handle.server._service
    assert scheduler is not None and service is not None
    release = threading.Event()
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            waiting = stub.CreateSession(pb.CreateSessionRequest()).session_id
            handle.call_soon(lambda: scheduler._executor.submit(release.wait))
            blocker = SyncStream(channel)
            blocker.send(tokens=[1] * 64, output=pb.OUTPUT_NONE)  # a long step: it waits for the worker
            wait_until(lambda: handle.call_soon(lambda: scheduler._computing) == 1, 60, "the blocker to wait")
            late = stub.Step(iter([pb.StepRequest(session_id=waiting, tokens=[1, 2, 3])]), timeout=0.2)
            with pytest.raises(grpc.RpcError) as error:
                list(late)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server gave the late step up too (its handler ended) before the worker is free again.
            wait_until(lambda: handle.call_soon(lambda: service.requests_in_progress) == 1, 60, "the late step to end")
            release.set()
            assert blocker.read().step == 64
            assert stub.GetSession(pb.SessionRef(session_id=waiting)).step == 0  # never computed
            assert SyncStream(channel).request(session_id=waiting, tokens=[4]).step == 1  # and the session goes on
    finally:
        release.set()
        handle.stop()


def test_a_full_queue_refuses_quickly_with_resource_exhausted(token_model: Path) -> None:
    handle = start_server(token_model, max_queue=3)
    scheduler = handle.server.scheduler
    assert scheduler is not None
    try:

        async def burst() -> list[str]:
            import asyncio

            sessions = [scheduler.create_session() for _ in range(5)]
            results = await asyncio.gather(
                *(scheduler.step(s, np.array([1], np.int64)) for s in sessions), return_exceptions=True
            )
            return [type(r).__name__ for r in results]

        names = handle.call(burst())
        # Refused at enqueue time, without waiting for the queue to drain.
        assert names == ["StepResult"] * 3 + ["Overloaded"] * 2
    finally:
        handle.stop()
