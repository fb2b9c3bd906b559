"""Broken streams: a session reattaches by id and resends with expected_step, never losing or repeating a step."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import TEST_PROVIDER_NAME, ServerThread
from helpers import Tolerance, wait_until

from lstmserve.client import Cancelled, Client, LstmServeError, RetryPolicy, Unavailable
from lstmserve.client import _sync

# batched and unbatched runs agree to float32 rounding on the CPU; looser on a GPU (TF32)
TOL: Tolerance = (
    dict(rtol=1e-5, atol=1e-5) if TEST_PROVIDER_NAME == "CPUExecutionProvider" else dict(rtol=2e-3, atol=2e-3)
)
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, retry=FAST) as c:
        yield c


def server_step(server: ServerThread, session_id: str) -> int:
    """The step counter of a session, read on the server's own loop."""
    return int(server.call_soon(lambda: server.server.scheduler.sessions.get(session_id, "").step))


def wait_for_step(server: ServerThread, session_id: str, step: int) -> None:
    deadline = time.monotonic() + 60
    while server_step(server, session_id) != step:
        assert time.monotonic() < deadline, f"the server never reached step {step}: {server_step(server, session_id)}"
        time.sleep(0.002)


def reference_logits(client: Client, text: str) -> np.ndarray:
    with client.session() as session:
        logits = session.step(text).logits
    assert logits is not None
    return logits


def test_stream_dropped_between_steps(client: Client, server: ServerThread) -> None:
    expected = reference_logits(client, "hello world")
    with client.session() as session:
        session.step("hello")
        broken = session._stream
        assert broken is not None
        broken.call.cancel()
        out = session.step(" wor")
        assert session._stream is not broken  # a new stream, same session
        assert out.step == 9 and server_step(server, session.id) == 9
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[5:9], **TOL)
        out = session.step("ld")
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[9:], **TOL)


def test_lost_response_is_answered_again_not_applied_twice(
    client: Client, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server applied the step, but the stream broke before its response arrived."""
    expected = reference_logits(client, "hello world")
    original = _sync._Stream.recv
    broken: list[_sync._Stream] = []

    with client.session() as session:
        session.step("hello")

        def recv(self: _sync._Stream, timeout: float | None) -> object:
            if not broken:
                broken.append(self)
                wait_for_step(server, session.id, 9)  # applied on the server...
                self.call.cancel()  # ...and the response is lost with the stream
            return original(self, timeout)

        monkeypatch.setattr(_sync._Stream, "recv", recv)
        out = session.step(" wor")
        assert broken and session._stream is not broken[0]
        assert out.step == 9 and session.position == 9
        assert server_step(server, session.id) == 9  # not applied a second time
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[5:9], **TOL)
        out = session.step("ld")
        assert out.step == 11
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[9:], **TOL)


def test_stream_broken_before_the_request_left(
    client: Client, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = reference_logits(client, "abcdef")
    original = _sync._Stream.send
    breaks: list[int] = []

    def send(self: _sync._Stream, request: object) -> None:
        if len(breaks) < 3:  # break the first three attempts: still within the retry budget
            breaks.append(1)
            self.call.cancel()
        original(self, request)  # type: ignore[arg-type]

    with client.session() as session:
        session.step("abc")
        monkeypatch.setattr(_sync._Stream, "send", send)
        out = session.step("def")
        assert len(breaks) == 3 and out.step == 6 and server_step(server, session.id) == 6
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[3:], **TOL)


def test_retries_are_bounded(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []
    original = _sync._Stream.send

    def send(self: _sync._Stream, request: object) -> None:
        attempts.append(1)
        self.call.cancel()
        original(self, request)  # type: ignore[arg-type]

    with client.session() as session:
        session.step("ab")
        monkeypatch.setattr(_sync._Stream, "send", send)
        with pytest.raises(Cancelled):
            session.step("cd")
        assert len(attempts) == FAST.max_attempts
        monkeypatch.setattr(_sync._Stream, "send", original)
        assert session.position is None  # unknown until read back from the server
        assert session.step("cd").step == 4


def test_generation_broken_midway_resynchronises(client: Client, server: ServerThread) -> None:
    with client.session() as session:
        generation = session.generate("while ", max_tokens=200, temperature=0)
        next(generation)
        next(generation)
        assert session._stream is not None
        session._stream.call.cancel()
        with pytest.raises(LstmServeError):
            for _ in generation:
                pass
        # not resent (generation is not exactly-once on the server); the session learns its counter again, once
        # the server stopped generating (nothing queued or computing for it: its state, not a pause in the counter)
        scheduler = server.server.scheduler
        wait_until(lambda: not server.call_soon(lambda: scheduler.sessions.get(session.id, "").busy), 60, "the end")
        stable = server_step(server, session.id)
        assert 6 + 2 <= stable < 6 + 200
        assert session.step("x").step == stable + 1


def test_server_gone_raises_unavailable(token_model: object) -> None:
    from conftest import start_server

    handle = start_server(token_model)
    client = Client(handle.address, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    try:
        session = client.session()
        session.step("ab")
        handle.stop()
        with pytest.raises(Unavailable):
            session.step("c")
        with pytest.raises(Unavailable):
            session.info()
    finally:
        client.close()
