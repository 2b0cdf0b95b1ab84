"""MH-MoE / LoRAMoE adapters as a PEFT method: exactness at init, gradients, vectorized = naive, save/load, FP4 base."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_lowbit.model_patches import mhmoe
from hf_lowbit.model_patches.mhmoe import MHMoEBank, MHMoEConfig, MHMoELayer, mhmoe_aux_loss, mhmoe_banks
from peft import PeftModel, get_peft_model

from conftest import COMMON, tiny_config


def deepseek_config(version: int):
    """Tiny DeepSeek-V2/V3 configs from HF_INTEGRATION.md (layer 0 dense, layer 1 MoE)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict({**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)
    if version == 2:
        return DeepseekV2Config(**common, topk_method="group_limited_greedy")
    return DeepseekV3Config(**common)


def _model(kind: str):
    torch.manual_seed(0)
    config = deepseek_config(int(kind[-1])) if kind.startswith("deepseek") else tiny_config(kind)
    return AutoModelForCausalLM.from_config(config).eval()


def naive_bank(bank: MHMoEBank, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-slice, per-expert loop: the definition of the MH-MoE output."""
    h, d_s = bank.num_heads, bank.d_in // bank.num_heads
    out = torch.zeros(x.shape[0], bank.d_out, dtype=x.dtype)
    for n in range(x.shape[0]):
        for m in range(h):
            xm = x[n, m * d_s:(m + 1) * d_s]
            logits = bank.router[m].float() @ xm.float()
            if bank.gate_mode == "topk_softmax":
                top, idx = logits.topk(bank.top_k)
                weights = top.softmax(-1)
            else:
                weights, idx = logits.softmax(-1).topk(bank.top_k)
            for w, j in zip(weights, idx):
                out[n] += w.to(x.dtype) * bank.scaling * (bank.lora_B[m, j].T @ (bank.lora_A[m, j] @ xm))
    return out


def separated(bank: MHMoEBank, x: torch.Tensor, margin: float = 1e-4) -> torch.Tensor:
    """Tokens whose top-k choice is clear in every slice (the k-th and (k+1)-th logits differ by > margin).

    Near-ties may be broken differently by two fp32 summation orders; the comparisons below skip those tokens.
    """
    logits = torch.einsum("nhd,hkd->nhk", x.reshape(x.shape[0], bank.num_heads, -1).double(), bank.router.double())
    top = logits.topk(bank.top_k + 1, dim=-1).values
    ok = (top[..., -2] - top[..., -1] > margin).all(dim=1)
    assert ok.float().mean() > 0.7
    return ok


@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_zero_init_reproduces_base_logits_and_only_adapters_train(kind, input_ids):
    model = _model(kind)
    with torch.no_grad():
        ref = model(input_ids).logits
    peft_model = get_peft_model(model, MHMoEConfig(num_heads=4, num_experts=4, top_k=2, r=4))
    layers = [peft_model.base_model.model.model.layers[i].mlp for i in range(2)]
    assert all(isinstance(m, MHMoELayer) for m in layers)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids).logits, ref)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".mhmoe_banks.default." in n for n in trainable)
    assert len(trainable) == 3 * 2  # router, lora_A, lora_B per layer


def test_projection_placement_wraps_gate_up_down():
    model = _model("qwen3")
    peft_model = get_peft_model(model, MHMoEConfig(num_heads=2, num_experts=3, r=2, placement="projections"))
    mlp = peft_model.base_model.model.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, p), MHMoELayer) for p in ("gate_proj", "up_proj", "down_proj"))
    assert mlp.down_proj.mhmoe_banks["default"].d_in == 128 and mlp.down_proj.mhmoe_banks["default"].d_out == 64
    assert len(mhmoe_banks(peft_model)) == 6


@pytest.mark.parametrize("gate_mode", ["topk_softmax", "full_softmax"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("heads", [1, 4])
def test_vectorized_forward_equals_naive_loop(gate_mode, top_k, heads):
    torch.manual_seed(0)
    cfg = MHMoEConfig(num_heads=heads, num_experts=4, top_k=top_k, r=3, lora_alpha=6, gate_mode=gate_mode,
                      init_weights=False)
    bank = MHMoEBank(16, 24, cfg, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        fast = bank(x).reshape(-1, 24)
        slow = naive_bank(bank, x.reshape(-1, 16))
    ok = separated(bank, x.reshape(-1, 16))
    # experts run in float64; the router (and so the gate weights) is fp32 by design: tolerance at fp32 level
    torch.testing.assert_close(fast[ok], slow[ok], rtol=1e-5, atol=1e-5)


def _router_grads(gate_mode: str) -> list[torch.Tensor]:
    model = _model("qwen3")
    cfg = MHMoEConfig(num_heads=4, num_experts=4, top_k=1, r=2, gate_mode=gate_mode, init_weights=False)
    peft_model = get_peft_model(model, cfg)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    peft_model(ids, labels=ids).loss.backward()
    banks = mhmoe_banks(peft_model).values()
    assert all(b.lora_A.grad.abs().sum() > 0 and b.lora_B.grad.abs().sum() > 0 for b in banks)
    return [torch.zeros(()) if b.router.grad is None else b.router.grad for b in banks]


def test_top1_router_gradient_zero_for_topk_softmax_nonzero_for_full_softmax():
    assert all(torch.count_nonzero(g) == 0 for g in _router_grads("topk_softmax"))
    assert all(g.abs().sum() > 0 for g in _router_grads("full_softmax"))


def test_loramoe_is_num_heads_one():
    """H=1 is LoRAMoE: one router over the full input, top-k of K LoRA experts, probability-weighted."""
    torch.manual_seed(0)
    cfg = MHMoEConfig(num_heads=1, num_experts=4, top_k=2, r=4, lora_alpha=8, init_weights=False)
    bank = MHMoEBank(32, 32, cfg, dtype=torch.float64)
    x = torch.randn(7, 32, dtype=torch.float64)
    router = torch.nn.Linear(32, 4, bias=False)  # fp32 router logits, as the bank computes them
    router.weight.data = bank.router[0].float()
    probs = torch.softmax(router(x.float()), dim=-1)
    weights, idx = probs.double().topk(2, dim=-1)
    expected = torch.zeros(7, 32, dtype=torch.float64)
    for n in range(7):
        for w, j in zip(weights[n], idx[n]):
            lora = torch.nn.Linear(32, 4, bias=False, dtype=torch.float64)
            lora.weight.data = bank.lora_A[0, j]
            expected[n] += w * 2.0 * (lora(x[n]) @ bank.lora_B[0, j])
    ok = separated(bank, x)
    with torch.no_grad():
        torch.testing.assert_close(bank(x)[ok], expected[ok], rtol=1e-5, atol=1e-5)


def _train_steps(model, ids, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        out = model(ids, labels=ids)
        loss = out.loss + (mhmoe_aux_loss(model) or 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return out.loss.item()


def test_save_load_round_trip_bit_identical(tiny_model_dir, tmp_path, input_ids):
    path = tiny_model_dir("qwen3_moe")
    cfg = MHMoEConfig(num_heads=4, num_experts=4, top_k=1, r=4, load_balancing_coef=0.01, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), cfg)
    _train_steps(model, input_ids)
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    assert isinstance(reloaded.peft_config["default"], MHMoEConfig)
    assert reloaded.peft_config["default"].load_balancing_coef == 0.01
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)
        with reloaded.disable_adapter():
            base = reloaded(input_ids).logits
    assert not torch.equal(base, logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        reloaded.merge_and_unload()
    plain = reloaded.unload()
    assert not any(isinstance(m, MHMoELayer) for m in plain.modules())


def test_load_balancing_loss_is_exposed_and_trains_the_router():
    torch.manual_seed(0)
    cfg = MHMoEConfig(num_heads=2, num_experts=4, top_k=1, r=2, load_balancing_coef=0.5)
    bank = MHMoEBank(8, 8, cfg).train()
    bank(torch.randn(64, 8))
    assert bank.aux_loss is not None and bank.aux_loss.item() >= 0.5 * 0.99  # K·Σ f·P >= 1 up to sampling
    bank.aux_loss.backward()
    assert bank.router.grad.abs().sum() > 0
    logits = torch.zeros(8, 1, 4)  # uniform router, perfectly balanced assignment → exactly 1
    idx = torch.arange(8).remainder(4).reshape(8, 1, 1)
    assert mhmoe.load_balancing_loss(logits, idx).item() == pytest.approx(1.0)
    bank.eval()
    bank(torch.randn(4, 8))
    assert bank.aux_loss is None


def test_packed_fp4_base_trains_saves_and_reloads(tiny_model_dir, tmp_path, input_ids):
    from hf_lowbit import LowBitConfig, LowBitLinear

    path = tiny_model_dir("qwen3")
    qcfg = LowBitConfig(mode="infer")
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg)
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    with torch.no_grad():
        ref = base(input_ids).logits
    packed = {n: p.detach().clone() for n, p in base.named_parameters()}
    for placement in ("mlp", "projections"):
        cfg = MHMoEConfig(num_heads=4, num_experts=4, top_k=1, r=4, placement=placement)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg), cfg)
        with torch.no_grad():
            assert torch.equal(model(input_ids).logits, ref)
        assert all(b.lora_A.dtype == torch.float32 for b in mhmoe_banks(model).values())
        first = model(input_ids, labels=input_ids).loss.item()
        last = _train_steps(model, input_ids, steps=8, lr=3e-2)
        assert last < first
    for n, p in model.named_parameters():
        if "mhmoe_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, packed[key]), n
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg),
                                         tmp_path / "adapter")
    assert isinstance(reloaded.base_model.model.model.layers[0].mlp.up_proj.base_layer, LowBitLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, logits)


def test_second_adapter_and_reimport_are_safe(input_ids):
    importlib.reload(mhmoe)  # re-registration refreshes the classes instead of raising
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["MHMOE"] is mhmoe.MHMoEConfig
    model = get_peft_model(_model("llama"), mhmoe.MHMoEConfig(num_heads=2, r=2, init_weights=False))
    model.add_adapter("other", mhmoe.MHMoEConfig(num_heads=1, r=2, init_weights=False))
    with torch.no_grad():
        one = model(input_ids).logits
        model.base_model.set_adapter(["default", "other"])
        both = model(input_ids).logits
    assert not torch.equal(one, both)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".other." in n for n in trainable) and any(".default." in n for n in trainable)


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(top_k=5), dict(gate_mode="softmax"),
                                 dict(placement="attn"), dict(lora_dropout=1.0), dict(load_balancing_coef=-1)])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="MHMoEConfig"):
        MHMoEConfig(**bad)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="does not divide"):
        get_peft_model(_model("qwen3"), MHMoEConfig(num_heads=3))
