"""The short form of the results, as the README block and the end of a sweep show them.

Per model × eval setting: ONE table, a row per config in upstream's order (base, then per
scheme RTN, AutoRound iters=0, 200, …, auto-round-API rows beside the modifier's), each
metric once as value ± stderr with recovery vs base and Δ vs RTN; what every row shares
(backend, hardware, versions) in one caption line. Nothing here changes between two
renderings of the same runs: no MLflow run ids, wall times or dates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from autoround_exp.report import cost, fidelity, plots, stacks, tables
from autoround_exp.report.runs import Row, Run, Section

# A config scored by several backends shows the first of these; the others are in report.md.
BACKEND_PREFERENCE = ("vllm", "vllm_server", "hf")
QUANT_LIBS = ("llmcompressor", "auto-round", "compressed-tensors", "transformers", "torch")
LIB_NAMES = {"llmcompressor": "llm-compressor"}


def _backend_rank(row: Row) -> int:
    backend = row.first.config.backend
    return BACKEND_PREFERENCE.index(backend) if backend in BACKEND_PREFERENCE else len(BACKEND_PREFERENCE)


def _upstream_order(row: Row) -> tuple:
    c = row.first.config
    return (
        c.method != "none",
        c.scheme or "",
        c.vision_quantized,
        c.method != "rtn",
        c.iters if c.iters is not None else -1,
        c.method == "autoround_native",  # the auto-round API beside the modifier at the same iters
        c.method,
    )


def shown_rows(section: Section, keys: set[str] | None = None) -> list[Row]:
    """One row per recipe (scheme, method, iters, vision tower): the preferred backend's; plus
    the base and RTN rows that a shown row's recovery and Δ vs RTN were computed against (same
    backend), so every number can be recomputed from the rows on the page. With ``keys``,
    only rows of those runs."""
    candidates = [r for r in section.rows if keys is None or any(run.record.key in keys for run in r.runs)]
    by_config: dict[tuple, list[Row]] = {}
    for row in candidates:
        by_config.setdefault(row.first.config.recipe, []).append(row)
    shown = [min(rows, key=_backend_rank) for rows in by_config.values()]
    for row in list(shown):
        for ref in (tables.baseline_of(section, row), tables.rtn_of(section, row)):
            if ref is not None and any(ref is c for c in candidates) and all(ref is not s for s in shown):
                shown.append(ref)
    return sorted(shown, key=lambda r: (*_upstream_order(r), _backend_rank(r)))


@dataclass
class ColumnGroup:
    """lm-eval columns (``metric,filter``) whose cells are identical on every shown row."""

    columns: list[str]
    cells: list[tuple[str, str, str]]  # per shown row: value ± stderr, recovery, Δ vs RTN

    @property
    def header(self) -> str:
        first = self.columns[0]
        if len(self.columns) > 1 and len({c.split(",", 1)[0] for c in self.columns}) == 1:
            return first.split(",", 1)[0]  # one metric under filters that agree: the metric's name
        return tables.column_name(first)

    @property
    def note(self) -> str | None:
        if len(self.columns) == 1:
            return None
        metrics = {c.split(",", 1)[0] for c in self.columns}
        if len(metrics) == 1:
            names = [c.split(",", 1)[1] for c in self.columns]
            return f"{self.header}: {_and(names)} give identical values on every row; one column shows them."
        names = _and([tables.column_name(c) for c in self.columns])
        return f"{names} give identical values on every row; one column shows them."


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def column_groups(section: Section, rows: list[Row], thresholds: tables.Thresholds, alpha: float) -> list[ColumnGroup]:
    groups: dict[tuple, ColumnGroup] = {}
    for col in tables.columns(section):
        cells = tuple(
            (
                tables.value_cell(row, col),
                tables.recovery_cell(section, row, col, thresholds)[0],
                tables.delta_cell(section, row, col, alpha, short=True),
            )
            for row in rows
        )
        groups.setdefault(cells, ColumnGroup([], list(cells))).columns.append(col)
    return list(groups.values())


def _versions(run: Run) -> str:
    v = run.record.versions
    return ", ".join(f"{LIB_NAMES.get(k, k)} {v[k]}" for k in QUANT_LIBS if v.get(k))


def _scorer(run: Run) -> str:
    ev = run.record.eval
    p = ev.platform
    text = f"`{ev.backend}` (lm-eval `{ev.lm_eval_model}` {p.lm_eval or ''}".rstrip()
    if p.vllm:
        text += f", vLLM {p.vllm}"
    return text + ")"


def _task_version(run: Run) -> str:
    versions = run.record.eval.task_versions
    return ", ".join(f"{task} v{v:g}" if isinstance(v, float) else f"{task} v{v}" for task, v in versions.items())


# What a row was measured with: shown once in the caption when all rows agree, else as a column.
FACTS = {"Backend": _scorer, "Hardware": tables.hardware, "Task": _task_version, "Quantized with": _versions}


@dataclass
class CompactSection:
    section: Section
    rows: list[Row]
    groups: list[ColumnGroup]
    below_threshold: list[str] = field(default_factory=list)
    best_methods: list[str] = field(default_factory=list)  # tables.best_method_lines of the shown rows

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows. Each metric's recovery and Δ vs RTN follow its value column (their
        headers repeat when a task has several metrics: the order says whose they are)."""
        varying = [name for name, fn in FACTS.items() if len({fn(r.first) for r in self.rows}) > 1]
        headers = ["Config"]
        for g in self.groups:
            headers += [g.header, "recovery", "Δ vs RTN"]
        perf = any(r.first.record.perf is not None for r in self.rows)
        if perf:
            headers.append("Output tok/s (× base)")
        fid = any(r.first.record.fidelity is not None for r in self.rows)
        if fid:
            headers += ["KLD vs base", "same top"]
        headers += varying
        body = []
        for i, row in enumerate(self.rows):
            cells = [row.first.short_label]
            for g in self.groups:
                cells += list(g.cells[i])
            if perf:
                cells.append(cost.throughput_cell(self.section, row))
            if fid:
                cells += [fidelity.kld_cell(row), fidelity.same_top_cell(row)]
            for name in varying:
                if name == "Backend":
                    cells.append(row.first.config.backend + (" ⚠" if row.first.record.eval.note else ""))
                else:
                    cells.append(FACTS[name](row.first))
            body.append(cells)
        return headers, body

    def frame(self) -> pd.DataFrame:
        headers, body = self.cells()
        return pd.DataFrame(body, columns=headers)

    def row_dicts(self) -> list[dict[str, str]]:
        """The table's rows keyed by column, a metric's recovery and Δ vs RTN named after it."""
        headers, body = self.cells()
        names, metric = [], None
        for h in headers:
            if h in ("recovery", "Δ vs RTN"):
                names.append(f"{metric} {h}")
            else:
                names.append(h)
                metric = h
        return [{"Section": self.section.title, **dict(zip(names, cells, strict=True))} for cells in body]

    def table(self) -> str:
        from tabulate import tabulate

        headers, body = self.cells()
        align = ["left" if h == "Config" or h in FACTS else "right" for h in headers]
        return tabulate(body, headers, tablefmt="pipe", disable_numparse=True, colalign=align)

    def caption(self) -> str:
        first = self.rows[0].first
        shared = {name: fn(first) for name, fn in FACTS.items() if len({fn(r.first) for r in self.rows}) == 1}
        backends = sorted({r.first.config.backend for r in self.rows}, key=BACKEND_PREFERENCE.index)
        parts = []
        if "Backend" in shared:
            parts.append(f"Scored by {shared['Backend']}")
        else:
            by = {r.first.config.backend: _scorer(r.first) for r in self.rows}
            parts.append("Scored by " + "; ".join(by[b] for b in backends))
        if "Hardware" in shared:
            parts.append(f"on {shared['Hardware']}")
        text = " ".join(parts)
        if shared.get("Task"):
            text += f"; task {shared['Task']}"
        if shared.get("Quantized with") and any(r.first.record.method != "none" for r in self.rows):
            text += f"; quantized with {shared['Quantized with']}"
        configs = {r.first.config.recipe for r in self.rows}
        hidden = [
            r for r in self.section.rows if r.first.config.recipe in configs and all(r is not s for s in self.rows)
        ]
        if hidden:
            others = sorted({r.first.config.backend for r in hidden}, key=BACKEND_PREFERENCE.index)
            text += (
                f". A config scored by several backends shows one row ({', '.join(BACKEND_PREFERENCE)} first); "
                f"its {', '.join(f'`{b}`' for b in others)} scores are in the full report"
            )
        return text + "."

    def notes(self) -> list[str]:
        out = [*self.best_methods, *(g.note for g in self.groups if g.note)]
        if len({r.first.config.backend for r in self.rows}) > 1:
            out.append("Recovery and Δ vs RTN compare runs scored by the same backend.")
        caveats = {r.first.record.eval.note for r in self.rows if r.first.record.eval.note}
        caveats |= {w for r in self.rows if (w := r.first.record.eval.bos_warning)}
        return out + [f"⚠ {c}" for c in sorted(caveats)]


def compact(
    section: Section, thresholds: tables.Thresholds, alpha: float, keys: set[str] | None = None
) -> CompactSection | None:
    """The section's short table; with ``keys``, only the rows of those runs (None if none)."""
    rows = shown_rows(section, keys)
    if not rows:
        return None
    below = [
        f"{section.key.model} {r.first.short_label} ({r.first.config.backend}): {tables.column_name(c)}"
        for r in rows
        for c in tables.columns(section)
        if tables.recovery_cell(section, r, c, thresholds)[1]
    ]
    best = tables.best_method_lines(section, rows, alpha)
    return CompactSection(section, rows, column_groups(section, rows, thresholds, alpha), below, best)


def legend(thresholds: tables.Thresholds, alpha: float) -> str:
    return (
        f"Value ± lm-eval's stderr. Recovery = quantized / unquantized, ✗ below "
        f"{100 * thresholds.default:g} %. Δ vs RTN: paired test on the same documents (McNemar's exact "
        f"test for 0/1 scores); *noise* = p ≥ {alpha:g}."
    )


def lm_eval_tables(model: str, sections: list[CompactSection]) -> str:
    """lm-eval's own table per shown config, headed as upstream heads them, collapsed."""
    body = []
    for cs in sections:
        suffix = f" — {cs.section.key.task}, {cs.section.key.num_fewshot}-shot" if len(sections) > 1 else ""
        labels = [row.first.label for row in cs.rows]
        for row in cs.rows:
            # one config shown for two backends (a base beside the rows scored by each): say which
            by = f", {row.first.config.backend}" if labels.count(row.first.label) > 1 else ""
            # no blank line between heading and table, nor after it: a heading ends a table
            body.append(f"#### {row.first.label}{by}{suffix}\n{tables.lm_eval_table(row.first)}")
    n = sum(len(cs.rows) for cs in sections)
    return (
        f"<details><summary>lm-eval's table per config, {model} ({n} configs)</summary>\n\n"
        + "\n".join(body)
        + "\n\n</details>"
    )


NO_RUNS = "*No finished runs yet: run `python run.py -m …`, then `python -m autoround_exp.report`.*"
NO_FULL_RUNS = (
    "*No full-set runs yet. Runs with `eval.limit` are in `results/report.md`; "
    "`report.readme_scope=all` shows them here too.*"
)


def render_block(
    secs: list[Section],
    thresholds: tables.Thresholds,
    alpha: float,
    plots_dir: Path | None,
    link_from: Path,
    source: str,
    *,
    keys: set[str] | None = None,
    details: bool = True,
    empty: str = NO_RUNS,
) -> tuple[str, list[str]]:
    """The markdown block, and the configs below their recovery threshold."""
    parts = [
        f"<!-- generated by `python -m autoround_exp.report` from {source}; edit outside the markers only -->",
        legend(thresholds, alpha),
    ]
    below: list[str] = []
    shown = [(s, c) for s in secs if (c := compact(s, thresholds, alpha, keys)) is not None]
    if not shown:
        parts.append(empty)
    for i, (section, cs) in enumerate(shown):
        parts.append(f"### {section.title}")
        if plots_dir is not None:
            png = plots.accuracy_vs_iters(section, plots_dir / f"{section.slug}.png", write=False)
            if png is not None and png.is_file():
                rel = Path(os.path.relpath(png, link_from)).as_posix()
                parts.append(f"![accuracy vs AutoRound iters, {section.title}]({rel})")
            pareto = plots_dir / f"{section.slug}-pareto.png"
            if cost.has_perf(section) and pareto.is_file():
                rel = Path(os.path.relpath(pareto, link_from)).as_posix()
                parts.append(f"![accuracy vs throughput, {section.title}]({rel})")
        parts += [cs.table(), cs.caption(), *cs.notes()]
        parts += stacks.parts(section, alpha, plots_dir.parent if plots_dir is not None else None)
        below += cs.below_threshold
        model = section.key.model
        last_of_model = i + 1 == len(shown) or shown[i + 1][0].key.model != model
        if details and last_of_model:
            parts.append(lm_eval_tables(model, [c for s, c in shown if s.key.model == model]))
    return "\n\n".join(parts) + "\n", below


@dataclass
class ReadmeBlock:
    text: str
    below_threshold: list[str]
    out_of_scope: list[str]  # titles of the sections report.readme_scope keeps out
    over_budget: list[str]  # titles of the sections past report.readme_max_lines

    @property
    def left_out(self) -> list[str]:
        return self.out_of_scope + self.over_budget


def readme_block(
    secs: list[Section],
    thresholds: tables.Thresholds,
    alpha: float,
    plots_dir: Path | None,
    link_from: Path,
    source: str,
    *,
    scope: str = "full",
    max_lines: int | None = None,
) -> ReadmeBlock:
    """The README's block: the sections in ``scope`` ("full": evaluations without a limit;
    "all"), in order, as many as fit in ``max_lines`` (the first always does); the others are
    named in ``left_out`` and stay in the full report."""
    in_scope = [s for s in secs if scope == "all" or s.key.limit is None]
    out_of_scope = [s.title for s in secs if s not in in_scope]
    empty = NO_FULL_RUNS if out_of_scope and not in_scope else NO_RUNS

    def render(chosen: list[Section]) -> tuple[str, list[str]]:
        return render_block(chosen, thresholds, alpha, plots_dir, link_from, source, empty=empty)

    chosen: list[Section] = []
    over_budget = []
    for section in in_scope:
        text, _ = render([*chosen, section])
        if chosen and max_lines is not None and len(text.splitlines()) > max_lines:
            over_budget.append(section.title)
            continue
        chosen.append(section)
    text, below = render(chosen)
    return ReadmeBlock(text, below, out_of_scope, over_budget)
