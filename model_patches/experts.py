"""`LowBitExperts`: fused routed MoE experts computing in mean-centred FP4 (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3).

Replaces `mlp.experts` while keeping the Hugging Face parameter names and layout — `gate_up_proj [E, 2I, H]`
(gate rows, then up rows) and `down_proj [E, H, I]` — so stock checkpoints load (fused or per-expert legacy keys,
merged by transformers' own conversions) and saved checkpoints split back into per-expert keys.

Tokens are sorted by expert into one row block per expert (``[E, C, H]``, C = the largest expert load; padding
rows are zero and masked), and every expert GEMM runs as one batched op over experts: no Python loop over experts.
Each expert is its own FP4 tensor: its own Averis mean over the tokens routed to it, its own NVFP4 tensor scales.

Storage modes as for `LowBitLinear`: ``"train"`` master weights (float, trainable), ``"infer"`` packed codes
(``gate_up_proj`` uint8 ``[E, 2I, ceil(H/B)*B/2]`` packed along the input dim, ``gate_up_proj_scale`` uint8
``[E, 2I, ceil(H/B)]``, NVFP4 ``gate_up_proj_tensor_scale`` FP32 ``[E]``; the same for ``down_proj``).
``recipe=None`` computes in high precision (the stock experts' math), which SD-MoE uses without quantization:
through `torch.nn.functional.grouped_mm` over the expert-sorted assignments (no padding, no host sync) where the
shapes allow it, else through the padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hf_lowbit.averis import mix_seed
from hf_lowbit.backend import resolve_backend
from hf_lowbit.config import Recipe
from hf_lowbit.layers import LowBitLinear, to_row_blocks
from hf_lowbit.numerics import PackedTensor, dequantize, get_format, quantize

MATRICES = ("gate_up_proj", "down_proj")
CAPACITY_MULTIPLE = 32  # the largest FP4 block size (MXFP4)


#: Run the Routing moves through the Triton kernels on CPU tensors too (tests, under TRITON_INTERPRET=1).
ROUTING_KERNELS_ON_CPU = False


def _expert_kernels(t: torch.Tensor, switch: str) -> bool:
    """Whether the experts' row moves / gated activation run as Triton kernels (CUDA with the `switch` at its
    default "triton") or as torch ops (CPU, or the switch set to "torch")."""
    from hf_lowbit import kernels

    if not kernels.TRITON_AVAILABLE or not (t.is_cuda or ROUTING_KERNELS_ON_CPU):
        return False
    from hf_lowbit.kernels._common import env_choice

    return env_choice(switch, ("triton", "torch")) == "triton"


def _routing_kernels(t: torch.Tensor) -> bool:
    """`Routing` moves rows through `hf_lowbit.kernels.routing` (HF_LOWBIT_ROUTING)."""
    return _expert_kernels(t, "HF_LOWBIT_ROUTING")


def expert_counts(expert: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """[E + 1] assignments per expert; the last bin counts those to experts ≥ E (not on this rank). scatter_add, not
    bincount: CUDA's bincount reads the input's maximum back to the host (a sync)."""
    idx = expert.clamp(max=num_experts).to(dtype)
    return torch.zeros(num_experts + 1, dtype=dtype, device=expert.device).scatter_add_(0, idx, torch.ones_like(idx))


def _is_silu(act_fn: nn.Module) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def gated_activation(gate_up: torch.Tensor, mask: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """act_fn(gate) · up · mask of expert-major rows [E, C, 2I] (gate columns first) with the [E, C] row mask:
    one Triton pass each way for SiLU (`hf_lowbit.kernels.expert_act`, HF_LOWBIT_EXPERT_ACT), else torch ops;
    padding rows stay exactly zero."""
    if _is_silu(act_fn) and _expert_kernels(gate_up, "HF_LOWBIT_EXPERT_ACT"):
        from hf_lowbit.kernels.expert_act import gated_silu

        return gated_silu(gate_up, mask)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up * mask[..., None].to(up.dtype)


@dataclass
class Routing:
    """Where each (token, slot) assignment sits in the expert-major layout ``[E, C, ·]``."""

    expert: torch.Tensor   # [n] expert of each kept assignment, sorted
    pos: torch.Tensor      # [n] row inside that expert's block
    token: torch.Tensor    # [n] source token
    slot: torch.Tensor     # [n] which of the token's top-k choices
    mask: torch.Tensor     # [E, C] 1.0 on real rows
    capacity: int
    slot_rows: torch.Tensor  # [T, k] row of each (token, slot) in the flattened layout, −1 for a dropped one
    dropped: bool            # some assignments went to experts ≥ E (host-known: the boolean indexing synced)

    @classmethod
    def from_top_k(cls, top_k_index: torch.Tensor, num_experts: int) -> "Routing":
        """Sort assignments by expert (stable); indices ≥ num_experts (experts not on this rank) are dropped."""
        return PendingRouting.start(top_k_index, num_experts).finish()

    @property
    def rows(self) -> torch.Tensor:
        """[n] row of each kept assignment in the flattened ``[E·C, ·]`` layout."""
        return self.expert * self.capacity + self.pos

    @property
    def row_token(self) -> torch.Tensor:
        """[E·C] source token of each row of the flattened layout, −1 on padding rows."""
        e, c = self.mask.shape
        return torch.full((e * c,), -1, dtype=torch.long, device=self.mask.device).index_copy_(0, self.rows,
                                                                                               self.token)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] → [E, C, H] with each expert's tokens in its row block, zeros elsewhere (differentiable; the
        backward sums each token's k slot gradients in FP32 in a fixed order, see `sum_slots`)."""
        e, c = self.mask.shape
        return _ExpertMajorRows.apply(hidden, self).view(e, c, hidden.shape[-1])

    def sum_slots(self, rows: torch.Tensor) -> torch.Tensor:
        """[T·k, H] rows in (token, slot) order → [T, H] sums over the k slots, accumulated in FP32 (one rounding to
        the rows' dtype, fixed order: no atomics); slots of dropped assignments count as zero."""
        t, k = self.slot_rows.shape
        rows = rows.view(t, k, -1)
        if self.dropped:  # their rows were read from row 0: zero them whatever that row holds
            rows = torch.where((self.slot_rows >= 0).view(t, k, 1), rows, 0)
        return rows.sum(1)

    def slot_rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """[T·k, ·]: the rows of the flattened layout each (token, slot) reads (row 0 for a dropped one)."""
        return rows.reshape(-1, rows.shape[-1]).index_select(0, self.slot_rows.reshape(-1).clamp_min(0))

    def combine(self, y: torch.Tensor, weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Σ over a token's experts of routing weight × expert output, in the hidden states' dtype.

        Gathered token-major ([T, k, H]) and summed over k in FP32, like transformers' grouped_mm experts: one
        rounding and a fixed order (an `index_add` into BF16 rounded after every slot, and its atomics made the
        sum's order, hence its bits, vary from run to run)."""
        if _routing_kernels(y):
            return _CombineRows.apply(y.reshape(-1, y.shape[-1]), weights, self, like.dtype)
        return self.sum_slots(self.slot_rows_of(y) * weights.reshape(-1, 1).float()).to(like.dtype)


@dataclass
class PendingRouting:
    """The device half of `Routing.from_top_k`: the sort and the per-expert counts are enqueued and the two numbers
    the layout needs on the host (largest expert load, kept assignments) are on their way to pinned host memory.
    `finish` waits for those two numbers only, so device work enqueued in between (the experts' weight
    quantization) keeps the GPU busy while the host waits and then launches the rest: one host sync per forward."""

    flat: torch.Tensor       # [T·k] expert of each (token, slot)
    order: torch.Tensor      # [T·k] argsort of flat (stable): kept assignments first, dropped (≥ E) last
    counts: torch.Tensor     # [E] assignments per expert
    host: torch.Tensor       # [2] int64 (pinned on CUDA): largest load, kept assignments
    ready: torch.cuda.Event | None
    shape: tuple[int, int]   # (T, k)
    num_experts: int

    @classmethod
    def start(cls, top_k_index: torch.Tensor, num_experts: int) -> "PendingRouting":
        t, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = expert_counts(flat, num_experts)[:num_experts]
        stats = torch.stack([counts.max() if num_experts else counts.sum(), counts.sum()])
        ready = None
        if stats.is_cuda:
            host = torch.empty(2, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = stats
        return cls(flat, order, counts, host, ready, (t, k), num_experts)

    def finish(self) -> Routing:
        """Wait for the two host numbers and build the expert-major layout (no further sync)."""
        if self.ready is not None:
            self.ready.synchronize()
        longest, kept = (int(v) for v in self.host.tolist())
        t, k = self.shape
        order = self.order[:kept]
        expert = self.flat[order]
        starts = torch.cumsum(self.counts, 0) - self.counts
        pos = torch.arange(kept, device=order.device) - starts[expert]
        # rows per expert rounded up to a whole number of FP4 blocks along the token axis (32 covers NVFP4 and MXFP4):
        # the wgrad operands' token-axis blocks then never need a padding copy of the activations or gradients
        capacity = max(-(-longest // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE, CAPACITY_MULTIPLE)
        # each expert's rows are a prefix of its block (pos = 0, 1, ...): one comparison, no index_put (which with a
        # Python value copies it from pageable host memory: a copy that waits for all work queued before it)
        mask = (torch.arange(capacity, device=order.device) < self.counts[:, None]).float()
        slot_rows = torch.full((t * k,), -1, dtype=torch.long, device=order.device).index_copy_(
            0, order, expert * capacity + pos)
        return Routing(expert, pos, order // k, order % k, mask, capacity, slot_rows.view(t, k), kept < t * k)


class _ExpertMajorRows(torch.autograd.Function):
    """Token rows → the flattened expert-major layout ``[E·C, H]`` (zeros on padding rows). Backward: each token's
    gradient is the sum of its k slots' row gradients (`Routing.sum_slots`), not an `index_add` with k-way atomics."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        ctx.routing = routing
        if _routing_kernels(hidden):
            from hf_lowbit.kernels.routing import gather_rows

            return gather_rows(hidden, routing.row_token)
        e, c = routing.mask.shape
        return hidden.new_zeros(e * c, hidden.shape[-1]).index_copy_(0, routing.rows,
                                                                      hidden.index_select(0, routing.token))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        r = ctx.routing
        if _routing_kernels(grad):
            from hf_lowbit.kernels.routing import sum_slots

            return sum_slots(grad.reshape(-1, grad.shape[-1]), r.slot_rows), None
        return r.sum_slots(r.slot_rows_of(grad)), None


class _CombineRows(torch.autograd.Function):
    """`Routing.combine` through the Triton kernels: out[t] = Σ_j w[t, j]·y[slot_rows[t, j]] (FP32, slot order, one
    rounding); backward: grad_y scattered to the picked rows (zeros elsewhere), grad_w the per-slot dot products."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, routing: Routing, out_dtype: torch.dtype):
        from hf_lowbit.kernels.routing import sum_slots

        ctx.routing = routing
        ctx.save_for_backward(y, weights)
        return sum_slots(y, routing.slot_rows, weights.float(), out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from hf_lowbit.kernels.routing import combine_rows_backward

        y, weights = ctx.saved_tensors
        gy, gw = combine_rows_backward(grad, y, ctx.routing.slot_rows, weights.float())
        return gy, gw.to(weights.dtype), None, None


def _autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul runs in under the active autocast of `device` (`dtype` itself when autocast is off)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else dtype


def grouped_mm_supported(hidden_dim: int, intermediate_dim: int, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` takes these expert shapes: every operand's row stride a multiple of 16 bytes."""
    per_16 = 16 // dtype.itemsize
    return hasattr(torch.nn.functional, "grouped_mm") and hidden_dim % per_16 == 0 and intermediate_dim % per_16 == 0


def grouped_expert_mlp(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """High-precision routed experts as two `grouped_mm` over the assignments sorted by expert (gated MLP, gate rows
    before up rows). Assignments to experts ≥ E (on another rank) contribute nothing. No host sync: the group
    offsets stay on the device. Output rows are summed per token in a fixed order (deterministic)."""
    t, k = top_k_index.shape
    e = gate_up.shape[0]
    dtype = _autocast_dtype(hidden.device, gate_up.dtype)
    expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
    valid = (expert < e)[:, None]
    counts = expert_counts(expert, e, torch.int32)
    offsets = torch.cumsum(counts[:e], 0, dtype=torch.int32)
    # rows past offsets[-1] (other ranks' assignments) are not written by grouped_mm (uninitialized memory): zero
    # their input (and so its gradient) and their output before it meets the routing weight (0 · NaN is NaN, also in
    # the weight's gradient)
    x = hidden.index_select(0, order // k).to(dtype).masked_fill(~valid, 0)
    gate, up = torch.nn.functional.grouped_mm(x, gate_up.to(dtype).transpose(-1, -2), offs=offsets).chunk(2, -1)
    y = torch.nn.functional.grouped_mm(act_fn(gate) * up, down.to(dtype).transpose(-1, -2), offs=offsets)
    y = torch.where(valid, y, 0) * top_k_weights.reshape(-1)[order, None].to(y.dtype)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return y.index_select(0, inverse).view(t, k, -1).sum(1).to(hidden.dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class LowBitExperts(nn.Module):
    """Routed experts of one MoE layer in mean-centred FP4 (or high precision with ``recipe=None``)."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 recipe: Recipe | None = None, mode: str = "train", backend: str = "auto", seed: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if mode not in ("train", "infer"):
            raise ValueError(f"LowBitExperts: mode={mode!r} is not valid; allowed: ['train', 'infer']")
        if mode == "infer" and recipe is None:
            raise ValueError("LowBitExperts: mode='infer' needs a recipe (packed FP4 weights)")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.recipe, self.mode, self.backend, self.base_seed = recipe, mode, backend, seed
        self.layer_id, self.calls = 0, 0
        self.compute_dtype = dtype or torch.get_default_dtype()
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_dim, hidden_dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, intermediate_dim, **kw))
        if mode == "infer":
            self._make_packed_params(device)

    @classmethod
    def from_experts(cls, experts: nn.Module, recipe: Recipe | None, mode: str = "train", backend: str = "auto",
                     seed: int = 0) -> "LowBitExperts":
        """Same shapes, device and dtype as a stock experts module (weights not copied: meta-friendly)."""
        w = experts.gate_up_proj
        return cls(experts.num_experts, w.shape[-1], w.shape[-2] // 2, experts.act_fn, recipe, mode, backend, seed,
                   device=w.device, dtype=w.dtype)

    # -- storage -------------------------------------------------------------------------------------------------
    packed_names = staticmethod(LowBitLinear.packed_names)

    def _in_features(self, name: str) -> int:
        return self.hidden_dim if name == "gate_up_proj" else self.intermediate_dim

    def _out_features(self, name: str) -> int:
        return 2 * self.intermediate_dim if name == "gate_up_proj" else self.hidden_dim

    def _make_packed_params(self, device=None) -> None:
        fmt = get_format(self.recipe.format)
        for name in MATRICES:
            device = device if device is not None else getattr(self, name).device
            n_blocks = -(-self._in_features(name) // fmt.block_size)
            rows = (self.num_experts, self._out_features(name))
            setattr(self, name, _frozen(torch.zeros(*rows, n_blocks * fmt.block_size // 2, dtype=torch.uint8,
                                                    device=device)))
            setattr(self, f"{name}_scale", _frozen(torch.zeros(*rows, n_blocks, dtype=torch.uint8, device=device)))
            ts = torch.zeros(self.num_experts, dtype=torch.float32, device=device) if fmt.has_tensor_scale else None
            setattr(self, f"{name}_tensor_scale", None if ts is None else _frozen(ts))

    def packed(self, name: str) -> PackedTensor:
        """The packed weight `name` as a PackedTensor (one tensor per expert along dim 0)."""
        ts = getattr(self, f"{name}_tensor_scale")
        shape = (self.num_experts, self._out_features(name), self._in_features(name))
        return PackedTensor(getattr(self, name), getattr(self, f"{name}_scale"), None if ts is None else ts.detach(),
                            shape, 2, self.recipe.format, False)

    def quantize_weight(self, weight: torch.Tensor) -> PackedTensor:
        """Pack one fused weight [E, out, in] along `in` (RTN), one NVFP4 tensor per expert."""
        r = self.recipe
        p = quantize(weight.detach().float(), r.format, -1, "rtn", block_2d=r.weight_block_2d, mx_scale=r.mx_scale,
                     slices=True)
        return to_row_blocks(p)  # 2-D tiles → one scale per 1×B row block: the same values, the standard layout

    @torch.no_grad()
    def load_packed(self, name: str, p: PackedTensor) -> None:
        """Set packed parameters of matrix `name` from a PackedTensor made by `quantize_weight`."""
        setattr(self, name, _frozen(p.codes.contiguous()))
        setattr(self, f"{name}_scale", _frozen(p.scales.contiguous()))
        ts = None if p.tensor_scale is None else _frozen(p.tensor_scale.float().reshape(-1).contiguous())
        setattr(self, f"{name}_tensor_scale", ts)

    @torch.no_grad()
    def to_infer(self) -> None:
        """Pack the (effective) master weights in place; the module then runs inference only."""
        if self.mode == "infer":
            return
        if self.recipe is None:
            raise ValueError("LowBitExperts.to_infer(): a high-precision (recipe=None) module has nothing to pack")
        weights = dict(zip(MATRICES, self.expert_weights()))
        self.compute_dtype = weights["gate_up_proj"].dtype
        for name in MATRICES:
            self.load_packed(name, self.quantize_weight(weights[name]))
        self.mode = "infer"

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate_up, down) weights the experts compute with; SD-MoE overrides this with W_c + W_u."""
        return self.gate_up_proj, self.down_proj

    def dequantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense FP32 weights exactly as the FP4 forward sees them."""
        if self.mode == "infer":
            return tuple(dequantize(self.packed(n)) for n in MATRICES)
        return tuple(dequantize(self.quantize_weight(w)) for w in self.expert_weights())

    # -- forward -------------------------------------------------------------------------------------------------
    def uses_grouped_mm(self, hidden_states: torch.Tensor) -> bool:
        """High precision only: whether the forward runs through `grouped_expert_mlp` (else the padded layout)."""
        dtype = _autocast_dtype(hidden_states.device, self.gate_up_proj.dtype)
        return self.recipe is None and grouped_mm_supported(self.hidden_dim, self.intermediate_dim, dtype)

    def _seed(self, which: int) -> int:
        return mix_seed(self.base_seed, self.layer_id, self.calls, which)

    def _linear(self, x: torch.Tensor, mask: torch.Tensor, which: int, weight: torch.Tensor | None,
                prepared: object | None = None) -> torch.Tensor:
        if self.recipe is None:
            return x @ weight.transpose(-1, -2).to(x.dtype)
        backend = resolve_backend(self.backend, x.device)
        if self.mode == "infer":
            return backend.grouped_linear_packed(x, self.packed(MATRICES[which]), mask, self.recipe)
        return backend.grouped_linear_train(x, weight, mask, self.recipe, self._seed(which), prepared=prepared)

    def _prepare_weights(self, hidden_states: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]
                         ) -> list[object | None]:
        """Each matrix's FP4 operands from the backend (None where it prepares nothing), enqueued before the routing
        waits for its host numbers: the GPU quantizes the weights while the host waits and then launches the rest.
        The token-axis copy for dgrad is made where a gradient will reach the matrix's input."""
        if self.recipe is None or self.mode != "train":
            return [None, None]
        backend = resolve_backend(self.backend, hidden_states.device)
        grad = torch.is_grad_enabled()
        need_dgrad = (grad and hidden_states.requires_grad,
                      grad and (hidden_states.requires_grad or weights[0].requires_grad))
        return [backend.prepare_grouped_weight(w, self.recipe, self._seed(i), need_dgrad[i])
                for i, w in enumerate(weights)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.uses_grouped_mm(hidden_states):
            gate_up, down = self.expert_weights()
            return grouped_expert_mlp(hidden_states, top_k_index, top_k_weights, gate_up, down, self.act_fn)
        pending = PendingRouting.start(top_k_index, self.num_experts)
        gate_up, down = self.expert_weights() if self.mode == "train" else (None, None)
        prepared = self._prepare_weights(hidden_states, (gate_up, down))
        routing = pending.finish()
        x = routing.gather(hidden_states)
        h = gated_activation(self._linear(x, routing.mask, 0, gate_up, prepared[0]), routing.mask, self.act_fn)
        y = self._linear(h, routing.mask, 1, down, prepared[1])
        if self.mode == "train":
            self.calls += 1
        return routing.combine(y, top_k_weights, hidden_states)

    def extra_repr(self) -> str:
        fmt = "high precision" if self.recipe is None else f"format={self.recipe.format}, mode={self.mode}"
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, {fmt}")

