"""Security basics: remote code only where a model config opts in, no shell anywhere, and
credentials (tokens in the environment, passwords in the tracking URI) never stored."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from autoround_exp import evaluate, pipeline
from autoround_exp.preflight import validate
from tests.support import ROOT, compose_cfg, experiment


def test_no_model_config_trusts_remote_code_and_the_eval_command_does_not_either():
    for path in (ROOT / "conf" / "model").glob("*.yaml"):
        assert "trust_remote_code: true" not in path.read_text(), path
    exp = validate(compose_cfg(["serve=hf", "method=none"]))
    argv = evaluate.lm_eval_argv(exp, "/ckpt", Path("/out"), None)
    assert "trust_remote_code" not in " ".join(argv)
    opted_in = validate(compose_cfg(["serve=hf", "method=none", "model.trust_remote_code=true"]))
    assert "trust_remote_code=True" in " ".join(evaluate.lm_eval_argv(opted_in, "/ckpt", Path("/out"), None))


def test_no_code_runs_a_shell():
    for path in [*(ROOT / "autoround_exp").rglob("*.py"), ROOT / "run.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("os.system", "os.popen", "subprocess.getoutput"), f"{path}: {name}"
                for kw in node.keywords:
                    assert not (kw.arg == "shell" and ast.unparse(kw.value) != "False"), f"{path}: shell=True"


def test_a_model_name_with_shell_characters_stays_one_argument():
    name = "org/model;touch pwned$(id)"
    exp = validate(compose_cfg(["serve=hf", "method=none", f"model.path='{name}'"]))
    argv = evaluate.lm_eval_argv(exp, name, Path("/out"), None)
    assert any(a.startswith("pretrained=org/model;touch pwned$(id)") for a in argv)


def test_tokens_and_passwords_never_reach_records_or_mlflow(tmp_path, calls, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETTOKEN123")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    art = f"tracking.artifact_root={tmp_path / 'mlartifacts'}"
    exp = experiment(tmp_path, "method=none", "tracking.enabled=true", f"tracking.uri={uri}", art)
    (out,) = pipeline.run_experiment(exp, "s1")
    assert out.status == "done"
    stored = [db.read_bytes()] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != db]
    assert len(stored) > 5 and not any(b"hf_SECRETTOKEN123" in blob for blob in stored)  # artifacts included
    record = json.loads(next((tmp_path / "results" / "runs").glob("*.json")).read_text())
    assert "HF_TOKEN" not in json.dumps(record)
