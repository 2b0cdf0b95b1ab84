"""FP4 routed experts (LowBitExperts) on the four MoE families."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_lowbit
from conftest import load_checked
from hf_lowbit import LowBitConfig, LowBitLinear
from hf_lowbit.averis import averis_linear
from hf_lowbit.model_patches import LowBitExperts

FAMILIES = ["qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


def _load(path, cfg=None, **kw):
    return load_checked(path, cfg, **kw).eval()


def _routing(t=40, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    idx[:5] = torch.tensor([0, 1])  # uneven loads: expert 0 and 1 get more tokens
    return torch.randn(t, 64, generator=g) + 1.5, idx, torch.rand(t, k, generator=g)


@pytest.mark.parametrize("kind", FAMILIES)
def test_swap_coverage_routers_and_shared_parts(kind, tiny_model_dir):
    model = _load(tiny_model_dir(kind), LowBitConfig())
    experts = [n for n, m in model.named_modules() if isinstance(m, LowBitExperts)]
    stock = [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")
             and not isinstance(m, LowBitExperts)]
    assert experts and not stock
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n]
    assert all(n.endswith("shared_expert_gate") for n in plain), plain
    moe_layer = model.model.layers[-1].mlp
    assert not isinstance(moe_layer.gate, (LowBitLinear, LowBitExperts))  # router stays high precision
    assert moe_layer.gate.weight.dtype == torch.float32
    if kind == "deepseek_v3":
        assert moe_layer.gate.e_score_correction_bias.dtype == torch.float32
    shared = getattr(moe_layer, "shared_experts", None) or getattr(moe_layer, "shared_expert", None)
    if shared is not None:
        assert isinstance(shared.up_proj, LowBitLinear)


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_high_precision_experts_equal_stock(kind, tiny_model_dir):
    stock = _load(tiny_model_dir(kind)).model.layers[-1].mlp.experts
    ours = LowBitExperts.from_experts(stock, recipe=None)
    ours.load_state_dict(stock.state_dict())
    h, idx, w = _routing()
    assert torch.allclose(ours(h, idx, w), stock(h, idx, w), atol=1e-6, rtol=1e-5)


def _padded_and_grouped(dtype, e=5, hidden=64, inter=32, seed=1):
    from hf_lowbit.model_patches.experts import grouped_expert_mlp

    torch.manual_seed(seed)
    experts = LowBitExperts(e, hidden, inter, nn.SiLU(), recipe=None, dtype=dtype)
    nn.init.normal_(experts.gate_up_proj, std=0.2)
    nn.init.normal_(experts.down_proj, std=0.2)
    return experts, grouped_expert_mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_experts_equal_padded_layout_with_gradients(dtype, monkeypatch):
    """The high-precision grouped_mm path: same outputs and gradients (hidden states, both weights, routing weights)
    as the padded expert-major layout, with an empty expert and assignments to experts on another rank (index ≥ E),
    whose rows grouped_mm leaves unwritten (here: NaN, as uninitialized memory may be; once a CI run saw it)."""
    real_grouped_mm = torch.nn.functional.grouped_mm

    def grouped_mm_leaving_garbage(a, b, offs):
        out = real_grouped_mm(a, b, offs=offs).clone()
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", grouped_mm_leaving_garbage)
    experts, grouped = _padded_and_grouped(dtype)
    h, idx, w = _routing(t=23, e=4)  # expert 4 of 5 gets nothing
    idx[3, 1] = 5  # on another rank
    h, w = h.to(dtype), w.to(dtype)
    assert experts.uses_grouped_mm(h)
    results = []
    for path in ("padded", "grouped"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        if path == "grouped":
            out = grouped(hh, idx, ww, experts.gate_up_proj, experts.down_proj, experts.act_fn)
        else:
            routing = hf_lowbit.model_patches.Routing.from_top_k(idx, experts.num_experts)
            x = routing.gather(hh)
            g, u = (x @ experts.gate_up_proj.transpose(-1, -2)).chunk(2, -1)
            y = (experts.act_fn(g) * u * routing.mask[..., None].to(dtype)) @ experts.down_proj.transpose(-1, -2)
            out = routing.combine(y, ww, hh)
        out.backward(torch.ones_like(out) + torch.arange(out.shape[-1], dtype=dtype) / 64)
        results.append([out, hh.grad, ww.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    for a, b in zip(*results):  # BF16: sums of BF16 products, compared at 2% of the largest magnitude
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02 * float(b.abs().max()), rtol=0)
        assert torch.isfinite(b).all() and torch.allclose(a.float(), b.float(), **tol)
    assert results[1][2][3, 1] == 0 and results[1][4][4].abs().max() == 0  # the other rank's slot; the idle expert


def test_grouped_mm_path_choice_and_module_forward():
    """`LowBitExperts(recipe=None)` takes grouped_mm when every row stride is a multiple of 16 bytes, else the
    padded layout; both give the same forward; under CPU autocast the grouped path computes in BF16."""
    experts, grouped = _padded_and_grouped(torch.float32)
    h, idx, w = _routing(t=17, e=5)
    out = experts(h, idx, w)
    assert torch.allclose(out, grouped(h, idx, w, experts.gate_up_proj, experts.down_proj, experts.act_fn))
    odd = LowBitExperts(5, 64, 30, nn.SiLU(), recipe=None)  # 30 FP32 = 120 bytes: padded layout
    assert not odd.uses_grouped_mm(h) and experts.uses_grouped_mm(h)
    with torch.no_grad():
        odd.gate_up_proj.copy_(torch.cat([experts.gate_up_proj[:, :30], experts.gate_up_proj[:, 32:62]], 1))
        odd.down_proj.copy_(experts.down_proj[..., :30])
    narrow = LowBitExperts(5, 64, 32, nn.SiLU(), recipe=None)
    with torch.no_grad():
        narrow.gate_up_proj.copy_(torch.cat([odd.gate_up_proj[:, :30], torch.zeros(5, 2, 64),
                                             odd.gate_up_proj[:, 30:], torch.zeros(5, 2, 64)], 1))
        narrow.down_proj.copy_(torch.cat([odd.down_proj, torch.zeros(5, 64, 2)], -1))
    assert torch.allclose(odd(h, idx, w), narrow(h, idx, w), atol=1e-5)  # padded (I=30) == grouped (I=32, zeros)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = experts(h, idx, w)
    assert auto.dtype == torch.float32 and not torch.equal(auto, out)
    assert torch.allclose(auto, out, atol=0.05 * out.abs().max().item())


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_experts_equal_per_expert_reference_math(fmt, tiny_model_dir):
    stock = _load(tiny_model_dir("qwen3_moe")).model.layers[0].mlp.experts
    recipe = LowBitConfig(format=fmt, stochastic_rounding="none").recipe()
    ours = LowBitExperts.from_experts(stock, recipe=recipe)
    ours.load_state_dict(stock.state_dict())
    h, idx, w = _routing()
    h1 = h.clone().requires_grad_(True)
    out = ours(h1, idx, w)
    dout = torch.randn_like(out)
    out.backward(dout)

    # reference: every expert on its own tokens through the dense Averis op (its own mean, its own scales)
    h2 = h.clone().requires_grad_(True)
    gu = ours.gate_up_proj.detach().clone().requires_grad_(True)
    dn = ours.down_proj.detach().clone().requires_grad_(True)
    ref = torch.zeros_like(h)
    for e in range(4):
        tok, slot = torch.where(idx == e)
        a = averis_linear(h2[tok], gu[e], None, recipe)
        g, u = a.chunk(2, dim=-1)
        y = averis_linear(ours.act_fn(g) * u, dn[e], None, recipe)
        ref = ref.index_add(0, tok, y * w[tok, slot, None])
    ref.backward(dout)
    scale = ref.abs().max().item()
    assert torch.allclose(out, ref, atol=1e-5 * scale, rtol=1e-4)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5 * h2.grad.abs().max().item(), rtol=1e-4)
    assert torch.allclose(ours.gate_up_proj.grad, gu.grad, atol=1e-5 * gu.grad.abs().max().item(), rtol=1e-4)
    assert torch.allclose(ours.down_proj.grad, dn.grad, atol=1e-5 * dn.grad.abs().max().item(), rtol=1e-4)
    # FP4 actually changed the math
    exact = LowBitExperts.from_experts(stock, recipe=None)
    exact.load_state_dict(stock.state_dict())
    assert not torch.allclose(out, exact(h, idx, w), atol=1e-3)


def test_dropped_assignments_and_empty_experts():
    experts = LowBitExperts(4, 64, 32, nn.SiLU(), LowBitConfig().recipe())
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    h, idx, w = _routing(t=6)
    idx[:, 1] = 4  # index == num_experts marks an expert on another rank: contributes nothing
    idx[:, 0] = 2  # experts 0, 1, 3 get no tokens at all
    out = experts(h, idx, w)
    only = experts(h, idx[:, :1], w[:, :1])
    assert torch.equal(out, only) and torch.isfinite(out).all()


def test_routing_layout_gather_and_combine_with_gradients():
    """Expert-major layout: rows per expert rounded up to 32, each (token, slot) at [expert, pos], zeros on padding;
    combine sums weight × row per token; gradients of both equal a per-assignment loop."""
    from hf_lowbit.model_patches import Routing

    gen = torch.Generator().manual_seed(3)
    t, k, e, hdim = 9, 2, 5, 6
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    idx[0, 1] = e  # another rank's expert: dropped
    hidden = torch.randn(t, hdim, generator=gen, requires_grad=True)
    weights = torch.rand(t, k, generator=gen)
    r = Routing.from_top_k(idx, e)
    assert r.capacity == 32 and r.mask.shape == (e, 32) and int(r.mask.sum()) == t * k - 1
    x = r.gather(hidden)
    y = torch.randn(e, 32, hdim, generator=gen, requires_grad=True)
    out = r.combine(y, weights, hidden)
    (x.square().sum() + out.square().sum()).backward()
    hidden_ref, y_ref = hidden.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    x_ref = torch.zeros(e, 32, hdim)
    out_ref = torch.zeros(t, hdim)
    fill = [0] * e  # the layout is stable: an expert's rows in token order
    for ex in range(e):
        for token in range(t):
            for slot in range(k):
                if idx[token, slot] == ex:
                    x_ref = x_ref.index_put((torch.tensor(ex), torch.tensor(fill[ex])), hidden_ref[token])
                    out_ref = out_ref.index_add(0, torch.tensor([token]),
                                                (y_ref[ex, fill[ex]] * weights[token, slot])[None])
                    fill[ex] += 1
    (x_ref.square().sum() + out_ref.square().sum()).backward()
    assert torch.equal(x, x_ref) and torch.allclose(out, out_ref, atol=1e-6)
    assert torch.allclose(hidden.grad, hidden_ref.grad) and torch.allclose(y.grad, y_ref.grad, atol=1e-6)


def test_combine_and_gather_backward_sum_each_token_in_fp32_with_one_rounding():
    """BF16 expert outputs, 8 slots per token: the combined output is the exact weighted sum rounded once to BF16
    (within half a BF16 ulp of an FP64 reference), and a dropped slot (another rank's expert) contributes nothing
    even when the row its index falls back to holds Inf; the same for the gather's input gradient."""
    from hf_lowbit.model_patches import Routing

    gen = torch.Generator().manual_seed(5)
    t, k, e, hdim = 16, 8, 9, 32
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    idx[3, 2] = e  # dropped
    weights = torch.rand(t, k, generator=gen)
    r = Routing.from_top_k(idx, e)
    y = (torch.randn(e, r.capacity, hdim, generator=gen) * 100).to(torch.bfloat16)
    y[0, 0] = float("inf")  # row 0: where a dropped slot's index points
    y_ref = y.double().clone()
    like = torch.zeros(t, hdim, dtype=torch.bfloat16)
    out = r.combine(y, weights, like)
    ref = torch.zeros(t, hdim, dtype=torch.float64)
    fill = [0] * e
    for ex in range(e):
        for token in range(t):
            for slot in range(k):
                if idx[token, slot] == ex:
                    ref[token] += y_ref[ex, fill[ex]] * weights[token, slot].double()
                    fill[ex] += 1
    finite = torch.isfinite(ref).all(1)
    assert finite[3] and torch.isfinite(out[finite]).all()
    assert out.dtype == torch.bfloat16
    err = (out[finite].double() - ref[finite]).abs()
    assert (err <= 2 ** -8 * ref[finite].abs() + 1e-30).all()
    # the gather's backward: each token's gradient sums its k slot rows' gradients the same way
    hidden = torch.zeros(t, hdim, dtype=torch.bfloat16, requires_grad=True)
    grad_rows = (torch.randn(e * r.capacity, hdim, generator=gen) * 100).to(torch.bfloat16)
    r.gather(hidden).backward(grad_rows.view(e, r.capacity, hdim))
    want = torch.zeros(t, hdim, dtype=torch.float64).index_add_(0, r.token, grad_rows[r.rows].double())
    assert hidden.grad.dtype == torch.bfloat16
    assert ((hidden.grad.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-30).all()


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe"])
def test_router_logits_and_aux_loss_still_present(kind, tiny_model_dir, input_ids):
    model = _load(tiny_model_dir(kind), LowBitConfig())
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape[-1] == 4
    out.loss.backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("layout", ["default", "original", "fused"])
def test_finalize_save_reload_both_layouts(kind, layout, tiny_model_dir, tmp_path, input_ids):
    from hf_lowbit.save_layout import reverse_conversion_grabs

    model = _load(tiny_model_dir(kind), LowBitConfig())
    with torch.no_grad():
        train_logits = model(input_ids).logits
    hf_lowbit.finalize(model)
    experts = model.model.layers[-1].mlp.experts
    assert experts.mode == "infer" and experts.gate_up_proj.dtype == torch.uint8
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, train_logits)
    # packed experts save fused unless asked; transformers versions whose reversed per-expert conversion would split
    # the packed scales (5.17) refuse the original layout before writing anything
    per_expert_possible = not reverse_conversion_grabs(model)
    kwargs = {} if layout == "default" else {"save_original_format": layout == "original"}
    if layout == "original" and not per_expert_possible:
        with pytest.raises(ValueError, match="save_original_format=True"):
            model.save_pretrained(tmp_path, **kwargs)
        assert not (tmp_path / "model.safetensors").exists()
        return
    model.save_pretrained(tmp_path, **kwargs)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    legacy = any(".experts.0.gate_proj.weight" in k for k in keys)
    assert legacy == (layout == "original")
    assert any(k.endswith("experts.gate_up_proj_scale") for k in keys)
    reloaded = _load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, train_logits)


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v2"])
def test_quantize_on_load_of_stock_checkpoint_equals_finalize(kind, tiny_model_dir, input_ids):
    on_load = _load(tiny_model_dir(kind), LowBitConfig(mode="infer"))
    finalized = hf_lowbit.finalize(_load(tiny_model_dir(kind), LowBitConfig()))
    a, b = on_load.state_dict(), finalized.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        assert torch.equal(on_load(input_ids).logits, finalized(input_ids).logits)


def test_weight_only_experts_and_dequantize(tiny_model_dir, input_ids):
    path = tiny_model_dir("qwen3_moe")
    w4a16 = _load(path, LowBitConfig(mode="infer", activations="none"))
    experts = w4a16.model.layers[0].mlp.experts
    gate_up, down = experts.dequantized_weights()
    ref = _load(path)
    ref.model.layers[0].mlp.experts.gate_up_proj.data = gate_up
    ref.model.layers[0].mlp.experts.down_proj.data = down
    h, idx, w = _routing()
    with torch.no_grad():
        assert torch.allclose(experts(h, idx, w), ref.model.layers[0].mlp.experts(h, idx, w), atol=1e-5)
    plain = w4a16.dequantize()
    assert not any(isinstance(m, (LowBitExperts, LowBitLinear)) and m.recipe is not None for m in plain.modules())
    with torch.no_grad():
        assert torch.isfinite(plain(input_ids).logits).all()
