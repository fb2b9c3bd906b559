"""Client-proposed session ids, and sessions shared by servers through a real Redis (in-process servers).

tests/test_scale_out.py runs the same machinery as separate processes behind Envoy; here two servers
in this process share one redis-server, and the client talks to each directly, so every takeover and
handoff is forced and checked step by step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from cluster import RedisServer
from conftest import ServerThread, start_server

from lstmserve.client import Client, RetryPolicy, SessionNotFound, Unavailable
from lstmserve.client import _wire
from lstmserve.server.config import ConfigError, ServerConfig
from lstmserve.server.sessions import SEQUENCE_ID_PREFIX
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

KEYS = frozenset({"k" * 20, "j" * 20})


@pytest.fixture
def pair(token_model: Path, redis_server: RedisServer) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two servers sharing sessions through Redis."""
    redis_server.client.flushall()
    first = start_server(token_model, session_store=redis_server.url)
    second = start_server(token_model, session_store=redis_server.url)
    yield first, second
    first.stop()
    second.stop()


def control_logits(address: str, tokens: list[int], key: str | None = None) -> np.ndarray:
    metadata = [("authorization", f"Bearer {key}")] if key else None
    with Client(address, metadata=metadata) as client, client.session() as session:
        logits = session.step(tokens).logits
        assert logits is not None
        return logits


def create(channel: grpc.Channel, session_id: str, key: str | None = None) -> pb.SessionInfo:
    header = [(_wire.SESSION_HEADER, session_id)] if session_id.isascii() else []  # gRPC metadata is ASCII
    metadata = header + ([("authorization", f"Bearer {key}")] if key else [])
    request = pb.CreateSessionRequest(session_id=session_id)
    return pb_grpc.LstmServeStub(channel).CreateSession(request, metadata=metadata, timeout=10)


def test_the_client_proposes_ids_and_the_server_checks_them(token_model: Path) -> None:
    server = start_server(token_model, api_keys=KEYS)
    try:
        with Client(server.address, metadata=[("authorization", f"Bearer {'k' * 20}")]) as client:
            session = client.session()
            assert len(session.id) == 32 and int(session.id, 16) >= 0  # 128 random bits from the client
            session.step([1, 2])
            restored = client.session(restore=session.snapshot())
            assert restored.id != session.id and restored.info().step == 2
        with server.channel() as channel:
            info = create(channel, "proposed-by-client-0001", "k" * 20)
            assert info.session_id == "proposed-by-client-0001"
            for taken, key in ((session.id, "k" * 20), (session.id, "j" * 20), (info.session_id, "k" * 20)):
                with pytest.raises(grpc.RpcError) as error:
                    create(channel, taken, key)
                assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
            for bad in ("short", "x" * 65, "has/slash-0123456789", "dots..0123456789ab", "ünïcode-0123456789"):
                with pytest.raises(grpc.RpcError) as error:
                    create(channel, bad, "k" * 20)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        # The id is bound to the key that created it: another key that knows (or guesses) it gets nothing.
        with Client(server.address, metadata=[("authorization", f"Bearer {'j' * 20}")]) as other:
            with pytest.raises(SessionNotFound):
                other.session(resume=session.id)
    finally:
        server.stop()


def test_every_call_of_a_session_carries_its_id() -> None:
    metadata = (("authorization", "Bearer x"),)
    assert _wire.call_metadata(metadata, pb.SessionRef(session_id="abc")) == (*metadata, ("lstmserve-session", "abc"))
    assert _wire.call_metadata(metadata, pb.CreateSessionRequest(session_id="abc"))[-1] == ("lstmserve-session", "abc")
    assert _wire.call_metadata(metadata, pb.GetModelInfoRequest()) == metadata
    assert _wire.with_session(metadata, "s") == (*metadata, ("lstmserve-session", "s"))


def test_a_session_moves_between_servers_exactly(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    first, second = pair
    tokens = list(range(1, 13))
    expected = control_logits(first.address, tokens)
    with Client(first.address) as one, Client(second.address) as two:
        clients = (one, two)
        on_first = one.session()
        session_id = on_first.id
        for position, token in enumerate(tokens[:6]):
            # Each step on the other server: it takes the session over from the one holding it (a handoff).
            with clients[position % 2].session(resume=session_id) as handle:
                output = handle.step([token])
            assert output.step == position + 1
            assert output.logits is not None
            np.testing.assert_array_equal(output.logits[0], expected[position])
        on_first = one.session(resume=session_id)
        for position, token in enumerate(tokens[6:], start=6):
            if position % 2:
                # Taken over by the other server while this client's stream to the first is open: that stream
                # answers UNAVAILABLE, the client resends on a new stream with expected_step, and the first
                # server takes the session back. Every step applies exactly once.
                assert two.session(resume=session_id).info().step == position
            output = on_first.step([token])
            assert output.step == position + 1
            assert output.logits is not None
            np.testing.assert_array_equal(output.logits[0], expected[position])
        handoffs = sum(int(s.server.metrics.handoffs._value.get()) for s in pair)
        # Five moves in the first six steps, one for the resume on the first server, then three times there and back.
        assert handoffs == 5 + 1 + 3 * 2
        assert redis_server.holder(session_id) == first.server.cluster.replica
        on_first.close()
        with pytest.raises(SessionNotFound):
            two.session(resume=session_id)
    assert not redis_server.client.exists(f"lstmserve:session:{session_id}")  # closed: the record is gone


def test_drain_releases_sessions_to_the_other_servers(token_model: Path, redis_server: RedisServer) -> None:
    redis_server.client.flushall()
    first = start_server(token_model, session_store=redis_server.url, api_keys=KEYS)
    second = start_server(token_model, session_store=redis_server.url, api_keys=KEYS)
    try:
        expected = control_logits(first.address, [3, 4, 5, 6], "k" * 20)[3]
        key = [("authorization", f"Bearer {'k' * 20}")]
        with Client(first.address, metadata=key) as client:
            session = client.session()
            session.step([3, 4, 5])
            session_id = session.id
            session.detach()
        first.call(first.server.drain(grace_s=5))
        first.loop.call_soon_threadsafe(first.loop.stop)
        assert redis_server.holder(session_id) is None  # written and released
        with Client(second.address, metadata=[("authorization", f"Bearer {'j' * 20}")]) as other:
            with pytest.raises(SessionNotFound):
                other.session(resume=session_id)  # another key: nothing, and nothing taken over
        assert redis_server.holder(session_id) is None
        with Client(second.address, metadata=key) as client, client.session(resume=session_id) as resumed:
            assert resumed.info().step == 3
            out = resumed.step([6])
            assert out.logits is not None
            np.testing.assert_array_equal(out.logits[0], expected)
        assert second.server.metrics.takeovers.labels(source="store")._value.get() == 1
    finally:
        second.stop()


def test_spilled_sessions_come_back_on_any_server(token_model: Path, redis_server: RedisServer) -> None:
    redis_server.client.flushall()
    first = start_server(token_model, session_store=redis_server.url, spill_idle=True, session_ttl_s=60.0)
    second = start_server(token_model, session_store=redis_server.url)
    try:
        expected = control_logits(first.address, [7, 8, 9])[2]
        with Client(first.address) as client:
            session = client.session()
            session.step([7, 8])
            session_id = session.id
            session.detach()
        scheduler = first.server.scheduler
        assert scheduler is not None
        assert first.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + 3600)) >= 1  # hours later
        wait_for(lambda: redis_server.holder(session_id) is None, 60, "the spill, written in the background")
        key = f"lstmserve:session:{session_id}"
        assert redis_server.holder(session_id) is None and redis_server.client.ttl(key) == -1  # kept, no expiry
        with Client(second.address) as client, client.session(resume=session_id) as resumed:
            assert resumed.info().step == 2
            out = resumed.step([9])
            assert out.logits is not None
            np.testing.assert_array_equal(out.logits[0], expected)
    finally:
        first.stop()
        second.stop()


def test_an_unreachable_store_is_a_clear_error_and_bad_settings_are_refused(token_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either"):
        ServerConfig(model=token_model, session_store="redis://127.0.0.1:1/0", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="redis://"):
        ServerConfig(model=token_model, session_store="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="drain_delay_s"):
        ServerConfig(model=token_model, drain_delay_s=-1)
    ServerConfig(model=token_model, session_store="redis://127.0.0.1:1/0", checkpoint_interval_s=1, spill_idle=True)
    with pytest.raises(OSError, match="cannot reach the session store"):
        start_server(token_model, session_store="redis://127.0.0.1:1/0")


def test_a_server_that_is_draining_sends_requests_elsewhere(pair: tuple[ServerThread, ServerThread]) -> None:
    first, second = pair
    with Client(second.address) as client:
        session = client.session()
        session.step([1])
        session.detach()
        session_id = session.id
    first.call_soon(lambda: setattr(first.server.cluster, "draining", True))
    with Client(first.address, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(Unavailable):
            client.session(resume=session_id)  # UNAVAILABLE (retry elsewhere), never NOT_FOUND
        with pytest.raises(Unavailable):
            client.session()


def test_live_sessions_are_recorded_again_after_redis_lost_its_data(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    first, second = pair
    expected = control_logits(first.address, [5, 6, 7])[2]
    with Client(first.address) as client:
        session = client.session()
        session.step([5, 6])
        session_id = session.id
        session.detach()
    redis_server.client.flushall()  # a Redis restarted without persistence: every record and heartbeat is gone
    replica = first.server.cluster.replica
    deadline = time.monotonic() + 60
    while redis_server.holder(session_id) != replica and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_server.holder(session_id) == replica  # the next heartbeat noticed, and recorded it again
    with Client(second.address) as client, client.session(resume=session_id) as moved:
        assert moved.info().step == 2  # handed over from the first server: nothing was lost
        out = moved.step([7])
        assert out.logits is not None
        np.testing.assert_array_equal(out.logits[0], expected)


def test_an_open_inference_protocol_sequence_moves_between_servers_exactly(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """A Triton-client sequence is a shared session too: started on one server, continued on the other."""
    import tritonclient.grpc as triton

    first, second = pair
    tokens = list(range(1, 9))
    expected = control_logits(first.address, tokens)
    name = first.server.config.served_model_name
    with triton.InferenceServerClient(first.address) as one, triton.InferenceServerClient(second.address) as two:
        for position, token in enumerate(tokens):
            tensor = triton.InferInput("tokens", [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[token]], dtype=np.int64))
            result = (one, two)[position % 2].infer(
                name, [tensor], sequence_id=77, sequence_start=position == 0, sequence_end=position == len(tokens) - 1
            )
            np.testing.assert_allclose(result.as_numpy("logits")[0, 0], expected[position], atol=1e-6)
            if position == 0:
                session_id = next(iter(first.server.scheduler.sessions.all())).id
                assert session_id.startswith(SEQUENCE_ID_PREFIX)
                assert redis_server.holder(session_id) == first.server.cluster.replica
    # sequence_end: the record goes, and a tombstone says it was closed (written in the background: waited for)
    wait_for(lambda: not redis_server.client.exists(f"lstmserve:session:{session_id}"), 60, "the record to go")
    assert redis_server.client.exists(f"lstmserve:closed:{session_id}")
    with triton.InferenceServerClient(second.address) as two:  # the sequence id may start a new sequence
        tensor = triton.InferInput("tokens", [1, 1], "INT64")
        tensor.set_data_from_numpy(np.array([[tokens[0]]], dtype=np.int64))
        result = two.infer(name, [tensor], sequence_id=77, sequence_start=True, sequence_end=True)
        np.testing.assert_allclose(result.as_numpy("logits")[0, 0], expected[0], atol=1e-6)
    with first.channel() as channel, pytest.raises(grpc.RpcError) as error:
        create(channel, SEQUENCE_ID_PREFIX + "0" * 32)  # nobody may propose a sequence's id
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_session_that_comes_back_is_written_again_on_drain(
    token_model: Path, redis_server: RedisServer
) -> None:
    """A session that left a server and came back is a new session there: what the server wrote of it before
    it left says nothing about its state now, so checkpoints and the drain write it again."""
    redis_server.client.flushall()
    first = start_server(token_model, session_store=redis_server.url)
    second = start_server(token_model, session_store=redis_server.url)
    try:
        tokens = [1, 2, 3, 4]
        expected = control_logits(first.address, [*tokens, 5])
        with Client(first.address) as one, Client(second.address) as two:
            session = one.session()
            session.step([tokens[0]])
            session.step([tokens[1]])
            session_id = session.id
            session.detach()
            first.call(first.server.checkpoint())  # written at step 2
            with two.session(resume=session_id) as moved:  # handed over to the second server
                moved.step([tokens[2]])
            with one.session(resume=session_id) as back:  # and back to the first
                assert back.step([tokens[3]]).step == 4
            first.call(first.server.checkpoint())
        first.call(first.server.drain(grace_s=5))
        first.loop.call_soon_threadsafe(first.loop.stop)
        with Client(second.address) as client, client.session(resume=session_id) as resumed:
            assert resumed.info().step == 4  # not the second server's copy at step 3
            out = resumed.step([5])
            assert out.logits is not None
            np.testing.assert_array_equal(out.logits[0], expected[4])
    finally:
        second.stop()


def test_a_drain_writes_every_session_through_a_redis_error(token_model: Path, redis_server: RedisServer) -> None:
    """One failed write while draining (a Redis blip) is tried again, and the other sessions are written too."""

    redis_server.client.flushall()
    first = start_server(token_model, session_store=redis_server.url)
    second = start_server(token_model, session_store=redis_server.url)
    try:
        cluster = first.server.cluster
        assert cluster is not None
        ids = []
        with Client(first.address) as client:
            for tokens in ([1], [2, 3], [4, 5, 6]):
                session = client.session()
                session.step(tokens)
                ids.append(session.id)
                session.detach()
        failures = fail_next_calls(cluster.store, "save")
        first.call(first.server.drain(grace_s=5))
        first.loop.call_soon_threadsafe(first.loop.stop)
        assert not failures
        assert [redis_server.holder(session_id) for session_id in ids] == [None] * 3  # written and released
        with Client(second.address) as client:
            for steps, session_id in zip((1, 2, 3), ids, strict=True):
                assert client.session(resume=session_id).info().step == steps
    finally:
        second.stop()


def test_a_draining_server_hands_a_session_over_through_a_redis_error(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """A draining server cannot take a session back when writing it for a handoff fails: it writes it again."""

    first, second = pair
    cluster = first.server.cluster
    scheduler = first.server.scheduler
    assert cluster is not None and scheduler is not None
    expected = control_logits(first.address, [1, 2, 3])[2]
    with Client(first.address) as client:
        session = client.session()
        session.step([1, 2])
        session_id = session.id
        session.detach()

    def drain() -> None:  # what LstmServer.drain does first
        cluster.draining = True
        scheduler.stop_accepting()

    failures = fail_next_calls(cluster.store, "save")
    first.call_soon(drain)
    with Client(second.address) as client, client.session(resume=session_id) as moved:
        assert moved.info().step == 2
        out = moved.step([3])
        assert out.logits is not None
        np.testing.assert_array_equal(out.logits[0], expected)
    assert not failures


def fail_next_calls(store: object, method: str, times: int = 1) -> list[Exception]:
    """Makes the next `times` calls of the store's async `method` fail as in a Redis blip (connection
    reset), then lets calls through; returns the failures still to come (empty once all happened)."""
    import redis

    call = getattr(store, method)
    failures: list[Exception] = [redis.exceptions.ConnectionError("Connection reset by peer")] * times

    async def flaky(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return await call(*args, **kwargs)

    setattr(store, method, flaky)
    return failures


def cut_off_from_redis(server: ServerThread) -> Callable[[], None]:
    """Makes a server's heartbeat writes fail, as if it alone lost contact with Redis (the other
    server still reaches it); returns the function that reconnects it."""
    import redis

    cluster = server.server.cluster
    assert cluster is not None
    heartbeat = cluster.store.heartbeat

    async def failing_heartbeat(*args: object, **kwargs: object) -> bool:
        raise redis.exceptions.ConnectionError("Connection timed out")

    server.call_soon(lambda: setattr(cluster.store, "heartbeat", failing_heartbeat))
    return lambda: server.call_soon(lambda: setattr(cluster.store, "heartbeat", heartbeat))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_server_cut_off_from_redis_stops_serving_before_another_can_take_its_sessions(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """Split brain: the first server loses Redis (its heartbeat fails), the second takes its session over from
    the last checkpoint once the heartbeat key expired. The first must have stopped acknowledging steps by
    then (its lease lapsed), or the steps it acknowledges are lost while both serve the session."""
    first, second = pair
    cluster = first.server.cluster
    assert cluster is not None
    heartbeat_key = f"lstmserve:replica:{cluster.replica}"
    once = RetryPolicy(max_attempts=1)
    with Client(first.address, retry=once) as one, Client(second.address, retry=once) as two:
        session = one.session()
        session.step([1, 2])
        first.call(first.server.checkpoint())  # written at step 2
        session.step([3])  # acknowledged after the checkpoint: lost if the first server dies now
        cut_off_from_redis(first)
        acknowledged, stopped_by_lease = 3, False
        try:
            while redis_server.client.exists(heartbeat_key):  # the stream stays open on the first server
                acknowledged = session.step([4]).step
                time.sleep(0.02)
        except Unavailable as lapsed:  # the lease lapsed first: the steps stopped before the key expired
            assert session.id in str(lapsed) and "lost contact with the session store" in str(lapsed)
            stopped_by_lease = True
        wait_for(lambda: not redis_server.client.exists(heartbeat_key), 60, "the heartbeat key to expire")
        with two.session(resume=session.id) as taken:  # the second server takes it over from the checkpoint
            assert taken.info().step == 2
        assert redis_server.holder(session.id) == second.server.cluster.replica
        # Both would serve the session now: the first server acknowledging what the second never sees.
        with pytest.raises(Unavailable) as error:
            session.step([5])
        assert session.id in str(error.value) and "lost contact with the session store" in str(error.value)
        with pytest.raises(Unavailable):
            one.session(resume=session.id).info()
        assert stopped_by_lease and acknowledged >= 3


def test_a_server_back_in_contact_with_redis_drops_what_was_taken_and_serves_the_rest(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """After the cut: sessions another server took over meanwhile (still held there, or released since) are
    dropped as moved; the others are served on, exactly, with nothing lost."""
    first, second = pair
    cluster, scheduler = first.server.cluster, first.server.scheduler
    assert cluster is not None and scheduler is not None
    tokens = [1, 2, 3, 4, 5]
    expected = control_logits(first.address, tokens)
    once = RetryPolicy(max_attempts=1)
    with Client(first.address, retry=once) as one, Client(second.address) as two:
        taken, kept, released = one.session(), one.session(), one.session()
        for session in (taken, kept, released):
            session.step(tokens[:2])
        first.call(first.server.checkpoint())  # all three written at step 2
        kept.step([tokens[2]])  # only on the first server
        reconnect = cut_off_from_redis(first)
        wait_for(lambda: not first.call_soon(cluster.lease_valid), 60, "the first server's lease to lapse")
        with pytest.raises(Unavailable, match="lost contact with the session store"):
            kept.step([tokens[3]])
        wait_for(lambda: not redis_server.client.exists(f"lstmserve:replica:{cluster.replica}"), 60, "the key to expire")
        with two.session(resume=taken.id) as moved:  # taken over by the second server, from the checkpoint
            assert moved.step([tokens[2]]).step == 3
        # Taken over and let go again since (as a drain or a spill of the second server would).
        redis_server.client.hdel(f"lstmserve:session:{released.id}", "replica")
        reconnect()
        wait_for(lambda: first.call_soon(cluster.lease_valid), 60, "the first server's lease to be valid again")
        assert first.call_soon(lambda: [scheduler.sessions.find(s.id) is not None for s in (taken, kept, released)]) == [
            False,
            True,
            False,
        ]
        # Served on where it was: the step refused during the cut is resent, nothing was lost.
        output = kept.step([tokens[3]])
        assert output.step == 4
        assert output.logits is not None
        np.testing.assert_array_equal(output.logits[0], expected[3])
        assert redis_server.holder(kept.id) == cluster.replica
        with pytest.raises(Unavailable, match="moved to another replica"):
            taken.step([tokens[3]])  # the old stream: the session is the second server's now
        with one.session(resume=taken.id) as back:  # asked for again here: handed back with the second's steps
            output = back.step([tokens[3]])
            assert output.step == 4
            assert output.logits is not None
            np.testing.assert_array_equal(output.logits[0], expected[3])
        assert redis_server.holder(released.id) is None
        with one.session(resume=released.id) as restored:  # taken over from its stored snapshot, not the copy here
            assert restored.info().step == 2


def test_a_session_closed_elsewhere_while_a_server_was_cut_off_stays_closed(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """The first server loses Redis; the second takes its session over and the client closes it there, so its
    record is deleted. Back in contact, the first server must not take "no record" for "Redis lost its data"
    and record its stale copy again: the session was closed, and stays closed (NOT_FOUND) everywhere."""
    first, second = pair
    cluster, scheduler = first.server.cluster, first.server.scheduler
    assert cluster is not None and scheduler is not None
    with Client(first.address, retry=RetryPolicy(max_attempts=1)) as one, Client(second.address) as two:
        session = one.session()
        session.step([1, 2])
        session_id = session.id
        session.detach()
        first.call(first.server.checkpoint())  # written at step 2
        reconnect = cut_off_from_redis(first)
        wait_for(lambda: not redis_server.client.exists(f"lstmserve:replica:{cluster.replica}"), 60, "the key to expire")
        moved = two.session(resume=session_id)  # taken over by the second server, from the checkpoint
        assert moved.step([3]).step == 3
        moved.close()  # closed there: its record is deleted (right after the answer)
        wait_for(lambda: not redis_server.client.exists(f"lstmserve:session:{session_id}"), 60, "the record to go")
        assert first.call_soon(lambda: scheduler.sessions.find(session_id) is not None)  # the stale copy
        reconnect()
        wait_for(lambda: first.call_soon(cluster.lease_valid), 60, "the first server's lease to be valid again")
        assert first.call_soon(lambda: scheduler.sessions.find(session_id) is None)  # dropped, not recorded again
        assert not redis_server.client.exists(f"lstmserve:session:{session_id}")
        for client in (one, two):
            with pytest.raises(SessionNotFound):
                client.session(resume=session_id)
        # A closed id may be used again: the client creates a new session under it (a fresh state, step 0).
        with first.channel() as channel:
            assert create(channel, session_id).step == 0
        assert redis_server.holder(session_id) == cluster.replica
        with one.session(resume=session_id) as again:
            assert again.step([1]).step == 1


def test_a_copy_idle_past_the_ttl_is_not_recorded_again_once_its_tombstone_is_gone(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """The tombstone's bound: a server back from a long cut (or pause) whose idle sweep has not run yet records
    again only copies used within the TTL; an older one (its tombstone may have expired) is expired, not served."""
    first, second = pair
    cluster, scheduler = first.server.cluster, first.server.scheduler
    assert cluster is not None and scheduler is not None
    ttl_s = first.server.config.session_ttl_s
    with Client(first.address) as one, Client(second.address) as two:
        stale, kept = one.session(), one.session()
        stale.step([1])
        kept.step([1])
        stale.detach()
        kept.detach()
        first.call(first.server.checkpoint())
        reconnect = cut_off_from_redis(first)
        wait_for(lambda: not redis_server.client.exists(f"lstmserve:replica:{cluster.replica}"), 60, "the key to expire")
        two.session(resume=stale.id).close()  # taken over and closed by the second server
        tombstone = f"lstmserve:closed:{stale.id}"
        wait_for(lambda: bool(redis_server.client.exists(tombstone)), 60, "the tombstone")  # written after the answer
        redis_server.client.delete(tombstone)  # expired: the cut lasted longer than it

        def age() -> None:  # the copy here idle past the TTL, and the idle sweep not run yet
            scheduler.sweep_idle = lambda now=None: 0
            found = scheduler.sessions.find(stale.id)
            assert found is not None
            found.last_used -= ttl_s + 1

        first.call_soon(age)
        reconnect()
        wait_for(lambda: first.call_soon(cluster.lease_valid), 60, "the first server's lease to be valid again")
        assert first.call_soon(lambda: (scheduler.sessions.find(stale.id), scheduler.sessions.find(kept.id) is not None)) == (
            None,
            True,
        )
        assert not redis_server.client.exists(f"lstmserve:session:{stale.id}")
        assert redis_server.holder(kept.id) == cluster.replica
        with pytest.raises(SessionNotFound):
            one.session(resume=stale.id)


def test_a_closed_or_expired_session_leaves_a_tombstone_that_a_new_session_replaces(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """Closing, and expiry, leave a short-lived tombstone in Redis (so that a replica that was cut off drops its
    copy); creating a session under the same id replaces it, and a tombstoned id is never adopted."""
    first, _ = pair
    cluster, scheduler = first.server.cluster, first.server.scheduler
    assert cluster is not None and scheduler is not None
    ttl_s = first.server.config.session_ttl_s
    with Client(first.address) as client:
        closed, expired = client.session(), client.session()
        closed.step([1])
        expired.step([1])
        closed_id, expired_id = closed.id, expired.id
        closed.close()
        expired.detach()
    first.call_soon(lambda: scheduler.sweep_idle(now=time.monotonic() + ttl_s + 1))  # idle past the TTL: closed
    for session_id in (closed_id, expired_id):
        tombstone = f"lstmserve:closed:{session_id}"
        # cast: mypy cannot infer a lambda with a default argument
        wait_for(
            cast(Callable[[], bool], lambda key=tombstone: bool(redis_server.client.exists(key))), 60, "the tombstone"
        )
        assert not redis_server.client.exists(f"lstmserve:session:{session_id}")
        assert ttl_s < redis_server.client.ttl(tombstone) <= ttl_s + 60
        assert not first.call(cluster.store.adopt(session_id, ""))  # never recorded again from a stale copy
    with first.channel() as channel:
        create(channel, closed_id)
    assert not redis_server.client.exists(f"lstmserve:closed:{closed_id}")
    assert redis_server.holder(closed_id) == cluster.replica


def test_a_silent_redis_fails_store_operations_in_bounded_time() -> None:
    """A Redis that accepts connections but never answers (a silent network drop) fails each operation after
    the socket timeout, so takeovers and drain writes cannot hang on it."""
    import asyncio
    import socket

    import redis

    from lstmserve.server.session_store import SOCKET_TIMEOUT_S, RedisStore

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel's backlog; nothing is ever read or answered
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def claim() -> float:
            store = RedisStore(url, "replica-x", held_ttl_s=60, released_ttl_s=60, heartbeat_ttl_s=2)
            started = time.monotonic()
            try:
                with pytest.raises(redis.exceptions.TimeoutError):
                    await store.claim("0" * 32, "")
                return time.monotonic() - started
            finally:
                await store.close()

        elapsed = asyncio.run(claim())
    assert SOCKET_TIMEOUT_S <= elapsed < SOCKET_TIMEOUT_S + 1.0


def test_closing_deletes_the_record_through_a_redis_error(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    """A close whose record deletion meets a Redis blip deletes it on a later try: a record left held by the
    closing server would let a takeover bring the closed session back from its checkpoint."""
    first, _ = pair
    cluster = first.server.cluster
    assert cluster is not None
    failures = fail_next_calls(cluster.store, "remove", times=2)
    with Client(first.address) as client:
        session = client.session()
        session.step([1, 2])
        session_id = session.id
        session.close()
    wait_for(lambda: bool(redis_server.client.exists(f"lstmserve:closed:{session_id}")), 60, "the tombstone")
    assert not failures
    assert not redis_server.client.exists(f"lstmserve:session:{session_id}")
