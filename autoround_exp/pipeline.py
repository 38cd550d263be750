"""One job: quantize -> evaluate -> log, with the sweep's baselines made sure of first."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from autoround_exp import fidelity_stage, lmeval_results, progress, record, serving_cost, store
from autoround_exp.config import AUTOROUND_METHODS, ConfigError, Experiment, MethodConfig
from autoround_exp.evaluate import EvalResult, evaluate, prestart
from autoround_exp.fsutil import digest, locked
from autoround_exp.jobstatus import Outcome
from autoround_exp.quantize import CALIBRATION_FILE, RESULT_FILE, quantize
from autoround_exp.record import (
    FailureRecord,
    PerfSettings,
    Quantization,
    RunRecord,
    Tracking,
    now,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def method_config(name: str) -> MethodConfig:
    node = OmegaConf.merge(OmegaConf.structured(MethodConfig), OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    return OmegaConf.to_object(node)


def baselines_of(exp: Experiment) -> list[Experiment]:
    """The unquantized and RTN runs that put ``exp``'s numbers in context."""
    if not exp.baselines or exp.method.name == "none":
        return []
    names = ["none"] + (["rtn"] if exp.method.name != "rtn" else [])
    return [exp.with_method(method_config(n)) for n in names]


def run_name(exp: Experiment) -> str:
    name = f"{exp.model.name}-{exp.scheme.name}-{exp.method.name}" if exp.quantized else f"{exp.model.name}-base"
    if exp.method.name in AUTOROUND_METHODS:
        name += f"-iters{exp.method.iters}"
    if exp.vision_quantized:
        name += "-vision"
    return name


def run_one(
    exp: Experiment, sweep_id: str, stop_on_config_error: bool = True, parent_run_id: str | None = None
) -> Outcome:
    qkey, key = store.keys(exp)
    # one job at a time per run key: a parallel job that needs the same run (a shared
    # baseline) waits, then finds it stored
    with locked(Path(exp.paths.work).resolve() / "locks" / f"run-{key}.lock"):
        return _run_one(exp, sweep_id, qkey, key, stop_on_config_error, parent_run_id)


def _run_one(
    exp: Experiment, sweep_id: str, qkey: str, key: str, stop_on_config_error: bool, parent_run_id: str | None
) -> Outcome:
    results = store.Store(exp.paths.results)
    name = run_name(exp)
    found = results.find(key)
    if found is not None and not exp.force:
        if exp.fidelity.enabled and exp.quantized:
            found = with_fidelity(exp, found, results)
        if exp.perf.enabled:
            found = with_perf(exp, found, results)
        return Outcome(name, key, "reused", found.metrics, found.mlflow_run_id, str(results.path_of(key)))

    print(f"[run] {name} key={key} {describe_backend(exp)}", flush=True)
    tracking_ready = None
    if exp.tracking.enabled:  # MLflow's import and store set-up overlap the children's work
        from autoround_exp.tracking import prepare

        tracking_ready = prepare(exp.tracking)
    work = Path(exp.paths.work).resolve()
    logs = work / "logs" / key
    started_at = now()
    try:
        quant, ev, stages = run_stages(exp, work, qkey, key, logs)
    except Exception as err:
        # a config error found late (calibration data) stops a single run with the message
        # alone; in a sweep it is this job's failure, and the other jobs go on
        if not (isinstance(err, ConfigError) and stop_on_config_error):
            record_failure(exp, name, key, qkey, sweep_id, err, logs, started_at, parent_run_id)
        raise

    results_json = lmeval_results.load(ev.results_path)
    samples = lmeval_results.per_sample(ev.samples_paths)
    rows = lmeval_results.metrics(results_json)
    checkpoint = quant.checkpoint if quant else exp.model.path
    rec = record.assemble(
        exp,
        name=name,
        key=key,
        quant_key=qkey,
        sweep_id=sweep_id,
        started_at=started_at,
        stages=stages,
        checkpoint=checkpoint,
        quantization=quant,
        evaluation=ev.evaluation(exp, results_json.get("versions", {})),
        table=rows,
        metrics=lmeval_results.mlflow_metrics(rows),
        lm_eval=lmeval_results.summary(results_json),
        versions=store.run_versions(exp),
        artifacts=artifacts_of(ev, logs, quant),
        parent_run_id=parent_run_id,
    )
    errors = later_stages(exp, rec, ev, logs)
    if tracking_ready is not None:
        from autoround_exp.tracking import log_or_defer

        tracking_ready.join()
        rec = log_or_defer(exp.tracking, rec, samples, force=exp.force)
    path = results.save(rec, samples)
    if errors:
        raise StageFailed("; ".join(errors) + " (the accuracy run is stored; a re-run measures it)")
    seconds = sum(v for v in rec.stages.values())
    return Outcome(name, key, "done", rec.metrics, rec.mlflow_run_id, str(path), seconds=seconds)


def later_stages(exp: Experiment, rec: RunRecord, ev: EvalResult, logs: Path) -> list[str]:
    """The stages after the accuracy run, into ``rec``: fidelity against the base, serving
    cost. One that fails leaves its field empty and says why; the accuracy result stands."""
    work, errors = Path(exp.paths.work).resolve(), []
    stages = [
        (
            "fidelity",
            "fidelity",
            exp.fidelity.enabled,
            lambda: fidelity_stage.measure(exp, rec.checkpoint, rec.key, logs),
        ),
        (
            "perf",
            "serving benchmark",
            exp.perf.enabled,
            lambda: serving_cost.measure(exp, rec.checkpoint, ev.samples_paths, work / "perf" / rec.key, logs),
        ),
    ]
    for field, what, enabled, measure in stages:
        if not enabled:
            continue
        t, moved = time.perf_counter(), 0.0
        try:
            value = measure()
            if isinstance(value, fidelity_stage.Measured):  # its time in the evaluation child is its own
                value, moved = value.fidelity, value.seconds_in_evaluation
            setattr(rec, field, value)
        except Exception as err:
            errors.append(f"{what}: {err}")
        stages = {**rec.stages, field: round(time.perf_counter() - t + moved, 3)}
        if moved:
            stages["evaluate"] = round(stages["evaluate"] - moved, 3)
        rec.stages = stages
        rec.finished_at = now()
    return errors


def run_stages(
    exp: Experiment, work: Path, qkey: str, key: str, logs: Path
) -> tuple[Quantization | None, EvalResult, dict[str, float]]:
    """Quantize (unless unquantized), then evaluate; the stages' results and wall seconds."""
    quant, stages, pre, fid = None, {}, None, None
    t = time.perf_counter()
    try:
        if exp.quantized:
            checkpoints = Path(exp.paths.checkpoints).resolve()
            ckpt = checkpoints / qkey / exp.checkpoint_name
            if exp.force and (ckpt / RESULT_FILE).exists():
                (ckpt / RESULT_FILE).unlink()
            # lm-eval's interpreter and imports load while the checkpoint is made
            fid = fidelity_stage.request_for_evaluation(exp, str(ckpt), key)
            pre = prestart(exp, str(ckpt), work / "evals" / key, logs, fidelity_request=fid)
            # one checkpoint per quant key, whoever shares the folder
            with locked(checkpoints / "locks" / f"quant-{qkey}.lock"):
                quant = quantize(exp, ckpt, logs / "quantize.log")
            stages["quantize"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        checkpoint = quant.checkpoint if quant else exp.model.path
        if not exp.quantized:
            fid = fidelity_stage.request_for_evaluation(exp, checkpoint, key)
        ev = evaluate(exp, checkpoint, work / "evals" / key, logs, pre=pre, fidelity_request=fid)
        stages["evaluate"] = round(time.perf_counter() - t, 3)
    except BaseException:
        if pre is not None:  # nothing to evaluate: it goes without running
            pre.cancel()
        raise
    return quant, ev, stages


def artifacts_of(ev: EvalResult, logs: Path, quant: Quantization | None) -> dict[str, list[str]]:
    """What MLflow gets beside the record: lm-eval's outputs, the logs, the checkpoint's small files."""
    out = {
        "lm_eval": [ev.results_path, *ev.samples_paths, *(str(p) for p in Path(ev.output_dir).glob("*command.txt"))],
        "logs": [str(p) for p in logs.glob("*.log")],
    }
    if quant:
        files = ("recipe.yaml", RESULT_FILE, "config.json", CALIBRATION_FILE)
        out["checkpoint"] = [str(Path(quant.checkpoint) / f) for f in files]
    return out


class StageFailed(RuntimeError):
    """A stage after the accuracy run failed; the run is stored, and a re-run does the stage."""


def with_fidelity(exp: Experiment, rec: RunRecord, results: store.Store) -> RunRecord:
    """A stored quantized run with its fidelity under ``exp.fidelity``'s settings: reused when
    measured with them before, else compared with its base now and stored (and logged)."""
    settings = fidelity_stage.settings_of(exp)
    if rec.fidelity is not None and rec.fidelity.settings == settings:
        return rec
    print(f"[fidelity] {rec.name} key={rec.key}: comparing the stored run's checkpoint with its base", flush=True)
    logs = Path(exp.paths.work).resolve() / "logs" / rec.key
    return _add_stage(
        exp,
        rec,
        results,
        "fidelity",
        "fidelity",
        lambda: fidelity_stage.measure(exp, rec.checkpoint, rec.key, logs).fidelity,
    )


def _add_stage(exp: Experiment, rec: RunRecord, results: store.Store, field: str, what: str, measure) -> RunRecord:
    """``measure()`` into a stored run's ``field``, timed as its stage; stored, and logged onto
    its MLflow run. A failure raises ``StageFailed`` and leaves the stored run as it was."""
    t = time.perf_counter()
    try:
        measured = measure()
    except Exception as err:
        raise StageFailed(f"{what}: {err}") from err
    stages = {**rec.stages, field: round(time.perf_counter() - t, 3)}
    rec = rec.model_copy(update={field: measured, "stages": stages})
    results.save(rec)
    _log_added(exp, rec, field)
    return rec


def _log_added(exp: Experiment, rec: RunRecord, stage: str) -> None:
    """A stage's figures measured for a run logged earlier: onto that MLflow run."""
    if exp.tracking.enabled and rec.mlflow_run_id:
        from autoround_exp.tracking import log_added

        try:
            log_added(exp.tracking, rec, stage)
        except Exception as e:  # stored on disk whatever MLflow does
            print(f"WARNING: logging the {stage} of {rec.name} to MLflow failed: {type(e).__name__}: {e}")


def with_perf(exp: Experiment, rec: RunRecord, results: store.Store) -> RunRecord:
    """A stored run with its serving cost under ``exp.perf``'s settings: reused when measured
    with them before, else measured now on its checkpoint and stored (and logged) with it."""
    settings = PerfSettings.of(exp.perf)
    if rec.perf is not None and rec.perf.settings == settings and not exp.perf.remeasure:
        return rec
    again = " again (perf.remeasure)" if rec.perf is not None and rec.perf.settings == settings else ""
    print(f"[perf] {rec.name} key={rec.key}: measuring the serving cost of the stored run{again}", flush=True)
    work = Path(exp.paths.work).resolve()
    samples = [p for p in rec.artifacts.get("lm_eval", []) if Path(p).name.startswith("samples_")]
    return _add_stage(
        exp,
        rec,
        results,
        "perf",
        "serving benchmark",
        lambda: serving_cost.measure(exp, rec.checkpoint, samples, work / "perf" / rec.key, work / "logs" / rec.key),
    )


def record_failure(
    exp: Experiment,
    name: str,
    key: str,
    qkey: str,
    sweep_id: str,
    err: Exception,
    logs: Path,
    started_at: str | None = None,
    parent_run_id: str | None = None,
) -> None:
    """Keep what a failed job left (error, logs), apart from finished runs so it is never reused."""
    rec = FailureRecord(
        name=name,
        key=key,
        quant_key=qkey,
        sweep_id=sweep_id,
        started_at=started_at,
        failed_at=now(),
        error=str(err)[-4000:],
        logs=sorted(str(p) for p in logs.glob("*.log")),
        backend=exp.serve.backend,
        backend_reason=exp.serve_choice.reason if exp.serve_choice else None,
        config=exp.resolved,
        tracking=Tracking(parent_run_id=parent_run_id),
    )
    if exp.tracking.enabled:
        from autoround_exp.tracking import log_failure

        try:
            run_id = log_failure(exp.tracking, rec, force=exp.force)
            rec.tracking = Tracking(status="logged", run_id=run_id, parent_run_id=parent_run_id)
        except Exception as e:  # the failure is kept on disk whatever MLflow does
            error = f"{type(e).__name__}: {e}"[:500]
            rec.tracking = Tracking(status="pending", error=error, parent_run_id=parent_run_id)
    path = store.Store(exp.paths.results).save_failure(rec)
    print(f"[failed] {name} key={key} record={path}", flush=True)


def failed_unrun(
    exp: Experiment, sweep_id: str, err: Exception, parent_run_id: str | None, started: float, cause: str
) -> list[Outcome]:
    """A job that failed outside its runs: its stack cannot be had (``cause="stack"``,
    ``stack.StackError``; nothing ran), or the scheduler ended it before it returned
    (``cause="slurm"``: cancelled, its time limit, its node). Recorded as failed under a key of
    its config and stack (no versions to key it by), so that the sweep's summary, the report's
    stack comparison and a rerun name it."""
    name = run_name(exp)
    ident = {"run": name, "model": store.model_identity(exp), "stack": asdict(exp.stack), "limit": exp.eval.limit}
    key = f"{cause}-" + digest(ident)
    started_at = datetime.fromtimestamp(started).astimezone().isoformat(timespec="milliseconds")
    logs = Path(exp.paths.work).resolve() / "logs" / key  # none: no child of this job is known
    record_failure(exp, name, key, key, sweep_id, err, logs, started_at, parent_run_id)
    first_line = (str(err).splitlines() or [""])[0]
    return [Outcome(name, key, "failed", {}, None, f"{type(err).__name__}: {first_line}")]


def short_label(exp: Experiment) -> str:
    """The config as the report's rows name it: base (unquantized), W4A16 RTN, NVFP4 AutoRound iters=200."""
    iters = exp.method.iters if exp.tuned_by_autoround else None
    return record.config_label(exp.scheme.preset, exp.method.name, iters, exp.vision_quantized)


def headline(metrics: dict[str, float]) -> str:
    """The run's main number as ``metric value ± stderr``: strict-match (gsm8k) or relaxed
    accuracy (chartqa) where the task has it, else its first metric."""
    names = [k for k in metrics if not k.endswith("/stderr")]
    if not names:
        return "no metrics"
    main = next((k for k in names if k.endswith("/strict-match") or "/relaxed_accuracy/" in k), names[0])
    stderr = metrics.get(f"{main}/stderr")
    text = f"{main.split('/')[1]} {metrics[main]:.3f}"
    return text + (f" ± {stderr:.3f}" if stderr is not None else "")


def console_line(o: Outcome) -> str:
    """One line a person reads: ``[done] tiny_llama W4A16 RTN  exact_match 0.676 ± 0.015  hf  1m12s``."""
    parts = [f"[{o.status}] {o.label or o.name}", headline(o.metrics), o.backend or ""]
    if o.seconds is not None:
        parts.append(progress.duration(o.seconds))
    return "  ".join(p for p in parts if p)


def describe_backend(exp: Experiment) -> str:
    c = exp.serve_choice
    text = f"backend={c.backend}" + (f" ({c.reason})" if c.reason != "requested" else "")
    return text + (f" NOTE: {c.note}" if c.note else "")


def run_experiment(
    exp: Experiment, sweep_id: str, stop_on_config_error: bool = True, parent_run_id: str | None = None
) -> list[Outcome]:
    """The job and its baselines. One that fails is recorded (results/failed/, MLflow FAILED)
    and the others still run; its outcome has status ``failed``. A config error found only
    once the data is read (``ConfigError``) is raised when ``stop_on_config_error`` (a single
    run: nothing recorded, the message alone), else recorded as that job's failure (a sweep)."""
    # the commit a hub model's revision names now: in every key and record, and what is loaded
    # (run.py pinned it at the door already; a caller that did not gets it pinned here)
    exp = store.pin_revision(exp)
    outcomes = []
    for job in [*baselines_of(exp), exp]:
        try:
            outcome = run_one(job, sweep_id, stop_on_config_error, parent_run_id)
        except Exception as err:  # recorded by run_one; the sweep goes on
            if isinstance(err, ConfigError) and stop_on_config_error:
                raise
            qkey, key = store.keys(job)
            first_line = (str(err).splitlines() or [""])[0]
            outcomes.append(Outcome(run_name(job), key, "failed", {}, None, f"{type(err).__name__}: {first_line}"))
            # The headline (what failed, why) first: the log tail after it can be long.
            rest = "\n".join(str(err).splitlines()[1:])[-500:]
            print(f"[failed] {run_name(job)} key={key}: {type(err).__name__}: {first_line}", flush=True)
            if rest:
                print(rest, flush=True)
            continue
        outcome = replace(outcome, label=f"{job.model.name} {short_label(job)}", backend=job.serve.backend)
        print(console_line(outcome), flush=True)
        outcomes.append(outcome)
    return outcomes
