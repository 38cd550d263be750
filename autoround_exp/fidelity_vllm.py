"""The fidelity stage where lm-eval's vLLM backend scored the run: the same request as
``fidelity_child``'s, the next-token log-probabilities read from vLLM's prompt log-probabilities
(``SamplingParams(prompt_logprobs=k)``), in the evaluation child after lm-eval, in the serving
environment. What vLLM serves is measured: its kernels for the checkpoint's scheme, not
transformers' decompressed weights.

vLLM returns each position's top k (``max_logprobs``, here ``fidelity.top_k`` or the vocabulary,
whichever is smaller) and the text's next token. The base is stored as its top k, as
``fidelity_child`` stores it; a checkpoint is compared by its own top k
(``fidelity.compare_top``): exact where k covers the vocabulary (the tiny Llama's 384 tokens
under the default 512), otherwise the checkpoint's mass outside its top k is spread evenly.
The base's store is vLLM's own (``fidelity_stage.base_path``): both sides from one engine.

The request adds ``engine`` (``vllm.LLM``'s arguments: the accuracy run's engine settings).
Where ``vllm serve`` scored the run (``serve=vllm_server``), ``engine`` is ``{"server": true,
...}`` and the same figures come from the server that is still up, through its completions API
(``prompt_logprobs``, vLLM's extension; the server started with ``--max-logprobs``): the
evaluation child reads the server's address from lm-eval's ``--model_args``. A server serves one
model, so the base's store comes from the base job's server; a checkpoint whose base is not
stored yet is measured apart (transformers).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from pathlib import Path

import numpy as np

from autoround_exp import fidelity, fidelity_child
from autoround_exp.fidelity_child import FidelityError, check_pairs, chunks_of, load_base, save_base, write_outcome


def engine(path: str, req: dict, k: int):
    """``vllm.LLM`` for ``path`` with the run's engine settings, returning up to ``k`` log-probabilities."""
    from vllm import LLM

    gc.collect()  # the engine before it (lm-eval's, the base's) gone first: its KV cache is most of the memory
    remote = bool(req.get("trust_remote_code"))
    return LLM(model=path, revision=req.get("revision"), max_logprobs=k, trust_remote_code=remote, **req["engine"])


def top_of(llm, ids: np.ndarray, k: int) -> list[fidelity.BaseChunk]:
    """Each chunk's top ``k`` per position, most probable first, and the next token's
    log-probability: position t of a chunk is the distribution that predicts token t + 1."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in ids]
    chunks = []
    for row, out in zip(ids, llm.generate(prompts, params, use_tqdm=False), strict=True):
        flat = out.prompt_logprobs  # the first token has none; then k + 1 per position: the text's token, the top k
        starts = np.asarray(flat.start_indices[1:])
        if not (np.asarray(flat.end_indices[1:]) - starts == k + 1).all() or len(starts) != len(row) - 1:
            raise FidelityError(
                f"vLLM returned {len(flat.token_ids)} prompt log-probabilities, not {k + 1} per position"
            )
        at = starts[:, None] + np.arange(k + 1)
        token_ids, logprobs = np.asarray(flat.token_ids), np.asarray(flat.logprobs, dtype=np.float64)
        if not (token_ids[at[:, 0]] == row[1:]).all():
            raise FidelityError("vLLM's prompt log-probabilities are not of the prompt's tokens")
        chunks.append(fidelity.BaseChunk(token_ids[at[:, 1:]], logprobs[at[:, 1:]], logprobs[at[:, 0]]))
    return chunks


def vocab_of(llm) -> int:
    return llm.llm_engine.model_config.get_vocab_size()


def base(req: dict) -> None:
    t0 = time.perf_counter()
    llm = engine(req["model"], req, req["top_k"])
    vocab = vocab_of(llm)
    k = min(req["top_k"], vocab)
    ids = chunks_of(llm.get_tokenizer(), Path(req["text"]), req["seqlen"], req["max_tokens"])
    save_base(
        Path(req["base"]),
        ids,
        top_of(llm, ids, k),
        vocab,
        str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
    )
    _release(llm)
    n = ids.shape[0] * (ids.shape[1] - 1)
    print(f"[fidelity] base (vLLM): {ids.shape[0]} chunks, {n} positions, top {k}, {time.perf_counter() - t0:.1f} s")


def compare(req: dict) -> None:
    t0 = time.perf_counter()
    ids, stored, vocab, dtype = load_base(Path(req["base"]))
    llm = engine(req["model"], req, stored[0].k)
    again = chunks_of(llm.get_tokenizer(), Path(req["text"]), req["seqlen"], req["max_tokens"])
    check_pairs(req, ids, again, vocab, vocab_of(llm))
    tops = top_of(llm, ids, stored[0].k)
    device = llm.llm_engine.vllm_config.device_config.device_type
    _release(llm)
    positions = [fidelity.compare_top(b, t, vocab) for b, t in zip(stored, tops, strict=True)]
    write_outcome(req, positions, ids, stored[0].k, vocab, t0, f"{dtype} ({device})", engine="vllm")


def _release(llm) -> None:
    """The engine shut down once its log-probabilities are read (the next ``engine`` collects it)."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- through `vllm serve`'s completions API (serve=vllm_server) -------------------------------

SERVER_BATCH = 8  # chunks per request: vLLM batches them; each answer holds k + 1 entries a position


def post(url: str, body: dict, timeout: float = 600) -> dict:
    import json
    import urllib.request

    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - the harness's loopback server
        return json.loads(answer.read())


def server_of(model_args: str) -> tuple[str, str]:
    """(the completions URL, the served model's name) from lm-eval's ``--model_args``."""
    args = dict(a.split("=", 1) for a in model_args.split(",") if "=" in a)
    url = args["base_url"]
    return url.removesuffix("/chat/completions").removesuffix("/completions") + "/completions", args["model"]


def server_top(url: str, name: str, ids: np.ndarray, k: int) -> list[fidelity.BaseChunk]:
    """``top_of`` through the server: each position's top ``k`` by rank and the text's next token."""
    chunks = []
    for b in range(0, len(ids), SERVER_BATCH):
        rows = ids[b : b + SERVER_BATCH]
        body = {"model": name, "prompt": [r.tolist() for r in rows], "max_tokens": 1, "temperature": 0.0}
        answer = post(url, body | {"prompt_logprobs": k})
        for row, choice in zip(rows, sorted(answer["choices"], key=lambda c: c["index"]), strict=True):
            positions = choice.get("prompt_logprobs") or []
            if len(positions) != len(row):
                raise FidelityError(f"{url} returned {len(positions)} prompt log-probabilities for {len(row)} tokens")
            indices, logprobs, target = np.empty((len(row) - 1, k), np.int64), np.empty((len(row) - 1, k)), []
            for t, entries in enumerate(positions[1:]):  # position t's distribution predicts token t + 1
                found = {int(tok): e for tok, e in entries.items()}
                if int(row[t + 1]) not in found:
                    raise FidelityError(f"{url}'s prompt log-probabilities are not of the prompt's tokens")
                target.append(found[int(row[t + 1])]["logprob"])
                ranked = sorted((e["rank"], -e["logprob"], tok) for tok, e in found.items() if e["rank"] <= k)
                if len(ranked) < k:
                    raise FidelityError(f"{url} returned {len(ranked)} log-probabilities a position, not {k}")
                indices[t] = [tok for _, _, tok in ranked[:k]]
                logprobs[t] = [-lp for _, lp, _ in ranked[:k]]
            chunks.append(fidelity.BaseChunk(indices, logprobs, np.asarray(target, dtype=np.float64)))
    return chunks


def server_vocab(path: str, req: dict) -> int:
    from transformers import AutoConfig

    remote = bool(req.get("trust_remote_code"))
    return (
        AutoConfig.from_pretrained(path, revision=req.get("revision"), trust_remote_code=remote)
        .get_text_config()
        .vocab_size
    )


def server_run(req: dict, model_args: str) -> None:
    """``run`` against the server that scored the run: the base's store made where the server
    serves the base (the base job), a checkpoint compared where its base is stored."""
    from transformers import AutoTokenizer

    url, name = server_of(model_args)
    e, remote = req["engine"], bool(req.get("trust_remote_code"))
    served = req["model"] or req["base_model"]
    import torch

    where = f"{e['dtype']} ({'cuda' if torch.cuda.is_available() else 'cpu'})"  # the server's machine

    def make_base(sub: dict) -> None:
        if req["model"] is not None:
            raise FidelityError("the base's distributions through `vllm serve` are made by the base job's server")
        t0 = time.perf_counter()
        vocab = server_vocab(served, sub)
        tok = AutoTokenizer.from_pretrained(served, revision=sub.get("revision"), trust_remote_code=remote)
        ids = chunks_of(tok, Path(sub["text"]), sub["seqlen"], sub["max_tokens"])
        k = min(sub["top_k"], vocab)
        save_base(Path(sub["base"]), ids, server_top(url, name, ids, k), vocab, e["dtype"])
        print(f"[fidelity] base (vllm serve): {ids.shape[0]} chunks, top {k}, {time.perf_counter() - t0:.1f} s")

    def compare_with(sub: dict) -> None:
        t0 = time.perf_counter()
        ids, stored, vocab, _ = load_base(Path(sub["base"]))
        tok = AutoTokenizer.from_pretrained(served, trust_remote_code=remote)
        again = chunks_of(tok, Path(sub["text"]), sub["seqlen"], sub["max_tokens"])
        check_pairs(sub, ids, again, vocab, server_vocab(served, sub))
        tops = server_top(url, name, ids, stored[0].k)
        positions = [fidelity.compare_top(b, t, vocab) for b, t in zip(stored, tops, strict=True)]
        write_outcome(sub, positions, ids, stored[0].k, vocab, t0, where, engine="vllm serve")

    fidelity_child.run(req, make_base=make_base, compare_with=compare_with)


def run(req: dict) -> None:
    fidelity_child.run(req, make_base=base, compare_with=compare)


def after_evaluation(req: dict, model_args: str | None = None) -> None:
    """``run`` after lm-eval in its vLLM evaluation child (``model_args``: lm-eval's, naming the
    server where ``vllm serve`` scored the run): a failure is printed and leaves no ``done``, and
    the harness's stage measures the run apart (transformers, its own base)."""
    try:
        if req["engine"].get("server"):
            server_run(req, model_args or "")
        else:
            run(req)
    except Exception as e:  # noqa: BLE001 - reported, and measured again apart
        print(
            f"[fidelity] vLLM in the evaluation child: {type(e).__name__}: {e}; the stage runs apart", file=sys.stderr
        )
