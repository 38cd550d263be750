"""vision_compat: the embedded tiny Qwen3-VL's processor loads and works without torchvision,
and the workaround is still needed (the day transformers fixes this, a test says so)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoround_exp import vision_compat
from autoround_exp.assets import asset

TINY = asset("tiny_qwen3_vl")

no_torchvision = pytest.mark.skipif(
    not vision_compat.needed(), reason="torchvision imports here: vision_compat does nothing"
)


@no_torchvision
def test_transformers_still_cannot_load_a_qwen_vl_processor_without_torchvision():
    """In a fresh interpreter, without vision_compat. If this fails, transformers loads it
    now: delete vision_compat and autoround_exp/lm_eval_cli.py."""
    code = f"from transformers import AutoProcessor; AutoProcessor.from_pretrained({TINY!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, "transformers loads Qwen3VLProcessor without torchvision now: remove vision_compat"
    assert "video_processor" in out.stderr


@no_torchvision
def test_the_processor_loads_image_only_and_encodes_a_chart_like_upstreams():
    from PIL import Image

    processor = vision_compat.load_processor(TINY)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert "video_processor" not in processor.get_attributes()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which fruit?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which fruit?")
    enc = processor(text=[text], images=[Image.new("RGB", (224, 224), "white")], return_tensors="pt")
    # 224 px, patch 16, merge 2: 14 x 14 patches -> 49 image tokens in the text
    assert enc["image_grid_thw"].tolist() == [[1, 14, 14]]
    assert int((enc["input_ids"] == processor.image_token_id).sum()) == 49
    # image-only: a video is not processed (the harness's tasks never send one)
    video = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[[Image.new("RGB", (32, 32))] * 2])
    assert "pixel_values_videos" not in video


def test_apply_touches_only_the_qwen_vl_processors():
    from transformers import LlavaProcessor

    applied = vision_compat.apply()
    assert applied is vision_compat.needed()
    assert "video_processor" not in {*LlavaProcessor.get_attributes()}  # untouched class, own attributes
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    assert ("video_processor" in Qwen3VLProcessor.get_attributes()) is not applied
