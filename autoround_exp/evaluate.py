"""Evaluate stage: lm-eval in a child process that runs the serve environment's Python.

Only paths and JSON cross the boundary: the parent writes the task YAML and the lm-eval
command line, the child writes lm-eval's own results JSON and per-sample logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from autoround_exp import child
from autoround_exp.config import Experiment

# Run by the serve environment's Python: where its lm-eval lives and what device it sees.
PROBE = """
import importlib.util, json, torch
from importlib import metadata
cuda = torch.cuda.is_available()
print(json.dumps({
    "lm_eval_dir": importlib.util.find_spec("lm_eval").submodule_search_locations[0],
    "lm_eval": metadata.version("lm_eval"),
    "torch": torch.__version__,
    "cuda": cuda,
    "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
}))
"""


@dataclass
class EvalResult:
    results_path: str
    samples_paths: list[str]
    output_dir: str
    backend: str
    device: str
    platform: dict  # what the serve environment reported: versions, device name
    seconds: float
    command: list[str]


def serve_python(exp: Experiment) -> str:
    return exp.serve.python or sys.executable


def probe(python: str) -> dict:
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the serve environment ({python}) cannot run lm-eval:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stock_task_yaml(platform: dict, task_yaml: str) -> Path:
    """The stock task YAML of the lm-eval that the child will run."""
    path = Path(platform["lm_eval_dir"]) / "tasks" / task_yaml
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval at {platform['lm_eval_dir']} has no task file {task_yaml}")
    return path


def write_task(exp: Experiment, task_dir: Path, stock_yaml: Path) -> None:
    """The stock task with only its data source replaced by local jsonl files."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = Path(exp.eval_data.path)
    task = {
        "include": str(stock_yaml),
        "task": exp.lm_eval_task,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}},
    }
    (task_dir / f"{exp.lm_eval_task}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def lm_eval_argv(exp: Experiment, checkpoint: str, output_dir: Path, task_dir: Path | None, device: str) -> list[str]:
    ev, m = exp.eval, exp.model
    batch_size = ev.batch_size
    if batch_size == "auto" and device == "cpu":
        batch_size = "16"  # lm-eval's auto probe assumes a GPU's out-of-memory signal
    model_args = f"pretrained={checkpoint},dtype={m.dtype},add_bos_token={ev.add_bos_token}"
    if m.trust_remote_code:
        model_args += ",trust_remote_code=True"
    argv = [
        serve_python(exp),
        "-m",
        "lm_eval",
        "run",
        "--model",
        exp.serve.backend,
        "--model_args",
        model_args,
        "--tasks",
        exp.lm_eval_task,
        "--num_fewshot",
        str(ev.num_fewshot),
        "--batch_size",
        str(batch_size),
        "--device",
        device,
        "--output_path",
        str(output_dir),
        "--log_samples",
    ]
    if ev.seed is not None:
        argv += ["--seed", str(ev.seed)]
    if task_dir is not None:
        argv += ["--include_path", str(task_dir)]
    if ev.limit is not None:
        argv += ["--limit", str(ev.limit)]
    if ev.apply_chat_template:
        argv += ["--apply_chat_template"]
    if ev.fewshot_as_multiturn:
        argv += ["--fewshot_as_multiturn"]
    if ev.max_gen_toks is not None:
        argv += ["--gen_kwargs", f"max_gen_toks={ev.max_gen_toks}"]
    return argv


def evaluate(exp: Experiment, checkpoint: str, out_dir: Path, log_path: Path) -> EvalResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = probe(serve_python(exp))
    device = exp.serve.device if exp.serve.device != "auto" else ("cuda" if platform["cuda"] else "cpu")
    task_dir = None
    if exp.eval_data is not None:
        task_dir = out_dir / "tasks"
        write_task(exp, task_dir, stock_task_yaml(platform, exp.eval.task_yaml))
    lm_out = out_dir / "lm_eval"
    argv = lm_eval_argv(exp, checkpoint, lm_out, task_dir, device)
    (out_dir / "command.txt").write_text(" ".join(argv) + "\n")
    t0 = time.perf_counter()
    child.run(
        argv, log_path, exp.eval.timeout_s, f"lm-eval ({exp.serve.backend})", env={"TOKENIZERS_PARALLELISM": "false"}
    )
    results = sorted(lm_out.rglob("results_*.json"))
    if not results:
        raise RuntimeError(f"lm-eval wrote no results JSON under {lm_out}; log: {log_path}")
    return EvalResult(
        results_path=str(results[-1]),
        samples_paths=[str(p) for p in sorted(results[-1].parent.glob("samples_*.jsonl"))],
        output_dir=str(out_dir),
        backend=exp.serve.backend,
        device=device,
        platform=platform,
        seconds=round(time.perf_counter() - t0, 3),
        command=argv,
    )
