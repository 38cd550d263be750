"""Accuracy against serving cost: the serving-benchmark table of a section and the Pareto plot
(accuracy with its stderr against output tokens/s), read from the records' ``perf``.

Speed-up is against the unquantized run of the same backend on the same hardware only; a run
that vLLM did not serve says "not measured" and why, never a number from another backend.
"""

from __future__ import annotations

from pathlib import Path

from autoround_exp.config import AUTOROUND_METHODS
from autoround_exp.report import plots, tables
from autoround_exp.report.runs import Row, Section

THROUGHPUT = "output_tokens_per_s"


def _perf(row: Row):
    return row.first.record.perf


def has_perf(section: Section) -> bool:
    return any(_perf(r) is not None for r in section.rows)


def speedup(section: Section, row: Row) -> float | None:
    """Output tokens/s over the unquantized run's, same backend and hardware; None otherwise."""
    p = _perf(row)
    base = tables.baseline_of(section, row)
    if p is None or not p.measured or base is None or base is row or _perf(base) is None:
        return None
    b = _perf(base)
    same = base.first.config.backend == row.first.config.backend and tables.hardware(base.first) == tables.hardware(
        row.first
    )
    if not b.measured or not same or not b.value(THROUGHPUT) or p.value(THROUGHPUT) is None:
        return None
    return p.value(THROUGHPUT) / b.value(THROUGHPUT)


def throughput_cell(section: Section, row: Row) -> str:
    """The short cell (README, console): tok/s and × base, or "not measured"."""
    p = _perf(row)
    if p is None:
        return ""
    if not p.measured:
        return "not measured"
    s = speedup(section, row)
    return f"{p.value(THROUGHPUT):.0f}" + (f" ({s:.2f}×)" if s is not None else "")


def _m(p, name: str, digits: int = 1) -> str:
    m = p.metrics.get(name)
    return f"{m.median:.{digits}f} ± {m.spread / 2:.{digits}f}" if m else ""


def table(section: Section) -> str | None:
    """Every row with a serving measurement: median ± half the spread of the repeats."""
    from tabulate import tabulate

    rows = [r for r in section.rows if _perf(r) is not None]
    if not rows:
        return None
    head = ["Config", "Backend", "Output tok/s", "Speed-up vs base", "Requests/s", "TTFT p50 / p99 (ms)"]
    head += ["TPOT p50 / p99 (ms)", "Peak memory", "Workload"]
    body = []
    for row in rows:
        p, label = _perf(row), row.first.short_label
        if not p.measured:
            body.append([label, row.first.config.backend, f"not measured: {p.reason}", "", "", "", "", "", ""])
            continue
        s = speedup(section, row)
        body.append(
            [
                label,
                row.first.config.backend,
                _m(p, THROUGHPUT),
                f"{s:.2f}×" if s is not None else "",
                _m(p, "requests_per_s", 2),
                f"{_m(p, 'ttft_p50_ms')} / {_m(p, 'ttft_p99_ms')}",
                f"{_m(p, 'tpot_p50_ms', 2)} / {_m(p, 'tpot_p99_ms', 2)}",
                f"{p.peak_memory_gb:.2f} GB ({p.memory_kind})" if p.peak_memory_gb is not None else "",
                f"{p.settings.num_prompts} × {p.input_len}+{p.output_len} tokens, {p.settings.repeats} repeats",
            ]
        )
    return tabulate(body, head, tablefmt="pipe", disable_numparse=True)


def pareto_plot(section: Section, path: Path, write: bool = True) -> Path | None:
    """Accuracy (first metric, ± stderr) against output tokens/s (± half the spread), a point per
    measured config, labelled; None if nothing was measured."""
    col = tables.columns(section)[0]
    points = []
    for row in section.rows:
        p, v = _perf(row), tables.row_value(row, col)
        if p is not None and p.measured and p.value(THROUGHPUT) is not None and v is not None:
            points.append((row, p, v))
    if not points:
        return None
    if not write:
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, p, (value, stderr, _) in points:
        method = row.first.record.method
        color = "black" if method == "none" else ("C0" if method in AUTOROUND_METHODS else "C1")
        x, xerr = p.value(THROUGHPUT), p.metrics[THROUGHPUT].spread / 2
        ax.errorbar([x], [value], xerr=[xerr], yerr=[stderr or 0], marker="o", capsize=3, color=color)
        ax.annotate(
            f"{row.first.short_label} ({row.first.config.backend})",
            (x, value),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    metric, filt = col.split(",", 1)
    ax.set_xlabel("output tokens/s (vllm bench serve, median of repeats)")
    ax.set_ylabel(f"{metric} ({filt})")
    model, _, setting = section.title.partition(" — ")
    ax.set_title(f"accuracy vs throughput, {model}\n{setting}", fontsize=8)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)
