"""The load generator: N concurrent sessions stepping a server, run in a process of its own.

Each session keeps exactly one request in flight (send, wait for the answer, send
the next), so concurrency equals the number of sessions. Latencies are measured
from writing a request to reading its response, after a warm-up.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
import psutil

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

OUTPUTS = {"logits": pb.OUTPUT_LOGITS, "topk": pb.OUTPUT_TOPK, "sample": pb.OUTPUT_SAMPLE, "none": pb.OUTPUT_NONE}
MODES = ("step", "prompt", "generate")
# The load generators' channel: no port sharing, room for large answers.
CHANNEL_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class LoadSpec:
    """What one load run does.

    Args:
        target: server address.
        sessions: concurrent sessions (streams), each with one request in flight.
        mode: "step" (one token per request), "prompt" (prompt_len tokens per request)
            or "generate" (server-side generation of generate_tokens tokens per request).
        warmup_s, duration_s: warm-up, then measured time.
        output: what each step asks back (logits, topk, sample, none).
        vocab: token ids are drawn from [0, vocab).
        server_pids: the server's processes, whose CPU over the measured window is read with the load's own.
    """

    target: str
    sessions: int
    mode: str = "step"
    warmup_s: float = 1.0
    duration_s: float = 3.0
    output: str = "logits"
    prompt_len: int = 16
    generate_tokens: int = 32
    vocab: int = 2
    server_pids: tuple[int, ...] = ()


@dataclass
class LoadResult:
    """Measured over the measurement window: count of responses (steps or generated tokens), latencies, batch sizes,
    and the CPU seconds used in it: by the load processes (`cpu_s`, summed over them) and by the server's processes
    where their ids were given (`server_cpu_s`), over `cpu_wall_s` seconds (the longest of the processes' windows)."""

    count: int = 0
    positions: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: int = 0
    cpu_s: float = 0.0
    cpu_wall_s: float = 0.0
    server_cpu_s: float | None = None


@dataclass
class Window:
    """The measured window and what the sessions counted in it.

    An answer's items (one step, the steps of a StepSessions answer, or the generated tokens of a chunk) are counted as made evenly over the
    time since the previous answer (or the request), and the share of that time inside the window is
    what counts: with thousands of sessions generating in step, a coalesced chunk carries most of a
    generation, and counting whole chunks would make the count jump by thousands of tokens at a time.
    Latencies and batch sizes are those of answers sent and received inside the window, as the load
    generator takes them."""

    start: float
    end: float
    count: float = 0.0
    positions: float = 0.0
    result: LoadResult = field(default_factory=LoadResult)

    def add(self, sent: float, received: float, items: int, positions: int, batch_sizes: Iterable[int]) -> None:
        """Records an answer of `items` steps or tokens (`positions` in all) received at `received` for a
        request (or previous answer) at `sent`."""
        inside = min(received, self.end) - max(sent, self.start)
        if inside <= 0 or not items:
            return
        share = inside / (received - sent) if received > sent else 1.0
        self.count += share * items
        self.positions += share * positions
        if self.start <= sent and received <= self.end:
            self.result.latencies_s.append(received - sent)
            self.result.batch_sizes.extend(batch_sizes)

    def measured(self) -> LoadResult:
        """What was counted, as a load result over the window (counts rounded to whole items)."""
        result = self.result
        result.count, result.positions = round(self.count), round(self.positions)
        result.elapsed_s = self.end - self.start
        return result


async def _session(stub: pb_grpc.LstmServeStub, spec: LoadSpec, seed: int, window: tuple[float, float], result: LoadResult) -> None:
    rng = np.random.default_rng(seed)
    start, end = window
    # As the client library does: propose the session id and send it on every call, so a proxy in front
    # of several replicas (ring hash on lstmserve-session) keeps the session on one replica.
    session_id = secrets.token_hex(16)
    metadata = (("lstmserve-session", session_id),)
    try:
        await stub.CreateSession(pb.CreateSessionRequest(session_id=session_id), metadata=metadata)
    except grpc.aio.AioRpcError:
        result.errors += 1
        return
    call = stub.Step(metadata=metadata)
    first = True
    try:
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            length = spec.prompt_len if spec.mode == "prompt" else 1
            request = pb.StepRequest(tokens=rng.integers(0, spec.vocab, size=length).tolist(), output=OUTPUTS[spec.output])
            if first:
                request.session_id, first = session_id, False
            if spec.mode == "generate":
                request.output = pb.OUTPUT_NONE
                request.generate.max_tokens = spec.generate_tokens
                request.generate.sampling.temperature = 1.0
                request.generate.coalesce = True
            sent = time.perf_counter()
            await call.write(request)
            while True:
                response = await call.read()
                received = time.perf_counter()
                if start <= sent and received <= end:
                    if spec.mode == "generate":
                        # A response carries the tokens made since the previous one: the latency
                        # recorded is the time between responses.
                        generated = len(response.tokens) if response.tokens else int(not response.finished)
                        if generated:
                            result.latencies_s.append(received - sent)
                            result.count += generated
                            result.positions += generated
                    else:
                        result.latencies_s.append(received - sent)
                        result.count += 1
                        result.positions += length
                    if response.batch_size:
                        result.batch_sizes.append(response.batch_size)
                sent = received
                if spec.mode != "generate" or response.finished:
                    break
        await call.done_writing()
    except grpc.aio.AioRpcError:
        result.errors += 1
        call.cancel()
    # After the measured window: a server the benchmark only targets (--target) keeps running, and would
    # otherwise hold every run's sessions until they idle out and refuse new ones at --max-sessions.
    try:
        await stub.CloseSession(pb.SessionRef(session_id=session_id), metadata=metadata)
    except grpc.aio.AioRpcError:
        pass  # already gone (e.g. the stream failed with it); the count above reports real errors


def _processes_cpu_s(processes: Sequence[psutil.Process]) -> float:
    """The CPU seconds (user and system, all threads) the processes have used so far."""
    return sum(sum(process.cpu_times()[:2]) for process in processes)


async def cpu_in_window(start: float, end: float, result: LoadResult, server_pids: Sequence[int] = ()) -> None:
    """Reads the CPU this process uses from `start` to `end` (`time.perf_counter()` times) into `result.cpu_s`, that of
    the `server_pids` processes into `result.server_cpu_s`, and the wall seconds between the two reads into
    `result.cpu_wall_s` (it sleeps until each end, so on a busy event loop a read may come a little late; both are
    read at the same moments)."""
    servers = [psutil.Process(pid) for pid in server_pids]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu_started, server_started, wall_started = time.process_time(), _processes_cpu_s(servers), time.perf_counter()
    await asyncio.sleep(max(0.0, end - wall_started))
    result.cpu_s = time.process_time() - cpu_started
    if servers:
        result.server_cpu_s = _processes_cpu_s(servers) - server_started
    result.cpu_wall_s = time.perf_counter() - wall_started


async def run_load(spec: LoadSpec, seed_base: int = 0) -> LoadResult:
    """Runs the sessions on this event loop and returns what they measured."""
    result = LoadResult()
    async with grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.LstmServeStub(channel)
        start = time.perf_counter() + spec.warmup_s
        end = start + spec.duration_s
        cpu = asyncio.ensure_future(cpu_in_window(start, end, result, spec.server_pids))
        try:
            await asyncio.gather(*(_session(stub, spec, seed_base + i, (start, end), result) for i in range(spec.sessions)))
            await cpu
        finally:
            cpu.cancel()  # if the sessions failed before the window ended
    result.elapsed_s = spec.duration_s
    return result


# A load function: runs a load spec on the running event loop, from a seed, and returns what it measured.
LoadFunction = Callable[[Any, int], Awaitable[LoadResult]]


def _process_main(run: LoadFunction, spec: object, seed_base: int, connection: mp.connection.Connection) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    connection.send(asyncio.run(run(spec, seed_base)))  # type: ignore[arg-type]
    connection.close()


def start_load_process(run: LoadFunction, spec: object, seed_base: int = 0) -> Callable[[], LoadResult]:
    """Starts `run(spec, seed_base)` in a load process of its own (spawned: never the caller's); returns a
    function that waits for its result."""
    parent, child = mp.get_context("spawn").Pipe(duplex=False)
    process = mp.get_context("spawn").Process(target=_process_main, args=(run, spec, seed_base, child), daemon=True)
    process.start()

    def result() -> LoadResult:
        measured: LoadResult = parent.recv()
        process.join()
        return measured

    return result


def run_load_in_processes(spec: LoadSpec, processes: int = 1) -> LoadResult:
    """Splits the sessions over `processes` load processes (never the caller's) and merges their results."""
    share = [spec.sessions // processes + (1 if i < spec.sessions % processes else 0) for i in range(processes)]
    waits = [  # the first process reads the server's CPU (each would read the same)
        start_load_process(
            run_load,
            replace(spec, sessions=sessions, server_pids=spec.server_pids if index == 0 else ()),
            index * 100_000,
        )
        for index, sessions in enumerate(s for s in share if s)
    ]
    merged = LoadResult(elapsed_s=spec.duration_s)
    for wait in waits:
        part_result = wait()
        merged.count += part_result.count
        merged.positions += part_result.positions
        merged.latencies_s += part_result.latencies_s
        merged.batch_sizes += part_result.batch_sizes
        merged.errors += part_result.errors
        merged.cpu_s += part_result.cpu_s
        merged.cpu_wall_s = max(merged.cpu_wall_s, part_result.cpu_wall_s)
        if part_result.server_cpu_s is not None:
            merged.server_cpu_s = part_result.server_cpu_s
    return merged
