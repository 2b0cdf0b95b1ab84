"""Model cards (README.md) for hf_lowbit checkpoints.

`save_pretrained` / `push_to_hub` of an hf_lowbit model render `model_cards/hf_lowbit.md` (Jinja2, through
`huggingface_hub.ModelCard`) into the checkpoint's README.md: base model, format and every `LowBitConfig` field, the
modules kept in high precision, sizes against BF16, how to load, metrics when known, and the papers. The Hub
metadata (tags, `library_name`, `base_model`) goes into the YAML header. A card carries `MARKER`; a README.md
without it was written by someone else and is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .config import LowBitConfig
from .layers import LowBitLinear, packed_shapes
from .model_patches import MATRICES, LowBitExperts
from .numerics import get_format

logger = logging.getLogger(__name__)

MARKER = "<!-- hf_lowbit:model-card (written by hf_lowbit; delete this line to keep your edits) -->"
TEMPLATE = "hf_lowbit.md"
CARD_INFO_ATTR = "_hf_lowbit_card_info"
_CARD_INFO_KEYS = ("base_model", "metrics", "license", "datasets", "model_name", "tags", "verification")

PAPERS = {
    "averis": "Averis: *The Curse and Blessing of Mean Bias in FP4-Quantized LLM Training*, "
              "[arXiv 2603.10444](https://arxiv.org/abs/2603.10444)",
    "sd": "SD-MoE: *SD-MoE: Spectral Decomposition for Effective Expert Specialization*, "
          "[arXiv 2602.12556](https://arxiv.org/abs/2602.12556)",
    "mh": "MH-MoE: *Multi-Head Attention as a Source of Catastrophic Forgetting in MoE Transformers*, "
          "[arXiv 2602.12587](https://arxiv.org/abs/2602.12587)",
}
_METRIC_FILES = ("all_results.json", "train_results.json", "eval_results.json")


@dataclass(frozen=True)
class CheckpointSizes:
    """Bytes of a model's tensors: as stored now, once packed, and the same tensors in BF16 (the baseline)."""

    checkpoint_bytes: int     # tensors as `save_pretrained` writes them now
    packed_bytes: int         # after `finalize` (equal to checkpoint_bytes for a packed model)
    bf16_bytes: int           # every floating tensor (and every FP4 weight, at its logical shape) in BF16
    fp4_bytes: int     # codes + block scales + tensor scales of the FP4 linear weights
    fp4_bf16_bytes: int

    @property
    def ratio(self) -> float:
        """Packed checkpoint bytes / BF16 bytes."""
        return self.packed_bytes / self.bf16_bytes if self.bf16_bytes else float("nan")

    @property
    def fp4_ratio(self) -> float:
        """FP4 linear weight bytes / the same weights in BF16."""
        return self.fp4_bytes / self.fp4_bf16_bytes if self.fp4_bf16_bytes else float("nan")


def lowbit_config(model: nn.Module) -> LowBitConfig | None:
    """The model's `LowBitConfig`, or None if it is not an hf_lowbit model."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    return cfg if isinstance(cfg, LowBitConfig) else None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (shared ones once) and persistent buffers: what a checkpoint holds. Works on the meta device."""
    out = list(model.named_parameters())
    for mod_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def fp4_matrices(model: nn.Module) -> dict[str, list[tuple[str, int, int, int, str]]]:
    """FP4 modules → their packed matrices as (name, rows over all slices, in_features, slices, format)."""
    out: dict[str, list[tuple[str, int, int, int, str]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LowBitLinear):
            out[name] = [("weight", m.out_features, m.in_features, 1, m.recipe.format)]
        elif isinstance(m, LowBitExperts) and m.recipe is not None:
            out[name] = [(t, m.num_experts * m._out_features(t), m._in_features(t), m.num_experts, m.recipe.format)
                         for t in MATRICES]
    return out


def checkpoint_sizes(model: nn.Module) -> CheckpointSizes:
    """Measure a model's checkpoint bytes against BF16 (shapes and dtypes only, so meta models work too)."""
    fp4 = fp4_matrices(model)
    owned = {f"{mod}.{n}" for mod, mats in fp4.items() for t, *_ in mats for n in LowBitLinear.packed_names(t)}
    stored = packed = bf16 = lin = lin_bf16 = 0
    for mats in fp4.values():
        for _, rows, cols, slices, fmt in mats:
            (r, c), (rs, cs) = packed_shapes(rows, cols, fmt)
            nbytes = r * c + rs * cs + (4 * slices if get_format(fmt).has_tensor_scale else 0)
            lin, lin_bf16 = lin + nbytes, lin_bf16 + rows * cols * 2
    for name, t in _stored_tensors(model):
        stored += _nbytes(t)
        if name not in owned:
            packed += _nbytes(t)
            bf16 += t.numel() * 2 if t.is_floating_point() else _nbytes(t)
    return CheckpointSizes(stored, packed + lin, bf16 + lin_bf16, lin, lin_bf16)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _grouped(pairs: list[tuple[str, str]]) -> list[str]:
    groups: dict[str, set[str]] = {}
    for owner, leaf in pairs:
        groups.setdefault(_pattern(owner) or "(root)", set()).add(leaf)
    return [f"{mod} ({', '.join(sorted(leaves))})" for mod, leaves in sorted(groups.items())]


def high_precision_modules(model: nn.Module) -> list[str]:
    """Modules whose tensors stay in high precision, layer indices folded to ``*`` (``model.layers.*.mlp.gate``)."""
    fp4 = fp4_matrices(model)
    owned = {f"{mod}.{n}" for mod, mats in fp4.items() for t, *_ in mats for n in LowBitLinear.packed_names(t)}
    return _grouped([name.rpartition(".")[::2] for name, _ in _stored_tensors(model) if name not in owned])


def fp4_modules(model: nn.Module) -> list[str]:
    """The FP4 modules and matrices, layer indices folded to ``*``."""
    return _grouped([(mod, t) for mod, mats in fp4_matrices(model).items() for t, *_ in mats])


def set_card_info(model: nn.Module, **info: Any) -> None:
    """Attach facts the card should show (base_model, metrics, license, datasets, model_name, tags, verification).

    They are kept on the model and used by every later `save_pretrained` / `push_to_hub`.
    """
    unknown = sorted(set(info) - set(_CARD_INFO_KEYS))
    if unknown:
        raise ValueError(f"set_card_info: unknown field(s) {unknown}; allowed: {list(_CARD_INFO_KEYS)}")
    current = dict(getattr(model, CARD_INFO_ATTR, {}) or {})
    current.update({k: v for k, v in info.items() if v is not None})
    model.__dict__[CARD_INFO_ATTR] = current  # plain attribute (nn.Module.__setattr__ would be fine too)


def read_training_metrics(directory: str | os.PathLike) -> dict[str, float]:
    """Metrics the Trainer left in `directory` (`*_results.json` from `save_metrics`, else `trainer_state.json`)."""
    directory = Path(directory)
    metrics: dict[str, float] = {}
    for fname in _METRIC_FILES:
        path = directory / fname
        if path.is_file():
            data = json.loads(path.read_text())
            metrics.update({k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    state = directory / "trainer_state.json"
    if not metrics and state.is_file():
        data = json.loads(state.read_text())
        for entry in data.get("log_history", []):
            for key in ("loss", "train_loss", "eval_loss", "epoch", "step"):
                if isinstance(entry.get(key), (int, float)):
                    metrics[key] = entry[key]
    return metrics


def _hub_id(value: Any) -> str | None:
    """`value` if it names a Hub repo (``namespace/name``) rather than a local path, else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or "/" not in value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _human(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n:,} B" if unit == "B" else f"{value:.3g} {unit} ({n:,} B)"


def _metric_value(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _mode_text(cfg: LowBitConfig) -> str:
    fmt = get_format(cfg.format)
    scale = "FP8 E4M3" if fmt.scale_kind == "e4m3" else "E8M0 (power of two)"
    tensor = " and an FP32 tensor scale (`weight_tensor_scale`)" if fmt.has_tensor_scale else ""
    if cfg.mode == "infer":
        acts = ("W4A4: activations are quantized to FP4 at run time exactly as in training"
                + (", with Averis mean-centring" if cfg.center_activations else "")
                if cfg.activations == "fp4" else "W4A16: weight-only, activations stay in high precision")
        return (f"**Packed {cfg.format.upper()} inference checkpoint** (`mode=\"infer\"`). Each FP4 linear layer "
                f"stores 4-bit E2M1 codes (`weight`, uint8, two per byte), one {scale} block scale per "
                f"{fmt.block_size} weights along the input dimension (`weight_scale`){tensor}. {acts}.")
    return (f"**Quantization-aware training checkpoint** (`mode=\"train\"`) in {cfg.format.upper()}: high-precision "
            "master weights; the forward, input-gradient and weight-gradient GEMMs of each FP4 linear layer run on "
            "FP4 operands (W4A4G4)" + (", with Averis mean-centring" if cfg.mean_center else "")
            + ". `hf_lowbit.finalize(model)` packs it for inference with exactly the values training used.")


def _export_text(cfg: LowBitConfig, export_format: str) -> str:
    scale = "`weight_scale` (FP8 E4M3 per 16 weights) and `weight_global_scale`" if cfg.format == "nvfp4" else \
        "`weight_scale` (E8M0 per 32 weights)"
    return (f"Exported from an hf_lowbit {cfg.format.upper()} model (its recipe below) to compressed-tensors "
            f"`{export_format}`: each FP4 linear layer stores `weight_packed` (E2M1 codes, two per byte) and {scale}.")


def _papers(cfg: LowBitConfig) -> list[str]:
    used = {"averis": cfg.center_activations or cfg.center_gradients, "sd": cfg.moe == "sd", "mh": False}
    return [PAPERS[k] + ("" if used[k] else " (hf_lowbit implements it; not used by this checkpoint)")
            for k in PAPERS]


def render_model_card(model: nn.Module, *, repo_id: str | None = None, load_path: str | None = None,
                      base_model: str | None = None, metrics: dict[str, float] | None = None,
                      tags: list[str] | None = None, export_format: str | None = None,
                      export_notes: list[str] | None = None, verification: str | None = None) -> ModelCard:
    """Render the card of an hf_lowbit model (explicit arguments win over `set_card_info` facts)."""
    from . import __version__

    cfg = lowbit_config(model)
    if cfg is None:
        found = type(getattr(model.config, "quantization_config", None)).__name__
        raise ValueError(f"render_model_card: the model has no hf_lowbit LowBitConfig (config.quantization_config is "
                         f"{found}); allowed: a model loaded or converted with hf_lowbit.LowBitConfig")
    info = dict(getattr(model, CARD_INFO_ATTR, {}) or {})
    base = _hub_id(base_model or info.get("base_model") or getattr(model.config, "_name_or_path", None))
    base = None if base == repo_id else base
    all_metrics = {**(info.get("metrics") or {}), **(metrics or {})}
    sizes = checkpoint_sizes(model)
    model_tags = ["hf_lowbit", "fp4", cfg.format, "quantized"] + (["mean-centred-fp4"] if cfg.mean_center else [])
    if export_format:
        model_tags += ["compressed-tensors"]
    for tag in list(getattr(model, "model_tags", None) or []) + list(info.get("tags") or []) + list(tags or []):
        if tag not in model_tags:
            model_tags.append(tag)
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=model_tags,
                         base_model=base, license=info.get("license"), datasets=info.get("datasets"),
                         base_model_relation="quantized" if base else None)
    title = info.get("model_name") or (repo_id.split("/")[-1] if repo_id else
                                       f"{base.split('/')[-1] if base else model.config.model_type} "
                                       f"{cfg.format.upper()} (hf_lowbit)")
    summary = (f"{'`' + base + '`' if base else 'A ' + model.config.model_type + ' model'} in mean-centred FP4 "
               f"({cfg.format.upper()}), made with [hf_lowbit](https://pypi.org/project/hf-lowbit/).")
    size_rows = [("checkpoint as saved", _human(sizes.checkpoint_bytes),
                  f"{sizes.checkpoint_bytes / sizes.bf16_bytes:.3f}×" if sizes.bf16_bytes else "-")]
    if sizes.packed_bytes != sizes.checkpoint_bytes:
        size_rows.append(("after `finalize` (packed)", _human(sizes.packed_bytes), f"{sizes.ratio:.3f}×"))
    size_rows.append(("FP4 weights (packed)", _human(sizes.fp4_bytes), f"{sizes.fp4_ratio:.3f}×"))
    size_rows.append(("same model in BF16", _human(sizes.bf16_bytes), "1×"))
    template = resources.files("hf_lowbit.model_cards").joinpath(TEMPLATE).read_text()
    return ModelCard.from_template(
        data, template_str=template, marker=MARKER, title=title, summary=summary,
        load_path=repo_id or load_path or "path/to/this/folder", mode=cfg.mode,
        mode_text=_export_text(cfg, export_format) if export_format else _mode_text(cfg),
        config_rows=list(cfg.to_dict().items()), hp_modules=high_precision_modules(model),
        fp4_modules=fp4_modules(model), skip_patterns=", ".join(f"`{p}`" for p in cfg.modules_to_not_convert) or "none",
        size_rows=size_rows, metrics=[(k, _metric_value(v)) for k, v in sorted(all_metrics.items())],
        verification=verification or info.get("verification"), papers=_papers(cfg), version=__version__,
        export_format=export_format, export_notes=export_notes or [])


def is_hf_lowbit_card(text: str) -> bool:
    """True if a README's text is a card hf_lowbit wrote (and so may be overwritten)."""
    return MARKER in text


def write_model_card(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path | None:
    """Write README.md into `save_directory` unless a README.md that hf_lowbit did not write is already there.

    Training metrics found in the directory (Trainer `*_results.json`, `trainer_state.json`) are included.
    Returns the path written, or None when a user's README was kept.
    """
    path = Path(save_directory) / "README.md"
    if path.is_file() and not is_hf_lowbit_card(path.read_text(errors="replace")):
        logger.info("hf_lowbit: keeping the existing README.md in %s (it was not written by hf_lowbit)", path.parent)
        return None
    metrics = {**read_training_metrics(save_directory), **(kwargs.pop("metrics", None) or {})}
    card = render_model_card(model, load_path=kwargs.pop("load_path", None) or str(save_directory),
                             metrics=metrics, **kwargs)
    path.write_text(str(card), encoding="utf-8")
    return path
