"""Synthetic charts in ChartQA's format (``image`` / ``query`` / ``label``), for scoring
vision-language models offline with lm-eval's stock chartqa task.

Bar and line charts with numbers and labels are drawn with matplotlib from a seeded
random stream; every answer is a number of two or more digits or a word, because
chartqa's ``anywhere_accuracy`` counts a one-digit answer found anywhere in the output as
right. The same seed gives the same questions and the same PNG bytes on every machine
with the pinned matplotlib.

    python -m autoround_exp.tiny.charts --out DIR [--n 200] [--seed 0] [--split test]

The embedded set (``assets/data/charts``), made for the tiny VLM (``--fixed-labels``):
test.parquet ``--n 150 --seed 0 --fixed-labels``, and calib.parquet
``--n 48 --seed 2000 --split calib --fixed-labels`` for image+text calibration.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ["apples", "pears", "plums", "grapes", "lemons", "cherries", "melons", "peaches", "figs", "limes"]
YEARS = list(range(2010, 2024))


@dataclass(frozen=True)
class Chart:
    kind: str  # bar | line
    title: str
    labels: tuple[str, ...]
    values: tuple[int, ...]

    def questions(self, rng: random.Random) -> list[tuple[str, str]]:
        """(query, answer) pairs this chart answers, ChartQA-style."""
        i = rng.randrange(len(self.labels))
        top = self.labels[self.values.index(max(self.values))]
        low = self.labels[self.values.index(min(self.values))]
        if self.kind == "bar":
            return [
                (f"How many {self.labels[i]} were sold?", str(self.values[i])),
                ("Which fruit sold the most?", top),
                ("Which fruit sold the least?", low),
            ]
        return [
            (f"What was the value in {self.labels[i]}?", str(self.values[i])),
            ("In which year was the value highest?", top),
            (
                "What is the difference between the highest and the lowest value?",
                str(max(self.values) - min(self.values)),
            ),
        ]


def make_chart(rng: random.Random, fixed_labels: bool = False) -> Chart:
    """``fixed_labels``: bars always name the first fruits in one order and lines always
    start in 2010, so the labels follow from positions; a model too small to read text off
    an image (the embedded tiny VLM) can still answer the which-one questions."""
    if rng.random() < 0.5:
        n = rng.randint(3, 5)
        labels = tuple(CATEGORIES[:n]) if fixed_labels else tuple(rng.sample(CATEGORIES, n))
        values = tuple(rng.sample(range(10, 100), n))  # distinct: one right answer to "most"
        return Chart("bar", "Fruit sold", labels, values)
    n = rng.randint(4, 6)
    start = 0 if fixed_labels else rng.randrange(len(YEARS) - n)
    labels = tuple(str(y) for y in YEARS[start : start + n])
    values = tuple(rng.sample(range(10, 100), n))
    # a difference below 10 would be a one-digit answer
    while max(values) - min(values) < 10:
        values = tuple(rng.sample(range(10, 100), n))
    return Chart("line", "Visitors (thousands)", labels, values)


def render(chart: Chart, size_px: int = 224) -> bytes:
    """The chart as PNG bytes, with its numbers written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 56
    fig, ax = plt.subplots(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    x = range(len(chart.labels))
    if chart.kind == "bar":
        ax.bar(x, chart.values, color="#4c72b0")
    else:
        ax.plot(x, chart.values, marker="o", color="#dd8452")
    for xi, v in zip(x, chart.values, strict=True):
        ax.annotate(str(v), (xi, v), ha="center", va="bottom", fontsize=10)
    ax.set_xticks(list(x), chart.labels, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_title(chart.title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def build(n: int, seed: int, fixed_labels: bool = False) -> list[dict]:
    """``n`` ChartQA rows: ``{"image": {"bytes", "path"}, "query", "label": [answer], ...}``."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        chart = make_chart(rng, fixed_labels)
        png = render(chart)
        for query, answer in chart.questions(rng):
            if len(rows) < n:
                rows.append(
                    {
                        "image": {"bytes": png, "path": None},
                        "query": query,
                        "label": [answer],
                        "human_or_machine": 1,  # ChartQA's field: 1 = generated question
                        "chart_kind": chart.kind,
                    }
                )
    return rows


def write(out: Path, n: int = 200, seed: int = 0, split: str = "test", fixed_labels: bool = False) -> Path:
    """``out/<split>.parquet``, loadable by ``datasets`` (``dataset_path: parquet``).

    Written by ``datasets`` with an ``Image`` feature, as the hub's ChartQA is: the schema
    stored in the file makes ``load_dataset`` hand lm-eval PIL images, not raw bytes."""
    from datasets import Dataset, Features, Image, Sequence, Value

    features = Features(
        {
            "image": Image(),
            "query": Value("string"),
            "label": Sequence(Value("string")),
            "human_or_machine": Value("int64"),
            "chart_kind": Value("string"),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.parquet"
    Dataset.from_list(build(n, seed, fixed_labels), features=features).to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", help="file name: <split>.parquet")
    p.add_argument("--fixed-labels", action="store_true", help="labels follow from positions (see make_chart)")
    args = p.parse_args(argv)
    print(write(args.out, args.n, args.seed, args.split, args.fixed_labels))


if __name__ == "__main__":
    main()
