"""The GPU check for a machine without network (tools/gpu_offline.py): the kit refused before
any work where it cannot be installed, the score rule against the CPU's scores, the budget's
skips, and (slow) its CPU variant for real on the installed packages, whole and killed mid-way.
The same variant from the kit in a venv of the GPU machine's packages is
`python -m tools.gpu_kit --check-out DIR` (docs/gpu-and-cluster.md)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import ROOT, SHARED_CHECKPOINTS
from tools import gpu_check, gpu_offline
from tools.gpu_offline import CheckError, Run


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_a_kit_without_wheels_for_this_python_is_refused_naming_what_it_holds(tmp_path):
    (tmp_path / "cp399").mkdir()
    (tmp_path / "cp399" / "x-1-py3-none-any.whl").write_bytes(b"x")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    with pytest.raises(CheckError, match=rf"no wheels for this Python \({here}; it holds cp399\).*make gpu-kit"):
        gpu_offline.kit_folder(tmp_path)


def test_wheels_that_differ_from_the_manifest_are_named_before_anything_installs(tmp_path):
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"abcd")
    (tmp_path / "b-2-py3-none-any.whl").write_bytes(b"b")  # a second wheel pip would also take
    files = [{"file": "a-1-py3-none-any.whl", "bytes": 4}]
    (tmp_path / "manifest.json").write_text(json.dumps({"python": "3.12", "files": files, "total_bytes": 4}))
    with pytest.raises(CheckError, match=r"missing or another size: none; not listed: b-2-py3-none-any.whl"):
        gpu_offline.check_manifest(tmp_path)
    (tmp_path / "b-2-py3-none-any.whl").unlink()
    assert gpu_offline.check_manifest(tmp_path).startswith("1 wheels as the manifest lists")
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"abc")
    with pytest.raises(CheckError, match=r"another size: a-1-py3-none-any.whl"):
        gpu_offline.check_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckError, match="manifest.json is missing"):
        gpu_offline.check_manifest(tmp_path)


def _rec(value: float, stderr: float = 0.05, n: int = 100):
    row = SimpleNamespace(value=value, stderr=stderr, n_samples=n)
    return SimpleNamespace(metric=lambda column: row if column == gpu_check.STRICT else None)


def test_a_score_passes_within_two_standard_errors_of_the_cpus_and_above_the_floor():
    ref = {"value": 0.58, "stderr": 0.05, "n": 100}
    expected, seen, ok = gpu_offline.score_row(_rec(0.50), ref, 100)
    assert ok and "within ±0.141 of the CPU's 0.580" in expected and seen == "0.500 ± 0.050 (n=100)"
    assert not gpu_offline.score_row(_rec(0.40), ref, 100)[2]  # 0.18 away: more than kernels explain
    assert not gpu_offline.score_row(_rec(0.10, 0.03), None, 100)[2]  # garbage: under the floor
    assert not gpu_offline.score_row(_rec(0.58, n=20), ref, 100)[2]  # not the problems asked for
    assert "no CPU score at this limit" in gpu_offline.score_row(_rec(0.5), None, 100)[0]


def test_the_committed_cpu_scores_are_the_check_runs_at_its_limit():
    data = json.loads(gpu_offline.REFERENCE.read_text())
    assert data["limit"] == gpu_offline.LIMIT and data["made_by"].startswith("python -m tools.gpu_offline")
    methods = ("rtn", "autoround-iters16")
    names = {"tiny_llama-base"} | {f"tiny_llama-{s}-{m}" for s in ("w4a16", "nvfp4") for m in methods}
    assert set(data["scores"]) == names
    assert all(s["n"] == gpu_offline.LIMIT and 0 < s["stderr"] < 0.06 for s in data["scores"].values())
    assert gpu_offline.load_reference(gpu_offline.LIMIT) == data["scores"] and gpu_offline.load_reference(7) == {}


def test_the_documented_cpu_table_is_a_whole_passing_run_from_the_kit():
    """docs/gpu-and-cluster.md quotes it: `python -m tools.gpu_kit --check-out`'s table.md."""
    table = (ROOT / "docs" / "data" / "gpu-and-cluster" / "offline-cpu-table.md").read_text().splitlines()
    stages = {line.split(":")[0] for line in table[3:] if ":" in line and not line.startswith("gpu-offline")}
    assert stages == set(gpu_offline.STAGES)  # the kit's row too: it ran from the kit
    assert re.match(r"gpu-offline: \d+ rows, 0 failed, 0 skipped \(cpu variant, \d+ s of a", table[-1])
    assert all(line.endswith("PASS") for line in table[3:-3])
    assert "offline-cpu-table.md" in (ROOT / "docs" / "gpu-and-cluster.md").read_text()


def test_a_stage_the_budget_cannot_hold_is_skipped_and_its_row_says_so(tmp_path):
    run = Run(tmp_path, tmp_path, "cpu", dict(os.environ), budget_s=30)
    gpu_offline.run_stages(run, ["tiny w4a16", "block"])  # each needs at least 60 s
    got = rows(tmp_path)
    assert [(r["stage"], r["result"]) for r in got] == [("tiny w4a16", "SKIP"), ("block", "SKIP")]
    assert got[0]["expected"] == "at least 60 s of the budget left" and got[0]["seen"].endswith("s left: skipped")
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[3].startswith("tiny w4a16: started") and table[3].endswith("SKIP") and table[4].endswith("SKIP")


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    assert gpu_offline.main(["--out", str(tmp_path / "o"), "--stages", "env,tiny"]) == 2
    assert "--stages tiny unknown; choose from: kit, env, tiny w4a16" in capsys.readouterr().err
    args = ["--out", str(tmp_path / "o"), "--device", "cuda", "--write-reference", str(tmp_path / "r.json")]
    assert gpu_offline.main(args) == 2
    assert "--write-reference is for the CPU variant" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def check_argv(out: Path, work: Path, *extra: str) -> list[str]:
    shared = os.environ.get(SHARED_CHECKPOINTS)
    argv = [sys.executable, "-m", "tools.gpu_offline", "--device", "cpu", "--out", str(out), "--work", str(work)]
    return argv + (["--checkpoints", shared] if shared else []) + list(extra)


@pytest.mark.slow
def test_cpu_variant_runs_every_stage_on_the_installed_packages_and_passes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(check_argv(out, tmp_path / "work"), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    got = rows(out)
    assert [r["stage"] for r in got if r["check"] in ("versions", "run.py")] == [
        "env",
        "tiny w4a16",
        "tiny nvfp4",
        "vlm",
    ]
    assert {r["stage"] for r in got} == set(gpu_offline.STAGES) - {"kit"}  # no --kit: the installed packages
    assert all(r["result"] == "PASS" for r in got), [r for r in got if r["result"] != "PASS"]
    scores = [r for r in got if r["check"].endswith("strict-match")]
    assert len(scores) == 5 and all("of the CPU's" in r["expected"] for r in scores)  # compared with docs/data
    block = [r for r in got if r["stage"] == "block"]
    assert [r["check"] for r in block] == [
        "shape and calibration",
        "NVFP4 autoround-iters4",
        "NVFP4 autoround-iters0",
        "NVFP4 rtn",
        "upstream preset, 32 blocks (projected)",
    ]
    assert "changed codes 0.0" in block[1]["seen"] and "32 blocks ≈" in block[1]["seen"]
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "logs.tar.gz", "rows.jsonl", "table.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("lm_eval.log") for n in names) and any(n.endswith("quantize-rtn.log") for n in names)
    assert all(r["stage"] + ": " + r["check"] in (out / "table.md").read_text() for r in got)


@pytest.mark.slow
def test_killed_mid_way_the_finished_stages_rows_stay_and_no_process_is_left(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(check_argv(out, work, "--stages", "env,tiny w4a16"), cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "[run] tiny_llama" not in _read(out / "check.log"):
        time.sleep(0.5)
    assert proc.poll() is None, "the check ended before its second stage began work"
    os.kill(proc.pid, signal.SIGKILL)  # the check alone: its children are the watchdogs' to end
    proc.wait()
    got = rows(out)
    assert [(r["stage"], r["check"], r["result"]) for r in got] == [
        ("env", "versions", "PASS"),
        ("env", "device", "PASS"),
    ]
    assert "env: device" in (out / "table.md").read_text()
    deadline = time.monotonic() + 30
    while (left := _processes_under(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _processes_under(work: Path) -> list[str]:
    """Processes whose command line names the work folder (run.py's arguments do)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(work) in cmd:
                found.append(f"{p.name} {cmd[:120]}")
    return found
