"""Quantize stage: llm-compressor ``oneshot`` with ``AutoRoundModifier`` or
``QuantizationModifier`` (RTN), saved as a compressed-tensors checkpoint.

The parent (``quantize``) only writes a JSON request and waits; the work happens in a
child process (``python -m autoround_exp.quantize REQUEST``) so that memory is returned,
peak memory is the job's own, and a crash cannot take the sweep down with it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from autoround_exp import child, verify
from autoround_exp.config import (
    AUTOROUND_METHODS,
    CALIBRATED_METHODS,
    MODIFIER_METHODS,
    ConfigError,
    Experiment,
    ignores,
)
from autoround_exp.record import Quantization
from autoround_exp.stack import child_env as stack_child_env

RESULT_FILE = "quantization.json"
ERROR_PREFIX = "autoround-exp: "
CALIBRATION_FILE = "calibration_tokens.json"


def load_result(checkpoint: Path) -> Quantization:
    """The checkpoint's quantization.json, as the stage's result (the record's own model)."""
    return Quantization.model_validate_json((checkpoint / RESULT_FILE).read_text())


def request(exp: Experiment, out_dir: Path) -> dict:
    """Everything the child needs, as plain JSON."""
    m, s, q = exp.model, exp.scheme, exp.method
    use_calibration = q.name in CALIBRATED_METHODS or s.calibrate_rtn
    return {
        "model": {
            "path": m.path,
            "revision": m.revision,
            "dtype": m.dtype,
            "trust_remote_code": m.trust_remote_code,
            "loader": m.loader,
        },
        "method": asdict(q),
        "scheme": {"preset": s.preset, "name": s.name},
        "ignore": list(m.ignore),
        "calibration": asdict(exp.calibration) if use_calibration else None,
        "seed": exp.seed or 0,
        "out_dir": str(out_dir),
    }


def quantize(exp: Experiment, out_dir: Path, log_path: Path, timeout_s: float = 24 * 3600) -> Quantization:
    """Quantize in a child process; the checkpoint appears at ``out_dir`` only when complete."""
    if (out_dir / RESULT_FILE).is_file():
        print(f"[reuse] checkpoint {out_dir}", flush=True)
        return load_result(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    req_path = out_dir.parent / f"{out_dir.name}.request.json"
    req_path.write_text(json.dumps(request(exp, out_dir), indent=2))
    python = exp.stack_env.python if exp.stack_env is not None else sys.executable
    argv = [python, "-m", "autoround_exp.quantize", str(req_path)]
    env = stack_child_env(exp.stack_env) or {}
    if exp.model.quantize_device == "cpu":  # the child sees no GPU, whatever the machine has
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        child.run(argv, log_path, timeout_s, "quantization", env=env, stage=f"quantize {exp.method.name}")
    except child.ChildFailed as e:
        said = _said(log_path)
        if e.returncode == EXIT_CONFIG and said:
            raise ConfigError(said) from None
        if e.returncode == EXIT_VERIFY and said:
            raise verify.VerificationError(f"{said}; log: {log_path}") from None
        raise
    return load_result(out_dir)


def _said(log_path: Path) -> str | None:
    """The child's own message for an error of the user's (its last such line)."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith(ERROR_PREFIX)]
    return lines[-1].removeprefix(ERROR_PREFIX) if lines else None


# ---------------------------------------------------------------- child side


def build_modifier(req: dict):
    """The llm-compressor recipe of the method: one modifier, or AWQ's smoothing and then the
    modifier that quantizes (llm-compressor's independent pipeline gives each its own pass, so
    GPTQ's Hessians are gathered on the smoothed model)."""
    from llmcompressor.modifiers.autoround import AutoRoundModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    method, preset, ignore = req["method"], req["scheme"]["preset"], req["ignore"]
    name = method["name"]
    if name == "rtn":
        return QuantizationModifier(targets="Linear", scheme=preset, ignore=ignore)
    if name in MODIFIER_METHODS:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        gptq = GPTQModifier(
            targets="Linear",
            scheme=preset,
            ignore=ignore,
            block_size=method["block_size"],
            dampening_frac=method["dampening_frac"],
            actorder=method["actorder"],
        )
        if name == "gptq":
            return gptq
        duo = {"true": True, "false": False}.get(method["duo_scaling"], method["duo_scaling"])
        awq = AWQModifier(duo_scaling=duo, n_grid=method["n_grid"], mappings=awq_mappings(method["mappings"]))
        last = gptq if name == "awq_gptq" else QuantizationModifier(targets="Linear", scheme=preset, ignore=ignore)
        return [awq, last]
    import torch

    compile_ = method["enable_torch_compile"]
    kwargs = {
        "iters": method["iters"],
        "batch_size": method["batch_size"],
        "enable_torch_compile": torch.cuda.is_available() if compile_ is None else compile_,
        "disable_opt_rtn": method["disable_opt_rtn"],
    }
    if method["lr"] is not None:
        kwargs["lr"] = method["lr"]
    return AutoRoundModifier(targets="Linear", scheme=preset, ignore=ignore, **kwargs)


def awq_mappings(mappings: list[dict] | None):
    """method.mappings as llm-compressor's AWQMapping objects; None: its own for the architecture."""
    if mappings is None:
        return None
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    return [AWQMapping(m["smooth_layer"], list(m["balance_layers"])) for m in mappings]


def skip_pinning_without_accelerator() -> None:
    """llm-compressor 0.14's AWQModifier pins its cached activations in host memory before each
    grid search (for faster host-to-device copies); torch refuses to pin where there is no
    accelerator, so AWQ fails on a CPU-only machine. With no device to copy to, pinning has no
    purpose: skipped there, and said in the log."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    print("[quantize] no accelerator: llm-compressor's AWQ cache is not pinned in host memory", flush=True)


def print_autoround_blocks(model, ignore: list[str]) -> None:
    """Print ``[autoround] block i/N (name)`` as llm-compressor starts tuning each decoder
    block, for the parent's progress display: its own log line names the block but not how
    many there are. N: the modifier's sequential targets with a Linear left to quantize (a
    VLM's vision blocks, all ignored, are never tuned)."""
    import torch
    from llmcompressor.utils.pytorch import infer_sequential_targets
    from loguru import logger

    from autoround_exp.config import ignores
    from autoround_exp.progress import AUTOROUND_BLOCK

    targets = infer_sequential_targets(model)
    total = sum(
        any(
            isinstance(sub, torch.nn.Linear) and not ignores(f"{name}.{sub_name}", ignore)
            for sub_name, sub in m.named_modules()
        )
        for name, m in model.named_modules()
        if type(m).__name__ in targets
    )
    started = 0

    def sink(message) -> None:
        nonlocal started
        started += 1
        name = message.record["message"].rsplit(" ", 1)[-1]
        print(f"{AUTOROUND_BLOCK} {started}/{total} ({name})", flush=True)

    def applying(record) -> bool:
        return record["function"] == "apply_autoround" and record["message"].startswith("Applying AutoRound")

    logger.add(sink, level="INFO", filter=applying, format="{message}")


def quantize_native(req: dict, model, tokenizer, dataset, out: Path) -> str:
    """method=autoround_native: auto-round's own API, saved in llm-compressor's format (a
    compressed-tensors checkpoint). The same token sequences as the modifier path, one per
    batch row; llm-compressor's ignore patterns resolved to the module names auto-round
    takes. Returns a description of the call, kept as the checkpoint's recipe."""
    import torch
    from auto_round import AutoRound

    from autoround_exp.config import ignores

    method, cal = req["method"], req["calibration"]
    ignored = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ignores(n, req["ignore"])]
    compile_ = method["enable_torch_compile"]
    kwargs = {
        "scheme": req["scheme"]["preset"],
        "iters": method["iters"],
        "nsamples": cal["nsamples"],
        "seqlen": cal["seqlen"],
        "batch_size": method["batch_size"],
        "seed": req["seed"],
        "enable_torch_compile": torch.cuda.is_available() if compile_ is None else compile_,
        "disable_opt_rtn": method["disable_opt_rtn"],
        "ignore_layers": ",".join(ignored),
        "device_map": 0 if torch.cuda.is_available() else "cpu",
    }
    if method["lr"] is not None:
        kwargs["lr"] = method["lr"]
    samples = [torch.tensor([row["input_ids"]]) for row in dataset]
    rounder = AutoRound(model, tokenizer, dataset=samples, **kwargs)
    staging = out.with_name(out.name + ".native")
    shutil.rmtree(staging, ignore_errors=True)
    _, folders = rounder.quantize_and_save(output_dir=str(staging), format="llm_compressor")
    (folder,) = folders if isinstance(folders, list) else [folders]
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(folder, out)
    shutil.rmtree(staging, ignore_errors=True)
    shown = {k: v for k, v in kwargs.items() if k != "ignore_layers"} | {"ignore_layers": ignored}
    return f"auto_round.AutoRound(model, tokenizer, dataset=<{len(samples)} token tensors>, **{shown})" + (
        '.quantize_and_save(format="llm_compressor")\n'
    )


def oneshot_calibration_args(req: dict) -> dict:
    """oneshot's calibration arguments, as upstream's AutoRound examples set them."""
    cal = req["calibration"]
    return {
        "num_calibration_samples": cal["nsamples"],
        "max_seq_length": cal["seqlen"],
        # upstream: "disable shuffling to get slightly better mmlu score"
        "shuffle_calibration_samples": False,
    }


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def load_model(m: dict):
    """The model, its processor (a tokenizer for text models) and its tokenizer."""
    import torch
    import transformers

    from autoround_exp import vision_compat

    vlm = m["loader"] == "image_text_to_text"
    auto_model = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    load_processor = vision_compat.load_processor if vlm else transformers.AutoTokenizer.from_pretrained
    model = auto_model.from_pretrained(
        m["path"], revision=m["revision"], dtype=getattr(torch, m["dtype"]), trust_remote_code=m["trust_remote_code"]
    )
    processor = load_processor(m["path"], revision=m["revision"], trust_remote_code=m["trust_remote_code"])
    # Text calibration for both, as upstream's Qwen3-VL example; image+text from a parquet.
    tokenizer = processor.tokenizer if vlm else processor
    return model, processor, tokenizer


def calibration_data(req: dict, processor, tokenizer) -> tuple[dict, dict | None]:
    """oneshot's calibration arguments (fixed-length samples), and what the calibration was."""
    from autoround_exp import calibration
    from autoround_exp.config import CalibrationConfig

    if req["calibration"] is None:
        return {}, None
    kwargs = {}
    cfg = CalibrationConfig(**req["calibration"])
    if calibration.is_image_text(cfg.source):
        ds, info = calibration.build_image_text(processor, cfg)
        kwargs = {"data_collator": calibration.collate_one}
    else:
        ds, info = calibration.build(tokenizer, cfg)
    return {**kwargs, "dataset": ds, **oneshot_calibration_args(req)}, info.model_dump()


def verify_checkpoint(req: dict, folder: Path, names: list[str], tuned: bool, codes: dict | None) -> dict:
    """verify's findings on the saved checkpoint, said on the log; raises where it is not as asked."""
    verification = verify.layers(folder, names, req["ignore"], req["scheme"]["preset"])
    iters = req["method"]["iters"] if tuned and req["method"]["name"] in AUTOROUND_METHODS else None
    verification |= {"method": req["method"]["name"], "iters": iters, "changed_codes": codes}
    verify.no_op(verification)
    print(
        f"[verify] {verification['quantized']}/{verification['linear_layers']} Linear layers quantized as "
        f"{req['scheme']['preset']}; left out: {verification['left_out']}"
        + (
            f"; {req['method']['label']} changed {codes['fraction']:.2%} of sampled weight codes"
            if codes and codes["measured"]
            else ""
        ),
        flush=True,
    )
    return verification


def peak_memory(cuda: bool) -> tuple[float, str, str]:
    """The child's peak memory in GB, what kind it is, and the device."""
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated", torch.cuda.get_device_name()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss", "cpu"


def run_request(req: dict) -> dict:

    import torch
    from llmcompressor import oneshot

    t0 = time.perf_counter()
    torch.manual_seed(req["seed"])
    deterministic = bool(req["method"].get("deterministic"))
    if deterministic:
        # the same inputs give the same bytes: deterministic kernels, or an error where none exists
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    model, processor, tokenizer = load_model(req["model"])
    native = req["method"]["name"] == "autoround_native"
    modifier = None if native else build_modifier(req)

    names = verify.linear_names(model)
    # the methods that move weight codes off round-to-nearest: the share they moved is measured
    name = req["method"]["name"]
    tuned = (name in AUTOROUND_METHODS and req["method"]["iters"] > 0) or name in MODIFIER_METHODS
    targeted = [n for n in names if not ignores(n, req["ignore"])]
    originals = verify.sample_layers(model, targeted) if tuned and not native else {}

    kwargs, calib_info = calibration_data(req, processor, tokenizer)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = Path(req["out_dir"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t1 = time.perf_counter()
    if native:
        # auto-round tunes and saves in one call: the save is inside the timing here
        recipe = quantize_native(req, model, tokenizer, kwargs["dataset"], tmp)
        oneshot_seconds = time.perf_counter() - t1
        codes = (
            {"measured": False, "reason": "auto-round's own API keeps its tuned layers to itself"} if tuned else None
        )
    else:
        if req["method"]["name"] in AUTOROUND_METHODS:
            print_autoround_blocks(model, req["ignore"])
        if req["method"]["name"] in ("awq", "awq_gptq"):
            skip_pinning_without_accelerator()
        oneshot(model=model, processor=processor, recipe=modifier, **kwargs)
        oneshot_seconds = time.perf_counter() - t1
        codes = verify.changed_codes(model, originals) if tuned else None
        model.save_pretrained(tmp, save_compressed=True)
        recipe = "\n".join(map(str, modifier)) if isinstance(modifier, list) else str(modifier)
    processor.save_pretrained(tmp)
    if calib_info is not None:
        # the exact token sequences that tuned (or observed) the model; their SHA-256 is the
        # record's calibration.token_sha256 (for text: of json.dumps(input_ids))
        ids = [list(map(int, row)) for row in kwargs["dataset"]["input_ids"]]  # a datasets Column: not JSON
        tokens = {"token_sha256": calib_info["token_sha256"], "input_ids": ids}
        (tmp / CALIBRATION_FILE).write_text(json.dumps(tokens))
    recipe_path = tmp / "recipe.yaml"
    if not recipe_path.exists():
        recipe_path.write_text(recipe)

    # the checkpoint as asked, or no checkpoint: it keeps its .partial name if this fails
    verification = verify_checkpoint(req, tmp, names, tuned, codes)

    peak, kind, device = peak_memory(cuda)
    result = {
        "checkpoint": str(out),
        "oneshot_seconds": round(oneshot_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_memory_gb": round(peak, 4),
        "memory_kind": kind,
        "device": device,
        "size_mb": round(_dir_size_mb(tmp), 3),
        "calibration": calib_info,
        "recipe": "recipe.yaml",
        "verification": verification,
        "deterministic": deterministic,
    }
    (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the checkpoint exists under its name only once it is complete
    return result


# The child's exit codes for what the parent reports as the user's error, not a crash.
EXIT_CONFIG, EXIT_VERIFY = 2, 3


def main(path: str) -> int:
    from autoround_exp.config import ConfigError

    req = json.loads(Path(path).read_text())
    if req["method"].get("deterministic"):
        # before CUDA starts: cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        run_request(req)
    except ConfigError as e:
        print(f"{ERROR_PREFIX}{e}", flush=True)
        return EXIT_CONFIG
    except verify.VerificationError as e:
        print(f"{ERROR_PREFIX}{e}", flush=True)
        return EXIT_VERIFY
    return 0


if __name__ == "__main__":
    # transformers imports scikit-learn for assisted generation, which quantization never runs, and
    # nothing in llm-compressor, auto-round or compressed-tensors imports it: about 2 of the 11 s
    # that `import llmcompressor` takes on 2 CPU cores. None in sys.modules makes it absent.
    sys.modules["sklearn"] = None
    sys.exit(main(sys.argv[1]))
