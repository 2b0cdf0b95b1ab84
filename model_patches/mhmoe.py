"""MH-MoE and LoRAMoE adapters as a PEFT method (``peft_type="MHMOE"``).

The router input ``h ∈ R^d`` (the input of the MLP / MoE block, after the post-attention norm; or the input of one
projection) is split into ``H = num_heads`` contiguous slices of ``d/H``. Slice ``m`` has its own fp32 router
``W_rt^(m) ∈ R^{K×d/H}`` and a private bank of ``K`` LoRA-style experts ``E_j^(m)(h_m) = (α/r)·B_j A_j h_m``
(``A: d/H → r``, ``B: r → d_out``, B zero-initialised so the adapted model starts equal to the base). Each slice
picks its top-k experts; the slice outputs are summed (no merge projection). ``num_heads=1`` is LoRAMoE.

Placement ``"mlp"`` (default) wraps each decoder layer's ``mlp`` (dense MLP or native MoE block):
``out = mlp(x) + mhmoe(x)``. Placement ``"projections"`` wraps each gate/up/down projection (LoRAMoE style).

Gate modes: ``"topk_softmax"`` is the literal rule (softmax over the selected top-k logits; at top-1 the weight is
exactly 1 and the router gets no gradient); ``"full_softmax"`` is Switch-style (softmax over all K, the selected
experts keep their probabilities; the router trains). The default is ``"full_softmax"``.

Implementation: one vectorized path, no Python loop over slices or experts. All K experts of every slice are
computed and the unselected ones are masked by a dense ``[N, H, K]`` gate tensor (zeros off the top-k):

* ``u = einsum(x_slices[N,H,d/H], A[H,K,r,d/H]) → [N,H,K,r]`` costs ``N·K·r·d``;
* ``y = (gates ⊙ u)[N, H·K·r] @ B[H·K·r, d_out]`` is one GEMM costing ``N·H·K·r·d_out``.

This wastes a factor ``K/k`` of adapter FLOPs, but with LoRA ranks the adapter is a few percent of the MLP's cost, the
two GEMMs are large and regular, and no per-token weight gather is materialised. Gathering the selected experts'
weights instead would copy ``N·k·r·d`` weight elements per forward (far more memory traffic than the masked FLOPs),
and a grouped GEMM would need sorting/looping over experts.

Registration runs on import (guarded against double registration). Import this module (or ``hf_lowbit``) before
``PeftModel.from_pretrained`` of an MH-MoE adapter, in every process.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.peft_types import PeftType, register_peft_method

PEFT_METHOD = "mhmoe"
PREFIX = "mhmoe_"
GATE_MODES = ("topk_softmax", "full_softmax")
PLACEMENTS = ("mlp", "projections")
DEFAULT_TARGETS = {"mlp": ["mlp"], "projections": ["gate_proj", "up_proj", "down_proj"]}


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to the `PeftType` enum (PEFT's registry only accepts enum members); idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


MHMOE = _extend_peft_type(PEFT_METHOD.upper())


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MHMoEConfig(PeftConfig):
    """Configuration of an MH-MoE adapter (LoRAMoE when ``num_heads=1``).

    Args:
        num_heads: H, number of contiguous slices of the router input (must divide its width).
        num_experts: K, experts per slice.
        top_k: experts selected per slice and token.
        r: rank of each LoRA-style expert.
        lora_alpha: expert scaling is ``lora_alpha / r``.
        lora_dropout: dropout on the expert input (not on the router input).
        gate_mode: ``"full_softmax"`` (Switch-style, router trains) or ``"topk_softmax"`` (literal top-k softmax).
        placement: ``"mlp"`` (parallel to each decoder layer's MLP / MoE block) or ``"projections"`` (one module per
            gate/up/down projection).
        target_modules: module names to adapt; default ``["mlp"]`` or ``["gate_proj", "up_proj", "down_proj"]``.
        exclude_modules, layers_to_transform, layers_pattern: PEFT's usual target filters.
        load_balancing_coef: coefficient of the per-slice Switch load-balancing loss (0 disables it); the loss of the
            last training forward is stored on every expert bank and summed by `mhmoe_aux_loss(model)`.
        init_weights: zero-initialise B (the adapted model starts equal to the base); False draws B randomly
            (for tests).
        modules_to_save: extra modules trained and saved in full.
    """

    num_heads: int = field(default=8, metadata={"help": "H: slices of the router input"})
    num_experts: int = field(default=4, metadata={"help": "K: experts per slice"})
    top_k: int = field(default=1, metadata={"help": "experts selected per slice and token"})
    r: int = field(default=8, metadata={"help": "expert rank"})
    lora_alpha: float = field(default=16, metadata={"help": "expert scaling is lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the expert input"})
    gate_mode: str = field(default="full_softmax", metadata={"help": f"one of {GATE_MODES}"})
    placement: str = field(default="mlp", metadata={"help": f"one of {PLACEMENTS}"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    load_balancing_coef: float = field(default=0.0, metadata={"help": "per-slice load-balancing loss coefficient"})
    init_weights: bool = field(default=True, metadata={"help": "zero-init B so the adapter starts as identity"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MHMOE
        for name, lo in (("num_heads", 1), ("num_experts", 1), ("top_k", 1), ("r", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"MHMoEConfig: {name}={value!r} is not valid; allowed: an integer >= {lo}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MHMoEConfig: top_k={self.top_k} is not valid; allowed: <= num_experts "
                             f"({self.num_experts})")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"MHMoEConfig: gate_mode={self.gate_mode!r} is not valid; allowed: {list(GATE_MODES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"MHMoEConfig: placement={self.placement!r} is not valid; allowed: {list(PLACEMENTS)}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"MHMoEConfig: lora_dropout={self.lora_dropout!r} is not valid; allowed: [0, 1)")
        if float(self.load_balancing_coef) < 0:
            raise ValueError(f"MHMoEConfig: load_balancing_coef={self.load_balancing_coef!r} is not valid; "
                             "allowed: >= 0")
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGETS[self.placement])
        elif isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r


def activated_params(config: MHMoEConfig, d_in: int, d_out: int) -> dict[str, int]:
    """Parameters of one adapter module: total, and activated per token (routers + the top-k experts per slice)."""
    h, k, e, r = config.num_heads, config.top_k, config.num_experts, config.r
    expert = r * (d_in // h) + r * d_out
    router = e * d_in
    return {"total": router + h * e * expert, "activated": router + h * k * expert, "router": router}


# ---------------------------------------------------------------------------------------------------------------------
# The expert bank: the vectorized MH-MoE forward
# ---------------------------------------------------------------------------------------------------------------------
def _softmax_small(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last axis (K experts) as plain elementwise ops: `torch.softmax` over K ≈ 4 with N·H rows
    is ~10× slower on CPU (it parallelises over the last axis)."""
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _select(values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis; `max` for k = 1 (the common case, much cheaper than `topk`)."""
    if top_k == 1:
        top, idx = values.max(dim=-1, keepdim=True)
        return top, idx
    return values.topk(top_k, dim=-1)


def _gates(logits: torch.Tensor, top_k: int, gate_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense gate weights ``[..., K]`` (zero off the top-k) and the selected expert indices ``[..., k]``."""
    if gate_mode == "topk_softmax":
        top, idx = _select(logits, top_k)
        weights = _softmax_small(top)
    else:
        weights, idx = _select(_softmax_small(logits), top_k)
    return torch.zeros_like(logits).scatter(-1, idx, weights), idx


def load_balancing_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss per slice, averaged over slices: ``K · Σ_j f_j · P_j`` (1 when balanced).

    `logits` ``[N, H, K]`` (fp32), `idx` ``[N, H, k]``; f = fraction of routing slots given to expert j, P = mean
    router probability of expert j.
    """
    n, h, k_all = logits.shape
    probs = logits.softmax(dim=-1).mean(dim=0)  # [H, K]
    counts = torch.zeros(h, k_all, device=logits.device, dtype=logits.dtype)
    counts.scatter_add_(1, idx.transpose(0, 1).reshape(h, -1),
                        torch.ones(h, idx.shape[0] * idx.shape[2], device=logits.device, dtype=logits.dtype))
    frac = counts / max(1, n * idx.shape[2])
    return k_all * (frac * probs).sum(dim=-1).mean()


class MHMoEBank(nn.Module):
    """H routers and H·K LoRA-style experts of one adapter, evaluated for all slices and experts at once.

    Parameters: ``router [H, K, d_in/H]``, ``lora_A [H, K, r, d_in/H]``, ``lora_B [H, K, r, d_out]``.
    After each forward: ``aux_loss`` (load-balancing loss when training with a positive coefficient, else None);
    when ``route_sink`` is a list, the selected indices ``[..., H, k]`` are appended to it (see `record_routes`).
    """

    def __init__(self, d_in: int, d_out: int, config: MHMoEConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        h, e, r = config.num_heads, config.num_experts, config.r
        if d_in % h:
            raise ValueError(f"MHMoEConfig: num_heads={h} does not divide the router input width {d_in}")
        self.d_in, self.d_out, self.num_heads, self.num_experts, self.r = d_in, d_out, h, e, r
        self.top_k, self.gate_mode, self.scaling = config.top_k, config.gate_mode, config.scaling
        self.load_balancing_coef = float(config.load_balancing_coef)
        d_s = d_in // h
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Parameter(torch.empty(h, e, d_s, **kw))
        self.lora_A = nn.Parameter(torch.empty(h, e, r, d_s, **kw))
        self.lora_B = nn.Parameter(torch.empty(h, e, r, d_out, **kw))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.aux_loss: torch.Tensor | None = None
        self.route_sink: list[torch.Tensor] | None = None
        self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, zero_b: bool = True) -> None:
        """Router and A uniform in ±1/sqrt(d_in/H) (LoRA's kaiming-uniform bound); B zero (or uniform)."""
        bound = 1.0 / math.sqrt(self.d_in // self.num_heads)
        self.router.uniform_(-bound, bound)
        self.lora_A.uniform_(-bound, bound)
        if zero_b:
            self.lora_B.zero_()
        else:
            self.lora_B.uniform_(-bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router logits ``[N, H, K]``, dense gates ``[N, H, K]`` and indices ``[N, H, k]`` of ``x [N, d_in]``."""
        xs = x.reshape(x.shape[0], self.num_heads, -1).float().transpose(0, 1)           # [H, N, d/H]
        logits = torch.bmm(xs, self.router.float().transpose(1, 2))                         # [H, N, K]
        gates, idx = _gates(logits, self.top_k, self.gate_mode)
        # computed head-major (batched GEMM without copies); returned as [N, H, ·] views
        return logits.transpose(0, 1), gates.transpose(0, 1), idx.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        logits, gates, idx = self.route(flat)
        if self.route_sink is not None:
            self.route_sink.append(idx.detach().reshape(*lead, self.num_heads, self.top_k))
        self.aux_loss = (self.load_balancing_coef * load_balancing_loss(logits, idx)
                         if self.training and self.load_balancing_coef > 0 else None)
        n, h, e, r = flat.shape[0], self.num_heads, self.num_experts, self.r
        # head-major batched GEMMs on strided views (no permute copies of x); gates repeated over the rank axis
        xs = self.dropout(flat.to(self.lora_A.dtype)).reshape(n, h, -1).transpose(0, 1)  # [H, N, d/H]
        u = torch.bmm(xs, self.lora_A.reshape(h, e * r, -1).transpose(1, 2))              # [H, N, K·r]
        g = gates.to(u.dtype).transpose(0, 1).repeat_interleave(r, dim=-1)                # [H, N, K·r]
        z = (u * g).transpose(0, 1).reshape(n, h * e * r)
        y = (z @ self.lora_B.reshape(h * e * r, self.d_out)) * self.scaling
        return y.reshape(*lead, self.d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, num_heads={self.num_heads}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, gate_mode={self.gate_mode}")


# ---------------------------------------------------------------------------------------------------------------------
# PEFT tuner layer and tuner model
# ---------------------------------------------------------------------------------------------------------------------
def _base_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """Device and compute dtype of a (possibly packed FP4) base module: `compute_dtype` wins over uint8 weights."""
    device = next((p.device for p in module.parameters()), None)
    for m in module.modules():
        dt = getattr(m, "compute_dtype", None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return device, dt
    for p in module.parameters():
        if p.is_floating_point():
            return device, p.dtype
    return device, torch.get_default_dtype()


class MHMoELayer(nn.Module, BaseTunerLayer):
    """Wraps a target module: ``out = base(x) + Σ_active-adapters bank(x)`` (the first tuple element if a tuple)."""

    adapter_layer_names = ("mhmoe_banks",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MHMoEConfig, d_in: int, d_out: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.mhmoe_banks = nn.ModuleDict()
        self.in_features, self.out_features = d_in, d_out
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MHMoEConfig) -> None:
        """Add an expert bank for `adapter_name` in the base layer's device and compute dtype."""
        device, dtype = _base_device_dtype(self.get_base_layer())
        self.mhmoe_banks[adapter_name] = MHMoEBank(self.in_features, self.out_features, config, device, dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        return _base_device_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if check_adapters_to_merge(self, adapter_names):
            raise ValueError("MH-MoE adapters route every token to its own experts and cannot be merged into the "
                             "base weights; keep the adapter (or call unload() to drop it)")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.mhmoe_banks]
        if self.disable_adapters or not active:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        delta = self.mhmoe_banks[active[0]](x)
        for name in active[1:]:
            delta = delta + self.mhmoe_banks[name](x)
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def __repr__(self) -> str:
        return "mhmoe." + super().__repr__()


class MHMoEModel(BaseTuner):
    """PEFT tuner that wraps each target module (an MLP / MoE block or a projection) in an `MHMoELayer`."""

    prefix: str = PREFIX
    tuner_layer_cls = MHMoELayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: MHMoEConfig, model_config: dict) -> MHMoEConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = list(DEFAULT_TARGETS[peft_config.placement])
        return peft_config

    def _features(self, target: nn.Module, config: MHMoEConfig) -> tuple[int, int]:
        """(router input width, output width) of a target: a linear's in/out features, else the hidden size."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            return int(base.in_features), int(base.out_features)
        model_config = getattr(self.model, "config", None)
        if model_config is not None and hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        hidden = getattr(model_config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"MH-MoE: cannot tell the width of {type(base).__name__}; target linear layers or a "
                             "transformers model whose config has hidden_size")
        return int(hidden), int(hidden)

    def _create_and_replace(self, peft_config: MHMoEConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        if isinstance(target, MHMoELayer):
            target.update_layer(adapter_name, peft_config)
            return
        d_in, d_out = self._features(target, peft_config)
        new_module = MHMoELayer(target, adapter_name, peft_config, d_in, d_out)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Unloading puts the bare base module back: PEFT's version would copy `.weight` onto it, which an MLP or a
        # MoE block does not have.
        if not isinstance(new_module, MHMoELayer):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _check_merge_allowed(self) -> None:
        raise ValueError("MH-MoE adapters route every token to its own experts and cannot be merged into the base "
                         "weights; keep the adapter (or call unload() to drop it)")


def _register() -> None:
    """Register the method with PEFT once; a re-import (e.g. importlib.reload) refreshes the classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    owner = PEFT_TYPE_TO_CONFIG_MAPPING.get(MHMOE)
    if owner is None:
        register_peft_method(name=PEFT_METHOD, config_cls=MHMoEConfig, model_cls=MHMoEModel, prefix=PREFIX)
        return
    if owner.__qualname__ != MHMoEConfig.__qualname__ or PEFT_TYPE_TO_PREFIX_MAPPING.get(MHMOE) != PREFIX:
        raise KeyError(f"PEFT method {PEFT_METHOD!r} is already registered by {owner.__module__}.{owner.__qualname__}")
    PEFT_TYPE_TO_CONFIG_MAPPING[MHMOE] = MHMoEConfig
    PEFT_TYPE_TO_TUNER_MAPPING[MHMOE] = MHMoEModel


_register()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers for training loops and diagnostics
# ---------------------------------------------------------------------------------------------------------------------
def mhmoe_banks(model: nn.Module, adapter_name: str | None = None) -> dict[str, MHMoEBank]:
    """Expert banks by the name of the module they adapt (all adapters, or one), in model order."""
    out: dict[str, MHMoEBank] = {}
    for name, module in model.named_modules():
        if isinstance(module, MHMoELayer):
            for adapter, bank in module.mhmoe_banks.items():
                if adapter_name is None or adapter == adapter_name:
                    key = name if adapter_name is not None or len(module.mhmoe_banks) == 1 else f"{name}[{adapter}]"
                    out[key] = bank
    return out


def mhmoe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the load-balancing losses of the last training forward (None when none was computed).

    Add it to the task loss: ``loss = out.loss + (mhmoe_aux_loss(model) or 0)``.
    """
    losses = [b.aux_loss for b in mhmoe_banks(model).values() if b.aux_loss is not None]
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum() if losses else None


@contextmanager
def record_routes(model: nn.Module, adapter_name: str | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect the expert indices every bank selects: yields ``{module name: [idx [..., H, k] per forward]}``."""
    banks = mhmoe_banks(model, adapter_name)
    if not banks:
        warnings.warn("record_routes: the model has no MH-MoE adapter layers; nothing is recorded")
    sinks: dict[str, list[torch.Tensor]] = {name: [] for name in banks}
    for name, bank in banks.items():
        bank.route_sink = sinks[name]
    try:
        yield sinks
    finally:
        for bank in banks.values():
            bank.route_sink = None


__all__ = ["MHMoEBank", "MHMoEConfig", "MHMoELayer", "MHMoEModel", "activated_params", "load_balancing_loss",
           "mhmoe_aux_loss", "mhmoe_banks", "record_routes"]
