"""AutoRound through llm-compressor's modifier and through auto-round's own API, on the
embedded tiny model with its variable-length calibration text (real chain, nothing mocked).

What it guards: llm-compressor's AutoRoundModifier tunes on zero padding when calibration
samples differ in length (measured: iters=200 lost 17 points on a tiny model). The harness
builds fixed-length samples, so tuning must not be worse than not tuning, and the
modifier must agree with auto-round's own path tuned on the same token ids."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from autoround_exp.report import stats
from tests.support import ROOT, paths_args

pytestmark = pytest.mark.slow

STRICT = "exact_match,strict-match"
ITERS = 50
LIMIT = 200
COMMON = ["scheme=w4a16", "baselines=false", "serve=hf", f"eval.limit={LIMIT}", "report.readme=null"]
COMMON += ["calibration.nsamples=16", "method.batch_size=4", "method.enable_torch_compile=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("paths")
    # the modifier untuned and tuned, auto-round's own API tuned (its untuned run would compare
    # with nothing: a quarter of the fixture's time)
    for args in (["-m", "method=autoround", f"iters=0,{ITERS}"], ["method=autoround_native", f"iters={ITERS}"]):
        argv = [sys.executable, str(ROOT / "run.py"), *args, *COMMON, *paths_args(work)]
        proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=3000)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {}
    for path in (work / "results" / "runs").glob("*.json"):
        rec = json.loads(path.read_text())
        samples = json.loads((work / "results" / "samples" / f"{rec['key']}.json").read_text())
        records[(rec["method"], rec["iters"])] = (rec, samples[rec["eval"]["task"]])
    return records


def paired(runs, a, b) -> stats.Paired:
    xs, ys = stats.align(runs[a][1], runs[b][1], STRICT)
    assert len(xs) == LIMIT
    return stats.paired(xs, ys)


def test_both_paths_wrote_compressed_tensors_checkpoints_tuned_on_the_same_tokens(runs):
    assert set(runs) == {("autoround", 0), ("autoround", ITERS), ("autoround_native", ITERS)}
    calib = {k: rec["calibration"] for k, (rec, _) in runs.items()}
    assert len({c["token_sha256"] for c in calib.values()}) == 1  # one set of token ids for all
    assert all(c["nsamples"] == 16 and c["mode"] == "pack" for c in calib.values())
    for rec, _ in runs.values():
        # the exact token ids that tuned it, kept with the checkpoint and matching the record
        tokens = json.loads((Path(rec["checkpoint"]) / "calibration_tokens.json").read_text())
        assert len(tokens["input_ids"]) == 16 and {len(t) for t in tokens["input_ids"]} == {256}
        digest = hashlib.sha256(json.dumps(tokens["input_ids"]).encode()).hexdigest()
        assert digest == tokens["token_sha256"] == rec["calibration"]["token_sha256"]
        config = json.loads((Path(rec["checkpoint"]) / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert "lm_head" in config["quantization_config"]["ignore"]


def test_tuning_is_not_worse_than_not_tuning(runs):
    t = paired(runs, ("autoround", 0), ("autoround", ITERS))
    assert t.delta >= -2 * t.se, t  # a padding-trained modifier fell far below its iters=0


def test_the_modifier_agrees_with_auto_rounds_own_api(runs):
    t = paired(runs, ("autoround_native", ITERS), ("autoround", ITERS))
    assert abs(t.delta) <= 2 * t.se, t
