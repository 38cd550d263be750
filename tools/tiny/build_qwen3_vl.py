"""Build the embedded tiny Qwen3-VL offline and deterministically.

    python -m tools.tiny.build_qwen3_vl [--out DIR] [--steps N]

A ``Qwen3VLForConditionalGeneration`` small enough to train on two CPU cores (``SIZE``;
interleaved M-RoPE, patch 16, spatial merge 2, deepstack), a byte-level BPE tokenizer holding
Qwen's special tokens with a ChatML chat template, and Qwen3-VL's image processor, trained to
read the synthetic bar charts (``tiny.charts``) in two stages:

1. the vision tower alone learns ``ChartCode``: every image token says, as fixed vectors of the
   language model's width, each bar's digits and length, the tallest and the shortest bar, and
   the token's own place;
2. the tower is fixed (its outputs cached, ``FrozenVision``) and the language model learns to
   answer from them. Each chart is one conversation: the first turn asks one of its questions
   with lm-eval's chartqa prompt through the chat template, exactly as lm-eval's
   ``hf-multimodal`` renders it, the following turns ask its other questions in a few words.
   A few-shot block of the arithmetic problems (``tiny.arithmetic``) rides along in every
   step, so the language model keeps a text skill for gsm8k and text calibration.

The training charts come from other seeds than the scored ones (seed 0) and the calibration
ones (2000). Deterministic: fixed seeds, a fixed number of torch threads and the same data
order give the same bytes on the same machine. The result ships in ``assets/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass
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
from tools.tiny.build_llama import SHOTS_PER_SEQUENCE, encode_with_mask, render_sequence

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
IMAGE_TOKENS = (224 // 32) ** 2
VOCAB = 1024


@dataclass(frozen=True)
class Size:
    """The model's widths and depths. Every Linear's input width is a multiple of 128, so
    W4A16 (group 128) and NVFP4 (group 16) quantize every layer."""

    text_hidden: int = 256
    text_intermediate: int = 768
    text_layers: int = 4
    vision_hidden: int = 256
    vision_intermediate: int = 512
    vision_depth: int = 4
    rope_theta: float = 5_000_000.0


SIZE = Size()


def chartqa_prompt_template(lm_eval_dir: Path) -> str:
    """The stock chartqa ``doc_to_text`` (``<image>{{query}}`` + instructions)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    task = yaml.load((lm_eval_dir / "tasks" / "chartqa" / "chartqa.yaml").read_text(), Loader=_Loader)
    return task["doc_to_text"]


def chartqa_relaxed_accuracy(lm_eval_dir: Path):
    """lm-eval's own ``relaxed_accuracy`` of the chartqa task (its utils.py, loaded by path)."""
    spec = importlib.util.spec_from_file_location("chartqa_utils", lm_eval_dir / "tasks" / "chartqa" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda answer, target: module.relaxed_accuracy([target], [answer])["relaxed_accuracy"]


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose pieces may span words (not split at spaces, only at line ends and
    between digits): the fixed lines of chartqa's prompt become a token each, so a chart
    question is about 70 tokens, 49 of them the image's, instead of about 280. A real model's
    tokenizer spends those tokens; this one spends the build's two CPU cores on the image."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="merged_with_previous"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
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


def build_config(tokenizer, vocab: int, size: Size) -> Qwen3VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    head_dim = 64
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": size.text_hidden,
            "intermediate_size": size.text_intermediate,
            "num_hidden_layers": size.text_layers,
            "num_attention_heads": size.text_hidden // head_dim,
            "num_key_value_heads": size.text_hidden // head_dim // 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            # Qwen3-VL's interleaved M-RoPE (t, h, w), scaled to head_dim 64
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": size.rope_theta,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_hidden // head_dim,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": size.text_hidden,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [size.vision_depth // 2],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        dtype="bfloat16",
    )


class Encoder:
    """Chart conversations and arithmetic blocks as token ids with their loss mask, batched."""

    def __init__(self, processor, prompt_template: str):
        from jinja2 import Template

        self.processor, self.tokenizer = processor, processor.tokenizer
        self.template = Template(prompt_template)
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_id = self.tokenizer.pad_token_id

    def chartqa_text(self, query: str) -> str:
        """The user text of one chartqa document, as lm-eval renders ``doc_to_text``."""
        return self.template.render(query=query).replace(IMAGE_PLACEHOLDER, "")

    def prompt(self, query: str) -> str:
        """lm-eval's hf-multimodal prompt for one chart question: the image, then the text."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.chartqa_text(query)}]}
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The chat text of a conversation about one chart and the character spans of its
        answers (``Final Answer: ...<|im_end|>``, what the model must write). The first turn
        is lm-eval's chartqa prompt; later turns ask in a few words."""
        messages, spans, text = [], [], ""
        for k, (query, answer) in enumerate(turns):
            if k == 0:
                content = [{"type": "image"}, {"type": "text", "text": self.chartqa_text(query)}]
            else:
                content = query
            messages.append({"role": "user", "content": content})
            prefix = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            assert prefix.startswith(text), "the chat template must extend the conversation"
            reply = f"Final Answer: {answer}<|im_end|>"
            spans.append((len(prefix), len(prefix) + len(reply)))
            messages.append({"role": "assistant", "content": f"Final Answer: {answer}"})
            text = self.processor.apply_chat_template(messages)
            assert text[spans[-1][0] : spans[-1][1]] == reply, "the chat template must end a reply with <|im_end|>"
        return text, spans

    def images(self, pngs: list[bytes]) -> dict:
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in pngs]
        return dict(self.processor.image_processor(images=images, return_tensors="pt"))

    def expand(self, text: str, n_image_tokens: int, spans: list[tuple[int, int]]):
        """Replace the image placeholder by the image's tokens (what the processor does),
        shifting the answer spans with it."""
        at = text.index(self.image_token)
        extra = len(self.image_token) * (n_image_tokens - 1)
        text = text[:at] + self.image_token * n_image_tokens + text[at + len(self.image_token) :]
        return text, [(a + extra, b + extra) if a > at else (a, b) for a, b in spans]

    def chart_batch(self, conversations: list[list[tuple[str, str]]], vision: dict) -> dict:
        """A batch of conversations, each about one chart whose processed image is in
        ``vision``, right-padded; loss on the answers."""
        merge = self.processor.image_processor.merge_size
        per_image = (vision["image_grid_thw"].prod(-1) // merge**2).tolist()
        seqs = []
        for turns, n_img in zip(conversations, per_image, strict=True):
            text, spans = self.conversation(turns)
            text, spans = self.expand(text, n_img, spans)
            seqs.append(encode_with_mask(self.tokenizer, text, spans))
        return {**self.pad(seqs), **vision}

    def text_batch(self, seqs: list[tuple[list[int], list[int]]]) -> dict:
        return self.pad(seqs)

    def pad(self, seqs: list[tuple[list[int], list[int]]]) -> dict:
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.tensor([i + [self.pad_id] * (width - len(i)) for i, _ in seqs])
        labels = torch.tensor([lb + [-100] * (width - len(lb)) for _, lb in seqs])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in seqs])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "mm_token_type_ids": (ids == self.image_token_id).int(),
        }

    def prompt_batch(self, rows: list[dict]) -> dict:
        """Left-padded first-turn prompts (no answer) for greedy generation."""
        vision = self.images([r["image"]["bytes"] for r in rows])
        merge = self.processor.image_processor.merge_size
        per_image = (vision["image_grid_thw"].prod(-1) // merge**2).tolist()
        ids = []
        for row, n_img in zip(rows, per_image, strict=True):
            text, _ = self.expand(self.prompt(row["query"]), n_img, [])
            ids.append(self.tokenizer(text)["input_ids"])
        width = max(map(len, ids))
        input_ids = torch.tensor([[self.pad_id] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            **vision,
        }


@torch.no_grad()
def answer(model, encoder: Encoder, rows: list[dict], batch_size: int = 16, max_new: int = 12) -> list[str]:
    """Greedy answers to the first-turn prompts of ``rows``, as lm-eval's generation would give."""
    out = []
    for i in range(0, len(rows), batch_size):
        batch = encoder.prompt_batch(rows[i : i + batch_size])
        n = batch["input_ids"].shape[1]
        gen = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
        out += encoder.tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True)
    return out


def score(model, encoder: Encoder, rows: list[dict], relaxed) -> dict[str, float]:
    """lm-eval's relaxed_accuracy on ``rows``: overall and per question kind."""
    answers = answer(model, encoder, rows)
    by_kind: dict[str, list[float]] = {}
    for row, a in zip(rows, answers, strict=True):
        kind = "value" if row["label"][0].isdigit() else "compare"
        by_kind.setdefault(kind, []).append(relaxed(a, row["label"][0]))
        by_kind.setdefault("all", []).append(relaxed(a, row["label"][0]))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}


class ChartCode:
    """Training only, not saved: what the vision tower's image tokens should say about a chart,
    as fixed vectors (a seeded codebook of the language model's width), and the tower's loss
    for saying it.

    Every image token carries the whole chart: for each bar slot the tens and units digits of
    its value and the value as a length along the slot's own direction, which slot holds the
    tallest bar and which the shortest; plus the token's own row and column. The language model
    then answers from any image token, by a near-uniform look at the image, instead of learning
    to find a bar's column: a from-scratch language model on tokens a linear probe could read
    (each bar's value, each token's column) stayed at chance after 600 steps, measured."""

    def __init__(self, hidden: int, seed: int = 5, std: float = 0.05, roles: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        side, slots = charts.SIZE_PX // charts.CELL_PX, charts.SLOTS

        def vectors(*shape):
            return torch.randn(*shape, hidden, generator=g) * std

        self.col, self.row = vectors(side), vectors(side)
        self.tens, self.units = vectors(slots, 10), vectors(slots, 10)
        self.length = vectors(slots)
        # the tallest and the shortest weigh roles**2 as much in the tower's squared error:
        # two questions in three ask for them
        self.top, self.low = roles * vectors(slots), roles * vectors(slots)
        self.side = side

    def target(self, chart: charts.Chart) -> torch.Tensor:
        """The (side * side, hidden) image tokens of ``chart``, row by row."""
        whole = self.top[chart.values.index(max(chart.values))] + self.low[chart.values.index(min(chart.values))]
        for s, v in enumerate(chart.values):
            whole = whole + self.tens[s, v // 10] + self.units[s, v % 10] + (v / 50 - 1) * self.length[s]
        place = self.row.repeat_interleave(self.side, 0) + self.col.repeat(self.side, 1)
        return whole + place

    def targets(self, batch_charts: list[charts.Chart]) -> torch.Tensor:
        return torch.stack([self.target(c) for c in batch_charts])

    @staticmethod
    def tokens(output, n: int) -> torch.Tensor:
        return output.pooler_output.reshape(n, -1, output.pooler_output.shape[-1])

    def loss(self, output, batch_charts: list[charts.Chart]) -> torch.Tensor:
        """Mean squared error to the code, relative to the code's own scale."""
        t = self.targets(batch_charts)
        return ((self.tokens(output, len(batch_charts)) - t) ** 2).mean() / (t**2).mean()

    @torch.no_grad()
    def report(self, output, batch_charts: list[charts.Chart]) -> str:
        """How well the tokens say the chart: the nearest code's digits, tallest and shortest,
        read off the mean token."""
        mean = self.tokens(output, len(batch_charts)).mean(1)  # (n, hidden)
        place = (self.row.mean(0) + self.col.mean(0))[None]
        mean = mean - place
        slots = charts.SLOTS
        exact = near = top = low = total = 0
        for i, c in enumerate(batch_charts):
            top += int((self.top @ mean[i]).argmax()) == c.values.index(max(c.values))
            low += int((self.low @ mean[i]).argmax()) == c.values.index(min(c.values))
            for s, v in enumerate(c.values[:slots]):
                read = 10 * int((self.tens[s] @ mean[i]).argmax()) + int((self.units[s] @ mean[i]).argmax())
                exact += read == v
                near += abs(read - v) <= 0.05 * v
                total += 1
        n = len(batch_charts)
        return (
            f"digits exact {exact / total:.2f} within 5% {near / total:.2f} | "
            f"tallest {top / n:.2f} shortest {low / n:.2f}"
        )


class ImageCache:
    """The image processor's ``pixel_values`` of every training chart, computed once and kept
    as one byte per value: a chart's values take at most 256 distinct floats (8-bit pixels,
    rescaled and normalized alike in every channel), so a lookup table gives back the
    processor's exact floats (checked) at a quarter of the memory."""

    def __init__(self, encoder: Encoder, pngs: list[bytes], chunk: int = 64):
        codes, grids = [], []
        self.table = torch.zeros(256)
        for i in range(0, len(pngs), chunk):
            out = encoder.images(pngs[i : i + chunk])
            pv, grid = out["pixel_values"], out["image_grid_thw"]
            c = torch.round((pv * 0.5 + 0.5) * 255).to(torch.uint8)
            self.table[c.flatten().long()] = pv.flatten()
            assert torch.equal(self.table[c.long()], pv), "pixel values are not one float per byte"
            per = int(grid[0].prod())
            assert all(int(g.prod()) == per for g in grid), "training charts are all one size"
            codes.append(c.reshape(len(grid), per, -1))
            grids.append(grid)
        self.codes, self.grid = torch.cat(codes), torch.cat(grids)

    def batch(self, idx: list[int]) -> dict:
        return {
            "pixel_values": self.table[self.codes[idx].long()].flatten(0, 1),
            "image_grid_thw": self.grid[idx],
        }


def training_charts(n: int, seed: int) -> list[tuple[bytes, charts.Chart]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chart = charts.make_chart(rng, fixed_labels=True)
        out.append((charts.render(chart), chart))
    return out


def conversation_turns(chart: charts.Chart, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    qa = chart.all_questions()
    rng.shuffle(qa)
    return qa[:turns]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--steps", type=int, default=1200, help="steps of the language model on the fixed tower")
    ap.add_argument("--batch", type=int, default=16, help="chart conversations per step")
    ap.add_argument("--turns", type=int, default=7, help="questions per chart conversation")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--train-charts", type=int, default=6000)
    ap.add_argument("--eval-charts", type=int, default=150, help="held-out questions scored at the end")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the bytes depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-steps", type=int, default=600, help="steps of the vision tower alone, learning ChartCode")
    ap.add_argument("--probe-charts", type=int, default=200, help="held-out charts the tower's code is read on")
    ap.add_argument("--eval-every", type=int, default=300, help="score the held-out questions every N steps")
    ap.add_argument("--size", type=json.loads, default={}, help='JSON overrides of Size, e.g. {"text_layers": 2}')
    ap.add_argument("--no-save", action="store_true", help="train and score only (experiments)")
    ap.add_argument("--pos-std", type=float, default=0.8, help="init std of the vision tower's position embeddings")
    args = ap.parse_args(argv)

    import lm_eval

    size = Size(**{**asdict(SIZE), **args.size})
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    lm_eval_dir = Path(lm_eval.__file__).parent
    prompt_template = chartqa_prompt_template(lm_eval_dir)
    train_problems, _, _ = arithmetic.split_problems(0)
    t0 = time.time()
    # Charts from seeds the scored charts (seed 0) and the calibration charts (2000) never use.
    train = training_charts(args.train_charts, seed=1000 + args.seed)
    print(f"rendered {len(train)} training charts in {time.time() - t0:.0f}s", flush=True)

    corpus = [render_sequence(rng.sample(train_problems, SHOTS_PER_SEQUENCE), rng)[0] for _ in range(1000)]
    tokenizer = build_tokenizer(corpus, vocab_size=VOCAB)  # a first one, to render the chat turns
    encoder = Encoder(build_processor(tokenizer), prompt_template)
    for _, chart in train[:1000]:
        corpus.append(encoder.conversation(conversation_turns(chart, rng, args.turns))[0])
    tokenizer = build_tokenizer(corpus, vocab_size=VOCAB)
    assert len(tokenizer) <= VOCAB, len(tokenizer)
    processor = build_processor(tokenizer)
    encoder = Encoder(processor, prompt_template)
    images = ImageCache(encoder, [png for png, _ in train])
    print(f"processed the training charts' images {time.time() - t0:.0f}s", flush=True)
    # trained in fp32 (the sub-configs' bf16 would build half the layers in bf16); saved in bf16
    model = Qwen3VLForConditionalGeneration(build_config(tokenizer, VOCAB, size)).float()
    # The vision tower's learned position embeddings start as large as a patch's embedding
    # (~0.8 here), not at the 0.02 of every other weight: a chart is mostly white patches that
    # differ only in where they are, and at 0.02 their tokens never learn it (a linear probe
    # found a token's column 1 time in 3 after 300 steps, measured), so the language model
    # cannot look a bar up by its column.
    torch.nn.init.normal_(model.model.visual.pos_embed.weight, std=args.pos_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters", flush=True)

    code = ChartCode(size.text_hidden)  # the merger writes the language model's width
    held_out = charts.build(args.eval_charts, seed=0, fixed_labels=True)
    relaxed = chartqa_relaxed_accuracy(lm_eval_dir)

    order = list(range(len(train)))
    cursor = len(order)

    def next_batch() -> list[int]:
        nonlocal cursor
        idx = []
        for _ in range(args.batch):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            idx.append(order[cursor])
            cursor += 1
        return idx

    # Stage 1: the vision tower alone learns to say ChartCode.
    visual = model.model.visual
    vision_opt = torch.optim.AdamW(visual.parameters(), lr=args.vision_lr, weight_decay=0.01, betas=(0.9, 0.95))
    held_charts = probe_charts(args.probe_charts)
    held_vision = ImageCache(encoder, [charts.render(c) for c in held_charts])
    for step in range(args.vision_steps):
        for g in vision_opt.param_groups:  # warm-up, then cosine from full to a tenth
            g["lr"] = (
                args.vision_lr
                * min(1.0, (step + 1) / 20)
                * (0.55 + 0.45 * math.cos(math.pi * step / args.vision_steps))
            )
        idx = next_batch()
        loss = code.loss(visual(**_vision_args(images.batch(idx)), return_dict=True), [train[i][1] for i in idx])
        vision_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
        vision_opt.step()
        if step % 50 == 0 or step == args.vision_steps - 1:
            with torch.no_grad():
                held = code.report(
                    visual(**_vision_args(held_vision.batch(list(range(len(held_charts))))), return_dict=True),
                    held_charts,
                )
            print(
                f"vision step {step} code loss {loss.item():.4f} held-out: {held} {time.time() - t0:.0f}s", flush=True
            )

    # Stage 2: the language model learns to answer from the fixed tower's tokens.
    frozen = FrozenVision(model, images)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"cached the fixed vision tower's outputs {time.time() - t0:.0f}s", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 40)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.55 + 0.45 * math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = next_batch()
        frozen.select(idx)
        chart_batch = encoder.chart_batch(
            [conversation_turns(train[i][1], rng, args.turns) for i in idx], images.batch(idx)
        )
        text_batch = encoder.text_batch(
            [encode_with_mask(tokenizer, *render_sequence(rng.sample(train_problems, SHOTS_PER_SEQUENCE), rng))]
        )
        opt.zero_grad(set_to_none=True)
        chart_loss = model(**chart_batch).loss
        text_loss = model(**text_batch).loss
        (chart_loss + 0.25 * text_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step} chart loss {chart_loss.item():.4f} text loss {text_loss.item():.4f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            model.eval()
            frozen.release()
            print(f"step {step} held-out relaxed_accuracy {score(model, encoder, held_out, relaxed)}", flush=True)
            frozen.attach()
            model.train()

    frozen.release()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    fp32 = score(model, encoder, held_out, relaxed)
    print(f"relaxed_accuracy on {len(held_out)} held-out questions (fp32, greedy): {fp32}", flush=True)
    if args.no_save:
        return
    model_dir = args.out / "tiny_qwen3_vl"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (model_dir / "build_info.json").write_text(
        json.dumps(
            {
                "script": "python -m tools.tiny.build_qwen3_vl",
                **{k: v for k, v in vars(args).items() if k not in ("out", "size", "no_save")},
                "size": asdict(size),
                "parameters": n_params,
                "build_seconds": round(time.time() - t0),
                "relaxed_accuracy_held_out_fp32": fp32,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {model_dir}")


class FrozenVision:
    """The vision tower fixed after its own stage: its outputs for every training chart
    computed once, and handed to the language model's steps in its place (training only)."""

    def __init__(self, model, images: ImageCache, chunk: int = 64):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        self.model, self.output_type = model.model, BaseModelOutputWithDeepstackFeatures
        for p in self.model.visual.parameters():
            p.requires_grad_(False)
        pooled, deep = [], []
        n = len(images.codes)
        with torch.no_grad():
            for i in range(0, n, chunk):
                idx = list(range(i, min(n, i + chunk)))
                out = self.model.visual(**_vision_args(images.batch(idx)), return_dict=True)
                pooled.append(out.pooler_output.reshape(len(idx), -1, out.pooler_output.shape[-1]))
                deep.append(torch.stack([d.reshape(len(idx), -1, d.shape[-1]) for d in out.deepstack_features]))
        self.pooled, self.deep = torch.cat(pooled), torch.cat(deep, 1)
        self.original = self.model.get_image_features
        self.idx: list[int] = []
        self.attach()

    def select(self, idx: list[int]) -> None:
        self.idx = idx

    def attach(self) -> None:
        def cached(pixel_values, image_grid_thw=None, **kwargs):
            pooled = self.pooled[self.idx]
            deep = [d.flatten(0, 1) for d in self.deep[:, self.idx]]
            return self.output_type(pooler_output=tuple(pooled), deepstack_features=deep)

        self.model.get_image_features = cached

    def release(self) -> None:
        self.model.get_image_features = self.original


def _vision_args(batch: dict) -> dict:
    return {"hidden_states": batch["pixel_values"], "grid_thw": batch["image_grid_thw"]}


def probe_charts(n: int) -> list[charts.Chart]:
    """Charts never trained on (a seed of their own), for the probe's held-out error."""
    rng = random.Random(3000)
    return [charts.make_chart(rng, fixed_labels=True) for _ in range(n)]


if __name__ == "__main__":
    main()
