"""Server-side generation and sampling."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from conftest import ServerThread
from helpers import SyncStream, logits_of

from lstmserve.bench.engine import build_engine
from lstmserve.server.errors import InvalidInput, ServeError
from lstmserve.server.generation import GeneratedToken, GenerateParams, Generation, TokenChunk, Wakeup, generate
from lstmserve.server.stops import StopMatcher
from lstmserve.server.sampling import Sampler, SamplingParams, sampler_for, top_k_logprobs
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


def _generate(server: ServerThread, prompt: list[int], **generate: object) -> tuple[list[pb.StepResponse], str]:
    with server.channel() as channel:
        stream = SyncStream(channel)
        stream.send(tokens=prompt, generate=pb.Generate(**generate))  # type: ignore[arg-type]
        responses = []
        while True:
            response = stream.read()
            responses.append(response)
            if response.finished:
                break
        stream.close()
    return responses, responses[0].session_id


def test_greedy_generation_equals_client_side_greedy_decoding(server: ServerThread) -> None:
    prompt = [1, 2, 3]
    responses, _ = _generate(server, prompt, max_tokens=12, sampling=pb.Sampling(temperature=0))
    generated = [r.token for r in responses if not r.finished]
    assert len(generated) == 12 and responses[-1].finish_reason == "length"
    with server.channel() as channel:
        stream = SyncStream(channel)
        logits = logits_of(stream.request(tokens=prompt))
        expected = []
        for _ in range(12):
            token = int(np.argmax(logits[-1]))
            expected.append(token)
            logits = logits_of(stream.request(tokens=[token]))
        stream.close()
    assert generated == expected


def test_generation_with_a_seed_is_reproducible_and_consumes_its_tokens(server: ServerThread) -> None:
    sampling = pb.Sampling(temperature=1.0, top_k=5, top_p=0.9, seed=123)
    first, session_id = _generate(server, [4, 5], max_tokens=20, sampling=sampling)
    second, _ = _generate(server, [4, 5], max_tokens=20, sampling=sampling)
    assert [r.token for r in first] == [r.token for r in second]
    assert first[-1].step == 2 + 20  # prompt and every generated token were fed
    vocabulary = server.server.runner.spec.vocabulary
    assert all(r.text == vocabulary[r.token] for r in first if not r.finished)


def test_stop_string_ends_generation_and_is_not_returned(server: ServerThread) -> None:
    sampling = pb.Sampling(temperature=0)
    free, _ = _generate(server, [1], max_tokens=30, sampling=sampling)
    text = "".join(r.text for r in free if not r.finished)
    stop = text[5:7]  # a piece the greedy continuation is known to produce
    stopped, _ = _generate(server, [1], max_tokens=30, sampling=sampling, stop=[stop])
    stopped_text = "".join(r.text for r in stopped if not r.finished)
    assert stopped[-1].finish_reason == "stop"
    assert stopped_text == text[: text.find(stop)]


def _tokens_of(responses: list[pb.StepResponse]) -> tuple[list[int], str]:
    """The generated tokens and text, from either response form."""
    tokens: list[int] = []
    text = ""
    for response in responses:
        if response.tokens:
            tokens += list(response.tokens)
            text += "".join(response.texts)
        elif not response.finished:
            tokens.append(response.token)
            text += response.text
    return tokens, text


def test_concurrent_coalesced_generations_each_equal_their_solo_run(server: ServerThread) -> None:
    """160 generations batched together (sampled together, several tokens per response) get
    exactly the tokens each would get alone, while other sessions are reset and closed in
    between; the final response reports the step after every token."""
    kinds = [([1 + i % 5, 2], pb.Sampling(temperature=1.0 if i % 3 else 0.0, top_k=i % 4 * 5, seed=i)) for i in range(16)]
    solo = [_tokens_of(_generate(server, prompt, max_tokens=40, sampling=sampling)[0]) for prompt, sampling in kinds]
    jobs = [i % len(kinds) for i in range(160)]
    results: list[list[pb.StepResponse] | None] = [None] * len(jobs)
    done = threading.Event()
    bystander_errors: list[str] = []

    def run(index: int) -> None:
        prompt, sampling = kinds[jobs[index]]
        results[index] = _generate(server, prompt, max_tokens=40, sampling=sampling, coalesce=True)[0]

    def bystander() -> None:  # lifecycle operations between the batches of the generations
        with server.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            control = logits_of(SyncStream(channel).request(tokens=[3, 4]))
            while not done.is_set():
                stream = SyncStream(channel)
                first = stream.request(tokens=[9])
                stub.ResetSession(pb.SessionRef(session_id=first.session_id))
                if not np.array_equal(logits_of(stream.request(tokens=[3, 4])), control):
                    bystander_errors.append("a reset session did not start from zeros")
                stub.CloseSession(pb.SessionRef(session_id=first.session_id))
                stream.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    side = threading.Thread(target=bystander)
    side.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    side.join(30)
    assert not bystander_errors
    for kind, responses in zip(jobs, results, strict=True):
        assert responses is not None
        prompt, _ = kinds[kind]
        assert _tokens_of(responses) == solo[kind]
        assert responses[-1].finished and responses[-1].finish_reason == "length"
        assert responses[-1].step == len(prompt) + 40
        assert sum(len(r.tokens) for r in responses) == 40 and all(r.token == 0 for r in responses)
    assert max(r.batch_size for responses in results if responses for r in responses) > 1


def test_a_reader_that_falls_far_behind_gets_every_token_in_order(server: ServerThread) -> None:
    """A client that reads nothing until the server has made all of 4,000 tokens, one response each (more than
    HTTP/2 flow control lets the server send unread, and than a token log row holds: the stream's tokens wait
    there, then in its generation's own list), gets the same tokens and steps as a client that reads at once."""
    prompt, sampling, count = [3, 1], pb.Sampling(temperature=1.0, seed=77), 4000
    read_at_once, _ = _generate(server, prompt, max_tokens=count, sampling=sampling)
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        stream = SyncStream(channel)
        stream.send(tokens=prompt, generate=pb.Generate(max_tokens=count, sampling=sampling))
        responses = [stream.read()]  # the first token: the session exists
        for _ in range(600):  # the generation runs on while nothing is read (at most a minute)
            if stub.GetSession(pb.SessionRef(session_id=responses[0].session_id)).step == len(prompt) + count:
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail("the generation did not finish while its reader waited")
        while not responses[-1].finished:
            responses.append(stream.read())
        stream.close()
    assert [(r.token, r.step) for r in responses] == [(r.token, r.step) for r in read_at_once]
    assert len(responses) == count + 1 and responses[-1].finish_reason == "length"


def test_two_generations_on_one_session_at_once_each_make_their_own_tokens(server: ServerThread) -> None:
    """Two Generate requests on one session, sent together, run interleaved: each gets exactly its max_tokens
    and the session consumes both prompts and every token of both."""
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        streams = [SyncStream(channel), SyncStream(channel)]
        jobs = [([1, 2], 300), ([5], 200)]
        for stream, (prompt, count) in zip(streams, jobs):
            stream.send(session_id=session_id, tokens=prompt, generate=pb.Generate(max_tokens=count, coalesce=True))
        for stream, (_, count) in zip(streams, jobs):
            responses = [stream.read()]
            while not responses[-1].finished:
                responses.append(stream.read())
            stream.close()
            assert sum(len(r.tokens) for r in responses) == count and responses[-1].finish_reason == "length"
        assert stub.GetSession(pb.SessionRef(session_id=session_id)).step == 2 + 300 + 1 + 200


def test_a_generation_whose_client_left_is_forgotten_by_the_token_log(token_model: Path) -> None:
    """A client reads one chunk of a long generation and goes away: the token log no longer names the
    generation as its slot's owner (which would keep it, and every token it held, alive after the session
    closed), and the generation holds no tokens."""

    async def body() -> tuple[object, int]:
        engine = build_engine(token_model, max_sessions=4)
        scheduler = engine.scheduler
        scheduler.start()
        try:
            session = scheduler.create_session()
            params = GenerateParams(max_tokens=4000, sampling=SamplingParams(temperature=1.0, seed=1))
            chunks = generate(scheduler, session, np.array([1], np.int64), params, engine.spec.vocabulary)
            await anext(chunks)
            generation = scheduler.batcher.token_log.owner(session.slot)  # the row is its while it runs
            assert isinstance(generation, Generation)
            await chunks.aclose()
            await scheduler.close_session(session.id)
            return scheduler.batcher.token_log.owner(session.slot), len(generation.take())
        finally:
            await scheduler.close()

    owner_after, held_after = asyncio.run(body())
    assert owner_after is None and held_after == 0


def test_the_count_of_running_generations_comes_back_to_zero(token_model: Path) -> None:
    """The batcher sizes coalesced responses by how many generations run: one refused (a wrong expected step),
    one that ran to its end and one whose client left after its first chunk each leave the count as it was."""

    async def body() -> list[int]:
        engine = build_engine(token_model, max_sessions=4)
        scheduler = engine.scheduler
        scheduler.start()
        counts: list[int] = []

        async def count() -> None:  # after the callbacks the last step's answer scheduled (one turn of the loop)
            await asyncio.sleep(0)
            counts.append(scheduler.batcher.generating)

        try:
            session = scheduler.create_session()
            params = GenerateParams(max_tokens=3, sampling=SamplingParams(temperature=0.0))
            prompt, vocabulary = np.array([1], np.int64), engine.spec.vocabulary
            with pytest.raises(ServeError, match="expected_step 7"):
                await anext(generate(scheduler, session, prompt, params, vocabulary, expected_step=7))
            await count()
            finished = [chunk async for chunk in generate(scheduler, session, prompt, params, vocabulary)]
            await count()
            long = GenerateParams(max_tokens=4000, sampling=SamplingParams(temperature=1.0))
            chunks = generate(scheduler, session, prompt, long, vocabulary)
            await anext(chunks)
            await count()  # running
            await chunks.aclose()
            await scheduler.close_session(session.id)
            await count()
            counts.append(sum(len(chunk.tokens) for chunk in finished))
        finally:
            await scheduler.close()
        return counts

    assert asyncio.run(body()) == [0, 0, 1, 0, 3]


def test_sample_output_returns_a_token_without_feeding_it(server: ServerThread) -> None:
    with server.channel() as channel:
        stream = SyncStream(channel)
        logits = logits_of(stream.request(tokens=[1, 2]))
        sampled = stream.request(tokens=[3], output=pb.OUTPUT_SAMPLE, sampling=pb.Sampling(temperature=0))
        topk = stream.request(tokens=[3], output=pb.OUTPUT_TOPK, top_k=3)
        none = stream.request(tokens=[3], output=pb.OUTPUT_NONE)
        stream.close()
    assert sampled.step == 3 and sampled.logits.data == b""
    assert len(topk.topk) == 1 and len(topk.topk[0].ids) == 3
    assert list(topk.topk[0].logprobs) == sorted(topk.topk[0].logprobs, reverse=True)
    assert none.step == 5 and none.logits.data == b"" and not none.topk
    assert logits.shape == (2, len(server.server.runner.spec.vocabulary))


# ---- units: sampling and stop strings -------------------------------------
def test_greedy_sampler_is_argmax() -> None:
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float64)).astype(np.float32)
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {top_k.sample(logits) for _ in range(300)} == {0, 1}
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {top_p.sample(logits) for _ in range(300)} == {0, 1}
    free = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert {free.sample(logits) for _ in range(2000)} == {0, 1, 2, 3}


def test_seeded_sampler_is_reproducible() -> None:
    logits = np.zeros(50, np.float32)
    draws = [[Sampler(SamplingParams(seed=5)).sample(logits) for _ in range(1)] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    sampler_a, sampler_b = Sampler(SamplingParams(seed=9)), Sampler(SamplingParams(seed=9))
    assert [sampler_a.sample(logits) for _ in range(20)] == [sampler_b.sample(logits) for _ in range(20)]


def test_requests_without_a_seed_share_a_sampler_and_seeded_ones_get_their_own() -> None:
    assert sampler_for(SamplingParams(temperature=0.5, top_k=3)) is sampler_for(SamplingParams(temperature=0.5, top_k=3))
    assert sampler_for(SamplingParams(temperature=0.5)) is not sampler_for(SamplingParams(temperature=0.7))
    seeded = SamplingParams(seed=9)
    logits = np.zeros(50, np.float32)
    first, second = sampler_for(seeded), sampler_for(seeded)
    assert first is not second
    assert [first.sample(logits) for _ in range(20)] == [second.sample(logits) for _ in range(20)]


def test_only_a_generation_with_a_real_stop_string_passes_its_tokens_through_a_matcher() -> None:
    loop = asyncio.new_event_loop()

    def uses_log(stop: tuple[str, ...]) -> bool:
        return Generation(GenerateParams(3, SamplingParams(), stop=stop), ["a", "b"], loop).uses_log


    assert uses_log(()) and uses_log(("",))
    assert not uses_log(("b",)) and not uses_log(("", "b"))
    loop.close()


def test_a_token_chunk_reads_as_its_events_then_its_finish() -> None:
    chunk = TokenChunk([7, 8], ["a", ""], [3, 4], [2, 5])
    made = [GeneratedToken(7, "a", 3, 2), GeneratedToken(8, "", 4, 5)]
    assert list(chunk) == made and len(chunk) == 2 and chunk.finish_reason == ""
    assert chunk[1] == chunk[-1] == made[1] and chunk[:1] == made[:1]
    chunk.finish = GeneratedToken(-1, "", 4, 5, "length")
    assert list(chunk) == [*made, chunk.finish] and len(chunk) == 3 and chunk.finish_reason == "length"
    assert chunk[-1] == chunk[2] == chunk.finish and chunk[-3] == made[0] and chunk[1:] == [made[1], chunk.finish]
    with pytest.raises(IndexError, match="chunk index 3 out of range for 3 events"):
        chunk[3]
    with pytest.raises(IndexError, match="chunk index -4"):
        chunk[-4]
    assert list(TokenChunk([], [], [], [])) == []


@pytest.mark.parametrize("params", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.01}])
def test_bad_sampling_parameters_are_named(params: dict[str, float]) -> None:
    with pytest.raises(InvalidInput, match=next(iter(params))):
        SamplingParams(**params)  # type: ignore[arg-type]


def test_top_k_logprobs_are_sorted_and_normalised() -> None:
    logits = np.array([[1.0, 4.0, 2.0, 3.0]], np.float32)
    ids, logprobs = top_k_logprobs(logits, 2)
    assert ids.tolist() == [[1, 3]]
    full = logits[0] - np.log(np.exp(logits[0]).sum())
    np.testing.assert_allclose(logprobs[0], full[[1, 3]], rtol=1e-6)


def test_stop_matcher_holds_back_possible_prefixes() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push(1, "a") == [(1, "a")]
    assert matcher.push(2, "\n") == []  # could start the stop string
    assert matcher.push(3, "b") == [(2, "\n"), (3, "b")]
    assert matcher.push(4, "\n") == []
    assert matcher.push(5, "\n") == [] and matcher.stopped


def test_stop_matcher_releases_text_before_the_stop_string() -> None:
    matcher = StopMatcher(["cd"])
    assert matcher.push(1, "ab") == [(1, "ab")]
    assert matcher.push(2, "xc") == []  # "c" may start the stop string: hold the token
    assert matcher.push(3, "d") == [(2, "x")]  # the part of the straddling token before the stop string
    assert matcher.stopped
    assert matcher.flush() == []


def _reference_stop(texts: list[str], stops: list[str]) -> tuple[str, bool]:
    """What a generation with these token texts and stop strings returns: the text before the stop string that
    starts first among those ending in the first token where any ends (all of it if none occurs)."""
    seen = ""
    for text in texts:
        before = len(seen)
        seen += text
        starts = [seen.find(stop, max(0, before - len(stop) + 1)) for stop in stops if stop]
        found = [start for start in starts if start >= 0]
        if found:
            return seen[: min(found)], True
    return seen, False


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(st.text(alphabet="ab\n", min_size=0, max_size=3), max_size=12),
    stops=st.lists(st.text(alphabet="ab\n", min_size=0, max_size=4), max_size=4),
)
def test_stop_matcher_agrees_with_a_plain_search(texts: list[str], stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    released: list[tuple[int, str]] = []
    for token, text in enumerate(texts):
        released += matcher.push(token, text)
        if matcher.stopped:
            break
    else:
        released += matcher.flush()
    expected, stopped = _reference_stop(texts, stops)
    assert "".join(piece for _, piece in released) == expected
    assert matcher.stopped == stopped
    tokens = [token for token, _ in released]
    assert tokens == sorted(tokens)  # pieces come out in token order, each token once at most


def test_stop_matching_work_per_token_does_not_grow_with_the_number_of_stop_strings() -> None:
    """The automaton reads each generated character once (one transition, amortised), whether a request
    carries one stop string or thousands: counted, not timed."""

    def transitions(stops: list[str]) -> int:
        matcher = StopMatcher(stops)
        automaton = matcher._automaton
        calls = 0
        step = automaton.next

        def counted(state: int, char: str) -> int:
            nonlocal calls
            calls += 1
            return step(state, char)

        automaton.next = counted  # type: ignore[method-assign]
        for token in range(200):
            matcher.push(token, "abcab"[token % 5])
        return calls

    few = transitions(["zzz"])
    many = transitions([f"q{i:05d}" for i in range(5000)] + ["abcabd"])
    assert few == many == 200


def test_wakeup_wakes_its_waiter_once_per_set() -> None:
    async def scenario() -> None:
        wakeup = Wakeup()
        wakeup.set()
        wakeup.set()
        await asyncio.wait_for(wakeup.wait(), 1)  # set before the wait: returns at once
        waiting = asyncio.ensure_future(wakeup.wait())  # both sets were used up by that one wait
        await asyncio.sleep(0.01)
        assert not waiting.done()
        wakeup.set()
        await asyncio.wait_for(waiting, 1)
        cancelled = asyncio.ensure_future(wakeup.wait())
        await asyncio.sleep(0)
        wakeup.set()
        cancelled.cancel()  # woken, but cancelled before it resumed: the set is kept for the next wait
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.wait_for(wakeup.wait(), 0.05)

    asyncio.run(scenario())


def test_a_reset_during_a_generation_replies_step_0_and_the_generation_goes_on_from_zero_state(
    server: ServerThread,
) -> None:
    """ResetSession runs between the generation's tokens: its reply says step 0 (it said 1 when a token ran
    before the reply was written), and the generation makes all its tokens, the steps after the reset counting
    from 0 again. Whether the reset lands before the generation ends depends on the machine's pace; both ways the
    session ends where the last response says (or at 0 when the generation ended first)."""
    prompt, count = [1, 2, 3], 2000
    with server.channel() as channel:
        stub = pb_grpc.LstmServeStub(channel)
        stream = SyncStream(channel)
        stream.send(tokens=prompt, generate=pb.Generate(max_tokens=count, sampling=pb.Sampling(temperature=0)))
        responses = [stream.read()]  # the generation runs
        reply = stub.ResetSession(pb.SessionRef(session_id=responses[0].session_id))
        assert reply.step == 0
        while not responses[-1].finished:
            responses.append(stream.read())
        stream.close()
        steps = [r.step for r in responses]
        drops = [i for i in range(1, len(steps)) if steps[i] < steps[i - 1]]
        assert len(drops) <= 1 and responses[-1].finish_reason == "length" and len(responses) == count + 1
        if drops:
            after = steps[drops[0] : -1]  # the last response, which ends the generation, repeats the last step
            assert after == list(range(1, len(after) + 1)) and steps[-1] == steps[-2]
        ended = stub.GetSession(pb.SessionRef(session_id=responses[0].session_id)).step
        assert ended == (steps[-1] if drops else 0)
