"""The report in MLflow: on the sweep's parent run when a -m sweep ends, else as a run of its own
(one per experiment, updated in place)."""

from __future__ import annotations

from pathlib import Path

REPORT_TAG = "autoround_exp.report"


def log_report(uri: str, experiment: str, report_md: Path, plots: list[Path], run_id: str | None = None) -> str:
    """Onto ``run_id`` (a sweep's parent run, left running for its summary to end), else the
    experiment's report run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if run_id is not None:
        client.log_artifact(run_id, str(report_md))
        for png in plots:
            client.log_artifact(run_id, str(png), "plots")
        return run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], f"tags.`{REPORT_TAG}` = 'true'", max_results=1)
    run_id = found[0].info.run_id if found else None
    if run_id is None:
        run_id = client.create_run(exp_id, run_name="report", tags={REPORT_TAG: "true"}).info.run_id
    client.log_artifact(run_id, str(report_md))
    for png in plots:
        client.log_artifact(run_id, str(png), "plots")
    client.set_terminated(run_id)
    return run_id
