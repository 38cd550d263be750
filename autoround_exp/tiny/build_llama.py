"""Moved: `python -m tools.tiny.build_llama` (beside the package, not in it)."""

import sys

sys.exit(
    "python -m autoround_exp.tiny.build_llama has moved: "
    "run `python -m tools.tiny.build_llama` from the repository root."
)
