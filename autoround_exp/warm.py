"""Start an evaluation child ahead of its input: the interpreter and lm-eval's imports (torch,
transformers, the model backend: seconds) happen while the checkpoint is still being quantized.

    python autoround_exp/warm.py <module> <import,import,...> -- <argv of python -m module>

It imports the listed modules (one that fails is left for the real run to meet), then waits for
one line on stdin: ``go`` runs ``python -m <module> <argv>`` in this process, exactly as that
command would; anything else, or stdin closing (the quantization failed), exits 0 having run
nothing. Standard library only: it starts in the serve environment's interpreter, by path.
"""

import importlib
import os
import runpy
import sys


def main() -> None:
    module, imports, sep, *argv = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: warm.py <module> <import,...> -- <argv>")
    sys.path[0] = os.getcwd()  # what `python -m` puts first, instead of this file's folder
    for name in filter(None, imports.split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: S112 - the run itself reports it
            continue
    if sys.stdin.readline().strip() != "go":
        return
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
