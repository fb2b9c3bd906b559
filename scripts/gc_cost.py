"""How often, and for how long, Python's cyclic garbage collector runs under a generation load.

Usage: .venv/bin/python scripts/gc_cost.py [YOUNG_THRESHOLD] [--no-freeze] [--model MODEL] [--sessions N] [--objects]
    [--engine [--batches-in-flight B]]
(default: Python's own threshold, 700; models/default/model.onnx; 256 sessions). Freezes what the imports made
(as `lstmserve serve` does; not with --no-freeze), sets the youngest generation's threshold, runs the load of
scripts/scheduler_generation_loop.py (each session generates 32 tokens at temperature 1, again and again, for
6 s, in batches of up to 256) and prints, per generation, how many collections ran, how long they took and how
many objects they freed. With --objects, also the kinds of object that the middle generation's collections walked
(the most common, averaged over the first five; counting them lengthens those collections).

With --engine it runs the load of `lstmserve bench --series engine --mode generate` instead, through the bench's own
`measure_engine` (batches of up to N sessions, B in flight; 1 s of warm-up, then 6 s; uvloop, the server's GIL
switch interval, what the imports and the engine made frozen, and YOUNG_THRESHOLD), and prints its tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from lstmserve.bench.engine import EngineLoad, measure_engine

sys.path.insert(0, str(Path(__file__).parent))
from scheduler_generation_loop import main as generation_loop  # noqa: E402

collections: dict[int, list[float]] = defaultdict(list)
freed: Counter[int] = Counter()  # per generation: the objects its collections freed
_started = 0.0
MIDDLE_COUNTED = 5
walked: Counter[str] = Counter()  # kinds of object in the middle generation's collections (with --objects)
counted = 0


def on_collection(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        collections[info["generation"]].append(time.perf_counter() - _started)
        freed[info["generation"]] += info["collected"]


def engine_series_load(model: Path, sessions: int, batches_in_flight: int, young_threshold: int) -> None:
    """The engine series' generate load, run as `lstmserve bench --series engine --mode generate` runs it, with
    `young_threshold` for the youngest generation."""
    load = EngineLoad(sessions, "generate", warmup_s=1.0, duration_s=6.0)
    measured = measure_engine(model, load, batches_in_flight=batches_in_flight, gc_young_threshold=young_threshold).load
    print(f"{measured.count / measured.elapsed_s:,.0f} tokens/s in the measured window")


def count_objects(phase: str, info: dict[str, Any]) -> None:
    """At the start of a middle-generation collection: counts what it is about to walk, by type."""
    global counted
    if phase != "start" or info["generation"] != 1 or len(collections[1]) >= MIDDLE_COUNTED:
        return
    walked.update(type(o).__qualname__ for o in gc.get_objects(0) + gc.get_objects(1))
    counted += 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Python's garbage collections under a generation load.")
    parser.add_argument("young_threshold", nargs="?", type=int, help="the youngest generation's threshold")
    parser.add_argument("--no-freeze", action="store_true", help="do not freeze what the imports made")
    parser.add_argument("--model", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--objects", action="store_true", help="count the kinds of object middle collections walk")
    parser.add_argument("--engine", action="store_true", help="the engine series' load, not the scheduler loop's")
    parser.add_argument("--batches-in-flight", type=int, choices=[1, 2], default=1, help="with --engine")
    options = parser.parse_args()
    if options.engine and options.no_freeze:
        parser.error("--engine freezes as the bench does: --no-freeze is for the scheduler loop's load")
    if not options.no_freeze:
        gc.freeze()
    if options.young_threshold is not None:
        gc.set_threshold(options.young_threshold, *gc.get_threshold()[1:])
    gc.callbacks.append(on_collection)
    if options.objects:
        gc.callbacks.append(count_objects)
    if options.engine:
        engine_series_load(options.model, options.sessions, options.batches_in_flight, gc.get_threshold()[0])
    else:
        asyncio.run(generation_loop(options.model, options.sessions))
    print(f"thresholds {gc.get_threshold()}")
    for generation in (0, 1, 2):
        times = collections[generation]
        if times:
            print(
                f"generation {generation}: {len(times)} collections, {sum(times) * 1e3:.1f} ms in all, "
                f"longest {max(times) * 1e3:.1f} ms, {freed[generation]:,} objects freed"
            )
        else:
            print(f"generation {generation}: no collection")
    if counted:
        print(f"objects walked by a middle collection (mean of {counted}):")
        for kind, number in walked.most_common(12):
            print(f"  {number / counted:9,.0f} {kind}")
