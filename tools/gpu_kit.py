"""make gpu-kit: the wheels that a GPU machine without network lacks for the quantize path.

The machine (issue 33): Python 3.12 with torch (CUDA), transformers 5.17, accelerate, numpy,
pandas, safetensors, tokenizers, pyarrow and what they need; no package index, and at most
64 MiB of files carried to it. The kit holds every other package that the quantize child,
lm-eval's hf backend and the check import, at the versions constraints/quantize.txt pins:

    python -m tools.gpu_kit [--out .gpu-kit] [--no-prove]

- ``cp312/``: for the GPU machine: CPython 3.12 manylinux wheels (``pip download
  --python-version 3.12 --only-binary=:all:``), pure-Python ones as they are, and the packages
  published only as source built into wheels here;
- ``cp<this Python>/``: the same versions for this machine's Python, which prove the kit
  complete: installed with ``pip install --no-index --no-deps --target`` into a venv that holds
  only the GPU machine's packages, ``import llmcompressor, auto_round, lm_eval, hydra`` must work;
- ``cp*/manifest.json``: per wheel its package, version, file, bytes and sha256, and what was
  left out and why; ``tools.gpu_offline`` checks the wheels against it before installing them.

Exit 1, saying what, where a wheel cannot be had, the 3.12 kit is over 40 MiB, or the proof fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "quantize.txt"
LIMIT_BYTES = 40 * 2**20
TARGET_PYTHON = "3.12"
# manylinux tags the GPU machine's pip takes (glibc 2.28 or newer)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
# what the GPU machine has, with everything these need
MACHINE = ("torch", "transformers", "accelerate", "numpy", "pandas", "safetensors", "tokenizers", "pyarrow")
# what it lacks even where a package above would pull it in here
LACKS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
# what the harness's quantize path and lm-eval's hf backend import
ROOTS = ("llmcompressor", "compressed-tensors", "auto-round", "lm-eval", "hydra-core", "omegaconf", "pydantic")
# what run.py imports beside them (autoround_exp/slurm.py: the Slurm launcher's base)
ROOTS += ("hydra-submitit-launcher", "submitit")
# declared by lm-eval for metrics of tasks the harness does not run, imported only inside them;
# the proof's imports run without them (scipy alone is 35 MiB); a whole gsm8k run from the kit
# is the next check (issue 33)
LEFT_OUT = {
    "scikit-learn": "lm-eval's f1 and mcc metrics only",
    "scipy": "scikit-learn's",
    "joblib": "scikit-learn's",
    "threadpoolctl": "scikit-learn's",
    "rouge-score": "lm-eval's rouge metric only",
    "nltk": "rouge-score's",
    "absl-py": "rouge-score's",
}
PROOF_IMPORTS = "import llmcompressor, auto_round, lm_eval, hydra, omegaconf, pydantic, compressed_tensors"


class KitError(RuntimeError):
    pass


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Package -> version, from the project's constraints."""
    found = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip()):
            found[canonicalize_name(m[1])] = m[2]
    return found


def closure(roots: tuple[str, ...]) -> set[str]:
    """The packages ``roots`` need, from this environment's installed metadata (``make env``
    installs exactly the constraints). A requirement's extras are followed where a package asks
    for them (pytablewriter's ``typepy[datetime]`` brings pytz, which lm-eval's results table
    imports); the roots' own extras are not."""
    seen: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requirements = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requirements:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *sorted(req.extras))]
    return {name for name, _ in seen}


def plan(versions: dict[str, str] | None = None) -> dict[str, str]:
    """Package -> pinned version: what the kit holds."""
    versions = versions if versions is not None else pins()
    has = closure(MACHINE) - {canonicalize_name(n) for n in LACKS}
    wanted = sorted(closure(ROOTS) - has - set(LEFT_OUT))
    missing = [n for n in wanted if n not in versions]
    if missing:
        raise KitError(f"not pinned in {CONSTRAINTS.relative_to(ROOT)}: {', '.join(missing)}; run `make env`")
    return {n: versions[n] for n in wanted}


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def unavailable(stderr: str) -> str | None:
    m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", stderr)
    return canonicalize_name(m[1]) if m else None


def download(packages: dict[str, str], dest: Path, python: str | None) -> list[str]:
    """Wheels of ``packages`` into ``dest`` (``python``: another CPython's tags); the names that
    have no wheel for it (source only) are returned, to be built."""
    dest.mkdir(parents=True, exist_ok=True)
    todo, source_only = dict(packages), []
    target = []
    if python:
        abi = "cp" + python.replace(".", "")
        target = ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
        target += [f"--platform={p}" for p in PLATFORMS]
    while todo:
        done = pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(dest),
                   *(f"{n}=={v}" for n, v in todo.items()))  # fmt: skip
        if done.returncode == 0:
            return source_only
        name = unavailable(done.stderr)
        if name is None or name not in todo:
            raise KitError(f"pip download failed: {done.stderr.strip()[-1500:]}")
        source_only.append(name)
        del todo[name]
    return source_only


def build(packages: dict[str, str], dest: Path) -> None:
    """Source-only packages built into wheels (pure Python: one wheel for every Python)."""
    for name, version in packages.items():
        done = pip("wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={version}")
        if done.returncode != 0:
            raise KitError(f"{name}=={version} has no wheel and did not build: {done.stderr.strip()[-1500:]}")
        for wheel in dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"):
            if not wheel.name.endswith("-py3-none-any.whl") and not wheel.name.endswith("-py2.py3-none-any.whl"):
                raise KitError(f"{wheel.name} was built for this machine only; it cannot go to Python {TARGET_PYTHON}")


def wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def make_kit(out: Path, packages: dict[str, str]) -> dict[str, Path]:
    """The kit's wheel folders: the GPU machine's and this machine's, each complete."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    folders = {TARGET_PYTHON: out / f"cp{TARGET_PYTHON.replace('.', '')}", here: out / f"cp{here.replace('.', '')}"}
    built = out / "built"
    for folder in {*folders.values(), built}:
        shutil.rmtree(folder, ignore_errors=True)
    source_only: set[str] = set()
    for python, folder in folders.items():
        source_only |= set(download(packages, folder, None if python == here else python))
    build({n: packages[n] for n in sorted(source_only)}, built)
    for folder in folders.values():
        for wheel in built.glob("*.whl"):
            shutil.copy2(wheel, folder / wheel.name)
    for python, folder in folders.items():
        have = {wheel_name(w) for w in folder.glob("*.whl")}
        if missing := sorted(set(packages) - have):
            raise KitError(f"the Python {python} kit lacks {', '.join(missing)}")
    return folders


def manifest(folder: Path, packages: dict[str, str], python: str = TARGET_PYTHON) -> dict:
    files = []
    for wheel in sorted(folder.glob("*.whl")):
        data = wheel.read_bytes()
        files.append(
            {
                "package": wheel_name(wheel),
                "version": packages.get(wheel_name(wheel)),
                "file": wheel.name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return {
        "python": python,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "left_out": LEFT_OUT,
    }


def check_size(m: dict, limit: int = LIMIT_BYTES) -> None:
    if m["total_bytes"] > limit:
        biggest = sorted(m["files"], key=lambda f: -f["bytes"])[:5]
        names = ", ".join(f"{f['file']} ({f['bytes'] / 2**20:.1f} MiB)" for f in biggest)
        raise KitError(
            f"the kit is {m['total_bytes'] / 2**20:.1f} MiB, over {limit / 2**20:.0f} MiB; the largest: {names}. "
            "Leave out what the quantize path does not import (tools/gpu_kit.py LEFT_OUT)."
        )


def machine_venv(tmp: Path) -> Path:
    """A venv of the GPU machine's packages only (pip too, as the machine has it); its Python."""
    versions = pins()
    venv = tmp / "machine"
    uv = Path(sys.executable).parent / "uv"
    if subprocess.run([str(uv), "venv", "-q", "--seed", "--python", sys.executable, str(venv)]).returncode != 0:
        raise KitError("uv venv failed")
    python = str(venv / "bin" / "python")
    machine = [f"{n}=={versions[canonicalize_name(n)]}" for n in MACHINE]
    links = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    )
    extra = [a for link in links.stdout.split() for a in ("--find-links", link)]
    done = subprocess.run(
        [str(uv), "pip", "install", "-q", "--python", python, *extra, *machine], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise KitError(f"the machine's packages did not install: {done.stderr.strip()[-1500:]}")
    for name in LACKS:  # what the GPU machine lacks, even where a package above pulls it in here
        subprocess.run([str(uv), "pip", "uninstall", "-q", "--python", python, name], capture_output=True)
    return Path(python)


def prove(folder: Path, check_out: Path | None = None) -> str:
    """The kit installed as the GPU machine gets it, beside only that machine's packages:
    ``pip install --no-index --no-deps --target``, then the imports; with ``check_out``, also the
    whole check's CPU variant from the kit there (``tools.gpu_offline --kit``). Returns what was seen."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-proof-") as tmp:
        python = machine_venv(Path(tmp))
        target = Path(tmp) / "kit"
        wheels = [str(w) for w in sorted(folder.glob("*.whl"))]
        done = pip("install", "-q", "--no-index", "--no-deps", "--target", str(target), *wheels)
        if done.returncode != 0:
            raise KitError(f"pip install --no-index --no-deps --target failed: {done.stderr.strip()[-1500:]}")
        code = f"{PROOF_IMPORTS}; print('llmcompressor', llmcompressor.__version__, 'lm_eval', lm_eval.__version__)"
        env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": tmp}
        seen = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
        if seen.returncode != 0:
            raise KitError(f"the kit is not complete: {seen.stderr.strip()[-1500:]}")
        versions = (seen.stdout.strip().splitlines() or [""])[-1]  # the versions line, not the libraries' warnings
        if check_out is not None:  # as on the GPU machine: that Python, the kit folder, nothing else
            argv = [str(python), "-m", "tools.gpu_offline", "--kit", str(folder.parent), "--out", str(check_out)]
            argv += ["--device", "cpu", "--budget-s", "1200"]
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp}
            if subprocess.run(argv, cwd=ROOT, env=env).returncode != 0:
                raise KitError(f"the check's CPU variant from the kit failed: {check_out / 'table.md'}")
        return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    parser.add_argument("--no-prove", action="store_true", help="skip the proof in a venv of the machine's packages")
    parser.add_argument(
        "--check-out",
        type=Path,
        help="also run the GPU check's CPU variant (tools.gpu_offline) from the kit in that venv, its rows here",
    )
    args = parser.parse_args(argv)
    try:
        packages = plan()
        folders = make_kit(args.out, packages)
        for python, folder in folders.items():  # each folder carries its own (the GPU machine gets cp312/ alone)
            (folder / "manifest.json").write_text(json.dumps(manifest(folder, packages, python), indent=2) + "\n")
        (args.out / "manifest.json").unlink(missing_ok=True)  # where an older kit kept the 3.12 one
        m = json.loads((folders[TARGET_PYTHON] / "manifest.json").read_text())
        for f in m["files"]:
            print(f"{f['bytes'] / 2**20:7.2f} MiB  {f['file']}")
        print(f"gpu-kit: {len(m['files'])} wheels for Python {TARGET_PYTHON}, {m['total_bytes'] / 2**20:.1f} MiB "
              f"(limit {LIMIT_BYTES / 2**20:.0f} MiB) in {folders[TARGET_PYTHON]}")  # fmt: skip
        check_size(m)
        if not args.no_prove:
            here = next(p for p in folders if p != TARGET_PYTHON)
            print(f"gpu-kit: proved complete for Python {here}: {prove(folders[here], args.check_out)}")
    except KitError as e:
        print(f"gpu-kit: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
