"""Run identity and the results store.

A run's key is a hash of what determines its result: model and revision, recipe,
calibration, eval settings and library versions. A finished run leaves one small JSON in
``results/runs/`` named by its key; a run whose key is there is reused, not recomputed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

from autoround_exp import record
from autoround_exp.config import (
    AUTOROUND_METHODS,
    CALIBRATED_METHODS,
    METHOD_KNOBS,
    OPTIONAL_KNOBS,
    Experiment,
    data_files,
)
from autoround_exp.fsutil import DigestCache, digest, file_digest, write_atomic
from autoround_exp.record import FailureRecord, RunRecord

QUANT_LIBS = ("torch", "transformers", "llmcompressor", "auto-round", "compressed-tensors")
# What of the serve environment's probe decides an evaluation's numbers.
EVAL_PLATFORM = ("lm_eval", "torch", "vllm", "transformers", "compressed_tensors", "device_name", "compute_capability")


def versions(names=QUANT_LIBS + ("lm-eval",)) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def quant_versions(exp: Experiment) -> dict[str, str | None]:
    """The quantization libraries' versions where the job's children run: this environment's,
    or its stack's."""
    return run_versions(exp, QUANT_LIBS)


def run_versions(exp: Experiment, names=QUANT_LIBS + ("lm-eval",)) -> dict[str, str | None]:
    env = exp.stack_env
    if env is None:
        return versions(names)
    return {name: env.version(name) for name in names}


class IdentityError(RuntimeError):
    """What a run's identity needs cannot be had; the message says what to set."""


_caches: dict[Path | None, DigestCache] = {}


def digest_cache(exp: Experiment | None) -> DigestCache:
    path = Path(exp.paths.work).resolve() / "cache" / "content-digests.json" if exp is not None else None
    return _caches.setdefault(path, DigestCache(path))


def source_identity(source: str, cache: DigestCache | None = None) -> str | dict:
    """A hub id as it is; a local file or model directory by its whole content, not its path,
    so that two clones (or a moved copy) of the same model and data share their runs' keys."""
    cache = cache or DigestCache(None)
    p = Path(source).expanduser()
    if p.is_file():
        return {"file": p.name, "content": cache.digest(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return {"dir": {f.relative_to(p).as_posix(): cache.digest(f) for f in files}}
    return source


COMMIT = re.compile(r"[0-9a-f]{40}")
_revisions: dict[tuple[str, str], str] = {}


def hub_revision(repo: str, revision: str) -> str:
    """The commit ``revision`` of hub model ``repo`` names now: asked of the hub when online,
    read from the local Hugging Face cache offline. A branch such as "main" moves; its commit
    goes into the run key, so a model updated on the hub is a new run, never a reused result."""
    if COMMIT.fullmatch(revision):
        return revision
    if (repo, revision) in _revisions:
        return _revisions[(repo, revision)]
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    asked, reason = None, ""
    if not offline:
        try:
            from huggingface_hub import HfApi

            asked = HfApi().model_info(repo, revision=revision, timeout=15).sha
        except Exception as e:  # no network, no access: the cache may still know it
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / revision
    commit = asked or (ref.read_text().strip() if ref.is_file() else None)
    if commit is None:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub did not answer ({reason})"
        raise IdentityError(
            f"model.path={repo} model.revision={revision}: cannot tell which commit that is ({why}, and the local "
            f"cache {ref.parent.parent} has no ref {revision}); download it first (hf download {repo}), "
            "or set model.revision to a 40-character commit hash."
        )
    _revisions[(repo, revision)] = commit
    return commit


def pin_revision(exp: Experiment) -> Experiment:
    """``exp`` with a hub model's revision resolved to its commit (local folders as they are):
    the key, the record and the quantization's download all name the same weights."""
    m = exp.model
    if Path(m.path).expanduser().exists():
        return exp
    commit = hub_revision(m.path, m.revision)
    if commit == m.revision:
        return exp
    return replace(exp, model=replace(m, revision=commit))


def model_identity(exp: Experiment) -> dict:
    """The unquantized model's weights: a local folder by content, a hub model by its commit."""
    m = exp.model
    local = Path(m.path).expanduser().exists()
    ident = {"model": source_identity(m.path, digest_cache(exp)), "revision": None if local else m.revision}
    return ident | {"dtype": m.dtype}


def quant_identity(exp: Experiment) -> dict:
    m, q = exp.model, exp.method
    cache = digest_cache(exp)
    ident = model_identity(exp) | {"method": q.name}
    if not exp.quantized:
        return ident
    ident |= {"scheme": exp.scheme.preset, "ignore": list(m.ignore), "versions": quant_versions(exp)}
    if exp.stack_env is not None:  # every resolved package, not only the five named above
        ident["stack_digest"] = exp.stack_env.digest
    knobs = {k: getattr(q, k) for k in METHOD_KNOBS[q.name] if not (k in OPTIONAL_KNOBS and getattr(q, k) is None)}
    if q.name in AUTOROUND_METHODS:
        ident["autoround"] = knobs  # under this name since the first keys: they stay as they were
    elif knobs:
        ident["knobs"] = knobs
    if q.deterministic:  # only when set: the keys of every earlier run stay as they were
        ident["deterministic"] = True
    if q.name in CALIBRATED_METHODS or exp.scheme.calibrate_rtn:
        ident["calibration"] = asdict(exp.calibration) | {"source": source_identity(exp.calibration.source, cache)}
        if exp.seed is not None:
            ident["seed"] = exp.seed  # torch's seed; calibration.seed already carries it
    return ident


def eval_identity(exp: Experiment, quant_key: str) -> dict:
    ev = exp.eval
    ident = {
        "quant": quant_key,
        "task": exp.lm_eval_task,
        "task_yaml": ev.task_yaml,
        "num_fewshot": ev.num_fewshot,
        "add_bos_token": ev.add_bos_token,
        "apply_chat_template": ev.apply_chat_template,
        "fewshot_as_multiturn": ev.fewshot_as_multiturn,
        "limit": ev.limit,
        "max_gen_toks": ev.max_gen_toks,
        "seed": ev.seed,
        "backend": exp.serve.backend,
        "platform": {k: exp.serve_choice.platform.get(k) for k in EVAL_PLATFORM},
    }
    if exp.serve.backend in ("vllm", "vllm_server"):
        ident["engine"] = asdict(exp.model.vllm)
    if exp.eval_data is not None:
        ident["data"] = {s: file_digest(p) for s, p in data_files(exp.eval, exp.eval_data.path).items()}
    return ident


def keys(exp: Experiment) -> tuple[str, str]:
    """(quantization key, run key). A hub model's revision must be pinned first (``pin_revision``)."""
    qkey = digest(quant_identity(exp))
    return qkey, digest(eval_identity(exp, qkey))


class Store:
    def __init__(self, root: str | Path):
        self.runs = Path(root) / "runs"
        self.samples = Path(root) / "samples"  # per-document scores, for paired tests
        self.failed = Path(root) / "failed"
        self.fidelity = Path(root) / "fidelity"  # per-position figures against the base, for paired tests

    def path_of(self, key: str) -> Path | None:
        return next(iter(self.runs.glob(f"*__{key}.json")), None)

    def find(self, key: str) -> RunRecord | None:
        path = self.path_of(key)
        return record.load(path) if path else None

    def save(self, rec: RunRecord, samples: dict | None = None) -> Path:
        """The per-document scores first: a record on disk always has its samples."""
        if samples is not None:
            write_atomic(self.samples / f"{rec.key}.json", json.dumps(samples, separators=(",", ":")))
        path = self.runs / f"{rec.name}__{rec.key}.json"
        write_atomic(path, rec.to_json())
        return path

    def samples_of(self, key: str) -> dict | None:
        path = self.samples / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def fidelity_of(self, key: str) -> Path:
        return self.fidelity / f"{key}.npz"

    def save_failure(self, rec: FailureRecord) -> Path:
        """Failed jobs go to ``failed/``: kept for the post-mortem, never found as finished."""
        path = self.failed / f"{rec.name}__{rec.key}.json"
        write_atomic(path, rec.to_json())
        return path

    def failures(self) -> list[FailureRecord]:
        return [record.load_any(p) for p in sorted(self.failed.glob("*.json"))]

    def records(self) -> list[RunRecord]:
        return [record.load(p) for p in sorted(self.runs.glob("*.json"))]

    def pending(self) -> list[Path]:
        """Records (finished and failed) not yet in MLflow, for ``tracking sync``."""
        out = []
        for path in sorted([*self.runs.glob("*.json"), *self.failed.glob("*.json")]):
            if record.load_any(path).tracking.status == "pending":
                out.append(path)
        return out
