"""Unit tests of the batcher, the engine's synchronous planner: driven with a fake model, no server, no sockets.

The fake model's logits of a row are its inputs and the session's step counter written out, so every test
can tell which row got which answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

import numpy as np
import pytest

from lstmserve.server.batcher import (
    Batcher,
    Block,
    Columns,
    Computed,
    GenerationRows,
    Group,
    SchedulerLimits,
    Taken,
    Work,
    group_by_length,
)
from lstmserve.server.errors import ComputeFailed, Overloaded, SessionNotFound
from lstmserve.server.generation import GenerateParams, Generation
from lstmserve.server.metrics import Metrics
from lstmserve.server.scheduler import _model_calls
from lstmserve.server.sampling import SamplingParams
from lstmserve.server.sessions import Session, StepResult
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.token_log import TokenLog

VOCAB = 8
TIMING = BatchTiming(0.0, 0.0, 0.0, 0.0)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs a test body on a fresh event loop (futures need one; nothing here does I/O)."""
    asyncio.run(body())


def fake_model(group: Computed) -> np.ndarray:
    """Logits [rows, positions, VOCAB]: one-hot of each input token, so greedy sampling feeds back (token + 1) % VOCAB."""
    inputs = group.inputs()
    logits = np.zeros((*inputs.shape, VOCAB), np.float32)
    np.put_along_axis(logits, ((inputs + 1) % VOCAB)[..., np.newaxis], 1.0, axis=-1)
    return logits


def step(batcher: Batcher, session: Session, tokens: list[int], generation: Generation | None = None) -> Work:
    work = Work(
        future=asyncio.get_running_loop().create_future(), inputs=np.array(tokens, np.int64), generation=generation
    )
    batcher.enqueue(session, work)
    return work


def run_batch(batcher: Batcher, taken: Taken, fail: set[int] = frozenset()) -> list[Group]:  # type: ignore[assignment]
    """Computes the taken steps with the fake model; groups of the lengths in `fail` raise instead."""
    groups = group_by_length(taken)
    outputs: list[np.ndarray | Exception] = [
        RuntimeError("model failed") if len(g.works[0].inputs) in fail else fake_model(g)  # type: ignore[arg-type]
        for g in groups
    ]
    batcher.finish(groups, outputs, TIMING)
    return groups


def run_next(batcher: Batcher, live: set[Session]) -> tuple[Taken, list[Columns]]:
    """Forms the next batch as the engine does (`collect_batch`), computes it with the fake model, applies it and
    marks the sessions with more work ready; returns what it took."""
    taken, columns = batcher.collect_batch()
    groups: list[Computed] = [*columns, *(group_by_length(taken) if taken else [])]
    batcher.finish(groups, [fake_model(g) for g in groups], TIMING)
    batcher.requeue(taken, live, columns)
    return taken, columns


def new_batcher(**limits: Any) -> Batcher:
    return Batcher(SchedulerLimits(**limits), Metrics())


def sessions(count: int) -> list[Session]:
    return [Session(id=f"session-{i:012d}", slot=i, owner="") for i in range(count)]


def test_collect_takes_one_step_per_session_in_arrival_order() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        first, second = step(batcher, a, [1]), step(batcher, a, [2])
        other = step(batcher, b, [3])
        taken = batcher.collect()
        assert [(s, w) for s, w in taken] == [(a, first), (b, other)]
        assert a.queued_positions == 2 and a.in_flight
        run_batch(batcher, taken)
        assert batcher.requeue(taken, {a, b}) and list(batcher.ready) == [a.id]
        assert batcher.collect() == [(a, second)]

    run(body)


def test_finish_advances_each_session_and_answers_its_own_row() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        a.step = 5
        wa, wb = step(batcher, a, [3, 4]), step(batcher, b, [6, 7])
        run_batch(batcher, batcher.collect())
        ra: StepResult = wa.future.result()
        rb: StepResult = wb.future.result()
        assert (ra.start_step, ra.step, ra.batch_size) == (5, 7, 2)
        assert (rb.start_step, rb.step) == (0, 2)
        assert ra.logits.argmax(-1).tolist() == [4, 5] and rb.logits.argmax(-1).tolist() == [7, 0]
        assert a.last_result is ra and not a.in_flight and a.queued_positions == 0 and a.version == 1

    run(body)


def test_steps_of_different_lengths_form_one_group_per_length() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b, c = sessions(3)
        step(batcher, a, [1]), step(batcher, b, [1, 2, 3]), step(batcher, c, [4])
        groups = group_by_length(batcher.collect())
        assert [[s.id for s in g.sessions] for g in groups] == [[a.id, c.id], [b.id]]
        assert groups[0].inputs().shape == (2, 1) and groups[1].slots().tolist() == [1]

    run(body)


def test_a_failed_group_fails_only_its_requests_and_leaves_their_counters() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        wa, wb = step(batcher, a, [1]), step(batcher, b, [1, 2])
        run_batch(batcher, batcher.collect(), fail={2})
        assert wa.future.result().step == 1
        with pytest.raises(ComputeFailed, match="model failed"):
            wb.future.result()
        assert (b.step, b.version, b.queued_positions, b.in_flight) == (0, 0, 0, False)

    run(body)


def test_a_greedy_generation_feeds_back_each_token_until_max_tokens() -> None:
    async def body() -> None:
        batcher = new_batcher()
        (a,) = sessions(1)
        params = GenerateParams(max_tokens=3, sampling=SamplingParams(temperature=0.0))
        generation = Generation(params, [str(i) for i in range(VOCAB)])
        work = step(batcher, a, [2, 3], generation)
        batcher.generating = 1
        batches = 0
        while not work.future.done():
            run_next(batcher, {a})
            batches += 1
        assert batches == 4  # the prompt, then one step per generated token
        assert [event.token for event in generation.take()] == [4, 5, 6]
        assert work.future.result().step == 5 and a.step == 5 and generation.finish_reason == "length"
        assert a.last_result is None  # a generation is never replayed

    run(body)


def test_queue_limits_refuse_with_overloaded_naming_the_limit() -> None:
    async def body() -> None:
        a, b = sessions(2)
        batcher = new_batcher(max_inflight_per_session=1)
        step(batcher, a, [1])
        with pytest.raises(Overloaded, match="max-inflight-per-session=1"):
            step(batcher, a, [2])
        full = new_batcher(max_queue=1)
        step(full, a, [1])
        with pytest.raises(Overloaded, match="queue is full"):
            step(full, b, [1])

    run(body)


def test_discard_fails_the_queued_requests_and_forgets_the_session() -> None:
    async def body() -> None:
        batcher = new_batcher()
        (a,) = sessions(1)
        works = [step(batcher, a, [1]), step(batcher, a, [2])]
        batcher.discard(a, SessionNotFound("closed"))
        for work in works:
            with pytest.raises(SessionNotFound):
                work.future.result()
        assert batcher.queued == 0 and not batcher.ready and a.pending is None
        assert batcher.collect() == []

    run(body)


def test_a_cancelled_step_is_skipped_and_releases_its_positions() -> None:
    async def body() -> None:
        batcher = new_batcher()
        (a,) = sessions(1)
        gone, kept = step(batcher, a, [1, 2]), step(batcher, a, [3])
        gone.future.cancel()
        assert batcher.collect() == [(a, kept)]
        assert a.queued_positions == 1

    run(body)


def test_an_operation_queued_behind_a_step_runs_after_it() -> None:
    async def body() -> None:
        batcher = new_batcher()
        (a,) = sessions(1)
        work = step(batcher, a, [1])
        seen: list[int] = []

        def record_step(s: Session) -> int:
            seen.append(s.step)
            return s.step

        op = Work(future=asyncio.get_running_loop().create_future(), op=record_step)
        batcher.enqueue(a, op)
        taken = batcher.collect()
        assert not op.future.done()
        run_batch(batcher, taken)
        batcher.requeue(taken, {a})
        assert batcher.collect() == [] and op.future.result() == 1 and seen == [1]
        assert work.future.result().step == 1

    run(body)


def test_work_queued_during_a_generation_runs_between_its_tokens_in_order() -> None:
    """A generation's next token joins the next batch directly, unless something was queued for its session
    meanwhile: then the token waits behind it, as every request of a session runs in order."""

    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        params = GenerateParams(max_tokens=4, sampling=SamplingParams(temperature=0.0))
        generation = Generation(params, [str(i) for i in range(VOCAB)])
        gen_work = step(batcher, a, [1], generation)
        batcher.generating = 1
        run_next(batcher, {a, b})  # the prompt ran; the first token (2) is sampled and carried
        (carried,) = batcher.carried
        assert carried.sessions == [a] and carried.works == [gen_work] and carried.tokens.tolist() == [[2]]
        assert a.in_flight and a.queued_positions == 1
        seen: list[int] = []
        op = Work(future=asyncio.get_running_loop().create_future(), op=lambda s: seen.append(s.step))
        batcher.enqueue(a, op)  # waits: the session is in flight
        other = step(batcher, b, [5])  # a new arrival goes first in the next batch
        taken, columns = run_next(batcher, {a, b})
        assert taken == [(b, other)] and [c.sessions for c in columns] == [[a]] and seen == []
        assert batcher.carried == [] and a.pending == [op, gen_work]  # the next token waits behind the op
        assert batcher.collect() == [(a, gen_work)] and seen == [2]
        assert [event.token for event in generation.take()] == [2]

    run(body)


def block_of(batcher: Batcher, members: list[Session], tokens: list[int]) -> Block:
    inputs = np.array(tokens, np.int64).reshape(len(members), 1)
    block = Block(members, inputs, [bytes([t]) for t in tokens], asyncio.get_running_loop().create_future())
    batcher.enqueue_block(block)
    return block


def test_a_block_is_answered_as_one_and_its_sessions_work_waits_behind_it() -> None:
    """A multi-session request's block: its sessions are in flight from the moment it is queued, it is taken
    before anything else, and every row's result is its session's last result (for a resend)."""

    async def body() -> None:
        batcher = new_batcher()
        a, b, c = sessions(3)
        block = block_of(batcher, [a, b], [1, 2])
        later = step(batcher, a, [3])  # queued behind the block: a is in flight
        other = step(batcher, c, [4])
        assert a.id not in batcher.ready
        blocks = batcher.collect_blocks()
        taken = batcher.collect(batcher.limits.max_batch_size - 2)
        assert blocks == [block] and taken == [(c, other)]
        groups: list[Computed] = [block, *group_by_length(taken)]
        batcher.finish(groups, [fake_model(g) for g in groups], TIMING)
        results = block.future.result()
        assert [(r.step, r.batch_size, r.logits.argmax(-1).tolist()) for r in results] == [(1, 3, [2]), (1, 3, [3])]
        assert a.last_result is results[0] and not a.in_flight and a.queued_positions == 1
        assert batcher.requeue(taken, {a, b, c}, blocks) and batcher.collect() == [(a, later)]

    run(body)


def test_a_failed_block_leaves_its_sessions_as_they_were() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        block = block_of(batcher, [a, b], [1, 2])
        blocks = batcher.collect_blocks()
        batcher.finish(blocks, [RuntimeError("model failed")], TIMING)
        with pytest.raises(ComputeFailed, match="model failed"):
            block.future.result()
        assert [(s.step, s.version, s.queued_positions, s.in_flight) for s in (a, b)] == [(0, 0, 0, False)] * 2

    run(body)


def test_blocks_wait_for_a_batch_with_room_and_count_against_the_queue() -> None:
    async def body() -> None:
        batcher = new_batcher(max_batch_size=3, max_queue=4)
        a, b, c, d, e = sessions(5)
        first, second = block_of(batcher, [a, b], [1, 1]), block_of(batcher, [c, d], [1, 1])
        with pytest.raises(Overloaded, match="queue is full"):
            block_of(batcher, [e], [1])
        assert batcher.collect_blocks() == [first] and batcher.blocks == [second]
        assert batcher.collect_blocks() == [second]

    run(body)


def greedy(batcher: Batcher, session: Session, prompt: int, max_tokens: int) -> tuple[Work, Generation]:
    params = GenerateParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0))
    generation = Generation(params, [str(i) for i in range(VOCAB)])
    work = step(batcher, session, [prompt], generation)
    batcher.generation_started(work.future)  # as Scheduler.start_generation does
    return work, generation


def test_generations_go_on_as_columns_until_each_ends() -> None:
    """After their prompts, generations are carried from batch to batch as one `GenerationRows` (no session
    queue, no per-row work item); a row leaves when its generation ends, and each session advances by its own
    tokens. The last generation left goes on as a lone step."""

    async def body() -> None:
        batcher = new_batcher()
        members = sessions(3)
        runs = [greedy(batcher, s, prompt, max_tokens) for s, prompt, max_tokens in zip(members, [1, 4, 6], [2, 3, 4])]
        taken, columns = run_next(batcher, set(members))
        assert len(taken) == 3 and columns == []
        (carried,) = batcher.carried
        assert carried.sessions == members and carried.slots().tolist() == [0, 1, 2]
        assert carried.inputs().tolist() == [[2], [5], [7]]  # each prompt + 1: the fake model's greedy token
        assert [(s.step, s.queued_positions, s.in_flight) for s in members] == [(1, 1, True)] * 3
        shapes = []
        while not all(work.future.done() for work, _ in runs):
            taken, columns = run_next(batcher, set(members))
            shapes.append((len(taken), [len(cast(GenerationRows, c)) for c in columns]))  # only generations here
        assert shapes == [(0, [3]), (0, [3]), (0, [2]), (1, [])]
        for (work, generation), s, prompt, max_tokens in zip(runs, members, [1, 4, 6], [2, 3, 4]):
            expected = [(prompt + 1 + i) % VOCAB for i in range(max_tokens)]
            assert [event.token for event in generation.take()] == expected
            assert [event.step for event in generation.take()] == []  # taken once
            assert work.future.result().step == s.step == 1 + max_tokens and s.version == 1 + max_tokens
            assert (s.queued_positions, s.in_flight, s.last_result) == (0, False, None)
        assert batcher.carried == [] and not batcher.ready

    run(body)


def test_a_stream_that_falls_a_whole_token_log_row_behind_still_gets_every_token_in_order() -> None:
    """The token log keeps `width` tokens per slot; a generation whose stream takes nothing for longer has them
    moved out to a list of its own before the row would be overwritten."""

    async def body() -> None:
        batcher = new_batcher()
        batcher.token_log = TokenLog(width=4)
        members = sessions(2)
        runs = [greedy(batcher, s, prompt, 11) for s, prompt in zip(members, [1, 3])]
        while not all(work.future.done() for work, _ in runs):
            run_next(batcher, set(members))
        for (work, generation), prompt in zip(runs, [1, 3]):
            events = generation.take()
            assert [event.token for event in events] == [(prompt + 1 + i) % VOCAB for i in range(11)]
            assert [event.step for event in events] == list(range(2, 13))  # the prompt was step 1
            assert generation.finish_reason == "length" and work.future.result().step == 12

    run(body)


def test_a_generation_keeps_its_tokens_when_its_slot_begins_the_next_one_before_they_are_taken() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        (first_work, first), _ = greedy(batcher, a, 1, 3), greedy(batcher, b, 5, 9)
        while not first_work.future.done():
            run_next(batcher, {a, b})
        second_work, second = greedy(batcher, a, 4, 2)
        while not second_work.future.done():
            run_next(batcher, {a, b})
        assert second.owns_log_row and not first.owns_log_row  # the first's tokens moved out to its own list
        assert [event.token for event in first.take()] == [2, 3, 4]
        assert [event.token for event in second.take()] == [5, 6] and [event.step for event in second.take()] == []

    run(body)


def test_a_generation_queued_while_another_runs_on_its_session_counts_its_own_tokens() -> None:
    """A second generation queued on a session runs interleaved with the first (the first's next token waits
    behind the second's prompt): the slot's token log row stays the first's, the second keeps a log of its own,
    and each makes exactly its max_tokens."""

    async def body() -> None:
        batcher = new_batcher()
        (a,) = sessions(1)
        first_work, first = greedy(batcher, a, 1, 6)
        run_next(batcher, {a})  # the first prompt: the first generation is carried
        second_work, second = greedy(batcher, a, 3, 4)
        while not (first_work.future.done() and second_work.future.done()):
            run_next(batcher, {a})
        assert [event.token for event in first.take()] == [2, 3, 4, 5, 6, 7]
        assert [event.token for event in second.take()] == [4, 5, 6, 7]
        assert first.owns_log_row and not second.owns_log_row
        assert a.step == 1 + 6 + 1 + 4 and max(first_work.future.result().step, second_work.future.result().step) == 12

    run(body)


def test_carried_generations_with_and_without_stop_strings_share_a_batch() -> None:
    """A generation with stop strings passes each token through its matcher, in the same carried batch as one
    whose tokens go to the token log."""

    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        plain_work, plain = greedy(batcher, a, 1, 5)
        params = GenerateParams(max_tokens=5, sampling=SamplingParams(temperature=0.0), stop=("4",))
        stopping = Generation(params, [str(i) for i in range(VOCAB)])
        stop_work = step(batcher, b, [1], stopping)
        batcher.generation_started(stop_work.future)
        shapes = []
        while not (plain_work.future.done() and stop_work.future.done()):
            taken, columns = run_next(batcher, {a, b})
            shapes.append((len(taken), [len(cast(GenerationRows, c)) for c in columns]))  # only generations here
        assert shapes[:3] == [(2, []), (0, [2]), (0, [2])]  # the prompts, then both carried together
        assert [event.token for event in plain.take()] == [2, 3, 4, 5, 6] and plain.finish_reason == "length"
        assert [event.token for event in stopping.take()] == [2, 3] and stopping.finish_reason == "stop"

    run(body)


def test_a_carried_generation_whose_client_went_away_is_dropped_before_its_next_step() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b, c = sessions(3)
        (gone, _), (kept, _), _ = greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5), greedy(batcher, c, 3, 5)
        run_next(batcher, {a, b, c})
        batcher.stop_generation(gone.future)
        later = step(batcher, a, [7])  # queued behind the generation: runs once it is dropped
        taken, columns = batcher.collect_batch()
        assert taken == [] and [col.sessions for col in columns] == [[b, c]]
        assert (a.step, a.queued_positions, a.in_flight) == (1, 1, False) and list(batcher.ready) == [a.id]
        assert batcher.collect() == [(a, later)] and not kept.future.done()

    run(body)


def test_a_generation_cancelled_directly_is_dropped_once_its_callbacks_ran() -> None:
    """Cancelling a generation's future (not through `stop_generation`) is counted by its done callback, one turn
    of the event loop later: the carried batch then drops the row before its next step."""

    async def body() -> None:
        batcher = new_batcher()
        a, b, c = sessions(3)
        (gone, _), (kept, _), _ = greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5), greedy(batcher, c, 3, 5)
        run_next(batcher, {a, b, c})
        gone.future.cancel()
        await asyncio.sleep(0)  # the done callbacks run
        assert batcher.cancellations == 1 and batcher.generating == 2
        taken, columns = batcher.collect_batch()
        assert taken == [] and [col.sessions for col in columns] == [[b, c]] and not kept.future.done()
        assert (a.step, a.queued_positions, a.in_flight) == (1, 0, False)

    run(body)


def test_a_generation_cancelled_while_its_batch_computes_ends_when_the_batch_is_applied() -> None:
    """A row whose client leaves while its batch is in flight is ended when the batch's outputs are applied (its
    step ran), and its session is free; the other rows go on."""

    async def body() -> None:
        batcher = new_batcher()
        a, b, c = sessions(3)
        (gone, _), (kept, _), _ = greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5), greedy(batcher, c, 3, 5)
        run_next(batcher, {a, b, c})
        taken, columns = batcher.collect_batch()  # the carried rows, in flight
        assert taken == [] and [col.sessions for col in columns] == [[a, b, c]]
        batcher.stop_generation(gone.future)
        groups: list[Computed] = [*columns]
        batcher.finish(groups, [fake_model(g) for g in groups], TIMING)
        assert [rows.sessions for rows in batcher.carried] == [[b, c]]
        assert (a.step, a.queued_positions, a.in_flight) == (2, 0, False) and not kept.future.done()

    run(body)


def test_discard_fails_a_carried_generation_and_leaves_the_others() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        (work_a, _), (work_b, _) = greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5)
        run_next(batcher, {a, b})
        batcher.discard(a, SessionNotFound("closed"))
        with pytest.raises(SessionNotFound):
            work_a.future.result()
        (carried,) = batcher.carried
        assert carried.sessions == [b] and carried.inputs().tolist() == [[3]] and not a.in_flight
        batcher.discard(b, SessionNotFound("closed"))
        assert batcher.carried == [] and work_b.future.done()

    run(body)


def test_a_failed_call_of_carried_generations_fails_them_and_keeps_their_counters() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        runs = [greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5)]
        run_next(batcher, {a, b})
        taken, columns = batcher.collect_batch()
        batcher.finish([*columns], [RuntimeError("model failed")], TIMING)
        for work, generation in runs:
            with pytest.raises(ComputeFailed, match="model failed"):
                work.future.result()
            assert list(generation.take()) == []
        assert [(s.step, s.version, s.queued_positions, s.in_flight) for s in (a, b)] == [(1, 1, 0, False)] * 2
        assert batcher.carried == []

    run(body)


def test_groups_of_the_same_shape_share_one_model_call() -> None:
    async def body() -> None:
        batcher = new_batcher()
        a, b, c, d = sessions(4)
        block = block_of(batcher, [a, b], [1, 2])
        step(batcher, c, [3])
        step(batcher, d, [4, 5])
        taken, columns = batcher.collect_batch()
        groups: list[Computed] = [*columns, *group_by_length(taken)]
        calls = _model_calls(groups)
        assert [members for members, _, _ in calls] == [[(0, slice(0, 2)), (1, slice(2, 3))], [(2, None)]]
        assert [slots.tolist() for _, slots, _ in calls] == [[0, 1, 2], [3]]
        assert [inputs.tolist() for _, _, inputs in calls] == [[[1], [2], [3]], [[4, 5]]]
        assert groups[0] is block and isinstance(groups[1], Group)

    run(body)


def test_carried_generations_are_split_to_fit_the_batch() -> None:
    async def body() -> None:
        batcher = new_batcher(max_batch_size=2)
        members = sessions(3)
        for s, prompt in zip(members, [1, 2, 3]):
            greedy(batcher, s, prompt, 4)
        run_next(batcher, set(members))  # two prompts
        a, b, c = members
        run_next(batcher, set(members))  # the third prompt goes first; one carried row fits, the other waits
        assert [rows.sessions for rows in batcher.carried] == [[b], [a, c]]  # a and c went on together
        taken, columns = batcher.collect_batch()
        assert taken == [] and [col.sessions for col in columns] == [[b], [a]]
        assert all(isinstance(col, GenerationRows) for col in columns)
        assert [rows.sessions for rows in batcher.carried] == [[c]]

    run(body)


def test_a_batch_that_fails_while_it_is_applied_leaves_its_generations_counters_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If applying a batch raises half-way (a bug: the engine then fails what it took, `Batcher.fail`), a
    generation whose prompt ran is answered with the error and its session is free, with no positions counted."""

    async def body() -> None:
        batcher = new_batcher()
        a, b = sessions(2)
        (work_a, _), (work_b, _) = greedy(batcher, a, 1, 5), greedy(batcher, b, 2, 5)
        taken = batcher.collect()

        def broken(self: Batcher, going_on: list[Any]) -> None:
            raise RuntimeError("sampling broke")

        monkeypatch.setattr(Batcher, "_continue_generations", broken)
        with pytest.raises(RuntimeError, match="sampling broke") as raised:
            run_batch(batcher, taken)
        batcher.fail(taken, raised.value)
        for work, session in ((work_a, a), (work_b, b)):
            with pytest.raises(ComputeFailed, match="sampling broke"):
                work.future.result()
            assert (session.step, session.queued_positions, session.in_flight) == (1, 0, False)

    run(body)
