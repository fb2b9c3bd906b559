"""The batching loop's own Python per round of a 256-session generation, part by part, in-process.

Usage: .venv/bin/python scripts/batch_loop_cost.py [MODEL] [SESSIONS]
(default models/default/model.onnx, 256). Runs the same load as scripts/scheduler_generation_loop.py
(each session generates 32 tokens at temperature 1, again and again, for 6 s) with a timer around each
part of a round that runs on the event loop: collecting the batch (`Batcher.collect`), gathering its
state (`StateStore.gather`), applying the outputs (`Batcher.finish`, which includes
`Batcher._continue_generations`: sampling the next tokens and carrying them to the next batch) and
marking the sessions with more work ready (`Batcher.requeue`). Prints the mean time of each part per
round and per row, and the mean batch size.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lstmserve.server.batcher import Batcher, Group
from lstmserve.server.state import HostStateStore

sys.path.insert(0, str(Path(__file__).parent))
from scheduler_generation_loop import main as generation_loop  # noqa: E402

PARTS = {"collect": Batcher, "gather": HostStateStore, "finish": Batcher, "_continue_generations": Batcher, "requeue": Batcher}
spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
rows = 0


def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started
            calls[name] += 1

    return wrapper


def count_rows(method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Batcher, groups: list[Group], *args: Any) -> Any:
        global rows
        rows += sum(len(group.works) for group in groups)
        return method(self, groups, *args)

    return wrapper


if __name__ == "__main__":
    for part, owner in PARTS.items():
        setattr(owner, part, timed(part, getattr(owner, part)))
    Batcher.finish = count_rows(Batcher.finish)  # type: ignore[method-assign]
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/default/model.onnx")
    asyncio.run(generation_loop(model, int(sys.argv[2]) if len(sys.argv) > 2 else 256))
    rounds = calls["finish"]
    print(f"{rounds} rounds, mean batch {rows / rounds:.1f}")
    for part in PARTS:
        print(f"{part:>22}: {spent[part] / rounds * 1e6:7.1f} us per round, {spent[part] / rows * 1e9:6.0f} ns per row")
