"""Stack vs stack: each config in two software stacks side by side — the versions that differ,
whether the two checkpoints are the same bytes (else how many layers' weight codes differ, and
what share of the codes), and the paired test of their scores; and the regressions a user
upgrading wants named: a score that moved beyond noise, or a config that finished in one
stack and failed in the other."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autoround_exp.fsutil import write_atomic
from autoround_exp.record import FailureRecord, RunRecord
from autoround_exp.report import tables
from autoround_exp.report.runs import Row, Section

# bytes per element of each safetensors dtype (weight codes are compared element by element;
# 4-bit codes packed into I32 / U8 ``weight_packed`` tensors nibble by nibble)
ITEM = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Tensor:
    file: Path
    dtype: str
    start: int  # absolute byte offsets in the file
    end: int

    def read(self) -> bytes:
        with self.file.open("rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)


def tensors(checkpoint: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors checkpoint (all shards), from the files' headers alone."""
    out = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                s, e = info["data_offsets"]
                out[name] = Tensor(path, info["dtype"], 8 + n + s, 8 + n + e)
    return out


def differing_codes(name: str, a: bytes, b: bytes, dtype: str) -> tuple[int, int]:
    """(codes that differ, codes): 4-bit codes nibble by nibble in a packed tensor, else elements."""
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    if name.endswith("weight_packed"):
        return int(((x & 15) != (y & 15)).sum() + ((x >> 4) != (y >> 4)).sum()), 2 * len(x)
    size = ITEM.get(dtype, 1)
    x, y = x.view(UINT[size]), y.view(UINT[size])
    return int((x != y).sum()), len(x)


@dataclass(frozen=True)
class Diff:
    identical: bool
    layers: int  # quantized weights compared
    layers_differ: int
    codes: int
    codes_differ: int
    other_differ: int  # other tensors (scales, norms, embeddings) whose bytes differ
    problem: str | None = None  # why no comparison (a checkpoint not on this machine, other tensors)

    @property
    def text(self) -> str:
        if self.problem:
            return self.problem
        if self.identical:
            return "identical bytes"
        share = 100 * self.codes_differ / self.codes if self.codes else 0.0
        text = f"weight codes differ in {self.layers_differ}/{self.layers} layers ({share:.2f} % of codes)"
        return text + (f"; {self.other_differ} other tensors differ" if self.other_differ else "")


def compare_checkpoints(a: str | Path, b: str | Path) -> Diff:
    pa, pb = Path(a), Path(b)
    if not (pa.is_dir() and pb.is_dir()):
        return Diff(False, 0, 0, 0, 0, 0, "checkpoint not on this machine")
    ta, tb = tensors(pa), tensors(pb)
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))
        return Diff(False, 0, 0, 0, 0, 0, f"different tensors ({len(only)} not in both, e.g. {only[0]})")
    layers = layers_differ = codes = codes_differ = other = 0
    for name in sorted(ta):
        x, y = ta[name].read(), tb[name].read()
        weight = name.endswith(("weight_packed", ".weight")) and ta[name].dtype in ("I32", "U8", "I8", "F8_E4M3")
        if weight:
            d, n = differing_codes(name, x, y, ta[name].dtype)
            layers, layers_differ = layers + 1, layers_differ + (d > 0)
            codes, codes_differ = codes + n, codes_differ + d
        elif x != y:
            other += 1
    return Diff(layers_differ == 0 and other == 0, layers, layers_differ, codes, codes_differ, other)


def versions_moved(a: RunRecord, b: RunRecord) -> str:
    """The quantization libraries whose versions differ between the two runs (the records' own
    lists), then the other packages the stacks moved: in full where they are all, else by name."""
    va, vb = dict(a.versions), dict(b.versions)
    named = set(va) | set(vb)
    moved = [f"{k} {va.get(k) or '—'} → {vb.get(k) or '—'}" for k in sorted(named) if va.get(k) != vb.get(k)]
    others = {k: v for s in (a.stack, b.stack) if s is not None for k, v in s.moved.items() if k not in named}
    if not moved and a.stack is None and others:
        return ", ".join(f"{k} {v}" for k, v in sorted(others.items()))
    if others:
        moved.append(f"and {', '.join(sorted(others))}")
    return ", ".join(moved) or "same versions"


def _diff_text(a: Row, b: Row, store: Path | None) -> str:
    """The comparison of the two rows' checkpoints, kept in ``store`` (the results folder) once made,
    so that the report reads the same where the checkpoints are gone (another machine, a clean-up)."""
    ra, rb = a.first.record, b.first.record
    if ra.method == "none":
        return "unquantized (same weights)"
    if ra.quant_key == rb.quant_key:
        return "one checkpoint"
    kept = store / "stack-diffs" / f"{ra.quant_key}-{rb.quant_key}.json" if store is not None else None
    if kept is not None and kept.is_file():
        return Diff(**json.loads(kept.read_text())).text
    diff = compare_checkpoints(ra.checkpoint, rb.checkpoint)
    if kept is not None and diff.problem is None:
        write_atomic(kept, json.dumps(asdict(diff)))
    return diff.text


def table(section: Section, alpha: float, store: Path | None = None) -> str | None:
    """One row per config that two stacks ran, against the reference stack (``pinned`` if there)."""
    rows = []
    for _, a, b in tables.stack_pairs(section):
        col = tables.columns(section)[0]
        t = tables.compare(a, b, col, alpha)
        va, vb = tables.mean(a, col), tables.mean(b, col)
        rows.append(
            {
                "Config": a.first.short_label,
                "Stacks": f"{b.first.stack} vs {a.first.stack}",
                "Versions that differ": versions_moved(a.first.record, b.first.record),
                "Checkpoints": _diff_text(a, b, store),
                tables.column_name(col): f"{tables.fmt(vb)} vs {tables.fmt(va)}",
                "Δ (p)": f"{tables.signed(t.delta)} ({tables.short_p(t)})" if t else "—",
                "Verdict": ("within noise" if t.within_noise else "MOVED") if t else "no per-document scores",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else None


def parts(section: Section, alpha: float, store: Path | None = None) -> list[str]:
    """A section's "Stack vs stack" part (none where it has one stack); ``store``: where the
    checkpoints' comparisons are kept (the results folder)."""
    if (text := table(section, alpha, store)) is None:
        return []
    return [
        "Stack vs stack (the same config in two software stacks, `stack=`; the checkpoints compared tensor by "
        "tensor, weight codes element by element):",
        text,
        *builds(section),
    ]


def builds(section: Section) -> list[str]:
    """What each stack's environment cost, as its first job recorded it (uv on this machine)."""
    out = {}
    for row in section.rows:
        for run in row.runs:
            s = run.record.stack
            if s is not None and s.build_s is not None and s.name not in out:
                built = f"its environment built in {s.build_s:.0f} s"
                out[s.name] = f"`stack={s.name}`: resolved in {s.resolve_s:.1f} s, {built}."
    return [out[name] for name in sorted(out)]


def moved_beyond_noise(section: Section, alpha: float) -> list[str]:
    out = []
    for _, a, b in tables.stack_pairs(section):
        for col in tables.columns(section):
            t = tables.compare(a, b, col, alpha)
            if t is not None and not t.within_noise:
                out.append(
                    f"{section.key.model} {a.first.short_label}: stack={b.first.stack} vs {a.first.stack} moved "
                    f"{tables.column_name(col)} by {tables.signed(t.delta)} (p {t.p:.3g}, n {t.n})"
                )
    return out


def failed_elsewhere(sections: list[Section], failed: list[FailureRecord]) -> list[str]:
    """Configs that finished in one stack and whose latest attempt failed in another, with no
    finished run there since."""
    finished: dict[tuple, set[str]] = {}
    for section in sections:
        for row in section.rows:
            for run in row.runs:
                finished.setdefault((run.record.name, section.key.limit), set()).add(run.stack)
    out = []
    for rec in failed:
        stack = ((rec.config.get("stack") or {}).get("name")) or "pinned"
        limit = (rec.config.get("eval") or {}).get("limit")
        done_in = finished.get((rec.name, limit), set())
        if done_in and stack not in done_in:
            why = (rec.error.splitlines() or [""])[0][:160]
            out.append(f"{rec.name}: finished in stack={', '.join(sorted(done_in))}, failed in stack={stack}: {why}")
    return sorted(set(out))


def regressions(sections: list[Section], failed: list[FailureRecord], alpha: float) -> list[str]:
    return [line for s in sections for line in moved_beyond_noise(s, alpha)] + failed_elsewhere(sections, failed)
