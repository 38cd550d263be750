"""Moved: `python -m tools.gpu_check` (beside the package, not in it)."""

import sys

sys.exit(
    "python -m autoround_exp.gpu_check has moved: "
    "run `python -m tools.gpu_check` from the repository root (make gpu-check)."
)
