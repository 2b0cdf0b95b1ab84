"""PNG plots of mean-bias diagnostics (the output of :func:`hf_lowbit.diagnostics.mean_bias.mean_bias`).

matplotlib is an optional extra (``pip install hf-lowbit[plots]``); it is imported only when a plot is drawn, and
figures are rendered with the Agg canvas directly, so the caller's pyplot backend and global state are untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .mean_bias import GRAD_SUFFIX

__all__ = ["plot_mean_bias"]


def _figure(width: float, height: float):
    """A new Figure bound to an Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_mean_bias needs matplotlib: pip install 'hf-lowbit[plots]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``model.layers.3.mlp.up_proj`` → ``3.mlp.up_proj``)."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def _value(stats: Mapping[str, Any], key: str) -> float:
    v = stats.get(key, math.nan)
    return float(v) if isinstance(v, (int, float)) else math.nan


def _finite_or_low(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _bar_width(n: int) -> float:
    return min(40.0, max(6.0, 0.32 * n + 2.0))


def _plot_r2_cos(results: Mapping[str, Mapping[str, Any]], title: str, path: Path) -> Path:
    names = list(results)
    x = range(len(names))
    fig = _figure(_bar_width(len(names)), 4.5)
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in x], [_value(results[n], "r2") for n in names], width=0.4, label="R² (mean energy share)")
    ax.bar([i + 0.2 for i in x], [_value(results[n], "cos_mu_v1") for n in names], width=0.4,
           label="|cos(μ, v₁)|")
    ax.set_xticks(list(x), _short_names(names), rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def _plot_energy(results: Mapping[str, Mapping[str, Any]], title: str, path: Path) -> Path:
    names = list(results)
    x = list(range(len(names)))
    fig = _figure(_bar_width(len(names)), 4.5)
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for key, label in (("energy_mean", "mean 1μᵀ"), ("energy_spike", "spike (top-k SVD of X−1μᵀ)"),
                       ("energy_tail", "tail")):
        vals = [_value(results[n], key) for n in names]
        vals = [0.0 if math.isnan(v) else v for v in vals]
        ax.bar(x, vals, bottom=bottom, width=0.8, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(x, _short_names(names), rotation=90, fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("share of ‖X‖²")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def _plot_projections(name: str, stats: Mapping[str, Any], path: Path) -> Path:
    p = [float(v) for v in stats["projections"]]
    ranks = [i / max(1, len(p) - 1) for i in range(len(p))]
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    ax.plot(ranks, p, marker=".", markersize=2, linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("token rank (sorted)")
    ax.set_ylabel("p_i = x_iᵀμ / ‖μ‖")
    ax.set_title(f"{name}\nsign coherence {_value(stats, 'sign_coherence'):.3f}, R² {_value(stats, 'r2'):.3f}",
                 fontsize=9)
    fig.savefig(path, dpi=100)
    return path


def plot_mean_bias(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                   layer: str | None = None) -> list[Path]:
    """Write PNG plots of per-layer mean-bias statistics into ``out_dir`` and return their paths.

    For the layer inputs (and, if present, separately for the ``.grad_output`` entries): a bar chart of R² and
    |cos(μ, v₁)| per layer (``mean_bias_r2_cos[_grad_output].png``) and stacked bars of the mean / spike / tail
    energy split (``mean_bias_energy[_grad_output].png``). If any entry holds ``projections`` (``mean_bias(...,
    keep_projections=True)``), the sorted token projections of one layer (``layer``, default the one with the
    largest R²) go to ``mean_bias_projections_<layer>.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {
        "": {n: s for n, s in results.items() if not n.endswith(GRAD_SUFFIX)},
        "_grad_output": {n[: -len(GRAD_SUFFIX)]: s for n, s in results.items() if n.endswith(GRAD_SUFFIX)},
    }
    paths: list[Path] = []
    for suffix, group in groups.items():
        if not group:
            continue
        what = "output gradients D" if suffix else "inputs X"
        paths.append(_plot_r2_cos(group, f"Mean bias of layer {what}: R² and |cos(μ, v₁)|",
                                  out / f"mean_bias_r2_cos{suffix}.png"))
        paths.append(_plot_energy(group, f"Energy split of layer {what}", out / f"mean_bias_energy{suffix}.png"))

    with_proj = {n: s for n, s in results.items() if s.get("projections")}
    if layer is not None:
        if layer not in with_proj:
            raise KeyError(f"layer {layer!r} has no 'projections' in results (use mean_bias(keep_projections=True)); "
                           f"layers with projections: {sorted(with_proj)[:10]}")
        chosen = layer
    elif with_proj:
        chosen = max(with_proj, key=lambda n: _finite_or_low(_value(with_proj[n], "r2")))
    else:
        chosen = None
    if chosen is not None:
        paths.append(_plot_projections(chosen, with_proj[chosen], out / f"mean_bias_projections_{_safe(chosen)}.png"))
    return paths
