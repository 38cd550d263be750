"""The door's config checks: one checker per config group, then ``validate`` turns a composed
config into an ``Experiment``. Pure functions of the config (and the files it names): no
other process is asked here (``preflight`` does that), and nothing heavy is imported."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from autoround_exp.config import (
    AUTOROUND_METHODS,
    BACKENDS,
    CALIBRATION_MODES,
    DATA_FORMATS,
    DEVICES,
    LOADERS,
    METHODS,
    MODALITIES,
    README_SCOPES,
    CalibrationConfig,
    ConfigError,
    EvalConfig,
    Experiment,
    ExperimentConfig,
    FidelityConfig,
    LocalTaskData,
    MethodConfig,
    ModelConfig,
    PerfConfig,
    ReportConfig,
    SchemeConfig,
    ServeConfig,
    TrackingConfig,
    data_files,
    ignores,
    redact_uri,
    resolved_for,
)
from autoround_exp.fidelity import charts_problem, text_problem
from autoround_exp.stack import check_stack


def choices(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value} is unknown; choose one of {', '.join(map(str, allowed))}.")


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks")


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


def check_fidelity(f: FidelityConfig, model: ModelConfig) -> None:
    if not f.enabled:
        return
    for name, low in (("seqlen", 2), ("max_tokens", 2), ("top_k", 1)):
        if getattr(f, name) < low:
            raise ConfigError(f"fidelity.{name}={getattr(f, name)} is invalid; set an integer >= {low}.")
    if f.max_tokens < f.seqlen:
        raise ConfigError(
            f"fidelity.max_tokens={f.max_tokens} is below fidelity.seqlen={f.seqlen}: not one chunk fits; "
            "raise max_tokens or lower seqlen."
        )
    source = f.data_path or model.fidelity_text
    if source is None:  # not measured, and the record says why
        return
    problem = text_problem(Path(source).expanduser(), f.seqlen)
    if problem is not None:
        key = "fidelity.data_path" if f.data_path else "model.fidelity_text"
        raise ConfigError(
            f"{key}={source}: {problem}; set fidelity.data_path to a .txt or .jsonl text of at least one "
            "chunk, or fidelity=none."
        )
    check_fidelity_images(f, model)


def check_fidelity_images(f: FidelityConfig, model: ModelConfig) -> None:
    """Chart questions with their images: a vision-language model's, in ChartQA's format."""
    if f.max_images < 1:
        raise ConfigError(f"fidelity.max_images={f.max_images} is invalid; set an integer >= 1.")
    if f.images_path and model.modality == "text":
        raise ConfigError(
            f"fidelity.images_path={f.images_path}: model={model.name} is a text model and reads no image; "
            "leave fidelity.images_path unset, or choose a vision-language model."
        )
    source = f.images_path or (model.fidelity_images if model.modality != "text" else None)
    if source is None:
        return
    problem = charts_problem(Path(source).expanduser())
    if problem is not None:
        key = "fidelity.images_path" if f.images_path else "model.fidelity_images"
        raise ConfigError(
            f"{key}={source}: {problem}; set fidelity.images_path to a ChartQA-format .parquet (image, query, "
            "label), model.fidelity_images=null to measure on text only, or fidelity=none."
        )


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
    choices("report.readme_scope", r.readme_scope, README_SCOPES)
    if r.readme_max_lines < 20:
        raise ConfigError(
            f"report.readme_max_lines={r.readme_max_lines} is too small for one table; set 20 or more (default 160)."
        )


def check_method(typed: ExperimentConfig) -> None:
    q, s, m = typed.method, typed.scheme, typed.model
    if not isinstance(typed.iters, int) or typed.iters < 0:
        raise ConfigError(f"iters={typed.iters} is invalid; set iters to an integer >= 0 (e.g. iters=0 or iters=200).")
    choices("method", q.name, METHODS)
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
    if q.name in ("gptq", "awq_gptq"):
        check_gptq(q)
    if q.name in ("awq", "awq_gptq"):
        check_awq(q, s)
    if q.name == "autoround_native" and m.modality == "vision-language":
        raise ConfigError(
            f"method=autoround_native runs text models only (model={m.name} is vision-language); "
            "use method=autoround, llm-compressor's AutoRoundModifier with upstream's Qwen3-VL recipe."
        )


# What AWQ's smoothing cannot serve, by scheme preset, and why
AWQ_REFUSED = {
    "W8A8": "W8A8 quantizes activations to int8, and AWQ's scale search scores the rounding of the "
    "weights only; llm-compressor's W8A8 recipe smooths with SmoothQuantModifier, then GPTQ. "
    "Use method=gptq or method=rtn for W8A8",
}
# AWQModifier's grid search needs at least this many points per duo_scaling mode
AWQ_MIN_GRID = {"false": 2, "true": 3, "both": 4}


def check_gptq(q: MethodConfig) -> None:
    if q.block_size < 1:
        raise ConfigError(f"method.block_size={q.block_size} is invalid; set GPTQ's columns per block, e.g. 128.")
    if not 0 < q.dampening_frac < 1:
        raise ConfigError(
            f"method.dampening_frac={q.dampening_frac} is invalid; set a fraction in (0, 1) of the Hessian's "
            "mean diagonal, e.g. 0.01."
        )
    if q.actorder not in (None, "static", "weight"):
        raise ConfigError(
            f"method.actorder={q.actorder} is not supported: compressed-tensors removed group and dynamic "
            "activation ordering; set method.actorder=static (columns ordered while quantizing) or null."
        )


def check_awq(q: MethodConfig, s: SchemeConfig) -> None:
    if s.preset in AWQ_REFUSED:
        raise ConfigError(f"method={q.name} with scheme={s.name} is not supported: {AWQ_REFUSED[s.preset]}.")
    duo = q.duo_scaling  # lower case: MethodConfig makes it so
    choices("method.duo_scaling", duo, tuple(AWQ_MIN_GRID))
    if q.n_grid < AWQ_MIN_GRID[duo]:
        raise ConfigError(
            f"method.n_grid={q.n_grid} is too small for method.duo_scaling={duo}; set {AWQ_MIN_GRID[duo]} "
            "or more (AWQ's default is 20)."
        )
    check_awq_mappings(q.mappings)


AWQ_MAPPING_FORM = '[{smooth_layer: "re:.*input_layernorm$", balance_layers: ["re:.*q_proj$", "re:.*k_proj$"]}, ...]'


def check_awq_mappings(mappings: list | None) -> None:
    if mappings is None:
        return
    for i, m in enumerate(mappings):
        ok = (
            isinstance(m, dict)
            and set(m) == {"smooth_layer", "balance_layers"}
            and isinstance(m["smooth_layer"], str)
            and isinstance(m["balance_layers"], list)
            and m["balance_layers"]
            and all(isinstance(b, str) for b in m["balance_layers"])
        )
        if not ok:
            raise ConfigError(
                f"method.mappings[{i}]={m} is invalid; each mapping is a smooth_layer and its balance_layers "
                f"(names or re: patterns), as {AWQ_MAPPING_FORM}; or set method.mappings=null for "
                "llm-compressor's own mappings of the architecture."
            )
    if not mappings:
        raise ConfigError("method.mappings=[] gives AWQ nothing to smooth; set null for llm-compressor's own mappings.")


def check_scheme(s: SchemeConfig, q: MethodConfig, m: ModelConfig) -> None:
    if q.name != "none" and s.group_size:
        bad = [k for k in m.linear_in_features if k % s.group_size]
        if bad:
            raise ConfigError(
                f"scheme={s.name} uses groups of {s.group_size}, which do not divide the in_features {bad} of "
                f"model={m.name}; choose a scheme whose group size divides {m.linear_in_features}."
            )


def check_model(m: ModelConfig, q: MethodConfig) -> None:
    choices("model.modality", m.modality, MODALITIES)
    choices("model.quantize_device", m.quantize_device, DEVICES)
    choices("model.loader", m.loader, LOADERS)
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
    if _is_local(m.path) and not Path(m.path).expanduser().is_dir():
        raise ConfigError(f"model.path={m.path} does not exist; set model.path to a model directory or a hub id.")
    e = m.vllm
    if e.tensor_parallel_size < 1 or e.data_parallel_size < 1:
        raise ConfigError("model.vllm.tensor_parallel_size and data_parallel_size must be >= 1.")
    if not 0 < e.gpu_memory_utilization <= 1:
        raise ConfigError(f"model.vllm.gpu_memory_utilization={e.gpu_memory_utilization} must be in (0, 1].")


def check_eval(ev: EvalConfig, m: ModelConfig) -> LocalTaskData | None:
    """The eval group's checks; the local data set the task reads, if any."""
    if ev.modality == "vision-language" and m.modality != "vision-language":
        raise ConfigError(f"eval={ev.name} needs a vision-language model; model={m.name} is text-only.")
    if ev.limit is not None and ev.limit <= 0:
        raise ConfigError(f"eval.limit={ev.limit} is invalid; set a positive integer, or null for the whole test set.")
    if ev.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot={ev.num_fewshot} is invalid; set an integer >= 0.")
    if ev.batch_size != "auto" and not str(ev.batch_size).isdigit():
        raise ConfigError(f"eval.batch_size={ev.batch_size} is invalid; set auto or a positive integer.")
    if ev.timeout_s <= 0:
        raise ConfigError("eval.timeout_s must be a positive number of seconds.")
    eval_data = LocalTaskData(ev.data_path, ev.data_name) if ev.data_path else m.eval_data.get(ev.task)
    choices("eval.data_format", ev.data_format, DATA_FORMATS)
    if eval_data is not None:
        files = data_files(ev, eval_data.path)
        for path in files.values():
            if not Path(path).is_file():
                raise ConfigError(
                    f"eval data {eval_data.path} has no {Path(path).name}; set eval.data_path to a folder with "
                    f"{', '.join(Path(p).name for p in files.values())} in the task's format."
                )
    return eval_data


def calibration_of(typed: ExperimentConfig) -> CalibrationConfig:
    """The model's calibration with the run's overrides (and its seed), checked."""
    m, q = typed.model, typed.method
    calib = CalibrationConfig(
        **{**vars(m.calibration), **{k: v for k, v in vars(typed.calibration).items() if v is not None}}
    )
    if typed.seed is not None:
        if not isinstance(typed.seed, int) or typed.seed < 0:
            raise ConfigError(f"seed={typed.seed} is invalid; set an integer >= 0 (e.g. -m seed=0,1,2) or null.")
        calib = replace(calib, seed=typed.seed)
    choices("calibration.mode", calib.mode, CALIBRATION_MODES)
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
    return calib


def check_serve(sv: ServeConfig) -> None:
    choices("serve.backend", sv.backend, BACKENDS)
    choices("serve.device", sv.device, DEVICES)
    if sv.python is not None and not Path(sv.python).is_file():
        raise ConfigError(f"serve.python={sv.python} does not exist; set the serve environment's python, or null.")
    if sv.startup_timeout_s <= 0:
        raise ConfigError("serve.startup_timeout_s must be a positive number of seconds.")


def check_gpus(gpus: list[int] | None) -> None:
    if gpus is not None and (not gpus or any(g < 0 for g in gpus)):
        raise ConfigError(f"gpus={gpus} is invalid; list GPU indices, e.g. gpus=[0,1,2,3], or null for all.")


def schema_keys(schema: type) -> dict[str, type | None]:
    """The keys of a config dataclass, each with its dataclass type where it has one."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if typing.get_origin(hint) in (dict, list, tuple):  # free keys (e.g. recovery_thresholds)
            out[f.name] = None
            continue
        kinds = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        out[f.name] = kinds[0] if kinds else None
    return out


def check_known_keys(node: Any, schema: type = ExperimentConfig, prefix: str = "") -> None:
    """Every key of the composed config is one the schema knows: a key added with Hydra's ``+``
    (``+iter=50``, a typo for ``iters``) would otherwise be carried along and silently ignored."""
    known = schema_keys(schema)
    for key in node:
        if prefix == "" and key == "hydra":
            continue
        if key not in known:
            path = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"the keys there are {', '.join(known)}."
            raise ConfigError(f"{path} is not a config key: +{path}=… adds it, and nothing reads it; {hint}")
        child = node[key]
        if known[key] is not None and isinstance(child, DictConfig):
            check_known_keys(child, known[key], f"{prefix}{key}.")


def validate(cfg: DictConfig) -> Experiment:
    """Turn a composed config into an ``Experiment`` or raise ``ConfigError``: the checks of
    the config alone, one per group, in well under a second. What needs other processes (the
    serve environment, the tracking server, the hub, the GPU) is ``preflight.validate``'s."""
    check_known_keys(cfg)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        typed: ExperimentConfig = OmegaConf.to_object(cfg)
    except Exception as e:  # omegaconf's own errors already name the key
        raise ConfigError(str(e)) from e

    check_method(typed)
    check_serve(typed.serve)
    check_model(typed.model, typed.method)
    check_scheme(typed.scheme, typed.method, typed.model)
    eval_data = check_eval(typed.eval, typed.model)
    calib = calibration_of(typed)
    check_perf(typed.perf)
    check_fidelity(typed.fidelity, typed.model)
    check_report(typed.report)
    check_stack(typed.stack)
    check_gpus(typed.gpus)
    if typed.tracking.enabled:
        check_tracking(typed.tracking)
    resolved["tracking"]["uri"] = redact_uri(typed.tracking.uri)  # what is logged and stored
    resolved = resolved_for(resolved, typed.method)
    return Experiment(
        model=typed.model,
        scheme=typed.scheme,
        method=typed.method,
        eval=typed.eval,
        serve=typed.serve,
        tracking=typed.tracking,
        paths=typed.paths,
        calibration=calib,
        eval_data=eval_data,
        baselines=typed.baselines,
        force=typed.force,
        resolved=resolved,
        seed=typed.seed,
        perf=typed.perf,
        fidelity=typed.fidelity,
        stack=typed.stack,
    )
