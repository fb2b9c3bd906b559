"""The state directory: session snapshots on disk, so sessions survive a restart.

One file per session, `<session id>.session`: a JSON header (id, owner) and the session's
snapshot blob (see `snapshot.py`), followed by a SHA-256 of both. Files are written
atomically: to a temporary file in the same directory, fsync, rename, fsync the directory.
A file that fails its checks is logged, moved aside as `*.corrupt`, and skipped; the other
sessions are restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lstmserve.server.errors import InvalidInput
from lstmserve.server.snapshot import decode_snapshot
from lstmserve.server.sessions import Session
from lstmserve.server.state import SessionState

log = logging.getLogger(__name__)

SUFFIX = ".session"
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class StoredSession:
    """A session read back from the state directory."""

    session_id: str
    owner: str
    state: SessionState
    step: int


class StateDir:
    """Reads and writes session files in one directory.

    Args:
        path: the directory (created if missing).
        fingerprint, shape, secret: what a snapshot must match to be restored (see `decode_snapshot`).
    """

    def __init__(self, path: Path, *, fingerprint: str, shape: tuple[int, int, int], secret: bytes | None) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._fingerprint = fingerprint
        self._shape = shape
        self._secret = secret

    def file_of(self, session_id: str) -> Path:
        """Where a session's file lives."""
        return self.path / f"{session_id}{SUFFIX}"

    def write(self, session_id: str, owner: str, blob: bytes) -> None:
        """Writes one session's file atomically (write, fsync, rename, fsync the directory)."""
        header = json.dumps({"id": session_id, "owner": owner}).encode()
        body = _LEN.pack(len(header)) + header + blob
        content = body + hashlib.sha256(body).digest()
        target = self.file_of(session_id)
        temporary = target.with_suffix(f"{SUFFIX}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        self._sync_directory()

    def remove(self, session_id: str) -> None:
        """Deletes a session's file, if there is one."""
        self.file_of(session_id).unlink(missing_ok=True)

    def session_ids(self) -> set[str]:
        """Ids of the sessions that have a file."""
        return {p.name[: -len(SUFFIX)] for p in self.path.glob(f"*{SUFFIX}")}

    def read(self, session_id: str) -> StoredSession:
        """Reads and checks one file; InvalidInput says what is wrong with it."""
        content = self.file_of(session_id).read_bytes()
        body, digest = content[:-32], content[-32:]
        if len(content) < _LEN.size + 32 or hashlib.sha256(body).digest() != digest:
            raise InvalidInput("checksum mismatch (truncated or corrupted file)")
        (header_len,) = _LEN.unpack_from(body)
        header = json.loads(body[_LEN.size : _LEN.size + header_len])
        if header.get("id") != session_id:
            raise InvalidInput(f"file holds session {header.get('id')!r}")
        state, step = decode_snapshot(
            body[_LEN.size + header_len :], fingerprint=self._fingerprint, shape=self._shape, secret=self._secret
        )
        return StoredSession(session_id=session_id, owner=str(header.get("owner", "")), state=state, step=step)

    def read_all(self) -> list[StoredSession]:
        """Every valid session file; bad ones are logged and moved aside as `*.corrupt`."""
        sessions = []
        for session_id in sorted(self.session_ids()):
            try:
                sessions.append(self.read(session_id))
            except (InvalidInput, ValueError, OSError) as error:
                corrupt = self.file_of(session_id).with_suffix(".corrupt")
                log.error("state file %s refused: %s; moved to %s", self.file_of(session_id), error, corrupt.name)
                os.replace(self.file_of(session_id), corrupt)
        return sessions

    def _sync_directory(self) -> None:
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class DirectorySpill:
    """The state directory as the scheduler's spill store (`--spill-idle`).

    Args:
        state_dir: where the files go.
        encode: turns (state, step) into a snapshot blob.
    """

    def __init__(self, state_dir: StateDir, encode: Callable[[SessionState, int], bytes]) -> None:
        self.state_dir = state_dir
        self._encode = encode

    def save(self, session: Session, state: SessionState) -> None:
        """Writes the session's file (atomically)."""
        self.state_dir.write(session.id, session.owner, self._encode(state, session.step))

    def load(self, session_id: str) -> StoredSession | None:
        """The spilled session, or None if there is no (valid) file for it."""
        if session_id not in self.state_dir.session_ids():
            return None
        try:
            return self.state_dir.read(session_id)
        except (InvalidInput, ValueError, OSError) as error:
            log.error("spilled session file for %s refused: %s", session_id, error)
            return None
