"""Moved: `python -m tools.tiny.build_qwen3_vl` (beside the package, not in it)."""

import sys

sys.exit(
    "python -m autoround_exp.tiny.build_qwen3_vl has moved: "
    "run `python -m tools.tiny.build_qwen3_vl` from the repository root."
)
