"""`finalize`: turn a trained ``mode="train"`` model into packed FP4 inference (``mode="infer"``)."""

from __future__ import annotations

import copy

from torch import nn

from .config import LowBitConfig
from .layers import LowBitLinear
from .model_patches import LowBitExperts


def _lowbit_config(model: nn.Module) -> LowBitConfig:
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(cfg, LowBitConfig):
        raise ValueError("finalize(): the model was not loaded or converted with hf_lowbit.LowBitConfig "
                         f"(config.quantization_config is {type(cfg).__name__})")
    return cfg


def finalize(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Pack every `LowBitLinear` master weight to FP4 (the exact values the training forward used, RTN).

    Returns the model (or a deep copy with ``inplace=False``) in ``mode="infer"``: `save_pretrained` then writes
    packed weights, and `from_pretrained(dir)` reloads them with no quantization_config argument.
    """
    # SD-MoE: fold W_c + W_u back into ordinary experts (hf_lowbit.model_patches.sd_moe)
    from .model_patches.sd_moe import fold_sd_moe, has_sd_moe

    if has_sd_moe(model) and not isinstance(getattr(getattr(model, "config", None), "quantization_config", None),
                                            LowBitConfig):
        model = model if inplace else copy.deepcopy(model)
        fold_sd_moe(model)  # unquantized (apply_sd_moe): stock experts, the checkpoint loads in plain transformers
        return model
    cfg = _lowbit_config(model)
    if not inplace:
        model = copy.deepcopy(model)
        cfg = _lowbit_config(model)
    fold_sd_moe(model)  # SD-MoE (no-op otherwise): the FP4 experts pack W_c + W_u
    for module in model.modules():
        if isinstance(module, (LowBitLinear, LowBitExperts)):
            module.to_infer()
    cfg.mode = "infer"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config is not cfg:
        quantizer.quantization_config = cfg
    return model
