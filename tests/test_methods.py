"""GPTQ and AWQ beside AutoRound and RTN: llm-compressor's own modifiers built from config,
each method's identity from its own knobs, the door's refusals, the report's comparison with
AutoRound, and (slow) the sweep for real on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoround_exp import quantize, store, verify
from autoround_exp.config import ConfigError, method_params
from autoround_exp.report import runs, tables
from tests.support import SMALL_CALIB, experiment, make_demo_store, records, run_py, variant, write_run


def modifier(tmp_path: Path, *overrides: str):
    exp = experiment(tmp_path, *overrides)
    return quantize.build_modifier(quantize.request(exp, tmp_path / "ckpt"))


def test_each_method_is_llm_compressors_own_recipe(tmp_path):
    gptq = modifier(tmp_path, "method=gptq", "scheme=w4a16", "method.block_size=64", "method.actorder=null")
    assert type(gptq).__name__ == "GPTQModifier" and gptq.scheme == "W4A16" and gptq.ignore == ["lm_head"]
    assert (gptq.block_size, gptq.dampening_frac, gptq.actorder) == (64, 0.01, None)
    awq, rtn = modifier(tmp_path, "method=awq", "scheme=nvfp4", "method.duo_scaling=both", "method.n_grid=8")
    assert type(awq).__name__ == "AWQModifier" and (awq.duo_scaling, awq.n_grid) == ("both", 8)
    assert awq.mappings is None  # llm-compressor's mappings for the model's architecture
    assert type(rtn).__name__ == "QuantizationModifier" and rtn.scheme == "NVFP4"
    awq, gptq = modifier(tmp_path, "method=awq_gptq", "scheme=w4a16", "method.duo_scaling=true")
    assert awq.duo_scaling is True and type(gptq).__name__ == "GPTQModifier"
    # the same calibration as AutoRound's in the sweep: samples, length, seed
    reqs = [quantize.request(experiment(tmp_path, f"method={m}"), tmp_path) for m in ("gptq", "awq", "autoround")]
    assert reqs[0]["calibration"] == reqs[1]["calibration"] == reqs[2]["calibration"] is not None
    assert experiment(tmp_path, "method=awq_gptq", "scheme=w4a16").checkpoint_name.endswith("-W4A16-G128-AWQ-GPTQ")


MAPPINGS = 'method.mappings=[{smooth_layer:"re:.*input_layernorm$",balance_layers:["re:.*q_proj$","re:.*k_proj$"]}]'


def test_awq_takes_mappings_given_as_config_and_refuses_malformed_ones(tmp_path):
    awq, _ = modifier(tmp_path, "method=awq", "scheme=w4a16", MAPPINGS)
    (m,) = awq.mappings
    assert type(m).__name__ == "AWQMapping"
    assert (m.smooth_layer, m.balance_layers) == ("re:.*input_layernorm$", ["re:.*q_proj$", "re:.*k_proj$"])
    for bad, message in (
        ("method.mappings=[]", "gives AWQ nothing to smooth"),
        ('method.mappings=[{smooth_layer:"x"}]', r"method.mappings\[0\]=.* is invalid; each mapping is a smooth_layer"),
        ('method.mappings=[{smooth_layer:"x",balance_layers:"y"}]', "is invalid"),
    ):
        with pytest.raises(ConfigError, match=message):
            experiment(tmp_path, "method=awq", "scheme=w4a16", bad)


def test_a_methods_key_and_params_hold_its_own_knobs_only(tmp_path):
    def qkey(*overrides):
        return store.keys(experiment(tmp_path, *overrides))[0]

    # other methods' knobs change nothing: AutoRound and RTN keys stay as every earlier run's
    assert qkey("method=autoround") == qkey("method=autoround", "method.block_size=64", "method.n_grid=5")
    assert qkey("method=rtn") == qkey("method=rtn", "method.dampening_frac=0.1")
    assert qkey("method=gptq") != qkey("method=gptq", "method.block_size=64")
    assert qkey("method=gptq") == qkey("method=gptq", "method.n_grid=5")
    assert qkey("method=awq") != qkey("method=awq", "method.n_grid=5") != qkey("method=awq_gptq")
    assert qkey("method=gptq") != qkey("method=gptq", "calibration.nsamples=8")  # calibrated
    # AWQ's mappings: in the key only when set, so that the keys of earlier AWQ runs stay as they were
    ident = store.quant_identity(experiment(tmp_path, "method=awq"))
    assert set(ident["knobs"]) == {"duo_scaling", "n_grid"}
    assert qkey("method=awq") != qkey("method=awq", MAPPINGS)
    # MLflow params: what every run logged before, and GPTQ's and AWQ's knobs on their runs only
    first = {"name", "label", "deterministic", "iters", "batch_size", "lr", "enable_torch_compile", "disable_opt_rtn"}
    assert set(method_params(experiment(tmp_path, "method=rtn").method)) == first
    gptq = method_params(experiment(tmp_path, "method=gptq").method)
    assert set(gptq) == first | {"block_size", "dampening_frac", "actorder"} and gptq["iters"] == 0


def test_a_method_whose_codes_all_stayed_is_refused_as_a_no_op():
    zero = {"measured": True, "fraction": 0.0, "codes": 1000, "layers": 3}
    for method, name in (("gptq", "GPTQ"), ("awq", "AWQ"), ("awq_gptq", "AWQ\\+GPTQ")):
        with pytest.raises(verify.VerificationError, match=f"{name} changed 0 of 1000 weight codes.*{name} label"):
            verify.no_op({"method": method, "iters": None, "changed_codes": zero})
    verify.no_op({"method": "gptq", "iters": None, "changed_codes": zero | {"fraction": 0.02}})


def test_the_report_pairs_each_method_with_autoround_at_the_largest_iters(tmp_path):
    results = make_demo_store(tmp_path)
    by_name = {}
    for path in (results / "runs").glob("*.json"):
        rec = json.loads(path.read_text())
        samples = results / "samples" / f"{rec['key']}.json"
        by_name.setdefault(rec["name"], (rec, json.loads(samples.read_text())))
    rtn, smp = by_name["tiny_llama-w4a16-rtn"]
    for method, label in (("gptq", "GPTQ"), ("awq", "AWQ")):
        rec, s = variant(rtn, smp, f"{method}1", method=method)
        rec["name"], rec["checkpoint_name"] = f"tiny_llama-w4a16-{method}", f"TinyLlama-Arith-W4A16-G128-{label}"
        write_run(results, rec, s)
    (section,) = [
        s for s in runs.sections(runs.from_store(results)) if any(r.first.record.method == "gptq" for r in s.rows)
    ]
    pairs = {(name, a.first.short_label, b.first.short_label) for name, a, b in tables.comparisons(section)}
    assert ("vs AutoRound", "W4A16 AutoRound iters=200", "W4A16 GPTQ") in pairs
    assert ("vs AutoRound", "W4A16 AutoRound iters=200", "W4A16 AWQ") in pairs
    assert ("vs RTN", "W4A16 RTN", "W4A16 GPTQ") in pairs
    labels = [r.first.short_label for r in section.rows]
    assert (
        labels.index("W4A16 RTN")
        < labels.index("W4A16 GPTQ")
        < labels.index("W4A16 AWQ")
        < labels.index("W4A16 AutoRound iters=0")
    )


# ---------------------------------------------------------------- the real chain

LIMIT = 20
# AWQ+GPTQ's recipe is checked above; its real run (measured here: 2.5 min more) is left to make demo's sweeps
SWEEP = ["-m", "scheme=w4a16", "method=gptq,awq,autoround", "iters=16", "serve=hf", f"eval.limit={LIMIT}"]
# gpu_check's small calibration (AutoRound iters=16 still moves codes on every CPU tried), a small AWQ grid
SWEEP += [*SMALL_CALIB, "method.n_grid=4"]
SWEEP += ["report.readme=null"]


@pytest.mark.slow
def test_a_methods_sweep_verifies_each_method_and_compares_them(tmp_path):
    proc = run_py(tmp_path, *SWEEP)
    recs = records(tmp_path)
    names = {"base", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w4a16-autoround-iters16"}
    assert set(recs) == {f"tiny_llama-{n}" for n in names}, proc.stdout[-3000:]
    calib = {recs[f"tiny_llama-w4a16-{m}"]["calibration"]["token_sha256"] for m in ("gptq", "awq", "autoround-iters16")}
    assert len(calib) == 1  # one set of calibration tokens for every method
    for method, label in (("gptq", "GPTQ"), ("awq", "AWQ")):
        rec = recs[f"tiny_llama-w4a16-{method}"]
        assert rec["checkpoint_name"] == f"TinyLlama-Arith-W4A16-G128-{label}"
        v = rec["quantization"]["verification"]
        assert v["method"] == method and v["quantized"] == v["linear_layers"] - 1 and v["left_out"] == ["lm_head"]
        assert v["changed_codes"]["measured"] and 0 < v["changed_codes"]["fraction"] < 1, v["changed_codes"]
        assert rec["metrics"]["gsm8k_arith/exact_match/strict-match"] >= 0.3  # a working model, on 20 problems
    report = (tmp_path / "results" / "report.md").read_text()
    for row in ("W4A16 GPTQ vs W4A16 AutoRound iters=16", "W4A16 AWQ vs W4A16 AutoRound iters=16"):
        assert row in report, report
    assert "| W4A16 GPTQ " in report and "| W4A16 AWQ " in report


@pytest.mark.slow
def test_an_awq_whose_mappings_reach_no_layer_fails_the_job_as_a_no_op(tmp_path):
    """A planted no-op, for real: AWQ mappings that match none of the model's layers (as
    llm-compressor's defaults can for an architecture they do not know) smooth nothing, and
    the checkpoint is round-to-nearest under an AWQ label. The job fails before evaluation."""
    nowhere = 'method.mappings=[{smooth_layer:"re:.*no_such_norm$",balance_layers:["re:.*no_such_proj$"]}]'
    args = ["method=awq", "scheme=w4a16", "baselines=false", "serve=hf", "eval.limit=4", nowhere]
    proc = run_py(tmp_path, *args, "calibration.nsamples=8", "calibration.seqlen=64", "method.n_grid=4", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "checkpoint verification failed: AWQ changed 0 of" in out and "method.mappings" in out
    assert records(tmp_path) == {}
    (failed,) = (tmp_path / "results" / "failed").glob("*.json")
    assert "AWQ changed 0 of" in json.loads(failed.read_text())["error"]
    assert not list((tmp_path / "work").rglob("lm_eval.log"))  # never evaluated
