"""The synchronous client against a real server: every public method, state, generation and errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from conftest import TEST_PROVIDER_NAME, ServerThread, start_server
from helpers import Tolerance

import lstmserve.client as client_pkg
from lstmserve.client import (
    Client,
    Completion,
    DeadlineExceeded,
    FailedPrecondition,
    GeneratedToken,
    InvalidRequest,
    LstmServeError,
    ModelInfo,
    NotSteppable,
    RetryPolicy,
    ServerBusy,
    SessionInfo,
    SessionNotFound,
    StepMismatch,
    StepOutput,
    Unavailable,
    Vocabulary,
)

# batched and unbatched runs agree to float32 rounding on the CPU; looser on a GPU (TF32)
TOL: Tolerance = (
    dict(rtol=1e-5, atol=1e-5) if TEST_PROVIDER_NAME == "CPUExecutionProvider" else dict(rtol=2e-3, atol=2e-3)
)
PUBLIC = [
    "AsyncClient",
    "AsyncGeneration",
    "AsyncSession",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GeneratedToken",
    "Generation",
    "InvalidRequest",
    "LstmServeError",
    "ModelInfo",
    "NotSteppable",
    "PermissionDenied",
    "RetryPolicy",
    "ServerBusy",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "StepMismatch",
    "StepOutput",
    "Unauthenticated",
    "Unavailable",
    "Vocabulary",
]


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


def _greedy_text(client: Client, prompt: str, n: int) -> list[int]:
    """Greedy decoding done client-side: step(output="logits") + argmax."""
    with client.session() as session:
        out = session.step(prompt)
        tokens = []
        for _ in range(n):
            assert out.logits is not None
            token = int(np.argmax(out.logits[-1]))
            tokens.append(token)
            out = session.step(token)
        return tokens


# ---- the public surface ----------------------------------------------------
def test_all_is_pinned_and_documented() -> None:
    assert client_pkg.__all__ == PUBLIC
    for name in PUBLIC:
        value = getattr(client_pkg, name)
        assert value.__doc__ and value.__doc__.strip(), name
    for cls in (client_pkg.Client, client_pkg.Session, client_pkg.AsyncClient, client_pkg.AsyncSession):
        for attr, member in vars(cls).items():
            if not attr.startswith("_") and callable(member):
                assert member.__doc__, f"{cls.__name__}.{attr}"
    with pytest.raises(AttributeError):
        client_pkg.NoSuchName  # noqa: B018


def test_no_protobuf_in_returned_values(client: Client) -> None:
    info = client.model_info()
    with client.session() as session:
        out = session.step("ab")
        items = list(session.generate("a", max_tokens=2, temperature=0))
        values = [info, session.info(), out, *items, info.vocabulary]
    for value in values:
        assert not type(value).__module__.startswith("lstmserve.v1"), value
        assert "google.protobuf" not in type(value).__module__


# ---- model info --------------------------------------------------------------
def test_model_info(client: Client, server: ServerThread) -> None:
    info = client.model_info()
    spec = server.server.runner.spec
    assert isinstance(info, ModelInfo)
    assert info.kind == "tokens" and info.head == "language_model"
    assert info.vocabulary.pieces == tuple(spec.vocabulary)
    assert len(info.vocabulary) == info.output_size == spec.output_size
    assert (info.hidden_size, info.num_layers, info.input_size) == (spec.hidden_size, spec.num_layers, spec.input_size)
    assert info.num_directions == 1 and not info.bidirectional and info.steppable
    assert info.provider == TEST_PROVIDER_NAME
    assert info.fingerprint == spec.fingerprint
    config = server.server.config
    assert info.max_tokens_per_request == config.max_tokens_per_request
    assert info.max_generate_tokens == config.max_generate_tokens
    assert info.max_sessions == config.max_sessions and info.session_ttl_s == config.session_ttl_s
    with pytest.raises(AttributeError):  # frozen
        info.kind = "features"  # type: ignore[misc]


def test_vocabulary_encode_decode(client: Client) -> None:
    vocabulary = client.model_info().vocabulary
    ids = vocabulary.encode("hello world\n")
    assert len(ids) == 12 and vocabulary.decode(ids) == "hello world\n"
    assert [vocabulary[i] for i in ids] == list("hello world\n")
    with pytest.raises(ValueError, match=r"character '€' at position 3"):
        vocabulary.encode("abc€d")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocabulary.decode([len(vocabulary)])


def test_vocabulary_longest_match_and_empty() -> None:
    vocabulary = Vocabulary(("a", "ab", "b", "abc", "a"))
    assert vocabulary.encode("abcab") == [3, 1]
    assert vocabulary.encode("ba") == [2, 0]  # first id of a repeated piece
    with pytest.raises(ValueError, match="no vocabulary"):
        Vocabulary(()).encode("x")


# ---- stepping ----------------------------------------------------------------
def test_state_carries_across_steps(client: Client) -> None:
    with client.session() as chunked, client.session() as whole:
        first = chunked.step("hel")
        second = chunked.step("lo")
        third = chunked.step(client.model_info().vocabulary.encode(" w")[0])
        reference = whole.step("hello w")
    assert isinstance(first, StepOutput)
    assert first.logits is not None and second.logits is not None and third.logits is not None
    assert reference.logits is not None
    assert first.logits.dtype == np.float32 and first.logits.shape == (3, client.model_info().output_size)
    assert (first.step, second.step, third.step, reference.step) == (3, 5, 6, 7)
    np.testing.assert_allclose(np.concatenate([first.logits, second.logits]), reference.logits[:5], **TOL)
    # the 7th position of the whole sequence (" w" is two tokens; only " " was fed as the 6th)
    np.testing.assert_allclose(third.logits[0], reference.logits[5], **TOL)
    assert first.batch_size >= 1
    assert first.topk_ids is None and first.token is None


def test_token_forms_are_equivalent(client: Client) -> None:
    ids = client.model_info().vocabulary.encode("abc")
    outs = []
    for tokens in ("abc", ids, np.array(ids, dtype=np.int32), tuple(ids)):
        with client.session() as session:
            outs.append(session.step(tokens).logits)
    for logits in outs[1:]:
        np.testing.assert_array_equal(logits, outs[0])
    with client.session() as a, client.session() as b:
        np.testing.assert_array_equal(a.step(ids[0]).logits, b.step([ids[0]]).logits)
        with pytest.raises(ValueError):
            a.step([])
        with pytest.raises(TypeError):
            a.step([1.5, 2.0])  # type: ignore[list-item]  # deliberately not ints: the client refuses them
        with pytest.raises(ValueError, match="exactly one"):
            a.step()
        with pytest.raises(ValueError, match="output"):
            a.step(1, output="probabilities")  # type: ignore[arg-type]


def test_output_kinds(client: Client) -> None:
    with client.session() as logits_session, client.session() as other:
        full = logits_session.step("the c")
        topk = other.step("the c", output="topk", k=4)
    assert full.logits is not None and topk.logits is None
    assert topk.topk_ids is not None and topk.topk_logprobs is not None
    assert topk.topk_ids.shape == (5, 4) and topk.topk_logprobs.shape == (5, 4)
    expected_ids = np.argsort(-full.logits, axis=1)[:, :4]
    np.testing.assert_array_equal(topk.topk_ids, expected_ids)
    shifted = full.logits - full.logits.max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(topk.topk_logprobs, np.take_along_axis(logprobs, expected_ids, axis=1), atol=1e-4)

    with client.session() as greedy, client.session() as none:
        sampled = greedy.step("the c", output="sample", temperature=0)
        nothing = none.step("the c", output="none")
        assert sampled.token == int(np.argmax(full.logits[-1])) and sampled.logits is None
        assert nothing.step == 5 and nothing.logits is None and nothing.token is None and nothing.topk_ids is None
        # "none" still feeds the state
        fed = none.step("a")
        assert fed.logits is not None
        np.testing.assert_allclose(fed.logits, logits_session_after(client, "the ca"), **TOL)
    # a seeded sample from the same state is the same token
    drawn = []
    for _ in range(2):
        with client.session() as session:
            drawn.append([session.step("x", output="sample", seed=7).token for _ in range(5)])
    assert drawn[0] == drawn[1]


def logits_session_after(client: Client, text: str) -> np.ndarray:
    with client.session() as session:
        logits = session.step(text).logits
        assert logits is not None
        return logits[-1:]


def test_reset_info_close(client: Client) -> None:
    session = client.session()
    fresh = session.step("abc").logits
    session.step("xyz")
    info = session.info()
    assert isinstance(info, SessionInfo)
    assert info.id == session.id and info.step == 6 and session.position == 6
    assert 0 <= info.idle_s < 5 and 0 < info.expires_in_s <= client.model_info().session_ttl_s
    reset = session.reset()
    assert reset.step == 0 and session.position == 0
    np.testing.assert_array_equal(session.step("abc").logits, fresh)
    session.close()
    assert session.closed
    session.close()  # idempotent
    with pytest.raises(SessionNotFound):
        client.session(resume=session.id)
    with pytest.raises(RuntimeError, match="closed"):
        session.step("a")


def test_context_manager_closes_new_but_not_resumed(client: Client) -> None:
    with client.session() as session:
        session.step("ab")
        session_id = session.id
    with pytest.raises(SessionNotFound):
        client.session(resume=session_id)

    kept = client.session()
    kept.step("ab")
    with client.session(resume=kept.id) as resumed:
        assert resumed.position == 2
    assert kept.info().step == 2  # still alive after leaving the resumed block
    with client.session(resume=kept.id, close_on_exit=True):
        pass
    with pytest.raises(SessionNotFound):
        kept.info()


def test_resume_from_a_second_client(client: Client, server: ServerThread) -> None:
    with client.session() as reference:
        expected = reference.step("hello there").logits
    assert expected is not None
    first = client.session()
    first.step("hello")
    first.detach()
    with Client(server.address) as other, other.session(resume=first.id) as resumed:
        assert resumed.position == 5
        out = resumed.step(" there")
        assert out.step == 11
        assert out.logits is not None
        np.testing.assert_allclose(out.logits, expected[5:], **TOL)
    # the first object continues from where the other client left off: its counter is stale,
    # so its next step is refused (no silent double application) and then resynchronised
    with pytest.raises(StepMismatch) as caught:
        first.step("!")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "expected_step 5" in caught.value.details
    assert isinstance(caught.value, FailedPrecondition)
    assert first.step("!").step == 12
    first.close()


def test_infer_matches_a_session(client: Client) -> None:
    logits = client.infer("some text")
    with client.session() as session:
        out = session.step("some text")
        assert out.logits is not None
        np.testing.assert_allclose(logits, out.logits, **TOL)
    with pytest.raises(ValueError):
        client.infer()


def test_concurrent_sessions_on_threads(client: Client) -> None:
    texts = [f"thread {i} says hi" for i in range(8)]
    expected = [logits_session_after(client, text) for text in texts]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with client.session() as session:
                out = None
                for ch in texts[i]:
                    out = session.step(ch)
                assert out is not None and out.logits is not None
                results[i] = out.logits
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, logits in results.items():
        np.testing.assert_allclose(logits, expected[i], **TOL)
    assert len(results) == len(texts)


# ---- generation ----------------------------------------------------------------
def test_greedy_generate_equals_client_side_greedy(client: Client) -> None:
    expected = _greedy_text(client, "def ", 24)
    with client.session() as session:
        generation = session.generate("def ", max_tokens=24, temperature=0)
        items = list(generation)
        assert all(isinstance(item, GeneratedToken) for item in items)
        assert [item.token for item in items] == expected
        vocabulary = client.model_info().vocabulary
        assert generation.text == vocabulary.decode(expected) == "".join(item.text for item in items)
        assert generation.finish_reason == "length" and generation.step == 4 + 24
        assert session.position == 28 and session.info().step == 28
        # the session continues from the end of the generation
        follow = session.step("x").logits
        assert follow is not None
    np.testing.assert_allclose(follow, logits_session_after(client, "def " + vocabulary.decode(expected) + "x"), **TOL)


def test_seeded_generate_is_reproducible(client: Client) -> None:
    def run(seed: int) -> Completion:
        with client.session() as session:
            return session.complete("import ", max_tokens=30, temperature=1.0, top_p=0.95, seed=seed)

    first, again, other = run(1234), run(1234), run(99)
    assert first == again
    assert first.tokens != other.tokens
    assert first.finish_reason == "length" and len(first.tokens) == 30 and first.step == 37
    with client.session() as session:
        top1 = session.complete("import ", max_tokens=10, temperature=1.0, top_k=1)
    assert list(top1.tokens) == _greedy_text(client, "import ", 10)


def test_stop_strings(client: Client) -> None:
    with client.session() as session:
        full = session.complete("class ", max_tokens=40, seed=5)  # seeded: the same tokens every time
    text = full.text
    cut = next(i for i in range(1, len(text)) if text[i] != text[0])  # a stop string that does not start at 0
    stop = text[cut : cut + 2]
    expected = text[: text.find(stop)]
    with client.session() as session:
        stopped = session.complete("class ", max_tokens=40, seed=5, stop=["\x00never", stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == expected
    assert stop not in stopped.text


def test_abandoned_generation_is_finished_before_the_next_call(client: Client) -> None:
    with client.session() as session:
        generation = session.generate("for ", max_tokens=12, temperature=0)
        first = next(generation)
        assert isinstance(first, GeneratedToken)
        out = session.step("x")  # reads the rest of the generation first
        assert out.step == 4 + 12 + 1
        with pytest.raises(RuntimeError, match="ended early"):
            next(generation)
        never_started = session.generate("a", max_tokens=3, temperature=0)
        assert session.step("y").step == 18
        assert len(list(never_started)) == 3 and never_started.step == 22


def test_generate_errors(client: Client) -> None:
    limit = client.model_info().max_generate_tokens
    with client.session() as session:
        session.step("ab")
        with pytest.raises(InvalidRequest, match="max_tokens"):
            list(session.generate("a", max_tokens=limit + 1))
        with pytest.raises(ValueError):
            session.generate("", max_tokens=3)
        for temperature in (-1.0, float("nan"), float("inf")):  # refused here, before any request is sent
            with pytest.raises(ValueError, match=f"temperature must be a finite number >= 0, got {temperature}"):
                session.generate("a", max_tokens=3, temperature=temperature)
        assert session.step("c").step == 3  # the failed generation changed nothing


# ---- errors --------------------------------------------------------------------
def test_unknown_session(client: Client) -> None:
    with pytest.raises(SessionNotFound) as caught:
        client.session(resume="0" * 32)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "0" * 32 in caught.value.details
    assert isinstance(caught.value, LstmServeError) and str(caught.value).startswith("NOT_FOUND: ")


def test_invalid_token_keeps_the_session_usable(client: Client) -> None:
    with client.session() as reference:
        expected = reference.step("abcd").logits
    with client.session() as session:
        session.step("ab")
        with pytest.raises(InvalidRequest) as caught:
            session.step([3, 999_999])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "999999" in caught.value.details
        assert isinstance(caught.value, ValueError)
        assert session.position == 2
        out = session.step("cd")  # on a new stream, with the state intact
        assert out.step == 4
        assert out.logits is not None and expected is not None
        np.testing.assert_allclose(out.logits, expected[2:], **TOL)


def test_too_many_tokens_and_max_sessions(token_model: Path) -> None:
    handle = start_server(token_model, max_tokens_per_request=8, max_sessions=2)
    try:
        with Client(handle.address) as client:
            one, two = client.session(), client.session()
            with pytest.raises(InvalidRequest, match="max_tokens_per_request=8"):
                one.step(list(range(9)))
            assert one.step(list(range(8))).step == 8
            with pytest.raises(ServerBusy) as caught:
                client.session()
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            two.close()
            client.session().close()  # the freed slot is usable again
            one.close()
    finally:
        handle.stop()


def test_bidirectional_model_is_not_steppable(bidirectional_model: Path) -> None:
    handle = start_server(bidirectional_model)
    try:
        with Client(handle.address) as client:
            info = client.model_info()
            assert info.bidirectional and not info.steppable and info.num_directions == 2
            with pytest.raises(NotSteppable) as caught:
                client.session()
            assert isinstance(caught.value, FailedPrecondition)
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            logits = client.infer("abc")
            assert logits.shape == (3, info.output_size)
    finally:
        handle.stop()


def test_expired_session(token_model: Path) -> None:
    handle = start_server(token_model, session_ttl_s=60.0)
    try:
        with Client(handle.address) as client:
            session = client.session()
            session.step("ab")
            expired = handle.call_soon(lambda: handle.server.scheduler.sweep_idle(now=time.monotonic() + 10**6))
            assert expired == 1
            with pytest.raises(SessionNotFound, match="not found"):
                session.step("c")
            with pytest.raises(SessionNotFound):
                session.info()
            session.close()  # closing an expired session is not an error
    finally:
        handle.stop()


def test_feature_model(feature_model: Path) -> None:
    handle = start_server(feature_model)
    try:
        with Client(handle.address) as client:
            info = client.model_info()
            assert info.kind == "features" and len(info.vocabulary) == 0
            rng = np.random.default_rng(0)
            rows = rng.standard_normal((5, info.input_size)).astype(np.float32)
            with client.session() as whole, client.session() as stepped:
                expected = whole.step(features=rows).logits
                assert expected is not None and expected.shape == (5, info.output_size)
                parts = [stepped.step(features=rows[:3]).logits, stepped.step(features=rows[3]).logits]
                np.testing.assert_allclose(np.concatenate(cast("list[np.ndarray]", parts)), expected[:4], **TOL)
                assert stepped.position == 4
                with pytest.raises(InvalidRequest, match="features shape"):
                    stepped.step(features=np.zeros((2, info.input_size + 1), np.float32))
                with pytest.raises(InvalidRequest, match="tokens"):
                    stepped.step([1, 2])
                with pytest.raises(ValueError, match="no vocabulary"):
                    stepped.step("text")
                with pytest.raises(InvalidRequest, match="token model"):
                    list(stepped.generate([1], max_tokens=2))
                np.testing.assert_allclose(client.infer(features=rows), expected, **TOL)
    finally:
        handle.stop()


def test_deadline_exceeded() -> None:
    import socket

    with socket.socket() as black_hole:  # accepts connections and never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen()
        target = f"127.0.0.1:{black_hole.getsockname()[1]}"
        started = time.monotonic()
        with Client(target, timeout=0.3) as client:
            with pytest.raises(DeadlineExceeded) as caught:
                client.model_info()
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5


def test_unreachable_server_is_unavailable_after_bounded_retries() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as client:
        with pytest.raises(Unavailable) as caught:
            client.model_info()
        with pytest.raises(Unavailable):
            client.session()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 20


def test_metadata_and_retry_policy_validation(server: ServerThread) -> None:
    with Client(server.address, metadata=[("X-Tenant", "test")]) as client:
        assert client.model_info().kind == "tokens"
        with client.session() as session:
            assert session.step("a").step == 1
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2)
    assert 0.05 <= policy.delay(1) <= 0.1 and 0.15 <= policy.delay(3) <= 0.3 and policy.delay(10) <= 0.3
