"""How fast could a task-per-stream generation engine in Python go on this machine? An idealised one, measured.

Usage:
    .venv/bin/python scripts/generation_floor.py inprocess [--model M] [--sessions N] [--lanes 1|2]
        [--sample-on loop|worker] [--model-on worker|loop] [--temperature T] [--seconds S]
    .venv/bin/python scripts/generation_floor.py serve [--model M] [--port P] [--sessions N] [--lanes 1|2]
        [--sample-on loop|worker] [--model-on worker|loop]

`FloorEngine` keeps only what generation cannot do without: each round, the real model call (gather,
ONNX Runtime, scatter: what the compute ceiling times), this project's sampler (`sample_kind`, the same
tokens as the server's), the tokens in arrays indexed by state slot, and a `Wakeup` per stream that is due
a response (its first token, a coalesced share as the server sizes it, or its end). It has no session
table, no validation beyond the prompt token, no queues, no deadlines, no stop strings, no metrics and no
exactly-once bookkeeping. How its work is placed can be chosen, to find the fastest placement:
- `--lanes 2`: the slots form two batches that take turns, so one lane's work overlaps the other's model call;
- `--sample-on worker`: each lane's worker thread samples its logits right after the model call (a worker
  thread per lane, so both cores can run ONNX Runtime and numpy while the event loop runs the streams);
  `loop` samples on the event loop, as the server does;
- `--model-on loop`: the model call runs on the event loop too, with no worker thread at all (sampling then
  stays on the loop): one thread does everything, and no call waits for a thread hop or the GIL.

`inprocess` drives it as `lstmserve bench --series engine` drives the server's engine (N sessions, each an
asyncio task generating 32 tokens at temperature T, again and again), with `lstmserve serve`'s GIL and
garbage-collector settings, and prints tokens/s, the process's CPU and the ratio to ONNX Runtime at batch N,
the batch the engine series compares with. `serve` puts it behind `lstmserve.v1.LstmServe.Step` (one-token
coalesced generate requests at temperature 1 only) for `lstmserve bench --target localhost:P --mode generate
--series server,onnxruntime --model M`: the same load generator, responses of the server's sizes, and the
ratio to the ceiling at the batch it formed.

The engine leaves out everything lstmserve does that generation can do without, so what it reaches bounds what
an engine built the same way (Python and asyncio, a coroutine per stream, ONNX Runtime on the CPU) can reach
here; the bound is only as good as the best placement measured.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np

from lstmserve.bench.ceilings import onnxruntime_steps_per_s
from lstmserve.bench.echo import EchoService
from lstmserve.bench.engine import serve_process_settings
from lstmserve.server.generation import Wakeup
from lstmserve.server.runner import PreparedCall, Runner, RunnerOptions
from lstmserve.server.sampling import sample_kind
from lstmserve.server.state import HostStateStore
from lstmserve.server.token_log import coalesce_share
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

TOKENS_PER_GENERATION = 32
MAX_TOKENS = 64  # tokens kept per slot: a generation may ask for at most this many


class Taken(NamedTuple):
    """What a stream takes from its slot: the tokens not taken before, the tokens its generation made so far,
    the size of the batch its last token came from, and whether the generation ended."""

    tokens: list[int]
    made: int
    batch_size: int
    ended: bool


class FloorEngine:
    """Runs the generating slots in rounds: model call, sampler, token arrays, wake-ups. Nothing else.

    Args:
        model: the exported model.onnx.
        capacity: state slots, one per stream.
        lanes: batches taking turns (slot s is in lane s % lanes).
        sample_on_worker: sample on each lane's worker thread right after its model call, not on the event loop.
        model_on_loop: make the model call on the event loop, not on a worker thread (sampling stays there too).
        temperature: the sampling temperature of every generation (0: argmax).
    """

    def __init__(
        self,
        model: Path,
        capacity: int,
        lanes: int = 1,
        sample_on_worker: bool = False,
        temperature: float = 1.0,
        model_on_loop: bool = False,
    ) -> None:
        if sample_on_worker and model_on_loop:
            raise ValueError("the model call on the event loop leaves no worker thread to sample on")
        self.runner = Runner(model, RunnerOptions(providers=("cpu",), intra_op_threads=1))
        self.vocabulary = self.runner.spec.vocabulary
        self.store = HostStateStore(*self.runner.spec.state_shape, capacity)
        self.lanes, self.sample_on_worker, self.temperature = lanes, sample_on_worker, temperature
        self.model_on_loop = model_on_loop
        # Per slot: tokens made and taken in the current generation, its length, the token its next step feeds,
        # the size of its last batch, its tokens, and whether it is generating.
        self.made = np.zeros(capacity, np.int64)
        self.taken = np.zeros(capacity, np.int64)
        self.limit = np.zeros(capacity, np.int64)
        self.fed = np.zeros(capacity, np.int64)
        self.batch_size = np.zeros(capacity, np.int64)
        self.tokens = np.zeros((capacity, MAX_TOKENS), np.int64)
        self.generating = np.zeros(capacity, bool)
        self.wakeups: list[Wakeup | None] = [None] * capacity  # the stream to wake when the slot is due a response
        self._lane_has_work = [Wakeup() for _ in range(lanes)]
        self.in_call = np.zeros(capacity, bool)  # slots whose lane's model call is computing
        self._to_release: list[list[int]] = [[] for _ in range(lanes)]  # freed while computing: released after
        self._workers = [ThreadPoolExecutor(1) for _ in range(lanes if sample_on_worker else 1)]
        self._stopped = False
        self.made_total = 0

    def allocate(self) -> int:
        """A state slot for a new stream."""
        return self.store.allocate()

    def release(self, slot: int) -> None:
        """Frees a stream's slot: at once, or after its lane's model call if the slot is in it (its state is
        gathered and not yet scattered back)."""
        self.generating[slot] = False
        self.wakeups[slot] = None
        if self.in_call[slot]:
            self._to_release[slot % self.lanes].append(slot)
        else:
            self.store.release(slot)

    def start(self, slot: int, prompt_token: int, max_tokens: int, wakeup: Wakeup) -> None:
        """Starts a generation of `max_tokens` tokens on `slot` from one prompt token; `wakeup` is set whenever the
        generation is due a response."""
        if not 0 < max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens {max_tokens} is not in 1..{MAX_TOKENS}")
        if not 0 <= prompt_token < len(self.vocabulary):
            raise ValueError(f"prompt token {prompt_token} is not in 0..{len(self.vocabulary) - 1}")
        self.fed[slot], self.limit[slot], self.made[slot], self.taken[slot] = prompt_token, max_tokens, 0, 0
        self.wakeups[slot] = wakeup
        self.generating[slot] = True
        self._lane_has_work[slot % self.lanes].set()

    def take(self, slot: int) -> Taken:
        """The slot's tokens not taken yet, and where its generation stands."""
        first, made = int(self.taken[slot]), int(self.made[slot])
        self.taken[slot] = made
        return Taken(self.tokens[slot, first:made].tolist(), made, int(self.batch_size[slot]), made >= self.limit[slot])

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called."""
        return self._stopped

    async def run(self) -> None:
        """Runs rounds on every lane until `stop`; a lane that fails fails this."""
        await asyncio.gather(*(self._run_lane(lane) for lane in range(self.lanes)))

    def stop(self) -> None:
        """Ends the rounds after the current ones."""
        self._stopped = True
        for has_work in self._lane_has_work:
            has_work.set()

    async def _run_lane(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        worker = self._workers[lane % len(self._workers)]
        in_lane = np.arange(len(self.made)) % self.lanes == lane
        while not self._stopped:
            slots = np.flatnonzero(self.generating & in_lane)
            if not len(slots):
                await self._lane_has_work[lane].wait()
                continue
            self.in_call[slots] = True
            # As the server: gather and bind on the loop, only the model call (and here perhaps the sampler) on
            # the worker. While it computes, the streams woken by the previous round take their tokens; a
            # generation they start joins a later round.
            buffers = self.store.gather(slots, lane)
            call = self.runner.prepare(self.fed[slots, np.newaxis], buffers, lane)
            if self.model_on_loop:
                outputs = self._compute(call)
                await asyncio.sleep(0)  # the streams woken by the previous round run before the next round
            else:
                outputs = await loop.run_in_executor(worker, self._compute, call)
            self.store.scatter(slots, buffers)
            self.in_call[slots] = False
            for slot in self._to_release[lane]:
                self.store.release(slot)
            self._to_release[lane].clear()
            picked = outputs if self.sample_on_worker else self._sample(outputs)
            self._apply(slots, picked)

    def _compute(self, call: PreparedCall) -> np.ndarray:
        """On a worker thread (or the loop): the model call, then its logits, or with `sample_on_worker` its sampled
        tokens."""
        self.runner.execute(call)
        logits = call.logits()[:, -1]
        return self._sample(logits) if self.sample_on_worker else logits

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        return sample_kind((self.temperature, 0, 1.0), logits)

    def _apply(self, slots: np.ndarray, picked: np.ndarray) -> None:
        """Records a round's tokens and wakes the streams due a response. A slot freed while it computed gets
        nothing."""
        still = self.generating[slots]
        slots, picked = slots[still], picked[still]
        made = self.made[slots]
        self.tokens[slots, made] = picked
        made += 1
        self.made[slots], self.fed[slots], self.batch_size[slots] = made, picked, len(slots)
        self.made_total += len(slots)
        ended = made >= self.limit[slots]
        self.generating[slots[ended]] = False
        share = coalesce_share(int(self.generating.sum()) + int(ended.sum()))
        due = (made == 1) | ended | (made - self.taken[slots] >= share)
        for slot in slots[due].tolist():
            wakeup = self.wakeups[slot]
            if wakeup is not None:
                wakeup.set()


async def _session(engine: FloorEngine, seed: int) -> None:
    """One in-process session: generates TOKENS_PER_GENERATION tokens, again and again, taking each response."""
    rng = np.random.default_rng(seed)
    slot, wakeup = engine.allocate(), Wakeup()
    prompts = rng.integers(0, max(1, len(engine.vocabulary)), size=64).tolist()
    generation = 0
    while not engine.stopped:
        engine.start(slot, prompts[generation % len(prompts)], TOKENS_PER_GENERATION, wakeup)
        generation += 1
        while not engine.stopped:
            await wakeup.wait()
            if engine.take(slot).ended:
                break


async def _in_process(
    model: Path,
    sessions: int,
    lanes: int,
    sample_on_worker: bool,
    temperature: float,
    seconds: float,
    model_on_loop: bool = False,
) -> tuple[float, float]:
    engine = FloorEngine(model, sessions, lanes, sample_on_worker, temperature, model_on_loop)
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
    """`Step` with one-token coalesced generate requests answered by a FloorEngine; the echo service's session
    calls (CreateSession and CloseSession keep nothing)."""

    def __init__(self, engine: FloorEngine) -> None:
        super().__init__(len(engine.vocabulary))
        self.engine = engine

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        engine, vocabulary = self.engine, self.engine.vocabulary
        slot, wakeup = engine.allocate(), Wakeup()
        step = 0  # the stream's step counter, as the server's session counts: one per position fed
        try:
            async for request in request_iterator:
                if not (request.HasField("generate") and request.generate.coalesce and len(request.tokens) == 1):
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only one-token coalesced generate requests")
                try:
                    engine.start(slot, request.tokens[0], request.generate.max_tokens, wakeup)
                except ValueError as error:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                while True:
                    await wakeup.wait()
                    taken = engine.take(slot)
                    # Token i of the generation was sampled after the step that fed position step + i.
                    response = pb.StepResponse(
                        session_id=request.session_id, step=step + taken.made, batch_size=taken.batch_size
                    )
                    response.tokens.extend(taken.tokens)
                    response.texts.extend(vocabulary[token] for token in taken.tokens)
                    if taken.ended:
                        response.finished, response.finish_reason = True, "length"
                    yield response
                    if taken.ended:
                        break
                step += taken.made  # the prompt and every token but the last were fed
        finally:
            engine.release(slot)


async def _serve(
    model: Path, port: int, sessions: int, lanes: int, sample_on_worker: bool, model_on_loop: bool = False
) -> None:
    engine = FloorEngine(model, sessions, lanes, sample_on_worker, model_on_loop=model_on_loop)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LstmServeServicer_to_server(FloorService(engine), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"generation floor: serving on 127.0.0.1:{bound}", flush=True)
    try:
        await asyncio.gather(server.wait_for_termination(), engine.run())  # a failed round stops the server
    finally:
        engine.stop()
        await server.stop(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("how", choices=["inprocess", "serve"])
    parser.add_argument("--model", type=Path, default=None, help="default: tiny in-process, default served")
    parser.add_argument("--sessions", type=int, default=4096, help="sessions in-process; most streams served")
    parser.add_argument("--lanes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--sample-on", choices=["loop", "worker"], default="loop")
    parser.add_argument("--model-on", choices=["worker", "loop"], default="worker")
    parser.add_argument("--temperature", type=float, default=1.0, help="inprocess only: 0 samples by argmax")
    parser.add_argument("--seconds", type=float, default=4.0, help="inprocess only: measured seconds")
    parser.add_argument("--port", type=int, default=0, help="serve only")
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    on_worker, model_on_loop = args.sample_on == "worker", args.model_on == "loop"
    if on_worker and model_on_loop:
        parser.error("--model-on loop leaves no worker thread for --sample-on worker")
    with serve_process_settings():  # `lstmserve serve`'s GIL switch interval and garbage-collector settings
        if args.how == "serve":
            model = args.model or Path("models/default/model.onnx")
            asyncio.run(_serve(model, args.port, args.sessions, args.lanes, on_worker, model_on_loop))
            return
        model = args.model or Path("models/tiny/model.onnx")
        rate, cpu = asyncio.run(
            _in_process(model, args.sessions, args.lanes, on_worker, args.temperature, args.seconds, model_on_loop)
        )
    ceiling, _ = onnxruntime_steps_per_s(model, args.sessions, duration_s=2.0, intra_op_threads=1)
    print(
        f"{args.sessions} sessions, {args.lanes} lane(s), model on the {args.model_on}, sampling on the {args.sample_on}, temperature "
        f"{args.temperature}: {rate:,.0f} tokens/s ({cpu:.0%} CPU); ONNX Runtime at batch {args.sessions}: "
        f"{ceiling:,.0f}; ratio {rate / ceiling:.2f}"
    )


if __name__ == "__main__":
    main()
