"""ONNX models lstmserve did not write: `lstmserve annotate`, then served and stepped; and the load-time check.

The models come from a plain `torch.onnx.export` with the user's own tensor names: an nn.LSTM
time-major (x, h, c -> y, hn, cn, with and without dynamic axes), a GRU with other names, a
token GRU, and the naming of Triton's issue #8586 (cache_last_channel, cache_last_channel_len
and their `_next` outputs), whose states Triton swaps by sorting the names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import start_server
from own_modules import VOCABULARY, export_plain, random_sequences, step_concurrently
from torch import nn

from lstmserve.export import ExportError, ParityError, annotate
from lstmserve.export.state_pairs import pair_states
from lstmserve.interface import GraphTensor, ModelInterfaceError, check_graph
from lstmserve.metadata import METADATA_KEY, ModelSpec

TOLERANCE = 1e-4
LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))
STATE_AXES = {1: "batch"}


class PlainLSTM(nn.Module):
    """A bare nn.LSTM as a user exports it: time-major, (x, h, c) -> (y, hn, cn)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 6, num_layers=2)

    def forward(self, x, h, c):
        y, (hn, cn) = self.lstm(x, (h, c))
        return y, hn, cn


class CacheLSTM(nn.Module):
    """Triton #8586's naming: two states of the same shape whose output names sort the other way round."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.proj = nn.Linear(5, 2)

    def forward(self, audio, cache_last_channel, cache_last_channel_len):
        y, (h, c) = self.lstm(audio, (cache_last_channel, cache_last_channel_len))
        return self.proj(y), h, c


class SensorGRU(nn.Module):
    """A batch-first GRU with a head: (sensor, memory) -> (forecast, memory_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, sensor, memory):
        y, memory = self.gru(sensor, memory)
        return self.head(y), memory


class TokenGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCABULARY), 4)
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.out = nn.Linear(6, len(VOCABULARY))

    def forward(self, ids, h_in):
        y, h = self.gru(self.embed(ids), h_in)
        return self.out(y), h


def _seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for parameter in module.parameters():
        nn.init.uniform_(parameter, -0.5, 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    module = _seeded(PlainLSTM())
    folder = tmp_path_factory.mktemp("plain")
    args = (torch.zeros(4, 2, 3), torch.zeros(2, 2, 6), torch.zeros(2, 2, 6))
    names = {"input_names": ["x", "h", "c"], "output_names": ["y", "hn", "cn"]}
    axes = {"x": {0: "time", 1: "batch"}, "y": {0: "time", 1: "batch"}, **dict.fromkeys(("h", "c", "hn", "cn"), STATE_AXES)}
    dynamic = export_plain(module, folder / "plain.onnx", args, dynamic_axes=axes, **names)
    static = export_plain(module, folder / "static.onnx", args, **names)  # no dynamic axes at all
    return module, dynamic, static


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    module = _seeded(CacheLSTM())
    inputs = ["audio", "cache_last_channel", "cache_last_channel_len"]
    outputs = ["encoded", "cache_last_channel_next", "cache_last_channel_len_next"]
    axes = {"audio": {0: "B", 1: "T"}, "encoded": {0: "B", 1: "T"}, **{n: {1: "B"} for n in inputs[1:] + outputs[1:]}}
    path = export_plain(module, tmp_path_factory.mktemp("cache") / "cache.onnx",
                        (torch.zeros(2, 3, 4), torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)),
                        input_names=inputs, output_names=outputs, dynamic_axes=axes)
    return module, path


@pytest.fixture(scope="module")
def sensor(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    module = _seeded(SensorGRU())
    # Dynamic axes as lists: the exporter names them itself, so the layout is found by running.
    path = export_plain(module, tmp_path_factory.mktemp("sensor") / "sensor.onnx",
                        (torch.zeros(2, 3, 3), torch.zeros(1, 2, 7)),
                        input_names=["sensor", "memory"], output_names=["forecast", "memory_out"],
                        dynamic_axes={"sensor": [0, 1], "forecast": [0, 1], "memory": [1], "memory_out": [1]})
    return module, path


def _torch_outputs(module: nn.Module, sequence: np.ndarray, time_major: bool) -> np.ndarray:
    """The module's output on one whole sequence from zero state, [positions, out]."""
    layer = next(m for m in module.modules() if isinstance(m, nn.RNNBase))
    states = [torch.zeros(layer.num_layers, 1, layer.hidden_size)] * (2 if isinstance(layer, nn.LSTM) else 1)
    data = torch.from_numpy(sequence[:, None] if time_major else sequence[None])
    with torch.no_grad():
        y = module(data, *states)[0]
    return (y[:, 0] if time_major else y[0]).numpy()


def _served_matches_torch(module: nn.Module, model: Path, time_major: bool, kind: str = "features") -> None:
    spec = _spec(model)
    sequences = random_sequences(kind, spec.input_size, count=5, seed=4)
    handle = start_server(model, max_batch_size=8)
    try:
        served = step_concurrently(handle.address, sequences, kind)
    finally:
        handle.stop()
    for sequence, got in zip(sequences, served, strict=True):
        want = _torch_outputs(module, sequence, time_major)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE


def _spec(model: Path) -> ModelSpec:
    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ModelSpec.from_json(props[METADATA_KEY])


@pytest.mark.parametrize("variant", ["dynamic", "static"])
def test_plain_nn_lstm_export_is_annotated_and_served(plain, variant: str, tmp_path: Path) -> None:
    module, dynamic, static = plain
    result = annotate(dynamic if variant == "dynamic" else static, tmp_path / "served")
    spec = result.spec
    assert (spec.input_name, spec.output_name, spec.kind, spec.cell, spec.time_major) == ("x", "y", "features", "lstm", True)
    assert [(p.input.name, p.output.name, p.how) for p in result.pairs] == [("h", "hn", "name"), ("c", "cn", "name")]
    assert (spec.state_rows, spec.h.width, spec.output_size, spec.source) == (2, 6, 6, "annotated")
    assert max(result.checks.values()) <= TOLERANCE and {"step_b1_logits", "step_b3_cn", "rows_b3_hn"} <= set(result.checks)
    assert json.loads(result.report_path.read_text())["layout"] == "time-major"
    _served_matches_torch(module, result.onnx_path, time_major=True)


def test_triton_8586_naming_keeps_each_state_on_its_own_input(cache, tmp_path: Path) -> None:
    module, path = cache
    result = annotate(path, tmp_path / "cache")
    pairs = [(p.input.name, p.output.name) for p in result.pairs]
    assert pairs == [("cache_last_channel", "cache_last_channel_next"), ("cache_last_channel_len", "cache_last_channel_len_next")]
    # Pairing by sort order, as Triton's implicit state does, swaps them:
    by_sorting = list(zip(sorted(p[0] for p in pairs), sorted(p[1] for p in pairs)))
    assert by_sorting == [("cache_last_channel", "cache_last_channel_len_next"), ("cache_last_channel_len", "cache_last_channel_next")]
    # ... which the stepwise check refuses before writing anything,
    with pytest.raises(ParityError, match="does not give the same result stepwise"):
        annotate(path, tmp_path / "swapped", states=by_sorting)
    assert not (tmp_path / "swapped").exists()
    # while the pairs by name serve exactly what PyTorch computes, step by step in concurrent sessions.
    assert result.spec.h.input_name == "cache_last_channel" and result.spec.c is not None
    assert result.spec.c.output_name == "cache_last_channel_len_next"
    _served_matches_torch(module, result.onnx_path, time_major=False)


def test_gru_with_other_names_pairs_by_name_and_finds_its_layout_by_running(sensor, tmp_path: Path) -> None:
    module, path = sensor
    result = annotate(path, tmp_path / "gru")
    assert [(p.input.name, p.output.name) for p in result.pairs] == [("memory", "memory_out")]
    assert (result.spec.cell, result.spec.c, result.layout) == ("gru", None, "batch-major")
    _served_matches_torch(module, result.onnx_path, time_major=False)


def test_token_model_needs_and_gets_its_vocabulary(tmp_path: Path) -> None:
    module = _seeded(TokenGRU())
    path = export_plain(module, tmp_path / "tokens.onnx", (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(1, 2, 6)),
                        input_names=["ids", "h_in"], output_names=["logits", "h_out"],
                        dynamic_axes={"ids": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}, "h_in": {1: "b"}, "h_out": {1: "b"}})
    with pytest.raises(ExportError, match="give its vocabulary with --vocab"):
        annotate(path, tmp_path / "no-vocab")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCABULARY) + "\n")
    result = annotate(path, tmp_path / "served", vocabulary=vocab)
    assert result.spec.kind == "tokens" and result.spec.vocabulary == VOCABULARY and result.spec.head == "language_model"
    _served_matches_torch(module, result.onnx_path, time_major=False, kind="tokens")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LSTMSERVE, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_refuses_a_model_without_recurrent_state_and_ambiguous_pairs(plain, tmp_path: Path) -> None:
    export_plain(nn.Linear(3, 2).eval(), tmp_path / "linear.onnx", (torch.zeros(2, 4, 3),),
                 input_names=["x"], output_names=["y"])
    anonymous = onnx.load(str(plain[1]))
    renamed = {"y": "out0", "hn": "out1", "cn": "out2"}  # nothing in these names says which state is which
    for value in anonymous.graph.output:
        value.name = renamed[value.name]
    for node in anonymous.graph.node:
        for index, name in enumerate(node.output):
            node.output[index] = renamed.get(name, name)
    onnx.save(anonymous, str(tmp_path / "anonymous.onnx"))
    cases = [
        (["linear.onnx"], "the model has no recurrent state"),
        (["anonymous.onnx"], "ambiguous state pairs: inputs 'h', 'c' could pair with outputs 'out1', 'out2'"),
        (["anonymous.onnx", "--state", "h:nope"], "'nope' is not a graph output"),
        (["anonymous.onnx", "--input", "x", "--state", "h:out1", "--state", "c:out2", "--vocab", "v.txt"],
         "--vocab only applies to token models"),
    ]
    for args, needle in cases:
        done = _cli("annotate", *args, "--out", "out", cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("lstmserve annotate: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists()
    named = _cli("annotate", "anonymous.onnx", "--state", "h:out1", "--state", "c:out2", "--out", "out", cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert "h -> out1" in named.stdout and "given with --state" in named.stdout and (tmp_path / "out" / "model.onnx").exists()


def test_pairs_by_name_never_by_order_then_by_shape() -> None:
    f = "tensor(float)"

    def t(name: str, *shape: int | str) -> GraphTensor:
        return GraphTensor(name, f, tuple(shape))

    pairs = pair_states(
        [t("past_key", 1, "b", 4), t("h0", 2, "b", 8), t("state_in", 1, "b", 3)],
        [t("state_out", 1, "b", 3), t("present_key", 1, "b", 4), t("hn", 2, "b", 8)],
    )
    assert [(p.input.name, p.output.name, p.how) for p in pairs] == [
        ("past_key", "present_key", "name"), ("h0", "hn", "name"), ("state_in", "state_out", "name")]
    by_shape = pair_states([t("a", 1, "b", 4), t("z", 2, "b", 4)], [t("q", 2, "b", 4), t("p", 1, "b", 4)])
    assert [(p.input.name, p.output.name, p.how) for p in by_shape] == [("a", "p", "shape"), ("z", "q", "shape")]
    with pytest.raises(ExportError, match="ambiguous"):
        pair_states([t("a", 1, "b", 4), t("z", 1, "b", 4)], [t("q", 1, "b", 4), t("p", 1, "b", 4)])
    with pytest.raises(ExportError, match="differ in dtype or shape"):
        pair_states([t("a", 1, "b", 4)], [t("q", 1, "b", 5)], given=[("a", "q")])


def test_the_server_refuses_metadata_that_does_not_fit_the_graph(sensor, tmp_path: Path) -> None:
    annotated = annotate(sensor[1], tmp_path / "good").onnx_path
    proto = onnx.load(str(annotated))
    good = json.loads(proto.metadata_props[0].value)
    edits: dict[str, tuple[dict[str, object], str]] = {
        "width": ({"h": {**good["h"], "width": 9}},
                  "state 1 input 'memory' has shape [1, batch, 7] in the graph, but the metadata says [1, batch, 9]"),
        "rows": ({"num_layers": 3}, "state 1 input 'memory' has shape [1, batch, 7] in the graph, but the metadata says [3, batch, 7]"),
        "name": ({"output_name": "prediction"}, "the metadata's output 'prediction' is not a graph output (graph outputs: forecast, memory_out)"),
        "dtype": ({"kind": "tokens", "vocabulary": ["a"]}, "token input 'sensor' is tensor(float) in the graph, but the metadata says tensor(int64)"),
    }
    for label, (change, needle) in edits.items():
        proto.metadata_props[0].value = json.dumps({**good, **change})
        bad = tmp_path / f"{label}.onnx"
        onnx.save(proto, str(bad))
        done = _cli("serve", "--model", str(bad), "--port", "0", cwd=tmp_path)
        assert done.returncode == 2, (label, done.stderr)
        assert done.stderr.strip().splitlines() == [f"lstmserve serve: error: {bad}: {needle}"], done.stderr


def test_check_graph_names_the_tensor_and_both_shapes() -> None:
    spec = ModelSpec.from_json(json.dumps({
        "format_version": 2, "kind": "features", "input_name": "x", "output_name": "y", "vocabulary": [],
        "input_size": 3, "hidden_size": 4, "num_layers": 1, "proj_size": 0, "bias": True, "batch_first": True,
        "dropout": 0.0, "bidirectional": False, "output_size": 2, "head": "regression", "cell": "gru",
        "h": {"input_name": "h", "output_name": "hn", "width": 4}, "c": None, "fingerprint": "f",
    }))
    f = "tensor(float)"
    good_in = [GraphTensor("x", f, ("b", "t", 3)), GraphTensor("h", f, (1, "b", 4))]
    good_out = [GraphTensor("y", f, ("b", "t", 2)), GraphTensor("hn", f, (1, "b", 4))]
    check_graph(spec, good_in, good_out)
    with pytest.raises(ModelInterfaceError, match=r"feature input 'x' has shape \[b, t, 5\] in the graph, but the metadata says \[batch, time, 3\]"):
        check_graph(spec, [GraphTensor("x", f, ("b", "t", 5)), good_in[1]], good_out)
    with pytest.raises(ModelInterfaceError, match=r"has shape \[1, 7, 3\].*\(batch and time must be dynamic axes\)"):
        check_graph(spec, [GraphTensor("x", f, (1, 7, 3)), good_in[1]], good_out)
    with pytest.raises(ModelInterfaceError, match="graph input 'mask' \\[b\\] is not in the metadata"):
        check_graph(spec, [*good_in, GraphTensor("mask", f, ("b",))], good_out)
    with pytest.raises(ModelInterfaceError, match="the metadata's state 1 output 'hn' is not a graph output"):
        check_graph(spec, good_in, good_out[:1])
