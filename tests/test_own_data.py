"""Training on the user's data: a forecaster from a CSV or .npy file, and sequence classifiers (the digits
that ship with scikit-learn, and a labelled CSV), served stepwise and compared with PyTorch."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import pytest
import torch
from conftest import ServerThread, start_server
from own_modules import step_concurrently

from lstmserve.client import Client
from lstmserve.export import ExportConfig, ExportResult, export_model, load_checkpoint

TOLERANCE = 1e-4
LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 rows of three sensors (different scales) and a text timestamp column."""
    rows = [
        [f"t{t}", 5 + 3 * math.sin(t / 6), 40 + 10 * math.cos(t / 9), 0.5 * math.sin(t / 4 + 1)]
        for t in range(300)
    ]
    return _write_csv(tmp_path_factory.mktemp("csv") / "sensors.csv", ["time", "temp", "pressure", "flow"], rows)


@pytest.fixture(scope="module")
def forecaster(sensors: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    config = ExportConfig.tiny(task="features", data=sensors, columns=("temp", "pressure", "flow"),
                               targets=("temp", "flow"), cell="gru", steps=40,
                               out=tmp_path_factory.mktemp("forecaster") / "model")
    return export_model(config, progress=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    config = ExportConfig.tiny(task="classify", steps=80, out=tmp_path_factory.mktemp("digits") / "model")
    return export_model(config, progress=False)


def _reference(result: ExportResult, rows: np.ndarray) -> np.ndarray:
    """The checkpoint's outputs on the whole sequence from zero state, [positions, out]."""
    module = load_checkpoint(result.checkpoint_path)
    with torch.no_grad():
        return module(torch.from_numpy(rows[None]), *module.initial_state(1))[0][0].numpy()


def test_csv_forecaster_records_its_columns_normalisation_and_baseline(forecaster: ExportResult) -> None:
    spec = forecaster.spec
    assert (spec.cell, spec.c, spec.input_size, spec.output_size) == ("gru", None, 3, 2)
    assert spec.input_columns == ("temp", "pressure", "flow") and spec.output_columns == ("temp", "flow")
    assert spec.normalization["input_mean"][1] == pytest.approx(40, abs=1.5)  # pressure, in its own units
    assert spec.normalization["output_std"][0] == pytest.approx(3 / math.sqrt(2), rel=0.1)  # temp
    report = json.loads(forecaster.report_path.read_text())
    assert report["data"]["output_columns"] == ["temp", "flow"] and report["data"]["val_len"] == 30
    assert report["loss"]["baseline"] == "repeat last value" and report["loss"]["baseline_val"] > 0
    assert (report["warnings"] != []) == (report["loss"]["val"] > report["loss"]["baseline_val"])
    assert max(forecaster.parity.values()) <= TOLERANCE


def test_csv_forecaster_is_served_in_the_data_units(forecaster: ExportResult, sensors: Path) -> None:
    """Clients send raw readings and get raw forecasts: the normalisation is inside the graph."""
    handle: TextIO | ServerThread  # the CSV file, then the server
    with sensors.open() as handle:
        table = np.array([[float(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]], np.float32)
    sequences = [table[start : start + length] for start, length in ((0, 9), (50, 14), (120, 6), (200, 11))]
    handle = start_server(forecaster.onnx_path, max_batch_size=8)
    try:
        served = step_concurrently(handle.address, sequences, "features")
    finally:
        handle.stop()
    for rows, got in zip(sequences, served, strict=True):
        assert np.abs(got - _reference(forecaster, rows)).max() <= TOLERANCE
    # The forecast of temp is in degrees (near the readings), not in standardised units.
    assert np.abs(served[0][:, 0] - sequences[0][:, 0]).max() < 3


def test_npy_data_and_the_warning_for_a_model_worse_than_its_baseline(tmp_path: Path) -> None:
    t = np.arange(400, dtype=np.float64)
    np.save(tmp_path / "series.npy", np.stack([np.sin(t / 5), np.cos(t / 7)], axis=1))
    done = subprocess.run(
        [LSTMSERVE, "export", "--preset", "tiny", "--task", "features", "--data", "series.npy", "--columns", "0,1",
         "--steps", "3", "--out", "barely", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "barely" / "report.json").read_text())
    assert report["loss"]["val"] > report["loss"]["baseline_val"]  # three steps cannot beat repeating the last value
    assert "WARNING: the model is worse than the repeat last value baseline" in done.stdout
    assert report["warnings"] and "worse than the repeat last value baseline" in report["warnings"][0]


def _bad(tmp_path: Path, name: str, rows: Sequence[Sequence[object]], header: list[str], *args: str) -> str:
    _write_csv(tmp_path / name, header, rows)
    done = subprocess.run([LSTMSERVE, "export", "--preset", "tiny", "--data", name, "--out", "out", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("lstmserve export: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    return done.stderr


def test_bad_data_gets_one_line_and_no_output(tmp_path: Path) -> None:
    good = [[i, math.sin(i), 1.0] for i in range(100)]
    text = _bad(tmp_path, "text.csv", [*good[:5], [5, "n/a", 1.0], *good[6:]], ["i", "x", "y"], "--task", "features")
    assert "column 'x' has a non-numeric value 'n/a' on line 7" in text
    nan = _bad(tmp_path, "nan.csv", [*good[:40], [40, "nan", 1.0]], ["i", "x", "y"], "--task", "features")
    assert "column 'x' has a non-finite value 'nan' on line 42" in nan
    empty = _bad(tmp_path, "empty.csv", [*good[:3], [3, "", 1.0]], ["i", "x", "y"], "--task", "features")
    assert "column 'x' has an empty value on line 5" in empty
    unknown = _bad(tmp_path, "cols.csv", good, ["i", "x", "y"], "--task", "features", "--columns", "x,z")
    assert "has no column 'z' (columns: i, x, y)" in unknown
    labelled = [[f"s{i // 4}", "up" if i // 4 % 3 else "sideways", i % 4, 0.5] for i in range(40)]
    label = _bad(tmp_path, "labels.csv", labelled, ["sequence", "label", "x", "y"], "--task", "classify",
                 "--classes", "up,down")
    assert "label 'sideways' of sequence 1 is not one of the --classes up, down" in label
    (tmp_path / "table.parquet").write_bytes(b"PAR1")
    done = subprocess.run([LSTMSERVE, "export", "--task", "features", "--data", "table.parquet", "--out", "out"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "Parquet needs pyarrow" in done.stderr and not (tmp_path / "out").exists()


def test_digits_classifier_beats_its_baseline_and_answers_after_every_row(digits: ExportResult) -> None:
    spec = digits.spec
    assert (spec.head, spec.classes, spec.input_size, spec.output_size) == ("classification", tuple("0123456789"), 8, 10)
    assert digits.metrics["val_accuracy"] > digits.metrics["baseline_val_accuracy"] + 0.3
    assert digits.val_loss < digits.baseline_val_loss and not digits.warnings
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[:6]  # six digits, each 8 rows of 8 pixels
    handle = start_server(digits.onnx_path, max_batch_size=8)
    try:
        served = step_concurrently(handle.address, list(images), "features")
        with Client(handle.address) as client, client.session() as session:
            info = client.model_info()
            rows = [session.step(features=row) for row in images[0]]
            whole = client.infer(features=images[0])
    finally:
        handle.stop()
    assert (info.head, info.classes, info.cell, info.state_tensors) == ("classification", tuple("0123456789"), "lstm", 2)
    for image, got in zip(images, served, strict=True):
        assert np.abs(got - _reference(digits, image)).max() <= TOLERANCE
    probabilities = np.concatenate([r.probabilities for r in rows])  # after each row: the classes so far
    assert probabilities.shape == (8, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert rows[-1].outputs is not None and rows[-1].logits is not None
    assert np.array_equal(rows[-1].outputs, rows[-1].logits)  # the old name still works
    last = np.exp(whole[-1] - whole[-1].max())
    np.testing.assert_allclose(probabilities[-1], last / last.sum(), rtol=0, atol=1e-5)


def test_classifier_from_a_labelled_csv_with_sequences_of_different_lengths(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows: list[list[str | float]] = []
    for number in range(60):
        trend = "rising" if number % 2 else "falling"
        length = int(rng.integers(3, 9))
        start = float(rng.normal())
        for t in range(length):
            value = start + (0.5 if trend == "rising" else -0.5) * t + 0.05 * float(rng.normal())
            rows.append([f"run-{number}", trend, value, float(rng.normal())])
    data = _write_csv(tmp_path / "runs.csv", ["sequence", "label", "level", "noise"], rows)
    config = ExportConfig.tiny(task="classify", data=data, cell="rnn", steps=60, out=tmp_path / "model")
    result = export_model(config, progress=False)
    assert result.spec.classes == ("falling", "rising") and result.spec.input_columns == ("level", "noise")
    report = json.loads(result.report_path.read_text())
    assert report["data"]["train_sequences"] + report["data"]["val_sequences"] == 60
    run = np.array([[float(r[2]), float(r[3])] for r in rows if r[0] == "run-1"], np.float32)
    handle = start_server(result.onnx_path)
    try:
        with Client(handle.address) as client, client.session() as session:
            outputs = np.concatenate([session.step(features=row).outputs for row in run])
    finally:
        handle.stop()
    assert np.abs(outputs - _reference(result, run)).max() <= TOLERANCE
