"""`LowBitConfig`: every switch of hf_lowbit in one `transformers` quantization config.

Validated at construction (each error names the field, the value and what is allowed) and JSON round-trippable:
`from_pretrained` rebuilds it with `LowBitConfig(**config_dict)` from a checkpoint's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .numerics import FORMATS

QUANT_METHOD = "hf_lowbit"

#: Modules kept in high precision unless the user says otherwise: embeddings, the output head, MoE routers and
#: the Qwen2-MoE shared-expert gate. Patterns match whole dotted name components (see `module_matches`).
DEFAULT_MODULES_TO_NOT_CONVERT = ["embed_tokens", "lm_head", "mlp.gate", "router", "shared_expert_gate"]

_CHOICES: dict[str, tuple] = {
    "format": tuple(sorted(FORMATS)),
    "mode": ("train", "infer"),
    "stochastic_rounding": ("gradients", "all", "none"),
    "block_axis": ("reduction", "last"),
    "weight_blocks": ("1d", "2d"),
    "activations": ("fp4", "none"),
    "backend": ("auto", "triton", "torch"),
    "mx_scale": ("floor", "ceil"),
    "moe": (None, "sd"),
    "sd_init": ("preserve", "project", "scratch"),
}
_BOOLS = ("mean_center", "hadamard")
_OPTIONAL_BOOLS = ("mean_center_activations", "mean_center_gradients")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"LowBitConfig: {field}={value!r} is not valid; allowed: {allowed}")


@dataclass(frozen=True)
class Recipe:
    """The numerics a layer runs, derived from a `LowBitConfig` (hashable, cheap to pass to autograd functions)."""

    format: str = "nvfp4"
    center_activations: bool = True
    center_gradients: bool = True
    sr_weights: bool = False
    sr_activations: bool = False
    sr_gradients: bool = True
    block_axis: str = "reduction"
    weight_blocks: str = "1d"
    hadamard: bool = False
    mx_scale: str = "floor"
    activations: str = "fp4"

    @property
    def weight_block_2d(self) -> bool:
        return self.weight_blocks == "2d"


class LowBitConfig(QuantizationConfigMixin):
    """Configuration of mean-centred FP4 quantization for `from_pretrained(..., quantization_config=...)`.

    Args:
        format: ``"nvfp4"`` (16-element blocks, E4M3 scales, FP32 tensor scale) or ``"mxfp4"`` (32, E8M0).
        mode: ``"train"`` keeps high-precision master weights and runs W4A4G4 quantization-aware training;
            ``"infer"`` stores packed FP4 weights (no master copy).
        mean_center: Averis mean-residual splitting of GEMM inputs and output gradients.
        mean_center_activations / mean_center_gradients: override `mean_center` for one side (``None`` follows it).
        stochastic_rounding: ``"gradients"`` (output gradients only, the paper's default), ``"all"`` or ``"none"``.
        hadamard: random 16×16 Hadamard transform (random signs) on the weight-gradient GEMM operands.
        block_axis: ``"reduction"`` quantizes every GEMM operand along that GEMM's reduction axis (what FP4 tensor
            cores need); ``"last"`` quantizes each tensor once along its last axis and reuses it.
        weight_blocks: ``"1d"`` (1×16 / 1×32 blocks) or ``"2d"`` (16×16 / 32×32 tiles: one quantized weight serves
            both the forward and the input-gradient GEMM).
        activations: at inference, ``"fp4"`` quantizes activations too (W4A4, what training saw) or ``"none"``
            (weight-only W4A16).
        modules_to_not_convert: module name patterns kept in high precision (whole dotted components match).
        backend: ``"auto"`` (Triton kernels on CUDA when available, else torch), ``"triton"`` or ``"torch"``.
        mx_scale: MXFP4 block-scale rule, ``"floor"`` (OCP spec) or ``"ceil"`` (no block-max saturation).
        seed: base seed of the stochastic-rounding streams (runs repeat bit for bit on the torch backend).
        moe, sd_rank, sd_refresh_every, sd_init: SD-MoE options for MoE models.
    """

    def __init__(
        self,
        format: str = "nvfp4",
        mode: str = "train",
        mean_center: bool = True,
        mean_center_activations: bool | None = None,
        mean_center_gradients: bool | None = None,
        stochastic_rounding: str = "gradients",
        hadamard: bool = False,
        block_axis: str = "reduction",
        weight_blocks: str = "1d",
        activations: str = "fp4",
        modules_to_not_convert: list[str] | None = None,
        backend: str = "auto",
        mx_scale: str = "floor",
        seed: int = 0,
        moe: str | None = None,
        sd_rank: int = 8,
        sd_refresh_every: int = 16,
        sd_init: str = "preserve",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)  # written by to_dict(); always ours
        if kwargs:
            raise ValueError(f"LowBitConfig: unknown field(s) {sorted(kwargs)}; allowed: {sorted(self._fields())}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.mode = mode
        self.mean_center = mean_center
        self.mean_center_activations = mean_center_activations
        self.mean_center_gradients = mean_center_gradients
        self.stochastic_rounding = stochastic_rounding
        self.hadamard = hadamard
        self.block_axis = block_axis
        self.weight_blocks = weight_blocks
        self.activations = activations
        self.modules_to_not_convert = (list(DEFAULT_MODULES_TO_NOT_CONVERT) if modules_to_not_convert is None
                                       else modules_to_not_convert)
        self.backend = backend
        self.mx_scale = mx_scale
        self.seed = seed
        self.moe = moe
        self.sd_rank = sd_rank
        self.sd_refresh_every = sd_refresh_every
        self.sd_init = sd_init
        self.post_init()
        object.__setattr__(self, "_validated", True)

    @staticmethod
    def _fields() -> list[str]:
        import inspect

        return [p for p in inspect.signature(LowBitConfig.__init__).parameters if p not in ("self", "kwargs")]

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming field, value and allowed values."""
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                _fail(field, value, str(list(allowed)))
        for field in _BOOLS:
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "True or False")
        for field in _OPTIONAL_BOOLS:
            if getattr(self, field) not in (None, True, False):
                _fail(field, getattr(self, field), "None, True or False")
        if not (isinstance(self.modules_to_not_convert, list)
                and all(isinstance(m, str) and m for m in self.modules_to_not_convert)):
            _fail("modules_to_not_convert", self.modules_to_not_convert, "a list of non-empty module name patterns")
        for field, lo in (("seed", 0), ("sd_rank", 1), ("sd_refresh_every", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                _fail(field, value, f"an integer >= {lo}")
        if self.hadamard and self.block_axis != "reduction":
            _fail("hadamard", self.hadamard,
                  "False when block_axis='last' (the token-axis Hadamard transform needs token-axis blocks: "
                  "set block_axis='reduction')")
        if self.mode == "train" and self.activations != "fp4":
            _fail("activations", self.activations, "'fp4' when mode='train' (training is W4A4G4)")

    @property
    def center_activations(self) -> bool:
        return self.mean_center if self.mean_center_activations is None else self.mean_center_activations

    @property
    def center_gradients(self) -> bool:
        return self.mean_center if self.mean_center_gradients is None else self.mean_center_gradients

    def recipe(self) -> Recipe:
        """The per-layer numerics this config asks for."""
        sr = self.stochastic_rounding
        return Recipe(
            format=self.format,
            center_activations=self.center_activations,
            center_gradients=self.center_gradients,
            sr_weights=sr == "all",
            sr_activations=sr == "all",
            sr_gradients=sr in ("all", "gradients"),
            block_axis=self.block_axis,
            weight_blocks=self.weight_blocks,
            hadamard=self.hadamard,
            mx_scale=self.mx_scale,
            activations=self.activations,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD}
        out.update({f: getattr(self, f) for f in self._fields()})
        out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # Re-validate assignments after construction (e.g. `from_dict(..., **kwargs)` sets attributes).
        if getattr(self, "_validated", False) and name in self._fields():
            self.post_init()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowBitConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:  # configs are mutable; identity hash like the other HF configs
        return id(self)


def module_matches(name: str, patterns: list[str]) -> bool:
    """True if a pattern is a whole run of dotted components of `name` (``"mlp.gate"`` ≠ ``"mlp.gate_proj"``)."""
    padded = f".{name}."
    return any(f".{p.strip('.')}." in padded for p in patterns)
