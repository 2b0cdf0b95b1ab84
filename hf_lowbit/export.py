"""`export`: an hf_lowbit model → the compressed-tensors packed FP4 layout that vLLM serves.

Layout (``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``, the presets NVFP4A16 / MXFP4A16 of compressed-tensors):
each FP4 linear ``X`` becomes ``X.weight_packed`` (uint8 E2M1 codes, two per byte, low nibble first: hf_lowbit's
own packing), ``X.weight_scale`` (one scale per 16 / 32 inputs: ``float8_e4m3fn`` for NVFP4, biased E8M0 ``uint8``
for MXFP4: hf_lowbit's bytes, reinterpreted) and, for NVFP4, ``X.weight_global_scale`` (FP32 ``[1]``). Routed
MoE experts are written per expert (``experts.{e}.gate_proj.weight_packed`` ...), the layout compressed-tensors
and vLLM use. Every other tensor is written under its state-dict name (tied weights once), and config.json gets
the compressed-tensors ``quantization_config``.

* Global scale: compressed-tensors divides by it (``value = code · scale / global``) and stores
  ``448·6/amax``, the reciprocal of hf_lowbit's tensor scale ``amax/(6·448)``; the export writes ``1/s_t`` in FP32.
  compressed-tensors dequantizes to BF16, and the result equals hf_lowbit's FP32 dequantization rounded to BF16,
  bit for bit (tested).
* Fused projections: vLLM runs q/k/v (and gate/up, and DeepSeek's q_a/kv_a) as one GEMM with one global scale
  (it takes the max of the shards' scales), so shards quantized with different NVFP4 tensor scales would decode
  wrongly. hf_lowbit gives every linear its own tensor scale, so by default (``fused_scales="requantize"``) the
  members of such a group are re-quantized with one shared tensor scale, the largest of the group (what
  llm-compressor does: no block scale can overflow E4M3), starting from the FP4 weights the model computes with
  (so a ``mode="train"`` model and its finalized copy export identically). The member that already has that scale
  keeps its exact bits;
  the others change slightly (their block scales are rounded to E4M3 against another tensor scale); the report
  gives each member's relative change. ``fused_scales="error"`` refuses instead. We requantize rather than refuse
  because nearly every NVFP4 model has such groups, so refusing would make the export useless; MXFP4 has no
  global scale and is always exact. (MoE experts already share one tensor scale per expert for gate/up.)
* Activations: hf_lowbit's W4A4 quantizes activations per call with its own dynamic tensor scale and Averis
  mean-centring, which compressed-tensors cannot express (its NVFP4 W4A4 needs a calibrated static
  ``input_global_scale`` and has no mean split). The export is therefore weight-only (A16): vLLM runs the same FP4
  weights with high-precision activations.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers.utils.hub import convert_file_size_to_int
from torch import nn

from . import guard
from .layers import LowBitLinear, to_row_blocks
from .model_card import lowbit_config, write_model_card
from .model_patches import MATRICES, LowBitExperts
from .numerics import PackedTensor, dequantize, get_format, quantize
from .quantize_checkpoint import _move_into_place, _write_weights

FORMATS = ("compressed-tensors",)
FUSED_SCALES = ("requantize", "error")
#: Sibling linears that serving engines fuse into one GEMM sharing one NVFP4 global scale (vLLM's packed modules).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
#: compressed-tensors version whose schema and decompression the layout was validated against.
CT_VERSION = "0.20.0"


@dataclass
class ExportReport:
    """What `export` wrote and changed."""

    output_dir: Path
    format: str
    ct_format: str
    linears: int
    experts: int
    requantized: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_relative_change(self) -> float:
        return max((r["relative_change"] for r in self.requantized), default=0.0)

    def summary(self) -> str:
        lines = [f"wrote {self.output_dir} ({self.format} {self.ct_format}): {self.linears} linear layers, "
                 f"{self.experts} MoE expert blocks"]
        if self.requantized:
            lines.append(f"{len(self.requantized)} fused-group member(s) re-quantized with a shared tensor scale; "
                         f"largest relative weight change {self.max_relative_change:.3%}")
        return "\n".join(lines + self.notes)


def ct_quantization_config(fmt: str, ignore: list[str]) -> dict[str, Any]:
    """The config.json ``quantization_config`` of a weight-only compressed-tensors FP4 checkpoint."""
    ct_format = f"{fmt}-pack-quantized"
    if fmt == "nvfp4":
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                   "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    else:
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                   "dynamic": False, "scale_dtype": "torch.uint8"}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": ct_format}
    return {"config_groups": {"group_0": group}, "format": ct_format, "global_compression_ratio": None,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def high_precision_projections(model: nn.Module, fp4: set[str]) -> list[str]:
    """Modules with a 2-D weight that stay in high precision (lm_head, MoE routers, gates): the ``ignore`` list.

    vLLM treats routers as linear layers too, so they must be listed, not only the `nn.Linear` ones.
    """
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name and name not in fp4 and not isinstance(m, nn.Embedding) and isinstance(w, torch.Tensor) \
                and w.dim() == 2 and w.is_floating_point():
            out.append(name)
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The model's high-precision dtype (its first floating parameter), as `save_pretrained` records it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def ct_tensors(prefix: str, p: PackedTensor) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one packed [out, in] weight (1×B row blocks)."""
    out = {f"{prefix}.weight_packed": p.codes.detach().contiguous()}
    if p.format == "nvfp4":
        out[f"{prefix}.weight_scale"] = p.scales.detach().contiguous().view(torch.float8_e4m3fn)
        ts = p.tensor_scale.detach().float().reshape(1)
        # 1 / s_t; an all-zero weight (s_t = 0, every block scale 0) gets 1 so it still decodes to zeros
        out[f"{prefix}.weight_global_scale"] = torch.where(ts == 0, torch.ones_like(ts), 1.0 / ts)
    else:
        out[f"{prefix}.weight_scale"] = p.scales.detach().contiguous()
    return out


def _requantize(module: LowBitLinear, tensor_scale: torch.Tensor) -> PackedTensor:
    """Re-quantize the FP4 weight the model computes with (either mode) against another tensor scale."""
    r = module.recipe
    return to_row_blocks(quantize(module.dequantized_weight(), r.format, 1, "rtn", block_2d=r.weight_block_2d,
                                  mx_scale=r.mx_scale, tensor_scale=tensor_scale))


def plan_linears(model: nn.Module, fused_scales: str) -> tuple[dict[str, PackedTensor], list[dict[str, Any]]]:
    """Packed weight of every FP4 linear, fused groups sharing one NVFP4 tensor scale; plus the change report."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}
    packed = {n: m.quantized_weight() for n, m in linears.items()}
    changes: list[dict[str, Any]] = []
    for name, p in packed.items():
        block = get_format(p.format).block_size
        if linears[name].in_features % block:
            raise ValueError(f"export: {name}.in_features={linears[name].in_features} is not a multiple of the "
                             f"{p.format} block size {block}; allowed: FP4 layers with whole blocks (compressed-"
                             "tensors stores no padding): keep this layer in modules_to_not_convert")
    if lowbit_config(model).format != "nvfp4":
        return packed, changes
    parents: dict[str, dict[str, str]] = {}
    for name in packed:
        parent, _, leaf = name.rpartition(".")
        parents.setdefault(parent, {})[leaf] = name
    for parent, children in parents.items():
        for group in FUSED_GROUPS:
            members = [children[leaf] for leaf in group if leaf in children]
            if len(members) < 2:
                continue
            scales = {m: packed[m].tensor_scale.float().reshape(()) for m in members}
            shared = torch.stack(list(scales.values())).amax()
            if all(torch.equal(s, shared) for s in scales.values()):
                continue
            if fused_scales == "error":
                raise ValueError(f"export: {members} are fused into one GEMM by vLLM and need one NVFP4 tensor "
                                 f"scale, but have {[f'{s.item():.6g}' for s in scales.values()]}; "
                                 f"fused_scales='error' refuses; allowed: fused_scales='requantize' (re-quantize "
                                 "them with the largest scale; they change slightly)")
            for m in members:
                if torch.equal(scales[m], shared):
                    continue
                before = dequantize(packed[m])
                packed[m] = _requantize(linears[m], shared)
                delta = (dequantize(packed[m]) - before)
                changes.append({"module": m, "tensor_scale": scales[m].item(), "shared_tensor_scale": shared.item(),
                                "relative_change": (delta.norm() / before.norm().clamp_min(1e-30)).item(),
                                "max_abs_change": delta.abs().max().item()})
    return packed, changes


def _expert_tensors(name: str, module: LowBitExperts) -> dict[str, torch.Tensor]:
    """Per-expert compressed-tensors tensors (legacy names) of one FP4 experts module."""
    if module.mode == "infer":
        mats = {m: module.packed(m) for m in MATRICES}
    else:
        mats = dict(zip(MATRICES, (module.quantize_weight(w) for w in module.expert_weights())))
    block = get_format(module.recipe.format).block_size
    for m, p in mats.items():
        if p.shape[-1] % block:
            raise ValueError(f"export: {name}.{m} has {p.shape[-1]} inputs, not a multiple of the "
                             f"{p.format} block size {block}; allowed: experts with whole blocks")
    out: dict[str, torch.Tensor] = {}
    for e in range(module.num_experts):
        for m, p in mats.items():
            ts = None if p.tensor_scale is None else p.tensor_scale[e]
            one = PackedTensor(p.codes[e], p.scales[e], ts, p.shape[1:], 1, p.format, False)
            half = module.intermediate_dim
            rows = {"gate_proj": slice(0, half), "up_proj": slice(half, None)} if m == "gate_up_proj" \
                else {"down_proj": slice(None)}
            for leaf, sl in rows.items():
                part = PackedTensor(one.codes[sl], one.scales[sl], ts, one.shape, 1, one.format, False)
                out.update(ct_tensors(f"{name}.{e}.{leaf}", part))
    return out


def _owner(key: str, modules: dict) -> str | None:
    """The FP4 module a state-dict key belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix
    return None


def _shards(model: nn.Module, linears: dict[str, PackedTensor], experts: dict[str, LowBitExperts],
            max_shard_bytes: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """The state dict with every FP4 module's tensors replaced by their compressed-tensors form, in shards.

    Tied weights are written once (the first name, as `save_pretrained` does); only one shard is built at a time.
    """
    modules = {**dict.fromkeys(linears, "linear"), **dict.fromkeys(experts, "experts")}
    done: set[str] = set()
    seen: set[tuple[int, tuple[int, ...]]] = set()
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in model.state_dict().items():
        owner = _owner(key, modules)
        if owner is not None and not (modules[owner] == "linear" and key == f"{owner}.bias"):
            if owner in done:
                continue
            done.add(owner)
            new = ct_tensors(owner, linears[owner]) if modules[owner] == "linear" else \
                _expert_tensors(owner, experts[owner])
        else:
            ident = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                     tuple(tensor.shape))
            if ident in seen:  # a tied weight (lm_head = embed_tokens)
                continue
            seen.add(ident)
            new = {key: tensor.detach().contiguous()}
        nbytes = sum(t.numel() * t.element_size() for t in new.values())
        if shard and size + nbytes > max_shard_bytes:
            yield "", shard
            shard, size = {}, 0
        shard.update(new)
        size += nbytes
    if shard:
        yield "", shard


def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "compressed-tensors", *,
           fused_scales: str = "requantize", overwrite: bool = False, max_shard_size: int | str = "5GB"
           ) -> ExportReport:
    """Write an hf_lowbit model (either mode) as a compressed-tensors FP4 checkpoint that vLLM loads.

    Written to a temporary folder next to `out_dir` and renamed at the end, so a failure never leaves a partial
    export or harms an existing `out_dir` (replaced only with ``overwrite=True``).
    """
    cfg = lowbit_config(model)
    if cfg is None:
        raise ValueError("export: the model is not an hf_lowbit model (config.quantization_config is "
                         f"{type(getattr(model.config, 'quantization_config', None)).__name__}); allowed: a model "
                         "loaded or converted with hf_lowbit.LowBitConfig")
    if getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("export: the model carries PEFT adapters; allowed: a model without adapters (fold them in "
                         "first with merge_and_unload())")
    if format not in FORMATS:
        raise ValueError(f"export: format={format!r} is not supported; allowed: {list(FORMATS)}")
    if fused_scales not in FUSED_SCALES:
        raise ValueError(f"export: fused_scales={fused_scales!r} is not valid; allowed: {list(FUSED_SCALES)}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"export: out_dir={str(out)!r} exists and is not empty; allowed: a new or empty "
                              "folder, or overwrite=True")
    if out.exists() and not out.is_dir():
        raise ValueError(f"export: out_dir={str(out)!r} is a file; allowed: a folder path")
    linears, changes = plan_linears(model, fused_scales)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, LowBitExperts) and m.recipe is not None}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise PermissionError(f"export: out_dir={str(out)!r} is not writable ({err.strerror or err}); allowed: a "
                              "path in a writable folder") from None
    try:
        _write_weights(_shards(model, linears, experts, convert_file_size_to_int(max_shard_size)), tmp)
        config = guard.strip_config(model.config.to_diff_dict())
        config["architectures"] = [type(model).__name__]
        config["dtype"] = str(_float_dtype(model)).split(".")[1]
        ignore = high_precision_projections(model, set(linears) | set(experts))
        config["quantization_config"] = ct_quantization_config(cfg.format, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        report = ExportReport(out, format, f"{cfg.format}-pack-quantized", len(linears), len(experts), changes)
        if cfg.activations == "fp4":
            report.notes.append("activations: exported weight-only (A16); hf_lowbit's W4A4 with per-call "
                                "mean-centred activation scales has no compressed-tensors equivalent")
        notes = [f"Weight-only (A16) {cfg.format.upper()} export of an hf_lowbit model: the FP4 weights, codes "
                 "and block scales are hf_lowbit's own bits; activations run in high precision."]
        if experts and cfg.format == "nvfp4":
            notes.append("MoE experts are stored per expert with their own global scales, as vLLM expects; "
                         "transformers (up to 5.23 at least) dequantizes compressed-tensors NVFP4 experts without "
                         "`weight_global_scale` (huggingface/transformers#48371), so serve MoE exports with vLLM.")
            report.notes.append(notes[-1])
        if changes:
            notes.append(f"{len(changes)} fused q/k/v or gate/up projection(s) were re-quantized with their group's "
                         "shared NVFP4 tensor scale (largest relative weight change "
                         f"{report.max_relative_change:.3%}).")
        write_model_card(model, tmp, export_format=report.ct_format, export_notes=notes, load_path=str(out))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
