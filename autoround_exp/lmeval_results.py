"""Read lm-eval's results JSON (never its printed table) into metric rows and MLflow keys."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from autoround_exp.record import MetricRow


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _float(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None


def metrics(results: dict) -> list[MetricRow]:
    """One row per metric and filter of lm-eval's results JSON, as the record stores them."""
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
                MetricRow(
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


def mlflow_metrics(rows: list[MetricRow]) -> dict[str, float]:
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


SUMMARY_KEYS = ("results", "versions", "n-shot", "higher_is_better", "n-samples")


def summary(results: dict) -> dict:
    """The part of lm-eval's results JSON its table is made from (without the task configs)."""
    return {k: results[k] for k in SUMMARY_KEYS if k in results}


_SAMPLES_FILE = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d.\-]+\.jsonl$")


def per_sample(samples_paths: list[str]) -> dict[str, dict[str, list]]:
    """Per-document scores from lm-eval's samples logs, for paired tests between runs.

    ``{task: {"doc_id": [...], "doc_hash": [...], "prompt_hash": [...], "<metric>,<filter>":
    [...]}}``, every list in ``doc_id`` order. Two runs are paired on the same documents by
    ``prompt_hash`` (lm-eval's hash of the prompt and target text). ``doc_hash`` (lm-eval's
    hash of the document) is kept for stores written before; it differs between runs for
    documents holding an image (the image object's repr, with its address, is hashed).
    """
    out: dict[str, dict[str, list]] = {}
    for path in samples_paths:
        match = _SAMPLES_FILE.match(Path(path).name)
        if not match:
            continue
        by_doc: dict[int, dict] = {}
        for line in Path(path).read_text().splitlines():
            s = json.loads(line)
            prompt = (s.get("prompt_hash", "") + s.get("target_hash", "")).encode()
            row = by_doc.setdefault(
                s["doc_id"],
                {"doc_hash": s.get("doc_hash", "")[:16], "prompt_hash": hashlib.sha256(prompt).hexdigest()[:16]},
            )
            for metric in s["metrics"]:
                row[f"{metric},{s['filter']}"] = float(s[metric])
        docs = sorted(by_doc)
        columns = sorted({k for row in by_doc.values() for k in row} - {"doc_hash", "prompt_hash"})
        task = {"doc_id": docs, **{h: [by_doc[d][h] for d in docs] for h in ("doc_hash", "prompt_hash")}}
        task |= {c: [by_doc[d].get(c) for d in docs] for c in columns}
        out[match["task"]] = task
    return out
