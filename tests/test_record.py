"""The run record: typed, versioned, read through one module; the first layout migrates."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

from autoround_exp import record
from autoround_exp.store import Store
from tests.support import ROOT

FIXTURE = Path(__file__).parent / "data" / "report" / "results"


def test_records_of_the_first_layout_migrate():
    recs = {r.name: r for r in Store(FIXTURE).records()}
    assert len(recs) == 7
    ar = recs["tiny_llama-w4a16-autoround-iters200"]
    raw = json.loads(next((FIXTURE / "runs").glob("tiny_llama-w4a16-autoround-iters200__*.json")).read_text())
    assert "schema_version" not in raw  # the committed fixtures stay in the first layout, to test this
    assert ar.schema_version == record.SCHEMA_VERSION
    assert ar.scheme_preset == raw["config"]["scheme"]["preset"] == "W4A16"
    assert ar.eval_settings.limit is None and ar.eval_settings.num_fewshot == 5 and ar.eval_settings.add_bos_token
    assert ar.tracking.status == "logged" and ar.mlflow_run_id == raw["mlflow_run_id"]
    assert ar.metric("exact_match,strict-match").value == raw["metrics"]["gsm8k_arith/exact_match/strict-match"]
    assert recs["tiny_llama-base"].scheme_preset is None


def test_a_record_round_trips_through_the_store(tmp_path):
    rec = Store(FIXTURE).records()[0]
    path = Store(tmp_path).save(rec, {"t": {"doc_id": [0]}})
    again = Store(tmp_path).find(rec.key)
    assert again == rec and json.loads(path.read_text())["schema_version"] == record.SCHEMA_VERSION


def test_record_times_keep_milliseconds_and_older_whole_seconds_still_read():
    import time

    before = time.time() * 1000
    stamp = record.now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp), stamp
    assert before - 1 <= record.epoch_ms(stamp) <= time.time() * 1000 + 1
    assert record.epoch_ms("2026-12-02T05:00:00+0000") == 1796187600000  # a record written before
    assert record.epoch_ms(None) is None


def test_a_record_that_does_not_read_says_how_to_regenerate(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "results")
    path = next((tmp_path / "results" / "runs").glob("*.json"))
    data = json.loads(path.read_text())
    data["tabel"] = data.pop("table")  # a renamed key
    path.write_text(json.dumps(data))
    with pytest.raises(record.RecordError, match="re-run its job") as err:
        Store(tmp_path / "results").records()
    assert path.name in str(err.value)


def test_a_newer_schema_is_refused_not_misread():
    data = json.loads(next((FIXTURE / "runs").glob("*.json")).read_text()) | {"schema_version": 99}
    with pytest.raises(record.RecordError, match="newer than this harness reads"):
        record.from_dict(data)


# Fields only a run record has: a string key of these read anywhere but record.py is a walk
# into a record's JSON (``x["eval_settings"]["limit"]``, ``d.get("quant_key")``), whatever the
# variable is called. Names that are also config groups or lm-eval's keys (model, eval, method,
# metrics, versions, ...) are left out: a record's reader meets those through the typed fields.
GENERIC = {"name", "key", "model", "scheme", "method", "iters", "seed", "eval", "calibration", "perf", "tracking"}
GENERIC |= {"config", "metrics", "versions", "status", "error", "backend", "logs", "checkpoint", "device"}


def record_only_keys() -> set[str]:
    top = {f for m in (record.RunRecord, record.FailureRecord) for f in m.model_fields} - GENERIC
    nested = {"task_versions", "lm_eval_model", "results_json", "server_command", "backend_requested", "parent_run_id"}
    return top | nested


def string_walks(source: str, keys: set[str]) -> list[tuple[int, str]]:
    """``x["k"]`` and ``x.get("k")`` with a record-only key ``k``, on any expression ``x``
    but a typed object's attribute (``rec.stages["perf"]`` reads a dict field by its key)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        base = key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            base, key = node.value, node.slice.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            base, key = node.func.value, node.args[0].value
        if key in keys and not isinstance(base, ast.Attribute):
            out.append((node.lineno, ast.unparse(node)))
    return out


def test_no_string_walks_into_the_record_outside_its_module():
    """Readers use fields: a record's JSON is read in record.py only (``from_dict``, ``load_any``)."""
    keys = record_only_keys()
    offenders = []
    sources = [p for p in (ROOT / "autoround_exp").rglob("*.py") if p.name != "record.py"]
    for path in [*sources, ROOT / "run.py"]:
        offenders += [f"{path.relative_to(ROOT)}:{n}: {code}" for n, code in string_walks(path.read_text(), keys)]
    nb = json.loads((ROOT / "notebooks" / "report.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            offenders += [f"report.ipynb: {code}" for _, code in string_walks("".join(cell["source"]), keys)]
    assert offenders == []


@pytest.mark.parametrize(
    "planted",
    [
        'limit = whatever["eval_settings"]["limit"]',
        'q = json.loads(text).get("quant_key")',
        'when = rows[0]["finished_at"]',
        'name = data["checkpoint_name"]',
    ],
)
def test_the_string_walk_guard_catches_a_planted_read_whatever_the_variable(planted):
    assert string_walks(planted, record_only_keys()) != []


def test_the_string_walk_guard_leaves_typed_reads_alone():
    keys = record_only_keys()
    assert string_walks('t = rec.stages["perf"]; u = cfg["eval"]["limit"]; v = rec.eval_settings.limit', keys) == []
