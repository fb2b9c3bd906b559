"""The session table: ids, slots, step counters and idle times of live sessions."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from lstmserve.server.errors import InvalidInput, SessionNotFound
from lstmserve.server.text import shown

# What a client may propose as a session id: long enough not to collide, safe as a file name and a header.
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")

# Sessions of Open Inference Protocol sequences have ids with this prefix (server/oip.py);
# clients may not propose such ids, so a sequence and a session can never collide.
SEQUENCE_ID_PREFIX = "oip-"


class StepResult(NamedTuple):
    """What one step request produced.

    A named tuple, not a frozen dataclass: the batching loop makes one per row of a multi-session block,
    and a frozen dataclass sets each field through `object.__setattr__` (about five times the time).

    Args:
        logits: float32 [positions, output_size] for every fed position.
        start_step: the session's step counter before this request.
        step: the session's step counter after it.
        batch_size: how many sessions the batch that computed it held.
        input_digest: identifies the request's input (to recognise a resent request).
    """

    logits: np.ndarray
    start_step: int
    step: int
    batch_size: int
    input_digest: bytes


@dataclass(eq=False, slots=True)
class Session:
    """One live session. Mutated only by the scheduler, on the event loop.

    Kept small (an idle session costs a few hundred bytes besides its state): slots, and
    a queue list that exists only while requests are waiting (it rarely holds more than two).
    """

    id: str
    slot: int
    owner: str
    step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pending: list[Any] | None = None
    queued_positions: int = 0
    in_flight: bool = False
    last_result: StepResult | None = None
    version: int = 0  # bumped on every change of state (steps, reset, restore): what checkpoints compare
    moved: bool = False  # handed over to another replica: requests still arriving here are told to retry

    @property
    def busy(self) -> bool:
        """Whether work is queued or running for this session."""
        return self.in_flight or bool(self.pending)


def new_session_id() -> str:
    """A fresh 128-bit random session id (32 hex characters)."""
    return secrets.token_hex(16)


def is_session_id(text: str) -> bool:
    """Whether `text` has the form of a session id (16 to 64 characters of A-Z a-z 0-9 _ -)."""
    return SESSION_ID_PATTERN.fullmatch(text) is not None


def check_proposed_id(text: str) -> str:
    """A client-proposed session id, or InvalidInput naming what is wrong with it."""
    if not is_session_id(text):
        raise InvalidInput(
            f"proposed session_id {shown(text)} must be 16 to 64 characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    if text.startswith(SEQUENCE_ID_PREFIX):
        raise InvalidInput(f"proposed session_id {text!r} may not start with {SEQUENCE_ID_PREFIX!r} (sequence ids)")
    return text


class SessionTable:
    """Maps session ids to sessions. Lookups check the owner: another owner's id is NOT_FOUND."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: Session) -> bool:
        return self._sessions.get(session.id) is session

    def add(self, slot: int, owner: str, session_id: str | None = None) -> Session:
        """Registers a new session on a slot under a fresh id (or a given one, when restoring from disk)."""
        if session_id is None:
            session_id = new_session_id()
            while session_id in self._sessions:  # 2**-128 odds, but never reuse a live id
                session_id = new_session_id()
        session = Session(id=session_id, slot=slot, owner=owner)
        self._sessions[session_id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        """The live session with this id, whoever owns it (for the server's own bookkeeping)."""
        return self._sessions.get(session_id)

    def get(self, session_id: str, owner: str) -> Session:
        """Returns the live session with this id and owner, or raises SessionNotFound."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(f"session {shown(session_id)} not found (unknown, closed or expired)")
        return session

    def remove(self, session: Session) -> None:
        """Forgets a session."""
        self._sessions.pop(session.id, None)

    def idle_since(self, cutoff: float) -> list[Session]:
        """Sessions with no work whose last use was before `cutoff` (monotonic seconds)."""
        return [s for s in self._sessions.values() if not s.busy and s.last_used < cutoff]

    def forget_results_before(self, cutoff: float) -> int:
        """Drops the stored last result of sessions idle since before `cutoff` (monotonic seconds); returns how many."""
        forgotten = 0
        for session in self._sessions.values():
            if session.last_result is not None and not session.busy and session.last_used < cutoff:
                session.last_result = None
                forgotten += 1
        return forgotten

    def all(self) -> list[Session]:
        """Every live session."""
        return list(self._sessions.values())
