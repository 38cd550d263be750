"""The fidelity stage of a job (``fidelity=kld``): the checkpoint's next-token distributions
against the unquantized model's on a fixed text (``fidelity_child``). Where lm-eval's
transformers backend scores the run, its evaluation child computes them right after the accuracy
run, with torch and transformers loaded (``request_for_evaluation``); otherwise, or if that
failed, and for a stored run measured anew, the stage runs the same request in a child of its
own. Where lm-eval's vllm backend scores a text model, the evaluation child reads vLLM's prompt
log-probabilities instead (``fidelity_vllm``), against a base that vLLM computed; where
``vllm serve`` scores it, the same from that server's completions API while it is still up.

The base's distributions are stored once per identity (the model's weights, the text's
content, seqlen, max_tokens, top_k) under ``<paths.work>/fidelity/``: the sweep's base job
makes them, and every quantized job of that model compares against them. The per-position
figures go to the results store (``fidelity/<key>.npz``) for paired tests between checkpoints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from autoround_exp import child, store
from autoround_exp.config import Experiment
from autoround_exp.evaluate import engine_args
from autoround_exp.fidelity import SUMMARY, Fidelity, FidelitySettings, Figure
from autoround_exp.fsutil import digest
from autoround_exp.stack import child_env as stack_child_env

TIMEOUT_S = 4 * 3600


def text_of(exp: Experiment) -> str | None:
    return exp.fidelity.data_path or exp.model.fidelity_text


def images_of(exp: Experiment) -> str | None:
    """A vision-language model's chart questions with their images (None: text only)."""
    if exp.model.modality == "text":
        return None
    return exp.fidelity.images_path or exp.model.fidelity_images


def settings_of(exp: Experiment) -> FidelitySettings | None:
    text = text_of(exp)
    if text is None:
        return None
    f, digests = exp.fidelity, store.digest_cache(exp)
    sha = digests.digest(Path(text).expanduser())
    settings = FidelitySettings(text=text, text_sha256=sha, seqlen=f.seqlen, max_tokens=f.max_tokens, top_k=f.top_k)
    if (images := images_of(exp)) is not None:
        settings.images, settings.max_images = images, f.max_images
        settings.images_sha256 = digests.digest(Path(images).expanduser())
    return settings


def why_not(exp: Experiment) -> str | None:
    """Why this run's fidelity is not measured (None: it is)."""
    if text_of(exp) is None:
        return f"no text for {exp.model.name}: set fidelity.data_path to a .txt or .jsonl file"
    return None


def positions_path(exp: Experiment, key: str) -> Path:
    """Where the run's per-position figures go: absolute, as the record keeps it, so that a
    report run from another folder finds them (``paths.results`` may be relative)."""
    return store.Store(Path(exp.paths.results).resolve()).fidelity_of(key)


def base_path(exp: Experiment, settings: FidelitySettings, engine: str = "hf") -> Path:
    """The base's stored distributions: one per model, text and settings, and per engine (vLLM's
    apart from transformers': each side of a comparison from the same one)."""
    # the files by their content (the paths left out); a text model's as before chart questions came
    same = settings.model_dump(exclude={"text", "images"}, exclude_none=True)
    ident = {"base": store.model_identity(exp), "settings": same}
    if engine != "hf":
        ident["engine"] = engine
    elif exp.stack_env is not None:  # transformers of the stack computes the base too
        ident["stack_digest"] = exp.stack_env.digest
    return Path(exp.paths.work).resolve() / "fidelity" / f"base-{digest(ident)}.npz"


def evaluation_engine(exp: Experiment) -> str | None:
    """What computes the run's fidelity inside its evaluation child, after lm-eval: transformers
    where lm-eval's hf backends score it (torch and transformers loaded: a child of the stage's
    own spends 8 of its 10 s loading them on 2 CPU cores), vLLM's prompt log-probabilities where
    its vllm backend or ``vllm serve`` scores a text model (what vLLM serves, measured). None:
    the stage's own child."""
    if exp.serve.backend == "hf":
        return "hf"
    if exp.serve.backend in ("vllm", "vllm_server") and exp.model.modality == "text":
        return exp.serve.backend  # vllm_server: the server's completions API, while it is up
    return None


@dataclass
class Measured:
    fidelity: Fidelity | None  # None for the unquantized run (its distributions are the base)
    # the part of the stage that ran inside the evaluation child: that stage's time includes it
    seconds_in_evaluation: float = 0.0


def in_evaluation(exp: Experiment) -> bool:
    """Whether the evaluation child computes the run's fidelity (``evaluation_engine``)."""
    return exp.fidelity.enabled and evaluation_engine(exp) is not None and why_not(exp) is None


def request_for_evaluation(exp: Experiment, checkpoint: str, key: str) -> Path | None:
    """The request the evaluation child runs after lm-eval (``fidelity_child.REQUEST_ENV``), any
    earlier attempt's outcome removed; None where it does not run there."""
    if not in_evaluation(exp):
        return None
    settings, engine = settings_of(exp), evaluation_engine(exp)
    base = base_path(exp, settings, engine)
    req = _request(exp, settings, base, checkpoint if exp.quantized else None, key, engine=engine)
    for name in ("done.json", "summary.json", "summary-images.json"):
        (_outdir(exp, key) / name).unlink(missing_ok=True)
    return req


def measure(exp: Experiment, checkpoint: str, key: str, logs: Path) -> Measured:
    """The run's fidelity; for the unquantized run, its distributions stored (once) and None."""
    settings = settings_of(exp)
    if (reason := why_not(exp)) is not None:
        return Measured(None if not exp.quantized else Fidelity(settings=settings, measured=False, reason=reason))
    model = checkpoint if exp.quantized else None
    done = _outdir(exp, key) / "done.json"
    info = json.loads(done.read_text()) if done.is_file() else {}
    base = base_path(exp, settings, evaluation_engine(exp)) if in_evaluation(exp) else None
    in_eval = base is not None and info.get("base") == str(base) and info.get("model") == model  # this run's
    if not in_eval:
        base = base_path(exp, settings)  # apart: transformers, against transformers' base
        req = _request(exp, settings, base, model, key)
        done.unlink(missing_ok=True)
        log = logs / ("fidelity-base.log" if model is None else "fidelity.log")
        python = exp.stack_env.python if exp.stack_env is not None else sys.executable  # the stack's transformers
        argv = [python, "-m", "autoround_exp.fidelity_child", "run", str(req)]
        child.run(argv, log, TIMEOUT_S, "fidelity", env=stack_child_env(exp.stack_env), stage="fidelity")
        info = json.loads(done.read_text())
    if info["made_base"]:
        print(f"[fidelity] {exp.model.name}: the base's distributions stored, {base}", flush=True)
    seconds = info["seconds"] if in_eval else 0.0
    if not exp.quantized:
        return Measured(None, seconds)
    s = json.loads((_outdir(exp, key) / "summary.json").read_text())
    text_only = exp.model.modality != "text" and settings.images is None
    where = (", text only" if text_only else "") + (", in the evaluation child" if in_eval else "")
    fid = _figures(s, where, settings=settings, base=str(base), per_position=str(positions_path(exp, key)))
    if settings.images is not None:
        charts = json.loads((_outdir(exp, key) / "summary-images.json").read_text())
        fid.images = _figures(charts, where, base=str(images_base(base)), per_position=str(images_positions(exp, key)))
    return Measured(fid, seconds)


def _figures(s: dict, where: str, **fields) -> Fidelity:
    """A measurement from the child's summary."""
    return Fidelity(
        measured=True,
        backend=f"{s.get('engine', 'hf')} {s['dtype']}{where}",
        chunks=s["chunks"],
        positions=s["positions"],
        vocab=s["vocab"],
        exact=s["exact"],
        token_sha256=s["token_sha256"],
        figures={name: Figure(**s[name]) for name in SUMMARY},
        seconds=s["seconds"],
        **fields,
    )


def images_base(base: Path) -> Path:
    """The base's distributions on the chart questions, beside its text's."""
    return base.with_name(f"{base.stem}-images.npz")


def images_positions(exp: Experiment, key: str) -> Path:
    path = positions_path(exp, key)
    return path.with_name(f"{path.stem}-images.npz")


def _outdir(exp: Experiment, key: str) -> Path:
    return Path(exp.paths.work).resolve() / "fidelity" / key


def _request(
    exp: Experiment, settings: FidelitySettings, base: Path, model: str | None, key: str, engine: str = "hf"
) -> Path:
    """The child's request, written: the base stored unless it is (under a lock: parallel jobs
    make it once), then ``model`` compared with it; ``engine`` vllm: through vLLM, with the
    accuracy run's engine settings (``engine``, which ``lm_eval_cli`` tells ``fidelity_vllm``
    by); vllm_server: through the server that scored the run (its settings are the server's)."""
    out = _outdir(exp, key)
    out.mkdir(parents=True, exist_ok=True)
    req = settings.model_dump(include={"text", "seqlen", "max_tokens", "top_k"}) | {
        "text": str(Path(settings.text).expanduser()),
        "base_model": exp.model.path,
        "dtype": exp.model.dtype,
        "base_revision": exp.model.revision if not Path(exp.model.path).expanduser().exists() else None,
        "loader": exp.model.loader,
        "trust_remote_code": exp.model.trust_remote_code,
        "base": str(base),
        "make_base": True,
        "lock": str(Path(exp.paths.work).resolve() / "locks" / f"fidelity-{base.stem}.lock"),
        "model": model,
        "out": str(positions_path(exp, key)),
        "summary": str(out / "summary.json"),
        "done": str(out / "done.json"),
    }
    if settings.images is not None:  # a vision-language model: chart questions with their images too
        req |= {
            "images": str(Path(settings.images).expanduser()),
            "max_images": settings.max_images,
            "images_base": str(images_base(base)),
            "images_out": str(images_positions(exp, key)),
            "images_summary": str(out / "summary-images.json"),
        }
    if engine == "vllm":
        args = engine_args(exp) | {"dtype": exp.model.dtype}
        req["engine"] = {k: v for k, v in args.items() if v is not None}
    elif engine == "vllm_server":
        req["engine"] = {"server": True, "dtype": exp.model.dtype}
    (out / "request.json").write_text(json.dumps(req, indent=2))
    return out / "request.json"
