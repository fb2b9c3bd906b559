"""What one checkpoint round costs with --state-dir, against writing a file per session (the layout before).

Usage: .venv/bin/python scripts/checkpoint_round.py [MODEL] [SESSIONS ...] [--dir DIR] [--rounds N]
(default models/default/model.onnx, 2000 and 10000 sessions, a temporary folder under the current directory,
3 rounds). For each count it starts a real server on that state directory, fills that many sessions with
random state, and times `LstmServer.checkpoint()` (every session changed since the last round: the worst
case) as the keeper does it: copy every session between batches, encode off the event loop, write one
file. Then, for the same sessions, the previous layout: one file per session, each written atomically with
two fsyncs (write, fsync, rename, fsync the directory), one after another. The disk is whatever DIR is on:
put it where a deployment's state directory would be.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lstmserve.server.app import LstmServer
from lstmserve.server.config import ServerConfig
from lstmserve.server.snapshot import encode_snapshot
from lstmserve.server.state import SessionState


async def measure(model: Path, sessions: int, directory: Path, rounds: int) -> tuple[list[float], list[float], int]:
    """(seconds per round, seconds per file-per-session pass, bytes of the checkpoint file) for `sessions`."""
    server = LstmServer(ServerConfig(model=model, port=0, state_dir=directory, max_sessions=sessions, intra_op_threads=1))
    await server.start()
    try:
        scheduler = server.scheduler
        assert scheduler is not None and server.keeper is not None
        spec = server.runner.spec
        assert spec.c is not None, "this script fills an LSTM's h and c: give it an LSTM model"
        rng = np.random.default_rng(0)
        for _ in range(sessions):
            state = SessionState(
                h=rng.standard_normal((spec.state_rows, 1, spec.h.width)).astype(np.float32),
                c=rng.standard_normal((spec.state_rows, 1, spec.c.width)).astype(np.float32),
            )
            await scheduler.restore_session(state, int(rng.integers(1, 10_000)))
        round_seconds = []
        for _ in range(rounds):
            for session in scheduler.sessions.all():
                session.version += 1  # every session changed since the last round
            started = time.perf_counter()
            written = await server.checkpoint()
            round_seconds.append(time.perf_counter() - started)
            assert written == sessions, written
        size = (directory / "sessions.checkpoint").stat().st_size

        # The previous layout, on the same disk: a file per session, written one after another.
        state_dir = server.keeper.directory.state_dir  # type: ignore[attr-defined]
        copies = await scheduler.copy_all_sessions()
        per_file_seconds = []
        for _ in range(rounds):
            started = time.perf_counter()
            for copy in copies:
                blob = encode_snapshot(copy.state, copy.step, spec.fingerprint, None)
                await asyncio.to_thread(state_dir.write, copy.session.id, copy.session.owner, blob)
            per_file_seconds.append(time.perf_counter() - started)
        return round_seconds, per_file_seconds, size
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("sessions", nargs="*", type=int, default=[2000, 10_000])
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="where the temporary state directories go")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"model {args.model}, state directories under {args.dir.resolve()}, {args.rounds} rounds each (median)")
    print(f"{'sessions':>8}  {'one file a round':>16}  {'a file per session':>18}  {'checkpoint size':>15}")
    for count in args.sessions:
        directory = Path(tempfile.mkdtemp(prefix="checkpoint-round-", dir=args.dir))
        try:
            rounds, per_file, size = asyncio.run(measure(args.model, count, directory, args.rounds))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(
            f"{count:>8}  {statistics.median(rounds) * 1e3:>13.0f} ms  {statistics.median(per_file) * 1e3:>15.0f} ms"
            f"  {size / 1e6:>12.1f} MB"
        )


if __name__ == "__main__":
    main()
