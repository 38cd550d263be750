"""The house's shape, measured from the code: the package's import graph (imports inside
functions included) has no circle, so every import runs down a floor; modules and functions
stay a size a reader can hold; the runtime package never imports the developer tools; and
docs/development.md's map names every source file, one line each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "autoround_exp"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# The tiny-model builders are long training scripts by nature (a model, its data, its loop).
LONG_FUNCTIONS_ALLOWED = {"tools/tiny/build_qwen3_vl.py", "tools/tiny/build_llama.py"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code."""
    modules = {module_name(p, root): p for p in (root / package).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == package}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == package:
                    deps |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 imports nothing of the package, else one above its highest import."""
    memo: dict[str, int] = {}

    def floor(v: str) -> int:
        if v not in memo:
            memo[v] = 0
            memo[v] = 1 + max((floor(w) for w in graph[v]), default=-1)
        return memo[v]

    return {v: floor(v) for v in graph}


def test_the_package_imports_run_only_downward():
    graph = import_graph(ROOT, "autoround_exp")
    assert circles(graph) == []
    level = floors(graph)
    upward = [
        f"{a} (floor {level[a]}) -> {b} (floor {level[b]})" for a in graph for b in graph[a] if level[b] >= level[a]
    ]
    assert upward == []
    # the ground floor holds what everyone may use
    assert level["autoround_exp.fsutil"] == 0 and level["autoround_exp.jobstatus"] == 1


def test_the_graph_check_finds_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("def x():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from . import b\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.b"} and circles(graph) == [["pkg.a", "pkg.b"]]


def test_the_runtime_package_never_imports_the_developer_tools():
    offenders = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in PACKAGE.rglob("*.py")
        for line in p.read_text().splitlines()
        if re.match(r"\s*(from tools\b|import tools\b)", line)
    ]
    assert offenders == []


def test_modules_fit_on_a_few_screens():
    big = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert big == {}, f"runtime modules over {MAX_MODULE_LINES} lines: split them by what they hold"


def source_files() -> list[Path]:
    plugins = (ROOT / "hydra_plugins").rglob("*.py")
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "tools").rglob("*.py"), *plugins, ROOT / "run.py"])


def test_functions_fit_on_a_screen():
    long = []
    for path in source_files():
        rel = str(path.relative_to(ROOT))
        if rel in LONG_FUNCTIONS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


MAP = re.compile(r"^(?P<path>[\w./-]+\.py|[\w./-]+/)\s{2,}\S", re.M)


def mapped_files() -> dict[str, str]:
    """The paths docs/development.md's layout block names, one line each."""
    text = (ROOT / "docs" / "development.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return {m["path"]: m.group(0) for m in MAP.finditer(block)}


def test_the_layout_map_names_every_source_file_and_nothing_else():
    mapped = mapped_files()
    files = [str(p.relative_to(ROOT)) for p in source_files() if not p.name == "__init__.py"]
    missing = [f for f in files if f not in mapped]
    gone = [p for p in mapped if not (ROOT / p).exists()]
    assert missing == [] and gone == [], f"add to docs/development.md: {missing}; drop from it: {gone}"


@pytest.mark.parametrize("planted", ["autoround_exp/planted.py"])
def test_the_map_check_catches_a_file_it_does_not_name(planted):
    mapped = mapped_files()
    assert planted not in mapped and "autoround_exp/pipeline.py" in mapped
