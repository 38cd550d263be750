"""Helpers the test modules share: composing configs, running run.py and lm-eval by hand,
stores shaped like `make demo`'s, the README block checked against records, real MLflow
servers, and the serve environment's processes. Test modules import from here, never from
each other; fixtures are in conftest.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from autoround_exp import backend
from autoround_exp.config import register_configs
from autoround_exp.preflight import validate
from autoround_exp.report import compact, cost, fidelity, runs, tables
from tools import gpu_check
from tools.mlflow_server import start_mlflow_server, stop_mlflow_server  # noqa: F401 (the tests' helpers)

ROOT = Path(__file__).resolve().parents[1]


CONF = ROOT / "conf"

README_MAX_LINES = 250  # the README is a page


def committed_readme() -> str:
    """The README as the project ships it (git's HEAD in a clone), not as a user's own sweeps
    have regenerated it in the working tree."""
    shipped = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:README.md"], capture_output=True, text=True)
    return shipped.stdout if shipped.returncode == 0 else (ROOT / "README.md").read_text()


# The real-vLLM tests: slow, and only where `make env` built the serve environment.
VLLM_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(not backend.SERVE_VENV_PYTHON.is_file(), reason="no .venv-serve: run `make env`"),
]


def compose_cfg(overrides: list[str] | None = None, hydra: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides or [], return_hydra_config=hydra)


def gpu_available() -> bool:
    """A CUDA GPU that nvidia-smi can see (the serve and quantize environments both need one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def hand_written_gsm8k_arith_task(tasks: Path, stock_gsm8k_yaml: str | Path) -> Path:
    """lm-eval's stock gsm8k task on the tiny model's data, as a user would write it by hand."""
    import yaml

    from autoround_exp.assets import asset

    data = Path(asset("data/arith_gsm8k"))
    tasks.mkdir(parents=True, exist_ok=True)
    task = {
        "include": str(stock_gsm8k_yaml),
        "task": "gsm8k_arith",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}},
    }
    (tasks / "gsm8k_arith.yaml").write_text(yaml.safe_dump(task))
    return tasks


def lm_eval_by_hand(
    python: str,
    stock_gsm8k_yaml: str | Path,
    workdir: Path,
    model: str,
    model_args: str,
    limit: int,
    extra: tuple[str, ...] = (),
    env: dict | None = None,
) -> dict[str, float]:
    """``python -m lm_eval`` on the tiny model's gsm8k, 5-shot, typed as a user would, without
    the harness; returns the metrics under the names the harness records them."""
    import subprocess

    from autoround_exp import lmeval_results

    tasks = hand_written_gsm8k_arith_task(workdir / "tasks", stock_gsm8k_yaml)
    out = workdir / "out"
    argv = [python, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "gsm8k_arith"]
    argv += ["--include_path", str(tasks), "--num_fewshot", "5", "--limit", str(limit), "--output_path", str(out)]
    subprocess.run([*argv, *extra], check=True, capture_output=True, timeout=1200, env=env)
    results = lmeval_results.load(next(out.rglob("results_*.json")))
    return lmeval_results.mlflow_metrics(lmeval_results.metrics(results))


# The test session's checkpoint folder (set by conftest.py's session fixture), shared by every
# module and pytest-xdist worker: the harness's quantization key and lock make each config once.
SHARED_CHECKPOINTS = "AUTOROUND_EXP_TEST_CHECKPOINTS"


# The fidelity stage (on by default) is left out of the runs of tests that are not about it: a
# child process per run, about 6 s each on 2 cores, over the suite's ~100 runs. The tests of the
# stage (test_sweep_integration, test_fidelity_child) ask for it.
NO_FIDELITY = "fidelity=none"


def paths_args(workdir: Path, share_checkpoints: bool = True, fidelity: bool = False) -> list[str]:
    """run.py overrides that keep a test's results, outputs and MLflow store in ``workdir``;
    its checkpoints in the session's shared folder, unless the test must see them made (a kill
    mid-quantization, the quantize stage's progress); ``NO_FIDELITY`` unless ``fidelity``."""
    args = [
        f"paths.results={workdir / 'results'}",
        f"paths.work={workdir / 'work'}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_root={workdir / 'mlartifacts'}",
    ]
    if share_checkpoints and os.environ.get(SHARED_CHECKPOINTS):
        args.append(f"paths.checkpoints={os.environ[SHARED_CHECKPOINTS]}")
    return args if fidelity else [*args, NO_FIDELITY]


# The calibration of tests whose assertions do not depend on it, gpu-check's own: a config
# quantized with it in one module (or by the check) is reused by the others (the quantization key).
SMALL_CALIB = gpu_check.SMALL_CALIB


FIXTURE = Path(__file__).parent / "data" / "report" / "results"


ALPHA = 0.05


CHARTQA = ("relaxed_accuracy", "anywhere_accuracy", "exact_match")


def write_run(results: Path, rec: dict, samples: dict | None) -> None:
    (results / "runs" / f"{rec['name']}__{rec['key']}.json").write_text(json.dumps(rec))
    if samples is not None:
        (results / "samples" / f"{rec['key']}.json").write_text(json.dumps(samples))


def variant(rec: dict, samples: dict | None, key: str, **changes) -> tuple[dict, dict | None]:
    r = copy.deepcopy(rec)
    r["key"] = key
    for path, value in changes.items():
        node = r
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return r, copy.deepcopy(samples)


def chartqa_variant(rec: dict, samples: dict | None, key: str) -> tuple[dict, dict]:
    """A run of the fixture relabelled as a tiny VLM's chartqa run with chartqa's three metrics."""
    r = copy.deepcopy(rec)
    r["key"] = key
    r["name"] = "vlm-" + rec["name"]
    r["model"] = {"name": "tiny_vlm", "path": "/x/tiny_vlm", "display_name": "TinyVLM"}
    r["checkpoint_name"] = rec["checkpoint_name"].replace("TinyLlama-Arith", "TinyVLM")
    r["eval"]["task"] = "chartqa_charts"
    r["eval"]["task_versions"] = {"chartqa_charts": 0.0}
    r["config"]["eval"] |= {"num_fewshot": 0, "add_bos_token": False, "apply_chat_template": True}
    strict = next(m for m in rec["table"] if m["filter"] == "strict-match")
    src = samples["gsm8k_arith"]
    scores = {}
    r["table"], results = [], {"name": "chartqa_charts", "alias": "chartqa_charts"}
    for i, metric in enumerate(CHARTQA):
        # three metrics that differ: each drops a different number of right answers
        col = src["exact_match,strict-match"][: 150 - 10 * i] + [0.0] * (10 * i)
        value = sum(col[:150]) / 150
        r["table"].append(strict | {"task": "chartqa_charts", "metric": metric, "filter": "none", "value": value})
        r["table"][-1]["n_shot"], r["table"][-1]["n_samples"] = 0, 150
        results[f"{metric},none"], results[f"{metric}_stderr,none"] = value, strict["stderr"]
        scores[f"{metric},none"] = col[:150]
    r["lm_eval"] = {
        "results": {"chartqa_charts": results},
        "versions": {"chartqa_charts": 0.0},
        "n-shot": {"chartqa_charts": 0},
        "higher_is_better": {"chartqa_charts": dict.fromkeys(CHARTQA, True)},
        "n-samples": {"chartqa_charts": {"original": 150, "effective": 150}},
    }
    r["metrics"] = {}
    return r, {"chartqa_charts": {"doc_id": src["doc_id"][:150], "doc_hash": src["doc_hash"][:150], **scores}}


def make_demo_store(tmp_path: Path) -> Path:
    """A store shaped like `make demo`'s: the tiny Llama scored by hf, vllm and vllm_server
    (W4A16 and W8A8 in vLLM, NVFP4 in hf), both AutoRound paths, and a VLM on chartqa."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    # the stored JSON, as run.py wrote it (the first record layout: read through its migration)
    by = {}
    for path in sorted((results / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        samples = results / "samples" / f"{rec['key']}.json"
        by[rec["name"]] = (rec, json.loads(samples.read_text()) if samples.is_file() else None)
    n = 0

    def add(rec, samples):
        write_run(results, rec, samples)

    for name, (rec, smp) in by.items():
        if "nvfp4" in name:
            continue
        n += 1
        add(*variant(rec, smp, f"vllm{n}", eval__backend="vllm", eval__lm_eval_model="vllm"))
        if name == "tiny_llama-base":
            add(*variant(rec, smp, "server0", eval__backend="vllm_server", eval__lm_eval_model="local-completions"))
    for iters in (0, 200):
        rec, smp = by[f"tiny_llama-w4a16-autoround-iters{iters}"]
        native, smp = variant(
            rec, smp, f"native{iters}", eval__backend="vllm", eval__lm_eval_model="vllm", method="autoround_native"
        )
        native["name"] = f"tiny_llama-w4a16-autoround_native-iters{iters}"
        native["checkpoint_name"] = "TinyLlama-Arith-W4A16-G128-AutoRound-native"
        add(native, smp)
    rtn, rtn_smp = by["tiny_llama-w4a16-rtn"]
    for scorer in ("vllm", "vllm_server"):
        model = "vllm" if scorer == "vllm" else "local-completions"
        w8, smp = variant(rtn, rtn_smp, f"w8a8{scorer}", eval__backend=scorer, eval__lm_eval_model=model, scheme="w8a8")
        w8["name"], w8["config"]["scheme"]["preset"] = "tiny_llama-w8a8-rtn", "W8A8"
        w8["checkpoint_name"] = "TinyLlama-Arith-W8A8-RTN"
        add(w8, smp)
    for i, (rec, smp) in enumerate(by.values()):
        add(*chartqa_variant(rec, smp, f"vlm{i}"))
    return results


def block_of(results: Path, **kwargs) -> str:
    loaded = runs.from_store(results)
    text, _ = compact.render_block(
        runs.sections(loaded), tables.Thresholds(), ALPHA, results / "plots", results.parent, "`results/`", **kwargs
    )
    return text


def visible(block: str) -> list[str]:
    return re.sub(r"<details>.*?</details>", "", block, flags=re.S).strip().splitlines()


def table_rows(block: str, section_prefix: str) -> list[list[str]]:
    """The cells of the compact table under the section whose title starts with the prefix."""
    after = block.split(f"### {section_prefix}", 1)[1].split("\n### ", 1)[0]
    # the section's first table: the plot's image line may come before it
    part = next(p for p in after.split("\n\n") if p.startswith("|"))
    lines = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


NUMBER = re.compile(r"([+−-]?\d+\.\d+)")


def check_block_against_records(block: str, loaded: list[runs.Run]) -> int:
    """Assert each value ± stderr, recovery and Δ in the block's tables against the records;
    the number of cells checked."""
    checked = 0
    for section in runs.sections(loaded):
        title = f"### {section.title}"
        if title not in block:
            continue
        cells = table_rows(block, section.title)
        header, body = cells[0], cells[2:]
        shown = compact.shown_rows(section)
        by_label = {(r.first.short_label, r.first.config.backend): r for r in shown}
        groups = {tables.column_name(c): c for c in tables.columns(section)}
        groups |= {c.split(",", 1)[0]: c for c in tables.columns(section)}
        for row_cells in body:
            backend = row_cells[header.index("Backend")].rstrip(" ⚠") if "Backend" in header else None
            row = by_label.get((row_cells[0], backend)) or next(
                r for r in shown if r.first.short_label == row_cells[0] and backend is None
            )
            rec = row.first.record
            col = None
            for name, cell in zip(header, row_cells, strict=True):
                if name in groups:
                    col = groups[name]  # recovery and Δ vs RTN that follow belong to this metric
                if not cell or name == "Config" or name in compact.FACTS:
                    continue
                stored = rec.metric(col)
                nums = [float(x.replace("−", "-")) for x in NUMBER.findall(cell)]
                if name in ("KLD vs base", "same top"):  # against the base, on the fidelity text
                    # the cell's digits: "0.0172" (mean KLD), "96.8 %" (same top); the base: 0 and 100 %
                    kld = name == "KLD vs base"
                    figure, scale, tol = ("kld_mean", 1, 0.000051) if kld else ("same_top", 100, 0.051)
                    if rec.method == "none":
                        assert cell == ("0" if kld else "100 %"), (name, cell)
                    else:
                        assert nums[0] == pytest.approx(scale * fidelity.value(row, figure), abs=tol), (name, cell)
                elif name == "Output tok/s (× base)":
                    assert nums[0] == pytest.approx(rec.perf.value(cost.THROUGHPUT), abs=0.51), (name, cell)
                    if len(nums) > 1:
                        assert nums[1] == pytest.approx(cost.speedup(section, row), abs=0.0051), (name, cell)
                elif name == "recovery":
                    base_value = tables.baseline_of(section, row).first.record.metric(col).value
                    assert nums[0] == pytest.approx(100 * stored.value / base_value, abs=0.051), (name, cell)
                elif name == "Δ vs RTN":
                    rtn_value = tables.rtn_of(section, row).first.record.metric(col).value
                    assert nums[0] == pytest.approx(stored.value - rtn_value, abs=0.00051), (name, cell)
                else:
                    assert nums[:2] == pytest.approx([stored.value, stored.stderr], abs=0.000051), (name, cell)
                checked += 1
    # upstream-shaped tables: lm-eval's own rendering of each stored record
    for heading, table in re.findall(r"^#### (.+)\n((?:\|.*\n?)+)", block, flags=re.M):
        run = next(r for r in loaded if heading.startswith(r.label) and tables.lm_eval_table(r) == table.strip())
        assert run is not None
        checked += 1
    return checked


def records(workdir: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, map(Path.read_text, (workdir / "results" / "runs").glob("*.json")))}


def mlflow_runs(workdir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoround-exp")
    # the jobs' runs, without the sweeps' parent runs (and the report run of the report CLI)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if not {"autoround_exp.report", "autoround_exp.sweep"} & set(r.data.tags)]


def sweep_runs(workdir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoround-exp")
    runs = client.search_runs([exp.experiment_id], "tags.`autoround_exp.sweep` = 'true'", order_by=["start_time"])
    return client, runs


def run_py(
    workdir: Path, *args: str, check: bool = True, timeout: int = 1800, fidelity: bool = False
) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "run.py"), *args, *paths_args(workdir, fidelity=fidelity)]
    proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def ctrl_c_reaches_python() -> None:
    """preexec_fn of a process a test will Ctrl-C: SIGINT back to its default, so that Python
    installs its KeyboardInterrupt handler as in a terminal. A shell's background job (a CI
    runner's `make test &`) and pytest-xdist's workers have SIGINT ignored, and children inherit it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def serve_processes(workdir: Path) -> list[str]:
    """Live processes of the serve environment (lm-eval, vllm serve, engine cores, workers)
    that work in ``workdir``: started there by a test's run.py, whose children inherit its
    folder. Scoped so that tests running beside each other (pytest -n) see only their own."""
    workdir = Path(workdir).resolve()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (proc / "comm").read_text().strip()
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if "zombie" in state or not cwd.is_relative_to(workdir):
            continue
        # vLLM renames its helpers (VLLM::EngineCore, VLLM::Worker); the rest run .venv-serve's python.
        if ".venv-serve/bin/python" in cmdline or cmdline.startswith("VLLM") or comm.startswith("VLLM"):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def wait_no_serve_processes(workdir: Path, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := serve_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def platform(cuda: bool = False, cc: str | None = None, vllm: str | None = "0.32.0", cpu_ops=()) -> dict:
    return {
        "python": "/serve/bin/python",
        "lm_eval_dir": "/serve/lm_eval",
        "lm_eval": "0.4.13",
        "torch": "2.13.0",
        "vllm": vllm,
        "transformers": "5.19.0",
        "compressed_tensors": "0.17.0",
        "cuda": cuda,
        "device_name": "NVIDIA H100" if cuda else "cpu",
        "compute_capability": cc,
        "cpu_isa": ["avx2"],
        "cpu_ops": list(cpu_ops),
        "torchvision": cuda,  # PyPI's torchvision loads beside CUDA torch only
        "autoround_exp": False,
    }


def opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def experiment(tmp_path: Path, *overrides):
    return validate(
        compose_cfg(
            [f"paths.results={tmp_path}/results", f"paths.work={tmp_path}/work", "tracking.enabled=false", *overrides]
        )
    )


BLACKWELL = platform(True, "10.0")
