"""A number means what its label says: every checkpoint is verified as quantized as asked
(the real chain: llm-compressor on the tiny model), a tuned run that changed nothing fails,
determinism on request gives the same bytes, and bad calibration input is a config error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoround_exp import verify
from tests.support import NO_FIDELITY, ROOT, SMALL_CALIB, paths_args

pytestmark = pytest.mark.slow

SMALL = [*SMALL_CALIB, "serve=hf", "eval.limit=4", "baselines=false"]


def run_py(work: Path, *args: str, shared: bool = False) -> subprocess.CompletedProcess:
    """run.py with its checkpoints in ``work``, or with ``shared`` in the session's folder (a
    checkpoint this test reads, not one it must see made)."""
    argv = [sys.executable, str(ROOT / "run.py"), *args, "tracking.enabled=false", "report.readme=null", NO_FIDELITY]
    argv += [f"paths.results={work / 'results'}", f"paths.work={work / 'work'}"]
    argv += [a for a in paths_args(work, share_checkpoints=shared) if a.startswith("paths.checkpoints=")]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def records(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work / "results" / "runs").glob("*.json"))]


def test_a_recipe_that_quantizes_nothing_fails_before_evaluation_naming_the_cause(tmp_path):
    proc = run_py(tmp_path, "model.ignore=[re:.*]", "method=rtn", "scheme=w8a8", *SMALL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "VerificationError: checkpoint verification failed: no Linear layer of 29 was quantized" in out
    assert records(tmp_path) == []  # nothing recorded as finished
    (failed,) = (tmp_path / "results" / "failed").glob("*.json")
    assert "no Linear layer" in json.loads(failed.read_text())["error"]
    assert not list((tmp_path / "work").rglob("lm_eval.log"))  # never evaluated
    assert not [p for p in (tmp_path / "work" / "checkpoints").rglob("*RTN") if p.is_dir()]  # only .partial


def test_an_autoround_record_shows_its_layers_and_the_codes_tuning_changed(tmp_path):
    proc = run_py(tmp_path, "method=autoround", "iters=16", "scheme=w4a16", *SMALL, shared=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (rec,) = records(tmp_path)
    v = rec["quantization"]["verification"]
    assert (v["linear_layers"], v["quantized"], v["left_out"]) == (29, 28, ["lm_head"])  # all targeted but lm_head
    assert v["weights"] == {"num_bits": 4, "type": "int", "group_size": 128, "strategy": "group", "symmetric": True}
    assert v["changed_codes"]["measured"] and 0 < v["changed_codes"]["fraction"] < 0.5
    assert rec["quantization"]["deterministic"] is False
    cli = [sys.executable, "-m", "autoround_exp.report", "--results", str(tmp_path / "results"), "--readme", ""]
    subprocess.run(cli, cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = (tmp_path / "results" / "report.md").read_text()
    assert "28/29" in report and f"{100 * v['changed_codes']['fraction']:.2f} %" in report


def test_tuning_that_reaches_no_weight_is_refused_as_a_no_op():
    report = {"iters": 200, "changed_codes": {"measured": True, "fraction": 0.0, "codes": 1000, "layers": 3}}
    with pytest.raises(verify.VerificationError, match="changed 0 of 1000 weight codes.*silent no-op.*set more iters"):
        verify.no_op(report)
    verify.no_op(report | {"changed_codes": {"measured": True, "fraction": 0.01, "codes": 1000, "layers": 3}})


def test_deterministic_quantization_gives_the_same_bytes(tmp_path):
    folders = []
    for i in (1, 2):
        work = tmp_path / str(i)
        proc = run_py(work, "method=autoround", "iters=16", "scheme=w4a16", "method.deterministic=true", *SMALL)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        (ckpt,) = [p for p in (work / "work" / "checkpoints").glob("*/*AutoRound") if p.is_dir()]
        folders.append(ckpt)
        assert records(work)[0]["quantization"]["deterministic"] is True
    a, b = folders
    names = sorted(p.name for p in a.iterdir() if p.name != "quantization.json")  # that one holds timings
    assert "model.safetensors" in names and names == sorted(
        p.name for p in b.iterdir() if p.name != "quantization.json"
    )
    assert [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()] == []


def test_calibration_that_yields_no_samples_is_a_config_error_with_its_message_alone(tmp_path):
    t0 = time.monotonic()
    proc = run_py(tmp_path, "calibration.seqlen=99999", "iters=2", "baselines=false", "serve=hf")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "yields 0 samples of 99999 tokens" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "results" / "failed").exists()  # the user's input, not a failed run
