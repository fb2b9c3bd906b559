"""The engine: a thin asyncio layer that owns the batching loop, the worker thread and the streams.

What runs is decided by the batcher (`batcher.py`: queues, batch formation, applying outputs) and who
exists by the session manager (`session_manager.py`: table, lifecycle, sweep, spill); both are plain
synchronous code. This module awaits: it takes each request's future, wakes the loop, hands the model
call of each batch to a worker thread (or runs a short lone step right here), and answers. Session
lifecycle operations (create, reset, close) go through the same per-session queues as steps, so they
are ordered with that session's steps and never touch state that a running batch uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lstmserve.server.backend import MemoryOnly, SessionBackend
from lstmserve.server.batcher import (
    Batcher,
    Block,
    Columns,
    Computed,
    SchedulerLimits,
    Taken,
    Work,
    draining,
    group_by_length,
    mismatch,
)
from lstmserve.server.errors import InvalidInput, ServeError, SessionNotFound
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import PreparedCall, Runner
from lstmserve.server.session_manager import (
    REPLAY_WINDOW_S,
    SPILL_RETRY_S,
    SessionCopy,
    SessionManager,
    release_free_memory,
)
from lstmserve.server.sessions import Session, SessionTable, StepResult, is_session_id
from lstmserve.server.state import SessionState, StateStore
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.text import shown

if TYPE_CHECKING:
    from lstmserve.server.generation import Generation

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "REPLAY_WINDOW_S",
    "SPILL_RETRY_S",
    "Scheduler",
    "SchedulerLimits",
    "SessionCopy",
    "release_free_memory",
]

# When the scheduler is idle, a step of at most this many positions runs at once on the
# event loop (about 0.1 ms for the default model) instead of through the queue and the
# worker thread: two event-loop hops and a thread hop cost more than that.
INLINE_MAX_POSITIONS = 4

# A longer step computed alone also runs on the event loop when the model's measured time per
# position says it takes at most this long: the longest a lone step may hold the loop, for a
# saving of the hops to the worker thread and back (one session sending 16-token requests to the
# default model: p50 0.928 to 1.003 ms on the loop against 1.195 to 1.269 through the worker;
# docs/benchmarks.md). Longer steps run on the worker and leave the loop to the streams.
INLINE_BUDGET_S = 0.001

# With two batches in flight, the fewest rows a batch is cut down to when the rows waiting are split between
# the two (fewer rows waiting go as one batch).
MIN_LANE_ROWS = 16


class Scheduler:
    """Runs every step of every session through the batcher; the server's one engine.

    Args:
        runner: the model.
        store: the state of every session (host or device pools).
        limits: batch, queue and session bounds.
        metrics: the server's metrics.
        backend: where sessions go besides memory (MemoryOnly if not given).
    """

    def __init__(
        self,
        runner: Runner,
        store: StateStore,
        limits: SchedulerLimits,
        metrics: Metrics,
        backend: SessionBackend | None = None,
    ) -> None:
        self.runner = runner
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.backend: SessionBackend = backend if backend is not None else MemoryOnly()
        self.batcher = Batcher(limits, metrics)
        self.manager = SessionManager(store, self.backend, metrics, limits.session_ttl_s, self.batcher.discard)
        self.sessions: SessionTable = self.manager.sessions
        self._frozen = False
        self._wakeup = asyncio.Event()
        # Model calls on the worker (up to the lanes), and the rows of the batches that hold a lane.
        self._computing = 0
        self._rows_computing = 0
        # Lanes (`StateStore.max_lanes`) free for a batch: a batch computing holds one.
        self._lanes = max(1, min(limits.batches_in_flight, store.max_lanes))
        if self._lanes < limits.batches_in_flight:
            log.warning(
                "%d batches in flight asked, but this state store keeps %d at a time: running %d",
                limits.batches_in_flight, store.max_lanes, self._lanes,
            )  # fmt: skip
        self._free_lanes = list(range(self._lanes - 1, -1, -1))
        self._lane_tasks: set[asyncio.Task[None]] = set()
        # An error a lane's task could not contain; the batching loop raises it (as it would its own).
        self._lane_failure: BaseException | None = None
        # Set by the sweeper; the batching loop runs the sweep between batches.
        self._sweep_due = False
        # Callers of copy_all_sessions waiting for the batching loop to take the copies between batches.
        self._copies_due: list[asyncio.Future[list[SessionCopy]]] = []
        self._last_compute_end = 0.0
        # Seconds per position of the last step longer than INLINE_MAX_POSITIONS that was alone in its model call
        # (None until one has): whether the next such step runs on the event loop (see _runs_inline).
        self._lone_seconds_per_position: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lstmserve-compute")
        # The event loop the scheduler runs on, from `start`: asyncio.get_running_loop() costs a getpid
        # system call on Python 3.11, and every step makes a future (4% of the event loop's time in
        # `py-spy record --native` of the server under `lstmserve bench --levels 256`).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Keeps the event loop polling after a step of a session stepping alone (see _keep_awake).
        self._spinner: asyncio.Task[None] | None = None
        self._spin_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Starts the batching loop and the idle-session sweeper on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._batch_loop(), name="batching loop"),
            asyncio.create_task(self._sweep_loop(), name="idle sweeper"),
        ]

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the scheduler runs on (looked up once, at `start`)."""
        return self._loop or asyncio.get_running_loop()

    def stop_accepting(self) -> None:
        """Refuses new sessions from now on (draining); existing sessions keep working."""
        self.manager.accepting = False

    def freeze(self) -> None:
        """Refuses every further step (the last moment of a drain, before state is written)."""
        self.manager.accepting = False
        self._frozen = True
        self.batcher.frozen = True

    def is_idle(self) -> bool:
        """Whether no request is queued or computing."""
        return not (self.batcher.queued or self._computing or any(s.in_flight for s in self.sessions.all()))

    async def close(self) -> None:
        """Stops the loops and the worker thread."""
        tasks = self._tasks + list(self._lane_tasks) + ([self._spinner] if self._spinner is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._loop = None

    async def failure(self) -> BaseException:
        """Waits until a loop of the scheduler ends with an error, and returns it. The loops contain every
        error they expect, so this is for the unexpected: the server must then stop taking requests that
        would never be answered. Cancelled when the scheduler closes."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = done.pop()
        if task.cancelled():
            raise asyncio.CancelledError
        return task.exception() or RuntimeError(f"the scheduler's task {task.get_name()} ended")

    # ---- session operations (all run on the event loop) ------------------
    def create_session(self, owner: str = "", session_id: str | None = None) -> Session:
        """Creates a session with zero state (under `session_id` when one is being restored)."""
        return self.manager.create(owner, session_id)

    async def find_session(self, session_id: str, owner: str = "") -> Session:
        """The live session with this id (and owner), brought back by the backend if it holds it (spilled,
        or on another replica); SessionNotFound otherwise (at once for an id that no session can have)."""
        if not is_session_id(session_id):
            raise SessionNotFound(f"session {shown(session_id)} not found (not a session id)")
        try:
            return self.sessions.get(session_id, owner)
        except SessionNotFound:
            fetched = await self.backend.fetch(session_id, owner)
            if fetched is None:
                raise
            return fetched

    async def reset_session(self, session_id: str, owner: str = "") -> Session:
        """Zeroes a session's state and step counter, after its queued steps."""
        session = await self.find_session(session_id, owner)
        reset: Session = await self._run_op(session, self.manager.reset_op)
        return reset

    async def close_session(self, session_id: str, owner: str = "") -> None:
        """Frees a session's slot, after its queued steps."""
        session = await self.find_session(session_id, owner)
        await self._run_op(session, self.manager.close_op)

    async def hand_off(self, session_id: str) -> tuple[Session, SessionState] | None:
        """Gives a session up to another replica: after its queued steps, takes a copy of its state and
        drops it here without telling the backend to forget it (its stored copy stays); requests that
        still reach it here get SessionMoved. Returns (session, state), or None if the session is not here."""
        session = self.sessions.find(session_id)
        if session is None:
            return None
        taken: tuple[Session, SessionState] = await self._run_op(session, self.manager.take_op)
        return taken

    async def read_state(self, session_id: str, owner: str = "") -> tuple[int, SessionState]:
        """A session's step counter and a copy of its state, after its queued steps."""
        step, _, state = await self.read_versioned_state(session_id, owner)
        return step, state

    async def read_versioned_state(self, session_id: str, owner: str = "") -> tuple[int, int, SessionState]:
        """A session's step counter, state version and a copy of its state, after its queued steps."""
        session = await self.find_session(session_id, owner)
        read: tuple[int, int, SessionState] = await self._run_op(session, self.manager.read_op)
        return read

    async def copy_all_sessions(self) -> list[SessionCopy]:
        """A copy of every live session (step counter, state version, state), all taken at one moment between two
        batches: every step acknowledged before this call is in it, and no half-applied batch (the copies are
        taken by the batching loop, as the idle sweep runs)."""
        future: asyncio.Future[list[SessionCopy]] = self._new_future()
        self._copies_due.append(future)
        self._wakeup.set()
        return await future

    async def restore_session(
        self, state: SessionState, step: int, owner: str = "", session_id: str | None = None
    ) -> Session:
        """Creates a session holding `state` at step counter `step` (under `session_id` if given)."""
        session = self.manager.create(owner, session_id)
        restored: Session = await self._run_op(session, self.manager.write_op(state, step))
        return restored

    def sweep_idle(self, now: float | None = None) -> int:
        """Closes (or spills) sessions idle past the TTL; see `SessionManager.sweep_idle`."""
        return self.manager.sweep_idle(now)

    # ---- steps -------------------------------------------------------------
    async def step(
        self, session: Session, inputs: np.ndarray, expected_step: int | None = None, *, replay: bool = True
    ) -> StepResult:
        """Feeds inputs ([positions] tokens or [positions, width] features) to a session.

        With `expected_step`, the request runs only if the session (with its queued
        and running steps) is at that step. If `replay` is allowed, a request that was
        already applied (same input, the session moved on by exactly its length)
        returns the stored result again instead of being applied twice.
        """
        self._require_steppable(session)
        digest = input_digest(inputs)
        if expected_step is not None:
            if _may_be_queued_resend(session, expected_step, replay):
                # Maybe a resend of a step that is still queued or computing: wait for the
                # session's earlier work to settle, then decide.
                await self._run_op(session, lambda s: None)
                self._require_live(session)
            replayed = _replayed(session, expected_step, digest, replay)
            if replayed is not None:
                return replayed
        work = Work(future=self._new_future(), inputs=inputs, digest=digest)
        if self._idle_for(session) and self._runs_inline(len(inputs), others_waiting=False):
            return self._run_now(session, work)
        # Queued right here (the session was checked live above, and nothing awaited since): the hot path.
        self.batcher.enqueue(session, work)
        self._wakeup.set()
        result: StepResult = await work.future
        return result

    async def step_many(self, steps: Sequence[tuple[Session, np.ndarray, int | None]]) -> list[StepResult | ServeError]:
        """One step for each of many sessions (a multi-session request), each (session, inputs, expected_step)
        checked and answered as `step` would, exactly-once rules included; returns each step's result or
        refusal, in order. Each session may appear once.

        The steps of sessions with nothing queued or running, the common case, go as blocks (one per
        input length, at most the largest batch each): one queue entry and one answer per block, not per
        session. A session with work queued takes its place in its own queue, as `step` would.
        """
        outcomes: list[StepResult | ServeError | None] = [None] * len(steps)
        waiting: list[tuple[int, asyncio.Future[StepResult] | asyncio.Task[StepResult]]] = []
        by_shape: dict[tuple[int, ...], list[tuple[int, Session, np.ndarray, bytes]]] = {}
        seen: set[str] = set()
        for index, (session, inputs, expected_step) in enumerate(steps):
            try:
                if session.id in seen:
                    raise InvalidInput(f"session {session.id!r} appears twice in one multi-session request")
                seen.add(session.id)
                self._require_steppable(session)
                if expected_step is not None and _may_be_queued_resend(session, expected_step, True):
                    waiting.append((index, asyncio.ensure_future(self.step(session, inputs, expected_step))))
                    continue
                digest = input_digest(inputs)
                replayed = _replayed(session, expected_step, digest, True) if expected_step is not None else None
                if replayed is not None:
                    outcomes[index] = replayed
                elif session.busy:
                    work = Work(future=self._new_future(), inputs=inputs, digest=digest)
                    self.batcher.enqueue(session, work)
                    waiting.append((index, work.future))
                else:
                    by_shape.setdefault(inputs.shape, []).append((index, session, inputs, digest))
            except ServeError as error:
                outcomes[index] = error
        blocks = [self._queue_block(rows) for rows in _chunks(by_shape.values(), self.limits.max_batch_size)]
        self._wakeup.set()
        for rows, block in blocks:
            try:
                results = await block if isinstance(block, asyncio.Future) else block
            except ServeError as error:
                results = error
            for position, (index, *_) in enumerate(rows):
                outcomes[index] = results if isinstance(results, ServeError) else results[position]
        for index, future in waiting:
            try:
                outcomes[index] = await future
            except ServeError as error:
                outcomes[index] = error
        return outcomes  # type: ignore[return-value]

    def _queue_block(
        self, rows: list[tuple[int, Session, np.ndarray, bytes]]
    ) -> tuple[list[tuple[int, Session, np.ndarray, bytes]], asyncio.Future[list[StepResult]] | ServeError]:
        """Queues the rows as one block; returns them with the block's future (or the refusal of all of them)."""
        first = rows[0][2]
        stacked = np.concatenate([inputs for _, _, inputs, _ in rows]).reshape(len(rows), *first.shape)
        block = Block([s for _, s, _, _ in rows], stacked, [d for *_, d in rows], self._new_future())
        try:
            self.batcher.enqueue_block(block)
        except ServeError as error:
            return rows, error
        return rows, block.future

    def start_generation(
        self, session: Session, prompt: np.ndarray, generation: Generation, expected_step: int | None = None
    ) -> asyncio.Future[StepResult]:
        """Queues `prompt`, then samples and feeds tokens inside the batching loop until `generation` ends;
        returns the future of the session's last step (`stop_generation` with it stops the generation after its
        current step).

        Tokens reach the caller through `generation` as they are made. With `expected_step`, it starts only if
        the session (with its queued steps) is at that step; a generation is never replayed. A future, not a
        task: with thousands of sessions generating, a task per generation (its context, coroutines and weak
        reference) was a good part of what Python's garbage collector had to walk.
        """
        self._require_steppable(session)
        if expected_step is not None and expected_step != session.step + session.queued_positions:
            raise mismatch(session, expected_step)
        running: asyncio.Future[StepResult] = self._queue(
            session, Work(future=self._new_future(), inputs=prompt, generation=generation)
        )
        self.batcher.generation_started(running)
        return running

    def stop_generation(self, running: asyncio.Future[StepResult]) -> None:
        """Stops a generation after its current step: cancels `running` (the future `start_generation` returned)
        and tells the batching loop at once. Cancelling `running` directly works too, but the loop learns of it one
        turn of the event loop later (its done callbacks), and may run the generation one step more meanwhile."""
        self.batcher.stop_generation(running)

    def _require_steppable(self, session: Session) -> None:
        """Raises unless the session is live and the server still takes steps (not frozen by a drain)."""
        self.manager.require_live(session)
        if self._frozen:
            raise draining()

    def _require_live(self, session: Session) -> None:
        self.manager.require_live(session)

    def _idle_for(self, session: Session) -> bool:
        """Whether this session is stepping alone: nothing queued or computing anywhere, and the last
        compute was this session's alone. Under concurrent load the last batch held other
        sessions, so steps go through the batcher and batches form."""
        return self.batcher.last_solo is session and not self._computing and self.batcher.idle_for(session)

    def _runs_inline(self, positions: int, *, others_waiting: bool) -> bool:
        """Whether a batch of one step of this many positions runs on the event loop: a short one always;
        a longer one only when no other session waits (not when --max-batch-size 1 holds the others
        back: back to back on the loop, long steps would starve their streams), and when the last such
        step's time per position says it takes at most INLINE_BUDGET_S. Until a longer step has run
        (on the worker thread), longer ones go there."""
        if positions <= INLINE_MAX_POSITIONS:
            return True
        rate = self._lone_seconds_per_position
        return not others_waiting and rate is not None and positions * rate <= INLINE_BUDGET_S

    def _run_now(self, session: Session, work: Work) -> StepResult:
        """Runs one step right here on the event loop (the idle fast path: no queue, no wake-ups); only
        for a step that `_runs_inline` expects to be short.

        Only called when the scheduler is idle, so ordering and the one-batch-at-a-time
        rule hold exactly as if the batching loop had taken it alone.
        """
        assert work.inputs is not None
        session.queued_positions += len(work.inputs)
        session.in_flight = True
        session.last_used = time.monotonic()
        taken = [(session, work)]
        try:
            self._run_here(taken)
        except Exception as error:  # noqa: BLE001 - as in the batching loop: this request fails, the server goes on
            self._recover(taken, error)
        self._keep_awake()
        return work.future.result()

    def _keep_awake(self) -> None:
        """Keeps the event loop polling, instead of sleeping, for `idle_spin_us` after a step computed alone.

        A client stepping alone sends its next step about one round trip after the answer. If
        the server sleeps meanwhile, the core idles and that step's model call runs cold: a
        batch-1 call took 65 us back to back but 134 us after 400 us asleep
        (scripts/batch1_after_idle.py), and with the default model and a local client one session's
        p50 step latency was 0.07 to 0.2 ms lower with polling (docs/benchmarks.md). Polling costs CPU
        only while steps keep coming within the window: none at rest, up to most of a core for
        one session that steps without pause. Only when nothing else is waiting (not between the
        tokens of a generation running alone, say), and any batch of several rows stops it: under
        concurrent load the loop is busy anyway, and polling would only split its batches.
        """
        if not self.limits.idle_spin_us or self.batcher.ready or self.batcher.queued or self._computing:
            return
        self._spin_until = time.perf_counter() + self.limits.idle_spin_us / 1e6
        if self._spinner is None or self._spinner.done():
            self._spinner = self.loop.create_task(self._spin())

    async def _spin(self) -> None:
        """Yields to the event loop until `_spin_until` (each step alone moves it on), or until a batch
        computes: while a callback is ready, the loop polls for I/O without blocking."""
        while time.perf_counter() < self._spin_until and not self._computing:
            await asyncio.sleep(0)

    # ---- internals -------------------------------------------------------
    def _new_future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    async def _run_op(self, session: Session, op: Any) -> Any:
        """Runs a lifecycle operation in the session's queue, after its queued steps; returns what it returns."""
        return await self._queue(session, Work(future=self._new_future(), op=op))

    def _queue(self, session: Session, work: Work) -> asyncio.Future[Any]:
        """Queues `work` on a live session and wakes the batching loop; returns the work's future."""
        self.manager.require_live(session)
        self.batcher.enqueue(session, work)
        self._wakeup.set()
        return work.future

    async def _batch_loop(self) -> None:
        """Collects a batch, computes it on the worker thread, resolves it; and again.

        Requests that arrive while a batch computes form the next one. The idle sweep
        runs between batches, so it never touches state that a batch is using.

        With `batches_in_flight` 2 (and a store with two lanes), a second batch forms and is handed to the
        worker while the first computes, so that applying one batch's outputs and forming the next overlap
        the other's model call; the work waiting is then split between the two (`_room`). The model calls
        still run one at a time, on the one worker thread. A lane whose batch was applied forms its next batch
        itself while work waits (`_run_lane`); this loop starts a lane again once one is free. With 1 (the
        default), one batch at a time: the lone-session paths below are the same in both.

        One batch at a time is what measured best through gRPC on the 2-core development machine, where the
        streams, not the model, are the limit (docs/benchmarks.md); two in flight is for a host where the
        batching loop's own Python is (the in-process engine, a GPU).
        """
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            wait_s = self.limits.max_wait_us / 1e6
            if wait_s and not self._computing and time.perf_counter() - self._last_compute_end > wait_s:
                # The server was idle: give the requests arriving right behind this one a chance.
                await asyncio.sleep(wait_s)
            if self._sweep_due:
                self._sweep_due = False
                try:
                    self.manager.sweep_idle()
                except Exception:  # noqa: BLE001 - a sweep that failed is tried again at the next one
                    log.exception("the idle sweep failed; the batching loop goes on")
            if self._lane_failure is not None:
                raise self._lane_failure  # the batching loop ends: the server stops (see `failure`)
            if self._copies_due and len(self._free_lanes) == self._lanes:
                self._copy_sessions()  # with no batch computing: a copy never sees a batch half applied
            while self._free_lanes and not self._copies_due:
                taken: Taken = []
                columns: list[Columns] = []
                try:
                    taken, columns = self._next_batch()
                    if not taken and not columns:
                        break
                    positions = len(taken[0][1].inputs) if len(taken) == 1 and not columns else 0  # type: ignore[arg-type]
                    if positions and not self._rows_computing and self._runs_inline(
                        positions, others_waiting=bool(self.batcher.ready)
                    ):
                        self._run_here(taken)
                        self._keep_awake()
                        await asyncio.sleep(0)  # a session generating alone streams its tokens as they come
                        break
                except Exception as error:  # noqa: BLE001 - a bug here must fail its requests, not stop every session
                    self._recover(taken, error, columns)
                    break
                lane = self._in_lane(taken, columns)
                if self._lanes == 1:
                    await lane  # one batch at a time: the loop goes on once it is applied
                    break
                task = self.loop.create_task(lane)
                self._lane_tasks.add(task)
                task.add_done_callback(self._lane_freed)

    def _next_batch(self) -> tuple[Taken, list[Columns]]:
        """The next batch (see `Batcher.collect_batch`), of at most `_room` rows."""
        return self.batcher.collect_batch(self._room())

    def _room(self) -> int:
        """How many rows the next batch may take: the largest batch, or with two lanes about half of the rows
        waiting and computing, so that the two batches in flight are of about the same size."""
        largest = self.limits.max_batch_size
        if self._lanes == 1:
            return largest
        waiting = self.batcher.waiting_rows()
        if not self._rows_computing and waiting < 2 * MIN_LANE_ROWS:
            return largest  # too few to split: one batch
        room = min(largest, max(MIN_LANE_ROWS, -(-(waiting + self._rows_computing) // 2)))
        if self.batcher.blocks:  # the oldest multi-session block always fits (it is at most the largest batch)
            room = max(room, len(self.batcher.blocks[0].sessions))
        return room

    def _in_lane(self, taken: Taken, columns: list[Columns]) -> Coroutine[Any, Any, None]:
        """Takes a free lane for a batch at once (so that the next batch sees it taken) and returns the coroutine
        that computes and applies the batch there: awaited with one lane, a task of its own with two."""
        lane = self._free_lanes.pop()
        rows = len(taken) + sum(len(c.sessions) for c in columns)
        self._rows_computing += rows
        return self._run_lane(lane, rows, taken, columns)

    async def _run_lane(self, lane: int, rows: int, taken: Taken, columns: list[Columns]) -> None:
        """Computes and applies a batch in `lane`; with two lanes, then goes on with the next batch in the same
        lane while there is one (see `_next_in_lane`), and frees the lane when there is none."""
        try:
            while True:
                try:
                    await self._run_on_worker(taken, columns, lane)
                except Exception as error:  # noqa: BLE001 - as in the batching loop: its requests fail, the server goes on
                    try:
                        self._recover(taken, error, columns)
                    except BaseException as fatal:  # noqa: BLE001 - handed to the batching loop, which ends with it
                        self._lane_failure = fatal
                        self._wakeup.set()
                        return
                finally:
                    self._rows_computing -= rows
                if self._lanes == 1:
                    return
                taken, columns = self._next_in_lane()
                if not taken and not columns:
                    return
                rows = len(taken) + sum(len(c.sessions) for c in columns)
                self._rows_computing += rows
        finally:
            self._free_lanes.append(lane)

    def _next_in_lane(self) -> tuple[Taken, list[Columns]]:
        """The next batch for a lane whose batch was just applied (two lanes), or none.

        Formed here, right after applying, the batch reaches the worker before the streams that applying woke
        have run; through the batching loop it would wait behind all of them (`lstmserve bench --mode generate`
        through gRPC with two in flight: a third of the model calls were handed over after the worker had
        finished the other lane's, by 1.7 ms on average). None when the batching loop has work of its own
        between batches (session copies, a failure) or for a lone row, which the loop may run inline.
        """
        if self._lane_failure is not None or self._copies_due:
            return [], []
        if not self._rows_computing and self.batcher.waiting_rows() <= 1:
            return [], []
        try:
            return self._next_batch()
        except Exception as error:  # noqa: BLE001 - as in the batching loop: its requests fail, the server goes on
            self._recover([], error, [])
            return [], []

    def _lane_freed(self, task: asyncio.Task[None]) -> None:
        """A batch computed as a task of its own is applied: its lane is free for the next batch."""
        self._lane_tasks.discard(task)
        self._wakeup.set()

    def _copy_sessions(self) -> None:
        """Answers the waiting `copy_all_sessions` calls (run by the batching loop, between batches)."""
        waiting, self._copies_due = self._copies_due, []
        copies = self.manager.copy_all()
        for future in waiting:
            if not future.done():
                future.set_result(copies)

    def _recover(self, taken: Taken, error: Exception, blocks: Sequence[Columns] = ()) -> None:
        """After an unexpected error in an iteration of the batching loop: fails the requests it took that are
        still unanswered (INTERNAL), frees their sessions for their next requests, and logs it. The loop goes on."""
        count = len(taken) + sum(len(block.sessions) for block in blocks)
        log.error("the batching loop failed on %d request(s); they fail and the loop goes on", count, exc_info=error)
        self.batcher.fail(taken, error, blocks)
        self._requeue(taken, blocks)

    # ---- the compute routine: gather, model call (here or on the worker), scatter; then apply ----
    def _run_here(self, taken: Taken) -> None:
        """Computes a batch right here on the event loop (a short step alone: the thread hops would cost more
        than holding the loop), then applies it."""
        groups = group_by_length(taken)
        self.batcher.finish(groups, *_run_to_end(self._compute(groups, on_worker=False)))
        self._requeue(taken)

    async def _run_on_worker(self, taken: Taken, blocks: Sequence[Columns] = (), lane: int = 0) -> None:
        """Computes a batch (steps, blocks, carried generations) with its model calls on the worker thread, while
        the event loop serves streams, then applies it."""
        groups: list[Computed] = [*blocks, *(group_by_length(taken) if taken else [])]
        self._computing += 1
        try:
            outputs, timing = await self._compute(groups, on_worker=True, lane=lane)
        finally:
            self._computing -= 1
        self.batcher.finish(groups, outputs, timing)
        self._requeue(taken, blocks)

    async def _compute(
        self, groups: Sequence[Computed], *, on_worker: bool, lane: int = 0
    ) -> tuple[list[np.ndarray | Exception], BatchTiming]:
        """Gather, model call, scatter for each model call in turn; returns each group's outputs and how long
        each phase took. The one compute routine of the engine: with `on_worker`, each model call runs on the
        worker thread (and this awaits it); without, everything runs right here and nothing awaits.

        Groups whose inputs have the same shape (single-token steps, carried generations, a multi-session
        request's block) share one model call, and each gets its rows of the outputs.

        Only the model call leaves the loop: gather and scatter (a fraction of a millisecond for
        a full batch) stay on it. On the worker they would take the GIL several times each, and
        every time wait for the busy event loop to give it up (up to `sys.getswitchinterval()`):
        `scripts/worker_gil_wait.py` measured a 256-row gather, model call and scatter at 53 ms on a
        worker beside a busy thread, against 5.3 ms alone. Calls run one after another: they share
        the store's batch buffers, and the runner reuses its output buffer from one call to the next.

        A call that fails leaves its sessions' state untouched (scatter never ran) and
        returns its exception for each of its groups; the other calls are unaffected.
        """
        started = time.perf_counter()
        loop = self.loop
        phases = [0.0, 0.0, 0.0]  # gather, model call (with any hops), scatter: ModelStatistics' phases
        outputs: list[np.ndarray | Exception] = [None] * len(groups)  # type: ignore[list-item]
        for members, slots, inputs in _model_calls(groups):
            try:
                t0 = time.perf_counter()
                buffers = self.store.gather(slots, lane)
                call = self.runner.prepare(inputs, buffers, lane)
                t1 = time.perf_counter()
                if on_worker:
                    seconds = await loop.run_in_executor(self._executor, self._timed_execute, call)
                else:
                    seconds = self._timed_execute(call)
                logits = call.logits()
                t2 = time.perf_counter()
                self._note_lone_run(len(slots), inputs, seconds)
                self.store.scatter(slots, buffers)
                t3 = time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - reported to exactly the requests of this call
                log.error("a batch of %d session(s) failed", len(slots), exc_info=exc)
                for index, _ in members:
                    outputs[index] = exc
                continue
            phases[0] += t1 - t0
            phases[1] += t2 - t1
            phases[2] += t3 - t2
            for index, rows in members:
                outputs[index] = logits if rows is None else logits[rows]
        self._last_compute_end = time.perf_counter()
        self.metrics.compute_latency.observe(self._last_compute_end - started)
        return outputs, BatchTiming(started, *phases)

    def _timed_execute(self, call: PreparedCall) -> float:
        """Runs a prepared model call; returns its seconds, timed on the thread that runs it (so without the hops)."""
        started = time.perf_counter()
        self.runner.execute(call)
        return time.perf_counter() - started

    def _note_lone_run(self, rows: int, inputs: np.ndarray, seconds: float) -> None:
        """Keeps the time per position of a step longer than INLINE_MAX_POSITIONS that was the only row of
        its model call (alone, or the one row of its length in a batch: either way a batch-1 call)."""
        if rows == 1 and inputs.shape[1] > INLINE_MAX_POSITIONS:
            self._lone_seconds_per_position = seconds / inputs.shape[1]

    def _requeue(self, taken: Taken, blocks: Sequence[Columns] = ()) -> None:
        if self.batcher.requeue(taken, self.sessions, blocks):
            self._wakeup.set()

    async def _sweep_loop(self) -> None:
        interval = min(self.limits.session_ttl_s / 4, 5.0)
        while True:
            await asyncio.sleep(interval)
            self._sweep_due = True  # the batching loop sweeps when nothing computes
            self._wakeup.set()


def _model_calls(groups: Sequence[Computed]) -> list[tuple[list[tuple[int, slice | None]], np.ndarray, np.ndarray]]:
    """The model calls of a batch: groups whose inputs have the same shape go together. Each call is its
    members (a group's index and its rows of the call, None for all of them), its slots and its inputs."""
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for index, group in enumerate(groups):
        inputs = group.inputs()
        by_shape.setdefault(inputs.shape[1:], []).append((index, group.slots(), inputs))
    calls: list[tuple[list[tuple[int, slice | None]], np.ndarray, np.ndarray]] = []
    for parts in by_shape.values():
        if len(parts) == 1:
            index, slots, inputs = parts[0]
            calls.append(([(index, None)], slots, inputs))
            continue
        members: list[tuple[int, slice | None]] = []
        start = 0
        for index, _, inputs in parts:
            members.append((index, slice(start, start + len(inputs))))
            start += len(inputs)
        calls.append((members, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])))
    return calls


def _chunks(groups: Iterable[list[T]], size: int) -> Iterator[list[T]]:
    """Every group cut into consecutive chunks of at most `size` items."""
    for group in groups:
        for start in range(0, len(group), size):
            yield group[start : start + size]


def input_digest(inputs: np.ndarray) -> bytes:
    """What identifies a step's input, to recognise a resent step: its bytes when they are at most 16 (one or two
    tokens, the common case of many sessions stepped together), else a 16-byte BLAKE2b hash of them (0.4 µs a
    step saved where the bytes are short; a hash equal to the bytes of another input is as unlikely as any
    BLAKE2b collision)."""
    data = inputs.tobytes()
    return data if len(data) <= 16 else hashlib.blake2b(data, digest_size=16).digest()


def _may_be_queued_resend(session: Session, expected_step: int, replay: bool) -> bool:
    """Whether a step whose `expected_step` is not where the session will be could still be the resend of a step
    that is queued or computing (so the answer must wait for the session's earlier work)."""
    return expected_step != session.step + session.queued_positions and replay and session.busy


def _replayed(session: Session, expected_step: int, digest: bytes, replay: bool) -> StepResult | None:
    """None if the session will be at `expected_step`; its stored result if this is the resend of its last
    step (same input, applied once); else StepMismatch."""
    if expected_step == session.step + session.queued_positions:
        return None
    last = session.last_result
    if (
        replay
        and last is not None
        and session.queued_positions == 0
        and last.start_step == expected_step
        and last.step == session.step
        and last.input_digest == digest
    ):
        return last
    raise mismatch(session, expected_step)


def _run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends (`_compute` without the worker) to its end, synchronously."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended; it was meant to run to its end at once")
