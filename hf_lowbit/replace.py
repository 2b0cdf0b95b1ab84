"""Module swap: which `nn.Linear`s become `LowBitLinear`, and the in-memory conversion of a loaded model."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .config import LowBitConfig, module_matches
from .layers import LowBitLinear


def decoder_block_prefixes(model: nn.Module) -> list[str] | None:
    """Qualified names of the decoder blocks (classes in `_no_split_modules`), or None if the model names none."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    if not classes:
        return None
    return [name for name, m in model.named_modules() if type(m).__name__ in classes]


def linears_to_convert(model: nn.Module, skip: list[str]) -> list[str]:
    """Names of the plain `nn.Linear` modules inside decoder blocks that are not matched by `skip`."""
    blocks = decoder_block_prefixes(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LowBitLinear):
            continue
        if blocks is not None and not any(name.startswith(p + ".") for p in blocks):
            continue
        if module_matches(name, skip):
            continue
        names.append(name)
    return names


def stable_layer_id(name: str) -> int:
    """A layer id that depends only on the module's name (SR streams repeat across processes)."""
    return zlib.crc32(name.encode())


def swap_linears(model: nn.Module, config: LowBitConfig, skip: list[str], mode: str,
                 copy_weights: bool = False) -> list[str]:
    """Replace the selected linears by `LowBitLinear` in place; returns the converted names.

    `mode` is the storage the new modules start in ("train" master weights or "infer" packed). With
    `copy_weights`, float weights of the old modules are copied (train) or quantized and packed (infer).
    """
    recipe = config.recipe()
    names = linears_to_convert(model, skip)
    for name in names:
        old = model.get_submodule(name)
        new = LowBitLinear.from_linear(old, recipe, mode="train", backend=config.backend, seed=config.seed)
        install_module(model, name, old, new, ("weight", "bias"), mode, copy_weights)
    return names


def install_module(model: nn.Module, name: str, old: nn.Module, new: nn.Module, params: tuple[str, ...], mode: str,
                   copy_weights: bool) -> None:
    """Put `new` (a LowBit module built in train storage) in place of `old`.

    With `copy_weights` (and real, non-meta weights) the float `params` are copied and, for ``mode="infer"``,
    packed; otherwise an infer-mode module gets empty packed parameters for a pre-quantized checkpoint to fill.
    """
    new.layer_id = stable_layer_id(name)
    first = getattr(old, params[0])
    if copy_weights and first.device.type != "meta":
        with torch.no_grad():
            for p in params:
                src, dst = getattr(old, p, None), getattr(new, p, None)
                if src is not None and dst is not None:
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
        if mode == "infer":
            new.to_infer()
    elif mode == "infer":
        new.mode = "infer"
        new._make_packed_params()
    model.set_submodule(name, new)


def convert(model: nn.Module, config: LowBitConfig | None = None) -> nn.Module:
    """Convert an already-loaded (float) Hugging Face model in place, as `from_pretrained(quantization_config=)` would.

    Use it for models built with `from_config` (training from scratch). The model can then be trained, finalized,
    saved with `save_pretrained` and reloaded with `from_pretrained` like a model loaded with the config.
    """
    from .model_patches import swap_experts
    from .quantizer import LowBitHfQuantizer

    config = config or LowBitConfig()
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("convert(): the model is already quantized "
                         f"({getattr(model.hf_quantizer.quantization_config, 'quant_method', '?')})")
    quantizer = LowBitHfQuantizer(config, pre_quantized=False)
    skip = quantizer.modules_to_skip(model)
    swap_linears(model, config, skip, config.mode, copy_weights=True)
    swap_experts(model, config, skip, config.mode, copy_weights=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    quantizer._process_model_after_weight_loading(model)
    return model
