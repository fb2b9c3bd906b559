"""Where session snapshots live outside the process: the state directory (one server) or Redis (shared).

Both backends keep the snapshot blobs of `snapshot.py` (versioned, SHA-256 or HMAC), with the
session's id and owner (the digest of its creator's API key).

- `DirectoryStore` (`--state-dir`): one file per session (see `persistence.py`), read back when
  the server starts. For one server, or replicas that each have their own directory.
- `RedisStore` (`--session-store redis://HOST:PORT/DB`): one hash per session, shared by every
  replica, and the ownership records that keep a session on exactly one replica at a time (see
  `handoff.py`). Sessions are not read at start: a replica takes one over when it is asked for it.

Redis keys (all under `lstmserve:`):

    session:<id>   hash: owner, replica (the replica holding it live; absent once released), blob
    closed:<id>    tombstone of a closed (or expired) session, for `closed_ttl_s`: a replica that was cut off
                   from Redis meanwhile drops its copy instead of recording it again (see `adopt`)
    replica:<rid>  a live replica's heartbeat (expires when the replica stops refreshing it)
    handoff:<rid>  list of session ids other replicas ask replica <rid> to give up
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from lstmserve.server.persistence import StateDir, StoredSession
from lstmserve.server.session_manager import SessionCopy
from lstmserve.server.state import SessionState

PREFIX = "lstmserve:"
# How long a Redis command (or connecting) may take before it fails, so that a silent network drop fails
# takeovers, handoffs and drain writes instead of hanging them. Longer than the blocking wait for handoff
# requests (handoff.REQUEST_WAIT_S, 1 s) plus Redis's lateness in ending it (up to 100 ms) and a round trip;
# shorter than the wait of a takeover (handoff.HANDOFF_TIMEOUT_S, 5 s), so a hung claim fails within it. The
# lease does not depend on it: it runs out at its time, however long a heartbeat write hangs.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
ADOPT_BATCH = 1000


class SessionStore(Protocol):
    """The operations the server's checkpoints and drain need from a backend."""

    async def read_all(self) -> list[StoredSession]:
        """Every session to bring back when the server starts."""
        ...

    async def save(self, session_id: str, owner: str, blob: bytes, *, release: bool = False) -> bool:
        """Stores a session's snapshot (an empty blob keeps the stored one); with `release`, this
        server lets go of the session. False if the session is no longer this server's."""
        ...


class DirectoryStore:
    """The state directory as a session store: each checkpoint is one round file of every live session (see
    `persistence.py`); spill files hold sessions spilled while idle.

    Args:
        state_dir: the directory and the checks its files must pass.
        encode: (state, step) -> snapshot blob.
    """

    def __init__(self, state_dir: StateDir, encode: Callable[[SessionState, int], bytes]) -> None:
        self.state_dir = state_dir
        self._encode = encode

    async def read_all(self) -> list[StoredSession]:
        """Every session to bring back (bad records are logged and skipped, bad files moved aside)."""
        return await asyncio.to_thread(self.state_dir.read_all)

    async def save_round(self, copies: list[SessionCopy]) -> int:
        """Writes a checkpoint round of exactly these sessions (encoded and written on a worker thread, off the
        event loop); returns its round number. OSError if it could not be written (the last round stays)."""

        def write() -> int:
            records = [(c.session.id, c.session.owner, self._encode(c.state, c.step)) for c in copies]
            return self.state_dir.write_checkpoint(records)

        return await asyncio.to_thread(write)

    def spilled_ids(self) -> set[str]:
        """Ids of the sessions that have a spill file."""
        return self.state_dir.session_ids()

    def remove(self, session_id: str) -> None:
        """Deletes a session's spill file, if it has one (a closed session's, or one a checkpoint now holds)."""
        self.state_dir.remove(session_id)


@dataclass(frozen=True)
class Claim:
    """The answer to `RedisStore.claim`.

    Args:
        outcome: "claimed" (this replica holds the session now; `blob` is its last snapshot, None if
            it never had one), "held" (live on replica `holder`), or "missing" (no such session for
            this owner).
        holder: for "held", the replica holding it; for "claimed", the replica recorded before whose
            heartbeat had expired ("" if the session had been released).
    """

    outcome: Literal["claimed", "held", "missing"]
    holder: str = ""
    blob: bytes | None = None


# Each script runs atomically in Redis. KEYS[1] is the session's hash, KEYS[2] its tombstone; ARGV[1] this
# replica's id. A new session under a closed session's id replaces the tombstone: its record (held, released, or
# tombstoned again when it closes) is what keeps a stale copy of the old session from being adopted.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'replica', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: me, owner, ttl_ms, replica key prefix. A holder whose heartbeat is gone counts as released.
_CLAIM = """
local fields = redis.call('HMGET', KEYS[1], 'owner', 'replica')
local owner, holder = fields[1], fields[2]
if not owner or owner ~= ARGV[2] then return {'missing'} end
if holder and holder ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. holder) == 1 then
  return {'held', holder}
end
redis.call('HSET', KEYS[1], 'replica', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local blob = redis.call('HGET', KEYS[1], 'blob')
local previous = holder or ''
if not blob then return {'claimed', previous} end
return {'claimed', previous, blob}
"""
# ARGV: me, blob ('' keeps the stored one), release ('1' or '0'), ttl_ms (0: no expiry). Only the holder writes.
_SAVE = """
if redis.call('HGET', KEYS[1], 'replica') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'blob', ARGV[2]) end
if ARGV[3] == '1' then redis.call('HDEL', KEYS[1], 'replica') end
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) else redis.call('PERSIST', KEYS[1]) end
return 1
"""
# ARGV: me, owner, ttl_ms. Records a live session as this replica's again: if its record says so, or is gone
# (Redis lost it). A record held by another replica, or released (another replica took the session and let it go
# since, or this replica's own release went through unanswered: then the stored snapshot is its state), is not;
# nor is a session with a tombstone (closed elsewhere meanwhile: no record is not "lost" then).
_ADOPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local fields = redis.call('HMGET', KEYS[1], 'owner', 'replica')
if fields[1] and fields[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'replica', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# ARGV: me, tombstone ttl_ms. Deletes the record and leaves the tombstone.
_REMOVE = """
if redis.call('HGET', KEYS[1], 'replica') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""


class RedisStore:
    """Session snapshots and ownership records in Redis, for one replica.

    Args:
        url: `redis://HOST:PORT/DB` (or `rediss://`, `unix://`), as redis-py's `from_url` reads it.
        replica: this replica's id (unique per process start).
        held_ttl_s: how long a held session's record lives without being refreshed.
        released_ttl_s: how long a released snapshot is kept (a session's idle TTL).
        heartbeat_ttl_s: how long this replica counts as alive after its last heartbeat.
        closed_ttl_s: how long a closed session's tombstone lives; longer than a replica adopts a copy
            after its last use (see `handoff.Cluster._drop_lost_sessions`). Defaults to released_ttl_s + 60.
    """

    def __init__(
        self,
        url: str,
        replica: str,
        *,
        held_ttl_s: float,
        released_ttl_s: float,
        heartbeat_ttl_s: float,
        closed_ttl_s: float | None = None,
    ) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.replica = replica
        self._redis: Any = redis.asyncio.from_url(
            url,
            decode_responses=False,
            health_check_interval=10,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            # No retries inside redis-py: its default (3, with backoff, around connecting too) made one operation on
            # a silent Redis take 8 timeouts. The callers try again themselves (heartbeats, drain writes, clients).
            retry=Retry(NoBackoff(), 0),
        )
        self._held_ms = int(held_ttl_s * 1000)
        self._released_ms = int(released_ttl_s * 1000)
        self._heartbeat_ms = int(heartbeat_ttl_s * 1000)
        self._closed_ms = int((released_ttl_s + 60 if closed_ttl_s is None else closed_ttl_s) * 1000)
        self._create = self._redis.register_script(_CREATE)
        self._claim = self._redis.register_script(_CLAIM)
        self._save = self._redis.register_script(_SAVE)
        self._remove = self._redis.register_script(_REMOVE)
        self._adopt = self._redis.register_script(_ADOPT)

    @staticmethod
    def key(session_id: str) -> str:
        """The Redis key of a session's hash."""
        return f"{PREFIX}session:{session_id}"

    @staticmethod
    def tombstone(session_id: str) -> str:
        """The Redis key that says a session was closed (for a while)."""
        return f"{PREFIX}closed:{session_id}"

    def _keys(self, session_id: str) -> list[str]:
        return [self.key(session_id), self.tombstone(session_id)]

    async def close(self) -> None:
        """Closes the connections."""
        await self._redis.aclose()

    # ---- this replica ------------------------------------------------------
    async def heartbeat(self, *, first: bool = False) -> bool:
        """Marks this replica alive for `heartbeat_ttl_s` from when Redis runs the write. Without `first`, only
        extends the previous mark: False (and nothing written) if it had expired, so other replicas may have
        taken its sessions over meanwhile; `first` writes it in any case."""
        key = f"{PREFIX}replica:{self.replica}"
        return bool(await self._redis.set(key, b"1", px=self._heartbeat_ms, xx=not first))

    async def unregister(self) -> None:
        """Removes this replica's heartbeat and request list (it is stopping)."""
        await self._redis.delete(f"{PREFIX}replica:{self.replica}", f"{PREFIX}handoff:{self.replica}")

    async def next_request(self, timeout_s: float) -> str | None:
        """The next session id another replica asked this one to give up, or None after `timeout_s`."""
        item = await self._redis.blpop([f"{PREFIX}handoff:{self.replica}"], timeout=timeout_s)
        return None if item is None else item[1].decode()

    async def ask(self, holder: str, session_id: str) -> None:
        """Asks replica `holder` to give session `session_id` up."""
        key = f"{PREFIX}handoff:{holder}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, session_id.encode())
            pipe.pexpire(key, max(self._heartbeat_ms * 10, 60_000))
            await pipe.execute()

    # ---- sessions ----------------------------------------------------------
    async def create(self, session_id: str, owner: str) -> bool:
        """Records a new session held by this replica (a closed session's id may be used again); False if the
        id is taken."""
        return bool(await self._create(keys=self._keys(session_id), args=[self.replica, owner, self._held_ms]))

    async def claim(self, session_id: str, owner: str) -> Claim:
        """Takes a session over if no live replica holds it (see `Claim`)."""
        reply = await self._claim(
            keys=[self.key(session_id)], args=[self.replica, owner, self._held_ms, f"{PREFIX}replica:"]
        )
        outcome = reply[0].decode()
        if outcome == "held":
            return Claim("held", holder=reply[1].decode())
        if outcome == "claimed":
            return Claim("claimed", holder=reply[1].decode(), blob=bytes(reply[2]) if len(reply) > 2 else None)
        return Claim("missing")

    async def read_all(self) -> list[StoredSession]:
        """Nothing: replicas take sessions over one by one, when they are asked for them."""
        return []

    async def save(
        self, session_id: str, owner: str, blob: bytes, *, release: bool = False, keep: bool = False
    ) -> bool:
        """Stores a session's snapshot if this replica holds it (an empty blob keeps the stored one).

        With `release`, the session is let go (any replica may take it over); `keep` stores it without
        expiry (spilled sessions), else it expires after the idle TTL once released.
        """
        ttl = 0 if keep else (self._released_ms if release else self._held_ms)
        args: list[str | bytes | int] = [self.replica, blob, b"1" if release else b"0", ttl]
        return bool(await self._save(keys=[self.key(session_id)], args=args))

    async def remove(self, session_id: str) -> bool:
        """Deletes a closed or expired session held by this replica, leaving its tombstone for `closed_ttl_s`."""
        return bool(await self._remove(keys=self._keys(session_id), args=[self.replica, self._closed_ms]))

    async def refresh(self, session_ids: list[str]) -> None:
        """Extends the records of sessions held live here, so they never expire under them."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.pexpire(self.key(session_id), self._held_ms)
            await pipe.execute()

    async def adopt(self, session_id: str, owner: str) -> bool:
        """Records a session live here as this replica's (again: after Redis lost it, or this replica's
        heartbeat lapsed); False if another replica holds it now, or its record was released meanwhile, or it
        was closed (its tombstone is there)."""
        return bool(await self._adopt(keys=self._keys(session_id), args=[self.replica, owner, self._held_ms]))

    async def adopt_all(self, sessions: Iterable[tuple[str, str]]) -> list[bool]:
        """`adopt` for each (session id, owner), pipelined (ADOPT_BATCH at a time); the answers in order."""
        items = list(sessions)
        answers: list[bool] = []
        for start in range(0, len(items), ADOPT_BATCH):
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id, owner in items[start : start + ADOPT_BATCH]:
                    await self._adopt(keys=self._keys(session_id), args=[self.replica, owner, self._held_ms], client=pipe)
                answers.extend(bool(answer) for answer in await pipe.execute())
        return answers
