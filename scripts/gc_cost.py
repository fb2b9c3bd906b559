"""How often, and for how long, Python's cyclic garbage collector runs under a generation load.

Usage: .venv/bin/python scripts/gc_cost.py [YOUNG_THRESHOLD] [--no-freeze] [--model MODEL] [--sessions N]
(default: Python's own threshold, 700; models/default/model.onnx; 256 sessions). Freezes what the imports made
(as `lstmserve serve` does; not with --no-freeze), sets the youngest generation's threshold, runs the load of
scripts/scheduler_generation_loop.py (each session generates 32 tokens at temperature 1, again and again, for
6 s) and prints, per generation, how many collections ran and how long they took.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from scheduler_generation_loop import main as generation_loop  # noqa: E402

collections: dict[int, list[float]] = defaultdict(list)
_started = 0.0


def on_collection(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        collections[info["generation"]].append(time.perf_counter() - _started)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Python's garbage collections under a generation load.")
    parser.add_argument("young_threshold", nargs="?", type=int, help="the youngest generation's threshold")
    parser.add_argument("--no-freeze", action="store_true", help="do not freeze what the imports made")
    parser.add_argument("--model", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("--sessions", type=int, default=256)
    options = parser.parse_args()
    if not options.no_freeze:
        gc.freeze()
    if options.young_threshold is not None:
        gc.set_threshold(options.young_threshold, *gc.get_threshold()[1:])
    gc.callbacks.append(on_collection)
    asyncio.run(generation_loop(options.model, options.sessions))
    print(f"thresholds {gc.get_threshold()}")
    for generation in (0, 1, 2):
        times = collections[generation]
        if times:
            print(
                f"generation {generation}: {len(times)} collections, {sum(times) * 1e3:.1f} ms in all, "
                f"longest {max(times) * 1e3:.1f} ms"
            )
        else:
            print(f"generation {generation}: no collection")
