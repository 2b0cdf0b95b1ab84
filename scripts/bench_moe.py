#!/usr/bin/env python
"""MoE benchmark for issue 4's acceptance: FP4 routed experts vs BF16 grouped GEMM, and SD-MoE step-time overhead.

Part 1, experts (target: FP4 fwd+bwd ≤ 1.3× BF16). Qwen3-30B-A3B expert shapes (H=2048, I=768, E=128, top-8) on
T tokens with one fixed routing (random router logits, top-k of the softmax, renormalized as Qwen3 does). The
baseline is transformers' stock `Qwen3MoeExperts` in BF16 with ``experts_implementation="grouped_mm"``; the FP4
variants are the `LowBitExperts` that `hf_lowbit.convert` installs in its place (train mode, the same weights):
NVFP4 + Averis with ``backend="auto"``, the same with ``backend="torch"`` (reference), and MXFP4. Each variant
times forward + backward with a fixed output gradient dY (``y.backward(dY)``, i.e. loss = Σ y·dY), records peak
memory and how far its output and input gradient are from the BF16 ones (so the benchmark measures the right
computation), and which implementation of the grouped FP4 linear actually ran.

Part 2, SD-MoE (target: ≤ 5 % step-time overhead). A small Qwen3-MoE causal LM trained with a plain loop (forward,
backward, `hf_lowbit.project_gradients`, clip, AdamW, `hf_lowbit.after_optimizer_step`, which refreshes the SVD
bases every `refresh_every` steps), with and without `hf_lowbit.apply_sd_moe`; the timed window is a multiple of
`refresh_every` steps after a warmup, so refreshes are amortized exactly. The variants of a precision train side by
side, one step each per round in rotating order, and an overhead is the median of the per-round step-time ratios:
the host speed of a shared GPU machine drifts by 2× within a minute, which separate runs confused with the ≤ 5 %
being measured. Variants per precision:

* ``stock``      transformers' experts (grouped_mm), no SD-MoE: the acceptance baseline;
* ``hp``         `LowBitExperts(recipe=None)`: the high-precision expert path SD-MoE computes with (grouped_mm over
                 the expert-sorted assignments), without SD-MoE: isolates the cost of the SD-MoE rules;
* ``sd``         `apply_sd_moe(model)` (stock math on W_c + W_u);
* ``fp4`` / ``fp4_sd``  `convert(model, LowBitConfig())` vs `convert(model, LowBitConfig(moe="sd"))`.

Precisions: ``autocast`` (FP32 master weights, BF16 autocast: the usual mixed-precision recipe) and ``bf16`` (BF16
parameters, no autocast). Note: with FP32 master weights transformers' grouped_mm casts its input to the weight dtype
and runs torch's FP32 grouped_mm (a per-expert loop on CUDA), which the ``bf16`` rows avoid.

    python scripts/bench_moe.py --out bench_moe.json            # GPU (CPU works too, slowly)
    python scripts/bench_moe.py --tiny --out /tmp/bench.json    # toy sizes on the CPU, < 1 minute

Times are medians/means in ms from CUDA events on a GPU (no synchronization inside the timed loops) and
`time.perf_counter` on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

EXPERTS_TARGET_RATIO = 1.3
SD_TARGET_OVERHEAD_PCT = 5.0

#: FP4 expert variants: name → LowBitConfig arguments.
EXPERT_VARIANTS: dict[str, dict[str, Any]] = {
    "nvfp4_auto": {},
    "nvfp4_torch": {"backend": "torch"},
    "mxfp4_auto": {"format": "mxfp4"},
}
GROUPED_ENV = "HF_LOWBIT_GROUPED_TRITON"  # "0" turns the Triton backend's grouped path off (not benchmarked here)


# ---------------------------------------------------------------------------------------------------------------
# Sizes and settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertShape:
    """Routed-experts problem: T tokens, hidden H, expert intermediate I, E experts, top-k routing."""

    tokens: int = 8192
    hidden: int = 2048
    intermediate: int = 768
    experts: int = 128
    top_k: int = 8


@dataclass(frozen=True)
class LMShape:
    """The small Qwen3-MoE causal LM of the SD-MoE step-time benchmark."""

    hidden: int = 512
    layers: int = 4
    experts: int = 16
    top_k: int = 2
    moe_intermediate: int = 256
    vocab: int = 8192
    batch: int = 8
    seq: int = 512
    heads: int = 8
    kv_heads: int = 4


@dataclass(frozen=True)
class Settings:
    """How long to measure and what to run."""

    device: str
    warmup: int = 3            # expert fwd+bwd warmup calls
    min_reps: int = 5          # expert timed calls: at least this many ...
    max_reps: int = 100        # ... at most this many ...
    target_s: float = 2.0      # ... aiming at this much timed time per variant
    sd_warmup: int = 16        # training steps before the timed window
    sd_steps: int = 48         # timed training steps (a multiple of refresh_every)
    sd_accum: int = 1          # micro-batches (forward + backward) per optimizer step
    sd_svd_driver: str | None = None  # cuSOLVER driver of the SD-MoE refresh (HF_LOWBIT_SD_SVD_DRIVER)
    refresh_every: int = 16
    sd_rank: int = 8
    sd_precisions: tuple[str, ...] = ("autocast", "bf16")
    sd_fp4: bool = True
    seed: int = 0


TINY_EXPERTS = ExpertShape(tokens=64, hidden=64, intermediate=32, experts=8, top_k=2)
TINY_LM = LMShape(hidden=64, layers=2, experts=4, top_k=2, moe_intermediate=32, vocab=128, batch=2, seq=32,
                  heads=4, kv_heads=2)


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timeline:
    """Points on the device timeline: CUDA events on a GPU (no host sync when marking), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self, i: int, j: int) -> float:
        """Milliseconds from mark i to mark j (call after `finish`)."""
        a, b = self.marks[i], self.marks[j]
        return a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3

    def finish(self) -> None:
        synchronize(self.device)


def summarize(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times_ms), "mean_ms": statistics.fmean(times_ms),
            "min_ms": min(times_ms), "reps": len(times_ms)}


def bench(fn: Callable[[], Any], device: torch.device, settings: Settings) -> dict[str, float]:
    """Warm up, estimate one call, then time enough calls to fill ``settings.target_s`` (median of reps)."""
    for _ in range(settings.warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    estimate = time.perf_counter() - t0
    reps = int(min(settings.max_reps, max(settings.min_reps, math.ceil(settings.target_s / max(estimate, 1e-6)))))
    timeline = Timeline(device)
    timeline.mark()
    for _ in range(reps):
        fn()
        timeline.mark()
    timeline.finish()
    return summarize([timeline.elapsed_ms(i, i + 1) for i in range(reps)])


def reset_peak_memory(device: torch.device) -> float | None:
    """Reset the CUDA peak counter; returns the memory allocated now (MiB), None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2 ** 20


def peak_memory(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset (MiB), None on a CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in FP32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Runner:
    """Runs benchmark variants: an exception (e.g. out of memory) is recorded in the variant's row instead of ending
    the run, variants due after the time budget are skipped, and the JSON is rewritten after every variant, so a
    run stopped by an outer timeout keeps what it measured."""

    def __init__(self, device: torch.device, out: Path, budget_s: float | None) -> None:
        self.device, self.out = device, out
        self.deadline = None if not budget_s else time.perf_counter() + budget_s
        self.results: dict[str, Any] = {}

    def run(self, row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`row` updated with `fn()`, or with ``error`` / ``skipped``; then the JSON is saved."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            row["skipped"] = "time budget (--budget-s) used up"
        else:
            try:
                row.update(fn())
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON, traceback on stderr
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            free_memory(self.device)
        self.save()
        return row

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2))


def measured(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device and library versions for the JSON header."""
    import transformers

    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": _version("triton"), "hf_lowbit": _version("hf-lowbit"), "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # the FP4 reference GEMMs run in FP32
    }
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=list(torch.cuda.get_device_capability(device)))
    else:
        info.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def grouped_implementation(backend_name: str, device: torch.device) -> dict[str, Any]:
    """Which backend `backend_name` resolves to on `device`, and who implements its grouped (MoE) linear."""
    from hf_lowbit.backend import TorchBackend, resolve_backend

    backend = resolve_backend(backend_name, device)
    owner = next(c for c in type(backend).__mro__ if "grouped_linear_train" in c.__dict__)
    accelerated = owner is not TorchBackend and os.environ.get(GROUPED_ENV) != "0"
    impl = (f"{owner.__module__}.{owner.__qualname__}" if accelerated
            else "torch reference (averis.grouped_averis_linear)")
    return {"backend_requested": backend_name, "backend_resolved": backend.name, "grouped_impl": impl,
            "grouped_accelerated": accelerated}


def grouped_mm_kernel(weight: torch.Tensor) -> str:
    """What torch runs for transformers' grouped_mm on this weight (inferred from transformers' and torch's dispatch
    rules: BF16 on SM90/SM100 takes the grouped kernel, anything else a per-group mm loop)."""
    from transformers.integrations import moe as hf_moe

    dummy_offs = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    if not hf_moe._can_use_grouped_mm(weight.new_zeros(1, weight.shape[-1]), weight, dummy_offs):
        return "transformers grouped_mm_fallback (per-expert loop)"
    if weight.device.type == "cuda":
        fast = weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device)[0] in (9, 10)
        return "torch grouped_mm, BF16 grouped kernel" if fast else "torch grouped_mm, per-group mm fallback"
    return f"torch grouped_mm on {weight.device.type} ({weight.dtype})"


# ---------------------------------------------------------------------------------------------------------------
# Part 1: FP4 experts vs BF16 grouped GEMM
# ---------------------------------------------------------------------------------------------------------------
def one_layer_model(shape: ExpertShape, device: torch.device, seed: int) -> nn.Module:
    """A 1-layer Qwen3-MoE LM with the given expert sizes (BF16, grouped_mm experts); only its experts are used."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                            moe_intermediate_size=shape.intermediate, num_experts=shape.experts,
                            num_experts_per_tok=shape.top_k, norm_topk_prob=True, max_position_embeddings=128,
                            tie_word_embeddings=False, experts_implementation="grouped_mm")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


def experts_of(model: nn.Module) -> nn.Module:
    return model.model.layers[0].mlp.experts


def routing(shape: ExpertShape, device: torch.device, seed: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert indices [T, k] and renormalized softmax weights [T, k] from random router logits (CPU RNG)."""
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(shape.tokens, shape.experts, generator=g)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, index = torch.topk(probs, shape.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return index.to(device), weights.to(device=device, dtype=dtype)


def expert_inputs(shape: ExpertShape, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Hidden states X [T, H] (a leaf needing grad), fixed output gradient dY [T, H] and the routing, in BF16."""
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape.tokens, shape.hidden, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    dy = torch.randn(shape.tokens, shape.hidden, generator=g).to(device, torch.bfloat16)
    index, weights = routing(shape, device, seed, torch.bfloat16)
    return {"x": x, "dy": dy, "index": index, "weights": weights}


def fwd_bwd(module: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One forward + backward with the fixed dY; returns (output, dX)."""
    x = inputs["x"]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x, inputs["index"], inputs["weights"])
        y.backward(inputs["dy"])
        return y.detach(), x.grad

    return run


def measure_experts(name: str, module: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                    settings: Settings) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Time fwd+bwd, then one more call under a fresh peak-memory counter; returns (row, output, dX)."""
    run = fwd_bwd(module, inputs)
    row: dict[str, Any] = {"name": name, **bench(run, device, settings)}
    base = reset_peak_memory(device)
    y, dx = run()
    peak = peak_memory(device)
    row["peak_mem_mb"] = peak
    row["peak_extra_mem_mb"] = None if peak is None else peak - base
    return row, y, dx


def fp4_experts_row(name: str, base_model: nn.Module, config, inputs: dict[str, torch.Tensor],
                    device: torch.device, settings: Settings, y_ref: torch.Tensor, dx_ref: torch.Tensor,
                    bf16_ms: float) -> dict[str, Any]:
    """Convert a copy of the 1-layer model with `config` (as users do) and measure its `LowBitExperts`."""
    import hf_lowbit

    model = hf_lowbit.convert(copy.deepcopy(base_model), config)
    module = experts_of(model)
    row, y, dx = measure_experts(name, module, inputs, device, settings)
    row.update(module=type(module).__name__, out_rel_err=rel_err(y, y_ref), dx_rel_err=rel_err(dx, dx_ref),
               ratio=row["median_ms"] / bf16_ms)
    return row


def bench_experts(shape: ExpertShape, device: torch.device, settings: Settings, runner: Runner,
                  section: dict[str, Any]) -> dict[str, Any]:
    """Part 1: the BF16 grouped_mm baseline and every FP4 variant on the same weights, inputs and routing (rows are
    appended to ``section["results"]`` as they are measured); returns the summary."""
    import hf_lowbit

    base_model = one_layer_model(shape, device, settings.seed)
    stock = experts_of(base_model)
    inputs = expert_inputs(shape, device, settings.seed)
    loads = torch.bincount(inputs["index"].reshape(-1), minlength=shape.experts)
    rows: list[dict[str, Any]] = []
    section.update(shape=asdict(shape), routed_rows=shape.tokens * shape.top_k, dtype="bfloat16",
                   expert_load_max=int(loads.max()), expert_load_min=int(loads.min()),
                   target_ratio=EXPERTS_TARGET_RATIO, results=rows)

    row, y_ref, dx_ref = measure_experts("bf16_grouped_mm", stock, inputs, device, settings)
    row.update(format="bf16", experts_implementation=stock.config._experts_implementation,
               grouped_impl=grouped_mm_kernel(stock.gate_up_proj), out_rel_err=0.0, dx_rel_err=0.0, ratio=1.0)
    rows.append(row)
    runner.save()
    for name, kwargs in EXPERT_VARIANTS.items():
        config = hf_lowbit.LowBitConfig(**kwargs)
        row = {"name": name, "format": config.format, **grouped_implementation(config.backend, device)}
        measure = partial(fp4_experts_row, name, base_model, config, inputs, device, settings, y_ref, dx_ref,
                          rows[0]["median_ms"])
        rows.append(row)
        runner.run(row, measure)
    ratio = next(r for r in rows if r["name"] == "nvfp4_auto").get("ratio")
    return {"ratio_nvfp4_auto": ratio, "meets_target": None if ratio is None else ratio <= EXPERTS_TARGET_RATIO}


# ---------------------------------------------------------------------------------------------------------------
# Part 2: SD-MoE step-time overhead
# ---------------------------------------------------------------------------------------------------------------
def lm_config(shape: LMShape):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                          moe_intermediate_size=shape.moe_intermediate, num_experts=shape.experts,
                          num_experts_per_tok=shape.top_k, norm_topk_prob=True,
                          max_position_embeddings=max(128, shape.seq), tie_word_embeddings=False,
                          experts_implementation="grouped_mm")


def build_lm(shape: LMShape, device: torch.device, precision: str, seed: int) -> nn.Module:
    """Random-init LM, identical for every variant of a precision (same seed); FP32 or BF16 parameters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device(device):  # initialized on the device: fast, and the same for every variant
        model = AutoModelForCausalLM.from_config(lm_config(shape), dtype=dtype)
    return model.train()


def to_hp(model: nn.Module, settings: Settings) -> None:
    """Stock experts → `LowBitExperts(recipe=None)` (the high-precision path SD-MoE computes with)."""
    from hf_lowbit.model_patches import MATRICES, LowBitExperts, experts_to_convert
    from hf_lowbit.replace import install_module

    for name in experts_to_convert(model, []):
        old = model.get_submodule(name)
        new = LowBitExperts.from_experts(old, recipe=None)
        install_module(model, name, old, new, MATRICES, "train", copy_weights=True)


def to_sd(model: nn.Module, settings: Settings) -> None:
    import hf_lowbit

    hf_lowbit.apply_sd_moe(model, rank=settings.sd_rank, init="preserve", refresh_every=settings.refresh_every,
                           seed=settings.seed)


def to_fp4(model: nn.Module, settings: Settings) -> None:
    import hf_lowbit

    hf_lowbit.convert(model, hf_lowbit.LowBitConfig(seed=settings.seed))


def to_fp4_sd(model: nn.Module, settings: Settings) -> None:
    import hf_lowbit

    hf_lowbit.convert(model, hf_lowbit.LowBitConfig(moe="sd", sd_rank=settings.sd_rank, seed=settings.seed,
                                                    sd_refresh_every=settings.refresh_every))


#: SD benchmark variants: name → in-place model transform (None: the stock model).
LM_VARIANTS: dict[str, Callable[[nn.Module, Settings], None] | None] = {
    "stock": None, "hp": to_hp, "sd": to_sd, "fp4": to_fp4, "fp4_sd": to_fp4_sd,
}
#: (variant, baseline) pairs whose step-time overhead is reported; the first is the acceptance criterion.
OVERHEADS = [("sd", "stock"), ("sd", "hp"), ("fp4_sd", "fp4")]


def lm_groups(settings: Settings) -> list[tuple[str, tuple[str, ...]]]:
    """(precision, variants timed together, interleaved) in run order: the acceptance group first, the FP4 pair
    (Triton compilation) last."""
    groups = [(p, ("stock", "sd", "hp")) for p in settings.sd_precisions]
    if settings.sd_fp4 and "autocast" in settings.sd_precisions:
        groups.append(("autocast", ("fp4", "fp4_sd")))
    return groups


def autocast_for(precision: str, device: torch.device) -> ContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast" else nullcontext()


def sd_refreshes(model: nn.Module) -> int | None:
    """Basis refreshes so far (of the first SD-MoE experts module; all refresh together), None without SD-MoE."""
    from hf_lowbit.model_patches.sd_moe import sd_modules

    return next((m.refreshes for _, m in sd_modules(model)), None)


class TrainLoop:
    """One variant's training loop: forward + backward of `accum` micro-batches, the SD-MoE rule, clipping, AdamW,
    then the SD-MoE step counting / basis refresh, as in training. Phases are marked on a device `Timeline`."""

    PHASES = ("fwd_bwd", "project", "clip_opt", "after_step")

    def __init__(self, model: nn.Module, ids: torch.Tensor, precision: str, device: torch.device, accum: int) -> None:
        self.model, self.ids, self.precision, self.device, self.accum = model, ids, precision, device, accum
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        self.sd = sd_refreshes(model) is not None
        self.losses: list[torch.Tensor] = []
        self.timeline = Timeline(device)
        self.wall_s: list[float] = []

    def step(self, mark: Callable[[], None]) -> None:
        import hf_lowbit

        for _ in range(self.accum):
            with autocast_for(self.precision, self.device):
                loss = self.model(input_ids=self.ids, labels=self.ids).loss
            (loss / self.accum).backward()
        mark()
        if self.sd:
            hf_lowbit.project_gradients(self.model)  # the SD-MoE gradient rule, before clipping
        mark()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark()
        if self.sd:
            hf_lowbit.after_optimizer_step(self.model)  # basis refresh every `refresh_every` steps
        mark()
        self.losses.append(loss.detach())

    def timed_step(self) -> None:
        t0 = time.perf_counter()
        self.timeline.mark()
        self.step(self.timeline.mark)
        self.wall_s.append(time.perf_counter() - t0)

    def result(self) -> dict[str, Any]:
        """Per-step and per-phase device-timeline times of the timed steps (call after `Timeline.finish`)."""
        n = len(self.PHASES) + 1
        steps = len(self.wall_s)
        step_ms = [self.timeline.elapsed_ms(s * n, s * n + n - 1) for s in range(steps)]
        phase_ms = {p: statistics.fmean(self.timeline.elapsed_ms(s * n + i, s * n + i + 1) for s in range(steps))
                    for i, p in enumerate(self.PHASES)}
        losses = torch.stack(self.losses).float().cpu().tolist()
        return {**summarize(step_ms), "wall_mean_ms": statistics.fmean(self.wall_s) * 1e3, "phase_mean_ms": phase_ms,
                "step_ms": [round(t, 4) for t in step_ms], "loss_first": losses[0], "loss_last": losses[-1]}


@contextmanager
def triton_compilations() -> Iterator[list[str]]:
    """Collects the Triton kernel specializations compiled (or loaded from the disk cache) inside the block: a
    compilation inside a timed window shows up as a step ~0.5 s long."""
    found: list[str] = []
    try:
        from triton import knobs
    except ImportError:
        yield found
        return

    def hook(*, repr: str, fn: Any, **_: Any) -> bool:  # noqa: A002 - Triton's keyword
        found.append(f"{fn.name}: {repr[:300]}")
        return False  # compile as usual

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        yield found
    finally:
        knobs.runtime.jit_cache_hook = previous


def train_interleaved(loops: dict[str, TrainLoop], warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """Warm up each loop, then time `steps` rounds of one step of every loop, the order rotating each round: host
    speed drifts over seconds on a shared machine (a variant's steps varied 23-48 ms within one run, 2026-11-30),
    so variants are compared step by step rather than run by run. Memory: each loop's peak during its own warmup
    above what was allocated before it."""
    device = next(iter(loops.values())).device
    out: dict[str, dict[str, Any]] = {}
    for name, loop in loops.items():
        before = reset_peak_memory(device)
        for _ in range(warmup):
            loop.step(lambda: None)
        peak = peak_memory(device)
        out[name] = {"peak_extra_mem_mb": None if peak is None else peak - before,
                     "refreshes_before": sd_refreshes(loop.model)}
    names = list(loops)
    with triton_compilations() as compiled:
        for s in range(steps):
            for i in range(len(names)):
                loops[names[(s + i) % len(names)]].timed_step()
        synchronize(device)
    for name, loop in loops.items():
        before = out[name].pop("refreshes_before")
        out[name].update(loop.result())
        out[name]["refreshes_timed"] = None if before is None else sd_refreshes(loop.model) - before
        out[name]["triton_compiles_timed_window"] = compiled  # of the whole interleaved group
    return out


def lm_group(precision: str, names: tuple[str, ...], shape: LMShape, ids: torch.Tensor, device: torch.device,
             settings: Settings) -> dict[str, dict[str, Any]]:
    """Build every variant of `names` in `precision` and time their training steps interleaved."""
    loops, info = {}, {}
    for name in names:
        model = build_lm(shape, device, precision, settings.seed)
        transform = LM_VARIANTS[name]
        if transform is not None:
            transform(model, settings)
        experts = model.model.layers[0].mlp.experts
        row = {"experts_module": type(experts).__name__,
               "experts_implementation": model.config._experts_implementation}
        if getattr(experts, "recipe", None) is not None:
            row.update(grouped_implementation(experts.backend, device))
        elif not hasattr(experts, "recipe"):
            row["grouped_impl"] = grouped_mm_kernel(experts.gate_up_proj)
        info[name] = row
        loops[name] = TrainLoop(model, ids, precision, device, settings.sd_accum)
    timed = train_interleaved(loops, settings.sd_warmup, settings.sd_steps)
    return {name: {**info[name], **timed[name]} for name in names}


def bench_sd(shape: LMShape, device: torch.device, settings: Settings, runner: Runner,
             section: dict[str, Any]) -> dict[str, Any]:
    """Part 2: step time of every variant in every precision (rows appended to ``section["results"]`` as they are
    measured); returns the overheads of OVERHEADS."""
    g = torch.Generator().manual_seed(settings.seed + 3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(device)
    rows: list[dict[str, Any]] = []
    section.update(model=asdict(shape), tokens_per_step=shape.batch * shape.seq * settings.sd_accum,
                   micro_batches_per_step=settings.sd_accum, svd_driver=settings.sd_svd_driver,
                   warmup_steps=settings.sd_warmup,
                   timed_steps=settings.sd_steps, refresh_every=settings.refresh_every, sd_rank=settings.sd_rank,
                   optimizer="AdamW(lr=1e-4), clip_grad_norm_(1.0)", target_overhead_pct=SD_TARGET_OVERHEAD_PCT,
                   results=rows)
    previous = os.environ.get("HF_LOWBIT_SD_SVD_DRIVER")
    if settings.sd_svd_driver:
        os.environ["HF_LOWBIT_SD_SVD_DRIVER"] = settings.sd_svd_driver
    try:
        for precision, names in lm_groups(settings):
            outcome: dict[str, Any] = {}  # variant name → row, or error / skipped for the whole group
            runner.run(outcome, partial(lm_group, precision, names, shape, ids, device, settings))
            failed = {k: v for k, v in outcome.items() if k in ("error", "skipped")}
            rows += [{"name": name, "precision": precision, **outcome.get(name, failed)} for name in names]
            runner.save()
    finally:
        os.environ.pop("HF_LOWBIT_SD_SVD_DRIVER", None)
        if previous is not None:
            os.environ["HF_LOWBIT_SD_SVD_DRIVER"] = previous
    return {"overheads": overheads(rows, settings.sd_precisions)}


def overheads(rows: list[dict[str, Any]], precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """Step-time overhead of each (variant, baseline) pair of OVERHEADS that was measured: the median over rounds
    of the per-round ratio (both ran in the same round of the interleaved loop), and the ratio of the means."""
    by_key = {(r["precision"], r["name"]): r for r in rows if measured(r)}
    out = []
    for precision in precisions:
        for variant, baseline in OVERHEADS:
            if (precision, variant) in by_key and (precision, baseline) in by_key:
                v, b = by_key[(precision, variant)], by_key[(precision, baseline)]
                paired = statistics.median(x / y for x, y in zip(v["step_ms"], b["step_ms"]))
                pct = 100.0 * (paired - 1.0)
                out.append({"precision": precision, "variant": variant, "baseline": baseline,
                            "overhead_pct": pct, "overhead_of_means_pct": 100.0 * (v["mean_ms"] / b["mean_ms"] - 1),
                            "meets_target": pct <= SD_TARGET_OVERHEAD_PCT})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `columns` of `rows`."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def header(env: dict[str, Any]) -> str:
    return (f"device: {env['device_name']} ({env['device']}), torch {env['torch']}, transformers "
            f"{env['transformers']}, triton {env['triton']}")


def problems(section: dict[str, Any]) -> list[str]:
    """ERROR / SKIPPED lines of a section and of its rows."""
    lines = [f"{key.upper()} section: {section[key]}" for key in ("error", "skipped") if key in section]
    for r in section.get("results", []):
        lines += [f"{key.upper()} {r.get('precision', '')} {r['name']}: {r[key]}" for key in ("error", "skipped")
                  if key in r]
    return lines


def report_experts(ex: dict[str, Any]) -> str:
    out = []
    if "shape" in ex:
        s = ex["shape"]
        verdict = {True: "met", False: "NOT met", None: "not measured"}[ex.get("meets_target")]
        out += [f"## FP4 experts fwd+bwd vs BF16 grouped_mm: T={s['tokens']} H={s['hidden']} I={s['intermediate']} "
                f"E={s['experts']} top-{s['top_k']} ({ex['routed_rows']} routed rows, "
                f"expert load {ex['expert_load_min']}..{ex['expert_load_max']})",
                table(ex["results"], ["name", "median_ms", "ratio", "peak_extra_mem_mb", "out_rel_err",
                                      "dx_rel_err", "backend_resolved", "grouped_impl"]),
                f"NVFP4 (auto) / BF16 = {_cell(ex.get('ratio_nvfp4_auto'))}x "
                f"(target <= {ex['target_ratio']}x): {verdict}"]
    return "\n".join(out + problems(ex))


def report_sd(sd: dict[str, Any]) -> str:
    out = []
    if "results" in sd:
        rows = [{**r, **{f"{k}_ms": v for k, v in r.get("phase_mean_ms", {}).items()},
                 "compiles": len(r.get("triton_compiles_timed_window", []))} for r in sd["results"]]
        out += [f"## SD-MoE training step ({sd['tokens_per_step']} tokens/step, {sd['timed_steps']} timed steps "
                f"after {sd['warmup_steps']}, refresh every {sd['refresh_every']})",
                table(rows, ["precision", "name", "mean_ms", "median_ms", "fwd_bwd_ms", "project_ms", "clip_opt_ms",
                             "after_step_ms", "refreshes_timed", "peak_extra_mem_mb", "loss_last", "compiles"]),
                "compiles: Triton compilations inside the group's timed window (each stalls a step)",
                "", "overhead_pct: median over rounds of the per-round step-time ratio (variants interleaved)",
                table(sd.get("overheads", []), ["precision", "variant", "baseline", "overhead_pct",
                                                "overhead_of_means_pct", "meets_target"])]
    return "\n".join(out + problems(sd))


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU unless --device), to validate the code path")
    p.add_argument("--tokens", type=int, default=None, help="tokens T of the experts benchmark (default 8192)")
    p.add_argument("--skip-sd", action="store_true", help="skip the SD-MoE step-time benchmark")
    p.add_argument("--skip-experts", action="store_true", help="skip the FP4 experts benchmark")
    p.add_argument("--skip-sd-fp4", action="store_true", help="SD-MoE benchmark without the FP4 variants")
    p.add_argument("--sd-precisions", default="autocast,bf16", help="comma list of autocast, bf16")
    p.add_argument("--sd-steps", type=int, default=None,
                   help="timed training steps (default 48; tiny 4); keep it a multiple of the refresh period (16)")
    p.add_argument("--sd-accum", type=int, default=1,
                   help="micro-batches (of 8 x 512 tokens) per optimizer step in the SD-MoE benchmark (default 1)")
    p.add_argument("--sd-svd-driver", choices=["gesvda", "gesvd", "gesvdj", "torch"], default=None,
                   help="cuSOLVER driver of the SD-MoE basis refresh (default: hf_lowbit's, gesvda)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available; --tiny: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=180.0,
                   help="variants due after this many seconds are skipped (0: no limit); default 180")
    args = p.parse_args(argv)
    precisions = tuple(x for x in args.sd_precisions.split(",") if x)
    if not precisions or any(x not in ("autocast", "bf16") for x in precisions):
        p.error(f"--sd-precisions={args.sd_precisions!r} is not valid; allowed: comma list of autocast, bf16")
    if args.tokens is not None and args.tokens < 1:
        p.error(f"--tokens={args.tokens} is not valid; allowed: an integer >= 1")
    if args.sd_steps is not None and args.sd_steps < 1:
        p.error(f"--sd-steps={args.sd_steps} is not valid; allowed: an integer >= 1")
    if args.sd_accum < 1:
        p.error(f"--sd-accum={args.sd_accum} is not valid; allowed: an integer >= 1")
    if args.budget_s < 0:
        p.error(f"--budget-s={args.budget_s} is not valid; allowed: a number >= 0 (0: no limit)")
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"--out={args.out!r} exists; allowed: a new path, or --overwrite to replace it (nothing was changed)")
    args.sd_precisions = precisions
    return args


def make_settings(args: argparse.Namespace) -> tuple[Settings, ExpertShape, LMShape]:
    """Sizes and measuring effort for the chosen mode."""
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    common = dict(device=device, sd_precisions=args.sd_precisions, sd_fp4=not args.skip_sd_fp4, seed=args.seed,
                  sd_accum=args.sd_accum, sd_svd_driver=args.sd_svd_driver)
    if args.tiny:
        settings = Settings(warmup=1, min_reps=3, max_reps=10, target_s=0.1, sd_warmup=2,
                            sd_steps=args.sd_steps or 4, refresh_every=2, sd_rank=4, **common)
        experts, lm = TINY_EXPERTS, TINY_LM
    else:
        settings = Settings(sd_steps=args.sd_steps or 48, **common)
        experts, lm = ExpertShape(), LMShape()
    if args.tokens is not None:
        experts = ExpertShape(**{**asdict(experts), "tokens": args.tokens})
    return settings, experts, lm


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, expert_shape, lm_shape = make_settings(args)
    device = torch.device(settings.device)
    runner = Runner(device, Path(args.out), args.budget_s)
    import hf_lowbit  # noqa: F401  (registers the quantization method; imported after argument errors)

    runner.results.update(env=environment(device), tiny=args.tiny, settings=asdict(settings))
    print(header(runner.results["env"]), flush=True)
    sections = [("experts", args.skip_experts, partial(bench_experts, expert_shape), report_experts),
                ("sd_moe", args.skip_sd, partial(bench_sd, lm_shape), report_sd)]
    for key, skip, bench_section, report_section in sections:
        if skip:
            continue
        section = runner.results.setdefault(key, {})
        t0 = time.perf_counter()
        runner.run(section, partial(bench_section, device, settings, runner, section))
        section["elapsed_s"] = time.perf_counter() - t0
        runner.save()
        print("\n" + report_section(section), flush=True)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
