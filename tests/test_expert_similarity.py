"""Expert diagnostics: subspace similarity on hand-built experts with known overlap, SD-MoE vs raw, router
alignment, gradients, heatmap PNG."""

from __future__ import annotations

import copy

import torch
from torch import nn

from conftest import tiny_config
from hf_lowbit.diagnostics.experts import (expert_similarity, plot_similarity, router_alignment,
                                           subspace_similarity)
from hf_lowbit.model_patches.sd_moe import apply_sd_moe


def _orth(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).Q


def _stack_known(d=32, k=4):
    """Experts 0,1: same top-k subspaces; 2: orthogonal; 3: shares half of expert 0's directions."""
    q_left, q_right = _orth(d, d, 0), _orth(d, d, 1)
    s = torch.tensor([10.0, 9.0, 8.0, 7.0])

    def mat(cols_l, cols_r, scale=1.0):
        return (q_left[:, cols_l] * s * scale) @ q_right[:, cols_r].T

    a = list(range(0, 4))
    b = list(range(4, 8))
    half = [0, 1, 8, 9]
    return torch.stack([mat(a, a), mat(a, a, 0.5), mat(b, b), mat(half, half)])


def test_known_overlap():
    res = subspace_similarity(_stack_known(), k=4)
    for side in ("left", "right"):
        sim = res[side]["map"]
        assert torch.allclose(sim.diagonal(), torch.ones(4), atol=1e-5)
        assert abs(sim[0, 1] - 1) < 1e-5 and abs(sim[0, 2]) < 1e-5 and abs(sim[0, 3] - 0.5) < 1e-5
        assert abs(sim[2, 3]) < 1e-5 and torch.allclose(sim, sim.T, atol=1e-6)
        assert abs(res[side]["mean"] - (1 + 0 + 0.5 + 0 + 0.5 + 0) / 6) < 1e-5


class _Experts(nn.Module):  # hand-built fused experts module (any module with gate_up_proj/down_proj works)
    def __init__(self, w):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.cat([w, w], 1))   # [E, 2·32, 32]
        self.down_proj = nn.Parameter(w.transpose(-1, -2).contiguous())


def test_module_level_similarity_and_plot(tmp_path):
    holder = nn.Module()
    holder.experts = _Experts(_stack_known())
    res = expert_similarity(holder, k=4)
    layer = res["weights"]["layers"]["experts"]
    assert set(layer) == {"gate", "up", "down"} and res["sd_moe"] is False
    assert abs(layer["gate"]["left"]["map"][0, 3] - 0.5) < 1e-5
    assert abs(layer["down"]["right"]["map"][0, 1] - 1) < 1e-5   # down = Wᵀ: right vectors of down = left of W
    path = plot_similarity(res, str(tmp_path / "sim.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_similarity_sd_vs_raw_gradients_and_router():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen2_moe"))
    with torch.no_grad():  # dense upcycling: identical experts → similarity 1 on the raw experts
        for layer in base.model.layers:
            ex = layer.mlp.experts
            ex.gate_up_proj.copy_(ex.gate_up_proj[:1].expand_as(ex.gate_up_proj))
            ex.down_proj.copy_(ex.down_proj[:1].expand_as(ex.down_proj))
    raw = expert_similarity(base, k=4)
    assert raw["weights"]["mean"] > 0.999
    sd = copy.deepcopy(base)
    apply_sd_moe(sd, rank=4, init="scratch", seed=1)   # independent random W_u bases: low similarity
    res = expert_similarity(sd, k=4, batch={"input_ids": torch.randint(0, 128, (2, 16))})
    assert res["sd_moe"] and res["weights"]["mean"] < 0.5
    grads = res["gradients"]
    assert set(grads["layers"]) == set(res["weights"]["layers"]) and 0 <= grads["mean"] <= 1
    assert all(p.grad is None for p in sd.parameters())   # diagnostics leave .grad alone
    align = router_alignment(base, k=4)
    lay = next(iter(align["layers"].values()))
    assert lay["map"].shape == (4, 4) and 0 <= align["mean"] <= 1 and abs(align["random"] - 4 / 64) < 1e-9
