"""The door: a composed config checked whole before any work. ``config_checks.validate`` checks
the config alone; this module adds what asks other processes — the tracking server (one
request), the serve environment (which backend can run the scheme; a child process, kept on
disk), the GPU a model must be quantized on, and a hub model's revision pinned to a commit.
It sits above config, serve, store and tracking, so none of them imports upward."""

from __future__ import annotations

import os
from dataclasses import replace

from omegaconf import DictConfig

from autoround_exp import config_checks
from autoround_exp.backend import ServeEnvError, choose, hf_choice
from autoround_exp.config import ConfigError, Experiment, redact_uri
from autoround_exp.stack import StackError, prepare
from autoround_exp.store import IdentityError, pin_revision
from autoround_exp.tracking import check_reachable


def validate(cfg: DictConfig, serve_env: bool = True) -> Experiment:
    """``config_checks.validate``, then (with ``serve_env``) the tracking server and the backend that
    evaluates the run, which becomes ``exp.serve_choice``. Raises ``ConfigError``."""
    exp = config_checks.validate(cfg)
    if not serve_env:
        return exp
    t = exp.tracking
    if t.enabled and (problem := check_reachable(t)) is not None:
        raise ConfigError(
            f"tracking.uri={redact_uri(t.uri)} does not answer ({problem}); start the MLflow "
            "server (mlflow server --host 127.0.0.1 --port PORT), fix tracking.uri, or set tracking=sqlite "
            "or tracking.enabled=false."
        )
    sv, m = exp.serve, exp.model
    try:
        choice = choose(sv.backend, exp.scheme.preset if exp.quantized else None, sv.python, m.modality)
    except ServeEnvError as err:
        raise ConfigError(str(err)) from err
    if sv.device == "cuda" and not choice.platform.get("cuda"):
        raise ConfigError(
            f"serve.device=cuda, but {choice.python} sees no CUDA GPU (serve={choice.backend}); "
            "set serve.device=auto or cpu, or run where a GPU is visible."
        )
    resolved = {
        **exp.resolved,
        "serve": {**exp.resolved["serve"], "backend": choice.backend, "requested": choice.requested},
    }
    serve = replace(sv, backend=choice.backend, python=choice.python)
    return replace(exp, serve=serve, serve_choice=choice, resolved=resolved)


def check_quantize_device(exp: Experiment) -> None:
    """A model that must be quantized on a GPU (``model.quantize_device=cuda``) where this
    environment's torch sees none: refused before anything is downloaded or loaded, because
    llm-compressor would only warn and run for days on the CPU."""
    if not exp.quantized or exp.model.quantize_device != "cuda":
        return
    import torch  # only here: the CPU-only path never pays for it

    if torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(
        f"model={exp.model.name} is quantized on a GPU (model.quantize_device=cuda), but this environment's "
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) says torch.cuda.is_available() "
        f"is False{f' (CUDA_VISIBLE_DEVICES={visible!r})' if visible is not None else ''}. Run on a machine whose "
        "GPU this torch can use (`make env` there installs the CUDA build), or set model.quantize_device=cpu to "
        "quantize on the CPU anyway (an 8B AutoRound job takes days there)."
    )


def at_the_door(exp: Experiment) -> Experiment:
    """What a validated run still needs from outside the config, checked before any work:
    a GPU where the model must be quantized on one, and a hub model's revision pinned to the
    commit it names now (``store.pin_revision``)."""
    check_quantize_device(exp)
    try:
        return pin_revision(exp)
    except IdentityError as e:
        raise ConfigError(str(e)) from e


def with_stack(exp: Experiment) -> Experiment:
    """``exp`` in its stack's environment, resolved and built on first use (``stack.prepare``):
    the quantize child, and the hf evaluation with the fidelity child, run there; a vLLM backend
    stays in the serve environment. Raises ``StackError`` (the resolver's or installer's reason)
    for a stack that cannot be had: in a sweep, that job fails and the others go on."""
    env = prepare(exp.stack, exp.paths.work)
    if env is None:
        return exp
    serve, choice = exp.serve, exp.serve_choice
    if choice is not None and choice.backend == "hf":
        try:
            choice = hf_choice(choice.requested, env.python, choice.reason, exp.model.modality)
        except ServeEnvError as err:
            raise StackError(f"stack={env.name}: {err}") from err
        serve = replace(serve, python=env.python)
    resolved = {**exp.resolved, "stack": {**exp.resolved["stack"], "digest": env.digest, "moved": env.moved}}
    return replace(exp, serve=serve, serve_choice=choice, stack_env=env, resolved=resolved)
