"""SD-MoE: spectrally decoupled routed experts (ALGORITHMS.md §3).

Every routed expert matrix (gate, up, down; the fused ``gate_up_proj`` is two matrices with their own bases) is
``W⁽ⁱ⁾ = W_c + W_u⁽ⁱ⁾``: one dense trainable ``W_c`` per (MoE layer, matrix type), shared by the layer's routed
experts, plus a full-size per-expert ``W_u⁽ⁱ⁾``. With ``U_k, V_k`` the top-k singular vectors of ``W_c`` and
``DC(X) = (I−P_U) X (I−P_V)``, after backward (and gradient accumulation) and before clipping / the optimizer step::

    W_u.grad ← DC(W_u.grad)                     # G_u⁽ⁱ⁾ = (I−P_U) G⁽ⁱ⁾ (I−P_V)
    W_c.grad ← W_c.grad − DC(W_c.grad)          # Σᵢ P_U G⁽ⁱ⁾ + (I−P_U) G⁽ⁱ⁾ P_V

(autograd already gives ``W_c.grad = Σᵢ G⁽ⁱ⁾``), batched over experts in O(m·n·k); ``U_k, V_k`` are refreshed by
an FP32 SVD of ``W_c`` every ``refresh_every`` optimizer steps. Both are launch-bound at small sizes: the rule runs
as a few batched GEMMs on stacked gradients (gate and up together; at model level all same-shape modules, see
`GROUP_NUMEL`), replayed on CUDA as one CUDA graph per problem (`sd_graph`), and a refresh as one batched SVD of
all the modules' ``W_c``.

Module: `SDMoEExperts`, a `LowBitExperts` subclass whose `expert_weights()` returns ``W_c + W_u``; with
``recipe=None`` the forward is the stock experts' math, with a recipe the FP4 GEMMs see the combined weight.
Parameter names: the per-expert part keeps the Hugging Face names and layout (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, so transformers' per-expert key conversions apply); the shared parts are
``common_gate [I, H]``, ``common_up [I, H]``, ``common_down [H, I]``. The bases are non-persistent buffers
(``sd_u_<m>``, ``sd_v_<m>``), recomputed from ``W_c`` on load.

Where the projection runs with `transformers.Trainer` (checked in transformers 5.23, ``Trainer._inner_training_loop``):
the Trainer calls ``_clip_grad_norm`` *before* ``callback_handler.on_pre_optimizer_step`` and no callback event
fires between the last backward of an accumulation window and clipping. `SDMoECallback` therefore installs
``Tensor.register_post_accumulate_grad_hook`` hooks on ``W_c`` and ``W_u`` at ``on_train_begin``: the first to fire
in a backward pass queues one batched projection of all the accumulated ``.grad`` for the end of that pass. Both maps (``DC`` and ``I−DC``) are linear and idempotent, so projecting
after each micro-batch equals projecting the accumulated sum once, and clipping sees the projected gradients.
``on_pre_optimizer_step`` projects once more (a no-op unless a wrapper such as DDP rewrote ``.grad`` after the hooks)
and ``on_optimizer_step`` counts optimizer steps, applies the update-projection ablation and refreshes the bases.

Custom (Accelerate) loops::

    loss.backward()                      # or accelerator.backward(loss)
    project_gradients(model)             # before clipping
    clip; optimizer.step()
    after_optimizer_step(model)          # refresh every `refresh_every` steps (+ ablations)

(`refresh_bases(model)` refreshes unconditionally; `install_gradient_hooks(model)` is the hook route.)
Under FSDP2 (`fully_shard`: DTensors sharded along dim 0) both routes work: each rank projects its own experts'
``W_u`` gradients, ``W_c`` is gathered for its rule and for the refresh (`sd_sharded`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from hf_lowbit.config import module_matches
from hf_lowbit.model_patches.experts import LowBitExperts
from hf_lowbit.model_patches.sd_graph import graphed_rule, graphs_enabled
from hf_lowbit.model_patches.sd_sharded import (broadcast_from_first_rank, gathered, is_sharded, local_experts,
                                                write_local_rows)

SD_MATRICES = ("gate", "up", "down")
INITS = ("preserve", "project", "scratch")

__all__ = ["SDMoEExperts", "SDMoECallback", "SD_MATRICES", "apply_sd_moe", "after_optimizer_step", "callbacks",
           "fold_sd_moe", "has_sd_moe", "install_gradient_hooks", "project_gradients", "refresh_bases",
           "sd_modules", "double_complement"]


def double_complement(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(I − U Uᵀ) X (I − V Vᵀ)`` for ``X [..., m, n]``, ``U [m, k]``, ``V [n, k]`` in O(m·n·k) (FP32)."""
    x = x.float()
    a = x - u @ (u.transpose(0, 1) @ x)
    return a - (a @ v) @ v.transpose(0, 1)


#: `project_gradients(model)` stacks the gradients of same-shape SD-MoE modules into one batched problem (for
#: launch-bound small models: ~20 kernels instead of ~60 a module) while a stack holds at most this many FP32
#: elements (128 MiB); modules with more than a quarter of it are projected one by one, W_u in place (bandwidth-
#: bound: the stack's two extra copies would cost more). On the CPU nothing is launch-bound: a smaller limit.
GROUP_NUMEL = 1 << 25
GROUP_NUMEL_CPU = 1 << 20

#: (module, matrix types, repeats): the bases of ``repeats`` consecutive matrices of a batched problem; with two
#: types (gate, up) the matrices alternate (the [E, 2I, H] ``gate_up_proj`` seen as [2E, I, H]).
_Part = tuple["SDMoEExperts", tuple[str, ...], int]


def _dc_factors(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Uᵀ X`` and ``B = (I − U Uᵀ) X V`` for batched FP32 ``X [N, m, n]``, ``U [N, m, k]``, ``V [N, n, k]``, so
    that ``DC(X) = X − U A − B Vᵀ`` and ``X − DC(X) = U A + B Vᵀ`` (4 batched GEMMs, no [N, m, n] temporary)."""
    a = torch.bmm(u.mT, x)
    b = torch.bmm(x, v)
    b.baddbmm_(u, torch.bmm(a, v), alpha=-1)
    return a, b


def _stacked_bases(owner: "SDMoEExperts", slot: Any, parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """U [N, m, k], V [N, n, k] of a batched problem laid out as ``parts``; cached on ``owner`` under ``slot`` until
    one of the bases is replaced or modified (i.e. until the next refresh)."""
    sig = tuple((id(mod), ms, reps) for mod, ms, reps in parts)
    src = [t for mod, ms, _ in parts for m in ms for t in mod.bases(m)]
    ver = [t._version for t in src]
    cache = owner.__dict__.setdefault("_stacks", {})
    hit = cache.get(slot)
    if hit is not None and hit[0] == sig and hit[2] == ver and all(a is b for a, b in zip(hit[1], src)):
        return hit[3], hit[4]
    us = [mod.bases(m)[0] for mod, ms, reps in parts for _ in range(reps) for m in ms]
    vs = [mod.bases(m)[1] for mod, ms, reps in parts for _ in range(reps) for m in ms]
    u, v = torch.stack(us), torch.stack(vs)
    cache[slot] = (sig, src, ver, u, v)
    return u, v


def _rule(x_in: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_unique: int) -> list[torch.Tensor]:
    """The gradient rule on a stacked problem, out of place: ``[DC(x[:n_unique]), x[n_unique:] − DC(x[n_unique:])]``
    (empty parts omitted) in FP32; ``U A + B Vᵀ`` as one rank-2k product."""
    x = x_in.float()
    a, b = _dc_factors(x, u, v)
    left, right = torch.cat([u, b], -1), torch.cat([a, v.mT], -2)
    out = []
    if n_unique:
        out.append(torch.baddbmm(x[:n_unique], left[:n_unique], right[:n_unique], alpha=-1))
    if n_unique < x.shape[0]:
        out.append(torch.bmm(left[n_unique:], right[n_unique:]))
    return out


@torch.no_grad()
def _project_stack(owner: "SDMoEExperts", slot: Any, uniques: list[tuple[torch.Tensor, _Part]],
                   commons: list[tuple[torch.Tensor, _Part]]) -> None:
    """Gradient rule for same-shape matrices as one batched problem: each ``(grad, part)`` of ``uniques`` gets
    ``DC(grad)``, of ``commons`` ``grad − DC(grad)``. FP32 math on one stacked working copy, written back at once:
    in place, without a copy, for a single contiguous FP32 unique gradient; on CUDA otherwise replayed as one
    CUDA graph (`sd_graph`: 3 host launches instead of ~12)."""
    items = uniques + commons
    if not items:
        return
    mod, ms, _ = items[0][1]
    shape = mod._shape(ms[0])
    counts = [reps * len(ms) for _, (_, ms, reps) in items]
    grads = [g for g, _ in items]
    u, v = _stacked_bases(owner, slot, [part for _, part in items])
    nu = sum(counts[:len(uniques)])
    alias = len(items) == 1 and not commons and grads[0].dtype == torch.float32 and grads[0].is_contiguous()
    parts = [g.reshape(c, *shape) for g, c in zip(grads, counts)]
    if alias:  # one pass over the gradient, in place
        x = parts[0]
        a, b = _dc_factors(x, u, v)
        x.baddbmm_(torch.cat([u, b], -1), torch.cat([a, v.mT], -2), alpha=-1)
        return
    dtypes = {g.dtype for g in grads}
    if graphs_enabled(u.device) and len(dtypes) == 1:
        signature = (slot, dtypes.pop(), tuple(shape), tuple(counts), nu, u.device)
        graph = graphed_rule(owner.__dict__.setdefault("_rule_graphs", {}), signature,
                             lambda x, uu, vv: _rule(x, uu, vv, nu), (sum(counts), *shape), grads[0].dtype, u, v)
        out = graph.run(parts, u, v)
    else:
        out = _rule(parts[0] if len(parts) == 1 else torch.cat(parts), u, v, nu)
    sizes = ([counts[:len(uniques)]] if uniques else []) + ([counts[len(uniques):]] if commons else [])
    split = [t for o, c in zip(out, sizes) for t in o.split(c)]
    torch._foreach_copy_(grads, [o.view(g.shape) for o, g in zip(split, grads)])


def _batches(modules: list["SDMoEExperts"]) -> Iterator[list["SDMoEExperts"]]:
    """Modules of equal shapes, rank and device, in runs of at most `GROUP_NUMEL` gate/up gradient elements
    (single modules when one has more than a quarter of it)."""
    groups: dict[tuple, list[SDMoEExperts]] = {}
    for mod in modules:
        key = (mod.num_experts, mod.intermediate_dim, mod.hidden_dim, mod.rank, mod.gate_up_proj.device)
        groups.setdefault(key, []).append(mod)
    for (e, i, h, _, device), mods in groups.items():
        per = (GROUP_NUMEL_CPU if device.type == "cpu" else GROUP_NUMEL) // ((2 * e + 2) * i * h)
        per = per if per >= 4 else 1
        for start in range(0, len(mods), per):
            yield mods[start:start + per]


@torch.no_grad()
def _project_modules(mods: list["SDMoEExperts"]) -> None:
    """The gradient rule for same-shape modules: one batched problem for the gate/up matrices, one for down."""
    for key, ms in (("gate_up", ("gate", "up")), ("down", ("down",))):
        uniques = [(mod.gate_up_proj.grad if key == "gate_up" else mod.down_proj.grad, (mod, ms, mod.num_experts))
                   for mod in mods]
        commons = [(mod.common(m).grad, (mod, (m,), 1)) for mod in mods for m in ms]
        _project_stack(mods[0], ("modules", key), [t for t in uniques if t[0] is not None],
                       [t for t in commons if t[0] is not None])


#: cuSOLVER method of the refresh SVD on CUDA (`torch.linalg.svd(driver=...)`), set by `HF_LOWBIT_SD_SVD_DRIVER`.
#: Default "gesvda": one batched call for the (tall) W_c stack, accurate for the leading singular triplets the refresh
#: keeps; measured on an H200 (scripts/bench_sd_refresh.py, 12 matrices 512×256) 9.1 ms per refresh vs 82.6 ms for
#: PyTorch's own choice ("torch": gesvdj, looped over the batch) and 246 ms for "gesvd", subspaces within 1e-8 of an
#: FP64 SVD. Ignored on CPU (LAPACK). "subspace" (any device, opt-in until measured on a GPU): `subspace_svd`, a
#: few batched GEMMs and QRs warm-started from the previous bases instead of gesvda's ~1500 launches per refresh.
SVD_DRIVERS = ("gesvda", "gesvd", "gesvdj", "torch", "subspace")
DEFAULT_SVD_DRIVER = "gesvda"


def svd_driver(device: torch.device) -> str | None:
    """The `torch.linalg.svd` driver of the refresh on `device` (None: PyTorch's choice), or "subspace"; raises on
    an unknown `HF_LOWBIT_SD_SVD_DRIVER`, naming the allowed values."""
    name = os.environ.get("HF_LOWBIT_SD_SVD_DRIVER") or DEFAULT_SVD_DRIVER
    if name not in SVD_DRIVERS:
        raise ValueError(f"HF_LOWBIT_SD_SVD_DRIVER={name!r} is not supported; allowed: {list(SVD_DRIVERS)}")
    if name == "subspace":
        return name
    return name if device.type == "cuda" and name != "torch" else None


#: subspace_svd: extra columns beyond k, and power iterations. With the previous bases as the start, the error of
#: the top-k subspace shrinks like (s_(l+1)/s_k)^(2·iters+1), l = k + oversampling (ALGORITHMS.md §3 refreshes a
#: W_c that moved for only `refresh_every` optimizer steps since the last SVD). Measured on CPU (4 matrices 96×64,
#: rank-8 signal + noise; projector error vs FP64): 3 iterations 6e-7 warm / 8e-6 cold (a full FP32 SVD: 3e-7),
#: 2 iterations 1e-5 / 2e-4. Without a spectral gap after k the top-k subspace is ill-defined and no start helps.
SUBSPACE_OVERSAMPLE = 8
SUBSPACE_ITERS = 3


def subspace_svd(w: torch.Tensor, v0: torch.Tensor, iters: int = SUBSPACE_ITERS,
                 oversample: int = SUBSPACE_OVERSAMPLE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triplets of tall FP32 matrices ``w [N, m, n]`` by block power iteration from ``v0 [N, n, k]``
    (the previous right bases; zeros are allowed) plus `oversample` fixed random columns, then Rayleigh-Ritz:
    returns ``u [N, m, l]``, ``s [N, l]``, ``vh [N, l, n]`` for l = min(n, k + oversample), like a reduced SVD
    truncated to l. Falls back to the full SVD when l reaches n."""
    n_mat, _, n = w.shape
    cols = min(n, v0.shape[-1] + oversample)
    if cols >= n:
        return torch.linalg.svd(w, full_matrices=False)
    gen = torch.Generator(device=w.device).manual_seed(0)
    extra = torch.randn(n_mat, n, cols - v0.shape[-1], generator=gen, device=w.device, dtype=w.dtype)
    omega = torch.cat([v0.to(w.dtype), extra], -1)
    for _ in range(iters):
        q = torch.linalg.qr(torch.bmm(w, omega)).Q
        omega = torch.linalg.qr(torch.bmm(w.mT, q)).Q
    q = torch.linalg.qr(torch.bmm(w, omega)).Q                    # [N, m, l]: the range of W on the subspace
    ub, s, vh = torch.linalg.svd(torch.bmm(q.mT, w), full_matrices=False)  # small [N, l, n] problem
    return torch.bmm(q, ub), s, vh


def _stack_svd(w: torch.Tensor, v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD of a stack of tall FP32 matrices with the refresh driver; where an approximate driver returns
    non-finite factors for finite input (gesvda divides by the singular values: a zero W_c) or fails to converge,
    PyTorch's default driver recomputes the stack. The check costs one host sync per refresh. ``v0``: the previous
    right bases, the start of the "subspace" driver."""
    driver = svd_driver(w.device)
    if driver == "subspace":
        return subspace_svd(w, v0) if v0 is not None else torch.linalg.svd(w, full_matrices=False)
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False, driver=driver)
    except torch.linalg.LinAlgError:
        if driver is None:
            raise
        # gesvda raised "failed to converge" on an exactly rank-k FP32 W_c (the "preserve" init) on an H200
        return torch.linalg.svd(w, full_matrices=False)
    if driver is not None and driver != "gesvd":
        bad = ~(torch.isfinite(u).all() & torch.isfinite(vh).all()) & torch.isfinite(w).all()
        if bool(bad):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh


@torch.no_grad()
def _refresh_modules(mods: list["SDMoEExperts"], fold_residual: bool | None = None) -> None:
    """`SDMoEExperts.refresh` of several modules: one batched FP32 SVD per (shape, device) of all their W_c, each
    seen tall (wide ones transposed: the same singular triplets with U and V swapped; tall is faster in LAPACK)."""
    groups: dict[tuple, list[SDMoEExperts]] = {}
    for mod in mods:
        groups.setdefault((mod.intermediate_dim, mod.hidden_dim, mod.common_gate.device), []).append(mod)
    for (i, h, _), group in groups.items():
        flip = {m: (h if m == "down" else i) < (i if m == "down" else h) for m in SD_MATRICES}
        whole = {(j, m): gathered(mod.common(m).detach(), f"common_{m}").float()  # FSDP2: all-gathered W_c
                 for j, mod in enumerate(group) for m in SD_MATRICES}
        w = torch.stack([whole[j, m].mT if flip[m] else whole[j, m]
                         for j in range(len(group)) for m in SD_MATRICES])             # [3M, max(I,H), min(I,H)]
        k = max(mod.rank for mod in group)
        previous = None
        if svd_driver(w.device) == "subspace":  # its start: the right bases of the tall view
            previous = torch.stack([_pad_cols(mod.bases(m)[0 if flip[m] else 1], k)
                                    for mod in group for m in SD_MATRICES]).to(w.device)
        u, s, vh = _stack_svd(w, previous)
        uk, vk = u[..., :k].contiguous(), vh[..., :k, :].mT.contiguous()  # two copies; bases are views of these
        s = s[..., :k].contiguous()
        if any(mod.is_sharded() for mod in group):
            broadcast_from_first_rank([uk, vk, s])  # every rank projects with the same bits
        for j, mod in enumerate(group):
            fold = mod.fold_residual if fold_residual is None else fold_residual
            r = mod.rank
            for t, m in enumerate(SD_MATRICES):
                n = 3 * j + t
                bu, bv = (vk[n, :, :r], uk[n, :, :r]) if flip[m] else (uk[n, :, :r], vk[n, :, :r])
                if fold:
                    wc = mod.common(m)
                    low = (bu * s[n, :r]) @ bv.transpose(0, 1)
                    mine = local_experts((mod.down_proj if m == "down" else mod.gate_up_proj).detach(), "W_u")
                    mod.unique(m, mine).add_((whole[j, m] - low).to(mine.dtype))
                    if is_sharded(wc):
                        write_local_rows(wc.detach(), low)
                    else:
                        wc.copy_(low.to(wc.dtype))
                mod._set_bases(m, bu, bv)
            mod.refreshes += 1


def _pad_cols(b: torch.Tensor, k: int) -> torch.Tensor:
    """A basis [rows, r] padded with zero columns to [rows, k]."""
    return b if b.shape[-1] == k else torch.cat([b, b.new_zeros(b.shape[0], k - b.shape[-1])], -1)


def _top_k(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k left vectors [m, k], singular values [k], right vectors [n, k] of a 2-D matrix (FP32 SVD)."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k].transpose(0, 1)


def _complement_basis(u: torch.Tensor, n_cols: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random orthonormal [m, n_cols] bases inside the orthogonal complement of the columns of ``u``."""
    a = torch.randn(batch, u.shape[0], n_cols, generator=gen, dtype=torch.float32).to(u.device)
    a = a - u @ (u.transpose(0, 1) @ a)
    a = a - u @ (u.transpose(0, 1) @ a)  # twice: numerically clean complement
    return torch.linalg.qr(a).Q


class SDMoEExperts(LowBitExperts):
    """Routed experts with a shared ``W_c`` per matrix type and per-expert ``W_u`` (``gate_up_proj``/``down_proj``)."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 recipe=None, rank: int = 8, refresh_every: int = 16, project_updates: bool = False,
                 fold_residual: bool = False, backend: str = "auto", seed: int = 0, device=None, dtype=None) -> None:
        super().__init__(num_experts, hidden_dim, intermediate_dim, act_fn, recipe, "train", backend, seed,
                         device=device, dtype=dtype)
        if rank < 1 or refresh_every < 1:
            raise ValueError(f"SDMoEExperts: rank={rank} and refresh_every={refresh_every} must be >= 1")
        kw = dict(device=device, dtype=dtype)
        i, h = intermediate_dim, hidden_dim
        self.common_gate = nn.Parameter(torch.zeros(i, h, **kw))
        self.common_up = nn.Parameter(torch.zeros(i, h, **kw))
        self.common_down = nn.Parameter(torch.zeros(h, i, **kw))
        self.rank = min(rank, i, h)
        self.refresh_every = refresh_every
        self.project_updates = project_updates
        self.fold_residual = fold_residual
        self.optimizer_steps = 0
        self.refreshes = 0
        for m in SD_MATRICES:
            rows, cols = self._shape(m)
            self.register_buffer(f"sd_u_{m}", torch.zeros(rows, self.rank, device=device), persistent=False)
            self.register_buffer(f"sd_v_{m}", torch.zeros(cols, self.rank, device=device), persistent=False)
        self.__dict__["_stock"] = None        # the stock experts module to fold back into (not a submodule)
        self.__dict__["_hooks"] = []
        self.__dict__["_snapshot"] = None

    @classmethod
    def from_experts(cls, experts: nn.Module, recipe=None, rank: int = 8, refresh_every: int = 16,
                     project_updates: bool = False, fold_residual: bool = False, backend: str = "auto",
                     seed: int = 0) -> "SDMoEExperts":
        w = experts.gate_up_proj
        new = cls(experts.num_experts, w.shape[-1], w.shape[-2] // 2, experts.act_fn, recipe, rank, refresh_every,
                  project_updates, fold_residual, backend, seed, device=w.device, dtype=w.dtype)
        new.layer_id = getattr(experts, "layer_id", 0)
        return new

    # -- views -----------------------------------------------------------------------------------------------------
    def _shape(self, m: str) -> tuple[int, int]:
        i, h = self.intermediate_dim, self.hidden_dim
        return (h, i) if m == "down" else (i, h)

    def common(self, m: str) -> nn.Parameter:
        """W_c of matrix type ``m`` (``"gate"``, ``"up"``, ``"down"``)."""
        return getattr(self, f"common_{m}")

    def unique(self, m: str, t: torch.Tensor | None = None) -> torch.Tensor:
        """The [E, out, in] view of matrix type ``m`` inside the per-expert tensor ``t`` (default: W_u)."""
        i = self.intermediate_dim
        if m == "down":
            return self.down_proj if t is None else t
        t = self.gate_up_proj if t is None else t
        return t[:, :i] if m == "gate" else t[:, i:]

    def _unique_grad(self, m: str) -> torch.Tensor | None:
        p = self.down_proj if m == "down" else self.gate_up_proj
        return None if p.grad is None else self.unique(m, p.grad)

    def bases(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"sd_u_{m}"), getattr(self, f"sd_v_{m}")

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        common_gate_up = torch.cat([self.common_gate, self.common_up], 0)
        return self.gate_up_proj + common_gate_up.to(self.gate_up_proj.dtype), \
            self.down_proj + self.common_down.to(self.down_proj.dtype)

    @torch.no_grad()
    def combined_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached ``W_c + W_u⁽ⁱ⁾`` as fused (gate_up [E, 2I, H], down [E, H, I])."""
        return tuple(w.detach().clone() for w in self.expert_weights())

    # -- init ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, gate_up: torch.Tensor, down: torch.Tensor, init: str = "preserve",
                  generator: torch.Generator | None = None) -> None:
        """Set W_c, W_u from stock expert weights (``preserve`` / ``project``) or from scratch (``scratch``)."""
        if init not in INITS:
            raise ValueError(f"SD-MoE: init={init!r} is not valid; allowed: {list(INITS)}")
        gen = generator or torch.Generator().manual_seed(self.base_seed)
        k, e = self.rank, self.num_experts
        for m in SD_MATRICES:
            w = self.unique(m, down if m == "down" else gate_up).detach().float()
            if init == "scratch":
                std = float(w.std()) if w.numel() > 1 and float(w.std()) > 0 else 0.02
                draw = torch.randn(*self._shape(m), generator=gen) * std
                u, s, vh = torch.linalg.svd(draw.to(w.device), full_matrices=False)
                uk, vk = u[:, :k], vh[:k].transpose(0, 1)
                wc = (uk * s[:k]) @ vk.transpose(0, 1)
                tail = s[k:]
                qu = _complement_basis(uk, len(tail), e, gen)
                qv = _complement_basis(vk, len(tail), e, gen)
                wu = (qu * tail) @ qv.transpose(-1, -2)
            else:
                uk, sk, vk = _top_k(w.mean(0), k)
                wc = (uk * sk) @ vk.transpose(0, 1)
                wu = w - wc if init == "preserve" else double_complement(w, uk, vk)
            self.common(m).copy_(wc.to(self.common(m).dtype))
            self.unique(m).copy_(wu.to(self.gate_up_proj.dtype))
            self._set_bases(m, uk, vk)
        self.refreshes, self.optimizer_steps = 0, 0

    def _set_bases(self, m: str, u: torch.Tensor, v: torch.Tensor) -> None:
        setattr(self, f"sd_u_{m}", u.float().contiguous())
        setattr(self, f"sd_v_{m}", v.float().contiguous())

    # -- the SD-MoE rules --------------------------------------------------------------------------------------------
    def refresh(self, fold_residual: bool | None = None) -> None:
        """Recompute U_k, V_k by an FP32 SVD of each W_c (optionally moving W_c's beyond-rank-k part into W_u);
        one batched SVD for the three matrices."""
        _refresh_modules([self], fold_residual)

    def project_unique_grad(self, param: str | None = None) -> None:
        """W_u.grad ← DC(W_u.grad) for ``param`` (``"gate_up_proj"``: gate and up in one batched op,
        ``"down_proj"``) or both (None). FSDP2-sharded: the rank's own experts."""
        for name, ms in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
            g = getattr(self, name).grad
            if param in (None, name) and g is not None:
                local = local_experts(g, f"{name}.grad")
                _project_stack(self, name, [(local, (self, ms, local.shape[0]))], [])

    def project_common_grad(self, m: str | None = None) -> None:
        """W_c.grad ← W_c.grad − DC(W_c.grad) for matrix type ``m`` or all three (None; gate and up batched).
        FSDP2-sharded: on the gathered matrix, then the rank's rows written back."""
        for ms in (("gate", "up"), ("down",)):
            grads = [(self.common(t).grad, t) for t in ms if m in (None, t) and self.common(t).grad is not None]
            whole = [gathered(g, f"common_{t}.grad") for g, t in grads]
            _project_stack(self, ("common",) + ms if m is None else m, [],
                           [(w, (self, (t,), 1)) for w, (_, t) in zip(whole, grads)])
            for (g, _), w in zip(grads, whole):
                if is_sharded(g):
                    write_local_rows(g, w)

    def is_sharded(self) -> bool:
        """Whether FSDP2 shards this module's parameters (DTensors)."""
        return any(is_sharded(p) for p in self.parameters())

    def project_gradients(self) -> None:
        """W_u.grad ← DC(W_u.grad), W_c.grad ← W_c.grad − DC(W_c.grad) (idempotent); W_u in place when FP32."""
        self.project_unique_grad()
        self.project_common_grad()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep W_u before the optimizer step (update-projection ablation)."""
        self.__dict__["_snapshot"] = (self.gate_up_proj.detach().clone(), self.down_proj.detach().clone())

    @torch.no_grad()
    def project_update(self) -> None:
        """W_u ← W_u_old + DC(W_u − W_u_old): the optimizer's update of W_u stays in the double complement."""
        snap = self.__dict__.get("_snapshot")
        if snap is None:
            return
        for m in SD_MATRICES:  # FSDP2-sharded: the rank's own experts
            old = self.unique(m, local_experts(snap[1] if m == "down" else snap[0]))
            new = self.unique(m, local_experts((self.down_proj if m == "down" else self.gate_up_proj).detach()))
            delta = double_complement(new.float() - old.float(), *self.bases(m))
            new.copy_((old.float() + delta).to(new.dtype))
        self.__dict__["_snapshot"] = None

    def _count_step(self, step: int | None) -> bool:
        """Ablation (if on) + step counting; True when a refresh is due."""
        if self.project_updates:
            self.project_update()
        self.optimizer_steps = self.optimizer_steps + 1 if step is None else step
        return self.optimizer_steps % self.refresh_every == 0

    def after_optimizer_step(self, step: int | None = None) -> bool:
        """Ablation (if on) + step counting + refresh on schedule; returns True when the bases were refreshed."""
        if self._count_step(step):
            self.refresh()
            return True
        return False

    # -- hooks -------------------------------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        """Apply the gradient rule at the end of every backward (see `install_gradient_hooks`), for this module."""
        _install_batched_hooks([self])

    def remove_hooks(self) -> None:
        for h in self.__dict__["_hooks"]:
            h.remove()
        self.__dict__["_hooks"] = []

    # -- export ------------------------------------------------------------------------------------------------------
    def to_infer(self) -> None:
        raise ValueError("SDMoEExperts.to_infer(): fold first (hf_lowbit.finalize folds W_c + W_u, then packs)")

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """An ordinary experts module holding ``W_c + W_u⁽ⁱ⁾``: the stock class when SD-MoE was applied to stock
        experts, otherwise a `LowBitExperts` with the same recipe (train storage)."""
        gate_up, down = self.combined_weights()
        stock = self.__dict__.get("_stock")
        if stock is not None and self.recipe is None:
            new = stock
        else:
            new = LowBitExperts(self.num_experts, self.hidden_dim, self.intermediate_dim, self.act_fn, self.recipe,
                                "train", self.backend, self.base_seed, device=gate_up.device, dtype=gate_up.dtype)
            new.layer_id, new.calls = self.layer_id, self.calls
        new.gate_up_proj = nn.Parameter(gate_up, requires_grad=self.gate_up_proj.requires_grad)
        new.down_proj = nn.Parameter(down, requires_grad=self.down_proj.requires_grad)
        return new

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sd_rank={self.rank}, refresh_every={self.refresh_every}"
                + (", project_updates" if self.project_updates else "")
                + (", fold_residual" if self.fold_residual else ""))


# ---------------------------------------------------------------------------------------------------------------------
# Model-level API
# ---------------------------------------------------------------------------------------------------------------------
def sd_modules(model: nn.Module) -> Iterator[tuple[str, SDMoEExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, SDMoEExperts):
            yield name, module


def has_sd_moe(model: nn.Module) -> bool:
    return any(True for _ in sd_modules(model))


def _to_meta(module: nn.Module) -> nn.Module:
    """Drop a stock module's weights (kept only as a class/config template for folding back)."""
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                           requires_grad=p.requires_grad))
    return module


def apply_sd_moe(model: nn.Module, rank: int = 8, init: str = "preserve", refresh_every: int = 16,
                 project_updates: bool = False, fold_residual: bool = False, seed: int = 0,
                 skip: list[str] | None = None) -> list[str]:
    """Turn the routed experts of a supported MoE model into SD-MoE experts in place; returns the converted names.

    Stock experts (no quantization) become ``SDMoEExperts(recipe=None)`` (stock math); `LowBitExperts` in train
    storage keep their FP4 recipe and compute on ``W_c + W_u``. Already SD-MoE modules get fresh bases from their
    W_c (a reloaded checkpoint). ``init``: ``"preserve"`` (default; outputs unchanged), ``"project"``,
    ``"scratch"`` (Algorithm 1). ``project_updates`` / ``fold_residual`` are the two ablation switches.
    """
    from hf_lowbit.model_patches import experts_to_convert
    from hf_lowbit.replace import stable_layer_id

    if init not in INITS:
        raise ValueError(f"apply_sd_moe: init={init!r} is not valid; allowed: {list(INITS)}")
    skip = list(skip or [])
    stock_names = set(experts_to_convert(model, skip))
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, SDMoEExperts):
            module.rank = min(rank, module.intermediate_dim, module.hidden_dim)
            module.refresh_every, module.project_updates, module.fold_residual = (refresh_every, project_updates,
                                                                                  fold_residual)
            module.refresh(fold_residual=False)
            module.refreshes = 0
            names.append(name)
            continue
        is_lowbit = isinstance(module, LowBitExperts) and module.mode == "train" and not module_matches(name, skip)
        if name not in stock_names and not is_lowbit:
            continue
        recipe = module.recipe if is_lowbit else None
        backend = module.backend if is_lowbit else "auto"
        new = SDMoEExperts.from_experts(module, recipe, rank, refresh_every, project_updates, fold_residual,
                                        backend, seed)
        new.layer_id = module.layer_id if is_lowbit else stable_layer_id(name)
        if is_lowbit:
            new.base_seed, new.calls = module.base_seed, module.calls
        gen = torch.Generator().manual_seed(seed * 1_000_003 + stable_layer_id(name) % 1_000_003)
        new.init_from(module.gate_up_proj, module.down_proj, init, gen)
        for p_new, p_old in ((new.gate_up_proj, module.gate_up_proj), (new.down_proj, module.down_proj)):
            p_new.requires_grad_(p_old.requires_grad)
        for m in SD_MATRICES:
            new.common(m).requires_grad_(module.gate_up_proj.requires_grad)
        if not is_lowbit:
            new.__dict__["_stock"] = _to_meta(module)
        model.set_submodule(name, new)
        names.append(name)
    if not names:
        raise ValueError("apply_sd_moe(): no routed experts found (supported model types: qwen2_moe, qwen3_moe, "
                         "deepseek_v2, deepseek_v3)")
    return names


def fold_sd_moe(model: nn.Module) -> list[str]:
    """Replace every SD-MoE experts module by an ordinary one holding ``W_c + W_u⁽ⁱ⁾`` (in place)."""
    names = []
    for name, module in list(sd_modules(model)):
        module.remove_hooks()
        model.set_submodule(name, module.fold())
        names.append(name)
    return names


def _project_all(mods: list[SDMoEExperts]) -> None:
    """The gradient rule for `mods`: same-shape modules together, two batched problems (gate/up, down) per
    `GROUP_NUMEL` batch; FSDP2-sharded modules one by one (see `sd_sharded`)."""
    sharded = {mod: mod.is_sharded() for mod in mods}
    for mod in mods:
        if sharded[mod]:
            mod.project_gradients()
    for batch in _batches([mod for mod in mods if not sharded[mod]]):
        if len(batch) > 1:
            _project_modules(batch)
        else:
            batch[0].project_gradients()


def project_gradients(model: nn.Module) -> None:
    """Apply the SD-MoE gradient rule to every SD-MoE module (after backward/accumulation, before clipping).
    Same-shape modules are projected together: two batched problems (gate/up, down) per `GROUP_NUMEL` batch."""
    mods = [module for _, module in sd_modules(model)]
    _project_all(mods)
    for module in mods:
        if module.project_updates:
            module.snapshot()


def refresh_bases(model: nn.Module, fold_residual: bool | None = None) -> None:
    """Recompute U_k, V_k of every W_c now (one batched FP32 SVD per matrix shape)."""
    _refresh_modules([module for _, module in sd_modules(model)], fold_residual)


def after_optimizer_step(model: nn.Module, step: int | None = None) -> bool:
    """Call after each ``optimizer.step()``: counts steps and refreshes every ``refresh_every`` (+ ablations);
    the modules due refresh together (batched SVD). Returns True when any module refreshed."""
    due = [module for _, module in sd_modules(model) if module._count_step(step)]
    _refresh_modules(due)
    return bool(due)


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield


class _EndOfBackwardProjection:
    """Post-accumulate-grad hooks on every SD-MoE parameter of `modules`; the first one to fire in a backward pass
    queues one batched projection of all their gradients for the end of that pass (autograd's `queue_callback`,
    as DDP's reducer does), so the rule costs the few batched launches of `project_gradients` per backward, not
    a projection per parameter. Exact with gradient accumulation: the rule is linear and idempotent."""

    def __init__(self, modules: list[SDMoEExperts]) -> None:
        self.modules = modules
        self.queued = False

    def on_grad(self, param: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.project)

    def project(self) -> None:
        self.queued = False
        _project_all(self.modules)


def _install_batched_hooks(modules: list[SDMoEExperts]) -> None:
    """`_EndOfBackwardProjection` over the modules without hooks yet; each keeps its handles (`remove_hooks`)."""
    todo = [m for m in modules if not m.__dict__["_hooks"]]
    if not todo:
        return
    hook = _EndOfBackwardProjection(todo)
    for m in todo:
        params = [m.gate_up_proj, m.down_proj] + [m.common(t) for t in SD_MATRICES]
        m.__dict__["_hooks"] = [p.register_post_accumulate_grad_hook(hook.on_grad) for p in params]


def install_gradient_hooks(model: nn.Module) -> contextlib.AbstractContextManager:
    """Project gradients automatically at the end of every backward (post-accumulate-grad hooks + one batched
    projection per pass), i.e. before any clipping. Returns a context manager that removes the hooks on exit (or
    call `remove_gradient_hooks`)."""
    modules = [m for _, m in sd_modules(model)]
    _install_batched_hooks(modules)

    @contextlib.contextmanager
    def remover() -> Iterator[None]:
        try:
            yield
        finally:
            for m in modules:
                m.remove_hooks()

    return remover()


def remove_gradient_hooks(model: nn.Module) -> None:
    for _, module in sd_modules(model):
        module.remove_hooks()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer callback
# ---------------------------------------------------------------------------------------------------------------------
from transformers import TrainerCallback  # noqa: E402


class SDMoECallback(TrainerCallback):
    """SD-MoE for `transformers.Trainer`: gradient rule before clipping (post-accumulate hooks, see the module
    docstring), refresh every ``refresh_every`` optimizer steps. Arguments left None keep the modules' settings."""

    def __init__(self, refresh_every: int | None = None, project_updates: bool | None = None,
                 fold_residual: bool | None = None) -> None:
        self.refresh_every, self.project_updates, self.fold_residual = refresh_every, project_updates, fold_residual
        self.refresh_steps: list[int] = []

    def _modules(self, model: nn.Module | None) -> list[SDMoEExperts]:
        return [] if model is None else [m for _, m in sd_modules(model)]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any):
        for m in self._modules(model):
            for attr in ("refresh_every", "project_updates", "fold_residual"):
                if getattr(self, attr) is not None:
                    setattr(m, attr, getattr(self, attr))
            m.optimizer_steps = state.global_step  # resume keeps the schedule
        _install_batched_hooks(self._modules(model))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any):
        project_gradients(model)  # idempotent: a no-op after the hooks, a safety net if .grad was rewritten

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any):
        if after_optimizer_step(model, state.global_step + 1):  # global_step is incremented after this event
            self.refresh_steps.append(state.global_step + 1)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kw: Any):
        for m in self._modules(model):
            m.remove_hooks()


def callbacks(model: nn.Module) -> list[TrainerCallback]:
    """The Trainer callbacks this model needs: ``Trainer(..., callbacks=hf_lowbit.callbacks(model))``."""
    return [SDMoECallback()] if has_sd_moe(model) else []


def swap_to_sd(model: nn.Module, names: list[str], config: Any) -> None:
    """Replace `LowBitExperts` (train storage, possibly on the meta device) by empty `SDMoEExperts` with the same
    recipe, so that a saved train-mode SD-MoE checkpoint (``common_*`` keys) loads by name."""
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, SDMoEExperts) or not isinstance(old, LowBitExperts):
            continue
        new = SDMoEExperts.from_experts(old, old.recipe, config.sd_rank, config.sd_refresh_every,
                                        backend=old.backend, seed=old.base_seed)
        new.layer_id = old.layer_id
        model.set_submodule(name, new)
