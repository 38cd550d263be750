"""The run record: typed, versioned, read through one module; the first layout migrates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from autoround_exp import record
from autoround_exp.store import Store
from tests.conftest import ROOT

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


def test_no_string_walks_into_the_record_outside_its_module():
    """Readers use fields: ``r["config"]["scheme"]``, ``rec["eval"]``, ``run.record["table"]`` and the
    like appear nowhere but record.py."""
    walk = re.compile(r"""(\b(r|rec|record|found)|\.record)\s*(\[["']|\.get\()""")
    offenders = []
    # the modules that build, store, log and report run records (quantize's loguru records and the
    # tiny models' data rows are other things)
    pkg = ROOT / "autoround_exp"
    readers = [pkg / f"{m}.py" for m in ("pipeline", "store", "tracking", "benchmark", "sweep_summary")]
    for path in [*readers, *(pkg / "report").glob("*.py"), ROOT / "notebooks" / "report.ipynb"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if walk.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
