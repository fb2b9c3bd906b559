"""Several replicas, one Redis: each session lives on exactly one replica, and moves exactly.

A proxy (Envoy, ring hash on the `lstmserve-session` header) sends every call of a session to
one replica. When the replicas change (one drains, crashes, or a new one joins), calls of some
sessions start arriving at another replica. That replica takes the session over:

- Redis records which replica holds each session (`session:<id>` field `replica`), and every
  replica keeps a heartbeat key alive. Creating a session records it (a proposed id that is taken
  is ALREADY_EXISTS).
- Asked for a session it does not hold, a replica claims it atomically: if no live replica holds
  it (released on drain or spill, or its replica's heartbeat expired), the claim succeeds and the
  session is restored from its last snapshot, under the same id and owner. If a live replica holds
  it, that replica is asked (a Redis list per replica) to give it up: it finishes the session's
  queued steps, writes the snapshot, drops the session and releases it; the new replica polls
  until its claim succeeds, for at most HANDOFF_TIMEOUT_S, and otherwise answers UNAVAILABLE.
- Requests that still reach the old replica (an open stream) get UNAVAILABLE: the client opens a
  new stream, which the proxy sends to the new holder, and resends with `expected_step`.
- Only the holder may write a session's snapshot, and a claim needs the holder gone, so a stale
  copy is never restored while a newer one is live.
- Redis is the lease authority. A replica serves the sessions it holds (steps, reads, snapshots)
  only while its lease lasts: LEASE_S after it sent its last heartbeat write that succeeded. That
  heartbeat key lives HEARTBEAT_TTL_S from when Redis ran the write, so at least HEARTBEAT_TTL_S
  after it was sent, and another replica can claim the sessions only once the key is gone: a
  replica cut off from Redis stops serving LEASE_MARGIN_S before anyone can take its sessions, and
  its sessions answer UNAVAILABLE meanwhile. When a heartbeat gets through again after the lease
  lapsed (or Redis lost the key), the replica records its sessions as its own again and drops
  (as moved) those another replica took over meanwhile, before it serves any of them.
- Closing a session (CloseSession, an Open Inference Protocol `sequence_end`, expiry past the idle
  TTL) deletes its record and leaves a tombstone (`closed:<id>`) for CLOSED_MARGIN_S past the idle
  TTL, so that "no record" after a lapse means "Redis lost it" only where there is no tombstone: a
  replica back from a lapse drops (as moved) a copy of a session closed elsewhere meanwhile; the
  client then gets NOT_FOUND. It adopts no copy idle past the TTL (it expires it instead), and a copy
  is idle at least since another replica took the session over, so no tombstone it needs has
  expired. Creating a session under a closed one's id replaces the tombstone (the id may be reused).

Work on one session id (claim, give up, close, spill) runs one at a time, in the order it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lstmserve.server.errors import Draining, InvalidInput, ServeError, SessionExists, SessionMoved
from lstmserve.server.metrics import Metrics
from lstmserve.server.keeper import SessionKeeper
from lstmserve.server.persistence import StoredSession
from lstmserve.server.backend import SessionHost
from lstmserve.server.session_store import RedisStore
from lstmserve.server.sessions import Session, is_session_id, new_session_id
from lstmserve.server.state import SessionState
from lstmserve.server.text import shown

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 0.5
# A replica that has not refreshed its heartbeat for this long is taken for dead: its sessions can be claimed.
HEARTBEAT_TTL_S = 2.0
# A replica serves its sessions for LEASE_S after sending its last heartbeat write that succeeded; the margin
# covers what happens after the check (the answer leaving this process) and clock rate differences with Redis.
# Three heartbeats fit in the lease: one slow or lost heartbeat does not interrupt serving.
LEASE_MARGIN_S = 0.5
LEASE_S = HEARTBEAT_TTL_S - LEASE_MARGIN_S
# How long a replica asked for a session waits for its holder to give it up (longer than HEARTBEAT_TTL_S,
# so a holder that died is noticed within the wait).
HANDOFF_TIMEOUT_S = 5.0
# The waiting replica polls its claim, from every 5 ms (a live holder gives up within milliseconds) to every 100 ms.
HANDOFF_POLL_S = (0.005, 0.1)
REQUEST_WAIT_S = 1.0
# A closed session's tombstone lives the idle TTL plus this. A replica back from a lapse adopts only copies used
# within the idle TTL, and a copy of a session taken over elsewhere was last used before that takeover (its
# lease had lapsed), so before the close that wrote the tombstone; the margin covers the time from the idle
# check to the adopt running in Redis (pipelined batches, each under SOCKET_TIMEOUT_S) and clock rate differences.
CLOSED_MARGIN_S = 60.0
# How long a replica keeps trying to write a session it gave up and cannot take back (it drains; `stop`
# waits as long for it).
GIVE_RETRY_S = 5.0
# How long a replica keeps trying to delete the record of a session closed here: a record left held by this
# replica would let a later takeover restore the closed session from its last checkpoint.
FORGET_RETRY_S = 30.0


def check_lease(cluster: Cluster | None, session_id: str) -> None:
    """With several replicas: UNAVAILABLE unless this replica may serve the sessions it holds now (its
    lease from the session store is valid). One clock reading; nothing without a session store."""
    if cluster is not None:
        cluster.check_lease(session_id)


async def _retry(attempt: Callable[[], Awaitable[T]], retry_s: float, failure: str) -> T:
    """Tries a Redis operation that just failed again, with backoff (50 ms doubling to 1 s), for up to
    `retry_s`; past that, logs `failure` and raises the last error."""
    deadline = time.monotonic() + retry_s
    delay_s = 0.05
    while True:
        await asyncio.sleep(delay_s)
        try:
            return await attempt()
        except Exception as error:  # noqa: BLE001 - redis-py's connection and timeout errors
            if time.monotonic() + delay_s > deadline:
                log.error("%s: %s", failure, error)
                raise
        delay_s = min(1.0, delay_s * 2)


def new_replica_id() -> str:
    """A replica id unique to this process start: host name, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _PerKey:
    """Runs coroutines one at a time per key, in the order they were submitted (submitting is synchronous)."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Task[Any]] = {}

    def submit(self, key: str, factory: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        previous = self._tails.get(key)

        async def run() -> T:
            if previous is not None:
                await asyncio.wait([previous])
            return await factory()

        task = asyncio.ensure_future(run())
        self._tails[key] = task
        task.add_done_callback(lambda done: self._tails.pop(key) if self._tails.get(key) is done else None)
        return task

    def busy(self, key: str) -> bool:
        return key in self._tails


class Cluster:
    """This replica's part in a group of replicas that share sessions through Redis.

    Args:
        store: the Redis store (its `replica` is this replica's id).
        scheduler: this replica's scheduler (its sessions, through `SessionHost`).
        metrics: handoff and takeover counters.
        encode: (state, step) -> snapshot blob.
        decode: snapshot blob -> (state, step); raises InvalidInput for a bad blob.
        session_ttl_s: the sessions' idle TTL (how often held records are refreshed).
        spills_idle: whether sessions idle past the TTL are spilled to Redis (--spill-idle), else closed.
    """

    def __init__(
        self,
        store: RedisStore,
        scheduler: SessionHost,
        metrics: Metrics,
        encode: Callable[[SessionState, int], bytes],
        decode: Callable[[bytes], tuple[SessionState, int]],
        session_ttl_s: float,
        *,
        spills_idle: bool = False,
    ) -> None:
        self.store = store
        self.replica = store.replica
        self.scheduler = scheduler
        self.metrics = metrics
        self._encode = encode
        self._decode = decode
        self._session_ttl_s = session_ttl_s
        self.spills_idle = spills_idle
        self._refresh_every_s = min(60.0, max(1.0, session_ttl_s / 4))
        self.draining = False
        # This replica serves the sessions it holds until this time.monotonic() (0: not now, see `check_lease`).
        self._lease_until = 0.0
        # Set when the lease lapsed (or Redis lost the heartbeat key): the sessions held here must be checked
        # against Redis (another replica may have taken some) before the lease is valid again.
        self._unchecked = False
        self._per_key = _PerKey()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Registers this replica and starts answering handoff requests (OSError if Redis cannot be reached)."""
        sent = time.monotonic()
        try:
            await self.store.heartbeat(first=True)
        except Exception as error:  # noqa: BLE001 - redis-py's connection errors
            await self.store.close()
            raise OSError(f"cannot reach the session store {self.store.url}: {error}") from error
        self._lease_until = sent + LEASE_S
        self._tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._request_loop())]
        log.info("replica %s sharing sessions through %s", self.replica, self.store.url)

    async def stop(self) -> None:
        """Stops the loops and removes this replica's heartbeat (call after the drain released its sessions)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        try:
            await self.store.unregister()
        except Exception:  # noqa: BLE001 - Redis gone: its heartbeat expires by itself
            log.warning("could not unregister replica %s from Redis", self.replica)
        await self.store.close()

    # ---- the lease -----------------------------------------------------------
    def lease_valid(self) -> bool:
        """Whether this replica may serve the sessions it holds now (see `check_lease`)."""
        return time.monotonic() < self._lease_until

    def check_lease(self, session_id: str) -> None:
        """Raises SessionMoved (UNAVAILABLE) unless this replica's lease is valid: its last heartbeat write
        that succeeded was sent less than LEASE_S ago, and its sessions were checked since a lapse. Past
        that, another replica may take the sessions over, so none is served here. One clock reading."""
        if time.monotonic() >= self._lease_until:
            raise SessionMoved(
                f"session {shown(session_id)}: this replica lost contact with the session store and does not serve "
                "its sessions until it is back (another replica may take them over); retry"
            )

    # ---- sessions ----------------------------------------------------------
    async def create(self, owner: str, session_id: str | None, make: Callable[[str], Awaitable[Session]]) -> Session:
        """Records a new session (under `session_id`, or a fresh id) as held here, then `make`s it.

        SessionExists if the id is taken anywhere; Draining while this replica drains.
        """
        session_id = session_id or new_session_id()
        if self.draining:
            raise Draining(f"session {shown(session_id)}: this replica is draining and takes no new sessions")
        self.check_lease(session_id)  # recorded as held here, it could be claimed at once by another replica

        async def run() -> Session:
            if self.scheduler.sessions.find(session_id) is not None or not await self._redis(
                self.store.create(session_id, owner), session_id
            ):
                raise SessionExists(f"session id {shown(session_id)} is already taken")
            try:
                return await make(session_id)
            except BaseException:
                with contextlib.suppress(Exception):  # else the record expires with its TTL
                    await self.store.remove(session_id)
                raise

        return await asyncio.shield(self._per_key.submit(session_id, run))

    async def fetch(self, session_id: str, owner: str) -> Session | None:
        """The backend's `fetch`: takes a session over from the shared store or from the
        replica that holds it; None if there is no such session for this owner."""
        if not is_session_id(session_id):
            return None
        if self.draining:
            raise Draining(
                f"session {shown(session_id)}: this replica is draining; retry and the proxy sends the call to another replica"
            )
        self.check_lease(session_id)
        await asyncio.shield(self._per_key.submit(session_id, lambda: self._take_over(session_id, owner)))
        session = self.scheduler.sessions.find(session_id)
        return session if session is not None and session.owner == owner else None

    async def _take_over(self, session_id: str, owner: str) -> None:
        if self.scheduler.sessions.find(session_id) is not None:
            return  # taken over (or created) by the request before this one
        deadline = time.monotonic() + HANDOFF_TIMEOUT_S
        asked = ""
        poll_s, max_poll_s = HANDOFF_POLL_S
        while True:
            claim = await self._redis(self.store.claim(session_id, owner), session_id)
            if claim.outcome == "missing":
                return
            if claim.outcome == "claimed":  # given up on request, or released earlier, or its replica died
                await self._restore(session_id, owner, claim.blob, "handoff" if asked and not claim.holder else "store")
                return
            if claim.holder != asked:
                await self._redis(self.store.ask(claim.holder, session_id), session_id)
                asked = claim.holder
            if time.monotonic() > deadline:
                raise SessionMoved(f"session {shown(session_id)} is still held by replica {claim.holder}; retry")
            await asyncio.sleep(poll_s)
            poll_s = min(max_poll_s, poll_s * 2)

    async def _restore(self, session_id: str, owner: str, blob: bytes | None, source: str) -> None:
        if blob is None:
            log.warning("session %s had no snapshot when its replica stopped; it is lost", session_id)
            await self._redis(self.store.remove(session_id), session_id)
            return
        try:
            state, step = self._decode(blob)
        except InvalidInput as error:
            log.error("stored snapshot of session %s refused: %s; it is dropped", session_id, error)
            await self._redis(self.store.remove(session_id), session_id)
            return
        try:
            await self.scheduler.restore_session(state, step, owner, session_id)
        except BaseException:
            with contextlib.suppress(Exception):  # let another replica try
                await self.store.save(session_id, owner, b"", release=True)
            raise
        self.metrics.takeovers.labels(source=source).inc()
        log.info("session %s taken over from the %s at step %d", session_id, source, step)

    async def _give(self, session_id: str) -> None:
        """Gives a session up on another replica's request: queued steps finish, then it is written and released."""
        taken = await self.scheduler.hand_off(session_id)
        if taken is None:  # not live here (released already, or never restored): let the claimant take it
            await self.store.save(session_id, "", b"", release=True)
            return
        session, state = taken
        blob = self._encode(state, session.step)
        try:
            written = await self.store.save(session_id, session.owner, blob, release=True)
        except Exception as error:
            # Redis failed: keep serving the session here (it is still recorded as this replica's), unless
            # this replica drains (it takes no session back) or its slot was taken meanwhile; then the
            # state exists nowhere else, so the write is tried again.
            if not self.draining:
                try:
                    await self.scheduler.restore_session(state, session.step, session.owner, session_id)
                except ServeError:
                    pass
                else:
                    raise
            log.warning("writing session %s for a handoff failed (%s); trying again", session_id, error)
            written = await _retry(
                lambda: self.store.save(session_id, session.owner, blob, release=True),
                GIVE_RETRY_S,
                f"session {session_id} could not be written for its handoff and is lost",
            )
        if written:
            self.metrics.handoffs.inc()
            log.info("session %s handed over at step %d", session_id, session.step)
        else:
            log.warning("session %s was no longer this replica's when it was handed over", session_id)

    def forget(self, session_id: str) -> None:
        """The backend's `forget`: a closed or expired session's record is deleted (and its
        tombstone written), trying again with backoff through a Redis failure for up to FORGET_RETRY_S."""
        self._spawn(self._per_key.submit(session_id, lambda: self._remove(session_id)))

    async def _remove(self, session_id: str) -> bool:
        try:
            return await self.store.remove(session_id)
        except Exception:  # noqa: BLE001 - redis-py's connection and timeout errors
            return await _retry(
                lambda: self.store.remove(session_id),
                FORGET_RETRY_S,
                f"the record of closed session {session_id} could not be deleted",
            )

    def spill(self, session: Session, state: SessionState) -> None:
        """Writes a session idle past the TTL and releases it (kept without expiry); any replica brings it back."""
        blob = self._encode(state, session.step)
        self._spawn(
            self._per_key.submit(
                session.id, lambda: self.store.save(session.id, session.owner, blob, release=True, keep=True)
            )
        )

    async def save(self, session_id: str, owner: str, blob: bytes, *, release: bool = False) -> bool:
        """Checkpoints and the drain: writes a held session's snapshot (and releases it)."""
        return await self.store.save(session_id, owner, blob, release=release)

    async def read_all(self) -> list[StoredSession]:
        """Nothing at start: sessions are taken over when they are asked for."""
        return []

    # ---- loops ---------------------------------------------------------------
    async def _request_loop(self) -> None:
        while True:
            try:
                session_id = await self.store.next_request(REQUEST_WAIT_S)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis unreachable: try again shortly
                log.warning("reading handoff requests from Redis failed: %s", error)
                await asyncio.sleep(REQUEST_WAIT_S)
                continue
            if session_id is not None and is_session_id(session_id):
                self._spawn(self._per_key.submit(session_id, functools.partial(self._give, session_id)))

    async def _heartbeat_loop(self) -> None:
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._renew_lease()
                if time.monotonic() - refreshed > self._refresh_every_s:
                    refreshed = time.monotonic()
                    await self.store.refresh([s.id for s in self.scheduler.sessions.all()])
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis unreachable: sessions here keep working
                log.warning("heartbeat to Redis failed: %s", error)

    async def _renew_lease(self) -> None:
        """Writes the heartbeat and extends the lease to LEASE_S after the write was sent. After a lapse (the
        lease ran out before this write, or Redis had lost the key) the sessions held here are checked first,
        and the lease stays void until that is done; a Redis error leaves the lease to run out."""
        sent = time.monotonic()
        if sent >= self._lease_until and not self._unchecked:
            self._unchecked = True
            log.warning(
                "replica %s got no heartbeat through to Redis for %.1f s: its sessions answer UNAVAILABLE until it "
                "gets through and checks which are still its own",
                self.replica,
                LEASE_S,
            )
        if not self._unchecked and not await self.store.heartbeat():
            self._unchecked = True
            log.warning("replica %s missed its heartbeat; checking which sessions are still its own", self.replica)
        if self._unchecked:
            self._lease_until = 0.0  # nothing served while some sessions may be another replica's
            await self.store.heartbeat(first=True)  # from here on, no other replica can claim this one's sessions
            dropped = await self._drop_lost_sessions()
            self._unchecked = False
            log.warning(
                "replica %s reached Redis again: %d session(s) taken over or closed elsewhere (or expired) were dropped, "
                "the others are served",
                self.replica,
                dropped,
            )
        # If the write took longer than the lease, the lease stays void, and the next write checks again.
        self._lease_until = sent + LEASE_S

    async def _drop_lost_sessions(self) -> int:
        """After a lapsed lease (Redis out of reach, a long pause, or Redis restarted empty): records every
        session live here as this replica's again, and drops (as moved) those another replica took over
        meanwhile (held or released by it since) or closed (a tombstone); returns how many were dropped. Call
        with this replica's heartbeat key written: from then on no other replica can claim the sessions it checks.

        Sessions idle past the TTL are not recorded again (their tombstone may be gone): they expire here as
        the idle sweep would expire them (spilled, or closed), if their record is still this replica's."""
        cutoff = time.monotonic() - self._session_ttl_s
        checked = [s for s in self.scheduler.sessions.all() if not self._per_key.busy(s.id)]
        sessions = [s for s in checked if s.last_used >= cutoff]
        kept = await self.store.adopt_all([(s.id, s.owner) for s in sessions])
        dropped = 0
        for session, ours in zip(sessions, kept, strict=True):
            if ours:
                continue
            await self.scheduler.hand_off(session.id)
            dropped += 1
            log.warning("session %s was taken over or closed by another replica meanwhile; dropped here", session.id)
        for session in checked:
            if session.last_used < cutoff:
                dropped += await self._expire(session.id)
        return dropped

    async def _expire(self, session_id: str) -> int:
        """Drops a session idle past the TTL that was not checked against Redis: spilled (with --spill-idle) or
        closed if its record is still this replica's, else only dropped here. Returns 1 if it was dropped."""
        taken = await self.scheduler.hand_off(session_id)
        if taken is None:
            return 0
        session, state = taken
        if self.spills_idle:
            blob = self._encode(state, session.step)
            ours = await self.store.save(session_id, session.owner, blob, release=True, keep=True)
        else:
            ours = await self.store.remove(session_id)
        outcome = ("spilled" if self.spills_idle else "closed") if ours else "dropped here"
        log.warning("session %s was idle past the TTL when this replica reached Redis again: %s", session_id, outcome)
        return 1

    # ---- helpers -------------------------------------------------------------
    def _spawn(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session store operation failed: %s", task.exception())

    @staticmethod
    async def _redis(operation: Awaitable[T], session_id: str) -> T:
        """Awaits a Redis operation for a session; a Redis failure becomes UNAVAILABLE (retryable) for the caller."""
        try:
            return await operation
        except ServeError:
            raise
        except Exception as error:  # noqa: BLE001 - redis-py's connection and timeout errors
            raise SessionMoved(f"session {shown(session_id)}: the shared session store is unavailable ({error}); retry") from error


class ClusterBackend:
    """Redis shared by the replicas (--session-store) as the scheduler's `SessionBackend`: sessions taken over
    from the store or from the replica holding them, checkpointed one record each, spilled idle sessions
    released to any replica (with --spill-idle), closed sessions' records deleted.

    Args:
        store: the Redis store (its `replica` is this replica's id).
        metrics: handoff and takeover counters.
        encode: (state, step) -> snapshot blob.
        decode: snapshot blob -> (state, step); raises InvalidInput for a bad blob.
        session_ttl_s: the sessions' idle TTL.
        spills_idle: whether sessions idle past the TTL are spilled (else closed).
    """

    def __init__(
        self,
        store: RedisStore,
        metrics: Metrics,
        encode: Callable[[SessionState, int], bytes],
        decode: Callable[[bytes], tuple[SessionState, int]],
        session_ttl_s: float,
        *,
        spills_idle: bool,
    ) -> None:
        self.spills_idle = spills_idle
        self.cluster: Cluster | None = None
        self.keeper: SessionKeeper | None = None
        self._make_cluster = lambda host: Cluster(
            store, host, metrics, encode, decode, session_ttl_s, spills_idle=spills_idle
        )
        self._encode = encode

    async def open(self, host: SessionHost) -> int:
        """Registers this replica (OSError if Redis cannot be reached) and brings back the sessions the store
        holds for it; returns how many."""
        cluster = self._make_cluster(host)
        await cluster.start()
        self.cluster = cluster
        self.keeper = SessionKeeper(host, cluster, self._encode, cluster.forget)
        return await self.keeper.restore_all()

    async def fetch(self, session_id: str, owner: str) -> Session | None:
        """Takes a session over from the shared store or the replica holding it; None if there is none."""
        return None if self.cluster is None else await self.cluster.fetch(session_id, owner)

    def holds(self, session_id: str) -> bool:
        """False: a new id is checked against Redis when the session is created (`Cluster.create`)."""
        return False

    def spill(self, session: Session, state: SessionState) -> None:
        """Writes the session to Redis in the background and releases it (requests for it wait for the write)."""
        assert self.cluster is not None
        self.cluster.spill(session, state)

    def forget(self, session_id: str) -> None:
        """Deletes a closed or expired session's record (in the background, with retries)."""
        if self.keeper is not None:
            self.keeper.forget(session_id)
