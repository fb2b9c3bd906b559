"""Session lifecycle over a real server: resume, reset, close, TTL expiry, ids."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, start_server
from helpers import SyncStream, logits_of, wait_until

from lstmserve.server.runner import PreparedCall

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    with server.channel() as channel:
        yield pb_grpc.LstmServeStub(channel)


def _fresh_logits(server: ServerThread, tokens: list[int]) -> np.ndarray:
    with server.channel() as channel:
        stream = SyncStream(channel)
        response = stream.request(tokens=tokens)
        stream.close()
    return logits_of(response)


def test_resume_on_a_new_stream_continues_exactly(server: ServerThread) -> None:
    tokens = [1, 5, 2, 7, 3, 3, 0, 4]
    whole = _fresh_logits(server, tokens)
    with server.channel() as channel:
        first = SyncStream(channel)
        opened = first.request(tokens=tokens[:3])
        first.close()
    with server.channel() as channel:  # a different connection: resume by id
        second = SyncStream(channel)
        resumed = second.request(session_id=opened.session_id, tokens=tokens[3:])
        second.close()
    assert resumed.session_id == opened.session_id
    assert resumed.step == len(tokens)
    np.testing.assert_allclose(np.concatenate([logits_of(opened), logits_of(resumed)]), whole, atol=1e-5)


def test_stream_opening_request_reports_session_without_stepping(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    with server.channel() as channel:
        stream = SyncStream(channel)
        opened = stream.request(request_id=9)
        stream.close()
    assert opened.request_id == 9 and opened.step == 0
    assert stub.GetSession(pb.SessionRef(session_id=opened.session_id)).step == 0


def test_reset_returns_to_initial_state(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    with server.channel() as channel:
        stream = SyncStream(channel)
        before = stream.request(tokens=[3, 1, 4])
        info = stub.ResetSession(pb.SessionRef(session_id=before.session_id))
        assert info.step == 0
        after = stream.request(tokens=[3, 1, 4])
        stream.close()
    assert after.step == 3
    np.testing.assert_array_equal(logits_of(after), logits_of(before))


def test_create_inspect_close_frees_the_slot(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    in_use = server.call_soon(lambda: server.server.store.in_use)
    created = stub.CreateSession(pb.CreateSessionRequest())
    assert re.fullmatch(r"[0-9a-f]{32}", created.session_id)
    assert server.call_soon(lambda: server.server.store.in_use) == in_use + 1
    info = stub.GetSession(pb.SessionRef(session_id=created.session_id))
    assert info.step == 0 and 0 < info.expires_in_s <= server.server.config.session_ttl_s
    stub.CloseSession(pb.SessionRef(session_id=created.session_id))
    assert server.call_soon(lambda: server.server.store.in_use) == in_use
    with pytest.raises(grpc.RpcError) as error:
        stub.GetSession(pb.SessionRef(session_id=created.session_id))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_session_ids_are_unique_128_bit(stub: pb_grpc.LstmServeStub) -> None:
    ids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(50)]
    assert len(set(ids)) == 50
    for session_id in ids:
        assert len(bytes.fromhex(session_id)) == 16
        stub.CloseSession(pb.SessionRef(session_id=session_id))


def test_idle_sessions_expire_after_ttl_and_not_before(token_model: Path) -> None:
    handle = start_server(token_model, session_ttl_s=60.0)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
            scheduler = handle.server.scheduler
            assert scheduler is not None
            assert handle.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + 30)) == 0
            assert stub.GetSession(pb.SessionRef(session_id=session_id)).step == 0
            assert handle.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + 61)) == 1
            with pytest.raises(grpc.RpcError) as error:
                stub.GetSession(pb.SessionRef(session_id=session_id))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert handle.server.store.in_use == 0
    finally:
        handle.stop()


def test_default_ttl_is_fifteen_minutes() -> None:
    from lstmserve.server.config import ServerConfig

    assert ServerConfig(model=Path("m.onnx")).session_ttl_s == 900.0


def test_client_disconnect_mid_stream_leaves_session_resumable(server: ServerThread) -> None:
    tokens = [2, 4, 6, 8, 1]
    whole = _fresh_logits(server, tokens)
    with server.channel() as channel:
        stream = SyncStream(channel)
        first = stream.request(tokens=tokens[:2])
        stream.cancel()  # the client goes away without closing
    with server.channel() as channel:
        stream = SyncStream(channel)
        rest = stream.request(session_id=first.session_id, tokens=tokens[2:])
        stream.close()
    np.testing.assert_allclose(logits_of(rest), whole[2:], atol=1e-5)


def test_resent_request_with_expected_step_is_not_applied_twice(server: ServerThread) -> None:
    with server.channel() as channel:
        stream = SyncStream(channel)
        first = stream.request(tokens=[1, 2], expected_step=0)
        again = stream.request(tokens=[1, 2], expected_step=0)  # as after a lost response
        assert again.step == first.step == 2
        np.testing.assert_array_equal(logits_of(again), logits_of(first))
        with pytest.raises(grpc.RpcError) as error:
            stream.request(tokens=[3], expected_step=5)
        stream.close()
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expected_step 5" in (error.value.details() or "")


def test_pipelined_requests_on_one_stream_keep_their_order(server: ServerThread) -> None:
    tokens = list(range(10))
    whole = _fresh_logits(server, tokens)
    with server.channel() as channel:
        stream = SyncStream(channel)
        for i, token in enumerate(tokens):
            stream.send(tokens=[token], request_id=i)
        responses = [stream.read() for _ in tokens]
        stream.close()
    assert [r.request_id for r in responses] == list(range(10))
    assert [r.step for r in responses] == list(range(1, 11))
    np.testing.assert_allclose(np.concatenate([logits_of(r) for r in responses]), whole, atol=1e-5)


def test_requests_queued_behind_a_close_fail_with_not_found(server: ServerThread) -> None:
    """A close ordered before queued steps fails them cleanly instead of leaving them waiting."""
    import asyncio

    scheduler = server.server.scheduler
    assert scheduler is not None

    async def race() -> tuple[object, object]:
        session = scheduler.create_session()
        close = asyncio.ensure_future(scheduler.close_session(session.id))
        step = asyncio.ensure_future(scheduler.step(session, np.array([1], np.int64)))
        return tuple(await asyncio.gather(close, step, return_exceptions=True))  # type: ignore[return-value]

    closed, stepped = server.call(race())
    assert closed is None
    assert type(stepped).__name__ == "SessionNotFound"


def test_generation_checks_expected_step(server: ServerThread) -> None:
    with server.channel() as channel:
        stream = SyncStream(channel)
        stream.request(tokens=[1, 2])
        with pytest.raises(grpc.RpcError) as error:
            stream.request(tokens=[1], expected_step=0, generate=pb.Generate(max_tokens=3))
        stream.close()
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stored_result_is_forgotten_after_the_replay_window(token_model: Path) -> None:
    from lstmserve.server.scheduler import REPLAY_WINDOW_S

    handle = start_server(token_model)
    try:
        with handle.channel() as channel:
            stream = SyncStream(channel)
            stream.request(tokens=[1, 2], expected_step=0)
            assert stream.request(tokens=[1, 2], expected_step=0).step == 2  # replayed within the window
            scheduler = handle.server.scheduler
            assert scheduler is not None
            handle.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + REPLAY_WINDOW_S + 1))
            with pytest.raises(grpc.RpcError) as error:
                stream.request(tokens=[1, 2], expected_step=0)
            stream.close()
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        handle.stop()


@pytest.mark.parametrize("idle_spin_us", [0, 30_000])
def test_a_session_stepping_alone_keeps_the_loop_polling_for_idle_spin_us(token_model: Path, idle_spin_us: int) -> None:
    """After a step of a session stepping alone, the event loop keeps polling (a task that yields at once)
    for --idle-spin-us, then sleeps again; 0 turns that off."""
    handle = start_server(token_model, idle_spin_us=idle_spin_us)
    try:
        scheduler = handle.server.scheduler
        assert scheduler is not None

        def polling() -> bool:
            return scheduler._spinner is not None and not scheduler._spinner.done()

        with handle.channel() as channel:
            stream = SyncStream(channel)
            for _ in range(3):
                assert stream.request(tokens=[1]).batch_size == 1
                assert handle.call_soon(polling) == bool(idle_spin_us)
            stream.close()
        # Past the window the polling task ends and the loop sleeps again (waited for, not slept on).
        wait_until(lambda: not handle.call_soon(polling), 60, "the polling task to end")
    finally:
        handle.stop()


def test_a_longer_step_alone_runs_on_the_event_loop_once_its_measured_time_fits_the_budget(
    token_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of more than INLINE_MAX_POSITIONS positions computed alone runs on the worker thread until one
    has been timed there, then on the event loop while positions x measured time per position stays
    within INLINE_BUDGET_S; short steps always run on the loop."""
    from lstmserve.server import scheduler as scheduler_module

    handle = start_server(token_model)
    try:
        scheduler = handle.server.scheduler
        assert scheduler is not None
        threads: list[str] = []
        execute = scheduler.runner.execute

        def recording_execute(call: PreparedCall) -> None:
            threads.append(threading.current_thread().name)
            execute(call)

        scheduler.runner.execute = recording_execute
        long_step = [1] * (scheduler_module.INLINE_MAX_POSITIONS + 8)
        # A budget no timing on a busy machine can exceed, then one that nothing fits.
        monkeypatch.setattr(scheduler_module, "INLINE_BUDGET_S", 10.0)
        with handle.channel() as channel:
            stream = SyncStream(channel)
            for _ in range(3):
                assert stream.request(tokens=long_step).batch_size == 1
            assert threads[0].startswith("lstmserve-compute")  # not measured yet: the worker
            assert threads[1:] == ["test-server", "test-server"]  # measured: within the budget
            # Not while other sessions wait (--max-batch-size 1 holding them back); short steps still do.
            assert not scheduler._runs_inline(len(long_step), others_waiting=True)
            assert scheduler._runs_inline(scheduler_module.INLINE_MAX_POSITIONS, others_waiting=True)
            monkeypatch.setattr(scheduler_module, "INLINE_BUDGET_S", 0.0)
            stream.request(tokens=long_step)
            stream.request(tokens=[1])
            stream.close()
        assert threads[3].startswith("lstmserve-compute") and threads[4] == "test-server"
    finally:
        handle.stop()
