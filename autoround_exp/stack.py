"""Software stacks: the environment a job's children run in, as a sweep axis (``stack=``).

``stack=pinned`` (the default) is the project's own environments. Any other stack is pins and
upgrades over the project's constraints: ``uv pip compile`` resolves them (the pinned versions
as preferences, so only what must move moves), and the resolved list, hashed, names a folder
``<paths.work>/stacks/quantize-<hash>`` where the environment is built once (uv, the project
itself installed without its dependencies) and reused by every later job, sweep and machine
that shares the folder. A stack that does not resolve or install raises ``StackError`` with the
resolver's or installer's own words; the jobs of other stacks go on.

The quantize child, the hf evaluation child and the fidelity child of a job run in its stack's
environment; the stack's resolved versions are part of the quantization's and the evaluation's
identity (``store``), so two stacks' results never mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from autoround_exp.config import ConfigError, StackConfig
from autoround_exp.fsutil import locked, write_atomic
from autoround_exp.record import Stack

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "quantize.txt"
# What only the harness's own process imports (run.py, the report, tracking): the children of
# a job never do, so a stack need not resolve them beside older quantization libraries.
PARENT_ONLY = frozenset({"hydra-core", "hydra-submitit-launcher", "mlflow"})
STAMP = ".stack.json"  # written last: an environment without it is incomplete and rebuilt
RESOLVE_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 3600
REASON_LINES = 12  # of the resolver's or installer's output, in the error


STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_stack(st: StackConfig) -> None:
    """A stack names what it changes: pins (``name==version``, or any specifier) and packages to
    upgrade, each a package name the resolver knows; ``pinned`` changes nothing."""
    if not STACK_NAME.fullmatch(st.name):
        raise ConfigError(f"stack.name={st.name!r} is invalid; use letters, digits, '.', '_' or '-' (e.g. previous).")
    changes = [*st.quantize, *st.upgrade]
    if st.name == "pinned" and changes:
        raise ConfigError(
            "stack.name=pinned is the project's own environments and changes nothing; give a stack with pins "
            "or upgrades its own name (stack.name=mine), or use a preset (stack=previous, stack=latest)."
        )
    if st.name != "pinned" and not changes:
        raise ConfigError(
            f"stack={st.name} changes nothing (stack.quantize and stack.upgrade are empty); pin a release "
            """('stack.quantize=["llmcompressor==0.13.0"]', quoted for Hydra) or name packages to upgrade """
            "(stack.upgrade=[auto-round])."
        )
    for pin in st.quantize:
        try:
            req = Requirement(pin)
        except InvalidRequirement as e:
            raise ConfigError(
                f"stack.quantize has {pin!r}, not a requirement ({e}); write e.g. llmcompressor==0.13.0."
            ) from e
        if not req.specifier:
            raise ConfigError(
                f"stack.quantize has {pin!r} without a version; pin one (e.g. {req.name}==X.Y.Z), or put "
                f"{req.name} in stack.upgrade for its newest release that resolves."
            )
    for name in st.upgrade:
        if not PACKAGE_NAME.fullmatch(name):
            raise ConfigError(f"stack.upgrade has {name!r}; give package names only (e.g. auto-round), no versions.")
    both = {canonicalize_name(Requirement(p).name) for p in st.quantize} & {canonicalize_name(n) for n in st.upgrade}
    if both:
        raise ConfigError(f"stack={st.name} both pins and upgrades {', '.join(sorted(both))}; keep one of the two.")


PACKAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StackError(RuntimeError):
    """A stack that cannot be had: the message has the resolver's or installer's own reason."""


@dataclass(frozen=True)
class StackEnv:
    """A built stack: its interpreter and what it resolved to."""

    name: str
    digest: str  # sha256 of the resolved requirements, 16 hex: the folder and the identity
    python: str
    versions: dict[str, str]  # every resolved package (canonical name -> version)
    resolve_s: float
    build_s: float | None  # None: built before (reused)
    moved: dict[str, str]  # what differs from the pinned constraints: name -> "pinned → stack"

    def version(self, name: str) -> str | None:
        return self.versions.get(canonical(name))

    def record(self) -> Stack:
        build_s = None if self.build_s is None else round(self.build_s, 1)
        return Stack(
            name=self.name,
            digest=self.digest,
            moved=dict(self.moved),
            resolve_s=round(self.resolve_s, 1),
            build_s=build_s,
        )


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.is_file() else shutil.which("uv")
    if found is None:
        raise StackError("building a stack needs uv: `make env` puts it into .venv (or pip install uv==0.13.9).")
    return found


def index_args() -> list[str]:
    """pip's find-links and index URL (a local CPU torch wheel, a mirror), which uv does not read."""
    args = []

    def pip_config(key: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True, timeout=60
            )
            return out.stdout.strip() if out.returncode == 0 else ""
        return ""

    links = os.environ.get("PIP_FIND_LINKS") or pip_config("global.find-links")
    for link in links.split():
        args += ["--find-links", link]
    if url := os.environ.get("PIP_INDEX_URL") or pip_config("global.index-url"):
        args += ["--index-url", url]
    return args


def requirements(st: StackConfig) -> list[str]:
    """What the children need, by name (the resolver picks the versions), with the stack's pins,
    and this environment's torch build unless the stack pins torch: a stack moves the
    quantization libraries, not the machine's torch (CPU or CUDA)."""
    pins = {canonical(Requirement(p).name): p for p in st.quantize}
    names = []
    for req in map(Requirement, metadata.requires("autoround-exp") or []):
        name = canonical(req.name)
        if req.marker is None and name not in PARENT_ONLY and name not in pins:  # markers: the extras
            names.append(name)
    if "torch" not in pins:
        names = [n for n in names if n != "torch"] + [f"torch=={metadata.version('torch')}"]
    return sorted(names) + sorted(pins.values())


def uv_step(argv: list[str], timeout_s: float, what: str) -> None:
    """Run one uv command; ``StackError`` with ``what`` and uv's own last lines if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no answer within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [ln.rstrip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise StackError(f"{what} says:\n" + "\n".join(lines[-REASON_LINES:]))


def resolve(st: StackConfig, work: Path) -> tuple[str, float]:
    """The stack's full requirements list, resolved now (uv pip compile): the project's constraints
    are the preferences, so a package moves only when a pin or an upgrade makes it."""
    folder = work / "resolve" / hashlib.sha256(json.dumps(requirements(st) + st.upgrade).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    req_in, out = folder / "requirements.in", folder / f"resolved-{os.getpid()}.txt"
    req_in.write_text("\n".join(requirements(st)) + "\n")
    out.write_text(CONSTRAINTS.read_text())  # preferences: what the pinned stack has
    argv = [
        uv(), "pip", "compile", str(req_in), "-o", str(out), "--python", sys.executable, "--quiet",
        "--no-header", "--no-annotate", "--prerelease", "disallow", *index_args(),
    ]  # fmt: skip
    for name in st.upgrade:
        argv += ["--upgrade-package", name]
    started = time.monotonic()
    uv_step(argv, RESOLVE_TIMEOUT_S, f"stack={st.name} does not resolve; uv pip compile")
    lock = "\n".join(ln for ln in out.read_text().splitlines() if ln and not ln.startswith("#")) + "\n"
    out.unlink()
    return lock, time.monotonic() - started


def versions_of(lock: str) -> dict[str, str]:
    out = {}
    for line in lock.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            out[canonical(name.strip())] = version.split(";")[0].strip()
    return out


def build(st: StackConfig, lock: str, env_dir: Path) -> float:
    """A virtual environment of exactly ``lock``, plus the project (no dependencies): the children
    import ``autoround_exp`` there. Built in place under a lock; the stamp is written last."""
    started = time.monotonic()
    shutil.rmtree(env_dir, ignore_errors=True)
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    (env_dir.parent / f"{env_dir.name}.requirements.txt").write_text(lock)
    python = env_dir / "bin" / "python"
    steps = [
        [uv(), "venv", "--quiet", "--python", sys.executable, str(env_dir)],
        [uv(), "pip", "install", "--quiet", "--python", str(python), *index_args(), "-r",
         str(env_dir.parent / f"{env_dir.name}.requirements.txt")],
        [uv(), "pip", "install", "--quiet", "--python", str(python), "--no-deps", "-e", str(ROOT)],
    ]  # fmt: skip
    for argv in steps:
        uv_step(argv, INSTALL_TIMEOUT_S, f"stack={st.name} resolves but does not install; uv {argv[1]} {argv[2]}")
    return time.monotonic() - started


_prepared: dict[tuple, StackEnv | StackError] = {}


def prepare(st: StackConfig, work: str | Path) -> StackEnv | None:
    """The stack's environment, resolved and built on first use (None for ``pinned``). Remembered
    per process, failures too: the jobs of a stack that cannot be had fail in milliseconds."""
    if st.name == "pinned":
        return None
    stacks = Path(work).resolve() / "stacks"
    memo = (st.name, tuple(st.quantize), tuple(st.upgrade), str(stacks))
    if memo in _prepared:
        got = _prepared[memo]
        if isinstance(got, StackError):
            raise got
        return got
    try:
        lock, resolve_s = resolve(st, stacks)
        digest = hashlib.sha256(lock.encode()).hexdigest()[:16]
        env_dir = stacks / f"quantize-{digest}"
        build_s = None
        with locked(stacks / f"quantize-{digest}.lock"):  # two jobs (or sweeps) build it once
            stamp = env_dir / STAMP
            if not stamp.is_file():
                print(f"[stack] {st.name}: building {env_dir} ...", flush=True)
                build_s = build(st, lock, env_dir)
                write_atomic(stamp, json.dumps({"name": st.name, "build_s": round(build_s, 1), "lock": lock}))
        versions = versions_of(lock)
        python = str(env_dir / "bin" / "python")
        env = StackEnv(st.name, digest, python, versions, resolve_s, build_s, moved_from_pinned(versions))
    except StackError as err:
        _prepared[memo] = err
        raise
    _prepared[memo] = env
    built = f"built in {build_s:.0f} s" if build_s is not None else "reused"
    moved = ", ".join(f"{k} {v}" for k, v in env.moved.items())
    print(
        f"[stack] {st.name}: resolved in {resolve_s:.1f} s, {built}; {moved or 'same versions as pinned'}", flush=True
    )
    return env


def pinned_versions() -> dict[str, str]:
    return versions_of(CONSTRAINTS.read_text())


def moved_from_pinned(versions: dict[str, str]) -> dict[str, str]:
    """What a stack changed: ``name -> "pinned → stack"`` for each package whose version differs
    (torch aside: a stack keeps this machine's build, which the constraints name without +cpu)."""
    pinned = pinned_versions()
    out = {}
    for name in sorted(versions):  # the parent's own packages (mlflow, hydra) are not in a stack
        a, b = pinned.get(name), versions.get(name)
        if a != b and name != "torch":
            out[name] = f"{a or '—'} → {b or '—'}"
    return out


def child_env(env: StackEnv | None) -> dict[str, str] | None:
    """A stack's children write bytecode (the environment is new; with PYTHONDONTWRITEBYTECODE, as
    on the project's machines, every child would compile torch anew)."""
    if env is None:
        return None
    return {"PYTHONDONTWRITEBYTECODE": ""}
