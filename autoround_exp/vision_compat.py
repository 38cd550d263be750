"""Qwen-VL processors without torchvision: the one workaround, kept in one place.

transformers builds ``Qwen3VLProcessor`` from three parts (image processor, tokenizer,
video processor) and refuses to build it without the video processor, which needs
torchvision. PyPI's torchvision is compiled against CUDA torch and does not load beside
the CPU torch these environments use, so on a CPU machine no Qwen-VL processor loads, not
even for images. ``apply()`` makes these processors image-only while torchvision is
missing: images and text work exactly as before; videos are not processed (transformers
skips a modality whose processor is absent, and no task here sends one). Where
torchvision imports (every GPU environment) it does nothing.

Remove this module the day transformers loads a Qwen-VL processor without torchvision
(``tests/test_vision_compat.py`` fails that day and says so).
"""

from __future__ import annotations

import functools

# module, class: the processors whose video part needs torchvision
PATCHED = (
    ("transformers.models.qwen3_vl.processing_qwen3_vl", "Qwen3VLProcessor"),
    ("transformers.models.qwen2_5_vl.processing_qwen2_5_vl", "Qwen2_5_VLProcessor"),
    ("transformers.models.qwen2_vl.processing_qwen2_vl", "Qwen2VLProcessor"),
)


def needed() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def _image_only(get_attributes):
    @functools.wraps(get_attributes)
    def wrapper(cls):
        return [a for a in get_attributes.__func__(cls) if a != "video_processor"]

    return classmethod(wrapper)


@functools.cache
def apply() -> bool:
    """Make the Qwen-VL processors image-only if torchvision is missing; True if it did."""
    if not needed():
        return False
    import importlib

    for module, name in PATCHED:
        cls = getattr(importlib.import_module(module), name)
        if "get_attributes" not in cls.__dict__:  # the class's own, so subclasses stay as they are
            cls.get_attributes = _image_only(cls.get_attributes)
    return True


def processor(cls, image_processor, tokenizer, chat_template: str):
    """Build ``cls`` from its parts (no video processor where torchvision is missing)."""
    apply()
    if "video_processor" in cls.get_attributes():
        from transformers import AutoVideoProcessor  # noqa: F401 - needs torchvision here

        raise RuntimeError(f"{cls.__name__} needs a video processor; build it where torchvision imports")
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_processor(path: str, **kwargs):
    """``AutoProcessor.from_pretrained`` with the workaround applied where needed."""
    from transformers import AutoProcessor

    apply()
    return AutoProcessor.from_pretrained(path, **kwargs)
