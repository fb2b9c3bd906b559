"""The asyncio client against a real server: every method, many concurrent sessions, errors, reattach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from conftest import TEST_PROVIDER_NAME, ServerThread
from helpers import Tolerance

from lstmserve.client import (
    AsyncClient,
    AsyncGeneration,
    AsyncSession,
    Client,
    GeneratedToken,
    InvalidRequest,
    ModelInfo,
    RetryPolicy,
    SessionInfo,
    SessionNotFound,
    StepMismatch,
)
from lstmserve.client import _async

T = TypeVar("T")
# batched and unbatched runs agree to float32 rounding on the CPU; looser on a GPU (TF32)
TOL: Tolerance = (
    dict(rtol=1e-5, atol=1e-5) if TEST_PROVIDER_NAME == "CPUExecutionProvider" else dict(rtol=2e-3, atol=2e-3)
)
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def reference_logits(server: ServerThread, texts: list[str]) -> list[np.ndarray]:
    """Each text fed to its own fresh session by the sync client, one at a time."""
    results = []
    with Client(server.address) as client:
        for text in texts:
            with client.session() as session:
                logits = session.step(text).logits
                assert logits is not None
                results.append(logits)
    return results


def test_every_method(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            info = await client.model_info()
            assert isinstance(info, ModelInfo) and info.kind == "tokens" and info.steppable
            session = client.session()
            assert isinstance(session, AsyncSession)
            with pytest.raises(RuntimeError, match="not open"):
                session.id  # noqa: B018
            async with session:
                out = await session.step("hello")
                assert out.step == 5 and out.logits is not None and out.logits.shape == (5, info.output_size)
                topk = await session.step(" ", output="topk", k=3)
                assert topk.topk_ids is not None and topk.topk_ids.shape == (1, 3)
                assert (await session.step("a", output="none")).step == 7
                sampled = await session.step("b", output="sample", temperature=0)
                assert sampled.token is not None and sampled.step == 8
                generation = await session.generate("c", max_tokens=5, temperature=0)
                assert isinstance(generation, AsyncGeneration)
                items = [item async for item in generation]
                assert len(items) == 5 and all(isinstance(i, GeneratedToken) for i in items)
                assert generation.finish_reason == "length" and generation.step == 14
                completion = await session.complete("d", max_tokens=3, temperature=0)
                assert len(completion.tokens) == 3 and completion.step == 18
                details = await session.info()
                assert isinstance(details, SessionInfo) and details.step == 18 and details.id == session.id
                assert (await session.reset()).step == 0 and session.position == 0
                again = await session.step("hello")
                np.testing.assert_array_equal(again.logits, out.logits)
                session_id = session.id
            assert session.closed
            with pytest.raises(SessionNotFound):
                await client.session(resume=session_id)
            logits = await client.infer("hello")
            np.testing.assert_allclose(logits, out.logits, **TOL)

    run(main())


def test_32_concurrent_sessions_match_sequential_runs(server: ServerThread) -> None:
    texts = [f"session {i:02d}: the quick brown fox"[: 20 + i % 7] for i in range(32)]
    expected = reference_logits(server, texts)

    async def one(client: AsyncClient, text: str) -> tuple[np.ndarray, int]:
        async with client.session() as session:
            chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
            outs = [await session.step(chunk) for chunk in chunks]
            assert outs[-1].step == len(text)
            logits = np.concatenate([o.logits for o in outs])
            return logits, max(o.batch_size for o in outs)

    async def main() -> list[tuple[np.ndarray, int]]:
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(*(one(client, text) for text in texts))

    results = run(main())
    for (logits, _), reference in zip(results, expected, strict=True):
        np.testing.assert_allclose(logits, reference, **TOL)
    assert max(batch for _, batch in results) > 1  # the server really batched sessions together


def test_errors_and_recovery(server: ServerThread) -> None:
    expected = reference_logits(server, ["abcd"])[0]

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(SessionNotFound):
                await client.session(resume="f" * 32)
            session = await client.session()
            await session.step("ab")
            with pytest.raises(InvalidRequest, match="123456"):
                await session.step([123456])
            out = await session.step("cd")
            assert out.step == 4
            assert out.logits is not None
            np.testing.assert_allclose(out.logits, expected[2:], **TOL)
            # another client moves the session: this object's counter is stale, the step is refused
            other = await client.session(resume=session.id)
            await other.step("e")
            await other.detach()
            with pytest.raises(StepMismatch) as caught:
                await session.step("f")
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert (await session.step("f")).step == 6
            await session.close()
            await session.close()

    run(main())


def test_reattach_after_dropped_and_lost_responses(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = reference_logits(server, ["hello world!"])[0]

    def server_step(session_id: str) -> int:
        return int(server.call_soon(lambda: server.server.scheduler.sessions.get(session_id, "").step))

    async def main() -> None:
        async with AsyncClient(server.address, retry=FAST) as client:
            async with client.session() as session:
                await session.step("hello")
                assert session._stream is not None
                session._stream.call.cancel()  # dropped between steps
                out = await session.step(" wo")
                assert out.step == 8 and server_step(session.id) == 8
                assert out.logits is not None
                np.testing.assert_allclose(out.logits, expected[5:8], **TOL)

                original = _async._AsyncStream.recv
                broken: list[object] = []

                async def recv(self: _async._AsyncStream, timeout: float | None) -> object:
                    if not broken:
                        broken.append(self)
                        deadline = time.monotonic() + 60
                        while server_step(session.id) != 11:  # applied on the server...
                            assert time.monotonic() < deadline
                            await asyncio.sleep(0.002)
                        self.call.cancel()  # ...and its response lost
                    return await original(self, timeout)

                monkeypatch.setattr(_async._AsyncStream, "recv", recv)
                out = await session.step("rld")
                assert broken and out.step == 11 and server_step(session.id) == 11
                assert out.logits is not None
                np.testing.assert_allclose(out.logits, expected[8:11], **TOL)
                out = await session.step("!")
                assert out.step == 12
                assert out.logits is not None
                np.testing.assert_allclose(out.logits, expected[11:], **TOL)

    run(main())


def test_cancelled_task_leaves_the_session_usable(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as client:
            async with client.session() as session:
                await session.step("ab")
                generation = await session.generate("c", max_tokens=4000, temperature=0)

                async def consume() -> None:
                    async for _ in generation:
                        pass

                task = asyncio.create_task(consume())
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert session.position is None
                # wait until the server stopped generating (nothing queued or computing for the session: the
                # server's own state, not a pause in the counter), then continue from its counter
                scheduler = server.server.scheduler
                assert scheduler is not None
                deadline = time.monotonic() + 60
                while server.call_soon(lambda: scheduler.sessions.get(session.id, "").busy):
                    assert time.monotonic() < deadline, "the server never stopped generating"
                    await asyncio.sleep(0.02)
                info = await session.info()
                assert (await session.step("x")).step == info.step + 1

    run(main())
