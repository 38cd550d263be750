"""Synthetic arithmetic word problems in gsm8k's format (``question`` / ``answer`` ending
in ``#### N``), the task the embedded tiny model is trained and scored on.

Everything is a pure function of a seed, so the train, test and dev splits (and the
held-out test triples) are identical on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Tom", "Ana", "Raj", "Mei", "Olu", "Sara", "Ivan", "Lena", "Omar", "Kim"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
ADD_TEMPLATES = [
    "{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
    "{n} picked {a} {i} in the morning and {b} {i} in the afternoon. How many {i} in all?",
    "A box holds {a} {i}. {n} puts in {b} more {i}. How many {i} are in the box?",
]
SUB_TEMPLATES = [
    "{n} has {a} {i} and gives away {b}. How many {i} does {n} have left?",
    "A shelf had {a} {i}. {n} took {b} of them. How many {i} are on the shelf now?",
    "{n} had {a} {i} and lost {b}. How many {i} does {n} still have?",
]


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def render(self, rng: random.Random) -> dict[str, str]:
        templates = ADD_TEMPLATES if self.op == "+" else SUB_TEMPLATES
        question = rng.choice(templates).format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=self.a, b=self.b)
        answer = f"{self.a} {self.op} {self.b} = {self.result}\n#### {self.result}"
        return {"question": question, "answer": answer}


def all_problems(max_operand: int = 99) -> list[Problem]:
    """Every 1-2 digit addition, and every subtraction with a non-negative result."""
    probs = [Problem(a, b, "+") for a in range(max_operand + 1) for b in range(max_operand + 1)]
    probs += [Problem(a, b, "-") for a in range(max_operand + 1) for b in range(a + 1)]
    return probs


def split_problems(
    seed: int = 0, n_test: int = 1000, n_dev: int = 200
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, test, dev): test and dev triples never appear in train."""
    probs = all_problems()
    random.Random(seed).shuffle(probs)
    return probs[n_test + n_dev :], probs[:n_test], probs[n_test : n_test + n_dev]


def write_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write gsm8k-format jsonl files: train (few-shot pool), test (scored), dev."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test, dev = split_problems(seed)
    rng = random.Random(seed + 1)
    paths = {}
    # The few-shot pool is a small slice of train: lm-eval samples shots from it.
    for name, probs in (("train", train[:500]), ("test", test), ("dev", dev)):
        path = out_dir / f"{name}.jsonl"
        with path.open("w") as f:
            for p in probs:
                f.write(json.dumps(p.render(rng)) + "\n")
        paths[name] = path
    # Calibration text: few-shot blocks of training problems, the model's own kind of text.
    calib_rng = random.Random(seed + 2)
    path = out_dir / "calib.jsonl"
    with path.open("w") as f:
        for _ in range(256):
            docs = [p.render(calib_rng) for p in calib_rng.sample(train, 6)]
            text = "\n\n".join(f"Question: {d['question']}\nAnswer: {d['answer']}" for d in docs)
            f.write(json.dumps({"text": text}) + "\n")
    paths["calib"] = path
    return paths


if __name__ == "__main__":
    from autoround_exp.assets import ROOT

    for name, path in write_splits(ROOT / "data" / "arith_gsm8k").items():
        print(name, path)
