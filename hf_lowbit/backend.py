"""Backend dispatch: one object per implementation of the FP4 operations layers need.

Layers never branch on the device: they ask `resolve_backend(name, device)` for an object with
`linear_train`, `linear_packed` and `quantize`. The torch backend is the reference; an accelerated backend
(e.g. Triton kernels in `hf_lowbit.kernels`) registers itself with `register_backend` and may subclass
`TorchBackend` to override only what it speeds up.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import averis
from .config import Recipe
from .numerics import PackedTensor, dequantize, quantize


class TorchBackend:
    """Reference implementation in plain PyTorch (CPU and GPU)."""

    name = "torch"

    def linear_train(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                     seed: int) -> torch.Tensor:
        """W4A4G4 Averis linear with autograd (master weight `weight`)."""
        return averis.averis_linear(x, weight, bias, recipe, seed)

    def linear_packed(self, x: torch.Tensor, packed_weight: PackedTensor, bias: torch.Tensor | None,
                      recipe: Recipe) -> torch.Tensor:
        """Inference linear on a packed FP4 weight (W4A4 or W4A16 per `recipe.activations`)."""
        return averis.packed_linear(x, packed_weight, bias, recipe)

    def prepare_grouped_weight(self, weight: torch.Tensor, recipe: Recipe, seed: int, need_dgrad: bool
                               ) -> object | None:
        """The weight's FP4 operands for `grouped_linear_train(..., prepared=)`, computed ahead of the call (the
        MoE experts enqueue them before their routing's host sync); None: this backend prepares nothing."""
        return None

    def grouped_linear_train(self, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, recipe: Recipe,
                             seed: int, prepared: object | None = None) -> torch.Tensor:
        """W4A4G4 Averis linear of G groups (MoE experts): x [G, L, K] · weight [G, N, K]ᵀ, with autograd.
        `prepared`: what `prepare_grouped_weight(weight, recipe, seed, ...)` returned (the same weight and seed)."""
        return averis.grouped_averis_linear(x, weight, mask, recipe, seed)

    def grouped_linear_packed(self, x: torch.Tensor, packed_weight: PackedTensor, mask: torch.Tensor,
                              recipe: Recipe) -> torch.Tensor:
        """Inference linear of G groups on packed weights [G, N, K] (W4A4 or W4A16)."""
        w_q = dequantize(packed_weight)
        if recipe.activations == "none":
            return x @ w_q.transpose(-1, -2).to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return averis.packed_grouped_linear(x, w_q, mask, recipe)

    def quantize(self, x: torch.Tensor, format: str, axis: int = -1, rounding: str = "rtn",
                 generator: torch.Generator | None = None, block_2d: bool = False, mx_scale: str = "floor"
                 ) -> PackedTensor:
        """Quantize a tensor to packed FP4 (see `hf_lowbit.numerics.quantize`)."""
        return quantize(x, format, axis, rounding, generator, block_2d, mx_scale)


# name → (factory, availability check taking a device)
_REGISTRY: dict[str, tuple[Callable[[], TorchBackend], Callable[[torch.device], bool]]] = {
    "torch": (TorchBackend, lambda device: True),
}
_INSTANCES: dict[str, TorchBackend] = {}
_AUTO_ORDER = ["triton", "torch"]


def register_backend(name: str, factory: Callable[[], TorchBackend],
                     is_available: Callable[[torch.device], bool]) -> None:
    """Make a backend selectable by name (and by `"auto"` when `is_available(device)` is true)."""
    _REGISTRY[name] = (factory, is_available)
    _INSTANCES.pop(name, None)


def _load_optional_backends() -> None:
    if "triton" not in _REGISTRY:
        try:  # registers itself on import; absent or broken triton simply leaves the torch backend
            from . import kernels  # noqa: F401
        except ImportError:
            pass


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends usable on `device`, in `"auto"` preference order."""
    _load_optional_backends()
    device = torch.device(device)
    return [n for n in _AUTO_ORDER if n in _REGISTRY and _REGISTRY[n][1](device)]


def resolve_backend(name: str, device: torch.device | str) -> TorchBackend:
    """The backend object for a config's `backend` field on `device`; clear error if it cannot run there."""
    device = torch.device(device)
    if name == "auto":
        name = available_backends(device)[0]
    else:
        _load_optional_backends()
        if name not in _REGISTRY:
            raise ValueError(f"backend={name!r} is not installed; available here: {available_backends(device)}")
        if not _REGISTRY[name][1](device):
            raise RuntimeError(f"backend={name!r} cannot run on device {device}; "
                               f"available there: {available_backends(device)} (use backend='auto')")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name][0]()
    return _INSTANCES[name]
