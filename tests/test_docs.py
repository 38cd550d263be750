"""The README is a page and docs/ holds the rest: every relative link in them resolves (files,
and headings for links into a .md file), the README stays short, and every doc is reachable
from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support import README_MAX_LINES, committed_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# [text](target) and ![alt](target), with an optional "title"; the text may hold parentheses.
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<text>.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def links(path: Path) -> list[str]:
    """Link and image targets of a markdown file, outside code blocks and inline code."""
    out = []
    for line in prose_lines(path.read_text()):
        out += [m["target"] for m in LINK.finditer(INLINE_CODE.sub("", line))]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped except
    '-' and '_', spaces to '-'."""
    text = LINK.sub(lambda m: m["text"], heading)  # a link in a heading renders as its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m["text"])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve()
        shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        if not dest.exists():
            problems.append(f"{target}: {shown} does not exist")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {shown}")
    return problems


MARKDOWN = [README, *DOCS]


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_is_a_page():
    """The README as shipped: a user's own sweeps regenerate the working tree's block (within
    report.readme_max_lines; tests/test_readme_scope.py), which must not fail this clone's tests."""
    lines = len(committed_readme().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail into docs/ "
        "or make the generated results block shorter"
    )


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(README) if not t.startswith(EXTERNAL)}
    assert DOCS, "docs/ holds no .md file"
    assert [str(d.relative_to(ROOT)) for d in DOCS if d.resolve() not in linked] == []


@pytest.mark.parametrize("path", DOCS, ids=[d.name for d in DOCS])
def test_doc_starts_with_a_title(path):
    assert path.read_text().startswith("# "), f"{path.name} should start with '# Title' and a summary paragraph"


def test_link_checker_catches_a_broken_link(tmp_path):
    """The checker itself: a missing file and a missing heading are reported, a good link is not."""
    (tmp_path / "other.md").write_text("# Other\n\n## A heading: with `code`, punctuation & more\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-code-punctuation--more) ![img](missing.png) [bad](other.md#nope)\n"
        "[web](https://example.com) [self](#anywhere)\n```\n[in code](missing.md)\n# not a heading\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.png" in problems[0] and "#nope" in problems[1]


GROUPS = ["sweep", "launcher", "model", "scheme", "method", "eval", "serve", "perf", "tracking"]


@pytest.mark.parametrize("group", GROUPS)
def test_configuration_doc_names_every_option_of_each_group(group):
    """docs/configuration.md's tables name every file of a config group (a preset or launcher
    added without its row is caught)."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        p.stem
        for p in sorted((ROOT / ("sweeps" if group == "sweep" else f"conf/{group}")).glob("*.yaml"))
        if f"`{p.stem}`" not in doc
    ]
    assert missing == [], f"docs/configuration.md does not name {group} option(s) {missing}"


# The docs' measured tables: each page's results block, written by its sweep into the page from
# the runs it stored in docs/data/<page>/runs/ (in git, so that anyone can regenerate and check
# it). A page's other measured data (docs/data/gpu-and-cluster/: the offline check's) has no runs.
MEASURED = (
    sorted(p.name for p in (ROOT / "docs" / "data").iterdir() if (p / "runs").is_dir())
    if (ROOT / "docs" / "data").is_dir()
    else []
)


@pytest.mark.parametrize("page", MEASURED)
def test_a_measured_block_is_what_its_stored_runs_give(page):
    argv = [
        sys.executable,
        "-m",
        "autoround_exp.report",
        "--results",
        f"docs/data/{page}",
        "--readme",
        f"docs/{page}.md",
    ]
    proc = subprocess.run([*argv, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "up to date" in proc.stdout
