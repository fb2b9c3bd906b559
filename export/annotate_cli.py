"""`lstmserve annotate`: write lstmserve metadata into an ONNX model made elsewhere, after checking it.

Only the standard library is imported here; onnx and ONNX Runtime come in when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lstmserve.export.errors import ExportError, ParityError

EXIT_BAD_INPUT = 2
EXIT_CHECK = 1


def _pair(text: str) -> tuple[str, str]:
    name_in, sep, name_out = text.partition(":")
    if not sep or not name_in or not name_out:
        raise argparse.ArgumentTypeError(f"expected INPUT:OUTPUT, got {text!r}")
    return name_in, name_out


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Registers the `annotate` subcommand."""
    parser = subparsers.add_parser(
        "annotate",
        help="make an ONNX model made elsewhere servable: describe its input, output and state",
        description=(
            "Copy an ONNX model into --out with lstmserve metadata: the data input, the output and the "
            "recurrent state pairs (each graph input carried forward by a graph output). Pairs not given with "
            "--state are found by name (h0 -> hn, state -> state_next, past_x -> present_x), then by shape; "
            "never by sort order. Before writing, ONNX Runtime checks that stepping the model one position at "
            "a time, carrying the state, gives what the whole sequence gives."
        ),
    )
    parser.add_argument("model", type=Path, help="the ONNX file")
    parser.add_argument("--out", type=Path, help="output directory (default models/<file stem>), replaced at the end")
    parser.add_argument("--input", help="the data input (default: the one input that is not a state)")
    parser.add_argument("--state", dest="states", action="append", type=_pair, default=[], metavar="IN:OUT",
                        help="a state input and the output that carries it forward (repeat for each state)")
    parser.add_argument("--output", help="the output (default: the one output that is not a state)")
    parser.add_argument("--vocab", type=Path, help="token models: the vocabulary, a .json list or one piece a line")
    parser.add_argument("--head", choices=("language_model", "regression", "classification"),
                        help="what the output means (default: language_model for tokens, regression for features)")
    parser.add_argument("--classes", help="classification: comma-separated class names (default 0, 1, ...)")
    parser.add_argument("--layout", choices=("batch-major", "time-major"),
                        help="the data input's layout (default: read off the axes, or the only one that runs)")
    parser.add_argument("--bidirectional", action="store_true",
                        help="the model reads whole sequences both ways: served by Infer only, no stepwise check")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference (default 1e-4)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs `lstmserve annotate`; returns 0, 1 (the check failed) or 2 (bad input)."""
    try:
        from lstmserve.export.annotate import annotate

        classes = [c.strip() for c in args.classes.split(",")] if args.classes else ()
        result = annotate(
            args.model,
            args.out,
            input=args.input,
            states=args.states,
            output=args.output,
            vocabulary=args.vocab,
            head=args.head,
            classes=classes,
            layout=args.layout,
            bidirectional=args.bidirectional,
            tolerance=args.tolerance,
        )
    except ExportError as exc:
        print(f"lstmserve annotate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ParityError as exc:
        print(f"lstmserve annotate: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK
    print(result.summary())
    return 0
