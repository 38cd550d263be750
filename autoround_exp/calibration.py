"""Calibration samples of one fixed length.

AutoRound through llm-compressor trains on padding when samples differ in length
(llm-compressor pads each layer's recorded inputs with zeros and auto-round never reads
the mask), so every sample built here has exactly ``seqlen`` tokens and no padding.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from autoround_exp.config import CalibrationConfig, ConfigError
from autoround_exp.record import Calibration


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_file()


def is_image_text(source: str) -> bool:
    """A ChartQA-format parquet (image / query / label) calibrates with images and text."""
    return source.endswith(".parquet")


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
            f"(mode={cfg.mode}), fewer than calibration.nsamples={cfg.nsamples}; lower nsamples or seqlen"
            + (", or use calibration.mode=pack." if cfg.mode == "truncate" else ", or give it more text.")
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
    info = Calibration(
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


def build_image_text(processor, cfg: CalibrationConfig):
    """Image+text calibration for a vision-language model: ``nsamples`` rows of a
    ChartQA-format parquet (image / query / label), each asked and answered in one chat
    turn through the model's chat template, cut to exactly ``seqlen`` tokens with the
    image's tokens kept whole. Rows shorter than ``seqlen`` are skipped, as ``truncate``
    skips short texts: every sample has one length, so nothing is tuned on padding."""
    from datasets import Dataset

    rows = list(Dataset.from_parquet(str(Path(cfg.source).expanduser())))
    random.Random(cfg.seed).shuffle(rows)
    image_token = processor.image_token_id
    samples, digest = [], hashlib.sha256()
    for row in rows:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["query"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["label"][0]}]},
        ]
        text = processor.apply_chat_template(messages)
        enc = processor(text=[text], images=[row["image"].convert("RGB")], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        image_positions = [i for i, t in enumerate(ids) if t == image_token]
        if len(ids) < cfg.seqlen or not image_positions or image_positions[-1] >= cfg.seqlen:
            continue
        # per-token fields cut to seqlen; image fields (pixel_values, image_grid_thw) whole
        sample = {k: v[0, : cfg.seqlen] if k in PER_TOKEN else v for k, v in enc.items()}
        samples.append(sample)
        digest.update(json.dumps(sample["input_ids"].tolist()).encode())
        with io.BytesIO() as buf:
            row["image"].save(buf, format="PNG")
            digest.update(buf.getvalue())
        if len(samples) == cfg.nsamples:
            break
    if len(samples) < cfg.nsamples:
        raise ConfigError(
            f"calibration.source={cfg.source} yields {len(samples)} image+text samples of at least "
            f"{cfg.seqlen} tokens (image included), fewer than calibration.nsamples={cfg.nsamples}; "
            "lower calibration.seqlen or nsamples."
        )
    info = Calibration(
        source=cfg.source,
        text_column="query+label",
        nsamples=cfg.nsamples,
        seqlen=cfg.seqlen,
        mode="image_text",
        seed=cfg.seed,
        texts_read=len(rows),
        token_sha256=digest.hexdigest(),
        images=len(samples),
    )
    return Dataset.from_list([{k: _plain(v) for k, v in s.items()} for s in samples]), info


PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


def collate_one(batch: list[dict]) -> dict:
    """oneshot's data collator for image+text samples (one per batch: images differ in size)."""
    import torch

    assert len(batch) == 1, "image+text calibration batches hold one sample"
    out = {}
    for key, value in batch[0].items():
        tensor = torch.tensor(value)
        out[key] = tensor.unsqueeze(0) if key in PER_TOKEN else tensor
    return out
