"""`lstmserve export` on the command line: happy path, options, and bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstmserve.export import cli as export_cli
from lstmserve.export import read_spec

FILES = ["loss.png", "model.onnx", "model.pt", "report.json"]


def _run(argv: list[str]) -> int:
    """Runs `export` through a parser holding only this part's subcommand."""
    parser = argparse.ArgumentParser(prog="lstmserve")
    export_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.run(args)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and one thread is immune to CPU contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_entry_point_happy_path_writes_all_four_files(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "lstmserve.cli", "export", "--preset", "tiny", "--steps", "10", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert "val loss" in proc.stdout and "baseline" in proc.stdout and "parity" in proc.stdout
    assert str(out / "model.onnx") in proc.stdout
    assert "training" in proc.stderr  # the progress bar
    assert _leftovers(tmp_path) == ["m"]


def test_explicit_options_override_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    code = _run(["--preset", "tiny", "--steps", "7", "--hidden-size", "12", "--proj-size", "5", "--num-layers", "2",
                 "--no-bias", "--batch-first", "--dropout", "0.1", "--input-size", "6", "--seq-len", "9",
                 "--batch-size", "3", "--lr", "0.02", "--seed", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    spec = read_spec(out / "model.onnx")
    assert (spec.hidden_size, spec.proj_size, spec.num_layers, spec.bias, spec.batch_first, spec.input_size) == (
        12, 5, 2, False, True, 6)
    assert spec.dropout == pytest.approx(0.1)
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["steps"], config["seq_len"], config["batch_size"], config["lr"], config["seed"]) == (7, 9, 3, 0.02, 3)
    assert "training" not in capsys.readouterr().err


def test_features_task_and_bidirectional(tmp_path: Path) -> None:
    out = tmp_path / "f"
    assert _run(["--preset", "tiny", "--steps", "5", "--task", "features", "--input-size", "5", "--bidirectional",
                 "--out", str(out), "--no-progress"]) == 0
    spec = read_spec(out / "model.onnx")
    assert spec.kind == "features" and spec.input_size == 5 and spec.bidirectional and not spec.steppable


def test_corpus_option(tmp_path: Path) -> None:
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 30, encoding="utf-8")
    out = tmp_path / "m"
    assert _run(["--preset", "tiny", "--steps", "5", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 0
    assert "".join(read_spec(out / "model.onnx").vocabulary) == "\n abcdefghijklmnopqrstuvwxyz"
    assert json.loads((out / "report.json").read_text())["data"]["source"] == str(corpus)


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("abc")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (["--corpus", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--corpus", str(empty)], "empty.txt"),
        (["--corpus", str(short)], "short.txt"),
        (["--proj-size", "16"], "--proj-size 16"),
        (["--hidden-size", "8", "--proj-size", "9"], "--proj-size 9"),
        (["--hidden-size", "0"], "got 0"),
        (["--num-layers", "-2"], "got -2"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "-1"], "--seq-len"),
        (["--input-size", "0"], "--input-size"),
        (["--dropout", "1"], "got 1.0"),
        (["--dropout", "-0.5"], "got -0.5"),
        (["--out", str(a_file)], str(a_file)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_input_exits_2_with_one_line_and_no_output(
    case: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, needle = _bad_cases(tmp_path)[case]
    before = _leftovers(tmp_path / "out")
    out = tmp_path / "out" / "model"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    code = _run(["--preset", "tiny", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and err.startswith("lstmserve export: error: ") and err.count("\n") == 1
    assert not out.exists() and _leftovers(tmp_path / "out") == before


def test_bad_input_through_the_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "lstmserve.cli", "export", "--preset", "tiny", "--dropout", "1.5", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--dropout" in proc.stderr and "1.5" in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []
