"""Session operations shared by both services (`service.py`, lstmserve.v1; `oip.py`, the Open Inference
Protocol): plain values in and out, no protobuf."""

from __future__ import annotations

from lstmserve.server.errors import SessionExists
from lstmserve.server.handoff import Cluster
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.sessions import Session
from lstmserve.server.state import SessionState


async def new_session(
    scheduler: Scheduler,
    cluster: Cluster | None,
    owner: str,
    session_id: str | None,
    restored: tuple[SessionState, int] | None = None,
) -> Session:
    """A new session under `session_id` (ALREADY_EXISTS if taken) or a fresh id, with zero state or the
    `restored` (state, step); recorded in the shared store when there are several replicas."""

    async def make(new_id: str | None) -> Session:
        if restored is None:
            return scheduler.create_session(owner, new_id)
        return await scheduler.restore_session(restored[0], restored[1], owner, new_id)

    if cluster is not None:
        return await cluster.create(owner, session_id, make)
    if session_id is not None and scheduler.backend.holds(session_id):
        raise SessionExists(f"session id {session_id!r} is already taken")
    return await make(session_id)
