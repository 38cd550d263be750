"""Finished runs, from ``results/`` or MLflow, grouped the way the tables show them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from autoround_exp import record
from autoround_exp.record import RunRecord
from autoround_exp.store import Store

METHOD_ORDER = {"none": 0, "rtn": 1, "gptq": 2, "awq": 3, "awq_gptq": 4, "autoround": 5, "autoround_native": 6}
BACKEND_ORDER = {"hf": 0, "vllm": 1, "vllm_server": 2}
MODIFIERS = {
    "gptq": "GPTQModifier",
    "awq": "AWQModifier + QuantizationModifier",
    "awq_gptq": "AWQModifier + GPTQModifier",
}


class RowConfig(NamedTuple):
    """What a table row is: the recipe and the backend that scored it."""

    scheme: str | None
    method: str
    iters: int | None
    backend: str
    vision_quantized: bool = False
    stack: str = "pinned"  # the software stack its children ran in (stack=)

    @property
    def recipe(self) -> tuple:
        """The config without its backend (one recipe may be scored by several); a stack's is its own."""
        return (self.scheme, self.method, self.iters, self.vision_quantized, self.stack)


class SectionKey(NamedTuple):
    model: str  # display name
    path: str
    task: str
    num_fewshot: int
    limit: int | None
    add_bos_token: bool
    apply_chat_template: bool


@dataclass
class Run:
    record: RunRecord
    samples: dict | None  # per-document scores (lmeval_results.per_sample), if stored
    store: Path | None = None  # the results folder it was read from (None: MLflow)

    @property
    def config(self) -> RowConfig:
        """What a table row is: the recipe and the backend that scored it (seeds aggregate)."""
        r = self.record
        return RowConfig(r.scheme, r.method, r.iters, r.eval.backend, r.vision_quantized, self.stack)

    @property
    def stack(self) -> str:
        return self.record.stack.name if self.record.stack else "pinned"

    @property
    def section(self) -> tuple:
        """One table per model x eval setting: numbers from other settings are not comparable."""
        r, ev = self.record, self.record.eval_settings
        return SectionKey(
            r.model.display_name,
            r.model.path,
            r.eval.task,
            ev.num_fewshot,
            ev.limit,
            ev.add_bos_token,
            ev.apply_chat_template,
        )

    @property
    def seed(self) -> int | None:
        return self.record.seed

    @property
    def label(self) -> str:
        """Upstream's heading: <Model>-<SCHEME>-AutoRound (AutoRoundModifier, iters=200)."""
        r = self.record
        on = f", stack={self.stack}" if self.stack != "pinned" else ""
        if r.method == "none":
            return f"{r.checkpoint_name} (unquantized{on})"
        if r.method == "rtn":
            return f"{r.checkpoint_name} (QuantizationModifier{on})"
        if r.method == "autoround":
            return f"{r.checkpoint_name} (AutoRoundModifier, iters={r.iters}{on})"
        if r.method == "autoround_native":
            return f"{r.checkpoint_name} (auto-round's AutoRound API, iters={r.iters}{on})"
        if r.method in MODIFIERS:
            return f"{r.checkpoint_name} ({MODIFIERS[r.method]}{on})"
        return f"{r.checkpoint_name} ({r.method}{on})"

    @property
    def short_label(self) -> str:
        r = self.record
        label = record.config_label(r.scheme_preset, r.method, r.iters, r.vision_quantized)
        return label if self.stack == "pinned" else f"{label} [stack={self.stack}]"

    def sort_key(self) -> tuple:
        r = self.record
        return (
            r.method != "none",
            r.scheme or "",
            self.stack != "pinned",  # each stack's rows together, the project's own first
            self.stack,
            METHOD_ORDER.get(r.method, 9),
            r.iters if r.iters is not None else -1,
            r.vision_quantized,
            BACKEND_ORDER.get(r.eval.backend, 9),
            self.seed if self.seed is not None else -1,
        )


@dataclass
class Row:
    """One config of a section: its runs, one per seed."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]


@dataclass
class Section:
    key: SectionKey
    rows: list[Row] = field(default_factory=list)

    @property
    def title(self) -> str:
        k = self.key
        first = self.rows[0].first.record.table
        n = first[0].n_samples if first else None
        scope = f"first {k.limit} documents" if k.limit else f"all {n} documents" if n else "whole test set"
        extras = [f"add_bos_token={k.add_bos_token}"] + (["chat template"] if k.apply_chat_template else [])
        return f"{k.model} — {k.task}, {k.num_fewshot}-shot, {scope} ({', '.join(extras)})"

    @property
    def slug(self) -> str:
        k = self.key
        parts = [k.model, k.task, f"{k.num_fewshot}shot", f"limit{k.limit}" if k.limit else "full"]
        if not k.add_bos_token:
            parts.append("nobos")
        if k.apply_chat_template:
            parts.append("chat")
        return "-".join(str(x) for x in parts)


def from_store(results_dir: str | Path) -> list[Run]:
    store = Store(results_dir)
    return [Run(rec, store.samples_of(rec.key), Path(results_dir)) for rec in store.records()]


def from_mlflow(uri: str, experiment: str) -> list[Run]:
    """Finished runs logged by ``run.py``: each carries its record and per-document scores."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"autoround-exp report: MLflow at {uri} has no experiment {experiment!r}.")
    out = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=50000):
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if "record.json" not in names:
            continue  # not a run of run.py (e.g. the report's own run)
        data = json.loads(Path(client.download_artifacts(run.info.run_id, "record.json")).read_text())
        rec = record.from_dict(data)
        rec.tracking = record.Tracking(status="logged", run_id=run.info.run_id)
        samples = None
        if "samples.json" in names:
            samples = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json")).read_text())
        out.append(Run(rec, samples))
    return out


def latest(runs: list[Run]) -> list[Run]:
    """One run per (section, config, seed): the latest, as a re-run with force=true replaces one."""
    best: dict[tuple, Run] = {}
    for run in runs:
        k = (run.section, run.config, run.seed)
        if k not in best or record.epoch_ms(run.record.finished_at) > record.epoch_ms(best[k].record.finished_at):
            best[k] = run
    return list(best.values())


def sections(runs: list[Run]) -> list[Section]:
    by_section: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in sorted(latest(runs), key=Run.sort_key):
        by_section.setdefault(run.section, {}).setdefault(run.config, []).append(run)
    return [
        Section(key, [Row(group) for group in configs.values()])
        for key, configs in sorted(by_section.items(), key=lambda kv: section_order(kv[0]))
    ]


def section_order(key: SectionKey) -> tuple:
    """Full evaluations first, then by model and task; limited ones by more documents first
    (never a 37-document section above a 1000-document one)."""
    k = key
    return (
        k.limit is not None,
        k.model,
        k.path,
        k.task,
        k.num_fewshot,
        -(k.limit or 0),
        k.add_bos_token,
        k.apply_chat_template,
    )


def frame(runs: list[Run]):
    """One row per run x metric, for pandas users (the notebook)."""
    import pandas as pd

    rows = []
    for run in runs:
        r = run.record
        for m in r.table:
            rows.append(
                {
                    "model": r.model.display_name,
                    "config": run.short_label,
                    "scheme": r.scheme,
                    "method": r.method,
                    "iters": r.iters,
                    "seed": run.seed,
                    "backend": r.eval.backend,
                    "stack": run.stack,
                    "task": m.task,
                    "metric": m.metric,
                    "filter": m.filter,
                    "value": m.value,
                    "stderr": m.stderr,
                    "n": m.n_samples,
                    "limit": r.eval_settings.limit,
                    "mlflow_run_id": r.mlflow_run_id,
                }
            )
    return pd.DataFrame(rows)
