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
    cfg = _lowbit_config(model)
    if not inplace:
        model = copy.deepcopy(model)
        cfg = _lowbit_config(model)
    for module in model.modules():
        if isinstance(module, (LowBitLinear, LowBitExperts)):
            module.to_infer()
    cfg.mode = "infer"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config is not cfg:
        quantizer.quantization_config = cfg
    return model
