"""Moved: `python -m tools.ui_check` (beside the package, not in it)."""

import sys

sys.exit(
    "python -m autoround_exp.ui_check has moved: "
    "run `python -m tools.ui_check` from the repository root (make ui-check)."
)
