"""SD-MoE under FSDP2 (`fully_shard`, DTensors sharded along dim 0): two processes against one unsharded copy of the
same model on the same batch. By default two CPU processes (gloo); with ``HF_LOWBIT_TEST_DIST_BACKEND=nccl`` and at
least two CUDA GPUs, one GPU per process (NCCL), the reference copy on the same GPU:

    HF_LOWBIT_TEST_DIST_BACKEND=nccl python3 -m pytest -q tests/test_sd_moe_fsdp.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
BACKENDS = ("gloo", "nccl")
#: set (unless already set) in every process of an NCCL run: no NVLink multicast (NVLS, symmetric memory)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: FP32 on both backends (on CUDA TF32 stays off, PyTorch's default), so one tolerance for both
TOL = 1e-5


def _backend() -> str:
    backend = os.environ.get("HF_LOWBIT_TEST_DIST_BACKEND") or "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"HF_LOWBIT_TEST_DIST_BACKEND={backend!r} is not supported; allowed: {list(BACKENDS)}")
    return backend


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _worker(rank: int, out_dir: str, backend: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from hf_lowbit.model_patches.sd_moe import (SD_MATRICES, apply_sd_moe, install_gradient_hooks,
                                                project_gradients, refresh_bases, sd_modules)
    from hf_lowbit.model_patches.sd_sharded import write_local_rows

    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    # a file store in the test's own directory: no TCP port to race other processes for
    dist.init_process_group(backend, init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
        apply_sd_moe(model, rank=4, init="project")
        ref = copy.deepcopy(model.to(device))
        # the mesh on the backend's device type (FSDP2's default picks CUDA whenever there is a GPU, also for gloo)
        mesh = init_device_mesh(device.type, (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # the same on both ranks
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
        with install_gradient_hooks(model):  # the Trainer route: hooks + one projection at the end of backward
            model(ids, labels=ids).loss.backward()
        ref(ids, labels=ids).loss.backward()
        project_gradients(ref)
        result: dict[str, float] = {}
        sharded = dict(sd_modules(model))
        for name, mod in sd_modules(ref):
            other = sharded[name]
            assert other.is_sharded() and not mod.is_sharded()
            for pname, p in mod.named_parameters():
                q = other.get_parameter(pname)
                result[f"grad {name}.{pname}"] = _max_diff(q.grad.full_tensor(), p.grad) / float(p.grad.abs().max())
        # move W_c identically, then refresh with the residual fold: same bases, same W_c and W_u
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, mod in sd_modules(ref):
                for m in SD_MATRICES:
                    delta = 0.2 * torch.randn(mod.common(m).shape, generator=gen).to(device)
                    mod.common(m).add_(delta)
                    wc = sharded[name].common(m)
                    write_local_rows(wc.detach(), wc.full_tensor() + delta)
        refresh_bases(ref, fold_residual=True)
        refresh_bases(model, fold_residual=True)
        for name, mod in sd_modules(ref):
            other = sharded[name]
            for m in SD_MATRICES:
                pu, pv = (b @ b.mT for b in mod.bases(m))
                qu, qv = (b @ b.mT for b in other.bases(m))
                result[f"basis {name}.{m}"] = max(_max_diff(pu, qu), _max_diff(pv, qv))
            for pname, p in mod.named_parameters():
                result[f"weight {name}.{pname}"] = _max_diff(other.get_parameter(pname).full_tensor(), p)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
        # both ranks done before either tears gloo down: a rank leaving first once aborted the other's exit ("terminate
        # called without an active exception", one run in a loaded full suite)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sd_moe_rule_and_refresh_under_fsdp2_equal_the_unsharded_model(tmp_path):
    """Gradients through the hook route (each rank projects its own experts' W_u, W_c gathered), then a refresh with
    the residual fold (W_c gathered for the SVD, bases broadcast, rows written back): equal to the unsharded model."""
    backend = _backend()
    if backend == "nccl":
        if torch.cuda.device_count() < WORLD:
            pytest.skip(f"HF_LOWBIT_TEST_DIST_BACKEND=nccl needs {WORLD} CUDA GPUs (one per process); "
                        f"this machine has {torch.cuda.device_count()}")
        for key, value in NCCL_ENV.items():  # inherited by the spawned processes
            os.environ.setdefault(key, value)
    mp.spawn(_worker, args=(str(tmp_path), backend), nprocs=WORLD)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        grads = {k: v for k, v in result.items() if k.startswith("grad")}
        assert len(grads) == 2 * 5 and all(v < TOL for v in grads.values()), grads  # 2 MoE layers × 5 parameters
        bases = {k: v for k, v in result.items() if k.startswith("basis")}
        assert len(bases) == 2 * 3 and all(v < TOL for v in bases.values()), bases
        weights = {k: v for k, v in result.items() if k.startswith("weight")}
        assert all(v < TOL for v in weights.values()), weights
