"""Keeps sessions outside the process: brings them back at start, checkpoints them, writes them on drain.

Two keepers, one per backend, on a shared base (`KeeperBase`: restore, deletions of closed sessions'
copies, the checkpoint loop):
- `SessionKeeper` (Redis): a session is written when its state changed since it was last written
  (`Session.version`), one record per session; on drain every session is written or, when unchanged,
  only released, so that other replicas may take it over.
- `DirectoryKeeper` (the state directory): a round writes every live session into one file, when any
  changed since the last round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from lstmserve.server.backend import SessionHost
from lstmserve.server.errors import Draining, ServeError
from lstmserve.server.persistence import DirectorySpill
from lstmserve.server.session_store import DirectoryStore, SessionStore
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

    def __init__(self, failures: list[str], unremoved: list[str], reason: str = "") -> None:
        self.failures = failures
        self.unremoved = unremoved
        self.reason = reason
        super().__init__(self.describe(LISTED_ITEMS))

    def describe(self, limit: int) -> str:
        """What failed, naming the first `limit` sessions of each kind."""
        parts = []
        if self.failures:
            because = f" ({self.reason})" if self.reason else ""
            parts.append(f"{len(self.failures)} session(s) were not written{because}: {listing(self.failures, limit)}")
        if self.unremoved:
            parts.append(
                f"the stored copies of {len(self.unremoved)} closed session(s) could not be deleted "
                f"(they would come back at the next start): {listing(self.unremoved, limit)}"
            )
        return "; ".join(parts)


class KeeperBase:
    """What every keeper does: bring sessions back at start, delete closed sessions' stored copies (trying
    failed deletions again), and checkpoint every so often (`checkpoint` is each backend's own).

    Args:
        scheduler: the server's scheduler (its sessions and their state), through `SessionHost`.
        store: where the sessions go.
        remove: deletes a closed or expired session's stored copy.
    """

    def __init__(self, scheduler: SessionHost, store: SessionStore | DirectoryStore, remove: Callable[[str], None]) -> None:
        self.scheduler = scheduler
        self.store = store
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
        """The backend's `forget`: a closed or expired session's stored copy goes.

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
        """Writes what changed since the last checkpoint; returns how many sessions changed."""
        raise NotImplementedError

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




class SessionKeeper(KeeperBase):
    """Checkpoints and drain writes of one server's sessions, one session at a time (Redis, shared by the
    replicas: each session is its own record there).

    Args:
        scheduler: the server's scheduler (its sessions and their state), through `SessionHost`.
        store: where the snapshots go.
        encode: (state, step) -> snapshot blob.
        remove: deletes a closed or expired session's stored copy.
    """

    def __init__(
        self,
        scheduler: SessionHost,
        store: SessionStore,
        encode: Callable[[SessionState, int], bytes],
        remove: Callable[[str], None],
    ) -> None:
        super().__init__(scheduler, store, remove)
        self.session_store = store
        self._encode = encode

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
        saved = await self.session_store.save(session.id, session.owner, blob, release=release)
        if session in self.scheduler.sessions:
            if saved:
                self._written_versions[session.id] = (session, version)
        elif not session.moved:  # closed while it was being written: the copy must go too
            self.forget(session.id)
        return 1 if blob else 0


class DirectoryKeeper(KeeperBase):
    """Checkpoints and drain writes to the state directory: each is one round file holding every live session
    (one file and two fsyncs a round, whatever the number of sessions; see `persistence.py`).

    Args:
        scheduler: the server's scheduler (its sessions and their state), through `SessionHost`.
        store: the state directory.
    """

    def __init__(self, scheduler: SessionHost, store: DirectoryStore) -> None:
        super().__init__(scheduler, store, store.remove)
        self.directory = store
        # Sessions closed since the last round: the next round must be written (without them) even if nothing
        # else changed; until it is, the checkpoint on disk still holds them.
        self._closed: set[str] = set()

    def forget(self, session_id: str) -> None:
        """A closed or expired session leaves the next round, and its spill file (if any) goes now."""
        self._closed.add(session_id)
        super().forget(session_id)

    async def checkpoint(self, *, release: bool = False, retry_s: float = 0.0) -> int:
        """Writes a round with every live session if any changed (or closed) since the last; returns how many
        changed. The copies are all taken at one moment between batches, so every step acknowledged before
        this call is in the round. A failed write is tried again, with backoff, for up to `retry_s` seconds;
        then `NotWritten` names every session whose latest state is not on disk, and every closed session the
        checkpoint still holds (the last round stays as it was). `release` changes nothing: one server owns
        its directory."""
        live = self.scheduler.sessions
        if not self._closed and all(self._written_versions.get(s.id) == (s, s.version) and not s.busy for s in live.all()):
            return self._finish_removals(0)
        copies = await self.scheduler.copy_all_sessions()
        changed = [c.session.id for c in copies if self._written_versions.get(c.session.id) != (c.session, c.version)]
        closed = set(self._closed)
        deadline = time.monotonic() + retry_s
        delay_s = 0.05
        while True:
            try:
                await self.directory.save_round(copies)
                break
            except OSError as error:
                if time.monotonic() + delay_s > deadline:
                    still_stored = [f"{i} (still in the last checkpoint)" for i in sorted(closed)]
                    raise NotWritten(changed, self._retry_removals() + still_stored, reason=str(error)) from error
                log.warning("writing the checkpoint of %d session(s) failed (%s); trying again", len(copies), error)
                await asyncio.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)
        self._closed -= closed
        self._written_versions = {c.session.id: (c.session, c.version) for c in copies}
        # Spill files of sessions that are live now and in this round are older copies: they go.
        for session_id in self.directory.spilled_ids():
            session = live.find(session_id)
            if session is not None and self._written_versions.get(session_id, (None, 0))[0] is session:
                self._forget_spill_file(session_id)
        return self._finish_removals(len(changed))

    def _forget_spill_file(self, session_id: str) -> None:
        """Deletes a spill file the checkpoint made redundant (a failure is harmless: the round wins at start)."""
        try:
            self.directory.remove(session_id)
        except OSError as error:
            log.warning("an older spill file of session %s could not be deleted: %s", session_id, error)

    def _finish_removals(self, written: int) -> int:
        unremoved = self._retry_removals()
        if unremoved:
            raise NotWritten([], unremoved)
        return written


class DirectoryBackend:
    """The state directory (--state-dir) as the scheduler's `SessionBackend`: rounds of checkpoints brought
    back at start, spill files for sessions idle past the TTL (with --spill-idle), closed sessions' copies
    deleted.

    Args:
        store: the state directory's session store (rounds and spill files).
        spill: writes and reads the spill files.
        spills_idle: whether sessions idle past the TTL are spilled (else closed).
    """

    cluster = None

    def __init__(self, store: DirectoryStore, spill: DirectorySpill, *, spills_idle: bool) -> None:
        self.spills_idle = spills_idle
        self.keeper: DirectoryKeeper | None = None
        self._store = store
        self._spill = spill
        self._host: SessionHost | None = None

    async def open(self, host: SessionHost) -> int:
        """Brings back the sessions of the last round (and the spill files); returns how many."""
        self._host = host
        self.keeper = DirectoryKeeper(host, self._store)
        return await self.keeper.restore_all()

    async def fetch(self, session_id: str, owner: str) -> Session | None:
        """The owner's spilled session under this id, brought back into memory; None if there is none
        (or the server is draining: no session comes back then)."""
        if not self.spills_idle or self._host is None:
            return None
        stored = self._spill.load(session_id)
        if stored is None or stored.owner != owner:
            return None
        try:
            session = await self._host.restore_session(stored.state, stored.step, owner, session_id)
        except Draining:
            return None
        log.info("session %s brought back from the spill store at step %d", session_id, stored.step)
        return session

    def holds(self, session_id: str) -> bool:
        """Whether a spill file holds a session under this id."""
        return self.spills_idle and self._spill.load(session_id) is not None

    def spill(self, session: Session, state: SessionState) -> None:
        """Writes the session's spill file (atomically); raises OSError if it could not."""
        self._spill.save(session, state)

    def forget(self, session_id: str) -> None:
        """A closed or expired session leaves the next round; its spill file goes now."""
        if self.keeper is not None:
            self.keeper.forget(session_id)
