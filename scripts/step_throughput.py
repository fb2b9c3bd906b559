"""A short stepping load against a running server: N concurrent sessions, single-token steps.

Prints the provider the server reports, steps per second, p50/p99 step latency and
the mean batch size. Used by scripts/gpu_check.sh; `lstmserve bench` is the full benchmark.

    python scripts/step_throughput.py --target 127.0.0.1:50051 --sessions 64 --steps 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc
import numpy as np

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


async def _session(stub: pb_grpc.LstmServeStub, steps: int, vocab: int, seed: int) -> tuple[list[float], list[int]]:
    rng = np.random.default_rng(seed)
    call = stub.Step()
    latencies, batch_sizes = [], []
    for token in rng.integers(0, vocab, size=steps):
        started = time.perf_counter()
        await call.write(pb.StepRequest(tokens=[int(token)], output=pb.OUTPUT_NONE))
        response = await call.read()
        latencies.append(time.perf_counter() - started)
        batch_sizes.append(response.batch_size)
    await call.done_writing()
    return latencies, batch_sizes


async def main(target: str, sessions: int, steps: int) -> None:
    async with grpc.aio.insecure_channel(target, options=[("grpc.so_reuseport", 0)]) as channel:
        stub = pb_grpc.LstmServeStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        vocab = max(1, len(info.vocabulary))
        started = time.perf_counter()
        results = await asyncio.gather(*(_session(stub, steps, vocab, seed) for seed in range(sessions)))
        elapsed = time.perf_counter() - started
    latencies = sorted(x for lat, _ in results for x in lat)
    batches = [b for _, sizes in results for b in sizes]
    print(f"provider={info.provider} sessions={sessions} steps/session={steps}")
    print(f"steps_per_s={len(latencies) / elapsed:.0f} p50_ms={1e3 * statistics.median(latencies):.3f} "
          f"p99_ms={1e3 * latencies[int(0.99 * (len(latencies) - 1))]:.3f} mean_batch={np.mean(batches):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.target, args.sessions, args.steps))
