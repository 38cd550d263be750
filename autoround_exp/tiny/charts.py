"""Synthetic charts in ChartQA's format (``image`` / ``query`` / ``label``), for scoring
vision-language models offline with lm-eval's stock chartqa task.

Bar charts drawn with matplotlib from a seeded random stream, asked ChartQA's two kinds of
question: a number read off the chart ("How many pears were sold?") and a label chosen by
comparing the bars ("Which fruit sold the most?"). Every number is of two digits, because
chartqa's ``anywhere_accuracy`` counts a one-digit answer found anywhere in the output as
right. The same seed gives the same questions and the same PNG bytes on every machine with
the pinned matplotlib.

    python -m autoround_exp.tiny.charts --out DIR [--n 200] [--seed 0] [--split test]

The embedded set (``assets/data/charts``), made for the tiny VLM (``--fixed-labels``):
test.parquet ``--n 300 --seed 0 --fixed-labels``, and calib.parquet
``--n 48 --seed 2000 --split calib --fixed-labels`` for image+text calibration.
"""

from __future__ import annotations

import argparse
import functools
import io
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ["apples", "pears", "plums", "grapes", "lemons", "cherries", "melons", "peaches", "figs", "limes"]
VALUES = range(20, 100)  # two digits: anywhere_accuracy counts a lone digit found anywhere as right
# The most and the least stand out from the others by this much: one right answer, as in
# ChartQA's human-written comparison questions, not a tie to the eye.
MARGIN = 8
SLOTS = 5  # the most bars a chart has
# The picture's layout on Qwen-VL's grid: a 224 px chart is 7 x 7 image tokens of 32 px
# (patch 16, spatial merge 2). Bar k fills token column k + 1, the value axis's labels
# column 0, the title row 0 and the fruit names row 6, so the height of a bar is the share
# of its column's tokens that the bar fills.
SIZE_PX = 224
CELL_PX = 32
Y_MAX = 100


@dataclass(frozen=True)
class Chart:
    title: str
    labels: tuple[str, ...]
    values: tuple[int, ...]
    # bar slots drawn: with fixed labels always SLOTS, so each fruit sits at the same place on
    # every chart; 0: as many as labels
    slots: int = 0

    @property
    def top(self) -> str:
        return self.labels[self.values.index(max(self.values))]

    @property
    def low(self) -> str:
        return self.labels[self.values.index(min(self.values))]

    @staticmethod
    def value_question(label: str) -> str:
        return f"How many {label} were sold?"

    def comparison_questions(self) -> list[tuple[str, str]]:
        return [("Which fruit sold the most?", self.top), ("Which fruit sold the least?", self.low)]

    def questions(self, rng: random.Random) -> list[tuple[str, str]]:
        """(query, answer) pairs this chart is asked, ChartQA-style: one number read off the
        chart and two labels chosen by comparing the bars."""
        i = rng.randrange(len(self.labels))
        return [(self.value_question(self.labels[i]), str(self.values[i])), *self.comparison_questions()]

    def all_questions(self) -> list[tuple[str, str]]:
        """Every question of those kinds the chart answers (for training)."""
        values = [(self.value_question(lb), str(v)) for lb, v in zip(self.labels, self.values, strict=True)]
        return [*values, *self.comparison_questions()]


def _values(rng: random.Random, n: int) -> tuple[int, ...]:
    while True:
        values = sorted(rng.sample(VALUES, n))
        if values[-1] - values[-2] >= MARGIN and values[1] - values[0] >= MARGIN:
            rng.shuffle(values)
            return tuple(values)


def make_chart(rng: random.Random, fixed_labels: bool = False) -> Chart:
    """``fixed_labels``: the bars always name the first fruits in one order, each at the same
    place on every chart (the x axis keeps room for the most a chart has), so the labels follow
    from positions: a model too small to read text off an image (the embedded tiny VLM) can
    still answer which one, and read the value of a named fruit."""
    n = rng.randint(3, SLOTS)
    labels = tuple(CATEGORIES[:n]) if fixed_labels else tuple(rng.sample(CATEGORIES, n))
    return Chart("Fruit sold", labels, _values(rng, n), slots=SLOTS if fixed_labels else 0)


@functools.cache
def _canvas():
    """One figure per process with its fixed parts (value axis, frame), redrawn for every
    chart: a new figure, cleared axes or tight layout cost several times the drawing itself,
    and the tiny VLM's build renders thousands of charts. ``render`` sets everything else
    anew, so a chart's bytes do not depend on the charts drawn before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 56
    fig = plt.figure(figsize=(SIZE_PX / dpi, SIZE_PX / dpi), dpi=dpi)
    cell = CELL_PX / SIZE_PX
    # plot area: token columns 1-5 and rows 1-5 (see CELL_PX)
    ax = fig.add_axes((cell, cell, SLOTS * cell, SLOTS * cell))
    ax.set_ylim(0, Y_MAX)
    ax.set_yticks([0, 25, 50, 75, 100])
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", labelsize=7, length=0)
    return fig, ax


def render(chart: Chart) -> bytes:
    """The chart as PNG bytes (``SIZE_PX`` square)."""
    fig, ax = _canvas()
    for container in list(ax.containers):
        container.remove()  # a bar chart's bars, with their container
    for artist in [*ax.patches, *ax.texts]:
        artist.remove()
    x = range(len(chart.labels))
    ax.bar(x, chart.values, width=0.75, color="#4c72b0")
    ax.set_xticks(list(x), chart.labels)
    ax.set_xlim(-0.5, max(chart.slots, len(chart.labels)) - 0.5)
    ax.set_ylim(0, Y_MAX)
    ax.set_title(chart.title, fontsize=9, y=1.0, pad=4)  # a fixed place: no layout pass per chart
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
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
                        "chart_kind": "bar",
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
