"""The state directory: session state on disk, so sessions survive a restart.

Two kinds of file, each written atomically (to a temporary file in the same directory, fsync, rename,
fsync the directory):

- `sessions.checkpoint`: every live session as of the last checkpoint or drain, in one file rewritten
  whole each round. A round costs one file and two fsyncs whatever the number of sessions (a file per
  session cost two fsyncs each: 2,000 sessions took seconds a round; docs/benchmarks.md has figures).
- `<session id>.session`: one session spilled while idle (`--spill-idle`). (Earlier versions wrote every
  session this way; such files are read as spill files.)

A session is stored as one record: a JSON header (id, owner; in a spill file also the number of the
last checkpoint round before it was spilled), the session's snapshot blob (see `snapshot.py`), and a
SHA-256 of both, or with `--snapshot-secret-file` an HMAC-SHA256 under the secret (the owner is then as
safe from forgery as the state). A record that fails its checks is logged and skipped (a spill file is
moved aside as `*.corrupt`); the other sessions are restored.

Which copy wins at start: rounds are numbered, and a session that is in the checkpoint and has a spill
file too comes back from the checkpoint if its round is later than the one the spill file names (the
session came back into memory after it was spilled, and was checkpointed since), else from the spill
file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lstmserve.server.errors import InvalidInput
from lstmserve.server.sessions import Session, is_session_id
from lstmserve.server.snapshot import decode_snapshot
from lstmserve.server.state import SessionState

log = logging.getLogger(__name__)

SUFFIX = ".session"
CHECKPOINT_FILE = "sessions.checkpoint"
CHECKPOINT_MAGIC = b"LSTMCKPT"
CHECKPOINT_VERSION = 1
_LEN = struct.Struct("<I")
_CHECKPOINT_HEAD = struct.Struct("<8sHQI")  # magic, version, round, number of records
TAG_BYTES = 32


@dataclass(frozen=True)
class StoredSession:
    """A session read back from the state directory.

    Args:
        round: for a spill file, the last checkpoint round before the spill; for the checkpoint, its round.
    """

    session_id: str
    owner: str
    state: SessionState
    step: int
    round: int = 0


class StateDir:
    """Reads and writes the files of one state directory.

    Args:
        path: the directory (created if missing).
        fingerprint, shape, secret: what a snapshot must match to be restored (see `decode_snapshot`); the
            secret also keys each record's tag.
    """

    def __init__(self, path: Path, *, fingerprint: str, shape: tuple[int, int, int], secret: bytes | None) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._fingerprint = fingerprint
        self._shape = shape
        self._secret = secret
        # The number of the last checkpoint round written (read back at start); spill files record it.
        self.round = 0
        # Ids of the sessions that have a spill file (kept here: no directory listing per round or close).
        self._spilled = {p.name[: -len(SUFFIX)] for p in self.path.glob(f"*{SUFFIX}")}

    # ---- the checkpoint: every live session, one file per round ---------------------------------------
    @property
    def checkpoint_file(self) -> Path:
        """Where the checkpoint lives."""
        return self.path / CHECKPOINT_FILE

    def write_checkpoint(self, records: Iterable[tuple[str, str, bytes]]) -> int:
        """Writes a new checkpoint round holding exactly these (id, owner, snapshot blob) records, atomically;
        returns its round number."""
        encoded = [self._record(session_id, owner, blob) for session_id, owner, blob in records]
        head = _CHECKPOINT_HEAD.pack(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, self.round + 1, len(encoded))
        self._write_atomically(self.checkpoint_file, [head, *(_LEN.pack(len(r)) + r for r in encoded)])
        self.round += 1
        return self.round

    def read_checkpoint(self) -> list[StoredSession]:
        """Every valid record of the checkpoint (none if there is no checkpoint); sets `round` to its round.

        A record that fails its checks is logged and skipped; a file whose own header is bad is moved aside
        as `*.corrupt`."""
        path = self.checkpoint_file
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return []
        if len(content) < _CHECKPOINT_HEAD.size:
            return self._refuse_checkpoint(f"it is truncated ({len(content)} bytes)")
        magic, version, round_number, count = _CHECKPOINT_HEAD.unpack_from(content)
        if magic != CHECKPOINT_MAGIC or version != CHECKPOINT_VERSION:
            return self._refuse_checkpoint("it is not an lstmserve checkpoint of a version this server reads")
        self.round = int(round_number)
        sessions: list[StoredSession] = []
        offset = _CHECKPOINT_HEAD.size
        for index in range(count):
            if offset + _LEN.size > len(content):
                log.error("checkpoint %s is truncated after %d of %d records; those are restored", path, index, count)
                break
            (length,) = _LEN.unpack_from(content, offset)
            record = content[offset + _LEN.size : offset + _LEN.size + length]
            offset += _LEN.size + length
            try:
                sessions.append(self._parse(record, expected_id=None, round_number=self.round))
            except (InvalidInput, ValueError) as error:
                log.error("checkpoint %s: record %d%s refused: %s", path, index, _claimed_id(record), error)
        return sessions

    def _refuse_checkpoint(self, reason: str) -> list[StoredSession]:
        corrupt = self.checkpoint_file.with_suffix(".corrupt")
        log.error("checkpoint %s refused: %s; moved to %s", self.checkpoint_file, reason, corrupt.name)
        os.replace(self.checkpoint_file, corrupt)
        return []

    # ---- spill files: one session each ------------------------------------------------------------------
    def file_of(self, session_id: str) -> Path:
        """Where a session's spill file lives."""
        return self.path / f"{session_id}{SUFFIX}"

    def write(self, session_id: str, owner: str, blob: bytes) -> None:
        """Writes one session's spill file atomically, naming the last checkpoint round before it."""
        self._write_atomically(self.file_of(session_id), [self._record(session_id, owner, blob, round_number=self.round)])
        self._spilled.add(session_id)

    def remove(self, session_id: str) -> None:
        """Deletes a session's spill file, if it has one (nothing is asked of the disk otherwise)."""
        if session_id in self._spilled:
            self.file_of(session_id).unlink(missing_ok=True)
            self._spilled.discard(session_id)

    def session_ids(self) -> set[str]:
        """Ids of the sessions that have a spill file."""
        return set(self._spilled)

    def has_spill_file(self, session_id: str) -> bool:
        """Whether this session has a spill file."""
        return session_id in self._spilled

    def read(self, session_id: str) -> StoredSession:
        """Reads and checks one spill file; InvalidInput says what is wrong with it."""
        return self._parse(self.file_of(session_id).read_bytes(), expected_id=session_id, round_number=None)

    # ---- everything, at start ---------------------------------------------------------------------------
    def read_all(self) -> list[StoredSession]:
        """Every session to bring back: the checkpoint's, and the spilled ones (a bad spill file is logged and
        moved aside as `*.corrupt`); for a session in both, the later copy (see the module docstring)."""
        chosen = {stored.session_id: stored for stored in self.read_checkpoint()}
        for session_id in sorted(self.session_ids()):
            try:
                spilled = self.read(session_id)
            except (InvalidInput, ValueError, OSError) as error:
                corrupt = self.file_of(session_id).with_suffix(".corrupt")
                log.error("state file %s refused: %s; moved to %s", self.file_of(session_id), error, corrupt.name)
                os.replace(self.file_of(session_id), corrupt)
                self._spilled.discard(session_id)
                continue
            checkpointed = chosen.get(session_id)
            if checkpointed is None or checkpointed.round <= spilled.round:
                chosen[session_id] = spilled
        return list(chosen.values())

    # ---- records and files ------------------------------------------------------------------------------
    def _record(self, session_id: str, owner: str, blob: bytes, round_number: int | None = None) -> bytes:
        fields: dict[str, object] = {"id": session_id, "owner": owner}
        if round_number is not None:
            fields["round"] = round_number
        header = json.dumps(fields).encode()
        body = _LEN.pack(len(header)) + header + blob
        return body + self._tag(body)

    def _parse(self, record: bytes, *, expected_id: str | None, round_number: int | None) -> StoredSession:
        body, digest = record[:-TAG_BYTES], record[-TAG_BYTES:]
        if len(record) < _LEN.size + TAG_BYTES or not hmac.compare_digest(self._tag(body), digest):
            if self._secret and len(record) >= _LEN.size + TAG_BYTES and hashlib.sha256(body).digest() == digest:
                raise InvalidInput("record is not signed, and this server only accepts records signed with its secret")
            raise InvalidInput("checksum mismatch (truncated, corrupted, or signed with another secret)")
        (header_len,) = _LEN.unpack_from(body)
        header = json.loads(body[_LEN.size : _LEN.size + header_len])
        session_id = header.get("id")
        if not isinstance(session_id, str) or (expected_id is not None and session_id != expected_id):
            raise InvalidInput(f"record holds session {session_id!r}")
        state, step = decode_snapshot(
            body[_LEN.size + header_len :], fingerprint=self._fingerprint, shape=self._shape, secret=self._secret
        )
        stored_round = int(header.get("round", 0)) if round_number is None else round_number
        return StoredSession(session_id, str(header.get("owner", "")), state, step, stored_round)

    def _tag(self, body: bytes) -> bytes:
        """A record's trailer: an HMAC-SHA256 of header and blob under the snapshot secret (so that nobody
        without it can change a session's owner), or a plain SHA-256 without a secret."""
        if self._secret:
            return hmac.new(self._secret, body, hashlib.sha256).digest()
        return hashlib.sha256(body).digest()

    def _write_atomically(self, target: Path, parts: list[bytes]) -> None:
        """Writes `parts` to `target` through a temporary file: fsync, rename, fsync the directory. On failure
        (a full or read-only disk) the temporary file is removed and `target` keeps its old content."""
        temporary = target.with_name(target.name + ".tmp")
        try:
            with open(temporary, "wb") as handle:
                for part in parts:
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _claimed_id(record: bytes) -> str:
    """' (session ID?)' with the id a record that failed its checks seems to hold, for the log ('' if none)."""
    try:
        (header_len,) = _LEN.unpack_from(record)
        claimed = json.loads(record[_LEN.size : _LEN.size + header_len]).get("id")
    except (struct.error, ValueError, AttributeError):
        return ""
    return f" (session {claimed}?)" if isinstance(claimed, str) and is_session_id(claimed) else ""


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
        """Writes the session's spill file (atomically)."""
        self.state_dir.write(session.id, session.owner, self._encode(state, session.step))

    def load(self, session_id: str) -> StoredSession | None:
        """The spilled session, or None if there is no (valid) file for it."""
        if not self.state_dir.has_spill_file(session_id):
            return None
        try:
            return self.state_dir.read(session_id)
        except (InvalidInput, ValueError, OSError) as error:
            log.error("spilled session file for %s refused: %s", session_id, error)
            return None
