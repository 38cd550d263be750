"""Reports from finished runs: lm-eval tables, recovery, paired tests, README, plots.

Reads what ``run.py`` stored (``results/``) or logged (MLflow); never re-runs anything.
"""
