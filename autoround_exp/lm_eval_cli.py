"""``python -m lm_eval`` with two additions, each a no-op where it does not apply.

The evaluation child runs this instead of ``lm_eval`` wherever this package imports in the
serving environment; the arguments are lm-eval's own and its results are unchanged.

- ``vision_compat``: a vision-language model in an environment without torchvision, where
  lm-eval's ``hf-multimodal`` could not load the model's processor otherwise.
- No scikit-learn at start-up: transformers imports it for assisted generation, which an
  evaluation never runs (about 1.5 of an hf evaluation's 10 s of imports on 2 CPU cores).
  lm-eval's metrics that use it (f1, mcc) still import it when they run.
- The fidelity stage after lm-eval, in the same process, where the harness names a request
  (``fidelity_child.REQUEST_ENV``): through transformers (``fidelity_child``) after lm-eval's
  transformers backend, through vLLM's prompt log-probabilities (``fidelity_vllm``) after its vllm
  one, and through the server's completions API after ``local-completions`` against ``vllm serve``.
- Own tasks only: when every task named by ``--tasks`` is defined by a YAML in
  ``--include_path`` (the harness writes one per run; it includes lm-eval's stock task by
  path), lm-eval's ``TaskManager`` is built with ``include_defaults=False``. The CLI would
  otherwise index all of lm-eval's built-in task YAMLs first (about 14,000 names, 14 s on
  2 CPU cores) on every evaluation. A task that the folder does not define leaves the
  stock index on.
"""

from __future__ import annotations

import functools
import sys

MULTIMODAL = ("hf-multimodal", "vllm-vlm")  # lm-eval's models that load a processor


def without_assisted_generation_sklearn() -> None:
    """Answer transformers' cached ``is_sklearn_available()`` with False while scikit-learn is
    hidden (None in ``sys.modules``), then un-hide it: transformers skips its import-time
    ``from sklearn.metrics import roc_curve``; anything else may still import scikit-learn."""
    if "sklearn" in sys.modules:
        return
    sys.modules["sklearn"] = None
    try:
        from transformers.utils import is_sklearn_available

        is_sklearn_available()
    except ImportError:  # no transformers here: nothing to skip
        pass
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


# at import: ``warm.py`` imports this module before lm-eval's (evaluate.prestart)
without_assisted_generation_sklearn()


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def own_tasks_only(argv: list[str]) -> bool:
    """True if every ``--tasks`` name is defined in ``--include_path`` alone."""
    include, tasks = _option(argv, "--include_path"), _option(argv, "--tasks")
    if not include or not tasks:
        return False
    from lm_eval.tasks import TaskManager

    own = set(TaskManager(include_path=include, include_defaults=False).all_tasks)
    return all(t.strip() in own for t in tasks.split(",") if t.strip())


def skip_stock_index() -> None:
    """Make ``TaskManager()`` index only ``include_path`` (lm-eval's own parameter)."""
    from lm_eval.tasks import TaskManager

    if not isinstance(TaskManager.__dict__["__init__"], functools.partialmethod):
        TaskManager.__init__ = functools.partialmethod(TaskManager.__init__, include_defaults=False)


def main(argv: list[str]) -> None:
    if _option(argv, "--model") in MULTIMODAL:
        from autoround_exp import vision_compat

        vision_compat.apply()
    if own_tasks_only(argv):
        skip_stock_index()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    fidelity_after_evaluation()


def fidelity_after_evaluation() -> None:
    """The run's fidelity stage in this process (torch and transformers loaded already), where
    the harness asked for it: ``fidelity_child.REQUEST_ENV`` names the request."""
    import os

    request = os.environ.get("AUTOROUND_EXP_FIDELITY_REQUEST")
    if not request:
        return
    import json
    from pathlib import Path

    req = json.loads(Path(request).read_text())
    if "engine" in req:  # lm-eval's vLLM backend scored the run, or `vllm serve` (still up)
        from autoround_exp import fidelity_vllm

        fidelity_vllm.after_evaluation(req, _option(sys.argv[1:], "--model_args"))
    else:
        from autoround_exp import fidelity_child

        fidelity_child.after_evaluation(request)


if __name__ == "__main__":
    main(sys.argv[1:])
