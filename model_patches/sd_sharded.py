"""SD-MoE parameters and gradients sharded by FSDP2 (`fully_shard`): DTensors sharded along dim 0.

FSDP2 shards every parameter along its first dimension. For the per-expert ``W_u`` (``[E, out, in]``) that is the
expert axis, so each rank holds whole experts and the gradient rule runs on its local shard unchanged. The shared
``W_c`` (``[out, in]``) is split by rows; its rule and the refresh's SVD need the whole matrix, so it is gathered
(small: one matrix per layer and type) and the rank's rows are written back. The refreshed bases are broadcast from
rank 0, so every rank projects with bit-identical bases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor = None


def is_sharded(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _check_placements(t: torch.Tensor, what: str) -> None:
    bad = [p for p in t.placements if not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0))]
    if bad:
        raise ValueError(f"SD-MoE: {what} has placements {t.placements}; supported: Shard(0) (FSDP2's fully_shard) "
                         "and Replicate")


def local_experts(t: torch.Tensor, what: str = "W_u") -> torch.Tensor:
    """The rank's whole experts of a per-expert tensor (a view: in-place changes reach the DTensor), or `t`."""
    if not is_sharded(t):
        return t
    _check_placements(t, what)
    return t.to_local()


def gathered(t: torch.Tensor, what: str = "W_c") -> torch.Tensor:
    """The whole tensor (all-gathered; a new tensor) of a sharded `t`, else `t` itself."""
    if not is_sharded(t):
        return t
    _check_placements(t, what)
    return t.full_tensor()


def write_local_rows(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of the whole tensor `full` into the sharded `dst` (no communication)."""
    mine = DTensor.from_local(full.to(dst.dtype), dst.device_mesh, [Replicate()] * dst.device_mesh.ndim,
                              run_check=False).redistribute(dst.device_mesh, dst.placements)
    dst.to_local().copy_(mine.to_local())


def broadcast_from_first_rank(tensors: list[torch.Tensor]) -> None:
    """Make `tensors` (computed on every rank) identical everywhere: rank 0's values (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)
