"""The engine series: lstmserve's batching engine (scheduler, state store, runner) driven in this process.

N concurrent sessions, each an asyncio task with one step (or one generation) in flight, call the
scheduler directly: no gRPC, no protobuf, no load-generator process. Set beside the server series,
it separates what gRPC costs from what the engine costs; set beside the ONNX Runtime ceiling at the
same batch size, it shows what the batching loop costs around the model call.

`build_engine` is the one place the benchmark constructs the engine, as `server/app.py` does: if
the scheduler's constructor changes, only that function changes.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lstmserve.bench.loadgen import LoadResult, Window
from lstmserve.metadata import ModelSpec
from lstmserve.server.app import make_store, scheduler_limits
from lstmserve.server.cli import GC_YOUNG_THRESHOLD, GIL_SWITCH_INTERVAL_S
from lstmserve.server.config import ServerConfig
from lstmserve.server.errors import ServeError
from lstmserve.server.generation import GenerateParams, generate
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.sampling import SamplingParams
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.sessions import Session

T = TypeVar("T")


@dataclass(frozen=True)
class Engine:
    """The server's batching engine, not started.

    Args:
        scheduler: the batching scheduler; `start()` it on a running event loop, `close()` it after.
        spec: the model's metadata (input kind, vocabulary, input width).
    """

    scheduler: Scheduler
    spec: ModelSpec


def build_engine(
    model: Path,
    *,
    max_sessions: int,
    max_batch_size: int = 256,
    intra_op_threads: int = 1,
    providers: tuple[str, ...] = ("cpu",),
    batches_in_flight: int = 1,
) -> Engine:
    """Constructs the runner, state store, limits, metrics and scheduler as `lstmserve serve` does
    (`server/app.py`), from the same `ServerConfig`, so every other limit has the server's default.

    Args:
        model: the exported model.onnx.
        max_sessions: most live sessions (the size of the state store).
        max_batch_size: most sessions in one model call.
        intra_op_threads: ONNX Runtime intra-op threads.
        providers: ONNX Runtime providers (the CPU, as the ONNX Runtime ceiling uses).
        batches_in_flight: batches computing at once (`lstmserve serve --batches-in-flight`).
    """
    config = ServerConfig(
        model=model,
        providers=providers,
        intra_op_threads=intra_op_threads,
        max_batch_size=max_batch_size,
        max_sessions=max_sessions,
        batches_in_flight=batches_in_flight,
    )
    runner = Runner(config.model, RunnerOptions(providers=config.providers, intra_op_threads=config.intra_op_threads))
    store = make_store(runner, config)
    return Engine(scheduler=Scheduler(runner, store, scheduler_limits(config), Metrics()), spec=runner.spec)


@dataclass(frozen=True)
class EngineLoad:
    """What one engine run does (the engine's counterpart of `LoadSpec`).

    Args:
        sessions: concurrent sessions, each an asyncio task with one request in flight.
        mode: "step" (one token per request), "prompt" (prompt_len tokens per request) or
            "generate" (generations of generate_tokens tokens at temperature 1, coalesced).
        warmup_s, duration_s: warm-up, then measured time.
    """

    sessions: int
    mode: str = "step"
    warmup_s: float = 1.0
    duration_s: float = 3.0
    prompt_len: int = 16
    generate_tokens: int = 32


@dataclass(frozen=True)
class EngineResult:
    """What the sessions measured, and the CPU seconds the process used over the whole run."""

    load: LoadResult
    cpu_s: float
    wall_s: float


def measure_engine(
    model: Path,
    load: EngineLoad,
    *,
    intra_op_threads: int = 1,
    max_batch_size: int | None = None,
    batches_in_flight: int = 1,
    gc_young_threshold: int = GC_YOUNG_THRESHOLD,
) -> EngineResult:
    """Builds an engine for `load.sessions` sessions (batches of up to that many, unless `max_batch_size`),
    drives it on a fresh event loop (uvloop where installed, as `lstmserve serve` runs) with the server
    process's GIL and GC settings (`gc_young_threshold` for the youngest generation), and stops it."""
    engine = build_engine(
        model,
        max_sessions=load.sessions + 16,
        max_batch_size=max_batch_size or load.sessions,
        intra_op_threads=intra_op_threads,
        batches_in_flight=batches_in_flight,
    )
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    with serve_process_settings(gc_young_threshold):
        result = _run_on_new_loop(drive(engine, load))
    return EngineResult(result, time.process_time() - cpu_started, time.perf_counter() - wall_started)


async def drive(engine: Engine, load: EngineLoad, seed_base: int = 0) -> LoadResult:
    """Starts the engine on this event loop, runs the sessions through the warm-up and the measured window,
    closes them and stops the engine; returns the steps (or generated tokens) made in the window, the
    latencies of the answers sent and received inside it, and the batch each was computed in."""
    scheduler = engine.scheduler
    scheduler.start()
    try:
        start = time.perf_counter() + load.warmup_s
        window = Window(start, start + load.duration_s)
        session_run = _generating_session if load.mode == "generate" else _stepping_session
        await asyncio.gather(*(session_run(engine, load, seed_base + i, window) for i in range(load.sessions)))
    finally:
        await scheduler.close()
    return window.measured()


# A session draws the inputs of this many requests at once, then repeats them: a draw per request (a numpy call
# of a few microseconds) was 9% of the event loop's thread with 4,096 sessions generating in `py-spy record` of
# `lstmserve bench --series engine --model models/tiny/model.onnx`, work no client puts on the server.
INPUTS_DRAWN = 8


def _inputs(spec: ModelSpec, rng: np.random.Generator, positions: int) -> Iterator[np.ndarray]:
    """Requests' inputs, again and again: `positions` random tokens each, or feature rows for a feature model
    (INPUTS_DRAWN requests' worth drawn at once, then repeated in order)."""
    if spec.kind == "tokens":
        vocab = max(1, len(spec.vocabulary))
        drawn = rng.integers(0, vocab, size=(INPUTS_DRAWN, positions)).astype(np.int64)
    else:
        drawn = rng.standard_normal((INPUTS_DRAWN, positions, spec.input_size)).astype(np.float32)
    return itertools.cycle(drawn)  # views of `drawn`: no copy per request


async def _stepping_session(engine: Engine, load: EngineLoad, seed: int, window: Window) -> None:
    scheduler = engine.scheduler
    rng = np.random.default_rng(seed)
    length = load.prompt_len if load.mode == "prompt" else 1
    inputs = _inputs(engine.spec, rng, length)
    session = scheduler.create_session()
    try:
        while (sent := time.perf_counter()) < window.end:
            step = await scheduler.step(session, next(inputs))
            window.add(sent, time.perf_counter(), 1, length, (step.batch_size,))
    except ServeError:
        window.result.errors += 1
    await _close(scheduler, session)


async def _generating_session(engine: Engine, load: EngineLoad, seed: int, window: Window) -> None:
    scheduler, vocabulary = engine.scheduler, engine.spec.vocabulary
    params = GenerateParams(max_tokens=load.generate_tokens, sampling=SamplingParams(temperature=1.0), coalesce=True)
    prompts = _inputs(engine.spec, np.random.default_rng(seed), 1)
    session = scheduler.create_session()
    try:
        while (sent := time.perf_counter()) < window.end:
            async for chunk in generate(scheduler, session, next(prompts), params, vocabulary):
                received = time.perf_counter()
                made = len(chunk.tokens)
                # As the load generator: the latency recorded is the time between chunks.
                window.add(sent, received, made, made, chunk.batch_sizes)
                sent = received
    except ServeError:
        window.result.errors += 1
    await _close(scheduler, session)


async def _close(scheduler: Scheduler, session: Session) -> None:
    try:
        await scheduler.close_session(session.id)
    except ServeError:
        pass  # already gone; the count above reports real errors


@contextmanager
def serve_process_settings(gc_young_threshold: int = GC_YOUNG_THRESHOLD) -> Iterator[None]:
    """The GIL switch interval and garbage-collector settings `lstmserve serve` runs with (or another threshold for
    the youngest generation, to measure it), restored after."""
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.freeze()
    gc.set_threshold(gc_young_threshold, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        sys.setswitchinterval(interval)


def _run_on_new_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine on a new event loop: uvloop's where installed (as `lstmserve serve`), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
