"""``vllm bench serve`` repeated on one server, in one process: vLLM's own benchmark (its
``vllm.benchmarks.serve``, what the CLI runs), imported once instead of once per repeat.

    python autoround_exp/vllm_bench.py <repeats> <vllm bench serve arguments ...>

Repeat ``i`` writes ``<--result-dir>/bench_<i>.json``, as ``--result-filename`` would. Each
repeat is the CLI's full run, its warm-up requests included. Standard library and vLLM only: it
starts in the serve environment's interpreter, by path.
"""

import sys


def main() -> None:
    repeats, argv = int(sys.argv[1]), sys.argv[2:]
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    for i in range(repeats):
        print(f"[vllm_bench] repeat {i + 1}/{repeats}", flush=True)
        args = parser.parse_args(argv)  # afresh: vLLM's main rewrites some of its arguments
        args.result_filename = f"bench_{i}.json"
        bench(args)


if __name__ == "__main__":
    main()
