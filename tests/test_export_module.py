"""Already-trained modules: `export_module` / `lstmserve export --module`, then served and stepped.

An nn.GRU forecaster (batch-first, 2 layers, one state tensor) and an nn.LSTM character model
(time-major, embedding, two state tensors), each trained a few steps, are exported without
training, served, stepped by concurrent sessions and compared with the module on the whole
sequence; the GRU's one-tensor state also goes through snapshots, a restart and Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ServerThread, start_server
from own_modules import (
    VOCABULARY,
    BidirectionalGRU,
    CharLSTM,
    GRUForecaster,
    random_sequences,
    step_concurrently,
    train_few_steps,
    whole_sequence,
)

from lstmserve.client import Client, NotSteppable
from lstmserve.export import ExportError, export_module

TOLERANCE = 1e-4
LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))
OWN_MODULES = Path(__file__).with_name("own_modules.py")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def gru(tmp_path_factory: pytest.TempPathFactory):
    module = train_few_steps(GRUForecaster())
    return module, export_module(module, torch.zeros(2, 5, 3), tmp_path_factory.mktemp("gru") / "model")


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory):
    module = train_few_steps(CharLSTM())
    folder = tmp_path_factory.mktemp("lstm")
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps(list(VOCABULARY)))
    return module, export_module(module, out_dir=folder / "model", vocabulary=vocab)


@pytest.fixture(scope="module")
def gru_server(gru) -> Iterator[ServerThread]:
    handle = start_server(gru[1].onnx_path, max_batch_size=8)
    yield handle
    handle.stop()


def test_exports_describe_the_modules(gru, lstm) -> None:
    _, g = gru
    assert (g.spec.cell, g.spec.kind, g.spec.head, g.spec.source) == ("gru", "features", "regression", "module")
    assert g.spec.c is None and (g.spec.h.input_name, g.spec.h.output_name, g.spec.h.width) == ("h0", "hn", 12)
    assert (g.spec.state_rows, g.spec.input_size, g.spec.output_size) == (2, 3, 3)
    _, lm = lstm
    assert (lm.spec.cell, lm.spec.kind, lm.spec.vocabulary, lm.spec.input_size) == ("lstm", "tokens", VOCABULARY, 8)
    assert lm.spec.c is not None and lm.spec.c.width == 10 and not lm.spec.batch_first
    for result in (g, lm):
        assert result.parity and max(result.parity.values()) <= TOLERANCE
        assert any(k.startswith("step_") for k in result.parity)
        report = json.loads(result.report_path.read_text())
        assert report["parity"]["worst"] <= TOLERANCE and report["source"]["cell"] == result.spec.cell


@pytest.mark.parametrize("which", ["gru", "lstm"])
def test_concurrent_sessions_match_the_module_on_the_whole_sequence(which: str, request: pytest.FixtureRequest) -> None:
    module, result = request.getfixturevalue(which)
    spec = result.spec
    sequences = random_sequences(spec.kind, spec.input_size, count=6, seed=3)
    handle = start_server(result.onnx_path, max_batch_size=8)
    try:
        served = step_concurrently(handle.address, sequences, spec.kind)
        with Client(handle.address) as client:
            whole = client.infer(sequences[0].tolist()) if spec.kind == "tokens" else client.infer(features=sequences[0])
    finally:
        handle.stop()
    batch_first = which == "gru"
    for sequence, got in zip(sequences, served, strict=True):
        want = whole_sequence(module, sequence, batch_first)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE
    assert np.abs(whole - whole_sequence(module, sequences[0], batch_first)).max() <= TOLERANCE


def test_one_state_tensor_survives_snapshots_and_a_restart(gru, tmp_path: Path) -> None:
    module, result = gru
    rows = random_sequences("features", 3, count=1, seed=9)[0]
    want = whole_sequence(module, rows, batch_first=True)
    first = start_server(result.onnx_path, state_dir=tmp_path)
    with Client(first.address) as client:
        session = client.session()
        session.step(features=rows[:3])
        blob = session.snapshot()
        with client.session(restore=blob) as restored:
            out = restored.step(features=rows[3:5])
            assert out.outputs is not None
            np.testing.assert_allclose(out.outputs, want[3:5], rtol=0, atol=TOLERANCE)
        session.step(features=rows[3:4])
        kept = session.id
        session.detach()
    first.call(first.server.drain(grace_s=5))
    first.loop.call_soon_threadsafe(first.loop.stop)
    second = start_server(result.onnx_path, state_dir=tmp_path)
    try:
        with Client(second.address) as client, client.session(resume=kept) as resumed:
            assert resumed.info().step == 4
            out = resumed.step(features=rows[4:])
            assert out.outputs is not None
            np.testing.assert_allclose(out.outputs, want[4:], rtol=0, atol=TOLERANCE)
    finally:
        second.stop()


def test_one_state_tensor_moves_between_servers_through_redis(gru, redis_server) -> None:
    module, result = gru
    redis_server.client.flushall()
    rows = random_sequences("features", 3, count=1, seed=11)[0]
    want = whole_sequence(module, rows, batch_first=True)
    one = start_server(result.onnx_path, session_store=redis_server.url)
    two = start_server(result.onnx_path, session_store=redis_server.url)
    try:
        with Client(one.address) as a, Client(two.address) as b:
            session_id = a.session().id
            for position in range(len(rows)):  # every step on the other server: a handoff through Redis each time
                with (a, b)[position % 2].session(resume=session_id) as handle:
                    out = handle.step(features=rows[position])
                assert out.step == position + 1
                assert out.outputs is not None
                np.testing.assert_allclose(out.outputs[0], want[position], rtol=0, atol=TOLERANCE)
    finally:
        one.stop()
        two.stop()


def test_one_state_tensor_over_the_open_inference_protocol(gru, gru_server: ServerThread) -> None:
    import tritonclient.grpc as triton

    module, _ = gru
    name = gru_server.server.config.served_model_name
    sequences = random_sequences("features", 3, count=2, seed=5)
    with triton.InferenceServerClient(gru_server.address) as client:
        outputs: list[list[np.ndarray]] = [[], []]
        for position in range(max(len(s) for s in sequences)):  # the two sequences interleaved
            for index, rows in enumerate(sequences):
                if position >= len(rows):
                    continue
                tensor = triton.InferInput("features", [1, 1, 3], "FP32")
                tensor.set_data_from_numpy(rows[position].reshape(1, 1, 3))
                reply = client.infer(name, [tensor], sequence_id=100 + index, sequence_start=position == 0,
                                     sequence_end=position == len(rows) - 1)
                outputs[index].append(reply.as_numpy("logits")[0])
    for rows, got in zip(sequences, outputs, strict=True):
        assert np.abs(np.concatenate(got) - whole_sequence(module, rows, batch_first=True)).max() <= TOLERANCE


def test_bidirectional_module_is_served_whole_only(tmp_path: Path) -> None:
    module = BidirectionalGRU().eval()
    result = export_module(module, out_dir=tmp_path / "bi")
    assert not result.spec.steppable and not any(k.startswith("step_") for k in result.parity)
    rows = random_sequences("features", 3, count=1, seed=2)[0]
    handle = start_server(result.onnx_path)
    try:
        with Client(handle.address) as client:
            got = client.infer(features=rows)
            with pytest.raises(NotSteppable):
                client.session()
    finally:
        handle.stop()
    assert np.abs(got - whole_sequence(module, rows, batch_first=True)).max() <= TOLERANCE


def test_cli_exports_a_module_from_a_file_with_its_weights(tmp_path: Path) -> None:
    module = train_few_steps(GRUForecaster(), steps=5, seed=4)
    torch.save({"model_state_dict": module.state_dict(), "epoch": 5}, tmp_path / "weights.pt")
    out = tmp_path / "exported"
    done = subprocess.run(
        [LSTMSERVE, "export", "--module", f"{OWN_MODULES}:gru_forecaster", "--weights", str(tmp_path / "weights.pt"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "GRU module exported" in done.stdout and sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    rows = random_sequences("features", 3, count=1, seed=1)[0]
    handle = start_server(out / "model.onnx")
    try:
        with Client(handle.address) as client:
            got = client.infer(features=rows)
    finally:
        handle.stop()
    assert np.abs(got - whole_sequence(module, rows, batch_first=True)).max() <= TOLERANCE  # its weights, not new ones


@pytest.mark.parametrize(
    ("factory", "extra", "needle"),
    [
        ("NoState", [], "NoState.forward does not follow forward(x, state) -> (y, state)"),
        ("LastStepOnly", [], "returned y of shape [2, 2] for x of batch 2 and time 3"),
        ("CharLSTM", [], "a token model needs its vocabulary"),
        ("GRUForecaster", ["--steps", "3"], "--steps configures training and does not apply with --module"),
        ("GRUForecaster", ["--weights", "missing.pt"], "--weights 'missing.pt' does not exist"),
        ("Nothing", [], "has no attribute 'Nothing'"),
    ],
)
def test_cli_bad_modules_get_one_line_and_no_output(tmp_path: Path, factory: str, extra: list[str], needle: str) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [LSTMSERVE, "export", "--module", f"{OWN_MODULES}:{factory}", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("lstmserve export: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_vocabulary_must_fit_the_embedding(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="the vocabulary has 3 pieces but the module's nn.Embedding has 10 rows"):
        export_module(CharLSTM(), out_dir=tmp_path / "m", vocabulary=["a", "b", "c"])
    lines = tmp_path / "vocab.txt"
    lines.write_text("".join(f"{piece}\n" for piece in VOCABULARY))
    assert export_module(CharLSTM(), out_dir=tmp_path / "m", vocabulary=lines).spec.vocabulary == VOCABULARY
