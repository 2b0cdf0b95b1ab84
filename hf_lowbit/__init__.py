"""hf_lowbit: mean-centred FP4 (NVFP4 / MXFP4) training and inference for Hugging Face transformers.

``import hf_lowbit`` registers the ``"hf_lowbit"`` quantization method with transformers, so that
``from_pretrained(..., quantization_config=hf_lowbit.LowBitConfig())`` and reloading a saved hf_lowbit checkpoint
both work. Import it before ``from_pretrained`` in every process (scripts, DDP workers).
"""

from __future__ import annotations

__version__ = "0.1.0"

from transformers.quantizers import auto as _hf_quant_auto
from transformers.quantizers import register_quantization_config, register_quantizer

from .config import QUANT_METHOD, LowBitConfig, Recipe
from .quantizer import LowBitHfQuantizer


def _register() -> None:
    """Register config and quantizer once (transformers raises on a second registration)."""
    if QUANT_METHOD not in _hf_quant_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowBitConfig)
    if QUANT_METHOD not in _hf_quant_auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowBitHfQuantizer)


_register()

from . import numerics  # noqa: E402
from .finalize import finalize  # noqa: E402
from .layers import LowBitLinear  # noqa: E402
from .replace import convert  # noqa: E402
from . import peft_support as _peft_support  # noqa: E402
from .export import export  # noqa: E402
from .hub import push, push_folder  # noqa: E402
from .model_card import set_card_info  # noqa: E402
from .model_patches.mhmoe import MHMoEConfig, MHMoEModel  # noqa: E402
from .model_patches.sd_moe import (SDMoECallback, after_optimizer_step, apply_sd_moe,  # noqa: E402
                                   callbacks, project_gradients, refresh_bases)
from .quantize_checkpoint import quantize_checkpoint  # noqa: E402

_peft_support.install()

__all__ = ["LowBitConfig", "LowBitHfQuantizer", "LowBitLinear", "MHMoEConfig", "MHMoEModel", "Recipe",
           "SDMoECallback", "after_optimizer_step", "apply_sd_moe", "callbacks", "convert", "export", "finalize",
           "numerics", "project_gradients", "push", "push_folder", "quantize_checkpoint", "refresh_bases",
           "set_card_info", "__version__"]
