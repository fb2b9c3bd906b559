"""How much memory `Step` streams refused for a bad request keep in the server until Python's collector runs.

Usage: .venv/bin/python scripts/refused_stream_memory.py [--model M] [--streams N] [--tokens T] [--good]
    [--threshold K | --collector-off]

Starts the server for M (default models/default/model.onnx) in this process, on uvloop, with what the imports made
frozen and the youngest generation's threshold at K (default: `lstmserve serve`'s, GC_YOUNG_THRESHOLD), as
`lstmserve serve` runs. A client process then opens N streams (default 8,000) on one session, each sending one
request of T tokens (default 4,001) whose last token id is -5, so that the server refuses it with
INVALID_ARGUMENT (with --good, T valid tokens and no logits asked back). It prints this process's RSS every 1,000
streams.

With --collector-off the collector does not run at all. After the streams it collects once and prints what it
freed (the kinds of object, and the RSS), then runs N more streams, still without collecting: if they add
little, the first N streams' memory was held by what the collection freed, and was reused.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import psutil

from lstmserve.server.app import LstmServer
from lstmserve.server.cli import GC_YOUNG_THRESHOLD
from lstmserve.server.config import ServerConfig
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

REPORT_EVERY = 1000


def run_client(port: int, streams: int, tokens: int, good: bool) -> None:
    """In the client process: `streams` one-request `Step` streams on one session; a line per REPORT_EVERY."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)])
    stub = pb_grpc.LstmServeStub(channel)
    session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
    request = pb.StepRequest(
        session_id=session_id, tokens=[1] * (tokens if good else tokens - 1) + ([] if good else [-5])
    )
    request.output = pb.OUTPUT_NONE
    refused = 0
    for stream in range(1, streams + 1):
        try:
            list(stub.Step(iter([request])))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            refused += 1
        if stream % REPORT_EVERY == 0:
            print(stream, refused, flush=True)


def drive(port: int, streams: int, tokens: int, good: bool, rss_before: int) -> None:
    """Runs the client process and prints this process's RSS as it reports."""
    me = psutil.Process()
    command = [sys.executable, __file__, "--client", str(port), "--streams", str(streams), "--tokens", str(tokens)]
    with subprocess.Popen(command + (["--good"] if good else []), stdout=subprocess.PIPE, text=True) as client:
        assert client.stdout is not None
        for line in client.stdout:
            done, refused = line.split()
            rss = me.memory_info().rss
            print(
                f"{done:>6} streams ({refused} refused): RSS {rss / 2**20:.1f} MB ({(rss - rss_before) / 2**20:+.1f})"
            )
    if client.returncode:
        raise SystemExit(f"the client failed with exit status {client.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default/model.onnx"))
    parser.add_argument("--streams", type=int, default=8000)
    parser.add_argument("--tokens", type=int, default=4001)
    parser.add_argument("--good", action="store_true", help="valid requests instead of refused ones")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=int, default=GC_YOUNG_THRESHOLD, help="the youngest generation's threshold")
    how.add_argument("--collector-off", action="store_true", help="no collection until the streams are done")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the client process's own mode: the port
    options = parser.parse_args()
    if options.client is not None:
        run_client(options.client, options.streams, options.tokens, options.good)
        return
    import uvloop

    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, name="server", daemon=True).start()
    server = LstmServer(ServerConfig(model=options.model, port=0, intra_op_threads=1))
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    gc.collect()
    gc.freeze()  # as `lstmserve serve`: what the imports and the start made is kept out of every collection
    if options.collector_off:
        gc.disable()
    else:
        gc.set_threshold(options.threshold, *gc.get_threshold()[1:])
    rss_before = psutil.Process().memory_info().rss
    print(f"server on port {port}; collector {'off' if options.collector_off else f'threshold {gc.get_threshold()}'}")
    print(f"RSS before: {rss_before / 2**20:.1f} MB")
    drive(port, options.streams, options.tokens, options.good, rss_before)
    if options.collector_off:
        gc.set_debug(gc.DEBUG_SAVEALL)
        freed = gc.collect()
        kinds = Counter(type(thing).__qualname__ for thing in gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
        rss = psutil.Process().memory_info().rss
        print(f"one collection freed {freed} objects: {dict(kinds.most_common(8))}; RSS {rss / 2**20:.1f} MB")
        print(f"{options.streams} more streams, still without collecting:")
        drive(port, options.streams, options.tokens, options.good, rss)
    asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(30)


if __name__ == "__main__":
    main()
