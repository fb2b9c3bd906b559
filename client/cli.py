"""Client subcommands: `lstmserve generate`, `lstmserve stream` and `lstmserve info`.

The client library (and gRPC) is imported only when a command runs, so that
`lstmserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lstmserve import cli_values

if TYPE_CHECKING:
    from lstmserve.client import Client

TARGET_ENV = "LSTMSERVE_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"


class _CommandError(Exception):
    """A failure to report as one line on stderr (exit status 1)."""


class _UsageError(_CommandError):
    """A bad option value, found before anything was sent (exit status 2)."""


API_KEY_ENV = "LSTMSERVE_API_KEY"


def _add_target(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    parser.add_argument(
        "--target",
        type=cli_values.target,
        default=default,
        metavar="HOST:PORT",
        help=f"the server's address (env {TARGET_ENV}; default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=cli_values.seconds, default=None, metavar="S", help="seconds each call may take (default: no limit)"
    )
    parser.add_argument(
        "--tls-ca-file",
        default=os.environ.get("LSTMSERVE_TLS_CA_FILE") or None,
        metavar="PEM",
        help="connect with TLS, verifying the server against this CA (env LSTMSERVE_TLS_CA_FILE)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        metavar="KEY",
        help=f"API key sent as 'authorization: Bearer KEY' (env {API_KEY_ENV}; default: none)",
    )


def add_parsers(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Registers `generate`, `stream` and `info`."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt on a running server",
        description="Feed PROMPT to a new session and print the generated text as it streams.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="text to start from (encoded with the model's vocabulary)")
    _add_target(p)
    p.add_argument(
        "--max-tokens", type=int, default=200, metavar="N", help="most tokens to generate (default: 200)"
    )
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K best tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible sampling")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop when the text reaches any of these")
    p.set_defaults(run=run_generate)

    p = subparsers.add_parser(
        "stream",
        help="feed lines from stdin to one session and show the next-character predictions",
        description="Read lines from stdin and feed each (with its newline) to one session; after each line, "
        "print the model's top predictions for what comes next. The state carries across lines.",
    )
    _add_target(p)
    p.add_argument("--top", type=int, default=5, metavar="N", help="how many predictions to show (default: 5)")
    p.set_defaults(run=run_stream)

    p = subparsers.add_parser(
        "info", help="show what a running server serves", description="Print the served model's description."
    )
    _add_target(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_info)


def run_generate(args: argparse.Namespace) -> int:
    """`lstmserve generate`: prints the prompt, then each generated piece as it arrives."""

    def body(client: Client) -> int:
        info = client.model_info()  # check what the server would refuse before printing anything
        if not 1 <= args.max_tokens <= info.max_generate_tokens:
            raise _UsageError(f"--max-tokens must be in [1, {info.max_generate_tokens}] for this server, got {args.max_tokens}")
        if not 0 <= args.top_k <= info.output_size:
            raise _UsageError(f"--top-k must be in [0, {info.output_size}] for this server, got {args.top_k}")
        if info.kind != "tokens" or not len(info.vocabulary):
            raise _UsageError(f"the server's model takes {info.kind}, not text")
        try:
            info.vocabulary.encode(args.prompt)
        except ValueError as error:  # names the character outside the vocabulary
            raise _UsageError(f"the prompt cannot be encoded: {error}") from None
        with client.session() as session:
            generation = session.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
            )
            _write(sys.stdout, args.prompt)
            for item in generation:
                _write(sys.stdout, item.text)
            _write(sys.stdout, "\n")
        return 0

    return _run("generate", args, body)


def run_stream(args: argparse.Namespace) -> int:
    """`lstmserve stream`: one session, one line of stdin at a time, top-N next characters after each."""
    if args.top < 1:
        return _fail("stream", f"--top must be at least 1, got {args.top}", status=2)

    def body(client: Client) -> int:
        info = client.model_info()
        if info.kind != "tokens" or not len(info.vocabulary):
            raise _UsageError(f"the server's model takes {info.kind}, not text")
        top = min(args.top, info.output_size)
        status = 0
        with client.session() as session:
            for line in sys.stdin:
                try:
                    ids = info.vocabulary.encode(line)
                except ValueError as error:
                    print(f"lstmserve stream: skipped a line: {error}", file=sys.stderr, flush=True)
                    status = 1
                    continue
                if not ids:
                    continue
                chunk = info.max_tokens_per_request
                last_start = (len(ids) - 1) // chunk * chunk
                for start in range(0, last_start, chunk):  # a long line: feed all but its last chunk silently
                    session.step(ids[start : start + chunk], output="none")
                result = session.step(ids[last_start:], output="topk", k=top)
                assert result.topk_ids is not None and result.topk_logprobs is not None
                predictions = "  ".join(
                    f"{info.vocabulary[int(token)]!r} {math.exp(float(logprob)):.3f}"
                    for token, logprob in zip(result.topk_ids[-1], result.topk_logprobs[-1], strict=True)
                )
                _write(sys.stdout, f"[step {result.step}] next: {predictions}\n")
        return status

    return _run("stream", args, body)


def run_info(args: argparse.Namespace) -> int:
    """`lstmserve info`: the model's description, as text or JSON."""

    def body(client: Client) -> int:
        info = client.model_info()
        fields = asdict(info)
        fields["vocabulary"] = list(info.vocabulary.pieces)
        if args.json:
            _write(sys.stdout, json.dumps(fields, indent=2) + "\n")
            return 0
        fields["vocabulary"] = _preview(info.vocabulary.pieces)
        width = max(len(name) for name in fields)
        for name, value in fields.items():
            _write(sys.stdout, f"{name:<{width}}  {value}\n")
        return 0

    return _run("info", args, body)


# ---- helpers -------------------------------------------------------------
def _write(out: IO[str], text: str) -> None:
    out.write(text)
    out.flush()


def _preview(pieces: tuple[str, ...], limit: int = 40) -> str:
    if not pieces:
        return "(none)"
    shown = " ".join(repr(p) for p in pieces[:limit])
    return f"{len(pieces)} pieces: {shown}" + (" ..." if len(pieces) > limit else "")


def _fail(command: str, message: str, status: int = 1) -> int:
    print(f"lstmserve {command}: error: {message}", file=sys.stderr, flush=True)
    return status


def _run(command: str, args: argparse.Namespace, body: Callable[[Client], int]) -> int:
    """Runs `body` with a client for `args.target`; any failure becomes one line on stderr and exit code 1."""
    import grpc

    from lstmserve.client import Client, LstmServeError

    try:
        metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
        credentials = None
        if args.tls_ca_file:
            try:
                ca = Path(args.tls_ca_file).read_bytes()
            except OSError as error:
                return _fail(command, f"cannot read --tls-ca-file: {error}", status=2)
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        with Client(args.target, timeout=args.timeout, metadata=metadata, credentials=credentials) as client:
            return body(client)
    except LstmServeError as error:
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return _fail(command, f"cannot reach the server at {args.target} ({error.code.name}: {error.details})")
        return _fail(command, f"{error.code.name}: {error.details}")
    except (_UsageError, ValueError) as error:  # the client library raises ValueError for a bad argument
        return _fail(command, str(error), status=2)
    except _CommandError as error:
        return _fail(command, str(error))
    except BrokenPipeError:  # the reader went away (e.g. `| head`)
        return 0
