"""The pipeline's own logic (reuse, force, baselines order), with the heavy stages replaced
by stand-ins; the real chain runs in test_sweep_integration.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from autoround_exp import pipeline
from tests.support import experiment


def test_baselines_first_then_reused(tmp_path, calls):
    out = pipeline.run_experiment(experiment(tmp_path, "iters=0"), "s1")
    assert [o.status for o in out] == ["done", "done", "done"]
    assert calls == [
        ("evaluate", "none"),
        ("fidelity", "none"),  # the base's distributions, once, for the quantized jobs after it
        ("quantize", "rtn"),
        ("evaluate", "rtn"),
        ("fidelity", "rtn"),
        ("quantize", "autoround"),
        ("evaluate", "autoround"),
        ("fidelity", "autoround"),
    ]
    calls.clear()
    out = pipeline.run_experiment(experiment(tmp_path, "iters=200"), "s1")
    assert [o.status for o in out] == ["reused", "reused", "done"]
    assert json.loads(Path(out[0].record_path).read_text())["method"] == "none"  # the reused record itself
    assert calls == [("quantize", "autoround"), ("evaluate", "autoround"), ("fidelity", "autoround")]


def test_force_recomputes(tmp_path, calls):
    pipeline.run_experiment(experiment(tmp_path, "baselines=false"), "s1")
    calls.clear()
    out = pipeline.run_experiment(experiment(tmp_path, "baselines=false", "force=true"), "s2")
    assert [o.status for o in out] == ["done"]
    assert calls == [("quantize", "autoround"), ("evaluate", "autoround"), ("fidelity", "autoround")]


def test_record_holds_metrics_with_stderr_and_versions(tmp_path, calls):
    (out,) = pipeline.run_experiment(experiment(tmp_path, "method=none"), "s1")
    rec = json.loads(Path(out.record_path).read_text())
    assert rec["metrics"] == {
        "gsm8k_arith/exact_match/strict-match": 0.5,
        "gsm8k_arith/exact_match/strict-match/stderr": 0.05,
    }
    assert rec["table"][0]["version"] == "3.0" and rec["table"][0]["n_samples"] == 100
    assert rec["versions"]["llmcompressor"] and rec["sweep_id"] == "s1"


def test_failed_evaluation_is_recorded_with_its_log_and_never_reused(tmp_path, monkeypatch, calls, capsys):
    from autoround_exp.child import ChildFailed

    def hanging(exp, checkpoint, out_dir, log_dir, pre=None, fidelity_request=None):
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "lm_eval.log").write_text("loading...\n" + "INFO engine warming up, a long line\n" * 40)
        raise ChildFailed("lm-eval (hf)", None, log_dir / "lm_eval.log")

    working = pipeline.evaluate  # the fixture's stand-in
    monkeypatch.setattr(pipeline, "evaluate", hanging)
    (out,) = pipeline.run_experiment(experiment(tmp_path, "method=none"), "s1")  # does not raise: the sweep goes on
    assert out.status == "failed" and out.record_path.startswith("ChildFailed: lm-eval (hf) timed out; log: ")
    # the console names what failed and why, however long the log tail behind it
    assert "key=" in capsys.readouterr().out.split("ChildFailed: lm-eval (hf) timed out; log: ")[0].splitlines()[-1]
    (failed,) = (tmp_path / "results" / "failed").glob("*.json")
    rec = json.loads(failed.read_text())
    assert rec["status"] == "failed" and "timed out" in rec["error"]
    assert rec["logs"] and rec["logs"][0].endswith("lm_eval.log")
    assert not (tmp_path / "results" / "runs").exists()  # nothing to reuse

    monkeypatch.setattr(pipeline, "evaluate", working)
    (out,) = pipeline.run_experiment(experiment(tmp_path, "method=none"), "s2")
    assert out.status == "done"  # the failure was not taken for a result


def test_a_failed_baseline_does_not_stop_the_job(tmp_path, monkeypatch, calls):
    """The base run's evaluation fails: it is recorded as failed, and RTN and the job still run."""
    from autoround_exp.child import ChildFailed

    working = pipeline.evaluate

    def fail_base(exp, checkpoint, out_dir, log_dir, pre=None, fidelity_request=None):
        if exp.method.name == "none":
            raise ChildFailed("lm-eval (hf)", 1, log_dir / "lm_eval.log")
        return working(exp, checkpoint, out_dir, log_dir, pre)

    monkeypatch.setattr(pipeline, "evaluate", fail_base)
    outs = pipeline.run_experiment(experiment(tmp_path, "iters=0"), "s1")
    assert [(o.name.rsplit("-", 1)[-1], o.status) for o in outs] == [
        ("base", "failed"),
        ("rtn", "done"),
        ("iters0", "done"),
    ]


def test_a_rerun_after_a_kill_closes_the_dead_mlflow_run_and_never_logs_a_key_twice(tmp_path, calls):
    """Real MLflow (SQLite), stand-in stages. A job killed while logging left a RUNNING run;
    one killed after logging but before its record was stored left a FINISHED run."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["method=none", "tracking.enabled=true", f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path / 'art'}"]
    exp = experiment(tmp_path, *args)
    _, key = pipeline.store.keys(exp)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(exp.tracking.experiment, artifact_location=(tmp_path / "art").as_uri())
    dead = client.create_run(exp_id, tags={"run_key": key}).info.run_id  # RUNNING, its process gone

    (out,) = pipeline.run_experiment(exp, "s1")
    assert out.status == "done" and out.mlflow_run_id != dead
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"

    # killed between logging and storing the record: the re-run takes the logged run
    next((tmp_path / "results" / "runs").glob("*.json")).unlink()
    (again,) = pipeline.run_experiment(experiment(tmp_path, *args), "s2")
    assert again.status == "done" and again.mlflow_run_id == out.mlflow_run_id
    runs = client.search_runs([exp_id], filter_string=f"tags.run_key = '{key}'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]

    # force=true logs a new run and marks the old one superseded
    (forced,) = pipeline.run_experiment(experiment(tmp_path, *args, "force=true"), "s3")
    assert forced.mlflow_run_id != out.mlflow_run_id
    assert client.get_run(out.mlflow_run_id).data.tags["superseded"]


def test_each_finished_run_is_one_line_a_person_reads(tmp_path, calls, capsys):
    """``[done] tiny_llama W4A16 RTN  exact_match 0.500 ± 0.050  hf  0s``: the config, its main
    number rounded, the backend and the time; no raw dict, no 18-digit stderr, no repeated reason."""
    pipeline.run_experiment(experiment(tmp_path, "scheme=w4a16", "iters=16", "serve=hf"), "s1")
    pipeline.run_experiment(experiment(tmp_path, "scheme=w4a16", "iters=16", "serve=hf"), "s2")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("[done]", "[reused]"))]
    assert [re.sub(r"  \d+s$", "  Ns", ln) for ln in lines] == [
        "[done] tiny_llama base (unquantized)  exact_match 0.500 ± 0.050  hf  Ns",
        "[done] tiny_llama W4A16 RTN  exact_match 0.500 ± 0.050  hf  Ns",
        "[done] tiny_llama W4A16 AutoRound iters=16  exact_match 0.500 ± 0.050  hf  Ns",
        "[reused] tiny_llama base (unquantized)  exact_match 0.500 ± 0.050  hf",
        "[reused] tiny_llama W4A16 RTN  exact_match 0.500 ± 0.050  hf",
        "[reused] tiny_llama W4A16 AutoRound iters=16  exact_match 0.500 ± 0.050  hf",
    ]


def test_rtn_and_base_runs_log_no_autoround_iters(tmp_path, calls):
    """The top-level ``iters`` (200 by default) is AutoRound's: an RTN or unquantized run's
    resolved config, which MLflow logs as params, carries method.iters=0 and no other iters."""
    from autoround_exp.tracking import flatten

    exp = experiment(tmp_path, "iters=200")
    base, rtn = pipeline.baselines_of(exp)
    for job in (base, rtn, experiment(tmp_path, "method=rtn")):
        params = flatten(job.resolved)
        assert "iters" not in params and params["method.iters"] == "0", job.method.name
    assert flatten(exp.resolved)["iters"] == "200" and flatten(exp.resolved)["method.iters"] == "200"


def test_two_stores_that_share_paths_checkpoints_quantize_into_one_folder(tmp_path, monkeypatch, calls):
    """paths.checkpoints (default <paths.work>/checkpoints) holds the checkpoint of each
    quantization key: two results stores and work folders that share it name one folder."""
    dirs = []
    stand_in = pipeline.quantize  # the fixture's

    def quantize(exp, out_dir, log_path):
        dirs.append(out_dir)
        return stand_in(exp, out_dir, log_path)

    monkeypatch.setattr(pipeline, "quantize", quantize)
    shared = tmp_path / "shared"
    for store in ("a", "b"):
        exp = experiment(tmp_path / store, "method=rtn", "baselines=false", f"paths.checkpoints={shared}")
        pipeline.run_experiment(exp, store)
    assert len(dirs) == 2 and dirs[0] == dirs[1] and dirs[0].parent.parent == shared.resolve()
    assert (shared / "locks").is_dir()  # the quantization's lock beside the checkpoints it guards
    exp = experiment(tmp_path / "c", "method=rtn", "baselines=false")
    pipeline.run_experiment(exp, "c")
    assert dirs[2].parent.parent == (tmp_path / "c" / "work" / "checkpoints").resolve()  # the default
