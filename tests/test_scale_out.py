"""Several replicas behind a real Envoy, sharing sessions through a real Redis (all on loopback).

Each test starts Envoy (deploy/envoy/envoy.yaml with loopback endpoints from a watched EDS file),
`lstmserve serve --session-store redis://...` replicas as subprocesses, and drives them through the
proxy with the client library, which proposes session ids and sends the `lstmserve-session` header.
Outputs are compared with the PyTorch reference of the whole token sequence (tests/helpers.py).
Which replica holds a session is read from Redis (`lstmserve:session:<id>`, field `replica`, whose
value names the process id); which replica Envoy sent each call to, from Envoy's access log.

Envoy's ring hash keeps about the same number of points on the ring whatever the number of replicas,
so a change of replicas moves the sessions of the replica that left (or some sessions to the one that
joined) and also a few sessions between replicas that stay. The tests check that the sessions that
move are exactly those whose replica Envoy changed, each moved once, and continue exactly.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from cluster import Envoy, RedisServer, Replica, start_replicas, wait_until
from helpers import reference_logits

from lstmserve.client import Client, RetryPolicy, Session, StepMismatch
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


@pytest.fixture
def envoy(redis_server: RedisServer, tmp_path: Path) -> Iterator[Envoy]:
    redis_server.client.flushall()
    proxy = Envoy(tmp_path)
    yield proxy
    proxy.stop()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    """The replicas a test starts (append to it): killed at the end whatever happened."""
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


def serve(envoy: Envoy, running: list[Replica], replicas: list[Replica]) -> None:
    """Routes through Envoy to `running` (and keeps them for cleanup)."""
    replicas.extend(r for r in running if r not in replicas)
    envoy.set_replicas([r.port for r in running])
    envoy.wait_routing_to([r.port for r in running])


def holder_of(redis_server: RedisServer, session_id: str, running: list[Replica]) -> Replica | None:
    recorded = redis_server.holder(session_id)
    return next((r for r in running if r.holds(recorded)), None)


def check_outputs(model: Path, tokens: list[int], logits: list[np.ndarray]) -> None:
    """The logits of every step, one token each, equal the reference run of the whole sequence."""
    np.testing.assert_allclose(np.concatenate(logits), reference_logits(model, np.array(tokens)), atol=TOLERANCE)


def stored_step(redis_server: RedisServer, session_id: str) -> int:
    """The step counter in a session's stored snapshot (see server/snapshot.py for the layout)."""
    # The Redis client does not decode responses: the value is bytes.
    blob = cast("bytes | None", redis_server.client.hget(f"lstmserve:session:{session_id}", "blob"))
    assert blob is not None, f"no snapshot of {session_id}"
    (fp_len,) = struct.unpack_from("<H", blob, 11)
    (step,) = struct.unpack_from("<Q", blob, 13 + fp_len)
    return int(step)


def _stored_or_zero(redis_server: RedisServer, session_id: str) -> int:
    """`stored_step`, or 0 while the session has no snapshot yet."""
    if redis_server.client.hget(f"lstmserve:session:{session_id}", "blob") is None:
        return 0
    return stored_step(redis_server, session_id)


def test_sessions_stick_to_one_replica(
    token_model: Path, redis_server: RedisServer, envoy: Envoy, replicas: list[Replica], tmp_path: Path
) -> None:
    running = start_replicas(token_model, redis_server.url, tmp_path, 3)
    serve(envoy, running, replicas)
    rng = np.random.default_rng(1)
    with Client(envoy.address) as client:
        sessions = [client.session() for _ in range(30)]
        holders = {s.id: holder_of(redis_server, s.id, running) for s in sessions}
        tokens = {s.id: rng.integers(0, 20, 4).tolist() for s in sessions}
        logits: dict[str, list[np.ndarray]] = {s.id: [] for s in sessions}
        for position in range(4):
            for session in sessions:
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
                assert session.info().step == position + 1  # a unary call routed like the stream
                session.detach()  # the next step opens a new stream: Envoy routes it again
        # Every call of a session reached the replica that created it: none was taken over or handed over.
        assert {s.id: holder_of(redis_server, s.id, running) for s in sessions} == holders
        routes = envoy.routes()
        for session in sessions:
            holder = holders[session.id]
            assert holder is not None and set(routes[session.id]) == {holder.port}, routes[session.id]
        counts = [int(r.metric("lstmserve_active_sessions")) for r in running]
        assert sum(counts) == 30 and min(counts) >= 1, counts
        for replica in running:
            assert replica.metric("lstmserve_handoffs_total") == 0
            assert replica.metric("lstmserve_takeovers_total", 'source="store"') == 0
            assert replica.metric("lstmserve_takeovers_total", 'source="handoff"') == 0
            assert replica.metric("lstmserve_steps_total") == 4 * counts[running.index(replica)]
        for session in sessions:
            check_outputs(token_model, tokens[session.id], logits[session.id])

        # A proposed id that is taken is refused, through the proxy as directly.
        taken = sessions[0].id
        with grpc.insecure_channel(envoy.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.LstmServeStub(channel).CreateSession(
                    pb.CreateSessionRequest(session_id=taken), metadata=[("lstmserve-session", taken)], timeout=10
                )
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS


def drive(session: Session, tokens: list[int], logits: list[np.ndarray], started: threading.Event) -> None:
    for position, token in enumerate(tokens):
        output = session.step([token])
        assert output.step == position + 1
        assert output.logits is not None
        logits.append(output.logits)
        if position == 4:
            started.set()
        time.sleep(0.005)


def test_draining_a_replica_mid_stream_loses_no_step(
    token_model: Path, redis_server: RedisServer, envoy: Envoy, replicas: list[Replica], tmp_path: Path
) -> None:
    running = start_replicas(token_model, redis_server.url, tmp_path, 3)
    serve(envoy, running, replicas)
    rng = np.random.default_rng(2)
    steps = 60
    # The retry budget README recommends behind a proxy: enough to outlast Envoy's health check.
    with Client(envoy.address, timeout=30, retry=RetryPolicy(max_attempts=8)) as client:
        sessions = [client.session() for _ in range(12)]
        holder_of_before = {s.id: holder_of(redis_server, s.id, running) for s in sessions}
        by_replica = {r.pid: [s for s in sessions if holder_of_before[s.id] is r] for r in running}
        victim = max(running, key=lambda r: len(by_replica[r.pid]))
        moved = by_replica[victim.pid]
        assert moved, "no session on the replica to drain"
        tokens = {s.id: rng.integers(0, 20, steps).tolist() for s in sessions}
        logits: dict[str, list[np.ndarray]] = {s.id: [] for s in sessions}
        started = [threading.Event() for _ in sessions]
        errors: list[BaseException] = []

        def run(index: int) -> None:
            session = sessions[index]
            try:
                drive(session, tokens[session.id], logits[session.id], started[index])
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                started[index].set()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
        for thread in threads:
            thread.start()
        for event in started:
            event.wait(30)
        victim.signal(signal.SIGTERM)  # mid-stream: every session is stepping
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert victim.process.wait(30) == 0
        survivors = [r for r in running if r is not victim]
        for session in sessions:
            assert session.info().step == steps  # no acknowledged step lost, none applied twice
            check_outputs(token_model, tokens[session.id], logits[session.id])
        # Every session is held by the survivor Envoy sends it to now; the drained replica's all moved.
        routes = envoy.routes()
        after = {s.id: holder_of(redis_server, s.id, survivors) for s in sessions}
        assert all(after[s.id] is not None and cast(Replica, after[s.id]).port == routes[s.id][-1] for s in sessions)
        # Besides those, Envoy's new ring moved a few sessions between survivors: each handed over once.
        between = [s for s in sessions if s not in moved and after[s.id] is not holder_of_before[s.id]]
        taken_over = sum(r.metric("lstmserve_takeovers_total", f'source="{s}"') for r in survivors for s in ("store", "handoff"))
        assert taken_over == len(moved) + len(between)
        assert sum(r.metric("lstmserve_handoffs_total") for r in survivors) == len(between)


def test_killing_a_replica_resumes_its_sessions_from_the_last_checkpoint(
    token_model: Path, redis_server: RedisServer, envoy: Envoy, replicas: list[Replica], tmp_path: Path
) -> None:
    running = start_replicas(token_model, redis_server.url, tmp_path, 3, "--checkpoint-interval-s", "1.0")
    serve(envoy, running, replicas)
    rng = np.random.default_rng(3)
    with Client(envoy.address, timeout=30, retry=RetryPolicy(max_attempts=8)) as client:
        sessions = [client.session() for _ in range(12)]
        tokens = {s.id: rng.integers(0, 20, 12).tolist() for s in sessions}
        logits: dict[str, list[np.ndarray]] = {s.id: [] for s in sessions}
        for position in range(6):
            for session in sessions:
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
        # At least one checkpoint after these steps (its interval is 1 s: waited for, not slept on).
        wait_until(
            lambda: all(_stored_or_zero(redis_server, s.id) >= 6 for s in sessions), 60, "a checkpoint at step 6"
        )
        for position in (6, 7):  # acknowledged, and most likely after the last checkpoint
            for session in sessions:
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
        victim = max(running, key=lambda r: sum(holder_of(redis_server, s.id, running) is r for s in sessions))
        victim.signal(signal.SIGSTOP)  # no checkpoint from here on: what Redis holds now is what survives
        lost = {s.id: stored_step(redis_server, s.id) for s in sessions if holder_of(redis_server, s.id, running) is victim}
        assert lost and all(6 <= step <= 8 for step in lost.values()), lost
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)

        for session in sessions:
            resume_at = 8
            if session.id in lost and lost[session.id] < 8:
                # The crash lost the steps after the last checkpoint: the session is where that checkpoint was.
                with pytest.raises(StepMismatch):
                    session.step([tokens[session.id][resume_at]])
                resume_at = session.info().step
                assert resume_at == lost[session.id]
                del logits[session.id][resume_at:]
            for position in range(resume_at, 12):
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
            check_outputs(token_model, tokens[session.id], logits[session.id])
        survivors = [r for r in running if r is not victim]
        assert sum(r.metric("lstmserve_takeovers_total", 'source="store"') for r in survivors) == len(lost)


def test_scaling_from_three_to_four_moves_only_the_sessions_whose_owner_changed(
    token_model: Path, redis_server: RedisServer, envoy: Envoy, replicas: list[Replica], tmp_path: Path
) -> None:
    running = start_replicas(token_model, redis_server.url, tmp_path, 3)
    serve(envoy, running, replicas)
    rng = np.random.default_rng(4)
    with Client(envoy.address, timeout=30, retry=RetryPolicy(max_attempts=8)) as client:
        sessions = [client.session() for _ in range(32)]
        tokens = {s.id: rng.integers(0, 20, 6).tolist() for s in sessions}
        logits: dict[str, list[np.ndarray]] = {s.id: [] for s in sessions}
        for position in range(3):
            for session in sessions:
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
        before = {s.id: holder_of(redis_server, s.id, running) for s in sessions}

        newcomer = Replica(token_model, redis_server.url, tmp_path).wait_started()
        serve(envoy, [*running, newcomer], replicas)  # the new EDS file: Envoy adds it to the ring, no restart
        for position in range(3, 6):
            for session in sessions:
                session.detach()  # a new stream, routed by the new ring
                out = session.step([tokens[session.id][position]])
                assert out.logits is not None
                logits[session.id].append(out.logits)
        for session in sessions:
            assert session.info().step == 6
            check_outputs(token_model, tokens[session.id], logits[session.id])
        everyone = [*running, newcomer]
        after = {s.id: holder_of(redis_server, s.id, everyone) for s in sessions}
        routes = envoy.routes()
        owner_now = {sid: next(r for r in everyone if r.port == ports[-1]) for sid, ports in routes.items()}

        moved = {s.id for s in sessions if after[s.id] is not before[s.id]}
        rerouted = {s.id for s in sessions if owner_now[s.id] is not before[s.id]}
        assert moved == rerouted, "exactly the sessions whose replica Envoy changed moved"
        assert all(after[s.id] is owner_now[s.id] for s in sessions)
        # How many move depends on where the ring puts the replicas' random ports, so no count is asserted:
        # the verdict is that exactly the rerouted sessions moved, each once, each to its new owner.
        to_newcomer = {sid for sid in moved if after[sid] is newcomer}
        takeovers = sum(r.metric("lstmserve_takeovers_total", 'source="handoff"') for r in everyone)
        assert takeovers == len(moved) == sum(r.metric("lstmserve_handoffs_total") for r in everyone)
        assert sum(r.metric("lstmserve_takeovers_total", 'source="store"') for r in everyone) == 0
        print(f"3 -> 4 replicas: {len(moved)} of {len(sessions)} sessions moved, {len(to_newcomer)} to the new one")
