"""`export_module`: export an already-trained PyTorch module to ONNX for lstmserve, without training.

The module follows PyTorch's recurrent convention, `forward(x, state) -> (y, state)`, around
one `nn.LSTM` (state `(h, c)`), `nn.GRU` or `nn.RNN` (state `h`), with any embedding or head
around it. `x` and `y` are batch-first or time-first as the recurrent layer's `batch_first`
says (or as `batch_first=` overrides); the ONNX model is batch-major either way, like every
lstmserve export, and passes the same parity check (whole sequence and step by step against
the module, at most `tolerance` apart) before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lstmserve.export.errors import ExportError
from lstmserve.export.model import fingerprint
from lstmserve.export.onnx_export import (
    OUTPUT_NAME,
    check_weights_are_initializers,
    exporter_versions,
    input_name,
    set_metadata,
    state_specs,
    torchscript_export,
    write_onnx,
)
from lstmserve.export.parity import check_parity
from lstmserve.export.pipeline import REPORT_NAME, staging_dir
from lstmserve.export.report import versions, write_report
from lstmserve.export.vocabulary import read_vocabulary
from lstmserve.metadata import HeadKind, ModelKind, ModelSpec

ONNX_NAME = "model.onnx"
CELL_OF: dict[type[nn.Module], str] = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}
HEADS: tuple[str, ...] = ("language_model", "regression", "classification")
CONVENTION = "forward(x, state) -> (y, state)"
EXAMPLE_BATCH, EXAMPLE_TIME = 2, 3


@dataclass(frozen=True)
class ModuleExportResult:
    """What `export_module` wrote.

    Args:
        onnx_path, report_path: the files written.
        spec: the ModelSpec stored in the ONNX metadata.
        parity: max absolute ONNX-vs-PyTorch differences by check.
        seconds: wall time of the export.
    """

    onnx_path: Path
    report_path: Path
    spec: ModelSpec
    parity: dict[str, float]
    seconds: float

    def summary(self) -> str:
        """A few lines for the terminal."""
        spec = self.spec
        states = " and ".join(f"{s.input_name} -> {s.output_name} [{spec.state_rows}, batch, {s.width}]" for s in spec.states)
        return "\n".join([
            f"{spec.cell.upper()} module exported: {spec.kind} in, {spec.head} out ({spec.output_size} wide)",
            f"  state           {states}",
            f"  parity          max |ONNX - PyTorch| = {max(self.parity.values()):.3g} over {len(self.parity)} checks"
            + ("" if spec.steppable else " (bidirectional: whole sequence only, serve with Infer)"),
            f"  fingerprint     {spec.fingerprint[:16]}",
            f"  took            {self.seconds:.1f} s",
            f"  wrote           {self.onnx_path}",
            f"  wrote           {self.report_path}",
        ])


class BatchMajor(nn.Module):
    """Wraps a `forward(x, state) -> (y, state)` module as `(inputs, *state) -> (y, *state)`, batch-major.

    Args:
        module: the user's module.
        cell: "lstm" (state is the pair (h, c)) or "gru"/"rnn" (state is h).
        batch_first: whether the module's x and y are [batch, time, ...] (else [time, batch, ...]).
    """

    def __init__(self, module: nn.Module, cell: str, batch_first: bool) -> None:
        super().__init__()
        self.module = module
        self.cell = cell
        self.batch_first = batch_first

    def forward(self, inputs: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """inputs [B, T, ...]; state h0 (and c0) [rows, B, width] -> (y [B, T, out], hn[, cn])."""
        x = inputs if self.batch_first else inputs.transpose(0, 1)
        carried: Any = (state[0], state[1]) if self.cell == "lstm" else state[0]
        y, final = self.module(x, carried)
        finals = (final[0], final[1]) if self.cell == "lstm" else (final,)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return (y, *finals)


def recurrent_layer(module: nn.Module) -> tuple[str, nn.RNNBase]:
    """The module's one nn.LSTM, nn.GRU or nn.RNN and its cell name; ExportError for none or several."""
    found = [(name, layer) for name, layer in module.named_modules() if type(layer) in CELL_OF]
    if not found:
        raise ExportError(
            f"{type(module).__name__} has no nn.LSTM, nn.GRU or nn.RNN inside; export_module needs exactly one"
        )
    if len(found) > 1:
        names = ", ".join(name or "(the module itself)" for name, _ in found)
        raise ExportError(f"{type(module).__name__} has {len(found)} recurrent layers ({names}); export_module needs exactly one")
    layer = cast(nn.RNNBase, found[0][1])
    return CELL_OF[type(layer)], layer


def export_module(
    module: nn.Module,
    example_input: torch.Tensor | None = None,
    out_dir: str | Path = Path("models/module"),
    *,
    vocabulary: Sequence[str] | str | Path | None = None,
    head: HeadKind | None = None,
    classes: Sequence[str] = (),
    batch_first: bool | None = None,
    tolerance: float = 1e-4,
) -> ModuleExportResult:
    """Exports an already-trained recurrent module to `out_dir`/model.onnx (with report.json), verified.

    Args:
        module: an nn.Module whose forward is `forward(x, state) -> (y, state)` around one nn.LSTM
            (state `(h, c)`), nn.GRU or nn.RNN (state `h`); y is [batch, time, out] or [time, batch, out].
        example_input: a batch of x as the module takes it: int64 tokens or float features. None: an
            nn.Embedding inside makes it a token model, else a feature model of the layer's input_size.
        out_dir: output directory, replaced only when everything succeeded.
        vocabulary: token models: the text of each token id, as a list or a file (.json list, or
            one piece a line).
        head: what y means: "language_model" (default for tokens), "regression" (default for
            features) or "classification" (logits over `classes`).
        classes: class names for a classification head (default "0", "1", ...).
        batch_first: whether x and y are batch-first; None takes the recurrent layer's batch_first.
        tolerance: largest allowed ONNX-vs-PyTorch difference.
    Raises:
        ExportError: a bad argument, or a module that does not follow the convention.
        ParityError: the ONNX model does not compute what the module computes.
    """
    start = time.perf_counter()
    module = module.eval()
    cell, layer = recurrent_layer(module)
    if cell == "lstm" and layer.proj_size > 0:
        raise ExportError(
            f"the nn.LSTM has proj_size={layer.proj_size}: the ONNX exporter cannot write projected LSTMs from an "
            "arbitrary module (lstmserve export trains and exports projected models itself)"
        )
    layout_batch_first = layer.batch_first if batch_first is None else bool(batch_first)
    wrapper = BatchMajor(module, cell, layout_batch_first).eval()
    example = _batch_major_example(module, layer, example_input, layout_batch_first)
    kind: ModelKind = "tokens" if not torch.is_floating_point(example) else "features"
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    h, c = state_specs(cell, layer.proj_size or layer.hidden_size, layer.hidden_size)
    zero_state = tuple(torch.zeros(rows, example.shape[0], s.width) for s in ((h,) if c is None else (h, c)))
    output_size = _check_convention(wrapper, example, zero_state, cell, rows)
    chosen_head = head or ("language_model" if kind == "tokens" else "regression")
    if chosen_head not in HEADS:
        raise ExportError(f"head {chosen_head!r} is not one of {', '.join(HEADS)}")
    vocab = _vocabulary(module, layer, kind, vocabulary)
    class_names = _classes(chosen_head, classes, output_size)
    spec = ModelSpec(
        kind=kind,
        input_name=input_name(kind),
        output_name=OUTPUT_NAME,
        vocabulary=vocab,
        input_size=int(example.shape[-1]) if kind == "features" else _embedding_size(module, layer),
        hidden_size=layer.hidden_size,
        num_layers=layer.num_layers,
        proj_size=int(getattr(layer, "proj_size", 0)),
        bias=bool(layer.bias),
        batch_first=layer.batch_first,
        dropout=float(layer.dropout),
        bidirectional=layer.bidirectional,
        output_size=output_size,
        head=chosen_head,
        h=h,
        c=c,
        fingerprint=fingerprint(module),
        exporter=exporter_versions("torchscript"),
        cell=cell,  # type: ignore[arg-type]
        classes=class_names,
        source="module",
    )
    try:
        proto = torchscript_export(wrapper, example, zero_state, spec)
    except Exception as exc:  # the exporter's errors share no base class
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx.export could not export {type(module).__name__}: {first_line}") from exc
    check_weights_are_initializers(proto)
    set_metadata(proto, spec)
    out = Path(out_dir)
    with staging_dir(out) as stage:
        write_onnx(proto, stage / ONNX_NAME)
        parity = check_parity(wrapper, stage / ONNX_NAME, spec, tolerance)
        seconds = time.perf_counter() - start
        write_report(stage / REPORT_NAME, {
            "source": {"module": type(module).__module__ + "." + type(module).__qualname__, "cell": cell,
                       "batch_first": layout_batch_first},
            "parity": {"tolerance": tolerance, "max_abs_diff": parity.figures, "worst": parity.worst},
            "spec": {"fingerprint": spec.fingerprint, "steppable": spec.steppable, "input_name": spec.input_name,
                     "output_size": spec.output_size, "head": spec.head,
                     "states": [[s.input_name, s.output_name, s.width] for s in spec.states]},
            "versions": versions(spec.exporter),
            "seconds": {"total": seconds},
            "files": [ONNX_NAME, REPORT_NAME],
        })
    return ModuleExportResult(out / ONNX_NAME, out / REPORT_NAME, spec, parity.figures, seconds)


def _batch_major_example(
    module: nn.Module, layer: nn.RNNBase, example: torch.Tensor | None, batch_first: bool
) -> torch.Tensor:
    """A small batch-major example input (batch 2, time 3) of the module's kind and width."""
    if example is None:
        embedding = _embedding(module, layer)
        if embedding is not None:
            return torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, dtype=torch.int64)
        return torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, layer.input_size)
    if not isinstance(example, torch.Tensor):
        raise ExportError(f"example_input must be a torch.Tensor, got {type(example).__name__}")
    tokens = not torch.is_floating_point(example)
    want_rank = 2 if tokens else 3
    if example.dim() != want_rank:
        layout = "[batch, time]" if batch_first else "[time, batch]"
        if not tokens:
            layout = layout[:-1] + ", features]"
        raise ExportError(
            f"example_input has shape {list(example.shape)}; a {'token' if tokens else 'feature'} model takes {layout}"
        )
    example = example if batch_first else example.transpose(0, 1)
    if tokens:
        return torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, dtype=torch.int64)
    return torch.zeros(EXAMPLE_BATCH, EXAMPLE_TIME, example.shape[-1], dtype=torch.float32)


def _check_convention(
    wrapper: BatchMajor, example: torch.Tensor, state: tuple[torch.Tensor, ...], cell: str, rows: int
) -> int:
    """Calls the module once; ExportError (one line) unless it follows the convention. Returns y's width."""
    name = type(wrapper.module).__name__
    passed = "(x, (h0, c0))" if cell == "lstm" else "(x, h0)"
    try:
        with torch.no_grad():
            x = example if wrapper.batch_first else example.transpose(0, 1)
            carried: Any = (state[0], state[1]) if cell == "lstm" else state[0]
            result = wrapper.module(x, carried)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"{name}.forward does not follow {CONVENTION}: calling it with {passed} raised "
            f"{type(exc).__name__}: {detail}"
        ) from exc
    if not isinstance(result, tuple) or len(result) != 2:
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise ExportError(f"{name}.forward does not follow {CONVENTION}: it returned {got}, not (y, state)")
    y, final = result
    batch, steps = example.shape[0], example.shape[1]
    want_y = "[batch, time, out]" if wrapper.batch_first else "[time, batch, out]"
    leading = (batch, steps) if wrapper.batch_first else (steps, batch)
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != leading:
        shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ExportError(
            f"{name}.forward returned y of shape {shape} for x of batch {batch} and time {steps}; lstmserve needs "
            f"an output for every position, {want_y} (apply the head to every step, not only the last)"
        )
    finals = final if cell == "lstm" else (final,)
    want_state = "(h, c)" if cell == "lstm" else "h"
    if cell == "lstm" and (not isinstance(final, tuple) or len(final) != 2):
        raise ExportError(f"{name}.forward does not follow {CONVENTION}: its state is not the pair {want_state}")
    for got_state, initial in zip(finals, state, strict=True):
        if not isinstance(got_state, torch.Tensor) or tuple(got_state.shape) != tuple(initial.shape):
            shape = list(got_state.shape) if isinstance(got_state, torch.Tensor) else type(got_state).__name__
            raise ExportError(
                f"{name}.forward returned a state of shape {shape}, expected {list(initial.shape)} "
                f"([num_layers * directions = {rows}, batch, width]): return the recurrent layer's final {want_state}"
            )
    return int(y.shape[-1])


def _embedding(module: nn.Module, layer: nn.RNNBase) -> nn.Embedding | None:
    for sub in module.modules():
        if isinstance(sub, nn.Embedding) and sub.embedding_dim == layer.input_size:
            return sub
    return None


def _embedding_size(module: nn.Module, layer: nn.RNNBase) -> int:
    embedding = _embedding(module, layer)
    return embedding.embedding_dim if embedding is not None else layer.input_size


def _vocabulary(
    module: nn.Module, layer: nn.RNNBase, kind: str, vocabulary: Sequence[str] | str | Path | None
) -> tuple[str, ...]:
    if kind == "features":
        if vocabulary is not None:
            raise ExportError("a vocabulary only applies to token models; this module takes float features")
        return ()
    if vocabulary is None:
        raise ExportError("a token model needs its vocabulary: a list, or --vocab FILE (.json list, or one piece a line)")
    pieces = read_vocabulary(vocabulary)
    embedding = _embedding(module, layer)
    if embedding is not None and embedding.num_embeddings != len(pieces):
        raise ExportError(
            f"the vocabulary has {len(pieces)} pieces but the module's nn.Embedding has {embedding.num_embeddings} rows"
        )
    return pieces


def _classes(head: str, classes: Sequence[str], output_size: int) -> tuple[str, ...]:
    names = tuple(str(c) for c in classes)
    if head != "classification":
        if names:
            raise ExportError(f"classes only apply to a classification head, not {head!r}")
        return ()
    if not names:
        return tuple(str(i) for i in range(output_size))
    if len(names) != output_size:
        raise ExportError(f"{len(names)} class names given, but the module's output has {output_size} values per step")
    return names


def load_module(target: str, weights: str | Path | None = None) -> nn.Module:
    """The module `target` names ("pkg.mod:factory" or "path/to/file.py:factory"), with `weights` loaded.

    `factory` is an nn.Module, an nn.Module class or a function returning one (called without
    arguments). `weights` is a file saved with `torch.save`: a state_dict, or a dict holding one
    under "state_dict" or "model_state_dict". Raises ExportError naming what is wrong.
    """
    where, _, attribute = target.rpartition(":")
    if not where or not attribute:
        raise ExportError(f"--module {target!r} must look like package.module:factory or path/to/file.py:factory")
    python_module = _import(where, target)
    factory = getattr(python_module, attribute, None)
    if factory is None:
        raise ExportError(f"--module {target!r}: {where!r} has no attribute {attribute!r}")
    try:
        module = factory if isinstance(factory, nn.Module) else factory()
    except Exception as exc:
        raise ExportError(f"--module {target!r}: calling {attribute}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ExportError(f"--module {target!r}: {attribute} gave a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(module, Path(weights))
    return module


def _import(where: str, target: str) -> Any:
    import importlib
    import importlib.util
    import sys

    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ExportError(f"--module {target!r}: file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ExportError(f"--module {target!r}: cannot load {where!r} as Python")
        loaded = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:
            raise ExportError(f"--module {target!r}: importing {where!r} raised {type(exc).__name__}: {exc}") from exc
        return loaded
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: modules beside the user are importable
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise ExportError(f"--module {target!r}: cannot import {where!r}: {exc}") from exc


def _load_weights(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ExportError(f"--weights {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"--weights {str(path)!r} is not a file saved with torch.save: {exc}") from exc
    if isinstance(payload, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict):
        raise ExportError(f"--weights {str(path)!r} holds a {type(payload).__name__}, not a state_dict")
    try:
        module.load_state_dict(payload)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ExportError(f"--weights {str(path)!r} does not fit the module: {detail[:300]}") from exc
