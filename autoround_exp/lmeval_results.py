"""Read lm-eval's results JSON (never its printed table) into metric rows and MLflow keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Metric:
    task: str
    metric: str  # exact_match
    filter: str  # strict-match
    value: float
    stderr: float | None
    version: str | None
    n_shot: int | None
    n_samples: int | None

    @property
    def mlflow_key(self) -> str:
        """lm-eval's ``exact_match,strict-match`` has a comma, which MLflow rejects."""
        return f"{self.task}/{self.metric}/{self.filter}"


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _float(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None


def metrics(results: dict) -> list[Metric]:
    rows = []
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if _float(value) is None:
                continue
            n = results.get("n-samples", {}).get(task, {})
            rows.append(
                Metric(
                    task=task,
                    metric=metric,
                    filter=filt,
                    value=float(value),
                    stderr=_float(values.get(f"{metric}_stderr,{filt}")),
                    version=str(results.get("versions", {}).get(task)),
                    n_shot=results.get("n-shot", {}).get(task),
                    n_samples=n.get("effective"),
                )
            )
    return rows


def mlflow_metrics(rows: list[Metric]) -> dict[str, float]:
    out = {}
    for r in rows:
        out[r.mlflow_key] = r.value
        if r.stderr is not None:
            out[f"{r.mlflow_key}/stderr"] = r.stderr
    return out


def table(results: dict) -> str:
    """lm-eval's own markdown table."""
    from lm_eval.utils import make_table

    return make_table(results)
