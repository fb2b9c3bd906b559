"""One benchmark run: a concurrency sweep over every series, side by side, on this machine."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from lstmserve.bench.ceilings import onnxruntime_steps_per_s, torch_steps_per_s
from lstmserve.bench.engine import EngineLoad, EngineResult, measure_engine
from lstmserve.bench.loadgen import LoadResult, LoadSpec, run_load_in_processes
from lstmserve.bench.report import Row, middle_index
from lstmserve.bench.sessions import SessionsSpec, run_sessions_in_process
from lstmserve.bench.servers import ServerProcess, echo_command, lstmserve_command
from lstmserve.bench.targets import (
    SERIES_ECHO,
    SERIES_ENGINE,
    SERIES_ORT,
    SERIES_ORT_FORMED,
    SERIES_SERVER,
    SERIES_SESSIONS,
    SERIES_TORCH,
    SERIES_UNBATCHED,
    series_proxied,
)

DEFAULT_SERIES = ("server", "unbatched", "echo", "engine", "onnxruntime", "torch")
# `sessions` (one caller stepping N sessions per StepSessions request) runs only when asked for.
ALL_SERIES = (*DEFAULT_SERIES, "sessions")
# Series whose ratio is to ONNX Runtime at the same batch size, which they bring along.
CEILING_RATIO_SERIES = ("engine", "sessions")


def with_required_series(series: Sequence[str]) -> tuple[str, ...]:
    """`series` with those their ratios need: the engine's and the sessions series' ratios are to ONNX
    Runtime at the same batch size."""
    if any(name in series for name in CEILING_RATIO_SERIES) and "onnxruntime" not in series:
        return (*series, "onnxruntime")
    return tuple(series)


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one `lstmserve bench` run (see its --help)."""

    model: Path
    levels: tuple[int, ...] = (1, 4, 16, 64, 256)
    mode: str = "step"
    output: str = "logits"
    duration_s: float = 3.0
    warmup_s: float = 1.0
    prompt_len: int = 16
    generate_tokens: int = 32
    load_processes: int = 1
    intra_op_threads: int = 1
    series: tuple[str, ...] = DEFAULT_SERIES
    target: str | None = None
    replicas: tuple[int, ...] = ()  # also measure this many replicas behind Envoy (each count a series)
    repeats: int = 1  # rounds of the whole run, one after another
    calls_in_flight: int = 2  # the sessions series: StepSessions requests in flight, each for its group of sessions
    sessions_form: str = "columns"  # the sessions series: SessionColumns ("columns") or a SessionStep each ("steps")
    batches_in_flight: int = 1  # the server's and the engine's --batches-in-flight


def usable_cores() -> int | None:
    """The cores this process may run on (its CPU affinity where the platform has one, else the machine's count). A
    container's CPU quota is not seen here; on such a machine the share of the cores in use reads low."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def machine_description() -> dict[str, object]:
    """What the numbers were measured on."""
    import onnxruntime

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }


def _row(series: str, level: int, load: LoadResult, usage: tuple[float, float, int | None] | None) -> Row:
    """A row from what the load measured, with (CPU seconds, wall seconds, RSS bytes or None) of the server."""
    latencies = np.sort(np.asarray(load.latencies_s)) * 1e3
    quantile = (lambda q: float(np.quantile(latencies, q))) if latencies.size else (lambda q: None)
    cpu_pct = rss_mb = None
    if usage is not None:
        cpu_s, wall_s, rss = usage
        cpu_pct, rss_mb = 100.0 * cpu_s / wall_s, None if rss is None else rss / 2**20
    return Row(
        series=series,
        level=level,
        steps_per_s=load.count / load.elapsed_s if load.elapsed_s else 0.0,
        p50_ms=quantile(0.5),
        p95_ms=quantile(0.95),
        p99_ms=quantile(0.99),
        mean_batch=statistics.fmean(load.batch_sizes) if load.batch_sizes else None,
        server_cpu_pct=cpu_pct,
        server_rss_mb=rss_mb,
        errors=load.errors,
        load_cpu_pct=100.0 * load.cpu_s / load.cpu_wall_s if load.cpu_wall_s else None,
    )


class _Measured(Protocol):
    @property
    def pids(self) -> tuple[int, ...]: ...

    def rss_bytes(self) -> int: ...


def _measure_load(
    series: str, server: _Measured | None, target: str, level: int, config: BenchConfig, vocab: int
) -> Row:
    """One series at one concurrency level: the load generator's figures, and the server's CPU (read by the load
    generator over the measured window, as its own) and RSS (after it)."""
    load = _run_load(series, target, level, config, vocab, server.pids if server else ())
    usage = None
    if server is not None and load.server_cpu_s is not None and load.cpu_wall_s:
        usage = (load.server_cpu_s, load.cpu_wall_s, server.rss_bytes())
    return _row(series, level, load, usage)


def _run_load(
    series: str, target: str, level: int, config: BenchConfig, vocab: int, server_pids: tuple[int, ...] = ()
) -> LoadResult:
    """The load of one series at one level, from load processes: for the sessions series one caller (one
    channel) stepping (or generating for) `level` sessions through StepSessions, else `level` streams."""
    if series == SERIES_SESSIONS:
        sessions = SessionsSpec(
            target=target, sessions=level, calls_in_flight=config.calls_in_flight, warmup_s=config.warmup_s,
            duration_s=config.duration_s, output=config.output, vocab=vocab, form=config.sessions_form,
            mode=config.mode, server_pids=server_pids,
        )  # fmt: skip
        return run_sessions_in_process(sessions)
    spec = LoadSpec(
        target=target, sessions=level, mode=config.mode, warmup_s=config.warmup_s, duration_s=config.duration_s,
        output=config.output, prompt_len=config.prompt_len, generate_tokens=config.generate_tokens, vocab=vocab,
        server_pids=server_pids,
    )  # fmt: skip
    return run_load_in_processes(spec, config.load_processes)


def run_bench(config: BenchConfig, tick: Callable[[str], None] = lambda _: None) -> list[list[Row]]:
    """Runs `config.repeats` rounds one after another; returns each round's rows.

    Each round measures every series afresh (new server processes), so that a slow spell of the
    machine, which on a shared VM can last tens of seconds, lands on some rounds of every series
    rather than on every round of one.
    """
    rounds = []
    for index in range(config.repeats):
        prefix = f"round {index + 1}/{config.repeats}: " if config.repeats > 1 else ""
        rounds.append(run_round(config, tick, label_prefix=prefix))
    return rounds


def median_rows(rounds: Sequence[Sequence[Row]]) -> list[Row]:
    """For each series and level, the row of the round with the median throughput (the lower of the two
    middle ones for an even count), with the lowest and highest throughput of all rounds.

    A whole row of one round, not per-column medians, so that its latencies, batch size and CPU
    belong together."""
    by_point: dict[tuple[str, int], list[Row]] = {}
    for rows in rounds:
        for row in rows:
            by_point.setdefault((row.series, row.level), []).append(row)
    combined = []
    for rows in by_point.values():
        ranked = sorted(rows, key=lambda row: row.steps_per_s)
        middle = ranked[middle_index(len(ranked))]
        combined.append(
            replace(middle, rounds=len(rows), steps_per_s_min=ranked[0].steps_per_s, steps_per_s_max=ranked[-1].steps_per_s)
        )
    return combined


def run_round(config: BenchConfig, tick: Callable[[str], None] = lambda _: None, label_prefix: str = "") -> list[Row]:
    """Measures every requested series once at each concurrency level; returns the rows, series by series.

    The servers of every series run for the whole round (idle while another is measured), and the
    levels are the outer loop: at each level the series are measured one right after another, so
    that the ratios the targets take (lstmserve against echo, against the unbatched server, against
    the compute ceiling at the batch it formed) pair measurements seconds apart, not minutes apart:
    a shared VM's speed drifts over minutes. `tick` gets a label per measured point (after
    `label_prefix`), for a progress display."""
    from lstmserve.server.runner import Runner, RunnerOptions

    spec = Runner(config.model, RunnerOptions(providers=("cpu",))).spec
    vocab = max(1, len(spec.vocabulary))
    positions = config.prompt_len if config.mode == "prompt" else 1
    max_sessions = max(config.levels) * 2 + 16
    in_process = [
        (label, measure)
        for name, label, measure in (
            ("onnxruntime", SERIES_ORT, onnxruntime_steps_per_s),
            ("torch", SERIES_TORCH, torch_steps_per_s),
        )
        if name in config.series
    ]
    by_series: dict[str, list[Row]] = {}
    with ExitStack() as stack:

        def start_lstmserve(max_batch_size: int, batches_in_flight: int) -> ServerProcess:
            command = lstmserve_command(
                config.model, max_batch_size=max_batch_size, max_sessions=max_sessions,
                intra_op_threads=config.intra_op_threads, batches_in_flight=batches_in_flight,
            )  # fmt: skip
            return stack.enter_context(ServerProcess(command))

        served: list[tuple[str, _Measured | None, str]] = []  # (series, process to measure, address)
        if "server" in config.series:
            if config.target:
                served.append((SERIES_SERVER, None, config.target))
            else:
                server = start_lstmserve(256, config.batches_in_flight)
                served.append((SERIES_SERVER, server, server.target))
            by_series[SERIES_SERVER] = []
            if config.mode == "generate":
                by_series[SERIES_ORT_FORMED] = []  # measured right after the server, at the batch it formed
        if "sessions" in config.series:  # a server of its own (or the target), stepped through StepSessions
            if config.target:
                served.append((SERIES_SESSIONS, None, config.target))
            else:
                server = start_lstmserve(256, config.batches_in_flight)
                served.append((SERIES_SESSIONS, server, server.target))
        if "unbatched" in config.series and not config.target:
            server = start_lstmserve(1, 1)  # the baseline: no batching, one step at a time
            served.append((SERIES_UNBATCHED, server, server.target))
        for count in config.replicas:
            from lstmserve.bench.proxy import ProxiedReplicas

            proxied = stack.enter_context(
                ProxiedReplicas(config.model, count, max_sessions=max_sessions, intra_op_threads=config.intra_op_threads)
            )
            served.append((series_proxied(count), proxied, proxied.target))
        if "echo" in config.series:
            server = stack.enter_context(ServerProcess(echo_command(spec.output_size)))
            served.append((SERIES_ECHO, server, server.target))
        for level in config.levels:
            for series, process, address in served:
                tick(f"{label_prefix}{series} @ {level}")
                row = _measure_load(series, process, address, level, config, vocab)
                by_series.setdefault(series, []).append(row)
                if series == SERIES_SERVER and config.mode == "generate" and row.mean_batch:
                    by_series[SERIES_ORT_FORMED].append(_formed_batch_ceiling(row, config))
            if "engine" in config.series:
                tick(f"{label_prefix}{SERIES_ENGINE} @ {level}")
                by_series.setdefault(SERIES_ENGINE, []).append(_engine_row(level, config))
            for label, measure in in_process:
                tick(f"{label_prefix}{label} @ batch {level}")
                measured = measure(
                    config.model,
                    level,
                    positions=positions,
                    duration_s=min(config.duration_s, 2.0),
                    intra_op_threads=config.intra_op_threads,  # the same threads for both, as for the server
                )
                by_series.setdefault(label, []).append(_in_process_row(label, level, level, measured))
    return [row for rows in by_series.values() for row in rows]


def _engine_row(level: int, config: BenchConfig) -> Row:
    """The batching engine in this process at one level: `level` sessions, batches of up to `level` (as the
    compute ceiling's batch), the process's CPU over the run as the server's CPU."""
    load = EngineLoad(
        sessions=level, mode=config.mode, warmup_s=config.warmup_s, duration_s=config.duration_s,
        prompt_len=config.prompt_len, generate_tokens=config.generate_tokens,
    )  # fmt: skip
    measured: EngineResult = measure_engine(
        config.model, load, intra_op_threads=config.intra_op_threads, batches_in_flight=config.batches_in_flight
    )
    # The RSS of this process holds the whole benchmark, not the engine alone: not reported.
    return _row(SERIES_ENGINE, level, measured.load, (measured.cpu_s, measured.wall_s, None))


def _formed_batch_ceiling(row: Row, config: BenchConfig) -> Row:
    """The compute ceiling at the mean batch size the scheduler formed in a server row (generation target)."""
    batch = max(1, round(row.mean_batch or 1))
    measured = onnxruntime_steps_per_s(
        config.model, batch, duration_s=min(config.duration_s, 2.0), intra_op_threads=config.intra_op_threads
    )
    return _in_process_row(SERIES_ORT_FORMED, row.level, batch, measured)


def _in_process_row(series: str, level: int, batch: int, measured: tuple[float, float]) -> Row:
    """A row of an in-process series: (steps per second, seconds per call) of batches of `batch` rows.

    Steps count requests (rows of however many positions), as the load generator counts them."""
    steps_per_s, per_call = measured
    return Row(series=series, level=level, steps_per_s=steps_per_s, p50_ms=per_call * 1e3, mean_batch=float(batch))
