"""Accuracy vs AutoRound iters per scheme, with error bars and base/RTN reference lines."""

from __future__ import annotations

from pathlib import Path

from autoround_exp.config import AUTOROUND_METHODS
from autoround_exp.report import tables
from autoround_exp.report.runs import Section


def accuracy_vs_iters(section: Section, path: Path, write: bool = True) -> Path | None:
    """Write the section's plot to ``path`` (unchanged bytes are not rewritten); None if there
    is no AutoRound run to plot. ``write=False`` only says where it would go."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for row in section.rows:
        c = row.first.config
        if c.method in AUTOROUND_METHODS and not c.vision_quantized:
            series.setdefault((c.scheme, c.backend, c.method), []).append(row)
    if not series:
        return None
    if not write:
        return path
    cols = tables.columns(section)
    fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 3.8), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        drawn: set[int] = set()
        for i, ((_scheme, backend, method), rows) in enumerate(sorted(series.items())):
            color = f"C{i}"
            points = [(r.first.config.iters, tables.row_value(r, col)) for r in rows]
            points = [(x, v) for x, v in points if v is not None]
            path_name = " (auto-round API)" if method == "autoround_native" else ""
            label = f"{rows[0].first.record.scheme_preset} AutoRound{path_name} ({backend})"
            ax.errorbar(
                [x for x, _ in points],
                [v[0] for _, v in points],
                yerr=[v[1] or 0 for _, v in points],
                marker="o",
                capsize=4,
                color=color,
                label=label,
            )
            rtn = tables.rtn_of(section, rows[0])
            if rtn is not None and id(rtn) not in drawn and (v := tables.row_value(rtn, col)):
                drawn.add(id(rtn))  # one RTN line per scheme, however many AutoRound paths
                ax.axhline(v[0], color=color, linestyle=":", label=f"{label.split(' AutoRound')[0]} RTN")
        # each backend's series against the unquantized run scored by that backend
        bases = {backend: tables.baseline_of(section, rows[0]) for (_, backend, _), rows in sorted(series.items())}
        for style, base in zip(("--", "-.", ":"), bases.values(), strict=False):
            if base is not None and (v := tables.row_value(base, col)):
                ax.axhline(
                    v[0], color="black", linestyle=style, label=f"base (unquantized, {base.first.config.backend})"
                )
        metric, filt = col.split(",", 1)
        ax.set_title(f"{section.key.task}: {metric} ({filt})", fontsize=10)
        ax.set_xlabel("AutoRound iters")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(section.title, fontsize=10)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, leaving the file alone when its bytes are unchanged."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    # No timestamp or version in the PNG: the same runs give the same bytes.
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    if path.is_file() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(path)
    return path
