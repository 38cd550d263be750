"""Fidelity against the base in the report (``fidelity=kld``): the README's KLD and top-1
agreement cells, the full report's table of every figure with its bootstrap interval, and the
paired KLD of each quantized config against RTN on the same positions.

A row of several seeds shows the mean over its runs; its paired test pools their positions
(each seed's checkpoint against the same base on the same chunks). A vision-language model's
charts with their images (``Fidelity.images``) get a table of their own (``images=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoround_exp import fidelity
from autoround_exp.report import tables
from autoround_exp.report.runs import Row, Section
from autoround_exp.store import Store


def _part(f, images: bool):
    """The text's measurement, or the charts' (None where the run has none)."""
    return None if f is None else f.images if images else f


def _measured(row: Row, images: bool = False) -> list:
    found = [_part(r.record.fidelity, images) for r in row.runs]
    return [f for f in found if f is not None and f.measured]


def has_fidelity(section: Section) -> bool:
    return any(r.record.fidelity is not None for row in section.rows for r in row.runs)


def value(row: Row, figure: str) -> float | None:
    found = [f.value(figure) for f in _measured(row)]
    return float(np.mean(found)) if found else None


def kld_cell(row: Row) -> str:
    """The README's cell: mean KLD against the base (the base itself: 0 by definition)."""
    if row.first.record.method == "none":
        return "0"
    f = row.first.record.fidelity
    if f is None:
        return ""
    if not f.measured:
        return "not measured"
    return f"{value(row, 'kld_mean'):.4f}"


def same_top_cell(row: Row) -> str:
    if row.first.record.method == "none":
        return "100 %"
    v = value(row, "same_top")
    return "" if v is None else f"{100 * v:.1f} %"


def positions(row: Row, images: bool = False) -> list[fidelity.Positions] | None:
    """Every chunk of the row's runs, in order (None if one of them has no per-position file)."""
    out = []
    for run in row.runs:
        f = _part(run.record.fidelity, images)
        if f is None or not f.measured:
            continue
        path = Path(f.per_position) if f.per_position else None
        if (path is None or not path.is_file()) and path is not None and run.store is not None:
            path = Store(run.store).fidelity / path.name  # a store moved or copied: its own folder
        if path is None or not path.is_file():
            return None
        out += fidelity.load_positions(path)
    return out or None


def paired_vs_rtn(section: Section, row: Row, images: bool = False) -> fidelity.PairedKLD | None:
    """Mean KLD of ``row`` minus RTN's, on the same positions (None: no RTN row, or no files)."""
    rtn = tables.rtn_of(section, row)
    if rtn is None or rtn is row or len(rtn.runs) != 1 and len(rtn.runs) != len(row.runs):
        return None
    a, b = positions(rtn, images), positions(row, images)
    if a is None or b is None:
        return None
    if len(a) != len(b):  # one RTN run against several seeds: RTN repeated, one per seed
        if len(b) % len(a):
            return None
        a = a * (len(b) // len(a))
    return fidelity.paired(a, b)


def _fig(f, name: str, digits: int = 4) -> str:
    fig = f.figures.get(name)
    return f"{fig.value:.{digits}f} [{fig.low:.{digits}f}, {fig.high:.{digits}f}]" if fig else ""


def table(section: Section, alpha: float, images: bool = False) -> str | None:
    """Each quantized row against its base: the figures with 95 % intervals, and Δ mean KLD vs RTN."""
    from tabulate import tabulate

    body = []
    for row in section.rows:
        f = _part(row.first.record.fidelity, images)
        if row.first.record.method == "none" or f is None:
            continue
        if not f.measured:
            body.append([row.first.short_label, f"not measured: {f.reason}", *[""] * 5])
            continue
        t = paired_vs_rtn(section, row, images)
        vs = ""
        if t is not None:
            verdict = "noise" if t.within_noise(alpha) else ("lower" if t.delta < 0 else "higher")
            vs = f"{t.delta:+.4f} [{t.low:+.4f}, {t.high:+.4f}] p={t.p:.3g} {verdict}"
        seeds = f" ({len(row.runs)} seeds: first shown)" if len(row.runs) > 1 else ""
        body.append(
            [
                row.first.short_label + seeds,
                _fig(f, "kld_mean"),
                _fig(f, "kld_p99", 3),
                f"{100 * f.figures['same_top'].value:.1f} %",
                _fig(f, "rms_dp"),
                _fig(f, "ln_ppl_ratio"),
                vs,
            ]
        )
    if not body:
        return None
    headers = ["Config", "mean KLD", "p99 KLD", "same top", "RMS Δp", "ln(PPL ratio)", "Δ mean KLD vs RTN"]
    return tabulate(body, headers, tablefmt="pipe", disable_numparse=True)


def caption(section: Section, images: bool = False) -> str | None:
    measured = [(r.record.fidelity, _part(r.record.fidelity, images)) for row in section.rows for r in row.runs]
    measured = [(whole, f) for whole, f in measured if f is not None and f.measured]
    if not measured:
        return None
    whole, f = measured[0]
    s = whole.settings
    exact = "exact" if f.exact else f"the base's top {s.top_k} of {f.vocab} tokens and the rest as one bucket"
    where = (
        f"the text after the image of {f.chunks} charts of `{Path(s.images).name}` (one chunk each: its "
        "questions and answers in one conversation, through the chat template)"
        if images
        else f"`{Path(s.text).name}` ({f.chunks} chunks of {s.seqlen} tokens)"
    )
    return (
        f"Against the unquantized model on {f.positions} positions of {where}; KL {exact}; computed by {f.backend}. "
        "[95 % bootstrap interval over chunks]; Δ vs RTN: paired on the same positions, sign-flip test."
    )


def plot(section: Section, path: Path, write: bool = True) -> Path | None:
    """Two panels: mean KLD (95 % interval) against AutoRound iters per scheme, with RTN as a
    line; and mean KLD against the task's first metric across the section's checkpoints (does
    the cheap measure rank them as the task does?). None when nothing was measured."""
    measured = [row for row in section.rows if row.first.record.method != "none" and _measured(row)]
    if not measured:
        return None
    if not write:
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoround_exp.config import AUTOROUND_METHODS
    from autoround_exp.report import plots

    fig, (iters_ax, scatter_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    # one line per scheme and AutoRound path: the checkpoint's fidelity whichever backend scored it
    series: dict[tuple, dict[int, Row]] = {}
    for row in measured:
        c = row.first.config
        if c.method in AUTOROUND_METHODS and not c.vision_quantized:
            series.setdefault((c.scheme, c.method), {}).setdefault(c.iters, row)
    for i, ((_, method), by_iters) in enumerate(sorted(series.items())):
        rows = [by_iters[k] for k in sorted(by_iters)]
        figs = [_measured(r)[0].figures["kld_mean"] for r in rows]
        x = [r.first.config.iters for r in rows]
        err = [[f.value - f.low for f in figs], [f.high - f.value for f in figs]]
        name = f"{rows[0].first.record.scheme_preset} AutoRound" + (
            " (auto-round API)" if method == "autoround_native" else ""
        )
        iters_ax.errorbar(x, [f.value for f in figs], yerr=err, marker="o", capsize=4, color=f"C{i}", label=name)
        rtn = tables.rtn_of(section, rows[0])
        if rtn is not None and (v := value(rtn, "kld_mean")) is not None:
            iters_ax.axhline(v, color=f"C{i}", linestyle=":", label=f"{name.split(' AutoRound')[0]} RTN")
    iters_ax.set_xlabel("AutoRound iters")
    iters_ax.set_ylabel("mean KL(base ‖ quant), nats")
    iters_ax.set_title("fidelity vs AutoRound iters", fontsize=10)
    iters_ax.grid(alpha=0.3)
    if series:
        iters_ax.legend(fontsize=7)
    col = tables.columns(section)[0]
    for row in measured:
        f, v = _measured(row)[0].figures["kld_mean"], tables.row_value(row, col)
        if v is None:
            continue
        scatter_ax.errorbar(
            [f.value], [v[0]], xerr=[[f.value - f.low], [f.high - f.value]], yerr=[v[1] or 0], marker="o", capsize=3
        )
        label = f"{row.first.short_label} ({row.first.config.backend})"
        scatter_ax.annotate(label, (f.value, v[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    metric, filt = col.split(",", 1)
    scatter_ax.set_xlabel("mean KL(base ‖ quant), nats")
    scatter_ax.set_ylabel(f"{metric} ({filt})")
    scatter_ax.set_title("task accuracy vs fidelity, per checkpoint", fontsize=10)
    scatter_ax.grid(alpha=0.3)
    fig.suptitle(section.title, fontsize=10)
    return plots.save(fig, path)
