"""The software stack as a sweep axis (stack=): the door's checks, the checkpoint comparison,
the report's stack vs stack section and its regression flag (planted in stored records), and
(slow) a real sweep over the pinned stack and llm-compressor's previous release, with a stack
that does not resolve beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from autoround_exp import record, stack
from autoround_exp.config import ConfigError, StackConfig
from autoround_exp.report import runs, stacks
from autoround_exp.store import Store
from tests.support import ROOT, SMALL_CALIB, compose_cfg, experiment, make_demo_store, run_py, variant, write_run


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (['stack.quantize=["llmcompressor==0.13.0"]'], "stack.name=pinned is the project's own environments"),
        (["stack.name=mine"], "stack=mine changes nothing"),
        (
            ["stack=previous", "stack.quantize=[llmcompressor]"],
            "without a version; pin one (e.g. llmcompressor==X.Y.Z)",
        ),
        (["stack=previous", "stack.quantize=[llm compressor]"], "not a requirement"),
        (["stack=latest", 'stack.upgrade=["auto-round==0.15"]'], "give package names only"),
        (["stack=latest", 'stack.quantize=["auto-round==0.14.2"]'], "both pins and upgrades auto-round"),
        (["stack=previous", "stack.name=a/b"], "stack.name='a/b' is invalid"),
    ],
)
def test_the_door_says_what_a_stack_must_change(tmp_path, overrides, says):
    with pytest.raises(ConfigError, match=None) as err:
        experiment(tmp_path, *overrides)
    assert says in str(err.value)


def test_every_stack_preset_composes_and_pinned_is_the_default(tmp_path):
    assert experiment(tmp_path).stack == StackConfig()
    prev = experiment(tmp_path, "stack=previous").stack
    assert prev.name == "previous" and prev.quantize == ["llmcompressor==0.13.0"]
    assert experiment(tmp_path, "stack=latest").stack.upgrade == [
        "llmcompressor",
        "auto-round",
        "compressed-tensors",
        "transformers",
    ]
    assert compose_cfg(["stack=latest"]).stack.name == "latest"


def test_a_stack_resolves_what_the_children_need_with_its_pins_and_this_torch():
    reqs = stack.requirements(StackConfig(name="x", quantize=["llmcompressor==0.13.0"]))
    assert "llmcompressor==0.13.0" in reqs and "llmcompressor" not in reqs  # the pin replaces the name
    assert "lm-eval" in reqs and "compressed-tensors" in reqs and "omegaconf" in reqs  # the children import these
    assert not {"mlflow", "hydra-core", "hydra-submitit-launcher"} & set(reqs)  # the parent's alone
    (torch,) = [r for r in reqs if r.startswith("torch==")]
    assert torch == f"torch=={stack.metadata.version('torch')}"  # this machine's build (CPU or CUDA)
    moved = stack.moved_from_pinned(stack.pinned_versions() | {"llmcompressor": "0.13.0", "extra-pkg": "1.0"})
    assert moved == {"llmcompressor": "0.14.0.1 → 0.13.0", "extra-pkg": "— → 1.0"}


# ---------------------------------------------------------------- checkpoints compared


def _checkpoint(folder: Path, codes: np.ndarray, scale: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    save_file(
        {"layer.weight_packed": codes, "layer.weight_scale": scale, "norm.weight": np.ones(4, np.float32)},
        str(folder / "model.safetensors"),
    )
    return folder


def test_checkpoints_are_compared_byte_for_byte_and_code_by_code(tmp_path):
    codes = np.arange(64, dtype=np.int32)  # 8 4-bit codes per int32: 512 codes
    scale = np.ones(8, np.float32)
    a = _checkpoint(tmp_path / "a", codes, scale)
    assert stacks.compare_checkpoints(a, _checkpoint(tmp_path / "same", codes.copy(), scale)).text == "identical bytes"
    moved = codes.copy()
    moved[3] ^= 0x10  # one nibble: one code of 512
    moved[9] ^= 0x3  # another code
    d = stacks.compare_checkpoints(a, _checkpoint(tmp_path / "b", moved, scale * 2))
    assert (d.layers, d.layers_differ, d.codes, d.codes_differ, d.other_differ) == (1, 1, 512, 2, 1)
    assert d.text == "weight codes differ in 1/1 layers (0.39 % of codes); 1 other tensors differ"
    assert stacks.compare_checkpoints(a, tmp_path / "gone").text == "checkpoint not on this machine"


# ---------------------------------------------------------------- the report, on planted records


def _planted(tmp_path: Path, flip: int) -> Path:
    """The demo store plus W4A16 AutoRound iters=200 and RTN "in stack=planted": the same records
    with another stack, AutoRound's per-document scores with ``flip`` right answers made wrong."""
    results = make_demo_store(tmp_path)
    for name, n in (("tiny_llama-w4a16-autoround-iters200", flip), ("tiny_llama-w4a16-rtn", 0)):
        path = next((results / "runs").glob(f"{name}__*.json"))
        rec = json.loads(path.read_text())
        samples = json.loads((results / "samples" / f"{rec['key']}.json").read_text())
        new, smp = variant(rec, samples, f"planted-{n}-{rec['key']}")
        new["stack"] = {
            "name": "planted",
            "digest": "0" * 16,
            "moved": {"llmcompressor": "0.14.0.1 → 0.13.0"},
            "resolve_s": 1.0,
        }
        new["versions"] = rec["versions"] | {"llmcompressor": "0.13.0"}
        new["quant_key"] = "planted-" + rec["quant_key"]
        for col, scores in smp["gsm8k_arith"].items():
            if col.startswith("exact_match"):
                right = [i for i, v in enumerate(scores) if v == 1.0][:n]
                smp["gsm8k_arith"][col] = [0.0 if i in right else v for i, v in enumerate(scores)]
        write_run(results, new, smp)
    return results


def test_the_report_compares_stacks_and_flags_a_score_that_moved(tmp_path):
    results = _planted(tmp_path, flip=60)
    sections = runs.sections(runs.from_store(results))
    lines = stacks.regressions(sections, [], 0.05)
    assert len(lines) >= 1 and all("W4A16 AutoRound iters=200: stack=planted vs pinned moved" in ln for ln in lines), (
        lines
    )
    assert not any("RTN" in ln for ln in lines)  # the same scores: within noise
    (section,) = [s for s in sections if any(r.first.stack == "planted" for r in s.rows)]
    table = stacks.table(section, 0.05)
    assert "| W4A16 RTN " in table and "within noise" in table and "MOVED" in table
    assert "llmcompressor 0.14.0.1 → 0.13.0" in table
    # the report's CLI: exit 4 when asked, 0 otherwise; the report.md has the section either way
    argv = [sys.executable, "-m", "autoround_exp.report", "--results", str(results), "--readme", ""]
    quiet = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 0 and "stack regression: TinyLlama-Arith W4A16 AutoRound iters=200" in quiet.stdout
    loud = subprocess.run([*argv, "--fail-on-regression"], capture_output=True, text=True, cwd=ROOT)
    assert loud.returncode == 4, loud.stdout[-2000:] + loud.stderr[-2000:]
    report = (results / "report.md").read_text()
    assert "Stack vs stack" in report and "W4A16 AutoRound iters=200 [stack=planted]" in report


def test_a_config_that_fails_in_one_stack_only_is_flagged(tmp_path):
    results = _planted(tmp_path, flip=0)
    assert stacks.regressions(runs.sections(runs.from_store(results)), [], 0.05) == []  # nothing moved
    failure = {
        "name": "tiny_llama-w4a16-autoround-iters0",
        "key": "k",
        "quant_key": "k",
        "sweep_id": "s",
        "status": "failed",
        "failed_at": "2026-12-07T00:00:00+00:00",
        "error": "verification failed: AutoRound changed 0 of 57344 codes",
        "logs": [],
        "backend": "hf",
        "config": {"stack": {"name": "planted"}, "eval": {"limit": None}},
    }
    (results / "failed").mkdir(exist_ok=True)
    (results / "failed" / "x.json").write_text(json.dumps(failure))
    lines = stacks.regressions(runs.sections(runs.from_store(results)), Store(results).failures(), 0.05)
    assert lines == [
        "tiny_llama-w4a16-autoround-iters0: finished in stack=pinned, failed in stack=planted: "
        "verification failed: AutoRound changed 0 of 57344 codes"
    ]


# ---------------------------------------------------------------- the real chain

LIMIT = 8  # few documents: the test is of the stacks, not the scores; the checkpoints are test_methods'
# RTN and AutoRound in each stack, without the base (the comparison is between stacks)
SWEEP = ["-m", "scheme=w4a16", "method=rtn,autoround", "iters=16", "serve=hf", f"eval.limit={LIMIT}", *SMALL_CALIB]
SWEEP += ["baselines=false"]


@pytest.mark.slow
def test_a_sweep_over_two_stacks_compares_them_and_a_stack_that_does_not_resolve_fails_alone(tmp_path):
    conf = tmp_path / "conf" / "stack"
    conf.mkdir(parents=True)
    (conf / "nosuch.yaml").write_text("name: nosuch\nquantize: [llmcompressor==0.0.999]\nupgrade: []\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    proc = run_py(tmp_path, *SWEEP, "stack=pinned,previous,nosuch", searchpath, "report.readme=null", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]  # the nosuch stack's jobs failed; the others finished
    stored = Store(tmp_path / "results").records()
    by_stack = {}
    for r in stored:
        by_stack.setdefault(r.stack.name if r.stack else "pinned", set()).add(r.name)
    names = {"tiny_llama-w4a16-rtn", "tiny_llama-w4a16-autoround-iters16"}
    assert by_stack == {"pinned": names, "previous": names}, by_stack
    prev = next(r for r in stored if r.stack and r.name == "tiny_llama-w4a16-autoround-iters16")
    assert prev.versions["llmcompressor"] == "0.13.0" and prev.stack.moved["llmcompressor"] == "0.14.0.1 → 0.13.0"
    assert prev.quantization.verification.changed_codes.fraction > 0  # AutoRound of the previous release did work
    # the stack that does not resolve: its jobs failed at the door, in seconds, with uv's reason
    assert "stack=nosuch does not resolve; uv pip compile says:" in out and "llmcompressor==0.0.999" in out
    failed = Store(tmp_path / "results").failures()
    assert {f.config["stack"]["name"] for f in failed} == {"nosuch"} and len(failed) == 2
    for f in failed:  # from the job's start to its failure, the resolver's answer included
        assert (record.epoch_ms(f.failed_at) - record.epoch_ms(f.started_at)) / 1000 < 60
    assert "FAILED tiny_llama-w4a16-rtn" in out
    report = (tmp_path / "results" / "report.md").read_text()
    assert "Stack vs stack" in report and "W4A16 AutoRound iters=16 [stack=previous]" in report
    row = next(
        ln for ln in report.splitlines() if ln.startswith("| W4A16 AutoRound iters=16 ") and "previous vs pinned" in ln
    )
    assert "llmcompressor 0.14.0.1 → 0.13.0" in row and ("identical bytes" in row or "weight codes differ in" in row)
    assert "stack regressions:" in out  # the failed stack's configs, under the summary
    # a re-run builds nothing and runs nothing: both stacks' environments and results are reused;
    # asked to, it exits non-zero for the configs still failed in stack=nosuch
    again = run_py(
        tmp_path, *SWEEP, "stack=pinned,previous", "report.readme=null", "report.fail_on_regression=true", check=False
    )
    assert again.returncode == 1 and "a config regressed between stacks" in again.stderr, again.stderr[-2000:]
    assert "failed in stack=nosuch" in again.stdout
    assert "[stack] previous: resolved in" in again.stdout and "reused" in again.stdout
    assert "building" not in again.stdout and "[run]" not in again.stdout, again.stdout[-3000:]
