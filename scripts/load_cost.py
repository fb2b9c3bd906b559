"""What 256 coalescing generation streams cost the load generator and the server, per token, against lstmserve and
against the echo server (which sends the same pattern of messages with no model).

Usage: .venv/bin/python scripts/load_cost.py lstmserve|echo [MODEL]   (default models/default/model.onnx)
Starts the server as `lstmserve bench` does (two batches in flight, one ONNX Runtime thread), runs the bench's load
generator in this process for a 1 s warm-up and a 4 s window, and prints tokens/s, the responses that carried tokens,
tokens per response, and the CPU microseconds per token of the load generator and of the server over the window.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from lstmserve.bench.loadgen import LoadSpec, run_load
from lstmserve.bench.servers import ServerProcess, echo_command, lstmserve_command
from lstmserve.server.runner import Runner, RunnerOptions

SESSIONS, WARMUP_S, DURATION_S = 256, 1.0, 4.0


def main(which: str, model: Path) -> None:
    spec = Runner(model, RunnerOptions(intra_op_threads=1)).spec
    if which == "lstmserve":
        command = lstmserve_command(model, max_batch_size=256, max_sessions=1000, intra_op_threads=1, batches_in_flight=2)
    else:
        command = echo_command(spec.output_size)
    with ServerProcess(command) as server:
        load = LoadSpec(
            target=server.target, sessions=SESSIONS, mode="generate", warmup_s=WARMUP_S, duration_s=DURATION_S,
            vocab=len(spec.vocabulary), server_pids=server.pids,
        )  # fmt: skip
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        result = asyncio.run(run_load(load))
    responses = len(result.latencies_s)
    server_us = (result.server_cpu_s or 0.0) / result.count * 1e6
    print(
        f"{which}: {result.count / DURATION_S:,.0f} tokens/s, {responses} responses with tokens, "
        f"{result.count / responses:.2f} tokens per response, load generator {result.cpu_s / result.count * 1e6:.1f} us "
        f"and server {server_us:.1f} us of CPU per token"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("lstmserve", "echo"):
        sys.exit("usage: load_cost.py lstmserve|echo [MODEL]")
    main(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else Path("models/default/model.onnx"))
