"""The batcher: the synchronous planner of the engine. It decides what runs and applies what ran.

Each session has a queue of work (steps, generations, lifecycle operations); `collect_batch` forms a
batch: multi-session blocks, then at most one step per ready session (`collect`: a session's requests
run in order, and operations queued behind a step run after it), then the generations carried from the
last batch (`GenerationRows`, columns rather than a work item per row). `group_by_length` splits the
taken steps by length, and `finish` applies the outputs: step counters, answers, and the next token of
every generation that goes on, sampled for all its rows at once. Nothing here awaits, touches a socket
or runs the model: the engine (scheduler.py) does that, and unit tests drive this with a fake runner.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lstmserve.server.errors import ComputeFailed, Draining, Overloaded, StepMismatch
from lstmserve.server.metrics import Metrics
from lstmserve.server.sampling import Sampler, common_kind, sample_kind, sample_rows
from lstmserve.server.sessions import Session, StepResult
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.token_log import TokenLog

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
    # Batches computing at once (each in a lane of its own: `StateStore.max_lanes`): with 2, the event loop
    # applies one batch's outputs and forms the next while the other computes.
    batches_in_flight: int = 1


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
        return slots_of(self.sessions)

    def inputs(self) -> np.ndarray:
        """The group's inputs as one array [rows, positions(, width)]."""
        first = self.works[0].inputs
        assert first is not None
        # One concatenate, not np.stack: a quarter of the time for a batch of single tokens.
        return np.concatenate([w.inputs for w in self.works]).reshape(len(self.works), *first.shape)


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
        return slots_of(self.sessions)

    def inputs(self) -> np.ndarray:
        """The block's inputs [rows, positions(, width)]."""
        return self.stacked_inputs


@dataclass(eq=False)
class GenerationRows:
    """Generations whose next token is sampled, carried into the next batch as columns: the rows' sessions,
    their generations' steps, their state slots and their next tokens [rows, 1]. A batch of generations
    goes from one model call to the next with a few array operations and one short loop over its rows
    (`Batcher._finish_generation_rows`), not through the session queues.

    Its sessions stay in flight (anything queued for them waits), each with its next token counted in
    `queued_positions`. `kind` is the way all rows sample when they can be sampled as one (see
    `sampling.common_kind`), else None. `checked` is the batcher's count of cancelled generations when the rows'
    requests were last seen all open (see `Batcher.cancellations`), -1 if never.
    """

    sessions: list[Session]
    works: list[Work]
    samplers: list[Sampler]
    row_slots: np.ndarray  # int64 [rows]
    logged: np.ndarray  # bool [rows]: whether the row's generation keeps its tokens in its slot's token log row
    tokens: np.ndarray  # [rows, 1], the dtype of the generations' prompts
    kind: tuple[float, int, float] | None
    waiting_since: float  # when the tokens were sampled (ModelStatistics' queue time)
    checked: int = -1

    def __len__(self) -> int:
        return len(self.sessions)

    def slots(self) -> np.ndarray:
        """The state-store slots of the rows' sessions, in row order."""
        return self.row_slots

    def inputs(self) -> np.ndarray:
        """The rows' next tokens [rows, 1]."""
        return self.tokens

    def select(self, rows: list[int] | slice) -> GenerationRows:
        """These rows only (a list of rows, in its order, or a slice)."""
        if isinstance(rows, slice):
            sessions, works, samplers = self.sessions[rows], self.works[rows], self.samplers[rows]
        else:
            sessions = [self.sessions[r] for r in rows]
            works = [self.works[r] for r in rows]
            samplers = [self.samplers[r] for r in rows]
        return GenerationRows(
            sessions,
            works,
            samplers,
            self.row_slots[rows],
            self.logged[rows],
            self.tokens[rows],
            self.kind,
            self.waiting_since,
            self.checked,
        )

    def without(self, rows: list[int]) -> GenerationRows:
        """All but these rows, in order."""
        gone = set(rows)
        return self.select([r for r in range(len(self.sessions)) if r not in gone])

    def split(self, count: int) -> tuple[GenerationRows, GenerationRows]:
        """The first `count` rows and the rest."""
        return self.select(slice(None, count)), self.select(slice(count, None))

    def as_taken(self) -> Taken:
        """The rows as queued steps (for a generation running alone: its step then runs like any lone step)."""
        taken: Taken = []
        for session, work, token in zip(self.sessions, self.works, self.tokens):
            work.inputs = token
            work.waiting_since = self.waiting_since
            work.generation.fed = int(token[0])  # type: ignore[union-attr]
            taken.append((session, work))
        return taken


@dataclass(frozen=True)
class Continuing:
    """Rows of one part of a finished batch whose generations go on: what `GenerationRows` needs, with the rows'
    last logits, from which their next tokens are sampled."""

    sessions: list[Session]
    works: list[Work]
    samplers: list[Sampler]
    slots: np.ndarray
    logged: np.ndarray  # as in GenerationRows
    kind: tuple[float, int, float] | None
    last_logits: np.ndarray
    since: float  # when the batch finished
    # Whether the sessions are still in flight with their next token counted in `queued_positions` (carried
    # generations), or were released like any finished step (generations whose prompt just ran).
    held: bool = False

    def sample(self) -> np.ndarray:
        """The rows' next tokens (int64 [rows])."""
        if self.kind is not None:
            return sample_kind(self.kind, self.last_logits)
        return sample_rows(self.samplers, self.last_logits)


Taken = list[tuple[Session, Work]]
Computed = Group | Block | GenerationRows
Columns = Block | GenerationRows  # parts of a batch that are not the taken steps of single sessions


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
        # Generations whose next token is sampled and whose sessions have nothing else queued: they join the
        # next batch as they are, in the order of the last one, without a trip through the session queues
        # (their sessions stay in flight meanwhile, so anything queued for them waits behind, in order).
        self.carried: list[GenerationRows] = []
        # The tokens and counters of running generations, by state slot (generations attach when their prompt
        # has run).
        self.token_log = TokenLog()
        # How many generations' requests were cancelled so far (their clients left; see `generation_started`).
        # Only a cancellation completes the request of a carried generation from outside the batcher, so a batch
        # of carried generations looks for rows whose client went away only when this moved since it last looked
        # (`GenerationRows.checked`): a look at every row's future was 8% of the batching loop's thread with
        # 4,096 sessions generating (`py-spy record` of the tiny model's engine series).
        self.cancellations = 0

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

    def collect_blocks(self, room: int | None = None) -> list[Block]:
        """The queued blocks that fit in `room` rows (the largest batch if not given), oldest first (each is at
        most the largest batch)."""
        taken: list[Block] = []
        room = self.limits.max_batch_size if room is None else room
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
            self._drop_carried(session, error)
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
        self.metrics.queue_depth.set(self.queued)
        return taken

    def waiting_rows(self) -> int:
        """About how many rows the next batches could take now: ready sessions, carried generations, blocks."""
        return len(self.ready) + sum(len(rows) for rows in self.carried) + sum(len(b.sessions) for b in self.blocks)

    def collect_batch(self, room: int | None = None) -> tuple[Taken, list[Columns]]:
        """The next batch of up to `room` rows (the largest batch if not given): multi-session blocks first,
        then one step of each ready session, then the carried generations. A generation running alone goes as
        a lone step (the engine may then run it inline, as any lone step)."""
        blocks = self.collect_blocks(room)
        room = (self.limits.max_batch_size if room is None else room) - sum(len(block.sessions) for block in blocks)
        taken = self.collect(room) if room > 0 else []
        room -= len(taken)
        carried = self.collect_carried(room) if room > 0 else []
        if not blocks and not taken and not carried and self.ready:  # a dropped carried row's session has work
            taken = self.collect(room)
        if not blocks and not taken and len(carried) == 1 and len(carried[0]) == 1:
            return carried[0].as_taken(), []
        return taken, [*blocks, *carried]

    def collect_carried(self, room: int) -> list[GenerationRows]:
        """Up to `room` rows of carried generations, for the batch that `collect` began (new arrivals go
        first). A row whose client went away meanwhile is dropped, and its session freed for what it has queued."""
        taken: list[GenerationRows] = []
        while self.carried and room > 0:
            rows = self.carried.pop(0)
            if len(rows) > room:
                rows, rest = rows.split(room)
                self.carried.insert(0, rest)
            gone = self._cancelled_rows(rows)
            if gone:
                for row in gone:
                    rows.works[row].generation.abandon()  # type: ignore[union-attr]
                    session = rows.sessions[row]
                    session.in_flight = False
                    session.queued_positions -= 1
                    if session.pending:
                        self.ready.setdefault(session.id, session)
                rows = rows.without(gone)
            if len(rows):
                taken.append(rows)
                room -= len(rows)
        return taken

    def generation_started(self, running: asyncio.Future[Any]) -> None:
        """Counts a generation from its start until its request `running` is done (`generating`, which sizes
        coalesced responses), and the cancellation of that request if its client goes away (`cancellations`)."""
        self.generating += 1
        running.add_done_callback(self._generation_ended)

    def stop_generation(self, running: asyncio.Future[Any]) -> None:
        """Cancels a generation's request (its client went away) and counts the cancellation at once, so that the
        batch its rows are in drops them at its next look (`cancellations`), not one turn of the event loop
        later, when the request's done callbacks run."""
        if running.cancel():
            self.cancellations += 1

    def _generation_ended(self, running: asyncio.Future[Any]) -> None:
        self.generating -= 1
        if running.cancelled():  # counted again if `stop_generation` cancelled it: one more look costs little
            self.cancellations += 1

    def _cancelled_rows(self, rows: GenerationRows) -> list[int]:
        """The rows whose request is done (cancelled: its client went away). It looks only if a generation was
        cancelled since the rows last looked (`cancellations`); the others are then known open."""
        if rows.checked == self.cancellations:
            return []
        rows.checked = self.cancellations
        return [row for row, work in enumerate(rows.works) if work.future.done()]

    def _drop_carried(self, session: Session, error: Exception) -> None:
        """Fails the carried generation of a session that leaves and takes its row out."""
        for index, rows in enumerate(self.carried):
            if session in rows.sessions:
                row = rows.sessions.index(session)
                work = rows.works[row]
                if not work.future.done():
                    work.future.set_exception(error)
                rest = rows.without([row])
                if len(rest):
                    self.carried[index] = rest
                else:
                    del self.carried[index]
                session.in_flight = False
                return

    def requeue(self, taken: Taken, live: Any, blocks: Sequence[Columns] = ()) -> bool:
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
        if session.busy or self.last_solo is not session:
            return False
        return not (self.ready or self.queued or self.carried or self.blocks)

    # ---- applying a batch --------------------------------------------------
    def finish(self, groups: Sequence[Computed], outputs: list[np.ndarray | Exception], timing: BatchTiming) -> None:
        """Advances every row's session, answers finished requests, carries continuing generations into the
        next batch and records the batch in the model's statistics.

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
        going_on: list[Continuing] = []  # per part of the batch, its generations that go on
        for group, logits in zip(groups, outputs, strict=True):
            if isinstance(logits, Exception):
                self._fail_group(group, logits)
                continue
            length = logits.shape[1]  # every row of a group has this many positions
            rows = len(group.sessions)
            positions += length * rows
            computed += rows
            if isinstance(group, GenerationRows):
                waiting_since_sum += rows * group.waiting_since
                self._finish_generation_rows(group, logits, batch_size, now, used, going_on)
                continue
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
                session.last_used = used
                waiting_since_sum += work.waiting_since or work.enqueued
                generation = work.generation
                # A generation goes on unless it finished or its client went away (its future is then done).
                session.queued_positions -= length
                session.in_flight = False
                if generation is not None and generation.fed is None:  # its prompt ran: its tokens begin
                    generation.attach(self.token_log, session.slot, work.future)
                if generation is not None and not generation.consumed(step, batch_size, generating):
                    if not work.future.done():
                        continuing.append(row)  # taken in flight again with its next token (_continue_generations)
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
                going_on.append(_continuing_rows(group, continuing, logits[continuing, -1], now))
        if going_on:
            self._continue_generations(going_on)
        self.metrics.steps.inc(batch_size)
        self.metrics.tokens.inc(positions)
        self.metrics.statistics.record(batch_size, timing, computed, waiting_since_sum, now)

    def _finish_generation_rows(
        self,
        rows: GenerationRows,
        logits: np.ndarray,
        batch_size: int,
        now: float,
        used: float,
        going_on: list[Continuing],
    ) -> None:
        """Applies a model call's outputs to carried generations: one short loop over the rows (the sessions'
        counters), the rows' tokens into the token log with a few array operations (a generation with stop
        strings passes its token through its matcher instead), then the rows that go on, with their last logits,
        join `going_on`."""
        sessions, works = rows.sessions, rows.works
        steps: list[int] = []
        for session in sessions:
            step = session.step = session.step + 1
            session.version += 1
            session.last_used = used
            steps.append(step)
        # Rows whose client went away, then rows whose generation finished.
        ended = self._cancelled_rows(rows)
        ended.extend(self._record_tokens(rows, np.array(steps, dtype=np.int64), batch_size))
        last_logits = logits[:, -1]
        if ended:
            ended = sorted(set(ended))
            for row in ended:
                self._end_generation(sessions[row], works[row], logits[row], batch_size, now)
            if len(ended) == len(rows):
                return
            last_logits = np.delete(last_logits, ended, axis=0)
            rows = rows.without(ended)
        going_on.append(
            Continuing(
                rows.sessions,
                rows.works,
                rows.samplers,
                rows.row_slots,
                rows.logged,
                rows.kind,
                last_logits,
                now,
                held=True,
            )
        )

    def _record_tokens(self, rows: GenerationRows, steps: np.ndarray, batch_size: int) -> list[int]:
        """Records the token each row's step fed (at `steps`) with its generation, wakes the streams with tokens
        enough for a response, and returns the rows whose generation made its last token."""
        log, generating, works = self.token_log, self.generating, rows.works
        tokens = rows.tokens[:, 0]
        finished: list[int] = []
        # Rows whose generation keeps no row of the token log (stop strings, or a second generation queued on
        # its session while the first ran) record their token one at a time.
        for row in np.flatnonzero(~rows.logged).tolist():
            generation = works[row].generation
            assert generation is not None
            if generation.consumed_token(int(tokens[row]), int(steps[row]), batch_size, generating):
                finished.append(row)
        owned = np.flatnonzero(rows.logged)  # the other rows, by position in `rows`
        slots = rows.row_slots[owned]
        for index in np.flatnonzero(log.backlog(slots) >= log.width).tolist():  # a whole row behind: moved out first
            works[owned[index]].generation.keep_backlog()
        log.record(slots, tokens[owned], steps[owned], batch_size)
        for index in np.flatnonzero(log.due(slots, generating)).tolist():
            works[owned[index]].generation.changed.set()
        for index in np.flatnonzero(log.made[slots] >= log.limit[slots]).tolist():
            row = int(owned[index])
            works[row].generation.finish_reason = "length"  # type: ignore[union-attr]
            finished.append(row)
        return finished

    def _end_generation(self, session: Session, work: Work, logits: np.ndarray, batch_size: int, now: float) -> None:
        """A carried generation finished (or its client went away): its session is free, its request answered."""
        session.queued_positions -= 1
        session.in_flight = False
        session.last_result = None  # a generation's last step is not a request the client can resend
        self.metrics.step_latency.observe(now - work.enqueued)
        if not work.future.done():
            step = session.step
            work.future.set_result(StepResult(logits.copy(), step - 1, step, batch_size, work.digest))

    def _continue_generations(self, going_on: list[Continuing]) -> None:
        """Samples the next token of every continuing generation of the batch (each part's rows at once) and
        carries them into the next batch as one `GenerationRows`; a session with work queued meanwhile gets its
        next token queued behind that work instead (a close then ends the generation, as it would end a step)."""
        if self.frozen:
            for part in going_on:
                for session, work in zip(part.sessions, part.works):
                    if part.held:
                        session.queued_positions -= 1
                        session.in_flight = False
                    work.future.set_exception(draining())
            return
        for part in going_on:
            if not part.held:  # in flight again, with the next token counted (moved below if work is queued)
                for session in part.sessions:
                    session.queued_positions += 1
                    session.in_flight = True
        sampled = [part.sample() for part in going_on]
        if len(going_on) == 1:
            part, tokens = going_on[0], sampled[0]
            sessions, works, samplers, slots, logged = part.sessions, part.works, part.samplers, part.slots, part.logged
            kind = part.kind
        else:
            tokens = np.concatenate(sampled)
            sessions = [s for part in going_on for s in part.sessions]
            works = [w for part in going_on for w in part.works]
            samplers = [x for part in going_on for x in part.samplers]
            slots = np.concatenate([part.slots for part in going_on])
            logged = np.concatenate([part.logged for part in going_on])
            kinds = {part.kind for part in going_on}
            kind = kinds.pop() if len(kinds) == 1 else None
        next_inputs = tokens.astype(works[0].inputs.dtype, copy=False).reshape(-1, 1)  # type: ignore[union-attr]
        # Every row's request is open here (a generation whose request was done did not go on).
        carried = GenerationRows(
            sessions, works, samplers, slots, logged, next_inputs, kind, going_on[0].since, self.cancellations
        )
        queued_behind = [row for row, session in enumerate(sessions) if session.pending is not None]
        if queued_behind:
            for row in queued_behind:
                session, work = sessions[row], works[row]
                work.inputs = next_inputs[row]
                work.waiting_since = carried.waiting_since
                work.generation.fed = int(tokens[row])  # type: ignore[union-attr]
                session.in_flight = False
                session.pending.append(work)  # type: ignore[union-attr]
            self.queued += len(queued_behind)
            carried = carried.without(queued_behind)
        if len(carried):
            self.carried.append(carried)

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
        if not isinstance(group, Group):
            self._release_columns(group, ComputeFailed(f"computing the step failed: {error}"))
            return
        for session, work in zip(group.sessions, group.works, strict=True):
            session.in_flight = False
            session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"computing the step failed: {error}"))

    @staticmethod
    def _release_columns(columns: Columns, error: Exception) -> None:
        """Fails a block or carried generations whose compute did not happen; their sessions are unchanged and
        free for their next work."""
        positions = columns.inputs().shape[1]
        for session in columns.sessions:
            if session.in_flight:
                session.in_flight = False
                session.queued_positions -= positions
        futures = [columns.future] if isinstance(columns, Block) else [w.future for w in columns.works]
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def fail(self, taken: Taken, error: Exception, blocks: Sequence[Columns] = ()) -> None:
        """After an unexpected error in an iteration of the batching loop: fails the requests it took that are
        still unanswered (INTERNAL) and frees their sessions for their next requests."""
        for block in blocks:
            self._release_columns(block, ComputeFailed(f"the server failed on this request: {error}"))
        for session, work in taken:
            if session.in_flight:
                session.in_flight = False
                session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"the server failed on this request: {error}"))


def _continuing_rows(group: Group, rows: list[int], last_logits: np.ndarray, now: float) -> Continuing:
    """The rows of a group whose generations go on, with their last logits."""
    sessions = [group.sessions[row] for row in rows]
    works = [group.works[row] for row in rows]
    samplers = [w.generation.sampler for w in works]  # type: ignore[union-attr]
    logged = np.array([w.generation.owns_log_row for w in works], dtype=np.bool_)  # type: ignore[union-attr]
    return Continuing(sessions, works, samplers, slots_of(sessions), logged, common_kind(samplers), last_logits, now)


def slots_of(sessions: list[Session]) -> np.ndarray:
    """The state-store slots of these sessions, in order (int64)."""
    return np.fromiter((s.slot for s in sessions), dtype=np.int64, count=len(sessions))


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
