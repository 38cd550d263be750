"""``python -m lm_eval`` with ``vision_compat`` applied first.

The evaluation child runs this instead of ``lm_eval`` only for a vision-language model in
an environment without torchvision, where lm-eval's ``hf-multimodal`` could not load the
model's processor; the arguments and everything lm-eval does are unchanged.
"""

from autoround_exp import vision_compat

if __name__ == "__main__":
    vision_compat.apply()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
