"""Markdown for one section: lm-eval's own table per config, the comparison table, the
paired tests, and published numbers beside ours."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd

from autoround_exp.config import AUTOROUND_METHODS, MODIFIER_METHODS
from autoround_exp.report import stats
from autoround_exp.report.runs import Row, Run, Section


@dataclass(frozen=True)
class Thresholds:
    default: float = 0.95
    per_metric: dict | None = None  # {"exact_match/strict-match": 0.9}

    def of(self, column: str) -> float:
        return (self.per_metric or {}).get(column.replace(",", "/"), self.default)


def lm_eval_table(run: Run) -> str:
    """lm-eval's own table (Tasks | Version | Filter | n-shot | Metric | Value | ± Stderr)."""
    from lm_eval.utils import make_table

    return make_table(run.record.lm_eval).strip()


def columns(section: Section) -> list[str]:
    """The section's metrics as lm-eval names them (``exact_match,strict-match``), in table order."""
    seen: dict[str, None] = {}
    for row in section.rows:
        for m in row.first.record.table:
            seen.setdefault(m.column, None)
    return list(seen)


def value(run: Run, column: str) -> tuple[float, float | None] | None:
    metric, filt = column.split(",", 1)
    m = run.record.metric(column)
    return (m.value, m.stderr) if m is not None else None


def row_value(row: Row, column: str) -> tuple[float, float | None, int] | None:
    """(value, spread, seeds): lm-eval's stderr for one seed, the std across seeds for several."""
    values = [v for v in (value(r, column) for r in row.runs) if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return values[0][0], values[0][1], 1
    agg = stats.across_seeds([v for v, _ in values])
    return agg.mean, agg.std, agg.n


def mean(row: Row, column: str) -> float | None:
    v = row_value(row, column)
    return v[0] if v else None


def baseline_of(section: Section, row: Row) -> Row | None:
    """The unquantized row scored by the same backend (else any unquantized row)."""
    bases = [r for r in section.rows if r.first.record.method == "none"]
    c = row.first.config
    same_stack = [r for r in bases if r.first.config.backend == c.backend and r.first.config.stack == c.stack]
    same = [r for r in bases if r.first.config.backend == c.backend]
    return (same_stack or same or bases or [None])[0]


def rtn_of(section: Section, row: Row) -> Row | None:
    c = row.first.config
    return next((r for r in section.rows if r.first.config == c._replace(method="rtn", iters=None)), None)


def _samples(row: Row, column: str) -> list[dict] | None:
    """Per-document scores of each of the row's runs (seeds); None if one of them has none."""
    task = row.first.record.eval.task
    out = [(r.samples or {}).get(task) for r in row.runs]
    return out if all(s and column in s for s in out) else None


def compare(a: Row, b: Row, column: str, alpha: float) -> stats.Paired | None:
    """Paired test of b against a on the documents both scored. With one run each, McNemar's
    exact test for 0/1 scores; with several seeds on either side, every seed counts: each
    document's score is its mean over the row's seeds, and the paired test runs on those."""
    sa, sb = _samples(a, column), _samples(b, column)
    if sa is None or sb is None:
        return None
    if len(sa) == len(sb) == 1:
        xs, ys = stats.align(sa[0], sb[0], column)
        return stats.paired(xs, ys, alpha) if len(xs) >= 2 else None
    xs, ys = stats.align_seeds(sa, sb, column)
    if len(xs) < 2:
        return None
    t = stats.paired(xs, ys, alpha)
    seeds = f"{len(sa)} vs {len(sb)} seeds" if len(sa) != len(sb) else f"{len(sa)} seeds"
    return replace(t, test=f"{t.test} on per-document means over {seeds}")


def comparisons(section: Section) -> list[tuple[str, Row, Row]]:
    """What the tables compare: each quantized config vs base, AutoRound vs RTN, iters vs iters."""
    out = []
    for row in section.rows:
        r = row.first.record
        if r.method == "none":
            continue
        base = baseline_of(section, row)
        if base is not None:
            out.append(("quantized vs base", base, row))
        if r.method != "rtn" and (rtn := rtn_of(section, row)) is not None:
            out.append(("vs RTN", rtn, row))
    # GPTQ and AWQ against AutoRound (the modifier) at the section's largest iters, same scheme and backend
    for row in section.rows:
        c = row.first.config
        if c.method in MODIFIER_METHODS:
            rivals = [
                r
                for r in section.rows
                if r.first.config._replace(iters=None) == c._replace(method="autoround", iters=None)
                and not r.first.config.vision_quantized
            ]
            if rivals:
                out.append(("vs AutoRound", max(rivals, key=lambda r: r.first.config.iters or 0), row))
    for method in AUTOROUND_METHODS:
        tuned = [row for row in section.rows if row.first.record.method == method]
        for a, b in zip(tuned, tuned[1:], strict=False):
            ca, cb = a.first.config, b.first.config
            if ca._replace(iters=None) == cb._replace(iters=None) and ca.iters != cb.iters:
                out.append(("iters vs iters", a, b))
    out += stack_pairs(section)
    for row in section.rows:
        c = row.first.config
        # the same scheme and iters through llm-compressor's modifier and auto-round's own API
        if c.method == "autoround_native":
            modifier = next((r for r in section.rows if r.first.config == c._replace(method="autoround")), None)
            if modifier is not None:
                out.append(("modifier vs auto-round API", modifier, row))
        # a recipe that quantizes the vision tower against upstream's, which leaves it in bf16
        if c.vision_quantized:
            upstream = next((r for r in section.rows if r.first.config == c._replace(vision_quantized=False)), None)
            if upstream is not None:
                out.append(("vision tower quantized vs not", upstream, row))
    return out


def stack_pairs(section: Section) -> list[tuple[str, Row, Row]]:
    """Each config of a stack other than the reference against the same config in the reference
    stack: ``pinned`` where the section has it, else the first by name."""
    stacks = sorted({row.first.config.stack for row in section.rows}, key=lambda s: (s != "pinned", s))
    if len(stacks) < 2:
        return []
    ref = stacks[0]
    by_config = {row.first.config: row for row in section.rows}
    out = []
    for row in section.rows:
        c = row.first.config
        if c.stack != ref and (a := by_config.get(c._replace(stack=ref))) is not None:
            out.append(("stack vs stack", a, row))
    return out


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def signed(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def value_cell(row: Row, column: str) -> str:
    v = row_value(row, column)
    if v is None:
        return ""
    val, spread, seeds = v
    if seeds > 1:
        return f"{val:.4f} ± {fmt(spread)} (mean ± std, {seeds} seeds)"
    return f"{val:.4f} ± {fmt(spread)}" if spread is not None else f"{val:.4f}"


def hardware(run: Run) -> str:
    p = run.record.eval.platform
    if p.cuda:
        return f"{p.device_name} (cc {p.compute_capability})"
    return "CPU" + (f" ({'/'.join(p.cpu_isa)})" if p.cpu_isa else "")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def column_name(column: str) -> str:
    """How a table heads an lm-eval column: its filter, or its metric where there is no filter."""
    metric, filt = column.split(",", 1)
    return metric if filt == "none" else filt


def recovery_cell(section: Section, row: Row, column: str, thresholds: Thresholds) -> tuple[str, bool]:
    """Recovery vs the unquantized run of the same backend, and whether it is below threshold."""
    base = baseline_of(section, row)
    if row.first.record.method == "none" or base is None or not mean(base, column):
        return "", False
    mine = mean(row, column)
    if mine is None:
        return "", False
    recovery = mine / mean(base, column)
    below = recovery < thresholds.of(column)
    return f"{100 * recovery:.1f} %" + (" ✗" if below else ""), below


def short_p(t: stats.Paired) -> str:
    """``p<0.001``, ``p=0.012``, or ``noise`` (p >= alpha)."""
    if t.within_noise:
        return "noise"
    return "p<0.001" if t.p < 0.001 else f"p={t.p:.2g}"


def delta_cell(section: Section, row: Row, column: str, alpha: float, short: bool = False) -> str:
    """Δ vs the RTN run of the same scheme and backend, with its paired test."""
    rtn = rtn_of(section, row)
    if row.first.record.method in ("none", "rtn") or rtn is None:
        return ""
    digits = 3 if short else 4
    t = compare(rtn, row, column, alpha)
    if t is not None:
        if short:
            return f"{signed(t.delta, digits)} ({short_p(t)})"
        return f"{signed(t.delta)} (p={t.p:.2g}{', noise' if t.within_noise else ''})"
    mine, theirs = mean(row, column), mean(rtn, column)
    if mine is None or theirs is None:
        return ""
    return f"{signed(mine - theirs, digits)} (no samples)"


def best_method_lines(section: Section, rows: list[Row], alpha: float) -> list[str]:
    """One line per scheme (and backend) where two or more methods ran: the best method on the
    section's first metric (each method at its best iters) and whether it is told apart from
    the next by the paired test (p < alpha), or not."""
    column = columns(section)[0]
    backends = {r.first.config.backend for r in rows}
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        c = row.first.config
        if c.method == "none" or c.vision_quantized or mean(row, column) is None:
            continue
        best = groups.setdefault((c.scheme, c.backend), {})
        if c.method not in best or mean(row, column) > mean(best[c.method], column):
            best[c.method] = row
    lines = []
    for (_, backend), by_method in groups.items():
        if len(by_method) < 2:
            continue
        first, second = sorted(by_method.values(), key=lambda r: mean(r, column), reverse=True)[:2]
        scheme = first.first.record.scheme_preset
        where = f" ({backend})" if len(backends) > 1 else ""
        head = (
            f"Best method for {scheme}{where} on {column_name(column)}: {first.first.short_label} "
            f"({mean(first, column):.4f}); next {second.first.short_label} ({mean(second, column):.4f})"
        )
        t = compare(second, first, column, alpha)
        if t is None:
            lines.append(f"{head}: not tested (no per-document scores).")
        elif t.within_noise:
            lines.append(f"{head}: not distinguishable (p={t.p:.2g} ≥ {alpha:g}, {t.test}).")
        else:
            lines.append(f"{head}: distinguishable (Δ {signed(t.delta)}, p={t.p:.2g}, {t.test}).")
    return lines


# how the quantize stage measured its peak (record.Quantization.memory_kind)
MEMORY_KINDS = {"cuda_max_allocated": "GPU", "cpu_max_rss": "RSS"}


def comparison_frame(section: Section, thresholds: Thresholds, alpha: float) -> tuple[pd.DataFrame, list[str]]:
    """Rows = configs; per metric value ± stderr, recovery vs base, Δ vs RTN. Also returns
    the configs below their recovery threshold."""
    cols = columns(section)
    rows, below = [], []
    for row in section.rows:
        run = row.first
        rec = run.record
        # the backend beside the config: what tells two rows of one config apart
        out = {"Config": run.short_label, "Backend": rec.eval.backend + (" ⚠" if rec.eval.note else "")}
        for col in cols:
            name = column_name(col)
            out[name] = value_cell(row, col)
            rec_cell, is_below = recovery_cell(section, row, col, thresholds)
            if is_below:
                below.append(f"{section.key.model} {run.short_label} ({run.config.backend}): {name} {rec_cell}")
            out[f"{name} recovery"] = rec_cell
            out[f"{name} Δ vs RTN"] = delta_cell(section, row, col, alpha)
        q = rec.quantization
        out["Quant time"] = duration(q.oneshot_seconds) if q else ""
        memory = f"{q.peak_memory_gb:.2f} GB ({MEMORY_KINDS.get(q.memory_kind, q.memory_kind)})" if q else ""
        out["Quant peak memory"] = memory
        out["Checkpoint"] = f"{q.size_mb:.1f} MB" if q else ""
        v = q.verification if q else None
        out["Quantized layers"] = f"{v.quantized}/{v.linear_layers}" if v else ""
        codes = v.changed_codes if v else None
        out["Changed codes"] = f"{100 * codes.fraction:.2f} %" if codes and codes.measured else ""
        out["Hardware"] = hardware(run)
        out["MLflow run"] = ", ".join(f"`{r.record.mlflow_run_id}`" for r in row.runs if r.record.mlflow_run_id)
        rows.append(out)
    return pd.DataFrame(rows), below


def comparison_table(section: Section, thresholds: Thresholds, alpha: float) -> tuple[str, list[str]]:
    df, below = comparison_frame(section, thresholds, alpha)
    return df.to_markdown(index=False, disable_numparse=True), below


def paired_table(section: Section, alpha: float) -> str | None:
    """One row per comparison; metrics whose paired results agree exactly share the row."""
    rows = []
    for kind, a, b in comparisons(section):
        merged: dict[tuple, list[str]] = {}
        for col in columns(section):
            t = compare(a, b, col, alpha)
            if t is not None:
                merged.setdefault((t.n, t.delta, t.low, t.high, t.p, t.test), []).append(col)
        for (n, delta, low, high, p, test), cols in merged.items():
            within = p >= alpha
            rows.append(
                {
                    "Comparison": f"{b.first.short_label} vs {a.first.short_label} ({b.first.config.backend})",
                    "Kind": kind,
                    "Metric": metric_names(cols),
                    "Δ": signed(delta),
                    f"{100 * (1 - alpha):.0f} % CI": f"[{signed(low)}, {signed(high)}]",
                    "p": f"{p:.3g} ({test})",
                    "n": str(n),
                    "Verdict": "within noise" if within else ("better" if delta > 0 else "worse"),
                }
            )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else None


def metric_names(cols: list[str]) -> str:
    """``exact_match (strict-match = flexible-extract)`` for one metric under several filters."""
    metrics = {c.split(",", 1)[0] for c in cols}
    if len(cols) > 1 and len(metrics) == 1:
        return f"{cols[0].split(',', 1)[0]} ({' = '.join(c.split(',', 1)[1] for c in cols)})"
    return " = ".join(c.replace(",", " ").replace(" none", "") for c in cols)


def published_table(section: Section, published: dict) -> str | None:
    """Ours beside upstream's published numbers for the same config; gap in stderr units."""
    rows = []
    for row in section.rows:
        rec = row.first.record
        for entry in published["entries"]:
            if not matches(entry, section, rec):
                continue
            for col, pub in entry["values"].items():
                ours = row_value(row, col)
                if ours is None:
                    continue
                pub_se = math.sqrt(pub * (1 - pub) / (entry["n"] - 1))
                se = math.sqrt((ours[1] or 0) ** 2 + pub_se**2)
                rows.append(
                    {
                        "Config": row.first.short_label,
                        "Metric": col.replace(",", " "),
                        "Ours": value_cell(row, col),
                        "Published": f"{pub:.4f} ± {pub_se:.4f}",
                        "Gap": f"{signed(ours[0] - pub)} ({(ours[0] - pub) / se:+.1f} σ)".replace("-", "−"),
                    }
                )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else None


def matches(entry: dict, section: Section, rec: dict) -> bool:
    k = section.key
    if (entry["model"], entry["task"], entry["num_fewshot"]) != (k.path, k.task, k.num_fewshot) or k.limit:
        return False
    return entry["method"] == rec.method and entry.get("scheme") == rec.scheme and entry.get("iters") == rec.iters
