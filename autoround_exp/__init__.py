"""autoround-exp: sweep AutoRound / RTN quantization experiments and score them.

Stdlib-only at import time: the evaluation child may run in another Python environment
and ``run.py`` must validate a config before anything heavy is imported.
"""

__version__ = "0.1.0"
