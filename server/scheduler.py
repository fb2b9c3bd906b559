"""The scheduler: a continuous batching loop over every session's pending requests.

Each iteration takes at most one pending request per session (so a session's
requests run in order), groups the taken steps by length, runs each group as
one batch (gather state, ONNX Runtime on a worker thread, scatter state), and
resolves each request. Requests that arrive while a batch runs form the next
batch. Session lifecycle operations (create, reset, close) go through the same
per-session queues, so they are ordered with that session's steps and never
touch state that a running batch uses.

Grouping by length: the model has no per-row sequence lengths (a `sequence_lens`
input would block CUDA graphs and costs a CPU copy), so rows of one call must
have the same number of positions. Single-token steps, by far the most common,
all share one call; each distinct prompt length gets its own call in the same
iteration.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import numpy as np

from lstmserve.server.backend import MemoryOnly, SessionBackend
from lstmserve.server.device_state import AnyStateStore
from lstmserve.server.errors import (
    ComputeFailed,
    Draining,
    Overloaded,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StepMismatch,
)
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import BindableState, Runner
from lstmserve.server.sampling import sample_rows
from lstmserve.server.sessions import Session, SessionTable, StepResult, is_session_id
from lstmserve.server.state import SessionState
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.text import listing, shown

if TYPE_CHECKING:
    from lstmserve.server.generation import Generation

log = logging.getLogger(__name__)


# How long a session keeps its last result, to answer a resent request (`expected_step`)
# after a broken stream. Idle sessions then drop it, so they cost little memory.
REPLAY_WINDOW_S = 60.0

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

# After a spill write fails (a full or read-only disk), how long the sweep waits before it tries to spill again:
# the sessions stay in memory meanwhile, and the log gets one line per try, not one per sweep.
SPILL_RETRY_S = 30.0


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
class _Work:
    """One queued item of a session: a step (inputs set) or a lifecycle operation (op set).

    A step with a generation is queued again after it runs, with the next sampled token
    as its input, until the generation finishes; only then is its future resolved.
    """

    future: asyncio.Future[Any]
    inputs: np.ndarray | None = None
    op: Callable[[Session], Any] | None = None
    generation: Generation | None = None
    digest: bytes = b""
    enqueued: float = field(default_factory=time.perf_counter)
    # When a generation's next token was queued (0.0: it waits since `enqueued`), for ModelStatistics' queue time.
    waiting_since: float = 0.0


@dataclass(frozen=True)
class SessionCopy:
    """A copy of one live session as it stood between two batches: what a checkpoint writes."""

    session: Session
    step: int
    version: int
    state: SessionState


@dataclass(frozen=True)
class _Group:
    """Steps of the same length run as one ONNX Runtime call."""

    sessions: list[Session]
    works: list[_Work]


class Scheduler:
    """Owns the session table and the state store, and runs every step through the batcher."""

    def __init__(
        self,
        runner: Runner,
        store: AnyStateStore,
        limits: SchedulerLimits,
        metrics: Metrics,
        backend: SessionBackend | None = None,
    ) -> None:
        self.runner = runner
        # Where sessions go besides memory (closed ones forgotten, idle ones spilled, missing ones fetched).
        self.backend: SessionBackend = backend if backend is not None else MemoryOnly()
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.sessions = SessionTable()
        self._ready: OrderedDict[str, Session] = OrderedDict()
        self._queued = 0
        self._accepting = True
        self._frozen = False
        self._wakeup = asyncio.Event()
        # Batches being computed (0 or 1).
        self._computing = 0
        # Set by the sweeper; the batching loop runs the sweep between batches.
        self._sweep_due = False
        # Callers of copy_all_sessions waiting for the batching loop to take the copies between batches.
        self._copies_due: list[asyncio.Future[list[SessionCopy]]] = []
        # Generations running (their streams get tokens in chunks sized by this).
        self._generating = 0
        # The session whose step was the only one in the last compute (None after a real batch).
        self._last_solo: Session | None = None
        self._last_compute_end = 0.0
        # Seconds per position of the last step longer than INLINE_MAX_POSITIONS that was alone in its model call
        # (None until one has): whether the next such step runs on the event loop (see _runs_inline).
        self._lone_seconds_per_position: float | None = None
        # After a spill write failed, no spill is tried before this time (monotonic seconds).
        self._spill_retry_at = 0.0
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

    def stop_accepting(self) -> None:
        """Refuses new sessions from now on (draining); existing sessions keep working."""
        self._accepting = False

    def freeze(self) -> None:
        """Refuses every further step (the last moment of a drain, before state is written)."""
        self._accepting = False
        self._frozen = True

    def is_idle(self) -> bool:
        """Whether no request is queued or computing."""
        return not (self._queued or self._computing or any(s.in_flight for s in self.sessions.all()))

    async def close(self) -> None:
        """Stops the loops and the worker thread."""
        tasks = self._tasks + ([self._spinner] if self._spinner is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._loop = None

    # ---- session operations (all run on the event loop) ------------------
    def create_session(self, owner: str = "", session_id: str | None = None) -> Session:
        """Creates a session with zero state (under `session_id` when one is being restored)."""
        if not self._accepting:
            raise Draining("server is shutting down and takes no new sessions")
        if session_id is not None and self.sessions.find(session_id) is not None:
            raise SessionExists(f"session id {session_id!r} is already taken")
        slot = self.store.allocate()
        session = self.sessions.add(slot, owner, session_id)
        self.metrics.sessions_created.inc()
        self.metrics.active_sessions.set(len(self.sessions))
        return session

    async def find_session(self, session_id: str, owner: str = "") -> Session:
        """The live session with this id (and owner), brought back from the spill store if it was
        spilled there; SessionNotFound otherwise (at once for an id that no session can have)."""
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

        def reset(s: Session) -> Session:
            self.store.reset(s.slot)
            s.version += 1
            s.step = 0
            s.last_result = None
            return s

        return await self._enqueue(session, _Work(future=self._new_future(), op=reset))

    async def close_session(self, session_id: str, owner: str = "") -> None:
        """Frees a session's slot, after its queued steps."""
        session = await self.find_session(session_id, owner)
        await self._enqueue(session, _Work(future=self._new_future(), op=self._drop))

    async def hand_off(self, session_id: str) -> tuple[Session, SessionState] | None:
        """Gives a session up to another replica: after its queued steps, takes a copy of its state and
        drops it here without telling the backend to forget it (its stored copy stays); requests that still reach
        it here get SessionMoved. Returns (session, state), or None if the session is not here."""
        session = self.sessions.find(session_id)
        if session is None:
            return None

        def take(s: Session) -> tuple[Session, SessionState]:
            state = self.store.read(s.slot)
            s.moved = True
            self._drop(s, spilled=True)
            return s, state

        taken: tuple[Session, SessionState] = await self._enqueue(session, _Work(future=self._new_future(), op=take))
        return taken

    async def read_state(self, session_id: str, owner: str = "") -> tuple[int, SessionState]:
        """A session's step counter and a copy of its state, after its queued steps."""
        step, _, state = await self.read_versioned_state(session_id, owner)
        return step, state

    async def read_versioned_state(self, session_id: str, owner: str = "") -> tuple[int, int, SessionState]:
        """A session's step counter, state version and a copy of its state, after its queued steps."""
        session = await self.find_session(session_id, owner)
        return await self._enqueue(
            session, _Work(future=self._new_future(), op=lambda s: (s.step, s.version, self.store.read(s.slot)))
        )

    async def copy_all_sessions(self) -> list[SessionCopy]:
        """A copy of every live session (step counter, state version, state), all taken at one moment between two
        batches: every step acknowledged before this call is in it, and no half-applied batch (the copies are
        taken by the batching loop, as the idle sweep runs)."""
        future: asyncio.Future[list[SessionCopy]] = self._new_future()
        self._copies_due.append(future)
        self._wakeup.set()
        return await future

    def _copy_sessions(self) -> None:
        """Answers the waiting `copy_all_sessions` calls (run by the batching loop, between batches)."""
        waiting, self._copies_due = self._copies_due, []
        store = self.store
        copies = [SessionCopy(s, s.step, s.version, store.read(s.slot)) for s in self.sessions.all()]
        for future in waiting:
            if not future.done():
                future.set_result(copies)

    async def restore_session(
        self, state: SessionState, step: int, owner: str = "", session_id: str | None = None
    ) -> Session:
        """Creates a session holding `state` at step counter `step` (under `session_id` if given)."""
        session = self.create_session(owner, session_id)

        def write(s: Session) -> Session:
            self.store.write(s.slot, state)
            s.version += 1
            s.step = step
            return s

        return await self._enqueue(session, _Work(future=self._new_future(), op=write))

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
        digest = hashlib.blake2b(inputs.tobytes(), digest_size=16).digest()
        if expected_step is not None:
            if expected_step != session.step + session.queued_positions and replay and session.busy:
                # Maybe a resend of a step that is still queued or computing: wait for the
                # session's earlier work to settle, then decide.
                await self._enqueue(session, _Work(future=self._new_future(), op=lambda s: None))
                self._require_live(session)
            projected = session.step + session.queued_positions
            last = session.last_result
            if expected_step != projected:
                if (
                    replay
                    and last is not None
                    and session.queued_positions == 0
                    and last.start_step == expected_step
                    and last.step == session.step
                    and last.input_digest == digest
                ):
                    return last
                raise _mismatch(session, expected_step)
        work = _Work(future=self._new_future(), inputs=inputs, digest=digest)
        if self._idle_for(session) and self._runs_inline(len(inputs), others_waiting=False):
            return self._run_now(session, work)
        result: StepResult = await self._enqueue(session, work)
        return result

    async def generate(
        self, session: Session, prompt: np.ndarray, generation: Generation, expected_step: int | None = None
    ) -> StepResult:
        """Feeds `prompt`, then samples and feeds tokens inside the batching loop until `generation` ends.

        Tokens reach the caller through `generation` as they are made; the result is the
        session's last step. With `expected_step`, it starts only if the session (with its
        queued steps) is at that step; a generation is never replayed.
        """
        self._require_steppable(session)
        if expected_step is not None and expected_step != session.step + session.queued_positions:
            raise _mismatch(session, expected_step)
        work = _Work(future=self._new_future(), inputs=prompt, generation=generation)
        self._generating += 1
        try:
            result: StepResult = await self._enqueue(session, work)
        finally:
            self._generating -= 1
        return result

    def _require_steppable(self, session: Session) -> None:
        """Raises unless the session is live and the server still takes steps (not frozen by a drain)."""
        self._require_live(session)
        if self._frozen:
            raise _draining()

    def _require_live(self, session: Session) -> None:
        """Raises SessionNotFound if the session was closed or expired (e.g. during a generation)."""
        if session not in self.sessions:
            if session.moved:
                raise SessionMoved(f"session {session.id!r} moved to another replica; retry")
            raise SessionNotFound(f"session {session.id!r} not found (closed or expired)")

    def _idle_for(self, session: Session) -> bool:
        """Whether this session is stepping alone: nothing queued or computing anywhere, and the last
        compute was this session's alone. Under concurrent load the last batch held other
        sessions, so steps go through the batcher and batches form."""
        return self._last_solo is session and not (
            self._ready or self._queued or self._computing or session.busy
        )

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

    def _run_now(self, session: Session, work: _Work) -> StepResult:
        """Runs one step right here on the event loop (the idle fast path: no queue, no wake-ups); only
        for a step that `_runs_inline` expects to be short.

        Only called when the scheduler is idle, so ordering and the one-batch-at-a-time
        rule hold exactly as if the batching loop had taken it alone.
        """
        assert work.inputs is not None
        session.queued_positions += len(work.inputs)
        session.in_flight = True
        session.last_used = time.monotonic()
        groups = [_Group(sessions=[session], works=[work])]
        try:
            self._finish(groups, *self._compute(groups))
        except Exception as error:  # noqa: BLE001 - as in the batching loop: this request fails, the server goes on
            self._recover([(session, work)], error)
        self._keep_awake()
        return work.future.result()  # type: ignore[no-any-return]

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
        if not self.limits.idle_spin_us or self._ready or self._queued or self._computing:
            return
        self._spin_until = time.perf_counter() + self.limits.idle_spin_us / 1e6
        if self._spinner is None or self._spinner.done():
            self._spinner = (self._loop or asyncio.get_running_loop()).create_task(self._spin())

    async def _spin(self) -> None:
        """Yields to the event loop until `_spin_until` (each step alone moves it on), or until a batch
        computes: while a callback is ready, the loop polls for I/O without blocking."""
        while time.perf_counter() < self._spin_until and not self._computing:
            await asyncio.sleep(0)

    def sweep_idle(self, now: float | None = None) -> int:
        """Closes sessions idle past the TTL (spills them, with a spill store), and forgets stored results
        older than the replay window. Returns how many sessions left memory.

        A session whose spill write fails (a full or read-only disk, say) stays in memory, live and
        steppable, and is tried again SPILL_RETRY_S later; the failure is logged with its id. Nothing
        raised here can reach the batching loop.
        """
        now = time.monotonic() if now is None else now
        if self.sessions.forget_results_before(now - REPLAY_WINDOW_S):
            release_free_memory()
        spills = self.backend.spills_idle
        if spills and now < self._spill_retry_at:
            return 0  # the last spill failed: the store gets a rest before the next try
        cutoff = now - self.limits.session_ttl_s
        expired = self.sessions.idle_since(cutoff)
        gone = 0
        failures: list[str] = []
        for session in expired:
            if spills:
                try:
                    self.backend.spill(session, self.store.read(session.slot))
                except Exception as error:  # noqa: BLE001 - kept in memory; the store said why
                    failures.append(f"{session.id} ({error})")
                    continue
            self._drop(session, spilled=spills)
            gone += 1
        if failures:
            self._spill_retry_at = now + SPILL_RETRY_S
            log.error(
                "could not spill %d idle session(s); they stay in memory, live, and are tried again in %.0f s: %s",
                len(failures),
                SPILL_RETRY_S,
                listing(failures),
            )
        if gone:
            self.metrics.evictions.inc(gone)
            verb = "spilled" if spills else "closed"
            log.info("%s %d session(s) idle for more than %.0f s", verb, gone, self.limits.session_ttl_s)
        return gone

    # ---- internals -------------------------------------------------------
    def _new_future(self) -> asyncio.Future[Any]:
        return (self._loop or asyncio.get_running_loop()).create_future()

    def _drop(self, session: Session, spilled: bool = False) -> None:
        if self._last_solo is session:
            self._last_solo = None
        while session.pending:  # requests queued behind a close: the session is gone
            work = session.pending.pop(0)
            self._queued -= 1
            if not work.future.done():
                if session.moved:
                    work.future.set_exception(SessionMoved(f"session {session.id!r} moved to another replica; retry"))
                else:
                    work.future.set_exception(SessionNotFound(f"session {session.id!r} was closed"))
        session.queued_positions = 0
        self.sessions.remove(session)
        self.store.release(session.slot)
        self._ready.pop(session.id, None)
        self.metrics.active_sessions.set(len(self.sessions))
        if not spilled:
            # After the slot is free: a failure to delete the stored copy must not leak the slot.
            try:
                self.backend.forget(session.id)
            except Exception:  # noqa: BLE001 - the session is closed here either way
                log.exception("session %s was closed, but deleting its stored copy failed", session.id)

    async def _enqueue(self, session: Session, work: _Work) -> Any:
        self._require_live(session)
        if self._queued >= self.limits.max_queue:
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
        self._queued += 1  # the queue_depth gauge is updated once per batch, in _collect
        if not session.in_flight:
            self._ready.setdefault(session.id, session)
        self._wakeup.set()
        return await work.future

    def _collect(self) -> list[tuple[Session, _Work]]:
        """Takes at most one step per ready session, running lifecycle ops inline."""
        taken: list[tuple[Session, _Work]] = []
        while self._ready and len(taken) < self.limits.max_batch_size:
            _, session = self._ready.popitem(last=False)
            while session.pending:
                work = session.pending.pop(0)
                self._queued -= 1
                if work.future.cancelled() and work.op is None:
                    session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
                    continue  # the client gave up before the step ran
                if work.op is not None:
                    self._run_op(session, work)
                    if session not in self.sessions:  # the op closed it
                        break
                    continue
                taken.append((session, work))
                session.in_flight = True
                break
            if not session.pending:
                session.pending = None  # idle sessions keep no empty list
        self.metrics.queue_depth.set(self._queued)
        return taken

    def _run_op(self, session: Session, work: _Work) -> None:
        assert work.op is not None
        try:
            result = work.op(session)
        except Exception as exc:  # an op's failure concerns that op alone
            if not work.future.done():
                work.future.set_exception(exc)
            return
        if not work.future.done():
            work.future.set_result(result)

    async def _batch_loop(self) -> None:
        """Collects a batch, computes it on the worker thread, resolves it; and again.

        Requests that arrive while a batch computes form the next one. The idle sweep
        runs between batches, so it never touches state that a batch is using.

        Measured four times and dropped: keeping two batches in flight (two buffer lanes,
        ready sessions split in halves so that Python work overlaps the compute). The last two
        tries, with only the model call on the worker, raised the scheduler's own generation rate
        by a third (scripts/scheduler_generation_loop.py) but gave no steady gain through gRPC on
        the 2-core development machine, where the streams and the machine they share are the
        limit, and the varied batch sizes grew the buffers kept per size (docs/benchmarks.md).
        One batch at a time is also what lets the runner hand back single-position logits
        in a buffer that its next run reuses (`Runner.run`): `_resolve` copies them first.
        """
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            wait_s = self.limits.max_wait_us / 1e6
            if wait_s and time.perf_counter() - self._last_compute_end > wait_s:
                # The server was idle: give the requests arriving right behind this one a chance.
                await asyncio.sleep(wait_s)
            if self._sweep_due:
                self._sweep_due = False
                try:
                    self.sweep_idle()
                except Exception:  # noqa: BLE001 - a sweep that failed is tried again at the next one
                    log.exception("the idle sweep failed; the batching loop goes on")
            if self._copies_due:
                self._copy_sessions()
            taken: list[tuple[Session, _Work]] = []
            try:
                taken = self._collect()
                positions = len(taken[0][1].inputs) if len(taken) == 1 else 0  # type: ignore[arg-type]
                if positions and self._runs_inline(positions, others_waiting=bool(self._ready)):
                    await self._run_alone(taken)
                elif taken:
                    await self._run_batch(taken)
            except Exception as error:  # noqa: BLE001 - a bug here must fail its requests, not stop every session
                self._recover(taken, error)

    def _recover(self, taken: list[tuple[Session, _Work]], error: Exception) -> None:
        """After an unexpected error in an iteration of the batching loop: fails the requests it took that are
        still unanswered (INTERNAL), frees their sessions for their next requests, and logs it. The loop goes on."""
        log.error("the batching loop failed on %d request(s); they fail and the loop goes on", len(taken), exc_info=error)
        for session, work in taken:
            if session.in_flight:
                session.in_flight = False
                session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"the server failed on this request: {error}"))
        self._requeue(taken)

    async def failure(self) -> BaseException:
        """Waits until a loop of the scheduler ends with an error, and returns it. The loops contain every
        error they expect, so this is for the unexpected: the server must then stop taking requests that
        would never be answered. Cancelled when the scheduler closes."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = done.pop()
        if task.cancelled():
            raise asyncio.CancelledError
        return task.exception() or RuntimeError(f"the scheduler's task {task.get_name()} ended")

    async def _run_alone(self, taken: list[tuple[Session, _Work]]) -> None:
        """Runs one step right here on the event loop: for a step expected to be short (`_runs_inline`), the
        thread hops would cost more than holding the loop.

        Then yields to the other tasks once, so that a session generating alone streams its
        tokens as they come instead of starving the event loop.
        """
        groups = _group_by_length(taken)
        self._finish(groups, *self._compute(groups))
        self._requeue(taken)
        self._keep_awake()
        await asyncio.sleep(0)

    async def _run_batch(self, taken: list[tuple[Session, _Work]]) -> None:
        """Computes a batch (ONNX Runtime on the worker thread), then resolves its requests and queues
        what follows them."""
        groups = _group_by_length(taken)
        self._computing += 1
        try:
            outputs, timing = await self._compute_offloaded(groups)
        finally:
            self._computing -= 1
        self._finish(groups, outputs, timing)
        self._requeue(taken)

    def _finish(self, groups: list[_Group], outputs: list[np.ndarray | Exception], timing: BatchTiming) -> None:
        """Notes when the compute ended and resolves its requests."""
        self._last_compute_end = time.perf_counter()
        self._resolve(groups, outputs, timing)

    def _requeue(self, taken: list[tuple[Session, _Work]]) -> None:
        for session, _ in taken:
            if session.pending and session in self.sessions:
                self._ready.setdefault(session.id, session)
        if self._ready:
            self._wakeup.set()

    def _compute(self, groups: list[_Group]) -> tuple[list[np.ndarray | Exception], BatchTiming]:
        """Gather, run, scatter for each group, right here on the event loop (a short step alone); returns
        the outputs and how long each phase took.

        A group that fails leaves its sessions' state untouched (scatter never ran) and
        returns its exception; the other groups are unaffected.
        """
        started = time.perf_counter()
        phases = [0.0, 0.0, 0.0]  # gather, model call, scatter (ModelStatistics' compute input, infer, output)
        outputs: list[np.ndarray | Exception] = []
        for group in groups:
            try:
                t0 = time.perf_counter()
                slots, inputs, buffers = self._gather(group)
                t1 = time.perf_counter()
                logits, seconds = self._timed_run(inputs, buffers)
                t2 = time.perf_counter()
                self._note_lone_run(group, inputs, seconds)
                self.store.scatter(slots, buffers)
                _add_phases(phases, t0, t1, t2, time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - reported to exactly the requests of this group
                outputs.append(_group_failed(group, exc))
                continue
            outputs.append(logits)
        self.metrics.compute_latency.observe(time.perf_counter() - started)
        return outputs, BatchTiming(started, *phases)

    async def _compute_offloaded(self, groups: list[_Group]) -> tuple[list[np.ndarray | Exception], BatchTiming]:
        """As `_compute`, but ONNX Runtime runs on the worker thread while the event loop serves streams.

        Only the model call leaves the loop: gather and scatter (a fraction of a millisecond for
        a full batch) stay on it. On the worker they would take the GIL several times each, and
        every time wait for the busy event loop to give it up (up to `sys.getswitchinterval()`):
        `scripts/worker_gil_wait.py` measured a 256-row gather, model call and scatter at 53 ms on a
        worker beside a busy thread, against 5.3 ms alone.
        """
        started = time.perf_counter()
        loop = self._loop or asyncio.get_running_loop()
        phases = [0.0, 0.0, 0.0]  # as in _compute; the model call's phase includes the hops to the worker and back
        outputs: list[np.ndarray | Exception] = []
        for group in groups:
            try:
                t0 = time.perf_counter()
                slots, inputs, buffers = self._gather(group)
                t1 = time.perf_counter()
                logits, seconds = await loop.run_in_executor(self._executor, self._timed_run, inputs, buffers)
                t2 = time.perf_counter()
                self._note_lone_run(group, inputs, seconds)
                self.store.scatter(slots, buffers)
                _add_phases(phases, t0, t1, t2, time.perf_counter())
            except Exception as exc:  # noqa: BLE001 - as in _compute (also: the worker was shut down)
                outputs.append(_group_failed(group, exc))
                continue
            outputs.append(logits)
        self.metrics.compute_latency.observe(time.perf_counter() - started)
        return outputs, BatchTiming(started, *phases)

    def _timed_run(self, inputs: np.ndarray, buffers: BindableState) -> tuple[np.ndarray, float]:
        """The model call and its seconds, timed on the thread that runs it (so without the hops)."""
        started = time.perf_counter()
        logits = self.runner.run(inputs, buffers)
        return logits, time.perf_counter() - started

    def _note_lone_run(self, group: _Group, inputs: np.ndarray, seconds: float) -> None:
        """Keeps the time per position of a step longer than INLINE_MAX_POSITIONS that was the only row of
        its model call (alone, or the one row of its length in a batch: either way a batch-1 call)."""
        if len(group.works) == 1 and inputs.shape[1] > INLINE_MAX_POSITIONS:
            self._lone_seconds_per_position = seconds / inputs.shape[1]

    def _gather(self, group: _Group) -> tuple[np.ndarray, np.ndarray, BindableState]:
        """The group's slots, its inputs as one array, and its sessions' state gathered into batch buffers."""
        slots = np.fromiter((s.slot for s in group.sessions), dtype=np.int64, count=len(group.sessions))
        first = group.works[0].inputs
        assert first is not None
        # One concatenate, not np.stack: a quarter of the time for a batch of single tokens.
        inputs = np.concatenate([w.inputs for w in group.works]).reshape(len(group.works), *first.shape)  # type: ignore[misc]
        return slots, inputs, self.store.gather(slots)

    def _resolve(self, groups: list[_Group], outputs: list[np.ndarray | Exception], timing: BatchTiming) -> None:
        """Advances every row's session, answers finished requests, queues continuing generations and
        records the batch in the model's statistics.

        Its inner loop runs once per row of every batch (for a 256-session generation, 256 times per
        generated token of each), so it keeps to plain attribute updates.
        """
        now = time.perf_counter()
        observe_latency = self.metrics.step_latency.observe
        batch_size = sum(len(g.works) for g in groups)
        self._last_solo = groups[0].sessions[0] if batch_size == 1 else None
        self.metrics.batch_size.observe(batch_size)
        generating = self._generating
        positions = 0
        used = time.monotonic()
        computed = 0  # rows that succeeded, and the sum of when each began waiting (for the statistics)
        waiting_since_sum = 0.0
        for group, logits in zip(groups, outputs, strict=True):
            if isinstance(logits, Exception):
                self._fail_group(group, logits)
                continue
            length = logits.shape[1]  # every row of a group has this many positions
            positions += length * len(group.works)
            computed += len(group.works)
            continuing: list[int] = []  # rows of generations that go on: their next token is sampled below
            for row, session, work in zip(count(), group.sessions, group.works):
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

    def _continue_generations(self, group: _Group, rows: list[int], last_logits: np.ndarray) -> None:
        """Samples the next token of each continuing generation (all rows at once) and queues it."""
        works = [group.works[row] for row in rows]
        if self._frozen:
            for work in works:
                work.future.set_exception(_draining())
            return
        generations: list[Generation] = [w.generation for w in works]  # type: ignore[misc]
        tokens = sample_rows([g.sampler for g in generations], last_logits)
        next_inputs = tokens.astype(works[0].inputs.dtype, copy=False).reshape(-1, 1)  # type: ignore[union-attr]
        sessions = group.sessions
        # Iterating next_inputs gives each row a [1] view of its token.
        for row, work, generation, token, inputs in zip(rows, works, generations, tokens.tolist(), next_inputs):
            generation.fed = token
            work.inputs = inputs
            # Behind anything queued meanwhile (a close ends the generation, as it would end a step).
            session = sessions[row]
            if session.pending is None:
                session.pending = [work]
            else:
                session.pending.append(work)
            session.queued_positions += 1
        self._queued += len(works)

    def _fail_group(self, group: _Group, error: Exception) -> None:
        """Fails exactly the requests of a group whose compute raised; their state is unchanged."""
        for session, work in zip(group.sessions, group.works, strict=True):
            session.in_flight = False
            session.queued_positions -= len(work.inputs) if work.inputs is not None else 0
            if not work.future.done():
                work.future.set_exception(ComputeFailed(f"computing the step failed: {error}"))

    async def _sweep_loop(self) -> None:
        interval = min(self.limits.session_ttl_s / 4, 5.0)
        while True:
            await asyncio.sleep(interval)
            self._sweep_due = True  # the batching loop sweeps when nothing computes
            self._wakeup.set()


def release_free_memory() -> None:
    """Asks glibc to hand freed heap pages back to the system (a no-op elsewhere).

    Many small freed buffers (forgotten results) otherwise stay in the process's RSS.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _group_failed(group: _Group, error: Exception) -> Exception:
    log.error("a batch of %d session(s) failed", len(group.sessions), exc_info=error)
    return error


def _draining() -> Draining:
    return Draining("server is shutting down; resume this session when it is back")


def _mismatch(session: Session, expected_step: int) -> StepMismatch:
    return StepMismatch(
        f"expected_step {expected_step} does not match session {session.id!r}: it is at step "
        f"{session.step} with {session.queued_positions} more positions queued"
    )


def _add_phases(phases: list[float], start: float, gathered: float, ran: float, scattered: float) -> None:
    """Adds one group's gather, model call and scatter times to the batch's phases."""
    phases[0] += gathered - start
    phases[1] += ran - gathered
    phases[2] += scattered - ran


def _group_by_length(taken: list[tuple[Session, _Work]]) -> list[_Group]:
    length = len(taken[0][1].inputs)  # type: ignore[arg-type]
    if all(len(work.inputs) == length for _, work in taken):  # type: ignore[arg-type]  # the common case
        return [_Group(sessions=[session for session, _ in taken], works=[work for _, work in taken])]
    groups: dict[int, _Group] = {}
    for session, work in taken:
        assert work.inputs is not None
        group = groups.setdefault(len(work.inputs), _Group(sessions=[], works=[]))
        group.sessions.append(session)
        group.works.append(work)
    return list(groups.values())
