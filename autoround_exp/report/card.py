"""The Hugging Face model card of every quantized checkpoint, from the stored run records.

Written as ``README.md`` into the checkpoint's folder, so that the folder is what gets published
(``python -m autoround_exp.publish``). Everything on it comes from the records of the runs that
scored the checkpoint, with their base and RTN runs: the front matter (``base_model``, tags,
the base's license, ``model-index`` with every metric measured), the quantization (recipe,
calibration and its hash, where and how long), the accuracy table base | this checkpoint | RTN
with recovery and the paired test against RTN, the versions, and the commands that reproduce
and serve it. The same records give the same bytes: nothing on it is a date or a path of the
machine that wrote it, except the lm_eval command line as it ran.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from autoround_exp.config import ReportConfig
from autoround_exp.fsutil import write_atomic
from autoround_exp.record import RunRecord, config_label
from autoround_exp.report import runs, tables
from autoround_exp.report.runs import Row, Run, Section

CARD = "README.md"
SCHEME_TAGS = {"W4A16": "int4", "W8A8": "int8", "NVFP4": "nvfp4", "MXFP4": "mxfp4", "FP8_DYNAMIC": "fp8"}
TASK_TYPES = {"text": "text-generation", "vision-language": "visual-question-answering"}
# lm-eval's own data sets for its stock tasks (dataset_path in their YAML)
DATASETS = {"gsm8k": "openai/gsm8k", "chartqa": "HuggingFaceM4/ChartQA"}
# A card is the records' alone: the report's settings (report.alpha, recovery thresholds) do not
# change it. Recovery is shown without a threshold mark; "noise" is p >= 0.05, as by default.
ALPHA = ReportConfig().alpha
NO_THRESHOLD = tables.Thresholds(0.0, {})
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def hub_id(path: str) -> str | None:
    """``path`` where it names a hub repo (not a folder of this machine)."""
    return path if HUB_ID.match(path) and not Path(path).expanduser().exists() else None


def by_checkpoint(loaded: list[Run]) -> dict[str, list[Run]]:
    """The quantized runs of each checkpoint folder, in the tables' order."""
    out: dict[str, list[Run]] = {}
    for run in sorted(runs.latest(loaded), key=lambda r: (runs.section_order(r.section), r.sort_key())):
        if run.record.method != "none":
            out.setdefault(run.record.checkpoint, []).append(run)
    return out


def placed(mine: list[Run], sections: list[Section]) -> list[tuple[Section, Row]]:
    """Each section that scored the checkpoint, with the checkpoint's row in it."""
    out = []
    for section in sections:
        for row in section.rows:
            if any(r in mine for r in row.runs):
                out.append((section, row))
    return out


def front_matter(rec: RunRecord, mine: list[Run]) -> dict:
    model = rec.config.get("model", {})
    meta: dict = {}
    if base := hub_id(rec.model.path):
        meta["base_model"] = base
    if model.get("license"):
        meta["license"] = model["license"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation" if model.get("modality", "text") == "text" else "image-text-to-text"
    tags = ["llmcompressor", "compressed-tensors", "vllm", rec.method.replace("_", "-")]
    tags += [t for t in (SCHEME_TAGS.get(rec.scheme_preset or ""), (rec.scheme or "").lower()) if t]
    meta["tags"] = list(dict.fromkeys(tags))
    meta["model-index"] = [{"name": rec.checkpoint_name, "results": [result(r.record) for r in mine]}]
    return meta


def result(rec: RunRecord) -> dict:
    """One ``model-index`` result: a run's metrics on its task, as lm-eval reported them."""
    ev, settings = rec.eval, rec.eval_settings
    local = rec.config.get("model", {}).get("eval_data", {})
    stock = rec.config.get("eval", {}).get("name", ev.task)
    dataset = {"name": ev.task, "type": DATASETS.get(stock, ev.task) if stock not in local else ev.task}
    dataset |= {"split": "test", "args": {"num_fewshot": settings.num_fewshot}}
    if settings.limit:
        dataset["args"]["limit"] = settings.limit
    scored = f"lm-eval {ev.platform.lm_eval} {ev.lm_eval_model} on {tables.hardware(runs.Run(rec, None))}"
    task_type = TASK_TYPES.get(rec.config.get("eval", {}).get("modality", "text"), "text-generation")
    return {
        "task": {"type": task_type, "name": ev.task},
        "dataset": dataset,
        "metrics": [metric(m, scored) for m in rec.table],
    }


def metric(m, scored: str) -> dict:
    """One metric as lm-eval reported it; its stderr, sample count and scorer as its args."""
    args = {"stderr": m.stderr} if m.stderr is not None else {}
    args |= {"n_samples": m.n_samples, "scored_by": scored}
    name = f"{m.metric} ({m.filter})"
    return {"type": m.metric, "name": name, "config": m.filter, "value": m.value, "args": args, "verified": False}


def accuracy(rows: list[tuple[Section, Row]]) -> list[str]:
    """base | this checkpoint | RTN per task and metric, with an Average and a Recovery row."""
    head = "| task | metric | base (unquantized) | this checkpoint | RTN | recovery | Δ vs RTN (paired) |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    sums = {"base": [], "this": []}
    for section, row in rows:
        base, rtn = tables.baseline_of(section, row), tables.rtn_of(section, row)
        task = task_label(section, row)
        for column in tables.columns(section):
            recovery, _ = tables.recovery_cell(section, row, column, NO_THRESHOLD)
            cells = [tables.value_cell(r, column) if r is not None else "" for r in (base, row, rtn)]
            delta = tables.delta_cell(section, row, column, ALPHA)
            lines.append(f"| {task} | {tables.column_name(column)} | {' | '.join(cells)} | {recovery} | {delta} |")
            if base is not None and tables.mean(base, column) is not None and tables.mean(row, column) is not None:
                sums["base"].append(tables.mean(base, column))
                sums["this"].append(tables.mean(row, column))
    if sums["this"]:
        avg_base, avg = sum(sums["base"]) / len(sums["base"]), sum(sums["this"]) / len(sums["this"])
        lines.append(f"| **Average** | | {avg_base:.4f} | {avg:.4f} | | | |")
        if avg_base:
            lines.append(f"| **Recovery** | | | {100 * avg / avg_base:.1f} % | | | |")
    return lines


def task_label(section: Section, row: Row) -> str:
    k, rec = section.key, row.first.record
    n = rec.table[0].n_samples if rec.table else None
    scope = f"first {k.limit}" if k.limit else f"{n} documents" if n else "whole test set"
    chat = ", chat template" if k.apply_chat_template else ""
    return f"{k.task}, {k.num_fewshot}-shot, {scope}{chat} ({rec.eval.backend})"


def quantization(rec: RunRecord, folder: Path) -> list[str]:
    q, cal = rec.quantization, rec.calibration
    v = q.verification if q is not None else None
    lines = [f"- **Scheme:** {rec.scheme_preset} (`scheme={rec.scheme}`)", f"- **Method:** {method_name(rec)}"]
    lines.append(f"- **Left unquantized:** {', '.join(f'`{n}`' for n in rec.config['model']['ignore'])}")
    if cal is not None:
        lines.append(
            f"- **Calibration:** {cal.nsamples} samples × {cal.seqlen} tokens (`mode={cal.mode}`, seed {cal.seed}) "
            f"from `{Path(cal.source).name if Path(cal.source).is_absolute() else cal.source}`; "
            f"token SHA-256 `{cal.token_sha256}`"
        )
    else:
        lines.append("- **Calibration:** none (the weights alone)")
    if q is not None:
        lines.append(
            f"- **Made on:** {q.device}, {q.oneshot_seconds:.1f} s of `oneshot`, peak memory "
            f"{q.peak_memory_gb:.2f} GB ({q.memory_kind}); {q.size_mb:.1f} MB on disk"
        )
    if v is not None:
        codes = v.changed_codes
        moved = (
            f"; {codes.fraction:.2%} of sampled weight codes moved off round-to-nearest"
            if codes and codes.measured
            else ""
        )
        lines.append(f"- **Verified:** {v.quantized} of {v.linear_layers} Linear layers quantized{moved}")
    recipe = folder / (q.recipe if q is not None else "recipe.yaml")
    if recipe.is_file():
        lines += ["", "The recipe (`recipe.yaml`):", "", "```yaml", recipe.read_text().rstrip(), "```"]
    return lines


def method_name(rec: RunRecord) -> str:
    label = config_label(rec.scheme_preset, rec.method, rec.iters, rec.vision_quantized)
    modifier = {"rtn": "QuantizationModifier", "autoround": "AutoRoundModifier"}.get(rec.method)
    modifier = modifier or runs.MODIFIERS.get(rec.method) or "auto-round's own API"
    return f"{label.removeprefix(f'{rec.scheme_preset} ')} (llm-compressor `{modifier}`)"


def reproduce(mine: list[Run]) -> list[str]:
    """run.py's command for each run, and lm-eval's own command line as it ran."""
    lines = ["```"]
    for run in mine:
        lines.append(run_py_command(run.record))
    lines.append("```")
    for run in mine:
        cmd = run.record.eval.command
        if cmd and "-m" in cmd:
            plain = ["lm_eval", *cmd[cmd.index("-m") + 2 :]]  # the harness's wrapper passes lm-eval's own arguments
            lines += ["", f"lm-eval's command for {run.record.eval.task} ({run.record.eval.backend}):", "", "```"]
            lines += [shlex.join(plain), "```"]
    return lines


def run_py_command(rec: RunRecord) -> str:
    c = rec.config
    args = [f"model={c['model']['name']}", f"scheme={rec.scheme}", f"method={rec.method}"]
    if rec.iters is not None:
        args.append(f"iters={rec.iters}")
    args += [f"eval={c['eval']['name']}", f"serve={rec.eval.backend_requested or rec.eval.backend}"]
    if rec.eval_settings.limit:
        args.append(f"eval.limit={rec.eval_settings.limit}")
    defaults, used = c["model"].get("calibration", {}), c.get("calibration", {})
    changed = [k for k in ("nsamples", "seqlen") if used.get(k) is not None and used[k] != defaults.get(k)]
    args += [f"calibration.{k}={used[k]}" for k in changed]  # where the run set its own, not the model's
    if rec.stack is not None:
        args.append(f"stack={rec.stack.name}")
    return "python run.py " + " ".join(args)


def serving(rec: RunRecord, mine: list[Run]) -> list[str]:
    lines = ["```", f"vllm serve {rec.checkpoint_name}   # this folder, or the hub repo it was uploaded to", "```"]
    notes = sorted({r.record.eval.note for r in mine if r.record.eval.note})
    lines += [f"\n{n}" for n in notes]
    if rec.scheme_preset == "NVFP4" and not notes:
        lines.append(
            "\nNVFP4's 4-bit activations run in vLLM on compute capability 10.0 and above; below it, weight-only."
        )
    return lines


def versions(mine: list[Run]) -> list[str]:
    rec = mine[0].record
    made = ", ".join(f"{k} {v}" for k, v in rec.versions.items() if v)
    lines = [f"- **Quantized with:** {made}"]
    for run in mine:
        p = run.record.eval.platform
        scored = ", ".join(f"{k} {v}" for k, v in (("lm-eval", p.lm_eval), ("vllm", p.vllm), ("torch", p.torch)) if v)
        task = run.record.eval.task
        lines.append(f"- **{task} scored by** `{run.record.eval.lm_eval_model}` on {tables.hardware(run)}: {scored}")
    return lines


def render_card(mine: list[Run], sections: list[Section]) -> str:
    rec = mine[0].record
    folder = Path(rec.checkpoint)
    meta = yaml.safe_dump(front_matter(rec, mine), sort_keys=False, allow_unicode=True, width=1000)
    body = [f"# {rec.checkpoint_name}", ""]
    body.append(
        f"{rec.model.display_name} (`{rec.model.path if hub_id(rec.model.path) else rec.config['model']['name']}`) "
        f"quantized to {rec.scheme_preset} with {method_name(rec)}, made and scored by autoround-exp."
    )
    body += ["", "## Quantization", "", *quantization(rec, folder)]
    body += ["", "## Accuracy", "", *accuracy(placed(mine, sections))]
    body += ["", "Value ± lm-eval's stderr. Recovery: this checkpoint / the unquantized model, scored alike. "
             "Δ vs RTN: the paired test on the same documents."]  # fmt: skip
    body += ["", "## Reproduce", "", *reproduce(mine)]
    body += ["", "## Serve", "", *serving(rec, mine)]
    body += ["", "## Versions", "", *versions(mine)]
    return f"---\n{meta}---\n\n" + "\n".join(body) + "\n"


def write_cards(loaded: list[Run]) -> tuple[int, int, int]:
    """Each checkpoint folder's card, written where it differs: (written, unchanged, folders gone)."""
    sections = runs.sections(runs.latest(loaded))
    written = unchanged = gone = 0
    for checkpoint, mine in by_checkpoint(loaded).items():
        folder = Path(checkpoint)
        if not folder.is_dir():
            gone += 1
        elif write_atomic(folder / CARD, render_card(mine, sections)):
            written += 1
        else:
            unchanged += 1
    return written, unchanged, gone
