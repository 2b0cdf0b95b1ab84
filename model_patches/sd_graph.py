"""The batched SD-MoE gradient rule replayed as one CUDA graph.

At the sizes where same-shape modules are stacked into one problem (`sd_moe.GROUP_NUMEL`), the rule is host-bound:
~12 eager launches per problem, each costing more on the host than on the GPU. Here the gradients are copied into a
static input (one `cat`), one graph replays the rule's GEMMs, and one `_foreach_copy_` writes the results back:
3 host launches per problem. The graph computes exactly the eager ops of `sd_moe._project_stack`, on static copies
of the bases (refreshed when the bases change). `HF_LOWBIT_SD_GRAPH=0` turns it off.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

#: (slot, dtype, trailing shape, counts, unique count, device) of a batched problem: one graph per signature
Signature = tuple


def graphs_enabled(device: torch.device) -> bool:
    """Whether the rule is replayed as a CUDA graph on `device` (CUDA, unless ``HF_LOWBIT_SD_GRAPH=0``); raises on
    another value of the switch, naming the allowed ones."""
    value = os.environ.get("HF_LOWBIT_SD_GRAPH", "1")
    if value not in ("0", "1"):
        raise ValueError(f"HF_LOWBIT_SD_GRAPH={value!r} is not supported; allowed: ['0', '1'] (0: eager ops)")
    return device.type == "cuda" and value == "1"


class GraphedRule:
    """One captured batched problem: static input ``[N, m, n]`` (the gradients' dtype), static FP32 bases, and the
    outputs of ``rule(x, u, v)`` (the projected uniques and commons) as static tensors."""

    def __init__(self, rule: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]],
                 shape: tuple[int, ...], dtype: torch.dtype, u: torch.Tensor, v: torch.Tensor) -> None:
        device = u.device
        self.x = torch.zeros(shape, dtype=dtype, device=device)
        self.u, self.v = u.clone(), v.clone()
        self.u_source: torch.Tensor | None = u
        self.v_source: torch.Tensor | None = v
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream (cuBLAS handles and workspaces), as torch does
            rule(self.x, self.u, self.v)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the rule may run in autograd's end-of-backward callback while other threads use the GPU
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = rule(self.x, self.u, self.v)

    def run(self, parts: list[torch.Tensor], u: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """Copy `parts` (views of the gradients, concatenated along dim 0) in, replay, return the static outputs
        (valid until the next `run`)."""
        if u is not self.u_source or v is not self.v_source:  # the bases were refreshed since the last run
            self.u.copy_(u)
            self.v.copy_(v)
            self.u_source, self.v_source = u, v
        torch.cat(parts, out=self.x)
        self.graph.replay()
        return self.out


def graphed_rule(cache: dict, signature: Signature,
                 rule: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]],
                 shape: tuple[int, ...], dtype: torch.dtype, u: torch.Tensor, v: torch.Tensor) -> GraphedRule:
    """The `GraphedRule` of `signature` in `cache`, captured on first use (keep `cache` on the owning module)."""
    hit = cache.get(signature)
    if hit is None:
        hit = cache[signature] = GraphedRule(rule, shape, dtype, u, v)
    return hit
