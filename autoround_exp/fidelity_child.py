"""The fidelity stage's child: one model's next-token distributions on a fixed text, teacher-forced
through transformers, chunk by chunk.

    python -m autoround_exp.fidelity_child base    <request.json>   # the base: stores its top k
    python -m autoround_exp.fidelity_child compare <request.json>   # a checkpoint against that store
    python -m autoround_exp.fidelity_child run     <request.json>   # the pipeline's: base if asked, then compare

The pipeline's ``run`` also happens inside the evaluation child, after lm-eval, where that child
is transformers' (``lm_eval_cli`` runs ``after_evaluation`` when ``REQUEST_ENV`` names a request):
torch and transformers are loaded there already.

The request (JSON): ``model`` (a folder transformers loads; a compressed-tensors checkpoint is
decompressed on load), ``text`` (a .jsonl of ``{"question", "answer"}`` or ``{"text"}`` objects,
or a .txt file), ``seqlen``, ``max_tokens``, ``top_k``, ``base`` (the base's .npz) and, for
``compare``, ``out`` (the per-position .npz) and ``summary`` (the figures, JSON); optionally
``loader`` (``image_text_to_text``: a vision-language model, its language model reading the
text) and ``trust_remote_code``; and for a vision-language model ``images`` (a ChartQA-format
parquet), ``max_images``, ``images_base``, ``images_out`` and ``images_summary``: the same
comparison on charts with their questions, one chunk per chart (its questions and answers in one
conversation after the image), over the text after the image. ``run`` also
takes ``base_model`` and ``make_base`` (store the base first, in the same process, unless it is
stored already; under ``lock`` where given: parallel jobs make it once), runs ``compare`` when
``model`` is set, and writes ``done`` (JSON: its seconds, whether it stored the base, the base and
model it used) where given. A visible GPU computes both sides.

Both models see the same token ids: the text is tokenized once with the base's tokenizer, each
document begins with BOS, the stream is cut into ``seqlen``-token chunks (the last partial
chunk dropped) up to ``max_tokens``, and their SHA-256 is stored with the base and checked
before a comparison (a checkpoint of another tokenizer cannot be compared position by position).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from autoround_exp import fidelity
from autoround_exp.fsutil import locked

# the request that the evaluation child runs after lm-eval (set by the harness for the hf backend)
REQUEST_ENV = "AUTOROUND_EXP_FIDELITY_REQUEST"


class FidelityError(RuntimeError):
    pass


def chunks_of(tokenizer, path: Path, seqlen: int, max_tokens: int) -> np.ndarray:
    """[C, seqlen + 1] token ids: each row a chunk and the token after it (the last target)."""
    stream: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for doc in fidelity.documents(path):
        stream += bos + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(stream) >= max_tokens + 1:
            break
    n = min(len(stream) - 1, max_tokens) // seqlen
    if n == 0:
        raise FidelityError(f"{path}: {len(stream)} tokens, fewer than one chunk of fidelity.seqlen={seqlen} + 1")
    return np.array([stream[i * seqlen : (i + 1) * seqlen + 1] for i in range(n)], dtype=np.int64)


def token_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()


def log_probs(model, ids: np.ndarray):
    """Yield each chunk's [seqlen, V] log-probabilities (float64) and its targets."""
    import torch

    with torch.inference_mode():
        for row in ids:
            x = torch.from_numpy(row[:-1]).unsqueeze(0).to(model.device)
            logits = model(input_ids=x).logits[0].double()
            # rounded to float32 as the base is stored: a model compared with itself gives exactly 0
            yield torch.log_softmax(logits, dim=-1).float().double().cpu().numpy(), row[1:]


def load(path: str, revision: str | None = None, dtype: str | None = None, req: dict | None = None):
    """The model in ``dtype`` (the harness's ``model.dtype``, as lm-eval's hf backend scores it;
    None: the checkpoint's own), on the GPU where one is visible. One dtype for both sides: a
    checkpoint is loaded in its base's. Not float32 on a CPU, although bfloat16 matmuls took 5x
    as long on an AVX2-only one: NVFP4 checkpoints run their compressed layers in bfloat16 only,
    and a float32 base against a bfloat16 checkpoint would measure the dtype as well."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    req = req or {}
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
    # a vision-language model (model.loader) reads the text alone: its language model, no image
    auto = AutoModelForImageTextToText if req.get("loader") == "image_text_to_text" else AutoModelForCausalLM
    remote = bool(req.get("trust_remote_code"))
    model = auto.from_pretrained(path, revision=revision, dtype=dtype, trust_remote_code=remote)
    if cuda:
        model.to("cuda")
    model.eval()
    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=remote), model


def vocab_of(model) -> int:
    return model.config.get_text_config().vocab_size  # a vision-language model's is its text model's


# ---- chart questions with their images (a vision-language model) ---------------------------


def load_processor(path: str, revision: str | None = None, req: dict | None = None):
    from autoround_exp import vision_compat

    remote = bool((req or {}).get("trust_remote_code"))
    return vision_compat.load_processor(path, revision=revision, trust_remote_code=remote)


# charts per forward pass: 3x the speed of one at a time on 2 CPU cores (measured on the tiny
# Qwen3-VL), and the same log-probabilities (right padding, masked)
CHART_BATCH = 8


def chart_inputs(processor, model, path: Path, limit: int) -> tuple[list, np.ndarray]:
    """The charts as the model's inputs, ``CHART_BATCH`` at a time: each chart one conversation
    through the chat template, the image with the first question in the user's first turn, each
    answer the assistant's (the image read once for all its questions); with each chart's row,
    where the text after its image starts, and its length. And the SHA-256 of pairing: every
    token id and pixel value, which both sides must share."""
    import io

    from PIL import Image

    cfg = model.config
    image_id, end_id = cfg.image_token_id, getattr(cfg, "vision_end_token_id", None)
    texts, images = [], []
    for png, questions in fidelity.charts(path, limit):
        turns = []
        for n, (query, answer) in enumerate(questions):
            ask = [{"type": "image"}] if n == 0 else []
            turns.append({"role": "user", "content": [*ask, {"type": "text", "text": query}]})
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        texts.append(processor.apply_chat_template(turns, tokenize=False))
        images.append(Image.open(io.BytesIO(png)).convert("RGB"))
    if not texts:
        raise FidelityError(f"{path}: no charts")
    batches, digest = [], hashlib.sha256()
    for b in range(0, len(texts), CHART_BATCH):
        x = processor(
            text=texts[b : b + CHART_BATCH],
            images=images[b : b + CHART_BATCH],
            return_tensors="pt",
            padding=True,
            padding_side="right",
        )
        rows = []
        for ids, mask in zip(x["input_ids"], x["attention_mask"], strict=True):
            where = (ids == image_id).nonzero()
            if len(where) == 0:
                raise FidelityError(f"{path}: the processor put no image token ({image_id}) in a chart's inputs")
            start, end = int(where[-1]) + 1, int(mask.sum())
            start += int(end_id is not None and start < end and int(ids[start]) == end_id)
            if start >= end:
                raise FidelityError(f"{path}: a chart has no text after its image")
            rows.append((start, end))
        batches.append((x, rows))
        digest.update(x["input_ids"].numpy().astype("<i8").tobytes())
        digest.update(x["pixel_values"].float().numpy().tobytes())
    return batches, np.frombuffer(digest.digest(), dtype=np.uint8)


def chart_log_probs(model, batches: list):
    """Yield each chart's [T, V] log-probabilities over the text after its image, and its targets."""
    import torch

    with torch.inference_mode():
        for x, rows in batches:
            x = {k: v.to(model.device) for k, v in x.items()}
            logits = model(**x).logits
            for r, (start, end) in enumerate(rows):
                lp = torch.log_softmax(logits[r, start - 1 : end - 1].double(), dim=-1)
                yield lp.float().double().cpu().numpy(), x["input_ids"][r, start:end].cpu().numpy()


def images_request(req: dict) -> dict:
    """The request's chart part in its text part's names: the same store and outcome code."""
    return req | {
        "base": req["images_base"],
        "out": req.get("images_out"),
        "summary": req.get("images_summary"),
    }


def base_images(req: dict, model) -> None:
    t0 = time.perf_counter()
    processor = load_processor(req["model"], req.get("revision"), req)
    inputs, key = chart_inputs(processor, model, Path(req["images"]), req["max_images"])
    stored = [fidelity.base_chunk(lp, targets, req["top_k"]) for lp, targets in chart_log_probs(model, inputs)]
    save_base(Path(req["images_base"]), key, stored, vocab_of(model), str(model.dtype).removeprefix("torch."))
    n = sum(len(c.target_logprobs) for c in stored)
    seconds = time.perf_counter() - t0
    print(f"[fidelity] base, charts: {len(stored)} with their questions, {n} positions, {seconds:.1f} s")


def compare_images(req: dict, model) -> None:
    t0 = time.perf_counter()
    sub = images_request(req)
    key, stored, vocab, _ = load_base(Path(sub["base"]))
    processor = load_processor(req["model"], req=req)
    inputs, again = chart_inputs(processor, model, Path(req["images"]), req["max_images"])
    if sum(len(rows) for _, rows in inputs) != len(stored) or not np.array_equal(again, key):
        raise FidelityError(f"{req['model']} reads the chart questions differently from its base (tokens or pixels)")
    check_pairs(sub, key, again, vocab, vocab_of(model))
    found = chart_log_probs(model, inputs)
    positions = [fidelity.compare(b, lp, targets) for b, (lp, targets) in zip(stored, found, strict=True)]
    dtype = f"{str(model.dtype).removeprefix('torch.')} ({model.device.type})"
    write_outcome(sub, positions, key, stored[0].k, vocab, t0, dtype, label="charts")


# ---- the stage's modes -----------------------------------------------------------------------


def base(req: dict) -> None:
    t0 = time.perf_counter()
    tok, model = load(req["model"], req.get("revision"), req.get("dtype"), req)
    ids = chunks_of(tok, Path(req["text"]), req["seqlen"], req["max_tokens"])
    stored = [fidelity.base_chunk(lp, targets, req["top_k"]) for lp, targets in log_probs(model, ids)]
    save_base(Path(req["base"]), ids, stored, vocab_of(model), str(model.dtype).removeprefix("torch."))
    n = ids.shape[0] * (ids.shape[1] - 1)
    print(f"[fidelity] base: {ids.shape[0]} chunks, {n} positions, top {stored[0].k}, {time.perf_counter() - t0:.1f} s")
    if req.get("images"):
        base_images(req, model)


def save_base(path: Path, ids: np.ndarray, stored: list[fidelity.BaseChunk], vocab: int, dtype: str) -> None:
    """The base's store: its token ids (what pairs positions), top k per position (float32) and
    next-token log-probabilities, chunk after chunk with each chunk's length (``sizes``)."""
    fidelity.save_npz(
        path,
        ids=ids,
        indices=np.concatenate([c.indices for c in stored]).astype(np.int32),
        logprobs=np.concatenate([c.logprobs for c in stored]).astype(np.float32),
        target_logprobs=np.concatenate([c.target_logprobs for c in stored]),
        sizes=np.array([len(c.target_logprobs) for c in stored], dtype=np.int64),
        vocab=np.array(vocab),
        dtype=np.array(dtype),
    )


def load_base(path: Path) -> tuple[np.ndarray, list[fidelity.BaseChunk], int, str]:
    with np.load(path) as z:
        ids, vocab, dtype = z["ids"], int(z["vocab"]), str(z["dtype"])
        sizes = z["sizes"] if "sizes" in z else None  # earlier stores: chunks of one length, stacked
        parts = [fidelity.unragged(z[name], sizes) for name in ("indices", "logprobs", "target_logprobs")]
        chunks = [fidelity.BaseChunk(i, lp.astype(np.float64), t) for i, lp, t in zip(*parts, strict=True)]
    return ids, chunks, vocab, dtype


def compare(req: dict) -> None:
    t0 = time.perf_counter()
    ids, stored, vocab, dtype = load_base(Path(req["base"]))
    tok, model = load(req["model"], dtype=dtype, req=req)
    again = chunks_of(tok, Path(req["text"]), req["seqlen"], req["max_tokens"])
    check_pairs(req, ids, again, vocab, vocab_of(model))
    positions = [
        fidelity.compare(b, lp, targets) for b, (lp, targets) in zip(stored, log_probs(model, ids), strict=True)
    ]
    write_outcome(
        req, positions, ids, stored[0].k, vocab, t0, f"{str(model.dtype).removeprefix('torch.')} ({model.device.type})"
    )
    if req.get("images"):
        compare_images(req, model)


def check_pairs(req: dict, ids: np.ndarray, again: np.ndarray, vocab: int, model_vocab: int) -> None:
    """The checkpoint's tokens and vocabulary are its base's: positions pair one to one."""
    if again.shape != ids.shape or token_sha256(again) != token_sha256(ids):
        raise FidelityError(f"{req['model']} tokenizes the text differently from its base: positions do not pair")
    if model_vocab != vocab:
        raise FidelityError(f"{req['model']} has a vocabulary of {model_vocab}, its base {vocab}")


def write_outcome(
    req: dict,
    positions: list,
    ids: np.ndarray,
    k: int,
    vocab: int,
    t0: float,
    dtype: str,
    engine: str | None = None,
    label: str | None = None,
) -> None:
    """The per-position figures (``out``) and the summary (``summary``), said on the log."""
    fidelity.save_positions(Path(req["out"]), positions)
    summary = {name: vars(v) for name, v in fidelity.summarize(positions).items()}
    summary |= {
        "chunks": len(positions),
        "positions": int(sum(len(p.kld) for p in positions)),
        "top_k": k,
        "vocab": vocab,
        "exact": k >= vocab,
        "token_sha256": token_sha256(ids),
        "seconds": round(time.perf_counter() - t0, 3),
        "dtype": dtype,
    } | ({"engine": engine} if engine else {})
    Path(req["summary"]).write_text(json.dumps(summary, indent=1))
    kld, same = summary["kld_mean"]["value"], summary["same_top"]["value"]
    what = " ".join(x for x in (engine, dtype) if x) + (f", {label}" if label else "")
    print(f"[fidelity] {what}: mean KLD {kld:.5f}, same top {same:.3f}")


def run(req: dict, make_base=None, compare_with=None) -> None:
    """The base stored unless it is, then the checkpoint compared; ``done`` written. By default
    through transformers (``base``, ``compare``); ``fidelity_vllm`` passes its own."""
    make_base, compare_with = make_base or base, compare_with or compare
    t0, made = time.perf_counter(), False
    if req.get("make_base"):
        with locked(Path(req["lock"])) if req.get("lock") else contextlib.nullcontext():
            stores = [req["base"]] + ([req["images_base"]] if req.get("images") else [])
            if not all(Path(p).is_file() for p in stores):
                make_base({**req, "model": req["base_model"], "revision": req.get("base_revision")})
                made = True
    if req.get("model"):
        compare_with(req)
    if req.get("done"):
        done = {"seconds": round(time.perf_counter() - t0, 3), "made_base": made}
        Path(req["done"]).write_text(json.dumps(done | {k: req.get(k) for k in ("base", "model")}))


def after_evaluation(request: str) -> None:
    """``run`` in the evaluation child, once lm-eval has written its results: the accuracy run
    stands whatever happens here. A failure is printed and leaves no ``done``, so the harness's
    stage runs the request again in a child of its own, which reports it."""
    import gc

    gc.collect()  # lm-eval's model, no longer referenced, goes before the next one loads
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        run(json.loads(Path(request).read_text()))
    except Exception as e:  # noqa: BLE001 - reported, and measured again apart
        print(f"[fidelity] in the evaluation child: {type(e).__name__}: {e}; the stage runs apart", file=sys.stderr)


def main(argv: list[str]) -> int:
    mode, request = argv
    req = json.loads(Path(request).read_text())
    try:
        {"base": base, "compare": compare, "run": run}[mode](req)
    except FidelityError as e:
        print(f"[fidelity] {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # transformers imports scikit-learn for assisted generation, which this child never runs:
    # 2 of its 9 s of start-up on 2 CPU cores (measured); None in sys.modules makes it absent
    sys.modules["sklearn"] = None
    sys.exit(main(sys.argv[1:]))
