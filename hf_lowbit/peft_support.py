"""PEFT LoRA on packed FP4 layers: adapters train in high precision; merging re-quantizes.

`LowBitLinear` subclasses `nn.Linear`, so PEFT's default LoRA already wraps it and trains adapters over a frozen
packed base. Only merging needs care: PEFT adds the delta to `base_layer.weight.data`, which for a packed layer is
uint8 codes (a silent corruption). `LowBitLoraLinear` overrides merge/unmerge for packed bases:

* merge: dequantize the packed weight → add the LoRA delta in FP32 → re-quantize (RTN, fresh scales). This is
  lossy (the merged weight is rounded to FP4 again), so logits after merging differ slightly from the unmerged
  adapter's; the pre-merge packed tensors are kept so `unmerge` restores them exactly.
* master-weight (``mode="train"``) bases merge the ordinary way.

`install()` makes PEFT pick this class for every `LowBitLinear` by wrapping PEFT's default LoRA dispatcher; it runs
on `import hf_lowbit` and is idempotent.
"""

from __future__ import annotations

from typing import Any

import torch

from .layers import LowBitLinear
from .numerics import quantize

try:
    from peft.tuners.lora import layer as _lora_layer
    from peft.tuners.lora import model as _lora_model
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError:  # peft is a dependency, but keep hf_lowbit importable without it
    _lora_layer = _lora_model = None


if _lora_layer is not None:

    class LowBitLoraLinear(_lora_layer.Linear):
        """LoRA over a `LowBitLinear`; merging into a packed base dequantizes, adds and re-quantizes."""

        def _packed_base(self) -> LowBitLinear | None:
            base = self.get_base_layer()
            return base if isinstance(base, LowBitLinear) and base.mode == "infer" else None

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            base = self._packed_base()
            if base is None:
                return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            adapter_names = check_adapters_to_merge(self, adapter_names)
            if not adapter_names:
                return
            weight = base.dequantized_weight(torch.float32)
            for name in adapter_names:
                if name not in self.lora_A:
                    continue
                if self.lora_bias.get(name, False) or name in self.lora_variant:
                    raise ValueError(f"hf_lowbit: merging adapter {name!r} into a packed FP4 layer supports plain "
                                     "LoRA only (no lora_bias, DoRA or other variants); merge into a "
                                     "mode='train' model instead")
                weight = weight + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem broken")
            self.__dict__.setdefault("_lowbit_premerge", []).append(base.packed_weight().clone())
            r = base.recipe
            base.load_packed(quantize(weight, r.format, 1, "rtn", mx_scale=r.mx_scale))
            self.merged_adapters.extend(adapter_names)

        def unmerge(self) -> None:
            base = self._packed_base()
            stack = self.__dict__.get("_lowbit_premerge")
            if base is None or not stack:
                return super().unmerge()
            base.load_packed(stack.pop(0))
            stack.clear()
            self.merged_adapters.clear()


def _dispatch_lowbit(target: torch.nn.Module, adapter_name: str, config: Any, **kwargs: Any):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, LowBitLinear) and kwargs.get("parameter_name") is None:
        return LowBitLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def install() -> bool:
    """Route PEFT's LoRA dispatch for `LowBitLinear` to `LowBitLoraLinear`; returns True if PEFT is present."""
    if _lora_model is None:
        return False
    current = _lora_model.dispatch_default
    if getattr(current, "_hf_lowbit", False):
        return True

    def dispatch_default(target, adapter_name, config, **kwargs):
        module = _dispatch_lowbit(target, adapter_name, config, **kwargs)
        return module if module is not None else current(target, adapter_name, config=config, **kwargs)

    dispatch_default._hf_lowbit = True
    _lora_model.dispatch_default = dispatch_default
    return True
