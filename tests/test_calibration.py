"""Calibration samples all have exactly seqlen tokens: AutoRound through llm-compressor
would otherwise be tuned on padding."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from autoround_exp import calibration
from autoround_exp.assets import asset
from autoround_exp.config import CalibrationConfig, ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(asset("tiny_llama"))


@pytest.fixture
def varied_texts(tmp_path):
    """Texts of very different lengths, as an ordinary chat or text data set has."""
    path = tmp_path / "texts.jsonl"
    with path.open("w") as f:
        for k in range(60):
            f.write(json.dumps({"text": " ".join(["Tom has 3 apples."] * (1 + k % 17))}) + "\n")
    return path


@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_samples_have_one_length(tokenizer, varied_texts, mode):
    cfg = CalibrationConfig(source=str(varied_texts), nsamples=8, seqlen=48, mode=mode)
    ds, info = calibration.build(tokenizer, cfg)
    assert len(ds) == 8
    assert {len(r["input_ids"]) for r in ds} == {48}
    assert all(all(m == 1 for m in r["attention_mask"]) for r in ds)  # no padding anywhere
    assert all(r["input_ids"][0] == tokenizer.bos_token_id for r in ds)
    assert info.nsamples == 8 and info.seqlen == 48 and info.mode == mode


def test_token_hash_identifies_the_samples(tokenizer, varied_texts):
    a = calibration.build(tokenizer, CalibrationConfig(source=str(varied_texts), nsamples=4, seqlen=32, mode="pack"))
    b = calibration.build(tokenizer, CalibrationConfig(source=str(varied_texts), nsamples=4, seqlen=32, mode="pack"))
    c = calibration.build(
        tokenizer, CalibrationConfig(source=str(varied_texts), nsamples=4, seqlen=32, mode="pack", seed=7)
    )
    assert a[1].token_sha256 == b[1].token_sha256  # deterministic
    assert a[1].token_sha256 != c[1].token_sha256  # another shuffle, other tokens


def test_too_few_long_texts_says_what_to_change(tokenizer, varied_texts):
    cfg = CalibrationConfig(source=str(varied_texts), nsamples=50, seqlen=400, mode="truncate")
    with pytest.raises(ConfigError, match="lower nsamples or seqlen, or use calibration.mode=pack"):
        calibration.build(tokenizer, cfg)


def test_missing_text_column_names_the_fields(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="calibration.text_column to one of prompt, response"):
        calibration.build(tokenizer, CalibrationConfig(source=str(path), nsamples=1, seqlen=8, mode="pack"))


def test_tiny_model_default_calibration(tokenizer):
    cfg = CalibrationConfig(source=asset("data/arith_gsm8k/calib.jsonl"), nsamples=64, seqlen=256, mode="pack")
    ds, info = calibration.build(tokenizer, cfg)
    assert len(ds) == 64 and info.texts_read == 256
