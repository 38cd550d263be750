"""Moved: `python -m tools.overhead_bench` (beside the package, not in it)."""

import sys

sys.exit(
    "python -m autoround_exp.benchmark has moved: "
    "run `python -m tools.overhead_bench` from the repository root (make bench)."
)
