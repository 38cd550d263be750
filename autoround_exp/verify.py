"""Is the saved checkpoint quantized as asked? Run in the quantize child, after every
quantization, before the checkpoint gets its name.

- Layers: every Linear of the model is either quantized with the requested scheme (its
  weight has a ``weight_scale`` beside it in the checkpoint, and the checkpoint's
  ``quantization_config`` carries the scheme's bits, type, group size and strategy) or named
  by the ignore list. Zero quantized layers, or a layer left out that the ignore list does not
  name (or one quantized that it does), fails the job naming the layers.
- AutoRound's tuning (iters > 0), GPTQ and AWQ: the fraction of weight codes that differ from
  round-to-nearest of the original weights under the scales the method chose, on a sample of
  layers (for AWQ this counts its smoothing of the weights as well as their rounding).
  0 means the checkpoint is round-to-nearest under an AutoRound label: the tuned rounding never
  reached the weights (llm-compressor has shipped such a silent no-op), or no iteration
  improved on the start in any block (too few iters); it fails the job.
"""

from __future__ import annotations

import json
from pathlib import Path

from autoround_exp.config import METHOD_NAMES, MODIFIER_METHODS, ignores

# Original weights kept for the changed-codes measure: at most this many elements (bf16: 2 bytes each).
SAMPLE_ELEMENTS = 50_000_000
WEIGHT_FIELDS = ("num_bits", "type", "group_size", "strategy", "symmetric")


class VerificationError(RuntimeError):
    """The checkpoint is not what was asked for; the message names the layers."""


def linear_names(model) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def sample_layers(model, names: list[str]) -> dict[str, object]:
    """CPU copies of the original weights of an evenly spread sample of ``names``."""
    modules = dict(model.named_modules())
    sizes = [modules[n].weight.numel() for n in names]
    if sum(sizes) <= SAMPLE_ELEMENTS:
        chosen = names
    else:
        step = max(1, round(sum(sizes) / SAMPLE_ELEMENTS))
        chosen = names[::step]
    return {n: modules[n].weight.detach().to("cpu", copy=True) for n in chosen}


def changed_codes(model, originals: dict[str, object]) -> dict:
    """Fraction of codes of the sampled layers that differ from round-to-nearest of their
    original weights under the scales the quantization chose (in memory, before saving)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import quantize

    modules = dict(model.named_modules())
    differ = total = layers = 0
    for name, w0 in originals.items():
        m = modules.get(name)
        scheme = getattr(m, "quantization_scheme", None)
        if m is None or scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        args = scheme.weights
        zp = getattr(m, "weight_zero_point", None)
        gs = getattr(m, "weight_global_scale", None)
        with torch.no_grad():
            w = m.weight.detach()
            tuned = quantize(x=w, scale=m.weight_scale, zero_point=zp, args=args, global_scale=gs)
            nearest = quantize(
                x=w0.to(w.device, w.dtype), scale=m.weight_scale, zero_point=zp, args=args, global_scale=gs
            )
        differ += int((tuned != nearest).sum())
        total += tuned.numel()
        layers += 1
    if not total:
        return {"measured": False, "reason": "no quantized layer with in-memory scales to compare"}
    return {
        "measured": True,
        "fraction": differ / total,
        "codes": total,
        "layers": layers,
        "reference": "round-to-nearest of the original weights under the tuned scales",
    }


def _checkpoint_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


def layers(folder: Path, names: list[str], ignore: list[str], preset: str) -> dict:
    """Check every Linear against the checkpoint; raise ``VerificationError`` if it is not as asked."""
    from compressed_tensors.quantization import preset_name_to_scheme

    # a quantized Linear's weight has its scale beside it, whatever the format
    scaled = {k.removesuffix(".weight_scale") for k in _checkpoint_keys(folder) if k.endswith(".weight_scale")}
    qcfg = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}

    def quantized(name: str) -> bool:
        # a model class may prefix its keys differently on disk than its modules in memory
        return name in scaled or any(s.endswith(f".{name}") or name.endswith(f".{s}") for s in scaled)

    done = [n for n in names if quantized(n)]
    left_out = [n for n in names if not quantized(n)]
    unexpected = [n for n in left_out if not ignores(n, ignore)]
    wrongly = [n for n in done if ignores(n, ignore)]
    expected = preset_name_to_scheme(preset, ["Linear"]).weights
    groups = list((qcfg.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    want = {
        f: (v.value if hasattr(v, "value") else v) for f in WEIGHT_FIELDS if (v := getattr(expected, f)) is not None
    }
    scheme_ok = any(all(w.get(f) == v for f, v in want.items()) for w in weights)
    report = {
        "linear_layers": len(names),
        "quantized": len(done),
        "left_out": left_out,
        "scheme": preset,
        "weights": want,
        "format": qcfg.get("format"),
        "checkpoint_ignore": qcfg.get("ignore"),
    }
    problems = []
    if not done:
        problems.append(f"no Linear layer of {len(names)} was quantized (model.ignore={ignore})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} layer(s) left unquantized that model.ignore does not name: {unexpected[:8]}"
        )
    if wrongly:
        problems.append(f"{len(wrongly)} layer(s) quantized although model.ignore names them: {wrongly[:8]}")
    if done and not scheme_ok:
        problems.append(f"quantization_config's weights {weights} are not {preset}'s {want}")
    if problems:
        raise VerificationError("checkpoint verification failed: " + "; ".join(problems))
    return report


def no_op(report: dict) -> None:
    """A run of a method that should move codes off round-to-nearest, whose codes all stayed, is refused."""
    codes = report.get("changed_codes") or {}
    if not (codes.get("measured") and codes["fraction"] == 0):
        return
    method = report.get("method") or "autoround"
    where = (
        f"changed 0 of {codes['codes']} weight codes in {codes['layers']} sampled layers against "
        "round-to-nearest under the same scales"
    )
    if method in MODIFIER_METHODS:
        name = METHOD_NAMES[method]
        awq = "; AWQ smooths nothing where its mappings match no layer of the model: see method.mappings"
        raise VerificationError(
            f"checkpoint verification failed: {name} {where}: the checkpoint is round-to-nearest under a "
            f"{name} label. The modifier never reached the weights (its log in quantize.log says which layers "
            "it calibrated; GPTQ falls back to round-to-nearest where a Hessian is singular"
            + (awq if "awq" in method else "")
            + ")."
        )
    raise VerificationError(
        f"checkpoint verification failed: AutoRound with iters={report['iters']} {where}: "
        "the checkpoint is round-to-nearest under an AutoRound label. Either the tuning never reached "
        "the weights (a silent no-op, llm-compressor #2855) or no iteration improved on the starting "
        "point in any block (AutoRound keeps its best iteration; quantize.log then shows "
        "'loss iter 0: ... -> iter 0: ...' per block): set more iters."
    )
