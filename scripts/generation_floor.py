"""How fast could any task-per-stream generation engine in Python go on this machine? An idealised one, measured.

Usage:
    .venv/bin/python scripts/generation_floor.py inprocess [--model M] [--sessions N] [--lanes 1|2] [--temperature T]
    .venv/bin/python scripts/generation_floor.py serve [--model M] [--port P] [--lanes 1|2]

`FloorEngine` keeps only what generation cannot do without: each round, the real model call on a worker
thread (gather, ONNX Runtime, scatter: what the compute ceiling times), this project's sampler
(`sample_kind`, the same tokens as the server's), the tokens in arrays indexed by state slot, and a
`Wakeup` per stream that is due a response (its first token, a coalesced share, or its end). It has no
session table, no validation, no queues, no deadlines, no stop strings, no metrics, no exactly-once
bookkeeping. With `--lanes 2` the slots form two batches that take turns on the worker, so one half's
sampling overlaps the other half's model call.

`inprocess` drives it as `lstmserve bench --series engine` drives the server's engine (N sessions, each an
asyncio task generating 32 tokens at a time, again and again) and prints tokens/s against ONNX Runtime at
the same batch. `serve` puts it behind `lstmserve.v1.LstmServe.Step` (generate requests with coalesce only)
for `lstmserve bench --target localhost:P --mode generate --series server,onnxruntime --model M`: the same
load generator, messages as the server's, and the ratio to the ceiling at the batch it formed.

Whatever this engine misses by, lstmserve's engine, which does all it leaves out, misses by at least as much.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from lstmserve.bench.ceilings import onnxruntime_steps_per_s
from lstmserve.bench.echo import EchoService
from lstmserve.server.cli import GIL_SWITCH_INTERVAL_S
from lstmserve.server.generation import Wakeup
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.sampling import sample_kind
from lstmserve.server.state import HostStateStore
from lstmserve.server.token_log import coalesce_share
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

TOKENS_PER_GENERATION = 32
MAX_TOKENS = 64  # tokens kept per slot: a generation may ask for at most this many


class FloorEngine:
    """Runs the generating slots in rounds: model call, sampler, token arrays, wake-ups. Nothing else."""

    def __init__(self, model: Path, capacity: int, lanes: int = 1, temperature: float = 1.0) -> None:
        self.runner = Runner(model, RunnerOptions(providers=("cpu",), intra_op_threads=1))
        self.vocabulary = self.runner.spec.vocabulary
        self.store = HostStateStore(*self.runner.spec.state_shape, capacity)
        self.lanes, self.temperature = lanes, temperature
        self.made = np.zeros(capacity, np.int64)
        self.taken = np.zeros(capacity, np.int64)
        self.limit = np.zeros(capacity, np.int64)
        self.fed = np.zeros(capacity, np.int64)  # the token each slot's next step feeds
        self.batch_size = np.zeros(capacity, np.int64)  # of the slot's last step
        self.tokens = np.zeros((capacity, MAX_TOKENS), np.int64)
        self.generating = np.zeros(capacity, bool)
        self.wakeups: list[Wakeup | None] = [None] * capacity
        self._work = [Wakeup() for _ in range(lanes)]
        self._worker = ThreadPoolExecutor(1)
        self._stopped = False
        self.made_total = 0

    def allocate(self) -> int:
        """A state slot for a new stream."""
        return self.store.allocate()

    def start(self, slot: int, prompt_token: int, max_tokens: int, wakeup: Wakeup) -> None:
        """Starts a generation of `max_tokens` on `slot` from one prompt token; `wakeup` is set when it is due a
        response."""
        if not 0 < max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens {max_tokens} is not in 1..{MAX_TOKENS}")
        self.fed[slot], self.limit[slot], self.made[slot], self.taken[slot] = prompt_token, max_tokens, 0, 0
        self.wakeups[slot] = wakeup
        self.generating[slot] = True
        self._work[slot % self.lanes].set()

    def take(self, slot: int) -> tuple[list[int], int, int, bool]:
        """The slot's tokens not taken yet, its tokens made so far, its last batch's size, and whether it ended."""
        first, made = int(self.taken[slot]), int(self.made[slot])
        self.taken[slot] = made
        return self.tokens[slot, first:made].tolist(), made, int(self.batch_size[slot]), made >= self.limit[slot]

    async def run(self) -> None:
        """Runs rounds on every lane until `stop`."""
        await asyncio.gather(*(self._run_lane(lane) for lane in range(self.lanes)))

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called."""
        return self._stopped

    def stop(self) -> None:
        """Ends the rounds after the current ones."""
        self._stopped = True
        for work in self._work:
            work.set()

    async def _run_lane(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        in_lane = np.arange(len(self.made)) % self.lanes == lane
        while not self._stopped:
            slots = np.flatnonzero(self.generating & in_lane)
            if not len(slots):
                await self._work[lane].wait()
                continue
            logits = await loop.run_in_executor(self._worker, self._compute, slots, lane)
            # The streams woken here take their tokens while the lane's next model call computes (awaiting it
            # lets them run); a generation they start joins the round after that.
            self._apply(slots, sample_kind((self.temperature, 0, 1.0), logits))

    def _compute(self, slots: np.ndarray, lane: int) -> np.ndarray:
        buffers = self.store.gather(slots, lane)
        logits = self.runner.run(self.fed[slots, np.newaxis], buffers, lane)[:, -1]
        self.store.scatter(slots, buffers)
        return logits

    def _apply(self, slots: np.ndarray, picked: np.ndarray) -> None:
        made = self.made[slots]
        self.tokens[slots, made] = picked
        made += 1
        self.made[slots], self.fed[slots], self.batch_size[slots] = made, picked, len(slots)
        self.made_total += len(slots)
        ended = made >= self.limit[slots]
        self.generating[slots[ended]] = False
        share = coalesce_share(int(self.generating.sum()) + int(ended.sum()))
        due = (made == 1) | ended | (made - self.taken[slots] >= share)
        wakeups = self.wakeups
        for slot in slots[due].tolist():
            wakeups[slot].set()


async def _session(engine: FloorEngine, seed: int) -> None:
    """One in-process session: generates TOKENS_PER_GENERATION tokens, again and again, taking each response."""
    rng = np.random.default_rng(seed)
    slot, wakeup = engine.allocate(), Wakeup()
    prompts = rng.integers(0, max(1, len(engine.vocabulary)), size=64).tolist()
    generation = 0
    while not engine.stopped:
        engine.start(slot, prompts[generation % len(prompts)], TOKENS_PER_GENERATION, wakeup)
        generation += 1
        while True:
            await wakeup.wait()
            if engine.take(slot)[3] or engine.stopped:
                break


async def _in_process(model: Path, sessions: int, lanes: int, temperature: float, seconds: float) -> tuple[float, float]:
    engine = FloorEngine(model, sessions, lanes, temperature)
    rounds = asyncio.ensure_future(engine.run())
    streams = [asyncio.ensure_future(_session(engine, seed)) for seed in range(sessions)]
    await asyncio.sleep(1.0)  # warm-up
    made, started, cpu_started = engine.made_total, time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - started
    rate, cpu = (engine.made_total - made) / elapsed, (time.process_time() - cpu_started) / elapsed
    engine.stop()
    await rounds
    for stream in streams:
        stream.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    return rate, cpu


class FloorService(EchoService):
    """`Step` with generate requests (coalesced) answered by a FloorEngine; the echo service's session calls."""

    def __init__(self, engine: FloorEngine) -> None:
        super().__init__(len(engine.vocabulary))
        self.engine = engine

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        engine, vocabulary = self.engine, self.engine.vocabulary
        slot, wakeup, step = engine.allocate(), Wakeup(), 0
        try:
            async for request in request_iterator:
                if not (request.HasField("generate") and request.generate.coalesce and len(request.tokens) == 1):
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only one-token coalesced generate requests")
                engine.start(slot, request.tokens[0], request.generate.max_tokens, wakeup)
                while True:
                    await wakeup.wait()
                    tokens, made, batch_size, ended = engine.take(slot)
                    response = pb.StepResponse(session_id=request.session_id, step=step + made, batch_size=batch_size)
                    response.tokens.extend(tokens)
                    response.texts.extend(vocabulary[token] for token in tokens)
                    if ended:
                        response.finished, response.finish_reason = True, "length"
                    yield response
                    if ended:
                        break
                step += 1 + made
        finally:
            engine.generating[slot] = False
            engine.store.release(slot)


async def _serve(model: Path, port: int, lanes: int) -> None:
    engine = FloorEngine(model, 4096, lanes)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LstmServeServicer_to_server(FloorService(engine), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"generation floor: serving on 127.0.0.1:{bound}", flush=True)
    rounds = asyncio.ensure_future(engine.run())
    try:
        await server.wait_for_termination()
    finally:
        engine.stop()
        await rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("how", choices=["inprocess", "serve"])
    parser.add_argument("--model", type=Path, default=None, help="default: tiny in-process, default served")
    parser.add_argument("--sessions", type=int, default=4096)
    parser.add_argument("--lanes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="inprocess: 0 samples greedily")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `lstmserve serve` runs
    if args.how == "serve":
        asyncio.run(_serve(args.model or Path("models/default/model.onnx"), args.port, args.lanes))
        return
    model = args.model or Path("models/tiny/model.onnx")
    rate, cpu = asyncio.run(_in_process(model, args.sessions, args.lanes, args.temperature, args.seconds))
    batch = args.sessions // args.lanes
    ceiling, _ = onnxruntime_steps_per_s(model, batch, duration_s=2.0, intra_op_threads=1)
    print(
        f"{args.sessions} sessions, {args.lanes} lane(s), temperature {args.temperature}: {rate:,.0f} tokens/s "
        f"({cpu:.0%} CPU); ONNX Runtime at batch {batch}: {ceiling:,.0f}; ratio {rate / ceiling:.2f}"
    )


if __name__ == "__main__":
    main()
