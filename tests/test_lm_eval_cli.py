"""The evaluation child's lm-eval entry: lm-eval's stock task index is skipped only when the
run's own task folder defines every task asked for, and the task still loads, with its own data."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from autoround_exp import backend, evaluate, lm_eval_cli
from autoround_exp.preflight import validate
from tests.support import compose_cfg


@pytest.fixture
def task_dir(tmp_path):
    """The task folder the harness writes for the tiny Llama's gsm8k (stock YAML, own data)."""
    exp = validate(compose_cfg(["serve=hf"]))
    evaluate.write_task(exp, tmp_path, evaluate.stock_task_yaml(backend.probe(exp.serve.python), exp.eval.task_yaml))
    return tmp_path, exp.lm_eval_task


def test_own_tasks_only_when_the_folder_defines_every_task(task_dir):
    folder, name = task_dir
    base = ["run", "--model", "hf", "--include_path", str(folder)]
    assert lm_eval_cli.own_tasks_only([*base, "--tasks", name])
    assert lm_eval_cli.own_tasks_only([*base[:3], f"--include_path={folder}", f"--tasks={name}"])
    assert not lm_eval_cli.own_tasks_only([*base, "--tasks", f"{name},gsm8k"])  # a stock task: index it
    assert not lm_eval_cli.own_tasks_only(["run", "--tasks", "gsm8k"])  # no own folder


def test_skip_stock_index_builds_only_the_own_folder(task_dir):
    folder, name = task_dir
    """In a fresh interpreter (the patch is process-wide): TaskManager() then knows only the
    folder's task, which loads with the stock task's config through its include."""
    code = (
        "from autoround_exp import lm_eval_cli\n"
        "lm_eval_cli.skip_stock_index(); lm_eval_cli.skip_stock_index()\n"
        "from lm_eval.tasks import TaskManager\n"
        f"tm = TaskManager(include_path={str(folder)!r})\n"
        "print(tm.all_tasks)\n"
        f"t = tm.load([{name!r}])['tasks'][{name!r}]\n"
        "print(t.config.output_type, t.config.num_fewshot, len(t.eval_docs))\n"
        "print(len(TaskManager(include_defaults=True).all_tasks) > 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    own, config, explicit = out.stdout.strip().splitlines()
    assert own == str([name])
    kind, shots, docs = config.split()
    assert (kind, shots) == ("generate_until", "5") and int(docs) > 0  # stock gsm8k's settings, own data
    assert explicit == "True"  # a caller that asks for the stock tasks still gets them


def test_the_patch_is_lm_evals_own_parameter():
    import inspect

    from lm_eval.tasks import TaskManager

    init = TaskManager.__dict__["__init__"]
    func = init.func if isinstance(init, functools.partialmethod) else init
    assert "include_defaults" in inspect.signature(func).parameters


@pytest.mark.parametrize("python", [sys.executable, str(backend.SERVE_VENV_PYTHON)], ids=["quantize env", "serve env"])
def test_the_entry_keeps_transformers_from_importing_sklearn_and_leaves_it_importable(python):
    """In each environment: once the entry is imported (warm.py imports it first), transformers'
    generation code loads without scikit-learn, and lm-eval's metrics that need it can import it."""
    code = (
        "import sys, autoround_exp.lm_eval_cli, transformers.generation.candidate_generator;"
        "print('sklearn' in sys.modules); import sklearn.metrics; print('sklearn' in sys.modules)"
    )
    env = evaluate.lm_eval_env(validate(compose_cfg(["serve=hf"])))
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]
