"""Keeps sessions outside the process: brings them back at start, checkpoints them, writes them on drain.

Works on any `SessionStore` (the state directory or Redis). A session is written when its state
changed since it was last written (`Session.version`); on drain every session is written or, when
unchanged, only released (with Redis, so that other replicas may take it over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from lstmserve.server.errors import ServeError
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.session_store import SessionStore
from lstmserve.server.sessions import Session
from lstmserve.server.state import SessionState
from lstmserve.server.text import LISTED_ITEMS, listing

log = logging.getLogger(__name__)


class NotWritten(OSError):
    """Some sessions could not be written (or closed sessions' copies deleted); the message names each.

    Args:
        failures: '<id> (<error>)' of each session that was not written.
        unremoved: '<id> (<error>)' of each closed session whose stored copy is still there.
    """

    def __init__(self, failures: list[str], unremoved: list[str]) -> None:
        self.failures = failures
        self.unremoved = unremoved
        super().__init__(self.describe(LISTED_ITEMS))

    def describe(self, limit: int) -> str:
        """What failed, naming the first `limit` sessions of each kind."""
        parts = []
        if self.failures:
            parts.append(f"{len(self.failures)} session(s) were not written: {listing(self.failures, limit)}")
        if self.unremoved:
            parts.append(
                f"the stored copies of {len(self.unremoved)} closed session(s) could not be deleted "
                f"(they would come back at the next start): {listing(self.unremoved, limit)}"
            )
        return "; ".join(parts)


class SessionKeeper:
    """Checkpoints and drain writes of one server's sessions.

    Args:
        scheduler: the server's scheduler (its sessions and their state).
        store: where the snapshots go.
        encode: (state, step) -> snapshot blob.
        remove: deletes a closed or expired session's stored copy.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        store: SessionStore,
        encode: Callable[[SessionState, int], bytes],
        remove: Callable[[str], None],
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self._encode = encode
        self._remove = remove
        # session id -> (the live session, its state version last written). Keyed on the Session object too:
        # a session that left (handed over, spilled) and came back is a new object whose version restarts,
        # so a version alone could match one written before it left and skip a write it needs.
        self._written_versions: dict[str, tuple[Session, int]] = {}
        self._task: asyncio.Task[None] | None = None
        # Ids of closed sessions whose stored copy could not be deleted yet (see `forget`).
        self.unremoved: set[str] = set()

    async def restore_all(self) -> int:
        """Brings back every session the store holds for this server (the state directory), under its id
        and owner; returns how many."""
        stored = await self.store.read_all()
        for item in stored:
            session = await self.scheduler.restore_session(item.state, item.step, item.owner, item.session_id)
            self._written_versions[item.session_id] = (session, session.version)
        return len(stored)

    def forget(self, session_id: str) -> None:
        """The scheduler's `on_session_dropped`: a closed or expired session's stored copy goes.

        If deleting it fails (a read-only disk, say), the failure is logged with the id and the deletion
        is tried again at every checkpoint and at the drain (`unremoved` lists those still pending): a
        closed session must not come back at the next start."""
        self._written_versions.pop(session_id, None)
        try:
            self._remove(session_id)
        except Exception as error:  # noqa: BLE001 - the session is closed in memory either way
            self.unremoved.add(session_id)
            log.error(
                "session %s was closed, but deleting its stored copy failed (%s); tried again at every checkpoint",
                session_id,
                error,
            )
        else:
            self.unremoved.discard(session_id)

    def _retry_removals(self) -> list[str]:
        """Tries again the deletions that failed; returns '<id> (<error>)' for each that fails again."""
        failures = []
        for session_id in sorted(self.unremoved):
            if self.scheduler.sessions.find(session_id) is not None:  # a new session under that id: its copy stays
                self.unremoved.discard(session_id)
                continue
            try:
                self._remove(session_id)
            except Exception as error:  # noqa: BLE001 - tried again next time
                failures.append(f"{session_id} ({error})")
            else:
                self.unremoved.discard(session_id)
        return failures

    async def checkpoint(self, *, release: bool = False, retry_s: float = 0.0) -> int:
        """Writes every session whose state changed since it was last written; returns how many.

        With `release` (the drain), every session is let go after its write, the unchanged ones too.
        A session whose write fails does not stop the others; failed writes (and deletions of closed
        sessions' copies that failed before) are tried again, with backoff, for up to `retry_s` seconds.
        If some still fail, `NotWritten` names them, after every other session was written.
        """
        written = 0
        live = self.scheduler.sessions
        # Sessions that left without being closed (handed over, spilled) are forgotten here.
        self._written_versions = {key: entry for key, entry in self._written_versions.items() if entry[0] in live}
        pending = live.all()
        deadline = time.monotonic() + retry_s
        delay_s = 0.05
        while True:
            failures: list[str] = []
            failed: list[Session] = []
            for session in pending:
                try:
                    written += await self._write(session, release)
                except Exception as error:  # noqa: BLE001 - the store failed for this session: the others go on
                    failed.append(session)
                    failures.append(f"{session.id} ({error})")
            unremoved = self._retry_removals()
            if not failures and not unremoved:
                return written
            if time.monotonic() + delay_s > deadline:
                raise NotWritten(failures, unremoved)
            log.warning(
                "%d session write(s) or deletion(s) failed, trying again: %s", len(failures) + len(unremoved), listing(failures + unremoved)
            )
            await asyncio.sleep(delay_s)
            delay_s = min(1.0, delay_s * 2)
            pending = [session for session in failed if session in live]

    async def _write(self, session: Session, release: bool) -> int:
        """Writes one session if it changed (and releases it with `release`); returns 1 if a snapshot was written."""
        unchanged = self._written_versions.get(session.id) == (session, session.version) and not session.busy
        if unchanged and not release:
            return 0
        blob, version = b"", session.version  # an empty blob keeps the stored snapshot
        if not unchanged:
            try:
                step, version, state = await self.scheduler.read_versioned_state(session.id, session.owner)
            except ServeError:
                return 0  # closed or handed over meanwhile (a draining replica does not fetch it back)
            blob = self._encode(state, step)
        saved = await self.store.save(session.id, session.owner, blob, release=release)
        if session in self.scheduler.sessions:
            if saved:
                self._written_versions[session.id] = (session, version)
        elif not session.moved:  # closed while it was being written: the copy must go too
            self.forget(session.id)
        return 1 if blob else 0

    def start(self, interval_s: float) -> None:
        """Checkpoints every `interval_s` seconds from now on."""
        self._task = asyncio.create_task(self._loop(interval_s))

    def stop(self) -> None:
        """Stops the periodic checkpoints."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.checkpoint()
            except NotWritten as error:  # tried again at the next interval; the sessions stay in memory
                log.error("checkpoint: %s", error)
            except Exception:  # noqa: BLE001 - a failed checkpoint is retried at the next interval
                log.exception("checkpoint failed")
