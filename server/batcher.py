"""The batcher: the synchronous planner of the engine. It decides what runs and applies what ran.

Each session has a queue of work (steps, generations, lifecycle operations); `collect` takes at most
one step per ready session (so a session's requests run in order, and operations queued behind a step
run after it), `group_by_length` splits the taken steps into model calls, and `finish` applies the
outputs: step counters, answers, generations' next tokens. Nothing here awaits, touches a socket or
runs the model: the engine (scheduler.py) does that, and unit tests drive this with a fake runner.

Grouping by length: the model has no per-row sequence lengths (a `sequence_lens` input would block
CUDA graphs and costs a CPU copy), so rows of one call must have the same number of positions.
Single-token steps, by far the most common, all share one call; each distinct prompt length gets its
own call in the same iteration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lstmserve.server.errors import ComputeFailed, Draining, Overloaded, StepMismatch
from lstmserve.server.metrics import Metrics
from lstmserve.server.sampling import sample_rows
from lstmserve.server.sessions import Session, StepResult
from lstmserve.server.statistics import BatchTiming

if TYPE_CHECKING:
    from lstmserve.server.generation import Generation
    from lstmserve.server.session_manager import SessionOp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    """Bounds the scheduler enforces."""

    max_batch_size: int = 256
    max_wait_us: int = 0
    max_queue: int = 65_536
    session_ttl_s: float = 900.0
    max_inflight_per_session: int = 64
    idle_spin_us: int = 500


@dataclass(eq=False)
class Work:
    """One queued item of a session: a step (inputs set) or a lifecycle operation (op set).

    A step with a generation is queued again after it runs, with the next sampled token
    as its input, until the generation finishes; only then is its future resolved.
    """

    future: asyncio.Future[Any]
    inputs: np.ndarray | None = None
    op: SessionOp | None = None
    generation: Generation | None = None
    digest: bytes = b""
    enqueued: float = field(default_factory=time.perf_counter)
    # When a generation's next token was queued (0.0: it waits since `enqueued`), for ModelStatistics' queue time.
    waiting_since: float = 0.0


@dataclass(frozen=True)
class Group:
    """Steps of the same length, run as one model call."""

    sessions: list[Session]
    works: list[Work]

    def slots(self) -> np.ndarray:
        """The state-store slots of the group's sessions, in row order."""
        return np.fromiter((s.slot for s in self.sessions), dtype=np.int64, count=len(self.sessions))

    def inputs(self) -> np.ndarray:
        """The group's inputs as one array [rows, positions(, width)]."""
        first = self.works[0].inputs
        assert first is not None
        # One concatenate, not np.stack: a quarter of the time for a batch of single tokens.
        return np.concatenate([w.inputs for w in self.works]).reshape(len(self.works), *first.shape)  # type: ignore[misc]


@dataclass(eq=False)
class Block:
    """Steps of the same length for many sessions, from one multi-session request: queued, computed and
    answered as one unit, with no queue entry, future or answer per session (`Scheduler.step_many`).
    Its sessions are in flight from the moment it is queued, so their other work waits behind it."""

    sessions: list[Session]
    stacked_inputs: np.ndarray  # [rows, positions(, width)]
    digests: list[bytes]
    future: asyncio.Future[list[StepResult]]
    enqueued: float = field(default_factory=time.perf_counter)

    def slots(self) -> np.ndarray:
        """The state-store slots of the block's sessions, in row order."""
        return np.fromiter((s.slot for s in self.sessions), dtype=np.int64, count=len(self.sessions))

    def inputs(self) -> np.ndarray:
        """The block's inputs [rows, positions(, width)]."""
        return self.stacked_inputs


Taken = list[tuple[Session, Work]]
Computed = Group | Block


class Batcher:
    """Per-session queues, the ready set, batch formation and the application of a batch's outputs.

    Args:
        limits: queue bounds and the largest batch.
        metrics: batch, step and queue metrics; the model's statistics.
    """

    def __init__(self, limits: SchedulerLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.ready: OrderedDict[str, Session] = OrderedDict()
        self.queued = 0
        # Generations running (their streams get tokens in chunks sized by this).
        self.generating = 0
        # Set by a drain's last moment: generations stop at their next token.
        self.frozen = False
        # The session whose step was the only one in the last batch (None after a real batch).
        self.last_solo: Session | None = None
        # Multi-session requests' blocks, in arrival order (taken before any other work, as far as they fit).
        self.blocks: list[Block] = []
        # Generation steps whose next token is sampled and whose sessions have nothing else queued: they join
        # the next batch as they are, in the order of the last one, without a trip through the session queues
        # (their sessions stay in flight meanwhile, so anything queued for them waits behind, in order).
        self.carried: Taken = []

    # ---- queues ------------------------------------------------------------
    def enqueue(self, session: Session, work: Work) -> None:
        """Queues work behind the session's earlier work; Overloaded past the queue limits."""
        if self.queued >= self.limits.max_queue:
            raise Overloaded(f"request queue is full ({self.limits.max_queue} waiting requests)")
        limit = self.limits.max_inflight_per_session
        if work.inputs is not None and session.pending is not None and len(session.pending) >= limit:
            raise Overloaded(
                f"session {session.id!r} already has {len(session.pending)} requests waiting "
                f"(--max-inflight-per-session={limit})"
            )
        if session.pending is None:
            session.pending = []
        session.pending.append(work)
        if work.inputs is not None:
            # Counted until the step is applied or dropped, so `expected_step` checks see it.
            session.queued_positions += len(work.inputs)
        session.last_used = time.monotonic()
        self.queued += 1  # the queue_depth gauge is updated once per batch, in collect
        if not session.in_flight:
            self.ready.setdefault(session.id, session)

    def enqueue_block(self, block: Block) -> None:
        """Queues a block; Overloaded if its rows would overflow the queue. Its sessions must have no work
        queued or running (the block runs before whatever is queued for them after it)."""
        rows = len(block.sessions)
        if self.queued + rows > self.limits.max_queue:
            raise Overloaded(f"request queue is full ({self.limits.max_queue} waiting requests)")
        positions = block.stacked_inputs.shape[1]
        used = time.monotonic()
        for session in block.sessions:
            session.queued_positions += positions
            session.in_flight = True
            session.last_used = used
        self.queued += rows
        self.blocks.append(block)

    def collect_blocks(self) -> list[Block]:
        """The queued blocks that fit in one batch, oldest first (each is at most the largest batch)."""
        taken: list[Block] = []
        room = self.limits.max_batch_size
        while self.blocks and len(self.blocks[0].sessions) <= room:
            block = self.blocks.pop(0)
            room -= len(block.sessions)
            self.queued -= len(block.sessions)
            taken.append(block)
        return taken

    def discard(self, session: Session, error: Exception) -> None:
        """Fails every request still queued for a session that leaves (closed, expired, handed over)."""
        if self.last_solo is session:
            self.last_solo = None
        if session.in_flight and self.carried:  # a carried generation step of this session fails too
            for work in [w for s, w in self.carried if s is session]:
                if not work.future.done():
                    work.future.set_exception(error)
            self.carried = [(s, w) for s, w in self.carried if s is not session]
            session.in_flight = False
        while session.pending:  # requests queued behind a close: the session is gone
            work = session.pending.pop(0)
            self.queued -= 1
            if not work.future.done():
                work.future.set_exception(error)
        session.pending = None
        self.ready.pop(session.id, None)

    def collect(self, room: int | None = None) -> Taken:
        """Takes at most one step per ready session (up to `room` rows, the largest batch if not given), running
        lifecycle ops inline."""
        taken: Taken = []
        limit = self.limits.max_batch_size if room is None else room
        while self.ready and len(taken) < limit:
            _, session = self.ready.popitem(last=False)
            while session.pending:
                work = session.pending.pop(0)
                self.queued -= 1
                if work.future.cancelled() and work.op is None:
                    session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
                    continue  # the client gave up before the step ran
                if work.op is not None:
                    _run_op(session, work)
                    if session.pending is None:  # the op dropped it (close, hand-off)
                        break
                    continue
                taken.append((session, work))
                session.in_flight = True
                break
            if not session.pending:
                session.pending = None  # idle sessions keep no empty list
        if self.carried and len(taken) < limit:
            self._take_carried(taken, limit - len(taken))
        self.metrics.queue_depth.set(self.queued)
        return taken

    def _take_carried(self, taken: Taken, room: int) -> None:
        """Adds up to `room` carried generation steps to the batch (new arrivals went first); a step whose
        client went away meanwhile is dropped, and its session freed for what it has queued."""
        carried, self.carried = self.carried[:room], self.carried[room:]
        for session, work in carried:
            if work.future.done():  # cancelled: the client went away
                session.in_flight = False
                session.queued_positions -= 1
                if session.pending:
                    self.ready.setdefault(session.id, session)
                continue
            taken.append((session, work))

    def requeue(self, taken: Taken, live: Any, blocks: list[Block] = ()) -> bool:  # type: ignore[assignment]
        """Marks the sessions of a finished batch that have more work (and are still in `live`) ready; returns
        whether there is work for another batch."""
        for session, _ in taken:
            if session.pending and not session.in_flight and session in live:
                self.ready.setdefault(session.id, session)
        for block in blocks:
            for session in block.sessions:
                if session.pending and not session.in_flight and session in live:
                    self.ready.setdefault(session.id, session)
        return bool(self.ready or self.carried or self.blocks)

    def idle_for(self, session: Session) -> bool:
        """Whether nothing is queued anywhere, this session has no work, and the last batch was its alone."""
        return self.last_solo is session and not (
            self.ready or self.queued or self.carried or self.blocks or session.busy
        )

    # ---- applying a batch --------------------------------------------------
    def finish(self, groups: list[Computed], outputs: list[np.ndarray | Exception], timing: BatchTiming) -> None:
        """Advances every row's session, answers finished requests, queues continuing generations and
        records the batch in the model's statistics.

        Per row it keeps to plain attribute updates: for a 256-session generation this runs 256 rows per
        generated token of each. The next tokens of continuing generations are sampled for all rows at
        once.
        """
        now = time.perf_counter()
        batch_size = sum(len(g.sessions) for g in groups)
        self.last_solo = groups[0].sessions[0] if batch_size == 1 else None
        self.metrics.batch_size.observe(batch_size)
        observe_latency = self.metrics.step_latency.observe
        generating = self.generating
        positions = 0
        used = time.monotonic()
        computed = 0  # rows that succeeded, and the sum of when each began waiting (for the statistics)
        waiting_since_sum = 0.0
        for group, logits in zip(groups, outputs, strict=True):
            if isinstance(logits, Exception):
                self._fail_group(group, logits)
                continue
            length = logits.shape[1]  # every row of a group has this many positions
            rows = len(group.sessions)
            positions += length * rows
            computed += rows
            if isinstance(group, Block):
                self._finish_block(group, logits, batch_size, used)
                observe_latency(now - group.enqueued)
                waiting_since_sum += rows * group.enqueued
                continue
            continuing: list[int] = []  # rows of generations that go on: their next token is sampled below
            for row, session, work in zip(range(rows), group.sessions, group.works):
                start_step = session.step
                step = session.step = start_step + length
                session.version += 1
                session.queued_positions -= length
                session.in_flight = False
                session.last_used = used
                waiting_since_sum += work.waiting_since or work.enqueued
                generation = work.generation
                # A generation goes on unless it finished or its client went away (its future is then done).
                if generation is not None and not generation.consumed(step, batch_size, generating):
                    if not work.future.done():
                        work.waiting_since = now  # its next token waits from here
                        continuing.append(row)
                        continue
                # Step latency is a request's: from arrival to its answer (a generation's, to its end).
                observe_latency(now - work.enqueued)
                result = StepResult(
                    logits=logits[row].copy(),  # a copy: a view would pin the whole batch
                    start_step=start_step,
                    step=step,
                    batch_size=batch_size,
                    input_digest=work.digest,
                )
                # A generation's last step is not a request the client can resend.
                session.last_result = result if generation is None else None
                if not work.future.done():
                    work.future.set_result(result)
            if continuing:
                self._continue_generations(group, continuing, logits[continuing, -1])
        self.metrics.steps.inc(batch_size)
        self.metrics.tokens.inc(positions)
        self.metrics.statistics.record(batch_size, timing, computed, waiting_since_sum, now)

    def _continue_generations(self, group: Group, rows: list[int], last_logits: np.ndarray) -> None:
        """Samples the next token of each continuing generation (all rows at once) and queues it."""
        works = [group.works[row] for row in rows]
        if self.frozen:
            for work in works:
                work.future.set_exception(draining())
            return
        generations: list[Generation] = [w.generation for w in works]  # type: ignore[misc]
        tokens = sample_rows([g.sampler for g in generations], last_logits)
        next_inputs = tokens.astype(works[0].inputs.dtype, copy=False).reshape(-1, 1)  # type: ignore[union-attr]
        sessions = group.sessions
        carried = self.carried
        queued = 0
        # Iterating next_inputs gives each row a [1] view of its token.
        for row, work, generation, token, inputs in zip(rows, works, generations, tokens.tolist(), next_inputs):
            generation.fed = token
            work.inputs = inputs
            session = sessions[row]
            session.queued_positions += 1
            if session.pending is None:  # the common case: straight into the next batch
                session.in_flight = True
                carried.append((session, work))
            else:  # behind what was queued meanwhile (a close ends the generation, as it would end a step)
                session.pending.append(work)
                queued += 1
        self.queued += queued

    @staticmethod
    def _finish_block(block: Block, logits: np.ndarray, batch_size: int, used: float) -> None:
        """Advances a block's sessions and answers it with every row's result (kept as each session's last
        result, so a resent step is answered again, not applied twice)."""
        length = logits.shape[1]
        results: list[StepResult] = []
        for row, session, digest in zip(range(len(block.sessions)), block.sessions, block.digests):
            start_step = session.step
            step = session.step = start_step + length
            session.version += 1
            session.queued_positions -= length
            session.in_flight = False
            session.last_used = used
            result = StepResult(logits[row].copy(), start_step, step, batch_size, digest)  # a copy, as in finish
            session.last_result = result
            results.append(result)
        if not block.future.done():
            block.future.set_result(results)

    def _fail_group(self, group: Computed, error: Exception) -> None:
        """Fails exactly the requests of a group whose compute raised; their state is unchanged."""
        if isinstance(group, Block):
            self._release_block(group, ComputeFailed(f"computing the step failed: {error}"))
            return
        for session, work in zip(group.sessions, group.works, strict=True):
            session.in_flight = False
            session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"computing the step failed: {error}"))

    @staticmethod
    def _release_block(block: Block, error: Exception) -> None:
        """Fails a block whose compute did not happen; its sessions are unchanged and free for their next work."""
        positions = block.stacked_inputs.shape[1]
        for session in block.sessions:
            if session.in_flight:
                session.in_flight = False
                session.queued_positions -= positions
        if not block.future.done():
            block.future.set_exception(error)

    def fail(self, taken: Taken, error: Exception, blocks: list[Block] = ()) -> None:  # type: ignore[assignment]
        """After an unexpected error in an iteration of the batching loop: fails the requests it took that are
        still unanswered (INTERNAL) and frees their sessions for their next requests."""
        for block in blocks:
            self._release_block(block, ComputeFailed(f"the server failed on this request: {error}"))
        for session, work in taken:
            if session.in_flight:
                session.in_flight = False
                session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"the server failed on this request: {error}"))


def group_by_length(taken: Taken) -> list[Group]:
    """The taken steps as model calls: one group per number of positions (usually a single group)."""
    length = len(taken[0][1].inputs)  # type: ignore[arg-type]
    if all(len(work.inputs) == length for _, work in taken):  # type: ignore[arg-type]  # the common case
        return [Group(sessions=[session for session, _ in taken], works=[work for _, work in taken])]
    groups: dict[int, Group] = {}
    for session, work in taken:
        assert work.inputs is not None
        group = groups.setdefault(len(work.inputs), Group(sessions=[], works=[]))
        group.sessions.append(session)
        group.works.append(work)
    return list(groups.values())


def _run_op(session: Session, work: Work) -> None:
    """Runs a lifecycle operation; its failure concerns that operation alone."""
    assert work.op is not None
    try:
        result = work.op(session)
    except Exception as exc:  # noqa: BLE001 - reported to the operation's caller
        if not work.future.done():
            work.future.set_exception(exc)
        return
    if not work.future.done():
        work.future.set_result(result)


def draining() -> Draining:
    """The refusal of a step while a drain writes the sessions."""
    return Draining("server is shutting down; resume this session when it is back")


def mismatch(session: Session, expected_step: int) -> StepMismatch:
    """The refusal of a step whose `expected_step` is not where the session will be."""
    return StepMismatch(
        f"expected_step {expected_step} does not match session {session.id!r}: it is at step "
        f"{session.step} with {session.queued_positions} more positions queued"
    )
