"""The demo's client side: stream a generation from a running server and summarise latency and throughput.

    python scripts/demo_stream.py --target 127.0.0.1:50051 --prompt "def " --max-tokens 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from lstmserve.client import Client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="single-token steps for the latency figure")
    args = parser.parse_args()
    with Client(args.target) as client:
        info = client.model_info()
        print(f"model: {info.kind}, vocabulary {len(info.vocabulary)}, {info.num_layers} x {info.hidden_size} "
              f"LSTM, on {info.provider}\n")  # fmt: skip
        with client.session() as session:
            started = time.perf_counter()
            first_token_s = None
            count = 0
            sys.stdout.write(args.prompt)
            for token in session.generate(
                args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
            ):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - started
                sys.stdout.write(token.text)
                sys.stdout.flush()
                count += 1
            elapsed = time.perf_counter() - started
        with client.session() as session:
            latencies = []
            token_ids = info.vocabulary.encode(args.prompt) if len(args.prompt) else [0]
            for index in range(args.steps):
                step_started = time.perf_counter()
                session.step(token_ids[index % len(token_ids)], output="topk", k=5)
                latencies.append(time.perf_counter() - step_started)
    print("\n")
    print(f"generation: {count} tokens in {elapsed:.3f} s = {count / elapsed:.0f} tokens/s "
          f"(first token after {1e3 * (first_token_s or 0):.1f} ms)")  # fmt: skip
    latencies.sort()
    print(f"client steps (1 token, top-5 back, {args.steps} round trips): p50 {1e3 * statistics.median(latencies):.3f} ms, "
          f"p99 {1e3 * latencies[int(0.99 * (len(latencies) - 1))]:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
