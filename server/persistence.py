"""The state directory: session snapshots on disk, so sessions survive a restart.

One file per session, `<session id>.session`: a JSON header (id, owner) and the session's
snapshot blob (see `snapshot.py`), followed by a SHA-256 of both, or with `--snapshot-secret-file`
an HMAC-SHA256 under the secret (the owner is then as safe from forgery as the state). Files are written
atomically: to a temporary file in the same directory, fsync, rename, fsync the directory.
A file that fails its checks is logged, moved aside as `*.corrupt`, and skipped; the other
sessions are restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
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
        content = body + self._tag(body)
        target = self.file_of(session_id)
        temporary = target.with_suffix(f"{SUFFIX}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):  # no partial file left behind (a full disk, say)
                temporary.unlink(missing_ok=True)
            raise
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
        if len(content) < _LEN.size + 32 or not hmac.compare_digest(self._tag(body), digest):
            if self._secret and len(content) >= _LEN.size + 32 and hashlib.sha256(body).digest() == digest:
                raise InvalidInput("file is not signed, and this server only accepts files signed with its secret")
            raise InvalidInput("checksum mismatch (truncated, corrupted, or signed with another secret)")
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

    def _tag(self, body: bytes) -> bytes:
        """The file's trailer: an HMAC-SHA256 of header and blob under the snapshot secret (so that nobody
        without it can change a session's owner), or a plain SHA-256 without a secret."""
        if self._secret:
            return hmac.new(self._secret, body, hashlib.sha256).digest()
        return hashlib.sha256(body).digest()

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
