"""How much a busy event-loop thread slows batch work on a worker thread of the same process.

Usage: .venv/bin/python scripts/worker_gil_wait.py [MODEL] [BATCH] [SWITCH_INTERVAL_MS]
(default models/default/model.onnx, 256, and Python's default switch interval). Times `BATCH`-row batches on a worker thread in three
settings: alone; while the main thread runs Python without pause (as a busy event loop does);
and while a separate process does the same (no shared GIL). The batch work is measured both as
the scheduler once did it on the worker (gather, ONNX Runtime, scatter) and as it does now (only
ONNX Runtime on the worker). Every step that gives up the GIL (numpy copies, the ONNX Runtime call)
must take it back, and a busy thread holds it for up to `sys.getswitchinterval()` (5 ms) first.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lstmserve.server.app import make_store
from lstmserve.server.config import ServerConfig
from lstmserve.server.runner import Runner, RunnerOptions

BATCHES = 200
SPIN = "import time\nend = time.perf_counter() + {seconds}\nwhile time.perf_counter() < end: pass"


def ms_per_batch(work: Callable[[], None], beside: str) -> float:
    """Runs `work` BATCHES times on a worker thread, with `beside` ("nothing", "thread", "process")."""
    done = threading.Event()

    def worker() -> None:
        for _ in range(BATCHES):
            work()
        done.set()

    spinner = None
    if beside == "process":
        spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=30)])
        time.sleep(0.3)
    started = time.perf_counter()
    thread = threading.Thread(target=worker)
    thread.start()
    if beside == "thread":
        while not done.is_set():  # Python without pause on this thread, as a busy event loop
            pass
    thread.join()
    elapsed = time.perf_counter() - started
    if spinner is not None:
        spinner.kill()
    return elapsed / BATCHES * 1e3


def main(model: Path, batch: int) -> None:
    runner = Runner(model, RunnerOptions(intra_op_threads=1))
    store = make_store(runner, ServerConfig(model=model, max_sessions=batch))
    slots = np.array([store.allocate() for _ in range(batch)], dtype=np.int64)
    inputs = np.zeros((batch, 1), dtype=np.int64)
    buffers = store.gather(slots)

    def gather_run_scatter() -> None:
        gathered = store.gather(slots)
        runner.run(inputs, gathered)
        store.scatter(slots, gathered)

    def run_only() -> None:
        runner.run(inputs, buffers)

    print(f"ms per batch of {batch} on a worker thread (switch interval {sys.getswitchinterval() * 1e3:g} ms)")
    for name, work in (("gather + ONNX Runtime + scatter", gather_run_scatter), ("ONNX Runtime only", run_only)):
        figures = {beside: ms_per_batch(work, beside) for beside in ("nothing", "thread", "process")}
        print(
            f"{name:32s} alone {figures['nothing']:.2f}, beside a busy thread {figures['thread']:.2f}, "
            f"beside a busy process {figures['process']:.2f}"
        )


if __name__ == "__main__":
    model_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/default/model.onnx")
    if len(sys.argv) > 3:
        sys.setswitchinterval(float(sys.argv[3]) / 1e3)
    main(model_path, int(sys.argv[2]) if len(sys.argv) > 2 else 256)
