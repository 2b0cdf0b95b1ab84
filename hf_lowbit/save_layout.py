"""Which on-disk key layout `save_pretrained` uses for a packed MoE model: the fused one, by default.

transformers saves MoE experts in their "original" per-expert layout by default (`save_original_format=True`): it
reverses the load-time conversion that fuses `experts.N.gate_proj.weight` into `experts.gate_up_proj`. That layout
exists for float checkpoints read by other tools; packed hf_lowbit experts are only read by hf_lowbit (serving tools
get `hf_lowbit.export`). And some versions (5.17 among them) match the conversion patterns as key *prefixes*, so the
reversal also grabs the packed `gate_up_proj_scale` / `gate_up_proj_tensor_scale` and fails on them (an IndexError
deep in the save). So packed experts are saved fused unless the caller asks for the original layout, and asking for
it where this transformers cannot write it is an error raised before anything is written. `hf-lowbit quantize`
writes the same fused layout.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _packed_expert_scale_keys(model: nn.Module) -> list[str]:
    from .model_patches.experts import MATRICES, LowBitExperts

    keys = []
    for name, module in model.named_modules():
        if isinstance(module, LowBitExperts) and module.mode == "infer":
            for matrix in MATRICES:
                keys += [f"{name}.{tensor}" for tensor in module.packed_names(matrix)[1:]
                         if getattr(module, tensor, None) is not None]
    return keys


def reverse_conversion_grabs(model: nn.Module) -> list[str]:
    """Packed expert scale keys that transformers' reversed weight conversions would rename (and so mangle)."""
    from transformers.core_model_loading import WeightConverter

    keys = _packed_expert_scale_keys(model)
    if not keys:
        return []
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    reversed_converters = [c.reverse_transform() for c in conversions or [] if isinstance(c, WeightConverter)]
    return [key for key in keys if any(r.rename_source_key(key)[1] is not None for r in reversed_converters)]


def resolve_save_original_format(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Default ``kwargs["save_original_format"]`` to False for models with packed experts (fused layout).

    Raises ValueError when the caller asked for ``save_original_format=True`` and this transformers cannot write it.
    """
    if "save_original_format" not in kwargs:
        if _packed_expert_scale_keys(model):
            kwargs["save_original_format"] = False
        return
    grabbed = reverse_conversion_grabs(model) if kwargs["save_original_format"] else []
    if grabbed:
        import transformers

        raise ValueError(f"save_pretrained: save_original_format=True is not possible for packed FP4 experts with "
                         f"transformers {transformers.__version__}: its per-expert key conversion would also split "
                         f"{grabbed[0]!r}; allowed: save_original_format=False (fused layout, reloads with every "
                         "supported transformers version)")
