"""Benchmark outputs: JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured point: a series at one concurrency level (or batch size, for in-process series)."""

    series: str
    level: int
    steps_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_batch: float | None = None
    server_cpu_pct: float | None = None
    server_rss_mb: float | None = None
    errors: int = 0
    load_cpu_pct: float | None = None  # the load generator's processes, over the measured window
    rounds: int = 1  # with several rounds: this is the median round's row, and the range covers them all
    steps_per_s_min: float | None = None
    steps_per_s_max: float | None = None


@dataclass
class BenchReport:
    """Everything one `lstmserve bench` run measured, with how it was run."""

    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)  # with several rounds, each point's median round
    checks: dict[str, Any] = field(default_factory=dict)
    rounds: list[list[Row]] = field(default_factory=list)  # every round's own rows
    check_rounds: list[list[dict[str, Any]]] = field(default_factory=list)  # every round's checks, as numbers
    memory: dict[str, Any] | None = None


def middle_index(count: int, *, upper: bool = False) -> int:
    """Where the median is among `count` sorted values: the middle one, or for an even count the lower
    of the two middle ones (the upper with `upper`)."""
    return count // 2 if upper else (count - 1) // 2


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def markdown_table(report: BenchReport) -> str:
    """The rows as a Markdown table (throughput in the run's unit: steps/s, requests/s or tokens/s); with several
    rounds, a column gives each point's range of throughput."""
    ranges = any(row.rounds > 1 for row in report.rows)
    unit = panel_labels(report)[1]
    lines = [
        f"| series | concurrency | {unit} |" + (" range over rounds |" if ranges else "")
        + " p50 ms | p95 ms | p99 ms | mean batch | server CPU % | server RSS MB | load CPU % | errors |",
        "| --- | ---: | ---: |" + (" ---: |" if ranges else "") + " ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report.rows:
        spread = f" {_fmt(row.steps_per_s_min, 0)} to {_fmt(row.steps_per_s_max, 0)} |" if row.rounds > 1 else " |"
        lines.append(
            f"| {row.series} | {row.level} | {_fmt(row.steps_per_s, 0)} |{spread if ranges else ''} {_fmt(row.p50_ms, 3)} "
            f"| {_fmt(row.p95_ms, 3)} | {_fmt(row.p99_ms, 3)} | {_fmt(row.mean_batch, 1)} | {_fmt(row.server_cpu_pct, 0)} "
            f"| {_fmt(row.server_rss_mb, 0)} | {_fmt(row.load_cpu_pct, 0)} | {row.errors} |"
        )
    return "\n".join(lines) + "\n"


# What the two panels of the plot show, by --mode: (throughput title, its unit, latency title).
PANEL_LABELS = {
    "step": ("throughput", "steps/s", "p99 step latency"),
    "prompt": ("throughput", "requests/s", "p99 request latency"),
    "generate": ("generated tokens per second", "tokens/s", "p99 time between responses"),
}


def panel_labels(report: BenchReport) -> tuple[str, str, str]:
    """(throughput title, its unit, latency title) for the run's --mode."""
    return PANEL_LABELS.get(str(report.settings.get("mode", "step")), PANEL_LABELS["step"])


def plot(report: BenchReport, path: Path) -> None:
    """Throughput and p99 latency against concurrency, every series on one figure, labelled for the run's mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, series in enumerate(dict.fromkeys(row.series for row in report.rows)):
        rows = [row for row in report.rows if row.series == series]
        levels = [row.level for row in rows]
        colour = f"C{index}"  # the same colour for a series in both panels
        throughput.plot(levels, [row.steps_per_s for row in rows], marker="o", label=series, color=colour)
        if any(row.rounds > 1 for row in rows):  # the range over rounds, around the median round
            low = [row.steps_per_s if row.steps_per_s_min is None else row.steps_per_s_min for row in rows]
            high = [row.steps_per_s if row.steps_per_s_max is None else row.steps_per_s_max for row in rows]
            throughput.fill_between(levels, low, high, color=colour, alpha=0.15, linewidth=0)
        if any(row.p99_ms is not None for row in rows):
            latency.plot(levels, [row.p99_ms for row in rows], marker="o", label=series, color=colour)
    throughput_title, throughput_unit, latency_title = panel_labels(report)
    for axis, title, unit in ((throughput, throughput_title, throughput_unit), (latency, latency_title, "ms")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent sessions (batch size for in-process series)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(report.command, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(report: BenchReport, out_dir: Path) -> dict[str, Path]:
    """Writes results.json, results.md and results.png into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(asdict(report), indent=2))
    checks = "".join(f"- {name}: {value}\n" for name, value in report.checks.items())
    memory = "".join(f"- {name}: {value}\n" for name, value in (report.memory or {}).items())
    paths["markdown"].write_text(
        f"Command: `{report.command}`\n\nMachine: {report.machine}\n\n{markdown_table(report) if report.rows else ''}\n"
        + (f"Idle-session memory:\n\n{memory}\n" if memory else "")
        + (f"Checks against the targets:\n\n{checks}" if checks else "")
    )
    if report.rows:
        plot(report, paths["plot"])
    return paths
