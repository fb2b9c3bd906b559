"""Session management: the session table, slots, lifecycle operations, the idle sweep and spilling.

Everything here is synchronous and runs on the event loop. Lifecycle operations that must be ordered
with a session's steps (reset, restore, close, hand-off, reads of its state) are built here as
functions of the session (`SessionOp`) and run by the batcher between batches, in the session's
queue; `SessionManager` never touches state that a running batch uses.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lstmserve.server.backend import SessionBackend
from lstmserve.server.errors import Draining, SessionExists, SessionMoved, SessionNotFound
from lstmserve.server.metrics import Metrics
from lstmserve.server.sessions import Session, SessionTable
from lstmserve.server.state import SessionState, StateStore
from lstmserve.server.text import listing

log = logging.getLogger(__name__)

# How long a session keeps its last result, to answer a resent request (`expected_step`)
# after a broken stream. Idle sessions then drop it, so they cost little memory.
REPLAY_WINDOW_S = 60.0

# After a spill write fails (a full or read-only disk), how long the sweep waits before it tries to spill again:
# the sessions stay in memory meanwhile, and the log gets one line per try, not one per sweep.
SPILL_RETRY_S = 30.0

SessionOp = Callable[[Session], Any]


@dataclass(frozen=True)
class SessionCopy:
    """A copy of one live session as it stood between two batches: what a checkpoint writes."""

    session: Session
    step: int
    version: int
    state: SessionState


class SessionManager:
    """Owns the session table and the slots of the state store; creates, drops, sweeps and spills sessions.

    Args:
        store: the state store (one slot per live session).
        backend: where sessions go besides memory (forgotten, spilled).
        metrics: session counters and gauges.
        session_ttl_s: how long a session may idle before the sweep closes (or spills) it.
        discard_pending: fails the requests still queued for a session that is dropped (the batcher's).
    """

    def __init__(
        self,
        store: StateStore,
        backend: SessionBackend,
        metrics: Metrics,
        session_ttl_s: float,
        discard_pending: Callable[[Session, Exception], None],
    ) -> None:
        self.sessions = SessionTable()
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.session_ttl_s = session_ttl_s
        self.accepting = True
        self._discard_pending = discard_pending
        # After a spill write failed, no spill is tried before this time (monotonic seconds).
        self._spill_retry_at = 0.0
        # Called with every session that leaves the table (the engine forgets what it knew of it).
        self._on_drop: list[Callable[[Session], None]] = []

    def on_drop(self, callback: Callable[[Session], None]) -> None:
        """Registers a callback run with every session that leaves the table."""
        self._on_drop.append(callback)

    # ---- creation and lookup --------------------------------------------
    def create(self, owner: str = "", session_id: str | None = None) -> Session:
        """Creates a session with zero state (under `session_id` when one is being restored)."""
        if not self.accepting:
            raise Draining("server is shutting down and takes no new sessions")
        if session_id is not None and self.sessions.find(session_id) is not None:
            raise SessionExists(f"session id {session_id!r} is already taken")
        slot = self.store.allocate()
        session = self.sessions.add(slot, owner, session_id)
        self.metrics.sessions_created.inc()
        self.metrics.active_sessions.set(len(self.sessions))
        return session

    def require_live(self, session: Session) -> None:
        """Raises SessionNotFound (SessionMoved if handed over) unless the session is in the table."""
        if session not in self.sessions:
            if session.moved:
                raise SessionMoved(f"session {session.id!r} moved to another replica; retry")
            raise SessionNotFound(f"session {session.id!r} not found (closed or expired)")

    # ---- operations run in a session's queue ------------------------------
    def reset_op(self, session: Session) -> Session:
        """Zeroes a session's state and step counter."""
        self.store.reset(session.slot)
        session.version += 1
        session.step = 0
        session.last_result = None
        return session

    def write_op(self, state: SessionState, step: int) -> SessionOp:
        """An operation that sets a session's state and step counter (a restore)."""

        def write(session: Session) -> Session:
            self.store.write(session.slot, state)
            session.version += 1
            session.step = step
            return session

        return write

    def read_op(self, session: Session) -> tuple[int, int, SessionState]:
        """A session's step counter, state version and a copy of its state."""
        return session.step, session.version, self.store.read(session.slot)

    def take_op(self, session: Session) -> tuple[Session, SessionState]:
        """Takes a copy of a session's state and drops it here for another replica (its stored copy stays)."""
        state = self.store.read(session.slot)
        session.moved = True
        self.drop(session, spilled=True)
        return session, state

    def close_op(self, session: Session) -> None:
        """Closes a session: its slot is freed and its stored copy forgotten."""
        self.drop(session)

    def copy_all(self) -> list[SessionCopy]:
        """A copy of every live session (only between two batches)."""
        store = self.store
        return [SessionCopy(s, s.step, s.version, store.read(s.slot)) for s in self.sessions.all()]

    # ---- leaving memory ---------------------------------------------------
    def drop(self, session: Session, spilled: bool = False) -> None:
        """Removes a session: its queued requests fail, its slot is freed, and (unless it was spilled or
        handed over) the backend forgets its stored copy."""
        if session.moved:
            gone: Exception = SessionMoved(f"session {session.id!r} moved to another replica; retry")
        else:
            gone = SessionNotFound(f"session {session.id!r} was closed")
        self._discard_pending(session, gone)
        session.queued_positions = 0
        self.sessions.remove(session)
        self.store.release(session.slot)
        for callback in self._on_drop:
            callback(session)
        self.metrics.active_sessions.set(len(self.sessions))
        if not spilled:
            # After the slot is free: a failure to delete the stored copy must not leak the slot.
            try:
                self.backend.forget(session.id)
            except Exception:  # noqa: BLE001 - the session is closed here either way
                log.exception("session %s was closed, but deleting its stored copy failed", session.id)

    def sweep_idle(self, now: float | None = None) -> int:
        """Closes sessions idle past the TTL (spills them, with a backend that spills), and forgets stored
        results older than the replay window. Returns how many sessions left memory.

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
        expired = self.sessions.idle_since(now - self.session_ttl_s)
        gone = 0
        failures: list[str] = []
        for session in expired:
            if spills:
                try:
                    self.backend.spill(session, self.store.read(session.slot))
                except Exception as error:  # noqa: BLE001 - kept in memory; the store said why
                    failures.append(f"{session.id} ({error})")
                    continue
            self.drop(session, spilled=spills)
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
            log.info("%s %d session(s) idle for more than %.0f s", verb, gone, self.session_ttl_s)
        return gone


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
