"""`LowBitLinear`: the mean-centred FP4 drop-in for `nn.Linear`.

It subclasses `nn.Linear` so that PEFT wraps it with standard LoRA and code that checks `isinstance(m, nn.Linear)`
keeps working. Two storage modes:

* ``"train"``: `weight` is the high-precision master weight; the forward/backward run W4A4G4 with Averis.
* ``"infer"``: `weight` holds packed FP4 codes ``uint8 [out, ceil(in/B)*B/2]`` (blocks along in-features),
  `weight_scale` the block scales ``uint8 [out, ceil(in/B)]`` (E4M3 bits / E8M0 exponents) and, for NVFP4,
  `weight_tensor_scale` the FP32 tensor scale. All are `nn.Parameter(requires_grad=False)` (FSDP2 shards
  parameters, not buffers).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .averis import mix_seed
from .backend import resolve_backend
from .config import Recipe
from .numerics import PackedTensor, dequantize, get_format, pack_codes, quantize, unpack_codes

_layer_ids = itertools.count()


def packed_shapes(out_features: int, in_features: int, format: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (codes, block scales) of a packed [out, in] weight."""
    b = get_format(format).block_size
    n_blocks = -(-in_features // b)
    return (out_features, n_blocks * b // 2), (out_features, n_blocks)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def to_row_blocks(p: PackedTensor) -> PackedTensor:
    """Express a weight quantized in 2-D tiles with one scale per 1×B row block (the same values, bit for bit)."""
    if not p.block_2d:
        return p
    b = p.fmt.block_size
    rows = p.shape[-2]
    scales = p.scales.repeat_interleave(b, dim=-2)[..., :rows, :]
    codes = unpack_codes(p.codes)[..., :rows, :]
    return PackedTensor(pack_codes(codes).contiguous(), scales.contiguous(), p.tensor_scale, p.shape,
                        len(p.shape) - 1, p.format, False)


class LowBitLinear(nn.Linear):
    """Linear layer computing in mean-centred FP4 (see module docstring for the two modes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Recipe | None = None, mode: str = "train", backend: str = "auto", seed: int = 0) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or Recipe()
        self.mode = mode
        self.backend = backend
        self.base_seed = seed
        self.layer_id = next(_layer_ids)
        self.calls = 0
        self.compute_dtype = self.weight.dtype  # PEFT reads this to pick the LoRA dtype over a packed base
        if mode == "infer":
            self._make_packed_params(device)
        elif mode != "train":
            raise ValueError(f"LowBitLinear: mode={mode!r} is not valid; allowed: ['train', 'infer']")

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, mode: str = "train", backend: str = "auto",
                    seed: int = 0) -> "LowBitLinear":
        """Build a LowBitLinear with the shape, device and dtype of `linear` (weights not copied: meta-friendly)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype, recipe=recipe, mode=mode,
                   backend=backend, seed=seed)

    # -- packed storage ------------------------------------------------------------------------------------------
    @staticmethod
    def packed_names(tensor_name: str = "weight") -> tuple[str, ...]:
        """Parameter names holding the packed form of `tensor_name` (codes, block scales, tensor scale)."""
        return (tensor_name, f"{tensor_name}_scale", f"{tensor_name}_tensor_scale")

    def _make_packed_params(self, device=None) -> None:
        codes_shape, scale_shape = packed_shapes(self.out_features, self.in_features, self.recipe.format)
        device = device if device is not None else self.weight.device
        self.weight = _frozen(torch.zeros(codes_shape, dtype=torch.uint8, device=device))
        self.weight_scale = _frozen(torch.zeros(scale_shape, dtype=torch.uint8, device=device))
        if get_format(self.recipe.format).has_tensor_scale:
            self.weight_tensor_scale = _frozen(torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.weight_tensor_scale = None

    def packed_weight(self) -> PackedTensor:
        """The packed weight as a `PackedTensor` view of this module's parameters."""
        if self.mode != "infer":
            raise RuntimeError("packed_weight() is only defined in mode='infer'; call hf_lowbit.finalize(model)")
        ts = self.weight_tensor_scale
        return PackedTensor(self.weight, self.weight_scale, None if ts is None else ts.detach(),
                            (self.out_features, self.in_features), 1, self.recipe.format, False)

    def quantized_weight(self) -> PackedTensor:
        """The weight exactly as the forward GEMM sees it, packed with 1×B blocks along in-features (RTN)."""
        if self.mode == "infer":
            return self.packed_weight()
        p = quantize(self.weight.detach().float(), self.recipe.format, 1, "rtn",
                     block_2d=self.recipe.weight_block_2d, mx_scale=self.recipe.mx_scale)
        return to_row_blocks(p)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight as the forward sees it (FP32 by default)."""
        return dequantize(self.quantized_weight(), dtype or torch.float32)

    @torch.no_grad()
    def to_infer(self) -> None:
        """Replace the master weight by its packed FP4 form (in place); the module then runs inference only."""
        if self.mode == "infer":
            return
        p = self.quantized_weight()
        self.compute_dtype = self.weight.dtype
        self.weight = _frozen(p.codes.contiguous())
        self.weight_scale = _frozen(p.scales.contiguous())
        self.weight_tensor_scale = None if p.tensor_scale is None else _frozen(p.tensor_scale.float().reshape(()))
        self.mode = "infer"

    @torch.no_grad()
    def load_packed(self, p: PackedTensor) -> None:
        """Set this (infer-mode) module's packed parameters from a 1-D-blocked PackedTensor of shape [out, in]."""
        p = to_row_blocks(p)
        if p.shape != (self.out_features, self.in_features) or p.axis != 1 or p.format != self.recipe.format:
            raise ValueError(f"packed weight of shape {p.shape}, axis {p.axis}, format {p.format!r} does not fit "
                             f"{self.out_features}x{self.in_features} {self.recipe.format}")
        self.weight = _frozen(p.codes.contiguous())
        self.weight_scale = _frozen(p.scales.contiguous())
        if p.tensor_scale is not None:
            self.weight_tensor_scale = _frozen(p.tensor_scale.float().reshape(()))

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self.backend, x.device)
        if self.mode == "infer":
            return backend.linear_packed(x, self.packed_weight(), self.bias, self.recipe)
        seed = mix_seed(self.base_seed, self.layer_id, self.calls)
        self.calls += 1
        return backend.linear_train(x, self.weight, self.bias, self.recipe, seed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.recipe.format}, mode={self.mode}")
