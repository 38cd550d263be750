"""Paired statistics between two runs scored on the same documents, and seed aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Paired:
    n: int  # documents both runs scored
    delta: float  # mean(b) - mean(a)
    se: float  # paired standard error of delta
    low: float  # 95 % (1 - alpha) interval of delta
    high: float
    p: float  # McNemar's exact test for 0/1 scores, else the paired normal test
    test: str
    alpha: float

    @property
    def within_noise(self) -> bool:
        return self.p >= self.alpha


def paired(a, b, alpha: float = 0.05) -> Paired:
    """Compare per-document scores ``b`` against ``a`` (same documents, same order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired scores need two equal-length vectors of >= 2 documents, got {a.shape} and {b.shape}")
    d = b - a
    n = len(d)
    delta = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n))
    z = NormalDist().inv_cdf(1 - alpha / 2)
    binary = set(np.unique(np.concatenate([a, b]))) <= {0.0, 1.0}
    if binary:
        gained = int(((a == 0) & (b == 1)).sum())
        lost = int(((a == 1) & (b == 0)).sum())
        p = mcnemar_exact(gained, lost)
        test = "McNemar exact"
    else:
        if se > 0:
            p = math.erfc(abs(delta) / se / math.sqrt(2))  # two-sided normal tail
        else:  # every document moved by the same amount
            p = 1.0 if delta == 0 else 0.0
        test = "paired z"
    return Paired(n, delta, se, delta - z * se, delta + z * se, p, test, alpha)


def mcnemar_exact(gained: int, lost: int) -> float:
    """McNemar's exact test: the two-sided binomial test of ``gained`` in ``gained + lost``
    discordant documents at 1/2 (as scipy.stats.binomtest; the standard library's integers keep it
    exact, and the harness's process does not pay scipy.stats' import, 1.4 s, to load it)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**n)


def align(a: dict, b: dict, column: str) -> tuple[list, list]:
    """The two runs' scores on the documents both scored, matched on document id and the hash
    of prompt and target (lm-eval's document hash for runs stored without it)."""
    field = doc_keys([a, b])
    index_b = {(i, h): k for k, (i, h) in enumerate(zip(b["doc_id"], b[field], strict=True))}
    xs, ys = [], []
    for k, key in enumerate(zip(a["doc_id"], a[field], strict=True)):
        j = index_b.get(key)
        if j is not None and a[column][k] is not None and b[column][j] is not None:
            xs.append(a[column][k])
            ys.append(b[column][j])
    return xs, ys


def doc_keys(samples: list[dict]) -> str:
    """The field that identifies a document in every one of ``samples``: the hash of prompt and
    target where all have it, else lm-eval's document hash."""
    return "prompt_hash" if all("prompt_hash" in s for s in samples) else "doc_hash"


def seed_means(samples: list[dict], column: str, field: str) -> dict[tuple, float]:
    """Each document's score averaged over the runs (one per seed) that scored it."""
    sums: dict[tuple, list[float]] = {}
    for s in samples:
        for doc, h, v in zip(s["doc_id"], s[field], s[column], strict=True):
            if v is not None:
                sums.setdefault((doc, h), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def align_seeds(a: list[dict], b: list[dict], column: str) -> tuple[list, list]:
    """Two rows' per-document scores, each the mean over the row's seeds, on the documents both
    rows scored. The document stays the unit of the paired test: a row of three seeds gives
    one value per document (0, 1/3, 2/3 or 1), not three draws of it."""
    field = doc_keys([*a, *b])
    ma, mb = seed_means(a, column, field), seed_means(b, column, field)
    keys = [k for k in ma if k in mb]
    return [ma[k] for k in keys], [mb[k] for k in keys]


@dataclass(frozen=True)
class Aggregate:
    mean: float
    std: float | None  # across seeds (ddof=1); None for one seed
    n: int


def across_seeds(values: list[float]) -> Aggregate:
    v = np.asarray(values, dtype=float)
    return Aggregate(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))
