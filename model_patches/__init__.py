"""Per-family MoE patches, keyed by `config.model_type` (installed as `hf_lowbit.model_patches`).

The four supported families share one fused experts layout and interface (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`, `forward(hidden, top_k_index, top_k_weights)`), so one `LowBitExperts` serves them all;
routers, shared experts' gates and `e_score_correction_bias` are left untouched (high precision), shared experts
and dense MLPs are ordinary linears handled by `LowBitLinear`.
"""

from __future__ import annotations

import torch
from torch import nn


from hf_lowbit.config import LowBitConfig, module_matches
from hf_lowbit.model_patches.experts import MATRICES, LowBitExperts, Routing
from hf_lowbit.replace import install_module

#: model_type → attribute path of the routed experts inside a decoder layer.
MOE_EXPERTS = {
    "qwen2_moe": "mlp.experts",
    "qwen3_moe": "mlp.experts",
    "deepseek_v2": "mlp.experts",
    "deepseek_v3": "mlp.experts",
}

__all__ = ["MOE_EXPERTS", "LowBitExperts", "MATRICES", "Routing", "experts_to_convert", "swap_experts"]


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None)


def experts_to_convert(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the stock fused experts modules of a supported MoE family, minus `skip` patterns."""
    suffix = MOE_EXPERTS.get(_model_type(model))
    if suffix is None:
        return []
    names = []
    for name, module in model.named_modules():
        if not name.endswith("." + suffix) or isinstance(module, LowBitExperts) or module_matches(name, skip):
            continue
        w = getattr(module, "gate_up_proj", None)
        if isinstance(w, torch.Tensor) and w.dim() == 3 and getattr(module, "down_proj", None) is not None:
            names.append(name)
    return names


def swap_experts(model: nn.Module, config: LowBitConfig, skip: list[str], mode: str,
                 copy_weights: bool = False) -> list[str]:
    """Replace the routed experts by `LowBitExperts` in place; returns the converted names.

    `mode` is the storage they start in; with `copy_weights` the stock float weights are copied (and packed for
    ``mode="infer"``).
    """
    names = experts_to_convert(model, skip)
    for name in names:
        old = model.get_submodule(name)
        new = LowBitExperts.from_experts(old, config.recipe(), "train", config.backend, config.seed)
        install_module(model, name, old, new, MATRICES, mode, copy_weights)
    return names
