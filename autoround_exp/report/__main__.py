"""python -m autoround_exp.report [--check] [--fail-below-threshold] [--mlflow URI] ...

Reads finished runs (``results/`` by default, or MLflow) and writes ``results/report.md``,
plots in ``results/plots/`` and the README's results block. Never runs anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from autoround_exp.config import ConfigError, ReportConfig
from autoround_exp.config_checks import check_report

CONF = Path(__file__).resolve().parents[2] / "conf" / "report" / "default.yaml"


def defaults() -> ReportConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.load(CONF)))


def parse(argv: list[str] | None) -> argparse.Namespace:
    d = defaults()
    p = argparse.ArgumentParser(prog="python -m autoround_exp.report", description=__doc__.split("\n\n")[1])
    p.add_argument("--results", default="results", help="results folder run.py wrote (default: results)")
    p.add_argument("--mlflow", metavar="URI", help="read runs from this MLflow tracking URI instead of --results")
    p.add_argument("--experiment", default="autoround-exp", help="MLflow experiment name (with --mlflow)")
    p.add_argument("--readme", default=d.readme, help="README to regenerate between its markers ('' for none)")
    p.add_argument(
        "--readme-scope",
        choices=("full", "all"),
        default=d.readme_scope,
        help=f"README block: full evaluations only, or every section (default {d.readme_scope}); "
        "report.md always has every run",
    )
    p.add_argument(
        "--readme-max-lines",
        type=int,
        default=d.readme_max_lines,
        help=f"the README block's page budget in lines (default {d.readme_max_lines})",
    )
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README is stale")
    p.add_argument(
        "--fail-below-threshold", action="store_true", help="exit 3 if a config's recovery is below threshold"
    )
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="X | METRIC/FILTER=X",
        help=f"recovery threshold, all metrics or one (default {d.recovery_threshold}); repeatable",
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 4 if a config's score moved between stacks beyond noise, or it failed in one stack only",
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help="significance level of the paired tests")
    p.add_argument("--log-mlflow", metavar="URI", help="also log report.md and plots to this MLflow tracking URI")
    return p.parse_args(argv)


def report_config(args: argparse.Namespace) -> ReportConfig:
    cfg = defaults()
    cfg.alpha, cfg.readme = args.alpha, args.readme or None
    cfg.readme_scope, cfg.readme_max_lines = args.readme_scope, args.readme_max_lines
    cfg.fail_on_regression = cfg.fail_on_regression or args.fail_on_regression
    for t in args.threshold:
        key, _, value = t.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--threshold {t}: give a number in (0, 1] or METRIC/FILTER=number") from None
        if key:
            cfg.recovery_thresholds[key] = number
        else:
            cfg.recovery_threshold = number
    check_report(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = report_config(args)
    except ConfigError as e:
        print(f"autoround-exp report: {e}", file=sys.stderr)
        return 2
    from autoround_exp.report.generate import generate

    return generate(
        cfg,
        Path(args.results),
        mlflow_uri=args.mlflow,
        experiment=args.experiment,
        check=args.check,
        fail_below_threshold=args.fail_below_threshold,
        log_to=args.log_mlflow,
    )


if __name__ == "__main__":
    sys.exit(main())
