"""The synthetic ChartQA-format charts: deterministic, answerable, and read by lm-eval's
stock chartqa task offline (``dataset_path: parquet``)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import yaml

from autoround_exp.tiny import charts


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return charts.write(tmp_path_factory.mktemp("charts"), n=24, seed=0)


def test_same_seed_same_questions_and_same_png_bytes(data, tmp_path):
    again = charts.write(tmp_path, n=24, seed=0)
    a, b = pd.read_parquet(data), pd.read_parquet(again)
    assert a.drop(columns="image").equals(b.drop(columns="image"))
    assert [r["bytes"] for r in a.image] == [r["bytes"] for r in b.image]
    assert (
        not pd.read_parquet(charts.write(tmp_path / "other", n=24, seed=1))
        .drop(columns="image")
        .equals(a.drop(columns="image"))
    )


def test_answers_are_what_the_chart_shows_and_never_one_digit():
    import random

    rng = random.Random(3)
    for fixed in (False, True):
        for _ in range(200):
            chart = charts.make_chart(rng, fixed_labels=fixed)
            ranked = sorted(chart.values)
            assert ranked[-1] - ranked[-2] >= charts.MARGIN and ranked[1] - ranked[0] >= charts.MARGIN
            for query, answer in [*chart.questions(rng), *chart.all_questions()]:
                if query.startswith("How many"):
                    assert len(answer) == 2  # anywhere_accuracy would match a lone digit anywhere
                    assert int(answer) == chart.values[chart.labels.index(query.split()[2])]
                else:
                    assert not any(ch.isdigit() for ch in answer)
                    want = max(chart.values) if "most" in query else min(chart.values)
                    assert "most" in query or "least" in query
                    assert chart.values[chart.labels.index(answer)] == want
            if fixed:  # labels follow from positions
                assert chart.labels == tuple(charts.CATEGORIES[: len(chart.labels)])


def test_each_bar_fills_its_own_column_of_image_tokens():
    """The layout the tiny VLM's probe relies on (charts.CELL_PX): bar k inside token column
    k + 1, its height in pixels the value's share of the axis."""
    import numpy as np
    from PIL import Image

    chart = charts.Chart("Fruit sold", ("apples", "pears", "plums"), (20, 99, 60), slots=charts.SLOTS)
    img = np.asarray(Image.open(io.BytesIO(charts.render(chart))).convert("RGB")).astype(int)
    bar = abs(img - [0x4C, 0x72, 0xB0]).sum(-1) < 30  # the bars' colour
    cell, plot = charts.CELL_PX, charts.SLOTS * charts.CELL_PX
    cols = bar.any(0).nonzero()[0]
    assert cols.min() > cell and cols.max() < cell * (1 + len(chart.values))
    for k, value in enumerate(chart.values):
        column = bar[:, cell * (k + 1) : cell * (k + 2)]
        assert column.any(0).sum() >= cell // 2  # most of the column's width
        height = column.any(1).sum()
        assert abs(height - value / charts.Y_MAX * plot) <= 2, (k, height)


def test_images_are_pngs_of_the_size_the_tiny_vlm_reads():
    from PIL import Image

    rows = charts.build(3, seed=0)
    img = Image.open(io.BytesIO(rows[0]["image"]["bytes"]))
    assert img.format == "PNG" and img.size == (224, 224)


def test_lm_evals_stock_chartqa_reads_them_offline_and_scores_the_labels_right(data, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    stock = Path(lm_eval.__file__).parent / "tasks" / "chartqa" / "chartqa.yaml"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "chartqa_charts.yaml").write_text(
        yaml.safe_dump(
            {
                "include": str(stock),
                "task": "chartqa_charts",
                "dataset_path": "parquet",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
            }
        )
    )
    task = TaskManager(include_path=str(task_dir)).load(["chartqa_charts"])["tasks"]["chartqa_charts"]
    docs = list(task.test_docs())
    assert len(docs) == 24
    doc = docs[0]
    from PIL import Image

    # decoded, as lm-eval's multimodal models need it (the file carries datasets' Image feature)
    assert isinstance(task.doc_to_image(doc)[0], Image.Image)
    assert task.doc_to_target(doc) == doc["label"][0]
    assert doc["query"] in task.doc_to_text(doc)
    # a perfect answer in the format the prompt asks for gets every metric
    scores = task.process_results(doc, [f"The chart shows it.\nFinal Answer: {doc['label'][0]}"])
    assert scores == {"exact_match": 1.0, "relaxed_accuracy": 1.0, "anywhere_accuracy": 1.0}


def test_chartqa_runs_offline_on_a_local_parquet_folder(data, tmp_path):
    """eval.data_path points chartqa at the generated charts: the task written for the child
    is the stock one with only its data source replaced, and the data is part of the key."""
    from autoround_exp import evaluate, fsutil, store
    from autoround_exp.preflight import validate
    from tests.support import compose_cfg

    args = ["model=qwen3_vl_8b_instruct", "eval=chartqa", "serve=hf", f"eval.data_path={data.parent}"]
    exp = validate(compose_cfg(args))
    assert exp.lm_eval_task == "chartqa_local"
    stock = evaluate.stock_task_yaml(exp.serve_choice.platform, exp.eval.task_yaml)
    evaluate.write_task(exp, tmp_path / "tasks", stock)
    task = yaml.safe_load((tmp_path / "tasks" / "chartqa_local.yaml").read_text())
    assert task["dataset_path"] == "parquet" and task["dataset_kwargs"] == {"data_files": {"test": str(data)}}
    assert store.eval_identity(exp, "q")["data"] == {"test": fsutil.file_digest(data)}


def test_a_missing_parquet_is_refused_at_the_door(tmp_path):
    from autoround_exp.config import ConfigError
    from autoround_exp.preflight import validate
    from tests.support import compose_cfg

    with pytest.raises(ConfigError, match="has no test.parquet"):
        validate(compose_cfg(["model=qwen3_vl_8b_instruct", "eval=chartqa", "serve=hf", f"eval.data_path={tmp_path}"]))
