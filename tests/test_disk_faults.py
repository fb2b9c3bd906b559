"""A state directory that fails (full, read-only, gone) never stops the server or loses a live session.

The directory is broken for real: it is moved away and a plain file put in its place, so every write,
rename and unlink in it fails with an OSError from the kernel, as it would for anyone (root included)
on a read-only or vanished mount. A full disk is a file size limit on the server process (RLIMIT_FSIZE):
writes then fail part-way with EFBIG, as they do with ENOSPC on a full one.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, start_server
from helpers import SyncStream, serve_process, stored_sessions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.client import Client


LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


@contextmanager
def broken(directory: Path) -> Iterator[None]:
    """While inside: `directory` is a plain file, so nothing can be written, renamed or deleted in it."""
    away = directory.with_name(directory.name + "-away")
    directory.rename(away)
    directory.write_text("not a directory")
    try:
        yield
    finally:
        directory.unlink()
        away.rename(directory)


def _sweep(handle: ServerThread, hours: float = 1.0) -> int:
    scheduler = handle.server.scheduler
    assert scheduler is not None
    return handle.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + hours * 3600))


def _expected(client: Client, tokens: list[int]) -> np.ndarray:
    with client.session() as control:
        logits = control.step(tokens).logits
        assert logits is not None
        return logits


def test_failed_spill_keeps_the_session_live_and_the_loop_running(token_model: Path, tmp_path: Path, caplog) -> None:
    state_dir = tmp_path / "state"
    handle = start_server(token_model, state_dir=state_dir, spill_idle=True)
    try:
        with Client(handle.address) as client:
            expected = _expected(client, [3, 1, 4, 1])
            session = client.session()
            session.step([3, 1, 4])
            with broken(state_dir), caplog.at_level(logging.ERROR, logger="lstmserve.server.scheduler"):
                assert _sweep(handle) == 0  # nothing could be spilled: nothing left memory
            assert any("could not spill" in r.message and session.id in r.message for r in caplog.records)
            # The session is still live here, and the batching loop still runs: it steps exactly.
            out = session.step([1])
            assert out.logits is not None
            np.testing.assert_array_equal(out.logits[0], expected[3])
            assert session.info().step == 4
            # Once the directory is back, a later sweep (after the retry pause) spills it, and it comes back.
            assert _sweep(handle, hours=2) >= 1
            assert (state_dir / f"{session.id}.session").exists()
            assert session.info().step == 4
    finally:
        handle.stop()


def test_failed_deletion_on_close_frees_the_slot_and_is_retried(token_model: Path, tmp_path: Path, caplog) -> None:
    """Closing a session deletes its spill file (if it has one): when the disk refuses, the session is closed all
    the same (its slot free for the next), the failure names it, and the deletion is tried again later."""
    state_dir = tmp_path / "state"
    handle = start_server(token_model, state_dir=state_dir, max_sessions=3, spill_idle=True)
    try:
        with Client(handle.address) as client:
            sessions = [client.session() for _ in range(3)]
            for session in sessions:
                session.step([2])
            assert _sweep(handle) == 3  # spilled: each has a file now
            for session in sessions:
                assert session.info().step == 1  # back in memory; its spill file stays until a checkpoint
            with broken(state_dir), caplog.at_level(logging.ERROR, logger="lstmserve.server.keeper"):
                for session in sessions:
                    session.close()  # closed here; deleting its spill file fails
                # Every slot is free again: three new sessions fit under --max-sessions 3.
                newcomers = [client.session() for _ in range(3)]
                for newcomer in newcomers:
                    assert newcomer.step([1]).step == 1
            closed_ids = {s.id for s in sessions}
            assert {i for i in closed_ids if any(i in r.message for r in caplog.records)} == closed_ids
            assert {p.stem for p in state_dir.glob("*.session")} == closed_ids  # still there: the disk refused
            handle.call(handle.server.checkpoint())  # the directory is back: deletions are tried again
            assert list(state_dir.glob("*.session")) == []
            assert set(stored_sessions(token_model, state_dir)) == {n.id for n in newcomers}
    finally:
        handle.stop()


def test_failed_checkpoint_names_the_sessions_and_keeps_them(token_model: Path, tmp_path: Path) -> None:
    from lstmserve.server.keeper import NotWritten

    state_dir = tmp_path / "state"
    handle = start_server(token_model, state_dir=state_dir)
    try:
        with Client(handle.address) as client:
            session = client.session()
            session.step([5, 6])
            with broken(state_dir), pytest.raises(NotWritten) as error:
                handle.call(handle.server.checkpoint())
            assert session.id in str(error.value)
            assert session.step([7]).step == 3
            assert handle.call(handle.server.checkpoint()) == 1
            assert stored_sessions(token_model, state_dir) == {session.id: 3}
    finally:
        handle.stop()


def test_an_unexpected_error_in_a_batch_fails_that_batch_only(server: ServerThread) -> None:
    """An exception where none is expected (here: injected into resolving a batch) fails the requests of that
    batch with INTERNAL, on both routes a step can take (the idle fast path, and the batching loop), and the
    server goes on serving them."""
    scheduler = server.server.scheduler
    assert scheduler is not None
    batcher = scheduler.batcher
    finish = batcher.finish

    def fail_once(*args: object) -> None:
        batcher.finish = finish
        raise RuntimeError("injected fault")

    with server.channel() as channel:
        session_id = SyncStream(channel).request(tokens=[1, 2]).session_id
        other = SyncStream(channel)
        other.request(tokens=[1])
        for route in ("fast path", "batching loop"):
            stream = SyncStream(channel)
            stream.request(session_id=session_id)  # an opening request without input: computes nothing
            if route == "fast path":
                stream.request(tokens=[5])  # this session stepped alone last: its next step takes the fast path
            else:
                other.request(tokens=[1])  # another session stepped last: the next step goes through the loop
            server.call_soon(lambda: setattr(batcher, "finish", fail_once))
            with pytest.raises(grpc.RpcError) as error:
                stream.request(tokens=[3])
            assert error.value.code() == grpc.StatusCode.INTERNAL, route
            assert "injected fault" in (error.value.details() or ""), route
            # The error ended that stream only: the session steps on, on a new one, and so do others.
            SyncStream(channel).request(session_id=session_id, tokens=[4])
            other.request(tokens=[1])


def test_a_dead_batching_loop_reports_not_serving_and_exits_nonzero(token_model: Path) -> None:
    handle = start_server(token_model)
    try:
        scheduler = handle.server.scheduler
        assert scheduler is not None

        class BrokenWakeup:
            def set(self) -> None:
                pass

            def clear(self) -> None:
                pass

            async def wait(self) -> None:
                raise RuntimeError("injected: the loop dies")

        def kill_loop() -> None:
            running = scheduler._wakeup
            scheduler._wakeup = BrokenWakeup()
            running.set()  # the loop wakes, and dies at its next wait

        handle.call_soon(kill_loop)
        with handle.channel() as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            for update in watch:  # SERVING until the watchdog reacts, then NOT_SERVING
                if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    watch.cancel()
                    break

        async def exit_status() -> int:
            import asyncio

            from lstmserve.server.app import run_until_stopped

            return await run_until_stopped(handle.server, asyncio.Event())

        assert handle.call(exit_status()) == 1
    finally:
        handle.stop()


def test_drain_that_cannot_write_exits_1_names_the_sessions_and_leaves_no_temp_files(
    token_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    # A session file of the tiny model is about 1 KB: the limit lets none be written whole.
    process, address = serve_process(
        token_model, "--state-dir", str(state_dir), "--grace-s", "1", file_size_limit=300, keep_log=True
    )
    try:
        with Client(address) as client:
            ids = []
            for _ in range(3):
                session = client.session()
                session.step([1, 2, 3])
                ids.append(session.id)
                session.detach()
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, log
    for session_id in ids:
        assert session_id in log
    assert "were not written" in log
    assert list(state_dir.iterdir()) == []  # no partial *.session.tmp file left behind


def test_near_limit_requests_that_are_refused_do_not_pile_up_in_memory(token_model: Path, tmp_path: Path) -> None:
    """50 Infer requests of just under 16 MiB each, all refused: the server's memory stays bounded (each
    used to stay resident, about 400 MB apiece, in a reference cycle of the aborted call)."""
    import psutil

    from lstmserve.inference import grpc_service_pb2 as oip_pb
    from lstmserve.inference import grpc_service_pb2_grpc as oip_grpc
    from lstmserve.v1 import lstmserve_pb2 as pb
    from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

    keys = tmp_path / "keys"
    keys.write_text("a-valid-key-of-some-length\n")
    near_limit = 16 * 1024 * 1024 - 64
    infer = pb.InferRequest(tokens=[1] * near_limit)  # one byte per token, packed
    # The Open Inference Protocol too: a request of raw bytes for a model the server does not serve.
    model_infer = oip_pb.ModelInferRequest(model_name="no-such-model", raw_input_contents=[bytes(near_limit - 64)])
    for extra in ((), ("--api-keys-file", str(keys))):
        process, address = serve_process(token_model, *extra)
        try:
            server = psutil.Process(process.pid)
            options = [("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 32 * 1024 * 1024)]
            with grpc.insecure_channel(address, options=options) as channel:
                calls = [
                    (pb_grpc.LstmServeStub(channel).Infer, infer, grpc.StatusCode.INVALID_ARGUMENT, 50),
                    (oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer, model_infer, grpc.StatusCode.NOT_FOUND, 25),
                ]
                baseline = server.memory_info().rss
                for call, request, refusal, count in calls:
                    expected = grpc.StatusCode.UNAUTHENTICATED if extra else refusal
                    for sent in range(count):
                        with pytest.raises(grpc.RpcError) as error:
                            call(request)
                        assert error.value.code() == expected
                        growth = server.memory_info().rss - baseline
                        assert growth < 1024**3, f"server RSS grew {growth / 1e6:.0f} MB after {sent + 1} requests"
        finally:
            process.kill()
            process.wait()
