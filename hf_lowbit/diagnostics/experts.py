"""Expert-specialization diagnostics (ALGORITHMS.md §3, SD-MoE): principal-subspace similarity of routed experts,
the same on per-expert gradients, and router-row alignment with the experts' top singular directions.

``sim(i, j) = ‖A_iᵀ A_j‖_F² / k`` with ``A`` the top-k singular vectors (left: output space, right: input space) of
expert i's matrix; 1 = same k-dim subspace, ≈ k/d for random subspaces of R^d. Measured per MoE layer and matrix
type (gate, up, down) on W_u⁽ⁱ⁾ for SD-MoE (the shared W_c makes the combined matrices similar by construction) and
on the raw experts otherwise. Works on stock experts, `LowBitExperts` (train storage) and `SDMoEExperts`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MATRIX_TYPES = ("gate", "up", "down")


def _is_experts(module: nn.Module) -> bool:
    w = getattr(module, "gate_up_proj", None)
    d = getattr(module, "down_proj", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 3 and w.is_floating_point() and isinstance(d, torch.Tensor)
            and d.dim() == 3 and w.device.type != "meta")


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every routed-experts module with float fused weights."""
    return [(n, m) for n, m in model.named_modules() if _is_experts(m)]


def _split(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    i = gate_up.shape[1] // 2
    return {"gate": gate_up[:, :i], "up": gate_up[:, i:], "down": down}


def _is_sd(module: nn.Module) -> bool:
    return hasattr(module, "common_gate")


def expert_matrices(module: nn.Module, which: str = "auto") -> dict[str, torch.Tensor]:
    """Per-expert matrices [E, out, in] by type. ``which``: ``"auto"`` (W_u for SD-MoE, raw otherwise),
    ``"unique"``, ``"combined"`` (W_c + W_u, the weights the forward uses)."""
    if which == "combined" and _is_sd(module):
        gate_up, down = module.expert_weights()
    else:
        gate_up, down = module.gate_up_proj, module.down_proj
    return {k: v.detach().float() for k, v in _split(gate_up, down).items()}


def subspace_similarity(mats: torch.Tensor, k: int = 8) -> dict[str, Any]:
    """Pairwise principal-subspace similarity of a stack of matrices [E, m, n].

    Returns ``{"left": {"map": [E, E], "mean": float}, "right": {...}}`` (mean over pairs i < j).
    """
    mats = mats.detach().float()
    e = mats.shape[0]
    k = min(k, mats.shape[-1], mats.shape[-2])
    u, _, vh = torch.linalg.svd(mats, full_matrices=False)
    out = {}
    iu = torch.triu_indices(e, e, 1)
    for side, a in (("left", u[..., :k]), ("right", vh[..., :k, :].transpose(-1, -2))):
        prod = torch.einsum("imk,jml->ijkl", a, a)
        sim = prod.pow(2).sum((-1, -2)) / k
        mean = float(sim[iu[0], iu[1]].mean()) if e > 1 else float("nan")
        out[side] = {"map": sim, "mean": mean}
    return out


def _summary(per_layer: dict[str, dict[str, Any]]) -> dict[str, Any]:
    vals = [v[s]["mean"] for layer in per_layer.values() for v in layer.values() for s in ("left", "right")]
    by_type = {t: sum(layer[t][s]["mean"] for layer in per_layer.values() for s in ("left", "right"))
               / (2 * len(per_layer)) for t in MATRIX_TYPES} if per_layer else {}
    return {"layers": per_layer, "mean": sum(vals) / len(vals) if vals else float("nan"), "by_type": by_type}


def _expert_grads(model: nn.Module, modules: list[tuple[str, nn.Module]], batch: dict[str, torch.Tensor]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Raw per-expert gradients ∂L/∂W⁽ⁱ⁾ (= the unprojected ∂L/∂W_u⁽ⁱ⁾ for SD-MoE), without touching ``.grad``."""
    params = [t for _, m in modules for t in (m.gate_up_proj, m.down_proj)]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    out = {}
    for idx, (name, m) in enumerate(modules):
        g_gu, g_d = grads[2 * idx], grads[2 * idx + 1]
        g_gu = torch.zeros_like(m.gate_up_proj) if g_gu is None else g_gu
        g_d = torch.zeros_like(m.down_proj) if g_d is None else g_d
        out[name] = {t: v.float() for t, v in _split(g_gu, g_d).items()}
    return out


def expert_similarity(model: nn.Module, k: int = 8, batch: dict[str, torch.Tensor] | None = None,
                      which: str = "auto") -> dict[str, Any]:
    """Principal-subspace similarity of the routed experts of every MoE layer.

    Returns ``{"weights": {"layers": {name: {type: {"left"/"right": {"map", "mean"}}}}, "mean", "by_type"},
    "k", "sd_moe"}`` plus ``"gradients"`` (same layout, raw per-expert gradients of the LM loss on ``batch``,
    e.g. ``{"input_ids": ids}``) when a batch is given. Weights: W_u for SD-MoE (``which="auto"``), raw otherwise.
    """
    modules = experts_modules(model)
    if not modules:
        raise ValueError("expert_similarity(): the model has no routed experts with float weights")
    weights = {name: {t: subspace_similarity(w, k) for t, w in expert_matrices(m, which).items()}
               for name, m in modules}
    result = {"k": k, "sd_moe": any(_is_sd(m) for _, m in modules), "weights": _summary(weights)}
    if batch is not None:
        grads = _expert_grads(model, modules, batch)
        result["gradients"] = _summary({n: {t: subspace_similarity(g, k) for t, g in gs.items()}
                                        for n, gs in grads.items()})
    return result


def _router_weight(model: nn.Module, experts_name: str) -> torch.Tensor | None:
    parent = model.get_submodule(experts_name.rsplit(".", 1)[0]) if "." in experts_name else model
    gate = getattr(parent, "gate", None)
    w = getattr(gate, "weight", None)
    return w.detach().float() if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def router_alignment(model: nn.Module, k: int = 8, which: str = "combined") -> dict[str, Any]:
    """How much of each router row lies in the experts' top-k input-space singular directions.

    For router row r_e (the logit weights of expert e, in R^H) and expert j's gate/up matrices (``which``:
    ``"combined"`` = the weights the forward uses, default; ``"auto"`` = W_u for SD-MoE),
    ``align[e, j] = ‖V_jᵀ r_e‖² / ‖r_e‖²`` with V_j the top-k right singular vectors (input space, R^H) of
    ``[gate_j; up_j]``. ``diag`` = each router row vs its own expert, ``mean`` = over all pairs, ``random`` = k/H,
    the expectation for a random direction. Per layer, plus overall means.
    """
    layers = {}
    for name, m in experts_modules(model):
        r = _router_weight(model, name)
        if r is None or r.shape[0] != m.gate_up_proj.shape[0]:
            continue
        mats = expert_matrices(m, which)
        gate_up = torch.cat([mats["gate"], mats["up"]], 1)   # [E, 2I, H]
        kk = min(k, gate_up.shape[-1], gate_up.shape[-2])
        _, _, vh = torch.linalg.svd(gate_up, full_matrices=False)
        v = vh[:, :kk, :]                                    # [E, k, H]
        rn = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        align = torch.einsum("jkh,eh->ejk", v, rn).pow(2).sum(-1)   # [E_router, E_expert]
        layers[name] = {"map": align, "diag": float(align.diagonal().mean()), "mean": float(align.mean()),
                        "random": kk / r.shape[1]}
    if not layers:
        return {"layers": {}, "diag": float("nan"), "mean": float("nan"), "random": float("nan")}
    n = len(layers)
    return {"layers": layers, "diag": sum(v["diag"] for v in layers.values()) / n,
            "mean": sum(v["mean"] for v in layers.values()) / n,
            "random": sum(v["random"] for v in layers.values()) / n}


def plot_similarity(result: dict[str, Any], path: str, title: str | None = None, key: str = "weights") -> str:
    """Heatmaps of the E×E similarity maps (rows: layers; columns: gate/up/down × left/right) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result[key]["layers"]
    cols = [(t, s) for t in MATRIX_TYPES for s in ("left", "right")]
    fig, axes = plt.subplots(len(layers), len(cols), figsize=(2.2 * len(cols), 2.2 * len(layers) + 0.6),
                             squeeze=False)
    for r, (name, per_type) in enumerate(layers.items()):
        for c, (t, s) in enumerate(cols):
            ax = axes[r][c]
            entry = per_type[t][s]
            im = ax.imshow(entry["map"].cpu().numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{t}/{s} μ={entry['mean']:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name.replace("model.layers.", "L").replace(".mlp.experts", ""), fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle(title or f"expert subspace similarity ({key}), mean={result[key]['mean']:.3f}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
