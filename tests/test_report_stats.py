"""The report's statistics on synthetic paired data of known effect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoround_exp.report import stats
from tests.support import ROOT


def flips(n: int, p: float, gained: int, lost: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """a ~ Bernoulli(p); b = a with ``gained`` wrong answers made right and ``lost`` right ones made wrong."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < p).astype(float)
    b = a.copy()
    wrong, right = np.flatnonzero(a == 0), np.flatnonzero(a == 1)
    b[rng.choice(wrong, gained, replace=False)] = 1
    b[rng.choice(right, lost, replace=False)] = 0
    return a, b


def test_known_improvement_is_found_with_its_exact_size():
    a, b = flips(1000, 0.7, gained=60, lost=20)
    t = stats.paired(a, b)
    assert t.delta == pytest.approx(0.04)
    assert t.low < 0.04 < t.high and t.low > 0
    assert t.test == "McNemar exact" and t.p < 1e-4 and not t.within_noise
    # McNemar's exact p is the two-sided binomial tail of 20 losses among 80 discordant pairs
    from scipy.stats import binom

    assert t.p == pytest.approx(2 * binom.cdf(20, 80, 0.5))


def test_exact_and_normal_tests_equal_scipys_without_importing_it_in_the_harness():
    from scipy.stats import binomtest, norm

    for gained, lost in [(0, 0), (0, 1), (3, 3), (5, 2), (20, 60), (0, 40), (700, 619), (1, 1318)]:
        want = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
        assert stats.mcnemar_exact(gained, lost) == pytest.approx(want, rel=1e-9, abs=1e-300), (gained, lost)
    a = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    t = stats.paired(a, a + np.array([0.05, 0.1, -0.02, 0.07, 0.03]))
    assert t.test == "paired z" and t.p == pytest.approx(2 * norm.sf(t.delta / t.se), rel=1e-9)
    assert t.high - t.delta == pytest.approx(norm.ppf(0.975) * t.se, rel=1e-12)
    # scipy.stats costs the sweep's process 1.4 s to import (every run.py, every report)
    code = "import sys, autoround_exp.report.render, autoround_exp.report.compact; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_balanced_flips_are_within_noise():
    a, b = flips(1000, 0.7, gained=15, lost=15)
    t = stats.paired(a, b)
    assert t.delta == 0 and t.p == 1.0 and t.within_noise and t.low < 0 < t.high


def test_paired_interval_is_much_tighter_than_unpaired_for_correlated_runs():
    a, b = flips(1000, 0.7, gained=30, lost=10)
    t = stats.paired(a, b)
    unpaired_se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert t.se < unpaired_se / 2


def correlated_runs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two runs sharing each document's difficulty, each with its own noise."""
    u = rng.random(n)
    a = (u + 0.1 * rng.standard_normal(n) < 0.70).astype(float)
    b = (u + 0.1 * rng.standard_normal(n) < 0.73).astype(float)
    return a, b


def test_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    big_a, big_b = correlated_runs(rng, 2_000_000)
    true_delta = big_b.mean() - big_a.mean()  # about 0.03
    reps = 400
    covered = 0
    for _ in range(reps):
        t = stats.paired(*correlated_runs(rng, 1000))
        covered += t.low <= true_delta <= t.high
    assert 0.92 <= covered / reps <= 0.98


def test_false_positive_rate_under_no_effect_is_about_alpha():
    rng = np.random.default_rng(2)
    reps, hits = 1000, 0
    for _ in range(reps):
        a = (rng.random(400) < 0.7).astype(float)
        b = a.copy()
        swap = rng.random(400) < 0.1  # discordant pairs, equally likely either way
        b[swap] = (rng.random(swap.sum()) < 0.7).astype(float)
        hits += not stats.paired(a, b).within_noise
    assert hits / reps <= 0.06  # exact McNemar is conservative: at most alpha


def test_non_binary_scores_use_the_paired_normal_test():
    rng = np.random.default_rng(3)
    a = rng.random(300)
    t = stats.paired(a, a + 0.1)
    assert t.test == "paired z" and t.delta == pytest.approx(0.1) and t.p == 0.0


def test_unequal_vectors_are_rejected():
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired([1, 0, 1], [1, 0])


def test_align_pairs_on_the_same_documents_in_any_order():
    a = {"doc_id": [0, 1, 2, 3], "doc_hash": ["h0", "h1", "h2", "h3"], "m": [1.0, 0.0, 1.0, 0.0]}
    b = {"doc_id": [3, 2, 0], "doc_hash": ["h3", "h2", "h0"], "m": [1.0, 1.0, 0.0]}
    assert stats.align(a, b, "m") == ([1.0, 1.0, 0.0], [0.0, 1.0, 1.0])
    # a different document under the same id (another data set) is not paired
    c = {"doc_id": [0, 1], "doc_hash": ["x0", "h1"], "m": [1.0, 1.0]}
    assert stats.align(a, c, "m") == ([0.0], [1.0])


def test_seeds_aggregate_to_mean_and_sample_std():
    agg = stats.across_seeds([0.70, 0.72, 0.74])
    assert agg.mean == pytest.approx(0.72) and agg.std == pytest.approx(0.02) and agg.n == 3
    assert stats.across_seeds([0.7]).std is None


def test_documents_holding_an_image_pair_although_lm_evals_doc_hash_differs(tmp_path):
    """lm-eval hashes an image document with the image object's repr (its memory address), so
    the same chart question has another doc_hash in every run: pair on prompt and target."""
    from autoround_exp.lmeval_results import per_sample

    (source,) = (Path(__file__).parent / "data").glob("samples_gsm8k_arith_*.jsonl")
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    runs = []
    for run in ("a", "b"):
        path = tmp_path / run / source.name
        path.parent.mkdir()
        path.write_text("\n".join(json.dumps(s | {"doc_hash": f"{run}{s['doc_id']}"}) for s in lines) + "\n")
        runs.append(per_sample([str(path)])["gsm8k_arith"])
    xs, ys = stats.align(runs[0], runs[1], "exact_match,strict-match")
    assert len(xs) == len({s["doc_id"] for s in lines}) and xs == ys
    # another target under the same id and prompt is another document
    runs[1]["prompt_hash"] = ["x" + h for h in runs[1]["prompt_hash"]]
    assert stats.align(runs[0], runs[1], "exact_match,strict-match") == ([], [])
