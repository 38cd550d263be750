"""The fidelity stage's child: one model's next-token distributions on a fixed text, teacher-forced
through transformers, chunk by chunk.

    python -m autoround_exp.fidelity_child base    <request.json>   # the base: stores its top k
    python -m autoround_exp.fidelity_child compare <request.json>   # a checkpoint against that store

The request (JSON): ``model`` (a folder transformers loads; a compressed-tensors checkpoint is
decompressed on load), ``text`` (a .jsonl of ``{"question", "answer"}`` or ``{"text"}`` objects,
or a .txt file), ``seqlen``, ``max_tokens``, ``top_k``, ``base`` (the base's .npz) and, for
``compare``, ``out`` (the per-position .npz) and ``summary`` (the figures, JSON).

Both models see the same token ids: the text is tokenized once with the base's tokenizer, each
document begins with BOS, the stream is cut into ``seqlen``-token chunks (the last partial
chunk dropped) up to ``max_tokens``, and their SHA-256 is stored with the base and checked
before a comparison (a checkpoint of another tokenizer cannot be compared position by position).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from autoround_exp import fidelity


class FidelityError(RuntimeError):
    pass


def documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out.append(d["text"] if "text" in d else f"Question: {d['question']}\nAnswer: {d['answer']}")
        return out
    return [p for p in path.read_text().split("\n\n") if p.strip()]


def chunks_of(tokenizer, path: Path, seqlen: int, max_tokens: int) -> np.ndarray:
    """[C, seqlen + 1] token ids: each row a chunk and the token after it (the last target)."""
    stream: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for doc in documents(path):
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
            x = torch.from_numpy(row[:-1]).unsqueeze(0)
            logits = model(input_ids=x).logits[0].double()
            # rounded to float32 as the base is stored: a model compared with itself gives exactly 0
            yield torch.log_softmax(logits, dim=-1).float().double().numpy(), row[1:]


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto")
    model.eval()
    return AutoTokenizer.from_pretrained(path), model


def base(req: dict) -> None:
    t0 = time.perf_counter()
    tok, model = load(req["model"])
    ids = chunks_of(tok, Path(req["text"]), req["seqlen"], req["max_tokens"])
    stored = [fidelity.base_chunk(lp, targets, req["top_k"]) for lp, targets in log_probs(model, ids)]
    out = Path(req["base"])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.npz")
    np.savez(
        partial,
        ids=ids,
        indices=np.stack([c.indices for c in stored]).astype(np.int32),
        logprobs=np.stack([c.logprobs for c in stored]).astype(np.float32),
        target_logprobs=np.stack([c.target_logprobs for c in stored]),
        vocab=np.array(model.config.vocab_size),
    )
    partial.replace(out)
    n = ids.shape[0] * (ids.shape[1] - 1)
    print(f"[fidelity] base: {ids.shape[0]} chunks, {n} positions, top {stored[0].k}, {time.perf_counter() - t0:.1f} s")


def load_base(path: Path) -> tuple[np.ndarray, list[fidelity.BaseChunk], int]:
    with np.load(path) as z:
        ids, vocab = z["ids"], int(z["vocab"])
        chunks = [
            fidelity.BaseChunk(i, lp.astype(np.float64), t)
            for i, lp, t in zip(z["indices"], z["logprobs"], z["target_logprobs"], strict=True)
        ]
    return ids, chunks, vocab


def compare(req: dict) -> None:
    t0 = time.perf_counter()
    ids, stored, vocab = load_base(Path(req["base"]))
    tok, model = load(req["model"])
    again = chunks_of(tok, Path(req["text"]), req["seqlen"], req["max_tokens"])
    if again.shape != ids.shape or token_sha256(again) != token_sha256(ids):
        raise FidelityError(f"{req['model']} tokenizes the text differently from its base: positions do not pair")
    if model.config.vocab_size != vocab:
        raise FidelityError(f"{req['model']} has a vocabulary of {model.config.vocab_size}, its base {vocab}")
    positions = [
        fidelity.compare(b, lp, targets) for b, (lp, targets) in zip(stored, log_probs(model, ids), strict=True)
    ]
    np.savez(
        req["out"], **{f: np.stack([getattr(p, f) for p in positions]) for f in fidelity.Positions.__dataclass_fields__}
    )
    summary = {k: vars(v) for k, v in fidelity.summarize(positions).items()}
    summary |= {
        "chunks": len(positions),
        "positions": int(sum(len(p.kld) for p in positions)),
        "top_k": stored[0].k,
        "vocab": vocab,
        "exact": stored[0].k >= vocab,
        "token_sha256": token_sha256(ids),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    Path(req["summary"]).write_text(json.dumps(summary, indent=1))
    print(f"[fidelity] mean KLD {summary['kld_mean']['value']:.5f}, same top {summary['same_top']['value']:.3f}")


def main(argv: list[str]) -> int:
    mode, request = argv
    req = json.loads(Path(request).read_text())
    try:
        {"base": base, "compare": compare}[mode](req)
    except FidelityError as e:
        print(f"[fidelity] {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
