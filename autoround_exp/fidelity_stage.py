"""The fidelity stage of a job (``fidelity=kld``): the checkpoint's next-token distributions
against the unquantized model's on a fixed text, in a child process (``fidelity_child``).

The base's distributions are stored once per identity (the model's weights, the text's
content, seqlen, max_tokens, top_k) under ``<paths.work>/fidelity/``: the sweep's base job
makes them, and every quantized job of that model compares against them. The per-position
figures go to the results store (``fidelity/<key>.npz``) for paired tests between checkpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autoround_exp import child, store
from autoround_exp.config import Experiment
from autoround_exp.fidelity import SUMMARY, Fidelity, FidelitySettings, Figure
from autoround_exp.fsutil import digest, locked

TIMEOUT_S = 4 * 3600


def text_of(exp: Experiment) -> str | None:
    return exp.fidelity.data_path or exp.model.fidelity_text


def settings_of(exp: Experiment) -> FidelitySettings | None:
    text = text_of(exp)
    if text is None:
        return None
    f = exp.fidelity
    sha = store.digest_cache(exp).digest(Path(text).expanduser())
    return FidelitySettings(text=text, text_sha256=sha, seqlen=f.seqlen, max_tokens=f.max_tokens, top_k=f.top_k)


def why_not(exp: Experiment) -> str | None:
    """Why this run's fidelity is not measured (None: it is)."""
    if exp.model.modality != "text":
        return "a vision-language model: the stage compares text models only so far"
    if text_of(exp) is None:
        return f"no text for {exp.model.name}: set fidelity.data_path to a .txt or .jsonl file"
    return None


def positions_path(exp: Experiment, key: str) -> Path:
    """Where the run's per-position figures go: absolute, as the record keeps it, so that a
    report run from another folder finds them (``paths.results`` may be relative)."""
    return store.Store(Path(exp.paths.results).resolve()).fidelity_of(key)


def base_path(exp: Experiment, settings: FidelitySettings) -> Path:
    ident = {"base": store.model_identity(exp), "settings": settings.model_dump(exclude={"text"})}
    return Path(exp.paths.work).resolve() / "fidelity" / f"base-{digest(ident)}.npz"


def measure(exp: Experiment, checkpoint: str, key: str, logs: Path) -> Fidelity | None:
    """The run's fidelity; for the unquantized run, its distributions stored (once) and None."""
    settings = settings_of(exp)
    if (reason := why_not(exp)) is not None:
        return None if not exp.quantized else Fidelity(settings=settings, measured=False, reason=reason)
    base = base_path(exp, settings)
    work = Path(exp.paths.work).resolve()
    model = checkpoint if exp.quantized else None
    made = False
    with locked(work / "locks" / f"fidelity-{base.stem}.lock"):  # made once, whoever asks first
        if not base.is_file():  # and compared in the same process
            _child(exp, settings, base, logs, make_base=True, model=model, key=key)
            print(f"[fidelity] {exp.model.name}: the base's distributions stored, {base}", flush=True)
            made = True
    if not exp.quantized:
        return None
    if not made:
        _child(exp, settings, base, logs, make_base=False, model=model, key=key)
    s = json.loads((work / "fidelity" / key / "summary.json").read_text())
    return Fidelity(
        settings=settings,
        measured=True,
        backend=f"hf {s['dtype']}",
        base=str(base),
        chunks=s["chunks"],
        positions=s["positions"],
        vocab=s["vocab"],
        exact=s["exact"],
        token_sha256=s["token_sha256"],
        figures={name: Figure(**s[name]) for name in SUMMARY},
        per_position=str(positions_path(exp, key)),
        seconds=s["seconds"],
    )


def _child(
    exp: Experiment, settings: FidelitySettings, base: Path, logs: Path, make_base: bool, model: str | None, key: str
) -> None:
    out = Path(exp.paths.work).resolve() / "fidelity" / key
    out.mkdir(parents=True, exist_ok=True)
    req = settings.model_dump(include={"text", "seqlen", "max_tokens", "top_k"}) | {
        "text": str(Path(settings.text).expanduser()),
        "base_model": exp.model.path,
        "dtype": exp.model.dtype,
        "base_revision": exp.model.revision if not Path(exp.model.path).expanduser().exists() else None,
        "base": str(base),
        "make_base": make_base,
        "model": model,
        "out": str(positions_path(exp, key)),
        "summary": str(out / "summary.json"),
    }
    (out / "request.json").write_text(json.dumps(req, indent=2))
    argv = [sys.executable, "-m", "autoround_exp.fidelity_child", "run", str(out / "request.json")]
    log = logs / ("fidelity-base.log" if make_base and model is None else "fidelity.log")
    child.run(argv, log, TIMEOUT_S, "fidelity", stage="fidelity")
