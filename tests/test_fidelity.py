"""The fidelity figures (KL divergence, top-token agreement, Δp, perplexity) on distributions
whose answers are known, the top-k approximation against the exact value, and the paired test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax
from scipy.stats import entropy

from autoround_exp import fidelity

V = 50


def logits(rng, t: int = 64, v: int = V, peak: float = 4.0) -> np.ndarray:
    """Peaked next-token distributions, as a language model's are: a few likely tokens."""
    x = rng.normal(size=(t, v))
    x[np.arange(t), rng.integers(0, v, t)] += peak
    return x


def chunks(rng, n: int, noise: float, base_logits=None):
    """n chunks: the base's log-probs, a checkpoint's (the base's logits plus noise), targets."""
    out = []
    for i in range(n):
        b = base_logits[i] if base_logits is not None else logits(rng)
        q = b + noise * rng.normal(size=b.shape)
        targets = rng.integers(0, b.shape[1], len(b))
        out.append((log_softmax(b, axis=1), log_softmax(q, axis=1), targets))
    return out


def positions(data, k: int = V) -> list[fidelity.Positions]:
    return [fidelity.compare(fidelity.base_chunk(b, t, k), q, t) for b, q, t in data]


def test_a_checkpoint_identical_to_its_base_has_zero_divergence_and_full_agreement():
    rng = np.random.default_rng(0)
    data = [(b, b.copy(), t) for b, _, t in chunks(rng, 4, 0.0)]
    s = fidelity.summarize(positions(data, k=10))
    assert s["kld_mean"].value == pytest.approx(0, abs=1e-12) and s["kld_max"].value == pytest.approx(0, abs=1e-12)
    assert s["same_top"].value == 1.0 and s["rms_dp"].value == 0.0 and s["ln_ppl_ratio"].value == 0.0
    assert s["ppl_base"].value == s["ppl_quant"].value > 1


def test_exact_kld_is_scipys_relative_entropy_and_the_figures_match_their_definitions():
    rng = np.random.default_rng(1)
    ((b, q, t),) = chunks(rng, 1, 0.7)
    pos = fidelity.compare(fidelity.base_chunk(b, t, V), q, t)
    want = [entropy(np.exp(pb), np.exp(pq)) for pb, pq in zip(b, q, strict=True)]
    np.testing.assert_allclose(pos.kld, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(pos.same_top, b.argmax(1) == q.argmax(1))
    rows = np.arange(len(b))
    np.testing.assert_allclose(pos.dp_top, np.exp(q[rows, b.argmax(1)]) - np.exp(b.max(1)))
    np.testing.assert_allclose(pos.nll_quant, -q[rows, t])
    s = fidelity.summarize([pos], n_boot=50)
    assert s["ppl_quant"].value == pytest.approx(np.exp(-q[rows, t].mean()))
    assert s["kld_median"].value == pytest.approx(np.median(want))


def test_top_k_with_the_tail_as_one_bucket_never_exceeds_the_exact_value_and_closes_on_it():
    rng = np.random.default_rng(2)
    data = chunks(rng, 8, 0.5)
    exact = np.concatenate([p.kld for p in positions(data, V)])
    errors = []
    for k in (1, 5, 20, 49):
        approx = np.concatenate([p.kld for p in positions(data, k)])
        assert (approx <= exact + 1e-12).all()  # the log-sum inequality: coarsening loses divergence
        errors.append(float(exact.mean() - approx.mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 * exact.mean()


def test_a_more_damaged_checkpoint_is_told_apart_by_the_paired_test_and_a_tie_is_not():
    rng = np.random.default_rng(3)
    base = [logits(rng) for _ in range(40)]
    mild = positions(chunks(np.random.default_rng(4), 40, 0.3, base))
    worse = positions(chunks(np.random.default_rng(5), 40, 0.6, base))
    again = positions(chunks(np.random.default_rng(6), 40, 0.3, base))
    s_mild, s_worse = fidelity.summarize(mild), fidelity.summarize(worse)
    assert s_worse["kld_mean"].low > s_mild["kld_mean"].high  # intervals apart
    t = fidelity.paired(mild, worse)
    assert t.delta == pytest.approx(s_worse["kld_mean"].value - s_mild["kld_mean"].value)
    assert t.low > 0 and t.p < 0.01 and t.n_positions == 40 * 64
    tie = fidelity.paired(mild, again)
    assert tie.low < 0 < tie.high and tie.within_noise(0.05)
    for name in ("kld_mean", "same_top", "rms_dp", "ln_ppl_ratio"):  # means: their intervals hold them
        assert s_mild[name].low <= s_mild[name].value <= s_mild[name].high, name


def test_paired_needs_the_same_chunks():
    rng = np.random.default_rng(7)
    a = positions(chunks(rng, 3, 0.3))
    with pytest.raises(ValueError, match="same chunks"):
        fidelity.paired(a, a[:2])
