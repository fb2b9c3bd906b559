"""Servers under test, each started as a subprocess on a free port and stopped with SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import psutil

_SERVING = re.compile(r"serving on (\S+):(\d+)")


class ServerProcess:
    """A server started from a command line that prints `... serving on HOST:PORT` when ready."""

    def __init__(self, command: Sequence[str], *, ready_timeout_s: float = 120.0) -> None:
        self.process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = _SERVING.search(line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"server did not start ({' '.join(command)}): {line!r}")
        self.target = f"127.0.0.1:{match.group(2)}"
        self._ps = psutil.Process(self.process.pid)

    @property
    def pids(self) -> tuple[int, ...]:
        """The server's process id (the load generator reads its CPU over the measured window)."""
        return (self.process.pid,)

    def rss_bytes(self) -> int:
        """The server's resident memory now. (Its CPU is read by the load generator, over the measured window:
        `loadgen.cpu_in_window`.)"""
        return int(self._ps.memory_info().rss)

    def stop(self) -> None:
        """SIGTERM, then wait (kill after 15 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def lstmserve_command(
    model: Path, *, max_batch_size: int, max_sessions: int, intra_op_threads: int, batches_in_flight: int = 1
) -> list[str]:
    """The `lstmserve serve` command line the benchmark runs."""
    return [
        sys.executable, "-m", "lstmserve.cli", "serve", "--model", str(model), "--port", "0",
        "--max-batch-size", str(max_batch_size), "--max-sessions", str(max_sessions),
        "--intra-op-threads", str(intra_op_threads), "--batches-in-flight", str(batches_in_flight),
        "--log-level", "WARNING",
    ]  # fmt: skip


def echo_command(output_size: int) -> list[str]:
    """The transport-ceiling echo server's command line."""
    return [sys.executable, "-m", "lstmserve.bench.echo", "--port", "0", "--output-size", str(output_size)]
