"""Calibration samples of one fixed length.

AutoRound through llm-compressor trains on padding when samples differ in length
(llm-compressor pads each layer's recorded inputs with zeros and auto-round never reads
the mask), so every sample built here has exactly ``seqlen`` tokens and no padding.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from autoround_exp.config import CalibrationConfig, ConfigError


@dataclass
class CalibrationInfo:
    source: str
    text_column: str
    nsamples: int
    seqlen: int
    mode: str
    seed: int
    texts_read: int
    token_sha256: str  # hash of the exact token ids that tuned the model

    def to_dict(self) -> dict:
        return asdict(self)


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_file()


def read_texts(path: Path, text_column: str) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_column not in row:
                        raise ConfigError(
                            f"{path}:{n} has no '{text_column}' field; set calibration.text_column to one of "
                            f"{', '.join(row)}."
                        )
                    texts.append(row[text_column])
        return texts
    return [t for t in path.read_text().split("\n\n") if t.strip()]


def _truncate(tokenizer, texts: list[str], cfg: CalibrationConfig) -> list[list[int]]:
    """auto-round's rule: keep texts of at least seqlen tokens, cut to seqlen."""
    samples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= cfg.seqlen:
            samples.append(ids[: cfg.seqlen])
            if len(samples) == cfg.nsamples:
                break
    return samples


def _pack(tokenizer, texts: list[str], cfg: CalibrationConfig) -> list[list[int]]:
    """Concatenate texts (EOS between them) and cut the stream; each sample opens with BOS."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    width = cfg.seqlen - len(bos)
    stream: list[int] = []
    samples = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        while len(stream) >= width and len(samples) < cfg.nsamples:
            samples.append(bos + stream[:width])
            stream = stream[width:]
        if len(samples) == cfg.nsamples:
            break
    return samples


def token_ids(tokenizer, cfg: CalibrationConfig) -> tuple[list[list[int]], int]:
    """(samples, number of texts read) from a local file or a hub data set."""
    if is_local(cfg.source):
        texts = read_texts(Path(cfg.source).expanduser(), cfg.text_column)
        random.Random(cfg.seed).shuffle(texts)
        samples = (_pack if cfg.mode == "pack" else _truncate)(tokenizer, texts, cfg)
        n_texts = len(texts)
    else:
        if cfg.mode != "truncate":
            raise ConfigError(f"calibration.mode={cfg.mode} needs a local file; hub data sets use mode=truncate.")
        from auto_round.calib_dataset import get_dataset

        ds = get_dataset(tokenizer, cfg.seqlen, dataset_name=cfg.source, seed=cfg.seed, nsamples=cfg.nsamples)
        samples = [list(map(int, row["input_ids"]))[: cfg.seqlen] for row in ds]
        n_texts = len(samples)
    if len(samples) < cfg.nsamples:
        raise ConfigError(
            f"calibration.source={cfg.source} yields {len(samples)} samples of {cfg.seqlen} tokens "
            f"(mode={cfg.mode}), fewer than calibration.nsamples={cfg.nsamples}; lower nsamples or seqlen, "
            "or use calibration.mode=pack."
        )
    lengths = {len(s) for s in samples}
    if lengths != {cfg.seqlen}:  # would be tuned on padding: never let it through
        raise RuntimeError(f"calibration samples must all have {cfg.seqlen} tokens, got lengths {sorted(lengths)}")
    return samples, n_texts


def build(tokenizer, cfg: CalibrationConfig):
    """A ``datasets.Dataset`` of ``nsamples`` rows of exactly ``seqlen`` tokens, and its info."""
    from datasets import Dataset

    samples, n_texts = token_ids(tokenizer, cfg)
    digest = hashlib.sha256(json.dumps(samples).encode()).hexdigest()
    info = CalibrationInfo(
        source=cfg.source,
        text_column=cfg.text_column,
        nsamples=cfg.nsamples,
        seqlen=cfg.seqlen,
        mode=cfg.mode,
        seed=cfg.seed,
        texts_read=n_texts,
        token_sha256=digest,
    )
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * cfg.seqlen for _ in samples]})
    return ds, info
