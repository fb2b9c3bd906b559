"""ONNX vs PyTorch parity for every nn.LSTM option, checked independently of the exporter's own check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lstmserve.export import ExportConfig, ParityError, export_model, load_checkpoint
from lstmserve.export.model import LSTMModel, ModelConfig
from lstmserve.export.onnx_export import OPSET, make_spec, to_onnx
from lstmserve.export.parity import check_parity
from lstmserve.export.scan_graph import build_scan_model

TOL = 1e-4

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no_bias": {"bias": False},
    "batch_first": {"batch_first": True},
    "multi_layer_dropout": {"num_layers": 3, "dropout": 0.3},
    "bidirectional": {"bidirectional": True, "num_layers": 2},
    "proj": {"proj_size": 6},
    "proj_2_layers": {"proj_size": 6, "num_layers": 2, "dropout": 0.2},
    "proj_bidirectional": {"proj_size": 6, "num_layers": 2, "bidirectional": True},
    "proj_no_bias_batch_first": {"proj_size": 5, "bias": False, "batch_first": True},
    "features": {"task": "features", "input_size": 7},
    "features_proj_2_layers": {"task": "features", "input_size": 7, "proj_size": 4, "num_layers": 2},
    "features_bidirectional": {"task": "features", "input_size": 7, "bidirectional": True},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config = ExportConfig.tiny(steps=30, out=tmp_path_factory.mktemp(request.param) / "model", **VARIANTS[request.param])
    return config, export_model(config, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and one thread is immune to CPU contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(module: LSTMModel, batch: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = module.config
    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "tokens":
        x = torch.randint(0, cfg.vocab_size, (batch, steps), generator=gen)
    else:
        x = torch.randn(batch, steps, cfg.input_size, generator=gen)
    h0 = torch.randn(cfg.state_rows, batch, cfg.h_width, generator=gen)
    c0 = torch.randn(cfg.state_rows, batch, cfg.hidden_size, generator=gen)
    return x, h0, c0


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(spec, x, h, c) -> dict[str, np.ndarray]:
    return {spec.input_name: np.asarray(x), "h0": np.asarray(h), "c0": np.asarray(c)}


def test_exporter_parity_figures_are_within_tolerance(exported) -> None:
    config, result = exported
    assert result.parity and max(result.parity.values()) <= TOL
    whole = {k for k in result.parity if k.startswith("whole_")}
    step = {k for k in result.parity if k.startswith("step_")}
    assert {"whole_b1_logits", "whole_b3_logits", "whole_b3_hn", "whole_b3_cn"} <= whole
    if config.bidirectional:
        assert not step and not result.spec.steppable
    else:
        assert {"step_b1_logits", "step_b3_logits", "step_b3_hn"} <= step and result.spec.steppable


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_matches_checkpoint_whole_sequence(exported, batch: int) -> None:
    _, result = exported
    module = load_checkpoint(result.checkpoint_path)
    x, h0, c0 = _inputs(module, batch, 13, seed=batch)
    with torch.no_grad():
        want = [t.numpy() for t in module(x, h0, c0)]
    got = _ort(result.onnx_path).run(["logits", "hn", "cn"], _feeds(result.spec, x, h0, c0))
    assert got[0].shape == (batch, 13, result.spec.output_size)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_stepwise_matches_whole_sequence(exported, batch: int) -> None:
    _, result = exported
    if not result.spec.steppable:
        pytest.skip("bidirectional models cannot be stepped")
    module = load_checkpoint(result.checkpoint_path)
    x, h0, c0 = _inputs(module, batch, 9, seed=10 + batch)
    with torch.no_grad():
        want_logits, want_h, want_c = (t.numpy() for t in module(x, h0, c0))
        torch_steps = []
        # PyTorch tensors here, NumPy arrays in the ONNX loop below
        h: torch.Tensor | np.ndarray
        c: torch.Tensor | np.ndarray
        h, c = h0, c0
        for t in range(x.shape[1]):
            logits, h, c = module(x[:, t:t + 1], h, c)
            torch_steps.append(logits)
    # PyTorch stepped == PyTorch whole sequence.
    np.testing.assert_allclose(torch.cat(torch_steps, 1).numpy(), want_logits, rtol=0, atol=1e-5)
    # ONNX stepped, carrying hn/cn back in == PyTorch whole sequence.
    sess = _ort(result.onnx_path)
    h, c, onnx_steps = h0.numpy(), c0.numpy(), []
    for t in range(x.shape[1]):
        logits, h, c = sess.run(["logits", "hn", "cn"], _feeds(result.spec, x[:, t:t + 1], h, c))
        onnx_steps.append(logits)
    np.testing.assert_allclose(np.concatenate(onnx_steps, 1), want_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(h, want_h, rtol=0, atol=TOL)
    np.testing.assert_allclose(c, want_c, rtol=0, atol=TOL)


def test_state_shapes_follow_nn_lstm(exported) -> None:
    """hn/cn have num_layers * directions rows; h is proj_size wide when projected."""
    config, result = exported
    module = load_checkpoint(result.checkpoint_path)
    x, h0, c0 = _inputs(module, 2, 5, seed=0)
    _, hn, cn = _ort(result.onnx_path).run(["logits", "hn", "cn"], _feeds(result.spec, x, h0, c0))
    rows = config.num_layers * (2 if config.bidirectional else 1)
    assert hn.shape == (rows, 2, config.proj_size or config.hidden_size)
    assert cn.shape == (rows, 2, config.hidden_size)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_layers": 2, "bidirectional": True, "bias": False},
        {"proj_size": 3, "num_layers": 2, "bidirectional": True, "batch_first": True},
        {"kind": "features", "proj_size": 3},
    ],
)
def test_scan_graph_matches_pytorch(options: dict[str, object]) -> None:
    """The hand-built Scan graph (used for proj_size > 0) also matches for proj_size == 0."""
    torch.manual_seed(0)
    options = dict(options)
    kind = str(options.pop("kind", "tokens"))
    base: dict[str, Any] = dict(kind=kind, input_size=5, output_size=11, vocab_size=11 if kind == "tokens" else 0,
                hidden_size=8, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                bidirectional=False, proj_size=0)
    module = LSTMModel(ModelConfig(**{**base, **options})).eval()
    spec = make_spec(module, ())
    proto = build_scan_model(module, spec.input_name, OPSET)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, steps in [(1, 1), (3, 17)]:
        x, h0, c0 = _inputs(module, batch, steps, seed=steps)
        with torch.no_grad():
            want = [t.numpy() for t in module(x, h0, c0)]
        got = sess.run(["logits", "hn", "cn"], _feeds(spec, x, h0, c0))
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_parity_check_catches_a_wrong_graph(tmp_path: Path) -> None:
    """A model whose ONNX weights differ slightly from PyTorch's fails the check."""
    torch.manual_seed(0)
    module = LSTMModel(ModelConfig("tokens", 4, 9, 9, 8, 1, True, False, 0.0, False, 0)).eval()
    spec = make_spec(module, tuple("abcdefghi"))
    path = tmp_path / "model.onnx"
    onnx.save_model(to_onnx(module, spec), str(path))
    check_parity(module, path, spec, TOL)  # the faithful export passes
    with torch.no_grad():
        module.head.bias[0] += 1e-3
    with pytest.raises(ParityError, match="whole_b1_logits"):
        check_parity(module, path, spec, TOL)
