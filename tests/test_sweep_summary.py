"""The end-of-sweep summary counts each run once, even when several jobs share a baseline."""

from __future__ import annotations

from autoround_exp.jobstatus import Outcome
from autoround_exp.jobstatus import write as record_job
from autoround_exp.sweep import summarize


def outcome(name: str, key: str, status: str, error: str = "") -> Outcome:
    return Outcome(name, key, status, {}, None, error or f"results/runs/{name}__{key}.json")


def test_shared_baselines_count_once_and_failures_are_listed(tmp_path):
    base, rtn = outcome("m-base", "k0", "done"), outcome("m-w4a16-rtn", "k1", "reused")
    record_job(str(tmp_path), 0, ["iters=0"], [base, rtn, outcome("m-w4a16-autoround-iters0", "k2", "done")], 0.0)
    reused_base = outcome("m-base", "k0", "reused")  # the next job finds the base run stored
    record_job(str(tmp_path), 1, ["iters=200"], [reused_base, rtn, outcome("m-ar-200", "k3", "failed", "OOM")], 0.0)
    text, failed = summarize(tmp_path)
    assert failed == 1
    lines = text.splitlines()
    assert lines[0] == "[sweep] 2 done, 1 reused, 1 failed"  # the base: done once, then found
    assert lines[1] == "  FAILED m-ar-200 [iters=200]: OOM"


def test_a_clean_sweep_has_no_failures(tmp_path):
    record_job(str(tmp_path), 0, [], [outcome("m-base", "k0", "done")], 0.0)
    assert summarize(tmp_path) == ("[sweep] 1 done, 0 reused, 0 failed", 0)


def test_the_summary_gives_the_sweeps_wall_time_from_its_first_job(tmp_path):
    """The demo's log says how long each sweep took (make demo's time budget is read there)."""
    record_job(str(tmp_path), 1, [], [outcome("m-ar-200", "k3", "done")], 1000.0)
    record_job(str(tmp_path), 0, [], [outcome("m-base", "k0", "done")], 400.0)
    text, _ = summarize(tmp_path, now=934.0)
    assert text == "[sweep] 2 done, 0 reused, 0 failed in 8m54s wall time"
