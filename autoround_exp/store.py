"""Run identity and the results store.

A run's key is a hash of what determines its result: model and revision, recipe,
calibration, eval settings and library versions. A finished run leaves one small JSON in
``results/runs/`` named by its key; a run whose key is there is reused, not recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from autoround_exp.config import AUTOROUND_METHODS, Experiment, data_files

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


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str | None:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None


# A local file larger than this is identified by its size and its first and last
# HASH_EDGE bytes: a sweep validates each job, and reading 16 GB of weights per job would not do.
HASH_WHOLE = 64 * 2**20
HASH_EDGE = 8 * 2**20


def content_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= HASH_WHOLE:
            h.update(f.read())
        else:
            h.update(str(size).encode())
            h.update(f.read(HASH_EDGE))
            f.seek(size - HASH_EDGE)
            h.update(f.read())
    return h.hexdigest()[:16]


def source_identity(source: str) -> str | dict:
    """A hub id as it is; a local file or model directory by its content, not its path, so
    that two clones (or a moved copy) of the same model and data share their runs' keys."""
    p = Path(source).expanduser()
    if p.is_file():
        return {"file": p.name, "content": content_digest(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return {"dir": {f.relative_to(p).as_posix(): content_digest(f) for f in files}}
    return source


def quant_identity(exp: Experiment) -> dict:
    m, q = exp.model, exp.method
    ident = {"model": source_identity(m.path), "revision": m.revision, "dtype": m.dtype, "method": q.name}
    if not exp.quantized:
        return ident
    ident |= {"scheme": exp.scheme.preset, "ignore": list(m.ignore), "versions": versions(QUANT_LIBS)}
    if q.name in AUTOROUND_METHODS:
        ident["autoround"] = {k: v for k, v in asdict(q).items() if k not in ("name", "label")}
    if q.name in AUTOROUND_METHODS or exp.scheme.calibrate_rtn:
        ident["calibration"] = asdict(exp.calibration) | {"source": source_identity(exp.calibration.source)}
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
    qkey = digest(quant_identity(exp))
    return qkey, digest(eval_identity(exp, qkey))


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (created if needed), held for the block. Parallel jobs
    (launcher=submitit_*) that need the same run or checkpoint take turns: the second finds
    the first's result and reuses it. The OS releases the lock if its holder is killed."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` under a temporary name and rename it over ``path``, so a reader never
    sees half a file; leave ``path`` alone when it already holds ``text``. True if written."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return True


class Store:
    def __init__(self, root: str | Path):
        self.runs = Path(root) / "runs"
        self.samples = Path(root) / "samples"  # per-document scores, for paired tests

    def path_of(self, key: str) -> Path | None:
        return next(iter(self.runs.glob(f"*__{key}.json")), None)

    def find(self, key: str) -> dict | None:
        path = self.path_of(key)
        return json.loads(path.read_text()) if path else None

    def save(self, record: dict, samples: dict | None = None) -> Path:
        """The per-document scores first: a record on disk always has its samples."""
        if samples is not None:
            write_atomic(self.samples / f"{record['key']}.json", json.dumps(samples, separators=(",", ":")))
        path = self.runs / f"{record['name']}__{record['key']}.json"
        write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        return path

    def samples_of(self, key: str) -> dict | None:
        path = self.samples / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_failure(self, record: dict) -> Path:
        """Failed jobs go to ``failed/``: kept for the post-mortem, never found as finished."""
        failed = self.runs.parent / "failed"
        failed.mkdir(parents=True, exist_ok=True)
        path = failed / f"{record['name']}__{record['key']}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return path

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.runs.glob("*.json"))]
