"""How long one batch-1 ONNX Runtime call takes right after the core idled, as in a request-response server.

Usage: .venv/bin/python scripts/batch1_after_idle.py [MODEL]
(default models/default/model.onnx). Runs 2,000 batch-1 steps of the model back to back (as the
benchmark's compute ceiling does), then with a sleep of 100, 400 and 1,000 microseconds before each
(a single client's round trip leaves the server idle about that long), then with 400 microseconds of
spinning instead of sleeping; prints the median time of the call itself in each case.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lstmserve.server.app import make_store
from lstmserve.server.config import ServerConfig
from lstmserve.server.runner import Runner, RunnerOptions

CALLS = 2000


def median_call_us(runner: Runner, buffers: object, gap_us: int, spin: bool) -> float:
    """Median time of a batch-1 call after a gap of `gap_us` (sleeping, or spinning if `spin`)."""
    inputs = np.zeros((1, 1), np.int64)
    times = []
    for _ in range(CALLS):
        if gap_us and spin:
            end = time.perf_counter() + gap_us / 1e6
            while time.perf_counter() < end:
                pass
        elif gap_us:
            time.sleep(gap_us / 1e6)
        started = time.perf_counter()
        runner.run(inputs, buffers)  # type: ignore[arg-type]
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e6


def main(model: Path) -> None:
    runner = Runner(model, RunnerOptions(intra_op_threads=1))
    store = make_store(runner, ServerConfig(model=model, max_sessions=1))
    buffers = store.gather(np.array([store.allocate()], np.int64))
    for gap_us, spin in ((0, False), (100, False), (400, False), (1000, False), (400, True)):
        how = "back to back" if not gap_us else f"after {gap_us} us {'spinning' if spin else 'asleep'}"
        print(f"batch-1 call {how}: median {median_call_us(runner, buffers, gap_us, spin):.1f} us")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/default/model.onnx"))
