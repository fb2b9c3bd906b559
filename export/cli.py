"""`lstmserve export`: train a recurrent model and export it to ONNX, or export an already-trained module.

Only the standard library is imported here; torch comes in when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lstmserve.export import annotate_cli
from lstmserve.export.config import CELLS, PRESETS, TASKS, ExportConfig
from lstmserve.export.errors import ExportError, ParityError

EXIT_BAD_INPUT = 2
EXIT_PARITY = 1
MODULE_OUT = Path("models/module")
#: Options that apply with --module (the rest configure training).
MODULE_OPTIONS = frozenset({"module", "weights", "vocab", "head", "classes", "out", "batch_first", "preset", "progress"})


def add_parsers(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Registers the `export` subcommand."""
    d = ExportConfig.__dataclass_fields__
    parser = subparsers.add_parser(
        "export",
        help="train a recurrent model (or take an already-trained one) and export it to ONNX",
        description=(
            "Train a character language model (--task tokens), a forecaster of the next row of a signal or "
            "table (--task features) or a sequence classifier (--task classify), and export it to ONNX with its recurrent state (h0/c0 -> hn/cn, or h0 -> hn for GRU "
            "and RNN) as explicit inputs/outputs, verified against PyTorch on ONNX Runtime. "
            "Options left out take the preset's value. With --module, export an already-trained "
            "PyTorch module instead, without training."
        ),
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default="default",
        help="starting values: 'default' (about 2 minutes on 2 cores) or 'tiny' (seconds)")
    add("--task", choices=TASKS, help=f"what to train (default {d['task'].default})")
    add("--corpus", type=Path, help="UTF-8 text file to train on (default: Python standard-library sources)")
    data = parser.add_argument_group(
        "the user's data (--task features and classify)",
        "features: a .csv with a header row, or a .npy array, of rows in time order; the model forecasts the next "
        "row's --targets. classify: a .csv with one row per time step, a sequence id column and a label column "
        "(default: scikit-learn's bundled 8x8 digits, row by row). Columns are standardised inside the model.",
    )
    data.add_argument("--data", type=Path, help="the .csv or .npy file (default: a synthetic signal, or the digits)")
    data.add_argument("--columns", help="comma-separated feature columns (default: every numeric column; .npy: 0,1,...)")
    data.add_argument("--targets", help="features: comma-separated columns to forecast (default: --columns)")
    data.add_argument("--val-fraction", type=float, help=f"share held out for validation (default {d['val_fraction'].default})")
    data.add_argument("--label-column", help=f"classify: the label column (default {d['label_column'].default!r})")
    data.add_argument("--sequence-column", help=f"classify: the sequence id column (default {d['sequence_column'].default!r})")
    add("--out", type=Path, help=f"output directory, replaced at the end (default {d['out'].default})")
    lstm = parser.add_argument_group("recurrent layer (nn.LSTM, nn.GRU or nn.RNN)")
    lstm.add_argument("--cell", choices=CELLS, help=f"the recurrent layer (default {d['cell'].default}; "
                      "gru and rnn keep one state tensor, h)")
    lstm.add_argument("--input-size", type=int, help="embedding size, or feature width for --task features (default 64 / 28)")
    lstm.add_argument("--hidden-size", type=int, help=f"default {d['hidden_size'].default}")
    lstm.add_argument("--num-layers", type=int, help=f"default {d['num_layers'].default}")
    lstm.add_argument("--no-bias", dest="bias", action="store_false", help="no bias weights")
    lstm.add_argument("--batch-first", action=argparse.BooleanOptionalAction,
                      help="nn.LSTM batch_first (the ONNX interface is batch-major either way)")
    lstm.add_argument("--dropout", type=float, help="dropout between LSTM layers, in [0, 1) (default 0)")
    lstm.add_argument("--bidirectional", action=argparse.BooleanOptionalAction,
                      help="bidirectional LSTM (cannot be served step by step)")
    lstm.add_argument("--proj-size", type=int, help="LSTM projection size, below --hidden-size (default 0: none)")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, help=f"optimiser steps (default {d['steps'].default})")
    training.add_argument("--batch-size", type=int, help=f"default {d['batch_size'].default}")
    training.add_argument("--seq-len", type=int, help=f"default {d['seq_len'].default}")
    training.add_argument("--lr", type=float, help=f"Adam learning rate (default {d['lr'].default})")
    training.add_argument("--seed", type=int, help=f"default {d['seed'].default}")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    module = parser.add_argument_group(
        "an already-trained module (no training)",
        "A module whose forward is forward(x, state) -> (y, state) around one nn.LSTM, nn.GRU or nn.RNN; "
        "--batch-first/--no-batch-first override the layout the recurrent layer declares.",
    )
    module.add_argument("--module", metavar="TARGET",
                        help="package.module:factory or path/to/file.py:factory (a module, class or function)")
    module.add_argument("--weights", type=Path, help="state_dict saved with torch.save, loaded into the module")
    module.add_argument("--vocab", type=Path, help="token models: the vocabulary, a .json list or one piece a line")
    module.add_argument("--head", choices=("language_model", "regression", "classification"),
                        help="what the output means (default: language_model for tokens, regression for features)")
    module.add_argument("--classes", help="comma-separated class names: with --module, of a classification head "
                        "(default 0, 1, ...); with --task classify, the allowed labels in output order")
    parser.set_defaults(run=run)
    annotate_cli.add_parser(subparsers)


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    """The preset with every option given on the command line applied; raises ExportError."""
    fields = ExportConfig.__dataclass_fields__
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    return ExportConfig.preset(args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    """Runs `lstmserve export`; returns 0, 1 (parity failure) or 2 (bad input)."""
    try:
        result: Any
        if getattr(args, "module", None) is not None:
            result = _export_module(args)
        else:
            for name in ("weights", "vocab", "head"):
                if hasattr(args, name):
                    raise ExportError(f"--{name} only applies with --module")
            config = config_from_args(args)
            from lstmserve.export.pipeline import export_model

            result = export_model(config, progress=getattr(args, "progress", True))
    except ExportError as exc:
        print(f"lstmserve export: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ParityError as exc:
        print(f"lstmserve export: parity check failed: {exc}", file=sys.stderr)
        return EXIT_PARITY
    print(result.summary())
    return 0


def _export_module(args: argparse.Namespace) -> Any:
    """`lstmserve export --module ...`: loads the module and its weights, exports it (no training)."""
    given = {k for k in vars(args) if k in ExportConfig.__dataclass_fields__ or k in MODULE_OPTIONS}
    training = sorted(given - MODULE_OPTIONS)
    if training:
        raise ExportError(f"--{training[0].replace('_', '-')} configures training and does not apply with --module")
    from lstmserve.export.module_export import export_module, load_module

    module = load_module(args.module, getattr(args, "weights", None))
    classes = [c.strip() for c in args.classes.split(",")] if getattr(args, "classes", None) else ()
    return export_module(
        module,
        out_dir=getattr(args, "out", MODULE_OUT),
        vocabulary=getattr(args, "vocab", None),
        head=getattr(args, "head", None),
        classes=classes,
        batch_first=getattr(args, "batch_first", None),
    )
