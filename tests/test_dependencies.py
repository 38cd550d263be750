"""Every package the code imports directly is declared in pyproject.toml: a fresh environment
built from the declared dependencies has everything, not what another package happens to pull."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata

import tomllib

from tests.support import ROOT


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonical(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in reqs}


# Run by the serve environment's interpreter (vllm_bench by path; fidelity_vllm in lm-eval's vllm
# child): they import the standard library and what that environment's `make env` installs (vLLM,
# and torch, numpy and transformers with it).
SERVE_ENV_FILES = {
    "autoround_exp/vllm_bench.py": {"vllm"},
    "autoround_exp/fidelity_vllm.py": {"vllm", "numpy", "torch", "transformers"},
}


def imported(files=None) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in the package (outside the serve
    environment's files), and by which files."""
    out: dict[str, set[str]] = {}
    for path in files or (ROOT / "autoround_exp").rglob("*.py"):
        if files is None and path.relative_to(ROOT).as_posix() in SERVE_ENV_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("autoround_exp", "__future__"):
                    out.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return out


def test_every_direct_import_is_a_declared_dependency():
    distributions = metadata.packages_distributions()
    have = declared()
    missing = []
    for module, files in sorted(imported().items()):
        dists = distributions.get(module)
        assert dists, f"{module} (imported by {sorted(files)}) is not installed in this environment"
        if not any(canonical(d) in have for d in dists):
            missing.append(f"{module} ({' or '.join(dists)}), imported by {', '.join(sorted(files))}")
    assert missing == [], "declare these in pyproject.toml:\n" + "\n".join(missing)


def test_the_check_sees_imports():
    found = imported()
    assert {"torch", "mlflow", "pandas", "hydra"} <= set(found)
    assert "json" not in found and "autoround_exp" not in found


def test_files_run_by_the_serve_environment_import_only_what_it_has():
    for name, allowed in SERVE_ENV_FILES.items():
        assert set(imported([ROOT / name])) == allowed, name
