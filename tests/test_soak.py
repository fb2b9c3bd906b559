"""Soak: a couple of hundred concurrent sessions for a bounded time doing random steps, generations,
disconnects, resumes and closes, through the asyncio client against a real server process.

Afterwards: no unexpected error, no session left, and the server's RSS grew by less than
SOAK_RSS_BOUND_MB over a warmed-up baseline.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from lstmserve.client import AsyncClient

SESSIONS = 200
DURATION_S = 6.0
SOAK_RSS_BOUND_MB = 64
LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


async def _worker(client: AsyncClient, seed: int, until: float, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        session = await client.session()
        try:
            for _ in range(rng.randint(1, 12)):
                action = rng.random()
                if action < 0.7:
                    await session.step([rng.randrange(10) for _ in range(rng.randint(1, 3))])
                    counts["steps"] += 1
                elif action < 0.8:
                    async for _ in await session.generate([rng.randrange(10)], max_tokens=rng.randint(1, 6)):
                        pass
                    counts["generations"] += 1
                elif action < 0.9:
                    session_id = session.id
                    await session.detach()  # disconnect ...
                    session = await client.session(resume=session_id, close_on_exit=True)  # ... and resume
                    counts["resumes"] += 1
                else:
                    await session.reset()
                    counts["resets"] += 1
        finally:
            await session.close()
            counts["closed"] += 1


async def _soak(address: str, sessions: int, duration_s: float) -> dict[str, int]:
    counts = {"steps": 0, "generations": 0, "resumes": 0, "resets": 0, "closed": 0}
    async with AsyncClient(address) as client:
        until = time.monotonic() + duration_s
        await asyncio.gather(*(_worker(client, seed, until, counts) for seed in range(sessions)))
    return counts


def _active_sessions(metrics_port: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r"^lstmserve_active_sessions (\S+)$", text, re.M)
    assert match, "no active_sessions metric"
    return float(match.group(1))


def test_soak(token_model: Path) -> None:
    process = subprocess.Popen(
        [LSTMSERVE, "serve", "--model", str(token_model), "--port", "0", "--metrics-port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        match = re.search(r"serving on \S+:(\d+) .*metrics on port (\d+)", process.stdout.readline())
        assert match, "server did not start"
        address, metrics_port = f"127.0.0.1:{match.group(1)}", match.group(2)
        server = psutil.Process(process.pid)
        asyncio.run(_soak(address, 50, 1.5))  # warm-up: first-use allocations are not growth
        baseline = server.memory_info().rss
        counts = asyncio.run(_soak(address, SESSIONS, DURATION_S))  # raises on any unexpected error
        growth_mb = (server.memory_info().rss - baseline) / 2**20
        assert counts["steps"] > 1000 and counts["generations"] and counts["resumes"] and counts["resets"]
        assert counts["closed"] >= SESSIONS
        assert _active_sessions(metrics_port) == 0
        assert growth_mb < SOAK_RSS_BOUND_MB, f"RSS grew by {growth_mb:.1f} MB"
        assert process.poll() is None  # still serving
    finally:
        process.kill()
        process.wait()
