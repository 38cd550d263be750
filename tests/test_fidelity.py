"""The fidelity figures (KL divergence, top-token agreement, Δp, perplexity) on distributions
whose answers are known, the top-k approximation against the exact value, and the paired test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from scipy.stats import entropy

from autoround_exp import fidelity
from autoround_exp.config import ConfigError
from autoround_exp.config_checks import validate
from tests.support import compose_cfg

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


# ---- the text, refused at the door ----------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", "", "it holds no text"),
        ("blank.jsonl", "\n\n", "it holds no text"),
        ("short.txt", "Tom has 3 apples.\n\nHe eats one.\n", "29 characters in 2 documents: fewer than the 129 tokens"),
        ("bad.jsonl", '{"text": "fine"}\nnot json\n', "line 2 is not a JSON object with text, or question and answer"),
        ("text.csv", "a,b\n" * 100, "not a .txt or .jsonl file"),
    ],
)
def test_a_text_that_cannot_give_one_chunk_is_refused_at_the_door_naming_path_and_reason(
    tmp_path, name, content, reason
):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([f"fidelity.data_path={path}"]))
    assert f"fidelity.data_path={path}: {reason}" in str(err.value) and "fidelity=none" in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_a_text_long_enough_passes_and_fidelity_none_asks_for_none(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(("A paragraph of text. " * 10 + "\n\n") * 2)
    exp = validate(compose_cfg([f"fidelity.data_path={path}"]))
    assert exp.fidelity.enabled and exp.fidelity.data_path == str(path)
    assert not validate(compose_cfg(["fidelity=none", "fidelity.data_path=/nowhere"])).fidelity.enabled
    assert validate(compose_cfg([])).model.fidelity_text.endswith("arith_gsm8k/dev.jsonl")  # the tiny Llama's own


def test_documents_of_a_txt_are_its_paragraphs_and_of_a_jsonl_its_objects(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("one\nline two\n\n\nthree\n")
    assert list(fidelity.documents(txt)) == ["one\nline two", "three"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"question": "1+1?", "answer": "2"}\n')
    assert list(fidelity.documents(jsonl)) == ["a", "Question: 1+1?\nAnswer: 2"]


def test_the_per_position_file_is_recorded_absolute_with_a_relative_results_folder(tmp_path, monkeypatch):
    from autoround_exp import fidelity_stage

    monkeypatch.chdir(tmp_path)
    exp = validate(compose_cfg(["paths.results=results"]))
    path = fidelity_stage.positions_path(exp, "abc")
    assert path.is_absolute() and path == tmp_path / "results" / "fidelity" / "abc.npz"


def test_the_evaluation_child_computes_fidelity_with_transformers_or_with_vllm_for_a_text_model(tmp_path):
    from autoround_exp import fidelity_stage

    def exp(*args):
        return validate(compose_cfg([f"paths.work={tmp_path / 'work'}", f"paths.results={tmp_path}/r", *args]))

    # a vision-language model too: its language model, on the text alone
    assert fidelity_stage.in_evaluation(exp("serve=hf")) and fidelity_stage.in_evaluation(
        exp("model=tiny_qwen3_vl", "serve=hf")
    )
    nots = (["serve=hf", "fidelity=none"], ["serve=hf", "model.fidelity_text=null"])
    for args in (*nots, ["model=tiny_qwen3_vl", "serve=vllm"]):
        assert (
            not fidelity_stage.in_evaluation(exp(*args))
            and fidelity_stage.request_for_evaluation(exp(*args), "/ckpt", "k") is None
        ), args
    # its request: the base made unless stored, under a lock; an earlier attempt's outcome removed
    done = tmp_path / "work" / "fidelity" / "k" / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    req = json.loads(fidelity_stage.request_for_evaluation(exp("serve=hf"), "/ckpt", "k").read_text())
    assert req["model"] == "/ckpt" and req["make_base"] and req["lock"].endswith(".lock") and not done.exists()
    assert "engine" not in req
    # lm-eval's vllm backend: vLLM's prompt log-probabilities with the accuracy run's engine
    # settings, against a base that vLLM computed (stored apart from transformers')
    vllm = json.loads(fidelity_stage.request_for_evaluation(exp("serve=vllm"), "/ckpt", "k").read_text())
    engine = {"max_model_len": 2048, "enforce_eager": True, "dtype": "bfloat16", "gpu_memory_utilization": 0.9}
    assert vllm["engine"] == engine | {"tensor_parallel_size": 1}
    assert vllm["base"] != req["base"] and vllm["lock"] != req["lock"]
    # `vllm serve`'s: the server that scored it (still up), a base store of its own
    server = json.loads(fidelity_stage.request_for_evaluation(exp("serve=vllm_server"), "/ckpt", "k").read_text())
    assert server["engine"] == {"server": True, "dtype": "bfloat16"}
    assert server["base"] not in (req["base"], vllm["base"])


def test_a_failure_in_the_evaluation_child_leaves_no_outcome_and_the_accuracy_run_stands(tmp_path, capsys):
    from autoround_exp import fidelity_child

    request = tmp_path / "request.json"
    done = tmp_path / "done.json"
    request.write_text(json.dumps({"make_base": True, "base": str(tmp_path / "b.npz"), "done": str(done)}))
    fidelity_child.after_evaluation(str(request))  # no base_model: fails, and does not raise
    assert "[fidelity] in the evaluation child: KeyError" in capsys.readouterr().err and not done.exists()


def test_the_entry_runs_the_request_the_harness_names_after_lm_eval(monkeypatch, tmp_path):
    from autoround_exp import fidelity_child, fidelity_vllm, lm_eval_cli

    seen = []
    monkeypatch.setattr(fidelity_child, "after_evaluation", lambda path: seen.append(("hf", path)))
    monkeypatch.setattr(fidelity_vllm, "after_evaluation", lambda req, args: seen.append(("vllm", req["engine"], args)))
    # lm-eval's arguments: local-completions names the server that is still up
    url = "http://127.0.0.1:8123/v1/completions"
    monkeypatch.setattr("sys.argv", ["lm_eval_cli", "--model_args", f"model=Tiny-W8A8,base_url={url},tokenizer=/c"])
    monkeypatch.delenv(fidelity_child.REQUEST_ENV, raising=False)
    lm_eval_cli.fidelity_after_evaluation()
    hf, vllm = tmp_path / "hf.json", tmp_path / "vllm.json"
    hf.write_text(json.dumps({"model": "m"}))
    vllm.write_text(json.dumps({"model": "m", "engine": {"max_model_len": 2048}}))
    for request in (hf, vllm):
        monkeypatch.setenv(fidelity_child.REQUEST_ENV, str(request))
        lm_eval_cli.fidelity_after_evaluation()
    args = f"model=Tiny-W8A8,base_url={url},tokenizer=/c"
    assert seen == [("hf", str(hf)), ("vllm", {"max_model_len": 2048}, args)]
    assert fidelity_vllm.server_of(args) == (url, "Tiny-W8A8")
    chat = args.replace("/v1/completions", "/v1/chat/completions")
    assert fidelity_vllm.server_of(chat) == (url, "Tiny-W8A8")  # prompt log-probabilities: the completions API


def quant_top(q: np.ndarray, targets: np.ndarray, k: int) -> fidelity.BaseChunk:
    """A checkpoint as vLLM's prompt log-probabilities give it: its own top k per position and
    its log-probability of the text's next token."""
    return fidelity.base_chunk(q, targets, k)


def test_a_checkpoint_known_by_its_top_k_equals_the_full_comparison_where_its_k_covers_the_base():
    rng = np.random.default_rng(5)
    for b, q, t in chunks(rng, 3, 0.3):
        base = fidelity.base_chunk(b, t, 8)
        full = fidelity.compare(base, q, t)
        wide = quant_top(q, t, 40)
        assert all(np.isin(base.indices[i], wide.indices[i]).all() for i in range(len(q)))  # holds the base's top 8
        for top in (quant_top(q, t, V), wide):  # the whole vocabulary, and a top k that holds the base's
            got = fidelity.compare_top(base, top, V)
            for f in fidelity.Positions.__dataclass_fields__:
                np.testing.assert_allclose(getattr(got, f), getattr(full, f), rtol=1e-12, atol=1e-15)


def test_a_base_token_outside_the_checkpoints_top_k_gets_its_leftover_mass_spread_evenly():
    lp_b = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    base = fidelity.base_chunk(lp_b, np.array([0]), 2)  # tokens 0 and 1
    q = np.log(np.array([[0.6, 0.02, 0.2, 0.1, 0.08]]))
    top = quant_top(q, np.array([0]), 3)  # tokens 0, 2, 3: token 1 is not returned
    got = fidelity.compare_top(base, top, 5)
    leftover = 1 - (0.6 + 0.2 + 0.1)
    lq1 = np.log(leftover / 2)  # spread over the 2 tokens it did not return
    tail_b, tail_q = 0.2, 1 - 0.6 - leftover / 2
    want = 0.5 * np.log(0.5 / 0.6) + 0.3 * np.log(0.3) - 0.3 * lq1 + tail_b * np.log(tail_b / tail_q)
    assert got.kld[0] == pytest.approx(want, rel=1e-12)
    assert got.same_top[0] and got.dp_top[0] == pytest.approx(0.1) and got.nll_quant[0] == pytest.approx(-np.log(0.6))


# ---- a vision-language model's charts with their images --------------------------------------


def write_charts(path, rows: list[tuple[bytes, str, str]]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = [{"bytes": b, "path": None} for b, _, _ in rows]
    table = pa.table({"image": image, "query": [q for _, q, _ in rows], "label": [[a] for _, _, a in rows]})
    pq.write_table(table, path)
    return path


def test_consecutive_questions_on_one_image_are_one_chart_and_max_images_counts_charts(tmp_path):
    rows = [(b"A", "q1", "1"), (b"A", "q2", "2"), (b"B", "q3", "3"), (b"A", "q4", "4")]
    path = write_charts(tmp_path / "c.parquet", rows)
    assert fidelity.charts(path) == [(b"A", [("q1", "1"), ("q2", "2")]), (b"B", [("q3", "3")]), (b"A", [("q4", "4")])]
    assert fidelity.charts(path, limit=2) == fidelity.charts(path)[:2]
    # the embedded held-out charts: 50 charts of 3 questions each (seed 3000, never trained on nor scored)
    embedded = fidelity.charts(Path(validate(compose_cfg(["model=tiny_qwen3_vl"])).model.fidelity_images))
    assert len(embedded) == 50 and {len(q) for _, q in embedded} == {3}


@pytest.mark.parametrize(
    "name,make,reason",
    [
        ("missing.parquet", None, "no such file"),
        ("charts.jsonl", lambda p: p.write_text("{}\n"), "not a .parquet file"),
        ("broken.parquet", lambda p: p.write_bytes(b"not parquet"), "not readable as parquet"),
        ("empty.parquet", lambda p: write_charts(p, []), "it holds no questions"),
    ],
)
def test_charts_that_cannot_be_read_are_refused_at_the_door_naming_path_and_reason(tmp_path, name, make, reason):
    path = tmp_path / name
    if make is not None:
        make(path)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["model=tiny_qwen3_vl", f"fidelity.images_path={path}"]))
    assert f"fidelity.images_path={path}: {reason}" in str(err.value) and "fidelity=none" in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_a_parquet_without_chartqas_columns_and_images_for_a_text_model_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": None}], "question": ["q"]}), path)
    with pytest.raises(ConfigError, match="no query, label column"):
        validate(compose_cfg(["model=tiny_qwen3_vl", f"fidelity.images_path={path}"]))
    ok = write_charts(tmp_path / "c.parquet", [(b"A", "q", "1")])
    with pytest.raises(ConfigError, match="model=tiny_llama is a text model and reads no image"):
        validate(compose_cfg([f"fidelity.images_path={ok}"]))
    assert validate(compose_cfg(["model=tiny_qwen3_vl", f"fidelity.images_path={ok}"])).fidelity.images_path == str(ok)


def test_a_vision_language_models_request_asks_for_its_charts_and_a_text_models_does_not(tmp_path):
    from autoround_exp import fidelity_stage

    def req(*args):
        exp = validate(
            compose_cfg([f"paths.work={tmp_path / 'work'}", f"paths.results={tmp_path}/r", "serve=hf", *args])
        )
        return exp, json.loads(fidelity_stage.request_for_evaluation(exp, "/ckpt", "k").read_text())

    exp, vlm = req("model=tiny_qwen3_vl")
    assert vlm["images"].endswith("data/charts/dev.parquet") and vlm["max_images"] == 64
    assert vlm["images_base"].endswith("-images.npz") and vlm["images_out"].endswith("k-images.npz")
    s = fidelity_stage.settings_of(exp)
    assert s.images == exp.model.fidelity_images and len(s.images_sha256) == len(s.text_sha256)
    # text only where the model's charts are switched off: another store (the settings differ)
    _, text_only = req("model=tiny_qwen3_vl", "model.fidelity_images=null")
    assert "images" not in text_only and text_only["base"] != vlm["base"]
    # a text model's settings and base store are those it had before charts came
    exp, llama = req()
    assert "images" not in llama and set(fidelity_stage.settings_of(exp).model_dump(exclude_none=True)) == {
        "text",
        "text_sha256",
        "seqlen",
        "max_tokens",
        "top_k",
    }


def test_chunks_of_any_length_round_trip_and_earlier_equal_chunk_files_still_load(tmp_path):
    rng = np.random.default_rng(3)
    data = [
        (log_softmax(b, axis=1), log_softmax(b + 0.1 * rng.normal(size=b.shape), axis=1), t)
        for b, t in ((logits(rng, t=n), rng.integers(0, V, n)) for n in (7, 12, 3))
    ]
    pos = positions(data)
    fidelity.save_positions(tmp_path / "p.npz", pos)
    again = fidelity.load_positions(tmp_path / "p.npz")
    assert [len(p.kld) for p in again] == [7, 12, 3]
    assert all(
        np.array_equal(a.kld, b.kld) and np.array_equal(a.nll_quant, b.nll_quant)
        for a, b in zip(pos, again, strict=True)
    )
    assert fidelity.paired(pos, again).delta == 0
    # a file written before: each figure stacked over chunks of one length, no sizes
    equal = positions(chunks(rng, 3, 0.1))
    fields = fidelity.Positions.__dataclass_fields__
    np.savez(tmp_path / "old.npz", **{f: np.stack([getattr(c, f) for c in equal]) for f in fields})
    old = fidelity.load_positions(tmp_path / "old.npz")
    assert len(old) == 3 and all(np.array_equal(a.kld, b.kld) for a, b in zip(equal, old, strict=True))


def test_the_base_orders_tied_tokens_as_argmax_does():
    """bfloat16 logits tie often: the base's top token must be the one the checkpoint's argmax
    would pick from the same numbers, or a model compared with itself disagrees with itself."""
    lp = log_softmax(np.array([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0] * 2]), axis=1)
    for k in (3, 12):
        b = fidelity.base_chunk(lp, np.array([0]), k)
        assert b.indices[0, 0] == lp[0].argmax() == 1 and len(set(b.indices[0])) == k
        assert np.allclose(b.logprobs[0, :3], lp[0].max())  # three of the six tied, the lowest first
        assert fidelity.compare(b, lp, np.array([0])).same_top.all()
