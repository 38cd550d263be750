"""The run record: what a finished (or failed) job stores, typed and versioned.

Assembled (``assemble``), written and read only here; the store, MLflow logging, the report
and the notebook read its fields. Records of the first layout (no ``schema_version``, the
experiment's facts only inside the resolved ``config``) are migrated when read.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from autoround_exp.config import METHOD_NAMES
from autoround_exp.fidelity import Fidelity

if TYPE_CHECKING:  # the validated config the record is assembled from (never imported at run time)
    from autoround_exp.config import Experiment

SCHEMA_VERSION = 3  # 3: calibration stored once (not also inside quantization)


def now() -> str:
    """The time a record stores: ISO 8601 to the millisecond, with the UTC offset."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def epoch_ms(stamp: str | None) -> int | None:
    """A record's time (this layout or the older whole-second ``+0000`` one) in epoch milliseconds."""
    if not stamp:
        return None
    return round(datetime.fromisoformat(stamp).timestamp() * 1000)


class _Strict(BaseModel):
    # A field the writer misspells fails at once, not in a report months later.
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    # What other programs report (lm-eval, vLLM's probe, the quantize child) may grow fields.
    model_config = ConfigDict(extra="allow")


class ModelRef(_Strict):
    name: str
    path: str
    display_name: str
    # The hub commit the weights came from (a hub id's revision resolved), None for a local folder.
    revision: str | None = None


class Calibration(_Open):
    source: str
    nsamples: int
    seqlen: int
    mode: str
    seed: int
    text_column: str | None = None
    texts_read: int | None = None
    token_sha256: str | None = None  # hash of the exact token ids (and image bytes) that tuned the model
    images: int = 0  # image+text calibration: one image per sample


class ChangedCodes(_Open):
    """The share of sampled weight codes the method (AutoRound's tuning, GPTQ's error
    compensation, AWQ's smoothing) rounded unlike round-to-nearest of the original weights."""

    measured: bool
    reason: str | None = None  # why not measured
    fraction: float | None = None
    codes: int | None = None
    layers: int | None = None
    reference: str | None = None


class Verification(_Open):
    """verify's findings on the saved checkpoint."""

    linear_layers: int
    quantized: int
    left_out: list[str] = Field(default_factory=list)
    scheme: str | None = None
    weights: dict[str, Any] = Field(default_factory=dict)
    format: str | None = None
    checkpoint_ignore: list[str] | None = None
    method: str | None = None  # whose codes changed_codes measured (autoround, gptq, awq, awq_gptq)
    iters: int | None = None
    changed_codes: ChangedCodes | None = None


class Quantization(_Open):
    """What the quantize stage made: the checkpoint and what it cost (the stage's own result)."""

    checkpoint: str
    oneshot_seconds: float  # calibration + tuning + compression, as upstream times it
    total_seconds: float  # with model load and save
    peak_memory_gb: float
    memory_kind: str  # cuda_max_allocated | cpu_max_rss
    device: str
    size_mb: float
    # the calibration used: in the checkpoint's quantization.json; the record keeps it once, as
    # its top-level ``calibration``
    calibration: Calibration | None = Field(default=None, exclude=True)
    recipe: str
    verification: Verification | None = None
    deterministic: bool = False


class Platform(_Open):
    """The serve environment's probe: versions and device of the process that scored."""

    lm_eval: str | None = None
    torch: str | None = None
    vllm: str | None = None
    transformers: str | None = None
    compressed_tensors: str | None = None
    cuda: bool = False
    device_name: str | None = None
    compute_capability: Any = None
    cpu_isa: list[str] = Field(default_factory=list)


class Bos(_Open):
    """Whether prompts begin with one BOS token: lm-eval's add_bos_token and the chat template's."""

    add_bos_token: bool | None = None
    bos_token: str | None = None
    template_writes_bos: bool | None = None
    double_bos: bool | None = None
    warning: str | None = None


class EvalSettings(_Strict):
    """What of the eval config decides which numbers may share a table."""

    num_fewshot: int
    limit: int | None = None
    add_bos_token: bool
    apply_chat_template: bool


class Evaluation(_Open):
    task: str
    backend: str
    backend_requested: str | None = None
    backend_reason: str | None = None
    note: str | None = None
    lm_eval_model: str
    device: str | None = None
    platform: Platform = Field(default_factory=Platform)
    kernels: list[str] = Field(default_factory=list)
    bos: Bos | None = None
    server_command: list[str] | None = None
    seconds: float | None = None
    task_versions: dict[str, Any] = Field(default_factory=dict)
    results_json: str | None = None
    command: list[str] | None = None

    @property
    def bos_warning(self) -> str | None:
        return self.bos.warning if self.bos else None


class MetricRow(_Strict):
    """One line of lm-eval's table."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None = None
    version: str | None = None
    n_shot: int | None = None
    n_samples: int | None = None

    @property
    def column(self) -> str:
        return f"{self.metric},{self.filter}"

    @property
    def mlflow_key(self) -> str:
        """lm-eval's ``exact_match,strict-match`` has a comma, which MLflow rejects."""
        return f"{self.task}/{self.metric}/{self.filter}"


class PerfSettings(_Strict):
    """The serving benchmark's workload as asked (``perf.*``): with the run's key, its identity."""

    num_prompts: int
    input_len: int | None = None
    output_len: int | None = None
    repeats: int
    warmups: int = 0
    request_rate: str
    seed: int

    @classmethod
    def of(cls, cfg) -> PerfSettings:
        return cls(**{k: getattr(cfg, k) for k in cls.model_fields} | {"request_rate": str(cfg.request_rate)})


class PerfMetric(_Strict):
    """One serving metric over the benchmark's repeats."""

    median: float
    spread: float  # max - min


class Perf(_Strict):
    """The serving cost of the run's checkpoint (``perf=throughput``), or why it was not measured.
    Each metric: median and spread (max - min) over the benchmark's repeats."""

    settings: PerfSettings
    measured: bool
    reason: str | None = None  # why not measured
    input_len: int | None = None  # the workload as run
    output_len: int | None = None
    workload: str | None = None  # where the lengths came from
    metrics: dict[str, PerfMetric] = Field(default_factory=dict)
    peak_memory_gb: float | None = None
    memory_kind: str | None = None  # server_rss (CPU) | gpu_memory_used (CUDA)
    backend: str | None = None
    seconds: float | None = None
    results: list[str] = Field(default_factory=list)  # vllm bench serve's own result JSONs

    def value(self, metric: str) -> float | None:
        m = self.metrics.get(metric)
        return m.median if m else None


class Tracking(_Strict):
    """Whether the run is in MLflow yet: ``pending`` runs are logged by ``tracking sync``."""

    status: Literal["logged", "pending", "disabled"] = "disabled"
    run_id: str | None = None
    error: str | None = None
    parent_run_id: str | None = None  # the MLflow run of the -m sweep that ran it (None: a single run)


class Stack(_Strict):
    """The software stack the run's children ran in (``stack=``; None: pinned)."""

    name: str
    digest: str  # sha256 of its resolved requirements, 16 hex
    moved: dict[str, str]  # what differs from the pinned constraints: name -> "pinned → stack"
    resolve_s: float
    build_s: float | None = None  # None: the environment was built before


class RunRecord(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    key: str
    quant_key: str
    sweep_id: str
    finished_at: str
    started_at: str | None = None  # when this run's work began (None: a record from before it was kept)
    # wall seconds of each stage as the harness timed it: quantize (the child, or 0 for a reused
    # checkpoint), evaluate (server and lm-eval), fidelity, perf; what MLflow gets as time/<stage>_s
    stages: dict[str, float] = Field(default_factory=dict)
    model: ModelRef
    scheme: str | None  # the scheme config's name (None: unquantized)
    scheme_preset: str | None  # llm-compressor's preset name, as tables show it (NVFP4, W4A16)
    method: str
    iters: int | None
    seed: int | None = None
    # the recipe quantized the vision tower too (model.quantize_vision): another config than
    # upstream's recipe with the same scheme and method
    vision_quantized: bool = False
    checkpoint: str
    checkpoint_name: str
    quantization: Quantization | None = None
    calibration: Calibration | None = None
    eval: Evaluation
    eval_settings: EvalSettings
    metrics: dict[str, float]
    table: list[MetricRow]
    lm_eval: dict  # lm-eval's own results block (make_table renders it)
    versions: dict[str, str | None]
    config: dict  # the whole resolved config, for people and MLflow params; code reads the fields
    tracking: Tracking = Field(default_factory=Tracking)
    perf: Perf | None = None  # serving cost, when perf=throughput measured it
    fidelity: Fidelity | None = None  # against the base (fidelity=kld); None: off, or the base itself
    stack: Stack | None = None  # None: stack=pinned, the project's own environments
    # what MLflow gets beside the record: lm-eval outputs, logs, checkpoint files
    artifacts: dict[str, list[str]] = Field(default_factory=dict)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.tracking.run_id

    def metric(self, column: str) -> MetricRow | None:
        return next((m for m in self.table if m.column == column), None)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


class FailureRecord(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    key: str
    quant_key: str
    sweep_id: str
    status: Literal["failed"] = "failed"
    started_at: str | None = None
    failed_at: str
    error: str
    logs: list[str]
    backend: str
    backend_reason: str | None = None
    config: dict
    tracking: Tracking = Field(default_factory=Tracking)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def config_label(scheme_preset: str | None, method: str, iters: int | None, vision_quantized: bool) -> str:
    """A config as the tables' rows and the console name it: base (unquantized), W4A16 RTN,
    NVFP4 AutoRound iters=200, ... + vision tower."""
    if method == "none":
        return "base (unquantized)"
    text = f"{scheme_preset} {METHOD_NAMES.get(method, method)}"
    if method in ("autoround", "autoround_native"):
        text += f" iters={iters}"
    return text + " + vision tower" if vision_quantized else text


def assemble(
    exp: Experiment,
    *,
    name: str,
    key: str,
    quant_key: str,
    sweep_id: str,
    started_at: str,
    stages: dict[str, float],
    checkpoint: str,
    quantization: Quantization | None,
    evaluation: Evaluation,
    table: list[MetricRow],
    metrics: dict[str, float],
    lm_eval: dict,
    versions: dict[str, str | None],
    artifacts: dict[str, list[str]],
    parent_run_id: str | None,
) -> RunRecord:
    """The record of a finished job, from its validated config and what its stages produced."""
    m = exp.model
    local = Path(m.path).expanduser().exists()
    ev = exp.eval
    return RunRecord(
        name=name,
        key=key,
        quant_key=quant_key,
        sweep_id=sweep_id,
        finished_at=now(),
        started_at=started_at,
        stages=stages,
        model=ModelRef(name=m.name, path=m.path, display_name=m.display_name, revision=None if local else m.revision),
        scheme=exp.scheme.name if exp.quantized else None,
        scheme_preset=exp.scheme.preset if exp.quantized else None,
        method=exp.method.name,
        iters=exp.method.iters if exp.tuned_by_autoround else None,
        seed=exp.seed,
        vision_quantized=exp.vision_quantized,
        checkpoint=checkpoint,
        checkpoint_name=exp.checkpoint_name,
        quantization=quantization,
        calibration=quantization.calibration if quantization else None,
        eval=evaluation,
        eval_settings=EvalSettings(
            num_fewshot=ev.num_fewshot,
            limit=ev.limit,
            add_bos_token=ev.add_bos_token,
            apply_chat_template=ev.apply_chat_template,
        ),
        metrics=metrics,
        table=table,
        lm_eval=lm_eval,
        versions=versions,
        config=exp.resolved,
        artifacts=artifacts,
        tracking=Tracking(parent_run_id=parent_run_id),
        stack=exp.stack_env.record() if exp.stack_env is not None else None,
    )


class RecordError(ValueError):
    """A stored record this version cannot read; the message says how to regenerate it."""


def migrate(data: dict) -> dict:
    """A record of any earlier layout in the current one."""
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"record {data.get('name')} has schema_version {version}, newer than this harness reads "
            f"({SCHEMA_VERSION}); update autoround-exp."
        )
    if version == 1:
        data = dict(data)
        config = data.get("config") or {}
        ev = config.get("eval") or {}
        data["scheme_preset"] = (config.get("scheme") or {}).get("preset") if data.get("scheme") else None
        data["eval_settings"] = {k: ev.get(k) for k in ("num_fewshot", "limit", "add_bos_token", "apply_chat_template")}
        run_id = data.pop("mlflow_run_id", None)
        data["tracking"] = {"status": "logged" if run_id else "disabled", "run_id": run_id}
        version = 2
    if version == 2:
        data = dict(data)
        if data.get("quantization"):
            data["quantization"] = {k: v for k, v in data["quantization"].items() if k != "calibration"}
    data["schema_version"] = SCHEMA_VERSION
    return data


def from_dict(data: dict) -> RunRecord:
    try:
        return RunRecord.model_validate(migrate(data))
    except RecordError:
        raise
    except Exception as e:
        raise RecordError(
            f"record {data.get('name')} ({data.get('key')}) does not read as a run record ({e}); "
            "delete it and re-run its job, or re-run with force=true."
        ) from e


def load(path: Path) -> RunRecord:
    try:
        return from_dict(json.loads(path.read_text()))
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from e


def load_any(path: Path) -> RunRecord | FailureRecord:
    """A stored record, finished (results/runs/) or failed (results/failed/)."""
    data = json.loads(path.read_text())
    if data.get("status") == "failed":
        return FailureRecord.model_validate(data)
    try:
        return from_dict(data)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from e
