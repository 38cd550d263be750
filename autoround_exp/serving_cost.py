"""Serving-cost stage (``perf=throughput``): vLLM's own benchmark, ``vllm bench serve``,
against the harness's ``vllm serve`` of the checkpoint, with the accuracy run's engine settings.

One fixed workload per sweep: by default gsm8k-shaped, the prompt length being the median
token length of the prompts lm-eval built for this run (its few-shot prompts) and the output
length the task's generation limit; ``perf.input_len`` / ``perf.output_len`` override. The
benchmark runs ``perf.repeats`` times on one server; each metric is stored as the median and
the spread (max - min) of the repeats. Peak memory: the server's process group's resident
memory on CPU, the GPUs' used memory (nvidia-smi) on CUDA, sampled while it runs.

Where vLLM cannot serve the checkpoint on this platform the stage measures nothing and says
why: a number from another backend would not be the serving cost of vLLM.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from autoround_exp import child, vllm_server
from autoround_exp.backend import VLLM_BACKENDS
from autoround_exp.config import Experiment
from autoround_exp.record import Perf, PerfMetric, PerfSettings

LM_EVAL_MAX_GEN_TOKS = 256  # lm-eval's generation limit where the task sets none
# vllm bench serve's result keys, as the record names them
METRICS = {
    "output_tokens_per_s": "output_throughput",
    "requests_per_s": "request_throughput",
    "total_tokens_per_s": "total_token_throughput",
    "ttft_p50_ms": "p50_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "tpot_p50_ms": "p50_tpot_ms",
    "tpot_p99_ms": "p99_tpot_ms",
}


def not_measured(exp: Experiment) -> str | None:
    """Why this run's serving cost cannot be measured here, or None."""
    if exp.model.modality != "text":
        return "the serving benchmark sends text prompts; vision-language workloads are not measured yet"
    if exp.serve_choice.backend not in VLLM_BACKENDS:
        return f"scored by {exp.serve_choice.backend}, not vLLM ({exp.serve_choice.reason})"
    return None


def workload(exp: Experiment, checkpoint: str, samples_paths: list[str]) -> tuple[int, int, str]:
    """(input tokens, output tokens, where they came from)."""
    p = exp.perf
    if p.input_len and p.output_len:
        return p.input_len, p.output_len, "perf.input_len / perf.output_len"
    by_doc, limits = {}, set()  # one prompt per document: each filter's samples log repeats them
    for path in samples_paths:
        with open(path) as f:
            for i, line in enumerate(f):
                sample = json.loads(line)
                args = sample.get("arguments", {}).get("gen_args_0", {})
                if isinstance(args.get("arg_0"), str):
                    by_doc[sample.get("doc_id", f"{path}:{i}")] = args["arg_0"]
                if isinstance(args.get("arg_1"), dict) and args["arg_1"].get("max_gen_toks"):
                    limits.add(int(args["arg_1"]["max_gen_toks"]))
    prompts = list(by_doc.values())
    source = []
    input_len = p.input_len
    if not input_len:
        if not prompts:
            raise ValueError("perf: lm-eval's samples hold no prompts; set perf.input_len and perf.output_len")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=exp.model.trust_remote_code)
        input_len = int(statistics.median(len(tok(t)["input_ids"]) for t in prompts))
        source.append(f"input: median of {len(prompts)} lm-eval prompts")
    output_len = p.output_len or exp.eval.max_gen_toks or (max(limits) if limits else LM_EVAL_MAX_GEN_TOKS)
    if not p.output_len:
        source.append("output: the task's generation limit")
    return input_len, output_len, "; ".join(source) or "perf.input_len / perf.output_len"


class _PeakMemory:
    """The peak, over samples every ``every`` s, of the server group's RSS (CPU) or of the
    visible GPUs' used memory (CUDA)."""

    def __init__(self, pgid: int, cuda: bool, every: float = 0.25):
        self.pgid, self.cuda, self.every = pgid, cuda, every
        self.peak_gb, self._stop = 0.0, threading.Event()
        self.kind = "gpu_memory_used" if cuda else "server_rss"
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> float:
        if self.cuda:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            mib = [float(x) for x in out.stdout.split()] if out.returncode == 0 else []
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                mib = [mib[int(i)] for i in visible.split(",") if i.strip().isdigit() and int(i) < len(mib)]
            return sum(mib) / 1024
        page, total = os.sysconf("SC_PAGE_SIZE"), 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) == self.pgid:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        return total / 2**30

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_gb = max(self.peak_gb, self._sample())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_gb = max(self.peak_gb, self._sample())


BENCH_SERVE = Path(__file__).with_name("vllm_bench.py")


def bench_argv(exp: Experiment, url: str, checkpoint: str, input_len: int, output_len: int, out_dir: Path) -> list[str]:
    """``vllm bench serve`` run ``perf.repeats`` times in one process (vllm_bench.py): the
    CLI's import of vLLM costs more than a repeat of the tiny model's workload."""
    p = exp.perf
    argv = [exp.serve.python, str(BENCH_SERVE), str(p.repeats), "--backend", "vllm"]
    argv += ["--base-url", url, "--model", exp.checkpoint_name, "--tokenizer", checkpoint]
    argv += ["--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len)]
    argv += ["--num-prompts", str(p.num_prompts), "--request-rate", str(p.request_rate), "--seed", str(p.seed)]
    argv += ["--num-warmups", str(p.warmups)]
    argv += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    argv += ["--save-result", "--result-dir", str(out_dir)]
    if exp.model.trust_remote_code:
        argv += ["--trust-remote-code"]
    return argv


def summarize(results: list[dict]) -> dict[str, PerfMetric]:
    """Median and spread (max - min) of each metric over the repeats."""
    out = {}
    for name, key in METRICS.items():
        values = [float(r[key]) for r in results if r.get(key) is not None]
        if values:
            out[name] = PerfMetric(median=statistics.median(values), spread=max(values) - min(values))
    return out


def measure(exp: Experiment, checkpoint: str, samples_paths: list[str], out_dir: Path, log_dir: Path) -> Perf:
    """Run the benchmark, or say why it cannot run here."""
    from autoround_exp.evaluate import child_env, server_argv

    settings = PerfSettings.of(exp.perf)
    reason = not_measured(exp)
    if reason:
        print(f"[perf] not measured: {reason}", flush=True)
        return Perf(settings=settings, measured=False, reason=reason)
    input_len, output_len, source = workload(exp, checkpoint, samples_paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(exp)
    port = vllm_server.free_port()
    cuda = bool(exp.serve_choice.platform.get("cuda"))
    t0 = time.perf_counter()
    with vllm_server.running(
        server_argv(exp, checkpoint, port), port, log_dir / "perf_server.log", exp.serve.startup_timeout_s, env
    ) as (url, pgid):
        base = url.removesuffix("/v1")
        with _PeakMemory(pgid, cuda) as memory:
            for old in out_dir.glob("bench_*.json"):  # a re-measurement leaves none of the last one's
                old.unlink()
            argv = bench_argv(exp, base, checkpoint, input_len, output_len, out_dir)
            what = f"vllm bench serve (x{exp.perf.repeats})"
            child.run(argv, log_dir / "perf_bench.log", exp.perf.timeout_s, what, env=env, stage="perf")
            results = [json.loads((out_dir / f"bench_{i}.json").read_text()) for i in range(exp.perf.repeats)]
    failed = sum(int(r.get("failed") or 0) for r in results)
    if failed:
        raise RuntimeError(f"vllm bench serve: {failed} requests failed; log: {log_dir / 'perf_server.log'}")
    perf = Perf(
        settings=settings,
        measured=True,
        input_len=input_len,
        output_len=output_len,
        workload=source,
        metrics=summarize(results),
        peak_memory_gb=round(memory.peak_gb, 3),
        memory_kind=memory.kind,
        backend="vllm_server",
        seconds=round(time.perf_counter() - t0, 1),
        results=[str(out_dir / f"bench_{i}.json") for i in range(len(results))],
    )
    tps = perf.metrics.get("output_tokens_per_s") or PerfMetric(median=0, spread=0)
    print(
        f"[perf] {tps.median:.1f} output tok/s (spread {tps.spread:.1f}) over "
        f"{exp.perf.repeats} x {exp.perf.num_prompts} requests of {input_len}+{output_len} tokens; "
        f"peak {perf.memory_kind} {perf.peak_memory_gb:.2f} GB",
        flush=True,
    )
    return perf
