"""ChartCode, what the tiny Qwen3-VL's vision tower learns to say about a chart (its build's
first stage): seeded, distinct per chart, and readable back from the mean image token."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from autoround_exp.tiny import charts
from tools.tiny.build_qwen3_vl import ChartCode


def some_charts(n: int, seed: int = 0) -> list[charts.Chart]:
    rng = random.Random(seed)
    return [charts.make_chart(rng, fixed_labels=True) for _ in range(n)]


def test_the_code_is_seeded_and_one_token_per_grid_cell():
    cs = some_charts(4)
    a, b = ChartCode(256).targets(cs), ChartCode(256).targets(cs)
    side = charts.SIZE_PX // charts.CELL_PX
    assert a.shape == (4, side * side, 256) and torch.equal(a, b)
    assert not torch.equal(a, ChartCode(256, seed=6).targets(cs))


def test_charts_that_differ_get_codes_that_differ_and_cells_keep_their_place():
    one = charts.Chart("Fruit sold", ("apples", "pears", "plums"), (20, 99, 60), slots=charts.SLOTS)
    other = charts.Chart("Fruit sold", ("apples", "pears", "plums"), (20, 98, 60), slots=charts.SLOTS)
    code = ChartCode(256)
    a, b = code.target(one), code.target(other)
    assert not torch.allclose(a, b)
    # the chart's part is the same in every token; tokens differ by their row and column only
    assert torch.allclose(a[1] - a[0], code.col[1] - code.col[0], atol=1e-6)
    assert torch.allclose(a[7] - a[0], code.row[1] - code.row[0], atol=1e-6)


def test_the_exact_code_reads_back_the_chart():
    """A tower that said the code exactly would hand over every tallest, shortest and nearly
    every value (the codebook's vectors are random, so they interfere a little)."""
    cs = some_charts(200)
    code = ChartCode(256)
    report = code.report(SimpleNamespace(pooler_output=code.targets(cs).flatten(0, 1)), cs)
    assert "tallest 1.00 shortest 1.00" in report, report
    exact = float(report.split("digits exact ")[1].split()[0])
    assert exact >= 0.9, report
    # and a tower that says nothing reads nothing
    noise = code.report(SimpleNamespace(pooler_output=torch.zeros(200 * 49, 256)), cs)
    assert "tallest 1.00" not in noise
