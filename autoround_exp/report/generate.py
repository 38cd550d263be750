"""Load runs, render the report, write it where it goes; shared by the CLI and the sweep callback."""

from __future__ import annotations

import sys
from pathlib import Path

from autoround_exp.config import ReportConfig
from autoround_exp.fsutil import write_atomic
from autoround_exp.report import card, compact, readme, runs, stacks, tables
from autoround_exp.report.render import render
from autoround_exp.store import Store


def generate(
    cfg: ReportConfig,
    results: Path,
    *,
    mlflow_uri: str | None = None,
    experiment: str = "autoround-exp",
    check: bool = False,
    fail_below_threshold: bool = False,
    log_to: str | None = None,
    run_id: str | None = None,
) -> int:
    """0 on success; 1 if ``check`` finds the README stale; 3 if a config is below threshold
    and ``fail_below_threshold``; 4 if a config regressed between stacks and
    ``cfg.fail_on_regression``; 2 on a README without markers."""
    loaded = runs.from_mlflow(mlflow_uri, experiment) if mlflow_uri else runs.from_store(results)
    source = f"MLflow ({mlflow_uri})" if mlflow_uri else f"`{results.as_posix()}/`"
    thresholds = tables.Thresholds(cfg.recovery_threshold, dict(cfg.recovery_thresholds))
    readme_path = Path(cfg.readme) if cfg.readme else None
    status = 0

    plots = results / "plots"
    # The full report next to the results, then the README's short block (image links
    # relative to the README); check mode writes nothing and only compares the README.
    report = render(loaded, thresholds, cfg.alpha, plots, results, source, write_plots=not check)
    if not check:
        write_atomic(results / "report.md", report.markdown)
        print(f"report: {len(loaded)} runs -> {results / 'report.md'}, {len(report.plots)} plot(s)")
        written, unchanged, gone = card.write_cards(loaded)
        if written or unchanged or gone:
            gone_text = f"; {gone} checkpoint folder(s) no longer here" if gone else ""
            counts = f"{written} written, {unchanged} unchanged{gone_text}"
            print(f"report: model cards (README.md in each checkpoint folder): {counts}")
        if log_to:
            from autoround_exp.report.mlflow_log import log_report

            log_report(log_to, experiment, results / "report.md", report.plots, run_id=run_id)

    if readme_path is not None and readme_path.is_file():
        block = compact.readme_block(
            runs.sections(loaded),
            thresholds,
            cfg.alpha,
            plots,
            readme_path.parent,
            source,
            scope=cfg.readme_scope,
            max_lines=cfg.readme_max_lines,
        )
        if block.left_out and not check:
            print(readme_scope_line(block, cfg, results / "report.md"))
        try:
            changed = readme.update(readme_path, block.text, check=check)
        except readme.MarkerError as e:
            print(f"autoround-exp report: {readme_path}: {e}", file=sys.stderr)
            return 2
        if check:
            print(
                f"report: {readme_path} is {'STALE: run python -m autoround_exp.report' if changed else 'up to date'}"
            )
            status = 1 if changed else 0
        else:
            print(f"report: {readme_path} {'updated' if changed else 'unchanged'}")
    elif readme_path is not None:
        print(f"report: no {readme_path} here; the report is in {results / 'report.md'}")
        if check:
            return 2

    for line in report.below_threshold:
        print(f"report: below recovery threshold: {line}")
    if fail_below_threshold and report.below_threshold:
        status = status or 3
    regressed = stacks.regressions(runs.sections(loaded), [] if mlflow_uri else Store(results).failures(), cfg.alpha)
    for line in regressed:
        print(f"report: stack regression: {line}")
    if cfg.fail_on_regression and regressed:
        status = status or 4
    return status


def readme_scope_line(block: compact.ReadmeBlock, cfg: ReportConfig, report: Path) -> str:
    """One line on what the README block leaves to the full report, and why."""
    why = []
    if block.out_of_scope:
        why.append(f"{len(block.out_of_scope)} with eval.limit (report.readme_scope=full)")
    if block.over_budget:
        why.append(f"{len(block.over_budget)} past its {cfg.readme_max_lines}-line budget (report.readme_max_lines)")
    n = len(block.left_out)
    return f"report: the README shows the headline sections; {n} more only in {report}: {', '.join(why)}"


def stack_regressions(results: Path, alpha: float) -> list[str]:
    """What moved between stacks beyond noise, or failed in one stack only (the sweep's end table)."""
    return stacks.regressions(runs.sections(runs.from_store(results)), Store(results).failures(), alpha)
