"""How close a checkpoint's next-token distributions are to its base's, position by position
(issue 30): KL(base ‖ quant), top-1 agreement, the RMS change of the base's top token's
probability, and each model's perplexity, as llama.cpp's ``llama-perplexity --kl-divergence``
reports them; each figure with a bootstrap interval over the text's chunks, and the paired
difference of two checkpoints scored on the same positions.

The base is stored once as its top-k log-probabilities per position (k = the vocabulary: exact)
plus the log-probability of the text's next token. The mass outside the base's top k is one
bucket on both sides, so the divergence computed with k < vocabulary is KL between the two
distributions coarsened to k + 1 outcomes: never more than the exact value (the log-sum
inequality), equal to it when the tails agree in shape. Plain numpy: the report reads these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

TEXT_SUFFIXES = (".txt", ".jsonl")
CHART_COLUMNS = ("image", "query", "label")  # ChartQA's format (``autoround_exp.tiny.charts``)


def documents(path: Path) -> Iterator[str]:
    """The text's documents in order: a .jsonl's ``{"text"}`` or ``{"question", "answer"}``
    objects (one per line), a .txt's paragraphs (split at blank lines)."""
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    yield d["text"] if "text" in d else f"Question: {d['question']}\nAnswer: {d['answer']}"
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"line {n} is not a JSON object with text, or question and answer") from None
            return
        paragraph: list[str] = []
        for line in f:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).strip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).strip("\n")


def text_problem(path: Path, seqlen: int) -> str | None:
    """Why ``path`` cannot give one chunk of ``seqlen`` + 1 tokens, without a tokenizer: every
    token is at least one character, plus one BOS per document. None: it may (the child's
    tokenizer counts exactly)."""
    if not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    if path.suffix not in TEXT_SUFFIXES:
        return f"not a {' or '.join(TEXT_SUFFIXES)} file"
    need, have, docs = seqlen + 1, 0, 0
    try:
        for doc in documents(path):
            docs, have = docs + 1, have + len(doc) + 1
            if have >= need:
                return None
    except (ValueError, UnicodeDecodeError) as e:
        return str(e)
    if docs == 0:
        return "it holds no text"
    chars = have - docs
    return f"{chars} characters in {docs} documents: fewer than the {need} tokens of one chunk (fidelity.seqlen + 1)"


def charts(path: Path, limit: int | None = None) -> list[tuple[bytes, list[tuple[str, str]]]]:
    """The first ``limit`` charts of a ChartQA-format parquet: each image's bytes (PNG or JPEG)
    and its questions with their first answers, in order (consecutive rows of one image are
    one chart, as ChartQA and the tiny model's charts list them)."""
    import pyarrow.parquet as pq

    out: list[tuple[bytes, list[tuple[str, str]]]] = []
    for r in pq.read_table(path, columns=list(CHART_COLUMNS)).to_pylist():
        image = r["image"]["bytes"]
        if not out or out[-1][0] != image:
            if limit is not None and len(out) == limit:
                break
            out.append((image, []))
        out[-1][1].append((r["query"], r["label"][0]))
    return out


def charts_problem(path: Path) -> str | None:
    """Why ``path`` is not a ChartQA-format parquet with at least one question (None: it is)."""
    if not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    if path.suffix != ".parquet":
        return "not a .parquet file"
    try:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
        return f"not readable as parquet ({type(e).__name__}: {e})"
    missing = [c for c in CHART_COLUMNS if c not in f.schema_arrow.names]
    if missing:
        return f"no {', '.join(missing)} column (ChartQA's format: image, query, label)"
    if f.metadata.num_rows == 0:
        return "it holds no questions"
    return None


# A probability below this is floored before its logarithm (a tail the quantized model left empty)
FLOOR = 1e-12


@dataclass(frozen=True)
class BaseChunk:
    """The base model on one chunk of text: its top-k per position, and the next token's log-prob."""

    indices: np.ndarray  # [T, k] token ids, most probable first
    logprobs: np.ndarray  # [T, k] natural-log probabilities
    target_logprobs: np.ndarray  # [T] log-probability of the token that follows in the text

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def base_chunk(logprobs: np.ndarray, targets: np.ndarray, k: int) -> BaseChunk:
    """The base's full log-probabilities [T, V] of one chunk reduced to what is stored."""
    lp = np.asarray(logprobs, dtype=np.float64)
    k = min(k, lp.shape[1])
    top = (
        np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < lp.shape[1] else np.tile(np.arange(lp.shape[1]), (len(lp), 1))
    )
    # most probable first, ties by the lower token id; and first the token argmax picks (the
    # checkpoint's top is its argmax): argpartition may have kept another of equal probability
    order = np.lexsort((top, -np.take_along_axis(lp, top, axis=1)), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top[:, 0] = lp.argmax(axis=1)
    rows = np.arange(len(lp))
    return BaseChunk(top, np.take_along_axis(lp, top, axis=1), lp[rows, np.asarray(targets)])


@dataclass(frozen=True)
class Positions:
    """Per position of one chunk, a checkpoint against its base."""

    kld: np.ndarray  # KL(base ‖ quant), nats
    same_top: np.ndarray  # the two most probable tokens agree
    dp_top: np.ndarray  # quant's minus base's probability of the base's most probable token
    nll_base: np.ndarray  # -log p(next token), base
    nll_quant: np.ndarray  # -log p(next token), checkpoint


def _tail(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tail mass, its log) of the probability left outside ``logprobs`` (summed over the last axis)."""
    inside = np.exp(logprobs).sum(axis=-1)
    tail = np.clip(1.0 - inside, 0.0, 1.0)
    return tail, np.log(np.maximum(tail, FLOOR))


def compare(base: BaseChunk, quant_logprobs: np.ndarray, targets: np.ndarray) -> Positions:
    """The checkpoint's full log-probabilities [T, V] on the chunk against the stored base."""
    q = np.asarray(quant_logprobs, dtype=np.float64)
    rows = np.arange(len(q))
    lq = np.take_along_axis(q, base.indices, axis=1)  # the checkpoint on the base's top k
    return _positions(base, lq, q.argmax(axis=1), q[rows, np.asarray(targets)], tail=base.k < q.shape[1])


def compare_top(base: BaseChunk, top: BaseChunk, vocab: int) -> Positions:
    """The checkpoint known by its own top k per position (vLLM's prompt log-probabilities:
    ``top.indices`` most probable first, ``top.target_logprobs`` the text's next token) against
    the stored base. Where one of the base's top k is outside the checkpoint's, its
    log-probability is the checkpoint's leftover mass spread evenly over the tokens it did not
    return: exact where the checkpoint's k covers the vocabulary, an estimate otherwise."""
    n, kq = top.indices.shape
    _, log_rest = _tail(top.logprobs)
    fill = log_rest - np.log(max(vocab - kq, 1))  # [T]
    # every row's ids sorted and offset by row x vocab: one sorted array to look the base's up in
    order = np.argsort(top.indices, axis=1)
    ids = np.take_along_axis(top.indices, order, axis=1).astype(np.int64)
    lps = np.take_along_axis(top.logprobs, order, axis=1)
    offset = (np.arange(n, dtype=np.int64) * vocab)[:, None]
    flat = (ids + offset).ravel()
    want = base.indices.astype(np.int64) + offset
    at = np.minimum(np.searchsorted(flat, want.ravel()), flat.size - 1).reshape(want.shape)
    hit = flat[at] == want
    lq = np.where(hit, lps.ravel()[at], fill[:, None])
    return _positions(base, lq, top.indices[:, 0], top.target_logprobs, tail=base.k < vocab)


def _positions(base: BaseChunk, lq: np.ndarray, quant_top: np.ndarray, quant_target: np.ndarray, tail: bool):
    """Per position: ``lq`` the checkpoint's log-probabilities of the base's top k, ``quant_top``
    its most probable token, ``quant_target`` its log-probability of the text's next token."""
    lp_b = base.logprobs
    p_b = np.exp(lp_b)
    kld = (p_b * (lp_b - lq)).sum(axis=1)
    if tail:  # the rest of the vocabulary as one bucket on both sides
        tail_b, log_tail_b = _tail(lp_b)
        _, log_tail_q = _tail(lq)
        kld = kld + tail_b * (log_tail_b - log_tail_q)
    return Positions(
        kld=np.maximum(kld, 0.0),  # rounding can leave -1e-17 where the two agree
        same_top=np.asarray(quant_top) == base.indices[:, 0],
        dp_top=np.exp(lq[:, 0]) - p_b[:, 0],
        nll_base=-base.target_logprobs,
        nll_quant=-np.asarray(quant_target, dtype=np.float64),
    )


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` as an .npz at ``path``, which appears only complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


def ragged(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-chunk arrays of any lengths as one array and each chunk's length (``sizes``): chart
    questions are chunks of their own lengths."""
    return {"values": np.concatenate(arrays), "sizes": np.array([len(a) for a in arrays], dtype=np.int64)}


def unragged(values: np.ndarray, sizes: np.ndarray | None) -> list[np.ndarray]:
    """``ragged``'s inverse; without ``sizes`` (a store of equal chunks) the rows of ``values``."""
    if sizes is None:
        return list(values)
    return np.split(values, np.cumsum(sizes)[:-1])


def save_positions(path: Path, chunks: list[Positions]) -> None:
    """Each figure over the chunks, and each chunk's length: the per-position file of a run (paired tests)."""
    arrays = {f: np.concatenate([getattr(c, f) for c in chunks]) for f in Positions.__dataclass_fields__}
    save_npz(path, sizes=np.array([len(c.kld) for c in chunks], dtype=np.int64), **arrays)


def load_positions(path: Path) -> list[Positions]:
    with np.load(path) as z:
        sizes = z["sizes"] if "sizes" in z else None  # earlier files: chunks of one length, stacked
        fields = [unragged(z[f], sizes) for f in Positions.__dataclass_fields__]
    return [Positions(*parts) for parts in zip(*fields, strict=True)]


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # bootstrap interval over chunks
    high: float


SUMMARY = (
    "kld_mean",
    "kld_median",
    "kld_p99",
    "kld_max",
    "same_top",
    "rms_dp",
    "ppl_base",
    "ppl_quant",
    "ln_ppl_ratio",
)


def _figures(chunks: list[Positions]) -> dict[str, float]:
    kld = np.concatenate([c.kld for c in chunks])
    nll_b = np.concatenate([c.nll_base for c in chunks]).mean()
    nll_q = np.concatenate([c.nll_quant for c in chunks]).mean()
    return {
        "kld_mean": float(kld.mean()),
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "same_top": float(np.concatenate([c.same_top for c in chunks]).mean()),
        "rms_dp": float(np.sqrt((np.concatenate([c.dp_top for c in chunks]) ** 2).mean())),
        "ppl_base": float(np.exp(nll_b)),
        "ppl_quant": float(np.exp(nll_q)),
        "ln_ppl_ratio": float(nll_q - nll_b),
    }


def summarize(chunks: list[Positions], n_boot: int = 200, alpha: float = 0.05, seed: int = 0) -> dict[str, Estimate]:
    """Every figure over all positions, with a percentile bootstrap interval that resamples
    whole chunks (positions within a chunk are not independent)."""
    if not chunks:
        raise ValueError("no chunks to summarize")
    point = _figures(chunks)
    rng = np.random.default_rng(seed)
    reps = [_figures([chunks[i] for i in rng.integers(0, len(chunks), len(chunks))]) for _ in range(n_boot)]
    out = {}
    for name in SUMMARY:
        values = np.array([r[name] for r in reps])
        low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[name] = Estimate(point[name], float(low), float(high))
    return out


@dataclass(frozen=True)
class PairedKLD:
    n_chunks: int
    n_positions: int
    delta: float  # mean KLD of b minus a's, on the same positions
    low: float  # bootstrap interval over chunks
    high: float
    p: float  # sign-flip permutation test over chunks

    def within_noise(self, alpha: float) -> bool:
        return self.p >= alpha


def paired(a: list[Positions], b: list[Positions], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> PairedKLD:
    """Mean KLD of checkpoint ``b`` against checkpoint ``a``, both against the same base on the
    same chunks. Each chunk contributes its summed difference, so the statistic is the
    difference of the two position means."""
    if len(a) != len(b) or any(len(x.kld) != len(y.kld) for x, y in zip(a, b, strict=True)):
        raise ValueError("paired KLD needs the same chunks and positions on both sides")
    sums = np.array([y.kld.sum() - x.kld.sum() for x, y in zip(a, b, strict=True)])
    sizes = np.array([len(x.kld) for x in a])
    n = int(sizes.sum())
    delta = float(sums.sum() / n)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), (n_boot, len(sums)))
    boot = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    signs = rng.choice((-1.0, 1.0), (n_boot * 5, len(sums)))
    flipped = np.abs((signs * sums).sum(axis=1))
    p = float((1 + (flipped >= abs(sums.sum()) - 1e-12).sum()) / (1 + len(flipped)))
    return PairedKLD(len(sums), n, delta, float(low), float(high), p)


# ---- what a run's record holds (record.RunRecord.fidelity) ---------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FidelitySettings(_Strict):
    """What was compared (``fidelity.*``): with the run's key, the measurement's identity."""

    text: str
    text_sha256: str
    seqlen: int
    max_tokens: int
    top_k: int
    # a vision-language model's chart questions with their images (ChartQA's format), read too
    images: str | None = None
    images_sha256: str | None = None
    max_images: int | None = None


class Figure(_Strict):
    value: float
    low: float  # bootstrap 95 % interval over the text's chunks
    high: float


class Fidelity(_Strict):
    """The checkpoint against its base on the same tokens (``fidelity=kld``), or why it was not
    measured. ``figures``: ``SUMMARY``'s names; ``exact`` false when the base's top k was
    shorter than its vocabulary (KL over k + 1 outcomes: at most the exact value)."""

    settings: FidelitySettings | None = None
    measured: bool
    reason: str | None = None
    backend: str | None = None  # what computed both sides' log-probabilities
    base: str | None = None  # the base's stored distributions (computed once per identity)
    chunks: int | None = None
    positions: int | None = None
    vocab: int | None = None
    exact: bool | None = None
    token_sha256: str | None = None
    figures: dict[str, Figure] = Field(default_factory=dict)
    per_position: str | None = None  # the .npz of every position's figures (paired tests)
    seconds: float | None = None
    # a vision-language model on chart questions with their images (``settings.images``): the
    # same figures, one chunk per question, over the text after the image; its settings above
    images: Fidelity | None = None

    def value(self, figure: str) -> float | None:
        f = self.figures.get(figure)
        return f.value if f else None
