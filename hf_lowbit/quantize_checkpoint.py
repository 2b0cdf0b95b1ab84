"""`quantize_checkpoint` (``hf-lowbit quantize SRC OUT``): a float checkpoint → packed FP4, one shard at a time.

The result is tensor for tensor what ``from_pretrained(src, quantization_config=LowBitConfig(mode="infer", ...))``
followed by ``save_pretrained`` writes (same names, dtypes and values; same config.json), but the model is never
built: the skeleton on the meta device says which tensors are FP4 (the quantizer's own rules:
`linears_to_convert`, `experts_to_convert`, minus `modules_to_not_convert`), and the safetensors shards are read
memory-mapped (`safe_open`), one input shard at a time, each weight cast to the load dtype and packed with
`hf_lowbit.numerics.quantize` in row chunks (so temporaries stay small even for one huge matrix). Then the
checkpoint is reloaded and compared with the float model on a few prompts, and optionally pushed.

Output goes to a temporary folder next to OUT that is renamed into place at the end: a failure leaves an
existing OUT untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LowBitConfig
from .layers import to_row_blocks
from .numerics import PackedTensor, get_format, nvfp4_tensor_scale, quantize

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack|ckpt)$|model\.safetensors\.index\.json$|"
                         r"config\.json$|generation_config\.json$|README\.md$")
_GATE_UP = ("gate_proj", "up_proj")


# -- results --------------------------------------------------------------------------------------------------------

@dataclass
class LogitError:
    """Packed model vs the float model on the same prompts (logits over the whole vocabulary)."""

    prompts: int
    tokens: int
    max_abs: float
    rel_rms: float          # ||logits_fp4 - logits_float|| / ||logits_float||
    top1_agreement: float   # fraction of positions whose argmax token is the same

    def __str__(self) -> str:
        return (f"logit error vs the float model on {self.prompts} prompts ({self.tokens} tokens): relative RMS "
                f"{self.rel_rms:.4f}, max |Δ| {self.max_abs:.4g}, top-1 agreement {self.top1_agreement:.1%}")


@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` did."""

    output_dir: Path
    config: LowBitConfig
    linears: int
    experts: int
    input_shards: int
    output_shards: int
    source_bytes: int
    output_bytes: int
    logit_error: LogitError | None = None
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.source_bytes if self.source_bytes else float("nan")

    def summary(self) -> str:
        lines = [f"wrote {self.output_dir} ({self.config.format}, activations={self.config.activations}): "
                 f"{self.linears} linear layers and {self.experts} MoE expert blocks packed; "
                 f"{self.output_bytes:,} bytes in {self.output_shards} shard(s) = {self.size_ratio:.3f}x the source "
                 f"({self.source_bytes:,} bytes in {self.input_shards} shard(s))"]
        if self.logit_error is not None:
            lines.append(str(self.logit_error))
        if self.pushed_to:
            lines.append(f"pushed to {self.pushed_to}")
        return "\n".join(lines + self.notes)


# -- packing (must match LowBitQuantizeOp + LowBitLinear.to_infer / LowBitExperts.quantize_weight) -----------------

def pack_linear_weight(w: torch.Tensor, config: LowBitConfig, dtype: torch.dtype,
                       chunk_elements: int = 1 << 20) -> PackedTensor:
    """Pack one [out, in] linear weight exactly as quantize-on-load does, a few rows at a time.

    The loader casts the checkpoint tensor to the model dtype before packing; the NVFP4 tensor scale is computed
    over the whole matrix first and then forced on every row chunk (`quantize(..., tensor_scale=)`), which gives
    the same bits as one call on the whole matrix.
    """
    r = config.recipe()
    fmt = get_format(r.format)
    rows, cols = w.shape
    step = max(1, chunk_elements // max(cols, 1))
    if r.weight_block_2d:
        step = -(-step // fmt.block_size) * fmt.block_size  # whole 2-D tiles per chunk
    chunks = [(i, min(i + step, rows)) for i in range(0, rows, step)]
    ts = None
    if fmt.has_tensor_scale:
        amax = torch.stack([w[a:b].to(dtype).float().abs().amax() for a, b in chunks]).amax()
        ts = nvfp4_tensor_scale(amax.reshape(1))
    codes, scales = [], []
    for a, b in chunks:
        p = to_row_blocks(quantize(w[a:b].to(dtype).float(), r.format, 1, "rtn", block_2d=r.weight_block_2d,
                                   mx_scale=r.mx_scale, tensor_scale=ts))
        codes.append(p.codes)
        scales.append(p.scales)
    return PackedTensor(torch.cat(codes), torch.cat(scales), None if ts is None else ts.float().reshape(()),
                        (rows, cols), 1, r.format, False)


def pack_expert_weight(w: torch.Tensor, config: LowBitConfig, dtype: torch.dtype) -> PackedTensor:
    """Pack one expert's [out, in] matrix (its own NVFP4 tensor scale), as `LowBitExperts.quantize_weight` does."""
    r = config.recipe()
    return to_row_blocks(quantize(w.to(dtype).float()[None], r.format, -1, "rtn", block_2d=r.weight_block_2d,
                                  mx_scale=r.mx_scale, slices=True))


# -- reading the source ---------------------------------------------------------------------------------------------

class ShardReader:
    """Memory-mapped access to a safetensors checkpoint; one shard is open (mapped) at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.shards = list(OrderedDict.fromkeys(weight_map.values()))
        elif (directory / "model.safetensors").is_file():
            self.shards = ["model.safetensors"]
            weight_map = None
        else:
            found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            raise ValueError(f"quantize: src={str(directory)!r} has no model.safetensors or "
                             f"model.safetensors.index.json (found: {found or 'no weight files'}); allowed: a "
                             "safetensors checkpoint (re-save a *.bin checkpoint with save_pretrained first)")
        self._open: OrderedDict[str, Any] = OrderedDict()
        if weight_map is None:
            weight_map = dict.fromkeys(self.handle(self.shards[0]).keys(), self.shards[0])
        self.weight_map: dict[str, str] = weight_map

    def handle(self, shard: str) -> Any:
        if shard not in self._open:
            self.close()  # unmap the previous shard: its pages leave this process's RSS
            self._open[shard] = safe_open(str(self.directory / shard), framework="pt").__enter__()
        self._open.move_to_end(shard)
        return self._open[shard]

    def keys(self, shard: str) -> list[str]:
        return [k for k, s in self.weight_map.items() if s == shard]

    def get(self, key: str) -> torch.Tensor:
        return self.handle(self.weight_map[key]).get_tensor(key)

    def nbytes(self) -> int:
        return sum((self.directory / s).stat().st_size for s in self.shards)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].__exit__(None, None, None)


# -- the plan: which tensors are FP4 --------------------------------------------------------------------------------

@dataclass
class Plan:
    """Which modules are packed and the dtype of every other tensor (from the meta skeleton)."""

    linears: set[str]
    experts: dict[str, int]                # experts module name → number of experts
    dtype: torch.dtype
    param_dtypes: dict[str, torch.dtype]   # meta skeleton dtypes (declared fp32 buffers etc.)
    dtype_plan: dict[str, torch.dtype]     # transformers' keep-in-fp32 globs
    meta_model: Any

    def tensor_dtype(self, key: str) -> torch.dtype:
        """The dtype `from_pretrained` gives an unconverted floating tensor (keep-in-fp32 globs, declared dtypes)."""
        for glob, dt in self.dtype_plan.items():
            if re.search(glob.replace("*", ".*"), key):
                return dt
        return self.param_dtypes.get(key, self.dtype)


def _resolve_dtype(dtype: Any, cfg: Any, reader: ShardReader) -> torch.dtype:
    """`from_pretrained`'s dtype="auto": the config's dtype, else the first floating tensor's dtype."""
    if dtype is not None:
        resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if resolved not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"quantize: dtype={dtype!r} is not valid; allowed: 'float32', 'bfloat16', 'float16' or "
                             "None (the checkpoint's own dtype)")
        return resolved
    cfg_dtype = getattr(cfg, "dtype", None)
    if cfg_dtype is not None:
        return getattr(torch, cfg_dtype) if isinstance(cfg_dtype, str) else cfg_dtype
    for key in reader.keys(reader.shards[0]):
        if reader.handle(reader.shards[0]).get_slice(key).get_dtype() in ("F32", "BF16", "F16"):
            return reader.get(key).dtype
    return torch.float32


def make_plan(cfg: Any, config: LowBitConfig, dtype: torch.dtype) -> Plan:
    """Build the model skeleton on the meta device and ask the quantizer's rules what to convert."""
    from transformers import AutoModelForCausalLM

    from .model_patches import experts_to_convert
    from .quantizer import LowBitHfQuantizer
    from .replace import linears_to_convert

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except (ValueError, KeyError):
        raise ValueError(f"quantize: model_type={getattr(cfg, 'model_type', None)!r} is not supported (transformers' "
                         f"AutoModelForCausalLM has no model for {type(cfg).__name__}); allowed: causal language "
                         "models, e.g. 'llama', 'qwen3', 'qwen3_moe', 'deepseek_v3'") from None
    skip = LowBitHfQuantizer(config, pre_quantized=False).modules_to_skip(model)
    linears = set(linears_to_convert(model, skip))
    experts = {name: model.get_submodule(name).gate_up_proj.shape[0] for name in experts_to_convert(model, skip)}
    if not linears and not experts:
        raise ValueError(f"quantize: model_type={cfg.model_type!r} has no linear layer inside its decoder blocks to "
                         f"convert (modules_to_not_convert={config.modules_to_not_convert}); allowed: decoder "
                         "models with nn.Linear projections")
    state = model.state_dict()
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    return Plan(linears, experts, dtype, {k: v.dtype for k, v in state.items()}, plan, model)


# -- converting -----------------------------------------------------------------------------------------------------

def _expert_keys(name: str, n: int, reader: ShardReader) -> tuple[str, list[str]]:
    """Layout of one experts module in the source: ("fused", keys) or ("legacy", per-expert keys)."""
    fused = [f"{name}.gate_up_proj", f"{name}.down_proj"]
    if all(k in reader.weight_map for k in fused):
        return "fused", fused
    legacy = [f"{name}.{e}.{m}.weight" for e in range(n) for m in ("gate_proj", "up_proj", "down_proj")]
    missing = [k for k in legacy if k not in reader.weight_map]
    if missing:
        raise ValueError(f"quantize: src has neither fused ({fused}) nor per-expert keys for {name!r} "
                         f"(missing e.g. {missing[:3]}); allowed: the transformers checkpoint layouts")
    return "legacy", legacy


def _convert_experts(name: str, n: int, reader: ShardReader, plan: Plan, config: LowBitConfig
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pack one experts module expert by expert; returns the tensors save_pretrained writes and the keys consumed."""
    layout, keys = _expert_keys(name, n, reader)
    out: dict[str, torch.Tensor] = {}
    for matrix in ("gate_up_proj", "down_proj"):
        codes, scales, tscales = [], [], []
        fused = reader.get(f"{name}.{matrix}") if layout == "fused" else None
        for e in range(n):
            if fused is not None:
                w = fused[e]
            elif matrix == "gate_up_proj":
                w = torch.cat([reader.get(f"{name}.{e}.{m}.weight") for m in _GATE_UP])
            else:
                w = reader.get(f"{name}.{e}.down_proj.weight")
            p = pack_expert_weight(w, config, plan.dtype)
            codes.append(p.codes[0])
            scales.append(p.scales[0])
            if p.tensor_scale is not None:
                tscales.append(p.tensor_scale.reshape(1))
        out[f"{name}.{matrix}"] = torch.stack(codes)  # fused, as save_pretrained writes packed experts (save_layout)
        out[f"{name}.{matrix}_scale"] = torch.stack(scales)
        if tscales:
            out[f"{name}.{matrix}_tensor_scale"] = torch.cat(tscales).float()
    return {k: v.contiguous() for k, v in out.items()}, keys


def convert_shards(reader: ShardReader, plan: Plan, config: LowBitConfig, out_dir: Path,
                   chunk_elements: int = 1 << 20) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (input shard, converted tensors) one input shard at a time; only that shard's output is resident."""
    owner = {}
    for name in plan.experts:
        for key in _expert_keys(name, plan.experts[name], reader)[1]:
            owner[key] = name
    seen_linears: set[str] = set()
    done: set[str] = set()
    for shard in reader.shards:
        tensors: dict[str, torch.Tensor] = {}
        for key in reader.keys(shard):
            if key in done:
                continue
            module, _, leaf = key.rpartition(".")
            if key in owner:
                out, consumed = _convert_experts(owner[key], plan.experts[owner[key]], reader, plan, config)
                tensors.update(out)
                done.update(consumed)
            elif leaf == "weight" and module in plan.linears:
                p = pack_linear_weight(reader.get(key), config, plan.dtype, chunk_elements)
                tensors[key] = p.codes.contiguous()
                tensors[f"{module}.weight_scale"] = p.scales.contiguous()
                if p.tensor_scale is not None:
                    tensors[f"{module}.weight_tensor_scale"] = p.tensor_scale
                seen_linears.add(module)
            else:
                t = reader.get(key)
                tensors[key] = t.to(plan.tensor_dtype(key)) if t.is_floating_point() else t
        yield shard, tensors
    missing = sorted(plan.linears - seen_linears)
    if missing:
        raise ValueError(f"quantize: src has no weight for {len(missing)} linear layer(s) the model defines (e.g. "
                         f"{missing[:3]}); allowed: checkpoints whose keys match the transformers module names")


def _write_weights(shards: Iterator[tuple[str, dict[str, torch.Tensor]]], out_dir: Path) -> tuple[int, int]:
    """Write each yielded shard as its own safetensors file, then name them and write the index."""
    written: list[tuple[str, list[str], int]] = []
    for i, (_, tensors) in enumerate(shards):
        if not tensors:
            continue
        tmp_name = f"part-{i:05d}.safetensors"
        save_file(tensors, str(out_dir / tmp_name), metadata={"format": "pt"})
        written.append((tmp_name, sorted(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))
        del tensors
    n = len(written)
    weight_map, total = {}, 0
    for i, (tmp_name, keys, nbytes) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
        total += nbytes
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return n, sum((out_dir / f).stat().st_size for f in set(weight_map.values()))


def _write_configs(cfg: Any, plan: Plan, config: LowBitConfig, src_dir: Path, out_dir: Path) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them for the loaded model."""
    from transformers import GenerationConfig

    cfg.quantization_config = config
    cfg.dtype = str(plan.dtype).split(".")[1]
    cfg.architectures = [type(plan.meta_model).__name__.removeprefix("FSDP")]
    cfg.save_pretrained(out_dir)
    if plan.meta_model.can_generate():
        try:
            gen = GenerationConfig.from_pretrained(src_dir)
        except OSError:
            gen = GenerationConfig.from_model_config(cfg)
        gen.save_pretrained(out_dir)
    for path in src_dir.iterdir():  # tokenizer and friends travel with the weights
        if path.is_file() and not _NOT_COPIED.match(path.name):
            shutil.copy2(path, out_dir / path.name)


# -- verification ---------------------------------------------------------------------------------------------------

def verify_logits(src_dir: Path, out_dir: Path, dtype: torch.dtype, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                  ) -> LogitError:
    """Reload the packed checkpoint (no missing or unexpected keys allowed) and compare logits with the float one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packed, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise RuntimeError(f"quantize: reloading the packed checkpoint reported {problems}")
    ref = AutoModelForCausalLM.from_pretrained(src_dir, dtype=dtype)
    vocab = ref.config.get_text_config().vocab_size
    batches: list[torch.Tensor] = []
    if any((src_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            tok = AutoTokenizer.from_pretrained(src_dir)
            batches = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
        except (OSError, ValueError, TypeError) as err:
            logger.warning("hf_lowbit quantize: tokenizer of %s unusable (%s); verifying on random tokens",
                           src_dir, err)
    if not batches or any(b.numel() == 0 or int(b.max()) >= vocab for b in batches):
        g = torch.Generator().manual_seed(0)  # no usable tokenizer: seeded random token ids
        batches = [torch.randint(0, vocab, (1, 16), generator=g) for _ in prompts]
    diffs, refs, agree, tokens, max_abs = 0.0, 0.0, 0, 0, 0.0
    with torch.no_grad():
        for ids in batches:
            a, b = ref.eval()(ids).logits.float(), packed.eval()(ids).logits.float()
            diffs += (a - b).pow(2).sum().item()
            refs += a.pow(2).sum().item()
            max_abs = max(max_abs, (a - b).abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            tokens += ids.numel()
    return LogitError(len(batches), tokens, max_abs, (diffs / refs) ** 0.5 if refs else float("nan"),
                      agree / tokens)


# -- the command ----------------------------------------------------------------------------------------------------

def _local_source(src: str | os.PathLike, revision: str | None, token: str | bool | None) -> Path:
    """A local folder for `src` (a path, or a Hub repo id downloaded without the *.bin files)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"quantize: src={str(src)!r} has no config.json; allowed: a folder written by "
                             "save_pretrained or a Hub repo id")
        return path
    if path.exists() or str(src).startswith((".", "/", "~")):
        raise ValueError(f"quantize: src={str(src)!r} is not a directory; allowed: a checkpoint folder or a Hub "
                         "repo id 'namespace/name'")
    from huggingface_hub import snapshot_download

    from .hub import check_repo_id

    repo_id = check_repo_id(str(src), "quantize: src")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja",
                                                      "*.tiktoken", "*.py"]))
    except Exception as err:
        raise ValueError(f"quantize: src={repo_id!r} could not be downloaded from the Hub "
                         f"({type(err).__name__}: {err}); allowed: an existing repo you can read, or a local folder"
                         ) from None


def _float_config(src: Any, src_dir: Path) -> Any:
    """The source's transformers config; it must be a known model type and not quantized already."""
    from transformers import AutoConfig
    from transformers import __version__ as tf_version

    try:
        cfg = AutoConfig.from_pretrained(src_dir)
    except (ValueError, KeyError):
        model_type = json.loads((src_dir / "config.json").read_text()).get("model_type")
        raise ValueError(f"quantize: model_type={model_type!r} (src={str(src)!r}) is not known to transformers "
                         f"{tf_version}; allowed: causal language models it knows, e.g. 'llama', 'qwen3', "
                         "'qwen3_moe', 'deepseek_v3'") from None
    existing = getattr(cfg, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise ValueError(f"quantize: src={str(src)!r} is already quantized (quantization_config.quant_method="
                         f"{method!r}); allowed: a float checkpoint")
    return cfg


def _check_options(options: dict[str, Any]) -> LowBitConfig:
    if options.get("mode", "infer") != "infer":
        raise ValueError(f"quantize: mode={options['mode']!r} is not valid; allowed: 'infer' (quantize writes packed "
                         "FP4 weights; for QAT load the float checkpoint with LowBitConfig(mode='train'))")
    if options.get("moe") is not None:
        raise ValueError(f"quantize: moe={options['moe']!r} is not valid; allowed: None (SD-MoE is a training "
                         "method; quantize writes inference checkpoints)")
    return LowBitConfig(**{**options, "mode": "infer"})


def _prepare_output(out: Path, src_dir: Path, overwrite: bool) -> Path:
    """Check OUT and create the temporary folder next to it (same filesystem, so the final rename is atomic)."""
    if out.resolve() == src_dir.resolve() or src_dir.resolve() in out.resolve().parents:
        raise ValueError(f"quantize: out={str(out)!r} is the source folder or inside it; allowed: a separate folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"quantize: out={str(out)!r} is a file; allowed: a new folder, or an existing one with "
                         "overwrite=True (--overwrite)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"quantize: out={str(out)!r} exists and is not empty; allowed: a new or empty folder, "
                              "or overwrite=True (--overwrite) to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise PermissionError(f"quantize: out={str(out)!r} is not writable ({err.strerror or err}); allowed: a path "
                              "in a writable folder") from None


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to OUT; an existing OUT is moved aside first and deleted only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
                        overwrite: bool = False, verify: bool = True, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                        push_to: str | None = None, private: bool | None = None, token: str | bool | None = None,
                        revision: str | None = None, chunk_elements: int = 1 << 20,
                        **options: Any) -> QuantizeReport:
    """Quantize a float causal-LM checkpoint (local folder or Hub id) to packed FP4 in `out`.

    `options` are `LowBitConfig` fields (format, activations, mean_center, modules_to_not_convert, weight_blocks,
    mx_scale, backend, ...); ``mode`` is always ``"infer"``. `dtype` is the load dtype (default: the checkpoint's,
    like ``from_pretrained``'s "auto"). With `verify`, the result is reloaded and its logits compared with the
    float model (needs both in memory: pass ``verify=False`` for models larger than RAM). `push_to` uploads `out`
    afterwards (a failed upload raises `HubPushError` and keeps `out`).
    """
    from . import guard
    from .hub import check_repo_id, push_folder
    from .model_card import set_card_info, write_model_card
    from .replace import convert

    config = _check_options(options)
    if push_to is not None:
        check_repo_id(push_to, "quantize: push_to")
    src_dir = _local_source(src, revision, token)
    out = Path(out).expanduser()
    cfg = _float_config(src, src_dir)
    reader = ShardReader(src_dir)
    tmp = None
    try:
        plan = make_plan(cfg, config, _resolve_dtype(dtype, cfg, reader))
        tmp = _prepare_output(out, src_dir, overwrite)
        n_out, out_bytes = _write_weights(convert_shards(reader, plan, config, tmp, chunk_elements), tmp)
        reader.close()
        _write_configs(cfg, plan, config, src_dir, tmp)
        report = QuantizeReport(out, config, len(plan.linears), len(plan.experts), len(reader.shards), n_out,
                                reader.nbytes(), out_bytes)
        guard.protect(tmp)
        if verify:  # the folder as it will ship
            report.logit_error = verify_logits(src_dir, tmp, plan.dtype, tuple(prompts))
        card_model = convert(plan.meta_model, config)  # meta skeleton with packed modules: shapes for the card
        set_card_info(card_model, base_model=str(src), verification=str(report.logit_error or "") or None)
        write_model_card(card_model, tmp, repo_id=push_to, load_path=str(out))
        _move_into_place(tmp, out)
        tmp = None
    finally:
        reader.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if push_to is not None:
        push_folder(out, push_to, token=token, private=private)
        report.pushed_to = push_to
    return report


def cli_quantize(args: Any) -> int:
    """Entry point of ``hf-lowbit quantize`` (see `hf_lowbit.cli`); prints the report."""
    from .hub import HubPushError

    options: dict[str, Any] = {"format": args.format, "activations": args.activations,
                               "mean_center": not args.no_mean_center, "weight_blocks": args.weight_blocks,
                               "mx_scale": args.mx_scale}
    if args.modules_to_not_convert is not None:
        options["modules_to_not_convert"] = args.modules_to_not_convert
    try:
        report = quantize_checkpoint(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                     verify=not args.no_verify, push_to=args.push_to, private=args.private or None,
                                     token=args.token, revision=args.revision, **options)
    except HubPushError as err:
        print(f"hf-lowbit quantize: error: {err}")
        return 1
    print(report.summary())
    return 0
