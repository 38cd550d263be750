"""Run identity: what determines a result changes its key, nothing else does; the
baselines a sweep makes sure of."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoround_exp import fsutil, pipeline, store
from autoround_exp.preflight import validate
from tests.support import compose_cfg


def keys(*overrides):
    return store.keys(validate(compose_cfg(list(overrides))))


def test_iters_changes_autoround_keys_but_not_rtn_or_base():
    assert keys("iters=0")[0] != keys("iters=200")[0]
    assert keys("method=rtn", "iters=0") == keys("method=rtn", "iters=200")
    assert keys("method=none", "iters=0") == keys("method=none", "iters=200")


def test_base_key_does_not_depend_on_scheme():
    assert keys("method=none", "scheme=nvfp4") == keys("method=none", "scheme=w4a16")
    assert keys("method=rtn", "scheme=nvfp4") != keys("method=rtn", "scheme=w4a16")


def test_eval_settings_change_only_the_eval_key():
    q1, e1 = keys("eval.limit=10")
    q2, e2 = keys("eval.limit=20")
    assert q1 == q2 and e1 != e2
    assert keys("eval.num_fewshot=3")[1] != keys("eval.num_fewshot=5")[1]
    assert keys("eval.add_bos_token=false")[1] != keys()[1]


def test_calibration_is_part_of_the_quantization_key():
    assert keys("calibration.nsamples=16")[0] != keys("calibration.nsamples=32")[0]
    assert keys("calibration.seqlen=128")[0] != keys()[0]
    # W4A16 RTN observes no activations: calibration does not change it
    assert keys("method=rtn", "scheme=w4a16", "calibration.nsamples=16") == keys("method=rtn", "scheme=w4a16")


def test_seed_makes_autoround_runs_distinct_but_shares_base_and_uncalibrated_rtn():
    assert len({keys(f"seed={s}")[0] for s in (0, 1, 2)}) == 3
    assert keys("method=none", "seed=1") == keys("method=none", "seed=2")
    assert keys("method=rtn", "scheme=w4a16", "seed=1") == keys("method=rtn", "scheme=w4a16", "seed=2")
    exp = validate(compose_cfg(["seed=3"]))
    assert exp.calibration.seed == 3 and exp.seed == 3


def test_report_settings_never_change_a_key():
    assert keys("report.recovery_threshold=0.9", "report.alpha=0.01") == keys()


def test_knobs_that_do_not_change_results_keep_the_key():
    assert keys("eval.batch_size=8") == keys("eval.batch_size=auto")
    assert keys("tracking.experiment=other") == keys()


def test_a_sweep_job_brings_its_baselines():
    exp = validate(compose_cfg(["iters=200"]))
    assert [b.method.name for b in pipeline.baselines_of(exp)] == ["none", "rtn"]
    assert all(b.scheme == exp.scheme and b.model == exp.model for b in pipeline.baselines_of(exp))
    assert [b.method.name for b in pipeline.baselines_of(validate(compose_cfg(["method=rtn"])))] == ["none"]
    assert pipeline.baselines_of(validate(compose_cfg(["method=none"]))) == []
    assert pipeline.baselines_of(validate(compose_cfg(["baselines=false"]))) == []


def test_run_names_tell_the_configs_apart():
    names = {
        pipeline.run_name(validate(compose_cfg(o)))
        for o in (["iters=0"], ["iters=200"], ["method=rtn"], ["method=none"])
    }
    assert names == {
        "tiny_llama-nvfp4-autoround-iters0",
        "tiny_llama-nvfp4-autoround-iters200",
        "tiny_llama-nvfp4-rtn",
        "tiny_llama-base",
    }


def test_a_copy_of_the_model_and_data_elsewhere_has_the_same_keys_and_a_changed_byte_does_not(tmp_path):
    """Local models and calibration files are identified by content, not path: two clones
    of this repository share their runs' keys."""
    import shutil

    from autoround_exp.assets import asset

    copies = []
    for where in ("a", "b/deeper"):
        model = shutil.copytree(asset("tiny_llama"), tmp_path / where / "model")
        calib = shutil.copy(asset("data/arith_gsm8k/calib.jsonl"), tmp_path / where / "calib.jsonl")
        copies.append([f"model.path={model}", f"calibration.source={calib}"])
    assert keys(*copies[0]) == keys(*copies[1]) == keys()
    assert keys(*copies[0], "method=none") == keys("method=none")
    weights = tmp_path / "b/deeper/model/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert keys(*copies[1])[0] != keys()[0] and keys(*copies[1], "method=none") != keys("method=none")
    (tmp_path / "a/calib.jsonl").write_text('{"text": "other"}\n')
    assert keys(*copies[0])[0] != keys()[0]


def test_one_byte_in_the_middle_of_a_large_model_file_changes_the_key(tmp_path):
    """Every byte counts: a fine-tune that changes only middle tensors of a big file is a new run."""
    import shutil

    from autoround_exp.assets import asset

    model = shutil.copytree(asset("tiny_llama"), tmp_path / "model")
    big = model / "extra.safetensors"  # a sparse 100 MB file: no 100 MB written to disk
    with big.open("wb") as f:
        f.truncate(100 * 2**20)
    args = (f"model.path={model}", f"paths.work={tmp_path / 'work'}")
    before = keys(*args)
    with big.open("r+b") as f:
        f.seek(50 * 2**20)
        f.write(b"\x01")
    after = keys(*args)
    assert before[0] != after[0] and before[1] != after[1]


def test_content_digests_are_computed_once_and_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    hashed = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(5000))
    cache_file = tmp_path / "cache" / "digests.json"
    first = fsutil.DigestCache(cache_file).digest(f)
    assert fsutil.DigestCache(cache_file).digest(f) == first and hashed == ["w.bin"]  # a new process: cached
    f.write_bytes(bytes(4999) + b"\x01")
    assert fsutil.DigestCache(cache_file).digest(f) != first and hashed == ["w.bin", "w.bin"]


def fake_hub_cache(root: Path, repo: str, commit: str) -> None:
    from huggingface_hub.file_download import repo_folder_name

    refs = root / repo_folder_name(repo_id=repo, repo_type="model") / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)


def test_a_hub_revision_enters_the_key_as_its_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(store, "_revisions", {})
    repo = "acme/tiny-hub-model"
    fake_hub_cache(tmp_path, repo, "a" * 40)
    exp = validate(compose_cfg([f"model.path={repo}"]))
    assert exp.model.revision == "main"
    pinned = store.pin_revision(exp)
    assert pinned.model.revision == "a" * 40 and store.quant_identity(pinned)["revision"] == "a" * 40
    first = store.keys(pinned)

    fake_hub_cache(tmp_path, repo, "b" * 40)  # the model was updated on the hub, and downloaded again
    monkeypatch.setattr(store, "_revisions", {})
    assert store.keys(store.pin_revision(exp)) != first
    # a commit hash is used as it is
    assert store.hub_revision(repo, "c" * 40) == "c" * 40


def test_a_hub_revision_that_cannot_be_resolved_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(store, "_revisions", {})
    with pytest.raises(store.IdentityError, match="hf download acme/absent.*40-character commit hash"):
        store.hub_revision("acme/absent", "main")


def test_the_two_autoround_paths_are_distinct_runs_sharing_their_baselines():
    modifier, native = keys("method=autoround", "iters=200"), keys("method=autoround_native", "iters=200")
    assert modifier[0] != native[0] and modifier[1] != native[1]
    assert keys("method=autoround_native", "iters=0")[0] != native[0]  # iters is part of the recipe
    assert keys("method=autoround_native", "calibration.nsamples=16")[0] != native[0]
    job = validate(compose_cfg(["method=autoround_native", "iters=200", "scheme=w4a16"]))
    assert [pipeline.run_name(b) for b in pipeline.baselines_of(job)] == ["tiny_llama-base", "tiny_llama-w4a16-rtn"]
    assert pipeline.run_name(job) == "tiny_llama-w4a16-autoround_native-iters200"
    assert job.checkpoint_name == "TinyLlama-Arith-W4A16-G128-AutoRound-native"
