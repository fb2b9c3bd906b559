"""The exported files: ONNX interface and metadata, checkpoint, report, plot, determinism."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto

import lstmserve.export as export_pkg
from lstmserve.export import ExportConfig, ExportError, export_model, load_checkpoint, read_spec
from lstmserve.export.data import load_tokens, stdlib_corpus
from lstmserve.metadata import METADATA_KEY, ModelSpec


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and one thread is immune to CPU contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokens_export(tmp_path_factory: pytest.TempPathFactory):
    config = ExportConfig.tiny(num_layers=2, out=tmp_path_factory.mktemp("tokens") / "model")
    return config, export_model(config, progress=False)


@pytest.fixture(scope="module")
def features_export(tmp_path_factory: pytest.TempPathFactory):
    config = ExportConfig.tiny(task="features", proj_size=4, out=tmp_path_factory.mktemp("features") / "model")
    return config, export_model(config, progress=False)


def _dims(value_info: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _io(graph: onnx.GraphProto) -> tuple[dict[str, onnx.ValueInfoProto], dict[str, onnx.ValueInfoProto]]:
    inits = {i.name for i in graph.initializer}
    return {v.name: v for v in graph.input if v.name not in inits}, {v.name: v for v in graph.output}


def test_public_api_is_pinned() -> None:
    assert sorted(export_pkg.__all__) == [
        "AnnotateResult", "ExportConfig", "ExportError", "ExportResult", "LSTMModel", "ModelConfig",
        "ModuleExportResult", "ParityError", "RecurrentModel", "annotate", "export_model", "export_module",
        "fingerprint", "load_checkpoint", "read_spec",
    ]
    for name in export_pkg.__all__:
        assert getattr(export_pkg, name) is not None


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, lstmserve.export.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_all_four_files_written(tokens_export) -> None:
    config, result = tokens_export
    for path in (result.onnx_path, result.checkpoint_path, result.report_path, result.plot_path):
        assert path.parent == config.out and path.is_file() and path.stat().st_size > 0
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in config.out.iterdir()) == ["loss.png", "model.onnx", "model.pt", "report.json"]
    assert [p for p in config.out.parent.iterdir() if p.name.startswith(".")] == []


def test_metadata_round_trip(tokens_export) -> None:
    _, result = tokens_export
    proto = onnx.load(str(result.onnx_path))
    entries = {p.key: p.value for p in proto.metadata_props}
    spec = ModelSpec.from_json(entries[METADATA_KEY])
    assert spec == result.spec == read_spec(result.onnx_path)
    assert spec.kind == "tokens" and spec.head == "language_model" and spec.input_name == "tokens"
    assert spec.output_size == len(spec.vocabulary) > 50
    assert (spec.h.input_name, spec.h.output_name, spec.h.width) == ("h0", "hn", 16)
    assert spec.c is not None
    assert (spec.c.input_name, spec.c.output_name, spec.c.width) == ("c0", "cn", 16)
    assert spec.num_layers == 2 and spec.steppable
    assert len(spec.fingerprint) == 64 and int(spec.fingerprint, 16) >= 0
    assert set(spec.exporter) >= {"lstmserve", "torch", "onnx", "opset"}
    assert spec.exporter["torch"] == torch.__version__ and spec.exporter["onnx"] == onnx.__version__


def test_tokens_graph_interface(tokens_export) -> None:
    _, result = tokens_export
    graph = onnx.load(str(result.onnx_path)).graph
    inputs, outputs = _io(graph)
    assert list(inputs) == ["tokens", "h0", "c0"] and list(outputs) == ["logits", "hn", "cn"]
    assert inputs["tokens"].type.tensor_type.elem_type == TensorProto.INT64
    assert _dims(inputs["tokens"]) == ["batch", "time"]
    assert _dims(inputs["h0"]) == [2, "batch", 16] and _dims(inputs["c0"]) == [2, "batch", 16]
    assert _dims(outputs["logits"]) == ["batch", "time", result.spec.output_size]
    assert _dims(outputs["hn"]) == [2, "batch", 16] and _dims(outputs["cn"]) == [2, "batch", 16]
    for name in ("h0", "c0"):
        assert inputs[name].type.tensor_type.elem_type == TensorProto.FLOAT
    for name in ("logits", "hn", "cn"):
        assert outputs[name].type.tensor_type.elem_type == TensorProto.FLOAT


def test_lstm_ops_take_constant_weights_and_no_sequence_lens(tokens_export) -> None:
    _, result = tokens_export
    graph = onnx.load(str(result.onnx_path)).graph
    inits = {i.name for i in graph.initializer}
    lstm_nodes = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstm_nodes) == 2
    for node in lstm_nodes:
        assert all(name in inits for name in node.input[1:4])
        assert len(node.input) < 5 or node.input[4] == ""


def test_features_graph_interface(features_export) -> None:
    config, result = features_export
    spec = result.spec
    assert spec.kind == "features" and spec.head == "regression" and spec.vocabulary == ()
    assert spec.input_name == "features" and spec.output_size == spec.input_size == 28 == config.input_size
    assert spec.h.width == 4 and spec.c.width == 16 and spec.proj_size == 4
    assert spec == read_spec(result.onnx_path)
    inputs, outputs = _io(onnx.load(str(result.onnx_path)).graph)
    assert list(inputs) == ["features", "h0", "c0"] and list(outputs) == ["logits", "hn", "cn"]
    assert inputs["features"].type.tensor_type.elem_type == TensorProto.FLOAT
    assert _dims(inputs["features"]) == ["batch", "time", 28]
    assert _dims(inputs["h0"]) == [1, "batch", 4] and _dims(inputs["c0"]) == [1, "batch", 16]
    assert _dims(outputs["logits"]) == ["batch", "time", 28]


def test_features_report_names_the_naive_baseline(features_export) -> None:
    _, result = features_export
    report = json.loads(result.report_path.read_text())
    assert report["loss"]["baseline"] == "repeat last value"
    assert 0 < result.baseline_val_loss < 1 and result.val_loss > 0


def test_checkpoint_reloads_the_same_module(tokens_export) -> None:
    _, result = tokens_export
    module = load_checkpoint(result.checkpoint_path)
    assert not module.training
    assert module.vocabulary == result.spec.vocabulary
    from lstmserve.export.model import fingerprint

    assert fingerprint(module) == result.spec.fingerprint
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    h0, c0 = module.initial_state(2)
    logits, hn, cn = module(tokens, h0, c0)
    assert logits.shape == (2, 3, result.spec.output_size) and hn.shape == (2, 2, 16) and cn.shape == (2, 2, 16)
    payload = torch.load(result.checkpoint_path, weights_only=True)
    assert payload["export_config"]["num_layers"] == 2 and payload["export_config"]["seed"] == 0


def test_report_contents(tokens_export) -> None:
    config, result = tokens_export
    report = json.loads(result.report_path.read_text())
    assert report["config"] == config.to_dict()
    assert len(report["loss"]["curve_train"]) == config.steps
    assert report["loss"]["curve_val_steps"][-1] == config.steps
    assert report["loss"]["val"] == pytest.approx(result.val_loss)
    assert report["loss"]["baseline_val"] == pytest.approx(result.baseline_val_loss)
    assert report["parity"]["max_abs_diff"] == result.parity and report["parity"]["worst"] <= 1e-4
    assert {"torch", "onnx", "onnxruntime", "python", "opset"} <= set(report["versions"])


def test_tiny_language_model_learns_something(tokens_export) -> None:
    _, result = tokens_export
    first = json.loads(result.report_path.read_text())["loss"]["curve_train"][0]
    assert result.val_loss < first - 1.0


def test_same_seed_same_fingerprint_different_seed_different(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> str:
        config = ExportConfig.tiny(steps=20, dropout=0.2, num_layers=2, seed=seed, out=tmp_path / name)
        return export_model(config, progress=False).spec.fingerprint

    first, second, other = run("a", 1), run("b", 1), run("c", 2)
    assert first == second != other
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_existing_output_directory_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_model(ExportConfig.tiny(steps=5, out=out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "model.onnx", "model.pt", "report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_corpus_file_sets_the_vocabulary(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc cab bca ünï\n" * 40, encoding="utf-8")
    result = export_model(ExportConfig.tiny(steps=10, corpus=corpus, out=tmp_path / "m"), progress=False)
    assert result.spec.vocabulary == tuple(sorted(set("abc cab bca ünï\n")))
    assert result.spec.output_size == len(result.spec.vocabulary)


def test_builtin_corpus_is_deterministic_python() -> None:
    text = stdlib_corpus()
    assert text == stdlib_corpus() and len(text) > 500_000
    assert "def " in text and "import " in text
    data = load_tokens(ExportConfig.tiny())
    assert len(data.val) > 0 and len(data.train) > 9 * len(data.val)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"proj_size": 16}, "--proj-size 16"),
        ({"hidden_size": 0}, "--hidden-size must be a positive integer, got 0"),
        ({"num_layers": -1}, "got -1"),
        ({"steps": 0}, "--steps"),
        ({"input_size": 0}, "--input-size"),
        ({"dropout": 1.0}, "--dropout must be in [0, 1), got 1.0"),
        ({"dropout": -0.1}, "got -0.1"),
        ({"lr": 0.0}, "--lr"),
        ({"task": "images"}, "'images'"),
    ],
)
def test_config_validation_names_the_bad_value(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ExportError) as info:
        ExportConfig.tiny(**overrides)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_tiny_overrides_and_defaults() -> None:
    tiny = ExportConfig.tiny(hidden_size=24, proj_size=3)
    assert tiny.hidden_size == 24 and tiny.proj_size == 3 and tiny.steps == ExportConfig.tiny().steps
    assert ExportConfig().input_size == 64 and ExportConfig(task="features").input_size == 28
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.hidden_size = 1  # type: ignore[misc]
