"""Sessions survive a restart: written on drain (SIGTERM) and by checkpoints, read back at start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import start_server
from helpers import serve_process, stored_sessions, wait_until

from lstmserve.client import Client, SessionNotFound

LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


def _control_logits(address: str, tokens: list[int]) -> np.ndarray:
    with Client(address) as client, client.session() as session:
        logits = session.step(tokens).logits
        assert logits is not None
        return logits


def test_drain_writes_sessions_and_a_restart_resumes_them_exactly(token_model: Path, tmp_path: Path) -> None:
    first = start_server(token_model, state_dir=tmp_path)
    with Client(first.address) as client:
        kept = client.session()
        kept.step([1, 2, 3])
        closed = client.session()
        closed.step([4])
        closed.close()
        reset = client.session()
        reset.step([5, 6])
        reset.reset()
        ids = (kept.id, reset.id)
        kept.detach()
        reset.detach()
    first.call(first.server.drain(grace_s=5))
    first.loop.call_soon_threadsafe(first.loop.stop)
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.checkpoint"]  # one file holds every session
    assert sorted(stored_sessions(token_model, tmp_path)) == sorted(ids)  # the closed one is not in it

    second = start_server(token_model, state_dir=tmp_path)
    try:
        expected = _control_logits(second.address, [1, 2, 3, 7])[3]
        with Client(second.address) as client:
            with client.session(resume=ids[0]) as resumed:
                assert resumed.info().step == 3
                out = resumed.step([7])
                assert out.logits is not None
                np.testing.assert_array_equal(out.logits[0], expected)
            with client.session(resume=ids[1]) as was_reset:
                assert was_reset.info().step == 0
    finally:
        second.stop()


def test_corrupted_record_is_refused_and_the_others_restored(token_model: Path, tmp_path: Path, caplog) -> None:
    first = start_server(token_model, state_dir=tmp_path)
    with Client(first.address) as client:
        good, bad = client.session(), client.session()
        good.step([1])
        bad.step([2])
        good_id, bad_id = good.id, bad.id
        good.detach()
        bad.detach()
    first.call(first.server.drain(grace_s=5))
    first.loop.call_soon_threadsafe(first.loop.stop)
    checkpoint = tmp_path / "sessions.checkpoint"
    content = bytearray(checkpoint.read_bytes())
    at = content.index(bad_id.encode()) + 200  # inside the bad session's record: its state
    content[at] ^= 0xFF
    checkpoint.write_bytes(bytes(content))

    with caplog.at_level("ERROR"):
        second = start_server(token_model, state_dir=tmp_path)
    try:
        assert any("refused" in r.message and bad_id in r.message for r in caplog.records)
        with Client(second.address) as client:
            with client.session(resume=good_id) as restored:
                assert restored.info().step == 1
            with pytest.raises(SessionNotFound):
                client.session(resume=bad_id)
    finally:
        second.stop()


def test_a_checkpoint_that_is_not_one_is_moved_aside(token_model: Path, tmp_path: Path, caplog) -> None:
    (tmp_path / "sessions.checkpoint").write_bytes(b"LSTMCKPT but then garbage")
    with caplog.at_level("ERROR"):
        handle = start_server(token_model, state_dir=tmp_path)
    try:
        assert any("refused" in r.message for r in caplog.records)
        assert (tmp_path / "sessions.corrupt").exists()
        assert handle.call_soon(lambda: len(handle.server.scheduler.sessions)) == 0
    finally:
        handle.stop()


def _serve(model: Path, state_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    return serve_process(model, "--state-dir", str(state_dir), *extra)


def test_sigterm_then_restart_and_sigkill_with_checkpoints(token_model: Path, tmp_path: Path) -> None:
    process, address = _serve(token_model, tmp_path, "--checkpoint-interval-s", "0.2")
    try:
        with Client(address) as client:
            session = client.session()
            session.step([1, 2, 3])
            session_id = session.id
            # At least one checkpoint after the acknowledged step (waited for, not slept on).
            wait_until(lambda: stored_sessions(token_model, tmp_path).get(session_id) == 3, 60, "a checkpoint at step 3")
            session.detach()
        process.send_signal(signal.SIGKILL)  # a crash: no drain
        process.wait(10)
        process, address = _serve(token_model, tmp_path, "--checkpoint-interval-s", "0.2")
        with Client(address) as client, client.session(resume=session_id) as resumed:
            assert resumed.info().step == 3  # everything acknowledged before the last checkpoint is kept
            resumed.step([4, 5])
            resumed.detach()
        process.send_signal(signal.SIGTERM)  # a drain writes the latest state
        assert process.wait(15) == 0
        process, address = _serve(token_model, tmp_path)
        expected = _control_logits(address, [1, 2, 3, 4, 5, 6])[5]
        with Client(address) as client, client.session(resume=session_id) as resumed:
            assert resumed.info().step == 5
            out = resumed.step([6])
            assert out.logits is not None
            np.testing.assert_array_equal(out.logits[0], expected)
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_under_load_keeps_every_acknowledged_step(token_model: Path, tmp_path: Path) -> None:
    import threading

    import grpc
    from helpers import SyncStream, logits_of

    from lstmserve.v1 import lstmserve_pb2 as pb
    from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

    process, address = _serve(token_model, tmp_path, "--grace-s", "5")
    histories: dict[str, list[int]] = {}
    pending: dict[str, list[int]] = {}
    ready = threading.Barrier(9)

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(address, options=[("grpc.so_reuseport", 0)]) as channel:
            stream = SyncStream(channel)
            session_id = stream.request().session_id
            histories[session_id], pending[session_id] = [], []
            ready.wait()
            try:
                while True:
                    tokens = rng.integers(0, 10, size=int(rng.integers(1, 4))).tolist()
                    pending[session_id] = tokens
                    response = stream.request(tokens=tokens)
                    histories[session_id] += tokens  # acknowledged
                    pending[session_id] = []
                    assert response.step == len(histories[session_id])
            except grpc.RpcError:
                pass  # the server went away

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    ready.wait()
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    for thread in threads:
        thread.join(10)
    process, address = _serve(token_model, tmp_path)
    try:
        with grpc.insecure_channel(address, options=[("grpc.so_reuseport", 0)]) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            for session_id, acknowledged in histories.items():
                assert acknowledged, "every session stepped before the drain"
                step = stub.GetSession(pb.SessionRef(session_id=session_id)).step
                # Every acknowledged step is kept; at most the one request in flight was applied too.
                applied = acknowledged if step == len(acknowledged) else acknowledged + pending[session_id]
                assert step == len(applied)
                resumed = SyncStream(channel).request(session_id=session_id, tokens=[3])
                whole = stub.Infer(pb.InferRequest(tokens=applied + [3])).logits
                np.testing.assert_allclose(
                    logits_of(resumed)[0], logits_of(pb.StepResponse(logits=whole))[-1], atol=1e-5
                )
    finally:
        process.kill()


def test_idle_sessions_are_spilled_and_come_back_exactly(token_model: Path, tmp_path: Path) -> None:
    from lstmserve.client import SessionNotFound

    handle = start_server(
        token_model, state_dir=tmp_path, spill_idle=True, session_ttl_s=60.0, api_keys=frozenset({"k" * 20, "j" * 20})
    )
    owner_key, other_key = [("authorization", "Bearer " + "k" * 20)], [("authorization", "Bearer " + "j" * 20)]
    try:
        with Client(handle.address, metadata=owner_key) as client:
            expected = _control_logits_with(client, [4, 2, 9, 1])[3]
            session = client.session()
            session.step([4, 2, 9])
            session_id = session.id
            session.detach()
            scheduler = handle.server.scheduler
            assert scheduler is not None
            spilled = handle.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + 3600))  # hours later
            assert spilled >= 1 and handle.server.store.in_use == 0
            assert (tmp_path / f"{session_id}.session").exists()
            with Client(handle.address, metadata=other_key) as stranger, pytest.raises(SessionNotFound):
                stranger.session(resume=session_id)  # still another key's session
            with client.session(resume=session_id, close_on_exit=True) as back:
                assert back.info().step == 3
                out = back.step([1])
                assert out.logits is not None
                np.testing.assert_array_equal(out.logits[0], expected)
            assert not (tmp_path / f"{session_id}.session").exists()  # closed: its file is gone
    finally:
        handle.stop()


def _control_logits_with(client: Client, tokens: list[int]) -> np.ndarray:
    with client.session() as session:
        logits = session.step(tokens).logits
        assert logits is not None
        return logits
