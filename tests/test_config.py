"""Every config file composes and validates; bad values fail at the door with a message
that names the key and what to set."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from autoround_exp.config import ConfigError
from autoround_exp.preflight import validate
from autoround_exp.store import quant_identity
from tests.support import CONF, ROOT, compose_cfg

GROUPS = ["model", "scheme", "method", "eval", "serve", "tracking", "launcher", "report"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "scheme" and option in ("fp8_dynamic", "w8a8"):
        overrides.append("method=rtn")  # AutoRoundModifier does not tune these
    if group == "eval" and option == "chartqa":
        overrides.append("model=qwen3_vl_8b_instruct")  # chartqa needs a vision-language model
    if group == "serve" and option.startswith("vllm"):
        overrides += ["scheme=w8a8", "method=rtn"]  # a scheme vLLM runs on CPU and GPU alike
    cfg = compose_cfg(overrides)
    # nothing listens on tracking=server's default port here: its door check is test_tracking's
    exp = validate(cfg, serve_env=not (group == "tracking" and option == "server"))
    chosen = OmegaConf.load(CONF / group / f"{option}.yaml")
    if group in ("model", "scheme", "method", "eval", "stack"):
        assert getattr(exp, group).name == option
    elif group == "serve":
        assert exp.serve_choice.requested == chosen.backend == option
        assert exp.serve.backend == option if option != "auto" else exp.serve.backend in ("vllm", "hf")
    elif group == "tracking":
        assert (exp.tracking.uri, exp.tracking.artifact_root) == (chosen.uri, chosen.artifact_root)
    elif group == "report":
        assert OmegaConf.to_container(cfg.report) == OmegaConf.to_container(chosen)
    else:
        launcher = compose_cfg(overrides, hydra=True).hydra.launcher._target_
        expected = {
            "local": "BasicLauncher",
            "submitit_local": "LocalLauncher",
            "submitit_local_gpus": "LocalLauncher",
            "submitit_slurm": "SlurmLauncher",
        }
        assert launcher.endswith(expected[option])


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
def test_every_sweep_composes_and_validates(sweep):
    validate(compose_cfg([f"+sweep={sweep}"]))
    params = compose_cfg([f"+sweep={sweep}"], hydra=True).hydra.sweeper.params
    assert params, f"sweeps/{sweep}.yaml sweeps nothing"
    for key, values in params.items():  # each swept value composes and validates too
        for value in str(values).split(","):
            validate(compose_cfg([f"+sweep={sweep}", f"{key}={value}"]))


def test_config_files_say_which_command_uses_them():
    files = [*CONF.rglob("*.yaml"), *(ROOT / "sweeps").glob("*.yaml")]
    for path in files:
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
        assert lines[0].startswith(("# python run.py", "# python -m autoround_exp.")), path


def test_upstream_sweep_is_upstream_recipe():
    exp = validate(compose_cfg(["+sweep=upstream_llama3_1_8b_nvfp4", "iters=200"]))
    assert exp.model.path == "meta-llama/Llama-3.1-8B-Instruct"
    assert exp.scheme.preset == "NVFP4" and exp.model.ignore == ["lm_head"]
    assert exp.method.name == "autoround" and exp.method.iters == 200
    assert (exp.calibration.nsamples, exp.calibration.seqlen) == (128, 2048)
    assert exp.eval.task == "gsm8k" and exp.eval.num_fewshot == 5 and exp.eval.add_bos_token
    assert exp.eval_data is None  # the real gsm8k from the hub, not the tiny model's data
    assert exp.checkpoint_name == "Meta-Llama-3.1-8B-Instruct-NVFP4-AutoRound"


def test_cli_knobs_reach_the_experiment():
    exp = validate(
        compose_cfg(
            [
                "iters=7",
                "method.lr=0.001",
                "method.batch_size=4",
                "method.enable_torch_compile=false",
                "method.disable_opt_rtn=true",
                "calibration.nsamples=16",
                "calibration.seqlen=128",
                "scheme=w4a16",
            ]
        )
    )
    assert (exp.method.iters, exp.method.lr, exp.method.batch_size) == (7, 0.001, 4)
    assert exp.method.enable_torch_compile is False and exp.method.disable_opt_rtn is True
    assert (exp.calibration.nsamples, exp.calibration.seqlen) == (16, 128)
    assert exp.calibration.source.endswith("calib.jsonl")  # the model's default survives
    assert exp.checkpoint_name == "TinyLlama-Arith-W4A16-G128-AutoRound"


BAD = [
    (["iters=-1"], "iters=-1"),
    (["eval.limit=0"], "eval.limit=0"),
    (["scheme=w8a8"], "scheme=w8a8 cannot be tuned by AutoRoundModifier"),
    (["scheme=w8a8", "method=autoround_native"], "scheme=w8a8 cannot be tuned"),
    (["model=tiny_qwen3_vl", "method=autoround_native"], "method=autoround_native runs text models only"),
    (["scheme=w4a16", "model.linear_in_features=[4096,100]"], "do not divide the in_features [100]"),
    (["model.path=/nonexistent/model"], "model.path=/nonexistent/model does not exist"),
    (["calibration.source=/nonexistent/calib.jsonl"], "calibration.source=/nonexistent/calib.jsonl does not exist"),
    (["calibration.mode=shuffle"], "calibration.mode=shuffle is unknown; choose one of truncate, pack"),
    (["calibration.nsamples=0"], "calibration.nsamples=0"),
    (["serve.backend=tgi"], "serve.backend=tgi is unknown; choose one of"),
    (["serve.python=/nonexistent/python"], "serve.python=/nonexistent/python does not exist"),
    (["eval.data_path=/nonexistent"], "eval data /nonexistent has no train.jsonl"),
    (["eval.modality=vision-language"], "needs a vision-language model"),
    (["eval.batch_size=big"], "eval.batch_size=big"),
    (["method.lr=-1"], "method.lr=-1"),
    (["eval=chartqa"], "eval=chartqa needs a vision-language model; model=tiny_llama is text-only"),
    (["model=qwen3_vl_8b_instruct", "model.ignore=[lm_head]"], "would quantize the vision tower"),
    (["model=qwen3_vl_8b_instruct", "model.vision_linear=null"], "set model.vision_linear"),
    (["model=tiny_qwen3_vl", "model.ignore=[re:.*lm_head]"], "or set model.quantize_vision=true"),
    (["model=tiny_qwen3_vl", "model.quantize_vision=true"], "drop its pattern, e.g. model.ignore="),
    (["model.quantize_vision=true"], "model.quantize_vision=true needs a vision-language model"),
    (["calibration.source=/data/charts.parquet"], "is image+text (a ChartQA-format parquet); model=tiny_llama is"),
    (["seed=-1"], "seed=-1 is invalid; set an integer >= 0"),
    (["report.recovery_threshold=1.5"], "report.recovery_threshold=1.5 is invalid; set a recovery fraction in (0, 1]"),
    (["report.recovery_threshold=0"], "report.recovery_threshold=0.0 is invalid"),
    (["+report.recovery_thresholds.strict=0.9"], "name a metric as <metric>/<filter>"),
    (["report.alpha=1"], "report.alpha=1.0 is invalid"),
    (["tracking.uri=mlflow.db"], "tracking.uri=mlflow.db is not a tracking URI MLflow takes; use sqlite:///mlflow.db"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_rejected_with_what_to_set(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    assert message in str(err.value)


def test_quantizing_the_vision_tower_on_purpose_is_named_as_such():
    base = ["model=tiny_qwen3_vl", "eval=chartqa", "scheme=nvfp4", "method=rtn"]
    upstream = validate(compose_cfg(base))
    vision = validate(compose_cfg([*base, "model.quantize_vision=true", "model.ignore=[re:.*lm_head]"]))
    assert not upstream.vision_quantized and vision.vision_quantized
    assert vision.checkpoint_name == upstream.checkpoint_name + "-VisionQuantized"
    assert quant_identity(vision) != quant_identity(upstream)
    unquantized = validate(
        compose_cfg([*base[:2], "method=none", "model.quantize_vision=true", "model.ignore=[re:.*lm_head]"])
    )
    assert not unquantized.vision_quantized  # the base model quantizes nothing


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["scheme=nvfp5"])
    for choice in ("nvfp4", "w4a16", "mxfp4"):
        assert choice in str(err.value)


def test_non_integer_iters_is_rejected_by_the_schema():
    with pytest.raises(Exception) as err:
        compose_cfg(["iters=abc"])
    assert isinstance(err.value.__cause__, ValidationError)
    assert "iters" in str(err.value.__cause__)


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="itres"):
        compose_cfg(["method.itres=3"])


@pytest.mark.parametrize(
    "module,ignore,ignored",
    [
        ("model.visual.blocks.0.attn.qkv", ["re:.*lm_head", "re:.*visual.*"], True),
        ("model.visual.blocks.0.attn.qkv", ["lm_head"], False),
        ("lm_head", ["lm_head"], True),
        ("model.language_model.layers.0.mlp.down_proj", ["re:.*visual.*", "lm_head"], False),
        ("model.visual.merger.linear_fc1", ["visual.merger.linear_fc1"], True),
    ],
)
def test_ignore_patterns_as_llm_compressor_reads_them(module, ignore, ignored):
    from autoround_exp.config import ignores

    assert ignores(module, ignore) is ignored


def test_credentials_in_the_tracking_uri_are_never_logged_or_stored():
    # the config alone (no server there to ask); the door check's own message is masked too
    exp = validate(compose_cfg(["tracking=server", "tracking.uri=https://alice:s3cret@mlflow.example.org"]), False)
    assert exp.tracking.uri == "https://alice:s3cret@mlflow.example.org"  # used to connect
    assert exp.resolved["tracking"]["uri"] == "https://***@mlflow.example.org"  # logged as params, stored
    assert "s3cret" not in str(exp.resolved)
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["tracking.uri=ftp://bob:pw@host/x"]))
    assert "pw" not in str(err.value)
    with pytest.raises(ConfigError, match=r"http://\*\*\*@127.0.0.1:9 does not answer") as err:
        validate(compose_cfg(["tracking=server", "tracking.uri=http://alice:s3cret@127.0.0.1:9"]))
    assert "s3cret" not in str(err.value)


def test_slurm_launcher_preset_composes_to_a_gpu_job_array():
    cfg = compose_cfg(["launcher=submitit_slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.autoround_exp_launcher.SlurmLauncher"  # the waiting one
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 720 and launcher.array_parallelism == 8
    assert validate(compose_cfg(["launcher=submitit_slurm"])).model.name == "tiny_llama"


def test_submitit_local_preset_runs_jobs_as_processes():
    cfg = compose_cfg(["launcher=submitit_local"], hydra=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert cfg.hydra.launcher.gpus_per_node == 0


def test_jobs_take_turns_on_the_gpus_one_each():
    from autoround_exp.sweep import gpu_of_job

    assert [gpu_of_job(k, [0, 1, 2]) for k in range(5)] == ["0", "1", "2", "0", "1"]
    assert gpu_of_job(3, None) is None
    cfg = compose_cfg(["launcher=submitit_local_gpus", "gpus=[2,3]"], hydra=True)
    assert cfg.gpus == [2, 3] and cfg.hydra.sweeper.max_batch_size == 2 and cfg.hydra.launcher.gpus_per_node == 0
    with pytest.raises(ConfigError, match="gpus="):
        validate(compose_cfg(["gpus=[]"]), serve_env=False)


def test_more_jobs_at_once_than_gpus_is_refused_at_the_sweeps_door(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, str(ROOT / "run.py"), "-m", "launcher=submitit_local_gpus", "gpus=[0,1]", "iters=0,1,2"]
    argv += ["hydra.sweeper.max_batch_size=3", f"paths.work={tmp_path}", f"paths.results={tmp_path / 'r'}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "set hydra.sweeper.max_batch_size=2" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_vl"])
def test_an_embedded_models_yaml_lists_the_in_features_of_its_linear_layers(model):
    """linear_in_features is what the group-size check at the door reads: it must be the
    shipped weights' own (the 2-D weights, embeddings aside)."""
    from safetensors import safe_open

    from autoround_exp.assets import asset

    cfg = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    with safe_open(str(asset(model) + "/model.safetensors"), "pt") as f:
        widths = {
            f.get_slice(k).get_shape()[1]
            for k in f.keys()
            if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2 and "embed" not in k
        }
    assert sorted(widths) == sorted(cfg.linear_in_features)


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("+iter=50", "did you mean iters?"),
        ("+method.itres=3", "did you mean method.iters?"),
        ("+report.readme_scop=all", "did you mean report.readme_scope?"),
    ],
)
def test_a_key_the_schema_does_not_know_is_refused_even_with_plus(override, hint):
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key} is not a config key")) as err:
        validate(compose_cfg([override]), serve_env=False)
    assert hint in str(err.value)


def test_run_py_refuses_an_unknown_key_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "+iter=50", f"paths.results={tmp_path}/r", f"paths.work={tmp_path}/w"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "iter is not a config key" in proc.stderr and "did you mean iters?" in proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
