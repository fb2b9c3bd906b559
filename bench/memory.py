"""Memory per idle session: RSS of a server before and after N sessions that each took one step.

The target: N idle sessions cost at most 1.25x their raw state bytes (h and c) on top
of the empty server's RSS.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from lstmserve.bench.servers import ServerProcess, lstmserve_command
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

WORKERS = 64


@dataclass(frozen=True)
class MemoryResult:
    """RSS before and after, and the ratio of the growth to the sessions' raw state bytes."""

    sessions: int
    state_bytes_per_session: int
    rss_empty_mb: float
    rss_full_mb: float
    rss_settled_mb: float
    settle_s: float
    growth_per_session_bytes: float
    ratio_to_state_bytes: float


async def _open_sessions(target: str, count: int) -> int:
    async with grpc.aio.insecure_channel(target, options=[("grpc.so_reuseport", 0)]) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        features = pb.Tensor(shape=[1, info.input_size], data=bytes(4 * info.input_size))

        async def worker(share: int) -> None:
            for _ in range(share):
                call = stub.Step()
                if info.kind == "tokens":
                    await call.write(pb.StepRequest(tokens=[1], output=pb.OUTPUT_NONE))
                else:
                    await call.write(pb.StepRequest(features=features, output=pb.OUTPUT_NONE))
                await call.read()
                await call.done_writing()
                await call.read()  # EOF: the stream ends; the session stays

        shares = [count // WORKERS + (1 if i < count % WORKERS else 0) for i in range(WORKERS)]
        await asyncio.gather(*(worker(share) for share in shares if share))
        bytes_per_session = 4 * info.num_layers * info.num_directions * (
            (info.proj_size or info.hidden_size) + info.hidden_size
        )
    return bytes_per_session


def measure_idle_sessions(model: Path, sessions: int, *, settle_s: float, intra_op_threads: int = 1) -> MemoryResult:
    """Starts a server, measures its RSS empty, right after opening `sessions` sessions (one step
    each), and again after `settle_s` idle seconds (past the replay window, idle sessions drop
    their stored last result). The ratio uses the settled RSS."""
    command = lstmserve_command(model, max_batch_size=256, max_sessions=sessions + 16, intra_op_threads=intra_op_threads)
    with ServerProcess(command) as server:
        empty = server.rss_bytes()
        bytes_per_session = asyncio.run(_open_sessions(server.target, sessions))
        full = server.rss_bytes()
        time.sleep(settle_s)
        settled = server.rss_bytes()
    growth = (settled - empty) / sessions
    return MemoryResult(
        sessions=sessions,
        state_bytes_per_session=bytes_per_session,
        rss_empty_mb=empty / 2**20,
        rss_full_mb=full / 2**20,
        rss_settled_mb=settled / 2**20,
        settle_s=settle_s,
        growth_per_session_bytes=growth,
        ratio_to_state_bytes=growth / bytes_per_session,
    )
