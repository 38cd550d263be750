"""Evaluate stage: lm-eval in a child process that runs the serve environment's Python.

Only paths and JSON cross the boundary: the parent writes the task YAML and the lm-eval
command line, the child writes lm-eval's own results JSON and per-sample logs. This stage
never imports vLLM or lm-eval in the harness's process (the log stage imports lm-eval's table
renderer, and the report its utilities, both after the child has run). Backends
(``serve.backend``, resolved by ``backend.choose``):

- ``vllm``: lm-eval's ``vllm`` model (``vllm-vlm`` for vision-language models);
- ``vllm_server``: ``vllm serve`` on 127.0.0.1, lm-eval's ``local-completions``
  (``local-chat-completions`` with a chat template) against it;
- ``hf``: lm-eval's transformers model (``hf-multimodal`` for vision-language models).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from autoround_exp import child, fidelity_child, vllm_server
from autoround_exp.backend import probe
from autoround_exp.config import Experiment, data_files
from autoround_exp.record import Bos, Evaluation
from autoround_exp.stack import child_env as stack_child_env

LM_EVAL_MODEL = {
    ("hf", "text"): "hf",
    ("hf", "vision-language"): "hf-multimodal",
    ("vllm", "text"): "vllm",
    ("vllm", "vision-language"): "vllm-vlm",
}
SEED = 1234  # lm-eval's default model seed; the server gets the same


@dataclass
class EvalResult:
    results_path: str
    samples_paths: list[str]
    output_dir: str
    backend: str
    lm_eval_model: str
    device: str
    platform: dict  # what the serve environment reported: versions, device name
    kernels: list[str]  # the linear kernels vLLM reported choosing
    bos: Bos  # bos_check: add_bos_token, whether the chat template writes BOS, double-BOS warning
    seconds: float
    command: list[str]
    server_command: list[str] | None

    def evaluation(self, exp: Experiment, task_versions: dict) -> Evaluation:
        """What the record keeps of it, with the backend choice the door made."""
        c = exp.serve_choice
        return Evaluation(
            task=exp.lm_eval_task,
            backend=self.backend,
            backend_requested=c.requested,
            backend_reason=c.reason,
            note=c.note,
            lm_eval_model=self.lm_eval_model,
            device=self.device,
            platform=self.platform,
            kernels=self.kernels,
            bos=self.bos,
            server_command=self.server_command,
            seconds=self.seconds,
            task_versions=task_versions,
            results_json=self.results_path,
            command=self.command,
        )


def stock_task_yaml(platform: dict, task_yaml: str) -> Path:
    """The stock task YAML of the lm-eval that the child will run."""
    path = Path(platform["lm_eval_dir"]) / "tasks" / task_yaml
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval at {platform['lm_eval_dir']} has no task file {task_yaml}")
    return path


def write_task(exp: Experiment, task_dir: Path, stock_yaml: Path) -> None:
    """The stock task with only its data source replaced by local files (jsonl or parquet)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    task = {
        "include": str(stock_yaml),
        "task": exp.lm_eval_task,
        "tag": [],
        "dataset_path": exp.eval.data_format,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files(exp.eval, exp.eval_data.path)},
    }
    (task_dir / f"{exp.lm_eval_task}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def _tokenizer_files(checkpoint: str) -> dict[str, str]:
    """tokenizer_config.json and chat_template.jinja of a local directory or a cached hub
    model, as text (never downloads: a file not found locally is left out)."""
    found = {}
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = Path(checkpoint) / name
        if not path.is_file() and not Path(checkpoint).is_dir():
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(checkpoint, name)
                path = Path(cached) if isinstance(cached, str) else path
            except Exception:
                pass
        if path.is_file():
            found[name] = path.read_text()
    return found


def bos_check(exp: Experiment, checkpoint: str) -> Bos:
    """Whether this evaluation starts prompts with two BOS tokens (lm-eval issue #2676):
    lm-eval adds the tokenizer's BOS when add_bos_token is set, and a chat template that
    writes the BOS itself adds a second one."""
    ev = exp.eval
    files = _tokenizer_files(checkpoint)
    info = {"add_bos_token": ev.add_bos_token, "apply_chat_template": ev.apply_chat_template, "bos_token": None}
    if "tokenizer_config.json" not in files:
        return Bos(**info, template_writes_bos=None, double_bos=None, warning=None)
    tok = json.loads(files["tokenizer_config.json"])
    bos = tok.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    template = files.get("chat_template.jinja") or tok.get("chat_template") or ""
    template = template if isinstance(template, str) else json.dumps(template)
    writes_bos = bool(bos) and ("bos_token" in template or bos in template)
    double = bool(ev.apply_chat_template and ev.add_bos_token and writes_bos)
    warning = (
        f"double BOS: eval.add_bos_token=true and the chat template writes {bos} itself, so every prompt "
        f"begins {bos}{bos} (lm-eval #2676). Set eval.add_bos_token=false to score it as the model was trained."
        if double
        else None
    )
    return Bos(**{**info, "bos_token": bos}, template_writes_bos=writes_bos, double_bos=double, warning=warning)


def device_of(exp: Experiment) -> str:
    platform = exp.serve_choice.platform
    if exp.serve.backend == "hf" and exp.serve.device != "auto":
        return exp.serve.device
    return "cuda" if platform["cuda"] else "cpu"


def lm_eval_model(exp: Experiment) -> str:
    if exp.serve.backend == "vllm_server":
        return "local-chat-completions" if exp.eval.apply_chat_template else "local-completions"
    return LM_EVAL_MODEL[(exp.serve.backend, exp.model.modality)]


def _args(pairs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs.items() if v is not None)


def engine_args(exp: Experiment) -> dict:
    """vLLM engine settings that lm-eval's vllm model passes on to ``vllm.LLM``."""
    e = exp.model.vllm
    return {
        "tensor_parallel_size": e.tensor_parallel_size,
        "data_parallel_size": e.data_parallel_size if e.data_parallel_size > 1 else None,
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "max_model_len": e.max_model_len,
        "enforce_eager": True if e.enforce_eager else None,
        "max_num_seqs": e.max_num_seqs,
    }


def model_args(exp: Experiment, checkpoint: str, base_url: str | None = None) -> str:
    m, ev, backend = exp.model, exp.eval, exp.serve.backend
    remote = {"trust_remote_code": True if m.trust_remote_code else None}
    if backend == "hf":
        return _args({"pretrained": checkpoint, "dtype": m.dtype, "add_bos_token": ev.add_bos_token, **remote})
    if backend == "vllm":
        return _args(
            {
                "pretrained": checkpoint,
                "dtype": m.dtype,
                "add_bos_token": ev.add_bos_token,
                **engine_args(exp),
                **remote,
            }
        )
    chat = ev.apply_chat_template
    return _args(
        {
            "model": exp.checkpoint_name,  # the server's --served-model-name
            "base_url": f"{base_url}/chat/completions" if chat else f"{base_url}/completions",
            "tokenizer": checkpoint,
            "tokenizer_backend": "huggingface",
            # Token ids, with the BOS lm-eval adds, as the vllm model sends them; chat
            # completions only take text.
            "tokenized_requests": not chat,
            "add_bos_token": None if chat else ev.add_bos_token,
            "max_length": m.vllm.max_model_len,
            "num_concurrent": exp.serve.num_concurrent,
            "max_retries": 3,
            "timeout": 600,
            **remote,
        }
    )


def lm_eval_module(exp: Experiment) -> str:
    """This package's entry to lm-eval's CLI (``vision_compat`` for a vision-language model
    without torchvision; no stock task index when the run's tasks are its own), in every
    serving environment: ``lm_eval_env`` puts this package on the child's path."""
    return "autoround_exp.lm_eval_cli"


def lm_eval_argv(
    exp: Experiment, checkpoint: str, output_dir: Path, task_dir: Path | None, base_url: str | None = None
) -> list[str]:
    ev, backend = exp.eval, exp.serve.backend
    device = device_of(exp)
    batch_size = ev.batch_size
    if lm_eval_model(exp) == "hf-multimodal" and batch_size == "auto":
        batch_size = "1"  # lm-eval's hf-multimodal refuses auto
    if backend == "hf" and batch_size == "auto" and device == "cpu":
        batch_size = "16"  # lm-eval's auto probe assumes a GPU's out-of-memory signal
    if backend == "vllm_server":
        batch_size = "1"  # requests go one per call, num_concurrent at a time
    argv = [
        exp.serve.python,
        "-m",
        lm_eval_module(exp),
        "run",
        "--model",
        lm_eval_model(exp),
        "--model_args",
        model_args(exp, checkpoint, base_url),
        "--tasks",
        exp.lm_eval_task,
        "--num_fewshot",
        str(ev.num_fewshot),
        "--batch_size",
        str(batch_size),
    ]
    if backend == "hf":
        argv += ["--device", device]  # vLLM ignores --device and picks its platform itself
    argv += ["--output_path", str(output_dir), "--log_samples"]
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


def server_argv(exp: Experiment, checkpoint: str, port: int) -> list[str]:
    """``vllm serve`` with the same engine settings as the in-process backend."""
    e, m = exp.model.vllm, exp.model
    argv = [exp.serve.python, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", exp.checkpoint_name]
    argv += ["--dtype", m.dtype, "--seed", str(SEED)]
    argv += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
    argv += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if e.data_parallel_size > 1:
        argv += ["--data-parallel-size", str(e.data_parallel_size)]
    if e.max_model_len is not None:
        argv += ["--max-model-len", str(e.max_model_len)]
    if e.enforce_eager:
        argv += ["--enforce-eager"]
    if e.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(e.max_num_seqs)]
    if m.trust_remote_code:
        argv += ["--trust-remote-code"]
    return argv


def child_env(exp: Experiment) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if exp.serve.backend != "hf" and not exp.serve_choice.platform["cuda"]:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(exp.model.vllm.cpu_kvcache_space_gb)
    if exp.stack_env is not None and exp.serve.python == exp.stack_env.python:
        env |= stack_child_env(exp.stack_env)
    return env


def lm_eval_env(exp: Experiment) -> dict[str, str]:
    """``child_env`` and this package's folder first on ``PYTHONPATH``, so that the lm-eval
    child imports ``autoround_exp.lm_eval_cli`` in any environment, from any working folder
    (the package is stdlib-only at import; the entry needs lm-eval, as ``-m lm_eval`` would)."""
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = child_env(exp) | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if exp.serve.backend == "vllm" and exp.model.vllm.in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # lm-eval's own process; never a server's
    return env


def command_text(argv: list[str], env: dict[str, str]) -> str:
    """The lm-eval child's command line as ``command.txt`` keeps it: with the variables the
    harness set for it (``PYTHONPATH``; vllm-cpu's KV-cache size, without which vLLM asks for
    90 % of the host's memory), so that pasting it into a shell runs it as it ran, from any folder."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)]) + "\n"


# vLLM logs its linear-kernel choice, e.g. "Selected CPUInt8ScaledMMLinearKernel for
# CompressedTensorsW8A8Int8", "Using MarlinLinearKernel for CompressedTensorsWNA16".
KERNEL_LINE = re.compile(r"(?:Selected|Using) (\w*Kernel\w*) for (\w+)")


def kernels_in(log_path: Path) -> list[str]:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return sorted({f"{k} for {scheme}" for k, scheme in KERNEL_LINE.findall(text)})


# lm-eval's module for each model type: what a prestarted evaluation imports ahead
BACKEND_MODULES = {
    "hf": "lm_eval.models.huggingface",
    "vllm": "lm_eval.models.vllm_causallms",
    "hf-multimodal": "lm_eval.models.hf_vlms",
    "vllm-vlm": "lm_eval.models.vllm_vlms",
}
WARM = Path(__file__).with_name("warm.py")


def _tasks(exp: Experiment, out_dir: Path) -> Path | None:
    """The task folder (``--include_path``) for the run's own eval data, written; None: stock."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if exp.eval_data is None:
        return None
    task_dir = out_dir / "tasks"
    write_task(exp, task_dir, stock_task_yaml(probe(exp.serve.python), exp.eval.task_yaml))
    return task_dir


def prestart(
    exp: Experiment, checkpoint: str, out_dir: Path, log_dir: Path, fidelity_request: Path | None = None
) -> child.Prestarted | None:
    """The evaluation's child, started while ``checkpoint`` is still being written: its
    interpreter and lm-eval's imports load beside the quantization, and ``evaluate(...,
    pre=)`` lets it run. None where the backend is a server (its start-up needs the checkpoint)."""
    if exp.serve.backend == "vllm_server":
        return None
    argv = lm_eval_argv(exp, checkpoint, out_dir / "lm_eval", _tasks(exp, out_dir))
    # this package's entry first: it keeps transformers from importing scikit-learn (lm_eval_cli)
    imports = ",".join([argv[2], "lm_eval.evaluator", "lm_eval.tasks", BACKEND_MODULES.get(lm_eval_model(exp), "")])
    warm_argv = [argv[0], str(WARM), argv[2], imports, "--", *argv[3:]]
    env = lm_eval_env(exp) | fidelity_env(fidelity_request)
    return child.Prestarted(warm_argv, log_dir / "lm_eval.log", env=env, command=argv)


def fidelity_env(request: Path | None) -> dict[str, str]:
    """The evaluation child's variable that names the fidelity request it runs after lm-eval
    (``lm_eval_cli``); not in ``command.txt``, which reproduces the accuracy run."""
    return {fidelity_child.REQUEST_ENV: str(request)} if request is not None else {}


def evaluate(
    exp: Experiment,
    checkpoint: str,
    out_dir: Path,
    log_dir: Path,
    pre: child.Prestarted | None = None,
    fidelity_request: Path | None = None,
) -> EvalResult:
    """Score ``checkpoint`` with lm-eval; ``pre``: its child, prestarted for this checkpoint;
    ``fidelity_request``: what the child computes after lm-eval (``fidelity_stage``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = probe(exp.serve.python)
    bos = bos_check(exp, checkpoint)
    if bos.warning:
        print(f"WARNING: {bos.warning}", flush=True)
    task_dir = _tasks(exp, out_dir)
    lm_out = out_dir / "lm_eval"
    log_path = log_dir / "lm_eval.log"
    env, lm_env = child_env(exp), lm_eval_env(exp)
    what = f"lm-eval ({exp.serve.backend})"
    stage = f"evaluate {exp.serve.backend}"
    t0 = time.perf_counter()
    server_cmd = None
    if exp.serve.backend == "vllm_server":
        port = vllm_server.free_port()
        server_cmd = server_argv(exp, checkpoint, port)
        if fidelity_request is not None:  # its prompt log-probabilities, read after lm-eval (fidelity_vllm)
            server_cmd += ["--max-logprobs", str(json.loads(fidelity_request.read_text())["top_k"])]
        (out_dir / "server_command.txt").write_text(" ".join(server_cmd) + "\n")
        server_log = log_dir / "vllm_server.log"
        with vllm_server.running(server_cmd, port, server_log, exp.serve.startup_timeout_s, env) as (base_url, _):
            argv = lm_eval_argv(exp, checkpoint, lm_out, task_dir, base_url)
            (out_dir / "command.txt").write_text(command_text(argv, lm_env))
            # the fidelity stage after lm-eval, in the same child, while the server is still up
            with_fidelity = lm_env | fidelity_env(fidelity_request)
            child.run(argv, log_path, exp.eval.timeout_s, what, env=with_fidelity, stage=stage)
        kernel_log = server_log
    else:
        argv = lm_eval_argv(exp, checkpoint, lm_out, task_dir)
        (out_dir / "command.txt").write_text(command_text(argv, lm_env))
        if pre is not None and pre.command == argv:
            pre.run(exp.eval.timeout_s, what, stage=stage)
        else:
            if pre is not None:  # started for another command: not this one's
                pre.cancel()
            env = lm_env | fidelity_env(fidelity_request)
            child.run(argv, log_path, exp.eval.timeout_s, what, env=env, stage=stage)
        kernel_log = log_path
    results = sorted(lm_out.rglob("results_*.json"))
    if not results:
        raise RuntimeError(f"lm-eval wrote no results JSON under {lm_out}; log: {log_path}")
    return EvalResult(
        results_path=str(results[-1]),
        samples_paths=[str(p) for p in sorted(results[-1].parent.glob("samples_*.jsonl"))],
        output_dir=str(out_dir),
        backend=exp.serve.backend,
        lm_eval_model=lm_eval_model(exp),
        device=device_of(exp),
        platform=platform,
        kernels=kernels_in(kernel_log) if exp.serve.backend != "hf" else [],
        bos=bos,
        seconds=round(time.perf_counter() - t0, 3),
        command=argv,
        server_command=server_cmd,
    )
