"""Where sessions live besides this process's memory: the `SessionBackend` the scheduler is built with.

Three backends, chosen by the server's settings (server/app.py):
- `MemoryOnly` (neither --state-dir nor --session-store): sessions live and die in memory.
- `DirectoryBackend` (server/keeper.py, --state-dir): checkpoints to a directory, spill files.
- `ClusterBackend` (server/handoff.py, --session-store redis://...): sessions shared by replicas.

The scheduler calls a backend for a session it does not hold (`fetch`), for a proposed id that may be
taken outside memory (`holds`), with a session idle past the TTL (`spill`, when `spills_idle`) and with
the id of every session closed or expired (`forget`). The backend in turn drives the scheduler through
the narrow `SessionHost` protocol, once `open` gave it the running scheduler: neither side assigns the
other's hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from lstmserve.server.sessions import Session, SessionTable
from lstmserve.server.state import SessionState

if TYPE_CHECKING:
    from lstmserve.server.handoff import Cluster
    from lstmserve.server.keeper import KeeperBase
    from lstmserve.server.session_manager import SessionCopy


class SessionHost(Protocol):
    """What a backend may ask of the scheduler that holds the sessions in memory."""

    sessions: SessionTable

    async def restore_session(
        self, state: SessionState, step: int, owner: str = "", session_id: str | None = None
    ) -> Session:
        """Creates a session holding `state` at step counter `step`."""

    async def hand_off(self, session_id: str) -> tuple[Session, SessionState] | None:
        """After the session's queued steps, takes its state and drops it here (without `forget`)."""

    async def read_versioned_state(self, session_id: str, owner: str = "") -> tuple[int, int, SessionState]:
        """A session's step counter, state version and a copy of its state, after its queued steps."""

    async def copy_all_sessions(self) -> list[SessionCopy]:
        """A copy of every live session, all taken at one moment between two batches."""


class SessionBackend(Protocol):
    """Keeps sessions outside memory: brings them back, spills idle ones, forgets closed ones.

    Its three attributes are read-only here (properties), so that a backend may narrow their types (a
    `DirectoryBackend`'s keeper is a `DirectoryKeeper`, its cluster always None).
    """

    @property
    def spills_idle(self) -> bool:
        """Whether an idle session past the TTL is spilled (else closed)."""

    @property
    def keeper(self) -> KeeperBase | None:
        """What brings sessions back at start, checkpoints them and deletes closed ones' copies, if anything does."""

    @property
    def cluster(self) -> Cluster | None:
        """This replica's part in a group of replicas sharing a session store, if there is one."""

    async def open(self, host: SessionHost) -> int:
        """Starts the backend on the running scheduler; returns how many sessions it brought back."""

    async def fetch(self, session_id: str, owner: str) -> Session | None:
        """A session of this owner that is not in memory here, brought back into `host`; None if none."""

    def holds(self, session_id: str) -> bool:
        """Whether a session under this id exists outside memory (a proposed id is then taken)."""

    def spill(self, session: Session, state: SessionState) -> None:
        """Writes a session idle past the TTL (only called when `spills_idle`); raises if it could not."""

    def forget(self, session_id: str) -> None:
        """A session was closed or expired: its stored copy goes (never raises)."""


class MemoryOnly:
    """No backend: sessions live in memory only; an idle session past the TTL is closed."""

    spills_idle = False
    keeper: KeeperBase | None = None
    cluster: Cluster | None = None

    async def open(self, host: SessionHost) -> int:
        """Nothing to bring back."""
        return 0

    async def fetch(self, session_id: str, owner: str) -> Session | None:
        """No session exists outside memory."""
        return None

    def holds(self, session_id: str) -> bool:
        """No session exists outside memory."""
        return False

    def spill(self, session: Session, state: SessionState) -> None:
        """Never called (`spills_idle` is False)."""
        raise RuntimeError("MemoryOnly does not spill sessions")

    def forget(self, session_id: str) -> None:
        """Nothing is stored."""
