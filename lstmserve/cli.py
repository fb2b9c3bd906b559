"""The `lstmserve` command line: one entry point, one subcommand per job.

Each part registers its own subcommands (`add_parsers`) and keeps heavy imports
(torch, onnxruntime) inside the function that runs the command, so that
`lstmserve --help` is fast and works with any subset of the extras installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lstmserve import __version__
from lstmserve.bench import cli as bench_cli
from lstmserve.client import cli as client_cli
from lstmserve.export import cli as export_cli
from lstmserve.server import cli as server_cli


EXIT_STATUSES = """exit statuses (every command):
  0    success
  1    a failure at run time: the server could not be reached or refused a call,
       training or the export check failed, serve lost sessions at its drain or
       its batching loop died
  2    a usage or configuration error: a bad option or value, a missing or
       unreadable file, a model that cannot be served, a port already in use
  130  interrupted (Ctrl-C)
"""


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="lstmserve",
        description="Serve LSTM models step by step: export a model, serve it over gRPC, stream from it.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lstmserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    export_cli.add_parsers(subparsers)
    server_cli.add_parsers(subparsers)
    client_cli.add_parsers(subparsers)
    bench_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # how the command was called, for reports
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
