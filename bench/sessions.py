"""The sessions series: one caller steps N sessions through the multi-session RPC (StepSessions).

The caller is what the RPC is for: a gateway or a queue consumer that holds many streams and sends,
on one gRPC channel, requests that each carry one single-token step for many of its sessions. It
creates N sessions, splits them into groups (`split_sessions`: with two calls in flight, two halves)
and gives each group one request in flight: send the group's StepSessions request, wait for the
answer, send the next. So a session is in at most one request at a time and its steps are applied
in the order they were sent, and the number of requests in flight is the number of groups.

In generate mode the caller generates for its sessions itself: each request feeds every session of
its group the token sampled for it in the group's previous answer (OUTPUT_SAMPLE at temperature 1, no
seed; a random first token), as a game server or an agent runtime that decides each step drives many
generations. A refused row feeds its previous token again.

Steps (in generate mode, generated tokens) are counted per session stepped (an answered entry), with
the engine series' window rule: a request's steps count in the share of its time inside the measured
window. Latencies are per request, of requests sent and received inside the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from lstmserve.bench.loadgen import CHANNEL_OPTIONS, OUTPUTS, LoadResult, Window, cpu_in_window, start_load_process
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class SessionsSpec:
    """What one multi-session run does.

    Args:
        target: server address.
        sessions: sessions the one caller creates and steps.
        calls_in_flight: StepSessions requests kept in flight, each for its own group of the sessions
            (fewer with fewer sessions than that; more where a group would exceed the server's
            ModelInfo.max_sessions_per_request).
        warmup_s, duration_s: warm-up (which includes creating the sessions), then measured time.
        output: what each entry asks back (logits, topk, sample, none).
        vocab: token ids are drawn from [0, vocab).
        form: "columns" (SessionColumns: no message per session) or "steps" (a SessionStep per session).
        mode: "step" (random tokens, `output` asked back) or "generate" (each session fed the token
            sampled for it in the previous answer; `output` is not used).
        server_pids: the server's processes, whose CPU over the measured window is read with the caller's own.
    """

    target: str
    sessions: int
    calls_in_flight: int = 2
    warmup_s: float = 1.0
    duration_s: float = 3.0
    output: str = "logits"
    vocab: int = 2
    form: str = "columns"
    mode: str = "step"
    server_pids: tuple[int, ...] = ()


def split_sessions(session_ids: Sequence[str], calls_in_flight: int, max_per_request: int) -> list[list[str]]:
    """The sessions in consecutive groups, one request in flight each: `calls_in_flight` groups whose sizes
    differ by at most one, or as many as there are sessions if fewer, or more if a group would carry more
    than `max_per_request` sessions. Every session is in exactly one group."""
    count = len(session_ids)
    if count == 0:
        return []
    groups = min(count, max(calls_in_flight, -(-count // max(1, max_per_request))))
    return [list(session_ids[index * count // groups : (index + 1) * count // groups]) for index in range(groups)]


async def run_sessions_load(spec: SessionsSpec, seed_base: int = 0) -> LoadResult:
    """Creates the sessions on one channel, steps them group by group until the window ends, closes them;
    returns the sessions stepped in the window, each request's latency and each step's batch size."""
    async with grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = pb_grpc.LstmServeStub(channel)
        start = time.perf_counter() + spec.warmup_s
        window = Window(start, start + spec.duration_s)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        cpu = asyncio.ensure_future(cpu_in_window(window.start, window.end, window.result, spec.server_pids))
        session_ids: list[str] = []
        try:
            session_ids = await _create_sessions(stub, spec.sessions, window.result)
            groups = split_sessions(session_ids, spec.calls_in_flight, info.max_sessions_per_request or len(session_ids))
            await asyncio.gather(
                *(_step_group(stub, group, spec, seed_base + index, window) for index, group in enumerate(groups))
            )
            await cpu
        finally:
            cpu.cancel()  # if a step failed before the window ended
            # After the measured window: a server the benchmark only targets (--target) keeps running.
            await _close_sessions(stub, session_ids)
    return window.measured()


def run_sessions_in_process(spec: SessionsSpec) -> LoadResult:
    """`run_sessions_load` in a load process of its own (never the caller's), as the server series' load runs."""
    return start_load_process(run_sessions_load, spec)()


async def _step_group(
    stub: pb_grpc.LstmServeStub, session_ids: Sequence[str], spec: SessionsSpec, seed: int, window: Window
) -> None:
    """One request in flight for this group: a single-token step for each of its sessions, again and again
    (in generate mode, each session's token the one sampled for it in the previous answer)."""
    rng = np.random.default_rng(seed)
    generating = spec.mode == "generate"
    output = pb.OUTPUT_SAMPLE if generating else OUTPUTS[spec.output]
    sampling = pb.Sampling(temperature=1.0) if generating else None
    tokens = rng.integers(0, spec.vocab, size=len(session_ids)).tolist()
    while time.perf_counter() < window.end:
        request = _request(session_ids, tokens, output, sampling, spec.form)
        sent = time.perf_counter()
        try:
            response = await stub.StepSessions(request)
        except grpc.aio.AioRpcError:
            window.result.errors += 1
            return
        received = time.perf_counter()
        batch_sizes = _answered_batch_sizes(response, spec.form)
        window.result.errors += len(session_ids) - len(batch_sizes)
        window.add(sent, received, len(batch_sizes), len(batch_sizes), batch_sizes)
        if generating:
            tokens = _sampled_tokens(response, spec.form, tokens)
        else:
            tokens = rng.integers(0, spec.vocab, size=len(session_ids)).tolist()


def _request(
    session_ids: Sequence[str], tokens: list[int], output: pb.OutputKind, sampling: pb.Sampling | None, form: str
) -> pb.StepSessionsRequest:
    """A StepSessions request of one token for each session, in `form`."""
    if form == "columns":
        return pb.StepSessionsRequest(
            columns=pb.SessionColumns(session_ids=session_ids, tokens=tokens, output=output, sampling=sampling)
        )
    return pb.StepSessionsRequest(
        steps=[
            pb.SessionStep(session_id=id_, tokens=[token], output=output, sampling=sampling)
            for id_, token in zip(session_ids, tokens, strict=True)
        ]
    )


def _sampled_tokens(response: pb.StepSessionsResponse, form: str, previous: list[int]) -> list[int]:
    """Each session's next token: the one sampled for it in `response`, or for a refused row its previous one."""
    if form == "columns":
        refused = {error.index for error in response.columns.errors}
        return [previous[row] if row in refused else token for row, token in enumerate(response.columns.tokens)]
    return [
        result.response.token if result.HasField("response") else previous[row]
        for row, result in enumerate(response.results)
    ]


def _answered_batch_sizes(response: pb.StepSessionsResponse, form: str) -> list[int]:
    """The batch size of each answered session of a response (its refused ones left out)."""
    if form == "columns":
        refused = {error.index for error in response.columns.errors}
        return [size for row, size in enumerate(response.columns.batch_sizes) if row not in refused]
    return [result.response.batch_size for result in response.results if result.HasField("response")]


async def _create_sessions(stub: pb_grpc.LstmServeStub, count: int, result: LoadResult) -> list[str]:
    """Creates `count` sessions at once; a refused one is counted as an error and left out."""
    created = await asyncio.gather(
        *(stub.CreateSession(pb.CreateSessionRequest()) for _ in range(count)), return_exceptions=True
    )
    session_ids = []
    for outcome in created:
        if isinstance(outcome, grpc.aio.AioRpcError):
            result.errors += 1
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            session_ids.append(outcome.session_id)
    return session_ids


async def _close_sessions(stub: pb_grpc.LstmServeStub, session_ids: Sequence[str]) -> None:
    """Closes the sessions; one already gone is no error here (the steps' errors are counted)."""
    await asyncio.gather(
        *(stub.CloseSession(pb.SessionRef(session_id=id_)) for id_ in session_ids), return_exceptions=True
    )
