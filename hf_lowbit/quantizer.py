"""`LowBitHfQuantizer`: the transformers plugin behind `quant_method="hf_lowbit"`.

Lifecycle inside `from_pretrained`:
1. `validate_environment` / `update_dtype` / `update_device_map`: fail early with clear errors.
2. `_process_model_before_weight_loading` (model on the meta device): swap the linears inside decoder blocks for
   `LowBitLinear`: master weights for ``mode="train"``; packed parameters for a pre-quantized ``mode="infer"``
   checkpoint (loaded by name); a float placeholder `weight` for quantize-on-load into ``mode="infer"``.
3. Quantize-on-load: `param_needs_quantization` marks those placeholders, `LowBitQuantizeOp` packs each weight as
   it arrives and writes the packed parameters into the module.
4. `_process_model_after_weight_loading`: freeze packed parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from .config import LowBitConfig
from .hub import install_save_hooks
from .layers import LowBitLinear
from .model_patches import MATRICES, LowBitExperts, swap_experts
from .replace import swap_linears

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A meta float parameter with the checkpoint tensor's shape (quantize-on-load target)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class LowBitQuantizeOp(ConversionOps):
    """Quantize-on-load: pack a float checkpoint weight straight into its `LowBitLinear` (no float copy kept)."""

    def __init__(self, hf_quantizer: "LowBitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module, tensor_name = get_module_from_name(model, key)
            with torch.no_grad():
                if isinstance(module, LowBitLinear) and tensor_name == "weight":
                    module.weight = nn.Parameter(tensor.detach(), requires_grad=False)
                    module.mode = "train"
                    module.to_infer()
                elif isinstance(module, LowBitExperts) and tensor_name in MATRICES:
                    module.load_packed(tensor_name, module.quantize_weight(tensor))
                else:
                    raise ValueError(f"hf_lowbit: unexpected tensor {key!r} in quantize-on-load")
            prefix = key.rsplit(".", 1)[0]
            for name in module.packed_names(tensor_name):
                param = getattr(module, name, None)
                if param is not None:  # tells transformers not to run its random init over the packed data
                    param._is_hf_initialized = True
                if missing_keys is not None:
                    missing_keys.discard(f"{prefix}.{name}")
        return {}


class LowBitHfQuantizer(HfQuantizer):
    """Swaps linears for mean-centred FP4 `LowBitLinear` modules; trainable (QAT) in mode='train'."""

    requires_calibration = False
    quantization_config: LowBitConfig

    def __init__(self, quantization_config: LowBitConfig, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = LowBitConfig(**quantization_config)
        super().__init__(quantization_config, **kwargs)

    # -- environment ---------------------------------------------------------------------------------------------
    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if cfg.backend == "triton":
            from .backend import available_backends

            if not torch.cuda.is_available() or "triton" not in available_backends("cuda"):
                raise RuntimeError("LowBitConfig: backend='triton' needs a CUDA GPU and the `triton` package "
                                   "(pip install 'hf-lowbit[gpu]'); use backend='auto' to fall back to torch")
        if isinstance(device_map, dict) and "disk" in set(map(str, device_map.values())):
            raise ValueError("hf_lowbit does not support disk offload (device_map values 'disk'); "
                             "use GPU and CPU devices only")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is None:
            return torch.float32
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"hf_lowbit: dtype={dtype} is not supported; allowed: {list(_FLOAT_DTYPES)} "
                             "(the high-precision dtype of master weights, activations and unconverted modules)")
        return dtype

    def update_device_map(self, device_map: Any) -> Any:
        return device_map

    # -- module swap -----------------------------------------------------------------------------------------------
    def modules_to_skip(self, model: nn.Module) -> list[str]:
        """User patterns + transformers' defaults (tied/output embeddings) + `_keep_in_fp32_modules`."""
        return self.get_modules_to_not_convert(model, list(self.quantization_config.modules_to_not_convert),
                                               getattr(model, "_keep_in_fp32_modules", None) or None,
                                               add_default_skips=True)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        self.modules_to_not_convert = self.modules_to_skip(model)
        packed_storage = cfg.mode == "infer" and self.pre_quantized
        storage = "infer" if packed_storage else "train"
        names = swap_linears(model, cfg, self.modules_to_not_convert, storage)
        experts = swap_experts(model, cfg, self.modules_to_not_convert, storage)
        # SD-MoE: a saved train-mode SD-MoE checkpoint has W_c / W_u keys (hf_lowbit.model_patches.sd_moe)
        if cfg.moe == "sd" and storage == "train" and self.pre_quantized:
            from .model_patches.sd_moe import swap_to_sd

            swap_to_sd(model, experts, cfg)
        if cfg.mode == "infer" and not self.pre_quantized:
            # float placeholders receive the checkpoint tensors, which the quantize op packs as they arrive
            for name in names:
                module = model.get_submodule(name)
                module.mode = "infer"
                module._make_packed_params(device=module.weight.device)
                module.weight = _placeholder((module.out_features, module.in_features), module.compute_dtype)
            for name in experts:
                module = model.get_submodule(name)
                module.mode = "infer"
                module._make_packed_params(device=module.gate_up_proj.device)
                for m in MATRICES:
                    shape = (module.num_experts, module._out_features(m), module._in_features(m))
                    setattr(module, m, _placeholder(shape, module.compute_dtype))
        self.converted_modules = names + experts
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized or self.quantization_config.mode != "infer":
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, LowBitExperts):
            return tensor_name in MATRICES and module.mode == "infer"
        return isinstance(module, LowBitLinear) and tensor_name == "weight" and module.mode == "infer"

    def get_quantize_ops(self) -> ConversionOps:
        return LowBitQuantizeOp(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        install_save_hooks(model)  # save_pretrained/push_to_hub also write the model card (hf_lowbit.hub)
        # SD-MoE: split the (FP4) experts into W_c + W_u, or refresh the bases of a reloaded SD-MoE checkpoint
        cfg = self.quantization_config
        if cfg.moe == "sd" and cfg.mode == "train":
            from .model_patches.sd_moe import apply_sd_moe

            skip = getattr(self, "modules_to_not_convert", None) or self.modules_to_skip(model)
            apply_sd_moe(model, rank=cfg.sd_rank, init=cfg.sd_init, refresh_every=cfg.sd_refresh_every,
                         seed=cfg.seed, skip=skip)
        for module in model.modules():  # transformers makes every loaded float tensor trainable: freeze packed ones
            if isinstance(module, (LowBitLinear, LowBitExperts)) and module.mode == "infer":
                tensors = ("weight",) if isinstance(module, LowBitLinear) else MATRICES
                for name in (n for t in tensors for n in module.packed_names(t)):
                    if getattr(module, name, None) is not None:
                        getattr(module, name).requires_grad_(False)
        return model

    # -- capabilities ----------------------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Train mode: full QAT. Infer mode: adapters (PEFT) on the frozen packed base."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Full-parameter training needs master weights, i.e. mode='train'."""
        return self.quantization_config.mode == "train"

    @property
    def is_compileable(self) -> bool:
        return False

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Replace every LowBitLinear by a plain nn.Linear holding the weight the FP4 forward saw."""
        if isinstance(dtype, str):  # transformers passes config.dtype, e.g. "bfloat16"
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, LowBitLinear):
                w = module.dequantized_weight(dtype or module.compute_dtype)
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if module.bias is not None:
                        lin.bias.copy_(module.bias)
                model.set_submodule(name, lin)
            elif isinstance(module, LowBitExperts):  # back to float experts with the stock (high-precision) math
                gate_up, down = module.dequantized_weights()
                target = dtype or module.compute_dtype
                module.mode, module.recipe = "train", None
                for m, w in zip(MATRICES, (gate_up, down)):
                    setattr(module, m, nn.Parameter(w.to(target)))
                    for suffix in ("_scale", "_tensor_scale"):
                        if hasattr(module, m + suffix):
                            delattr(module, m + suffix)
        return model

