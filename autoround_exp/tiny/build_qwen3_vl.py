"""Build the embedded tiny Qwen3-VL offline and deterministically.

    python -m autoround_exp.tiny.build_qwen3_vl [--out DIR] [--steps N]

A ``Qwen3VLForConditionalGeneration`` as small as the architecture allows (text: hidden
256, 2 layers, interleaved M-RoPE; vision: depth 2, hidden 128, patch 16, spatial merge 2,
deepstack at block 1), a byte-level BPE tokenizer holding Qwen's special tokens with a
ChatML chat template, and Qwen3-VL's image processor. It is trained on two things the
harness scores it on: the synthetic charts (``tiny.charts``) asked with lm-eval's chartqa
prompt through the chat template, exactly as lm-eval's ``hf-multimodal`` renders it, and
the arithmetic problems in gsm8k's few-shot layout (``tiny.arithmetic``). The training
charts come from other seeds than the test charts, with labels in fixed positions
(``charts.make_chart``): a model this small learns to compare bars and points, not to
read text off an image. The result ships in ``assets/``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from autoround_exp import vision_compat
from autoround_exp.tiny import arithmetic, charts
from autoround_exp.tiny.build_llama import SHOTS_PER_SEQUENCE, encode_with_mask, render_sequence

ASSETS = Path(__file__).parent / "assets"
# Qwen's special tokens, in Qwen2/3's order; the model's config points at these ids.
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# ChatML as Qwen3-VL's template writes it for text and image parts (no BOS: Qwen has none).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
IMAGE_PLACEHOLDER = "<image>"  # lm-eval's placeholder in doc_to_text
IMAGE_PIXELS = (32 * 32 * 4, 256 * 256)  # min/max: a 224 px chart stays 224 px (49 image tokens)


def chartqa_prompt_template(lm_eval_dir: Path) -> str:
    """The stock chartqa ``doc_to_text`` (``<image>{{query}}`` + instructions)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    task = yaml.load((lm_eval_dir / "tasks" / "chartqa" / "chartqa.yaml").read_text(), Loader=_Loader)
    return task["doc_to_text"]


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def build_processor(tokenizer) -> Qwen3VLProcessor:
    # The PIL image processor: the same preprocessing as the torchvision one, and it needs
    # no torchvision (vision_compat).
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": IMAGE_PIXELS[0], "longest_edge": IMAGE_PIXELS[1]},
    )
    return vision_compat.processor(Qwen3VLProcessor, image_processor, tokenizer, CHAT_TEMPLATE)


def build_config(tokenizer, vocab: int) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 4096,
            # Qwen3-VL's interleaved M-RoPE (t, h, w), scaled to head_dim 64
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 256,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        dtype="bfloat16",
    )


def chart_example(processor, prompt_template: str, row: dict) -> dict:
    """One chart question as lm-eval's hf-multimodal asks it, with the loss on the answer."""
    from jinja2 import Template

    text = Template(prompt_template).render(query=row["query"]).replace(IMAGE_PLACEHOLDER, "")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answer = f"Final Answer: {row['label'][0]}<|im_end|>"
    image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
    enc = processor(text=[prompt + answer], images=[image], return_tensors="pt")
    n_prompt = len(processor(text=[prompt], images=[image])["input_ids"][0])
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100
    return {**enc, "labels": labels}


def text_example(tokenizer, problems, rng) -> dict:
    ids, labels = encode_with_mask(tokenizer, *render_sequence(problems, rng))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": torch.tensor([labels])}


def greedy_answer(model, processor, prompt_template: str, row: dict, max_new: int = 16) -> str:
    ex = chart_example(processor, prompt_template, {**row, "label": [""]})
    n = int((ex["labels"] == -100).sum())
    inputs = {k: v for k, v in ex.items() if k != "labels"}
    inputs["input_ids"] = inputs["input_ids"][:, :n]
    inputs["attention_mask"] = inputs["attention_mask"][:, :n]
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :n]
    out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return processor.tokenizer.decode(out[0, n:], skip_special_tokens=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-charts", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import lm_eval

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    prompt_template = chartqa_prompt_template(Path(lm_eval.__file__).parent)
    train_problems, _, _ = arithmetic.split_problems(0)
    # Charts from seeds the test charts (seed 0) never use.
    chart_rows = charts.build(args.train_charts, seed=1000 + args.seed, fixed_labels=True)

    corpus = [render_sequence(rng.sample(train_problems, SHOTS_PER_SEQUENCE), rng)[0] for _ in range(1000)]
    corpus += [prompt_template.replace("{{query}}", r["query"]) + f"Final Answer: {r['label'][0]}" for r in chart_rows]
    tokenizer = build_tokenizer(corpus, vocab_size=640)
    vocab = 640
    assert len(tokenizer) <= vocab, len(tokenizer)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, vocab)
    model = Qwen3VLForConditionalGeneration(config)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    t0 = time.time()
    model.train()
    for step in range(args.steps):
        # one chart question and one few-shot arithmetic block per step, alternating
        # gradients from both so neither skill crowds out the other
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss_total = 0.0
        batch = [chart_example(processor, prompt_template, rng.choice(chart_rows)) for _ in range(4)]
        batch.append(text_example(tokenizer, rng.sample(train_problems, SHOTS_PER_SEQUENCE), rng))
        opt.zero_grad(set_to_none=True)
        for ex in batch:
            loss = model(**ex).loss / len(batch)
            loss.backward()
            loss_total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss_total:.4f} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    held_out = charts.build(40, seed=0, fixed_labels=True)
    with torch.no_grad():
        right = sum(
            greedy_answer(model, processor, prompt_template, r).strip() == f"Final Answer: {r['label'][0]}"
            for r in held_out
        )
    print(f"exact answers on 40 test charts (fp32): {right}/40")

    model_dir = args.out / "tiny_qwen3_vl"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (model_dir / "build_info.json").write_text(
        json.dumps(
            {
                "script": "python -m autoround_exp.tiny.build_qwen3_vl",
                **vars(args),
                "out": None,
                "train_seconds": round(time.time() - t0),
                "exact_answers_on_40_test_charts_fp32": right,
            },
            indent=2,
        )
    )
    print(f"saved {model_dir}")


if __name__ == "__main__":
    main()
