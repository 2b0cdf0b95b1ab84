"""Mean-bias diagnostics: closed-form checks on planted tensors, hook hygiene on a tiny Llama, Trainer callback."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_lowbit.diagnostics.mean_bias import (GEMM_KEYS, GRAD_SUFFIX, STAT_KEYS, MeanBiasCallback, mean_bias,
                                             summarize, tensor_mean_bias_stats)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors only: one intra-op thread avoids OpenMP spin-waiting when the CPU is shared (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


L, M = 256, 64  # tokens × channels of the synthetic tensors (spike rank max(1, ⌊0.01·64⌋) = 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _centred(g: torch.Tensor) -> torch.Tensor:
    return g - g.mean(dim=0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v)


def _planted(seed: int = 0, mu_scale: float = 1.0, spike: float = 3.0):
    """X = 1μᵀ + s·a·bᵀ + T with a ⟂ 1, T centred, aᵀT = 0 and T·b = 0, s = spike·σ_max(T).

    Then R = X − 1μᵀ = s·a·bᵀ + T has the SVD-split rank-1 spike s·a·bᵀ and tail T exactly.
    """
    g = _gen(seed)
    mu = mu_scale * torch.randn(M, generator=g, dtype=torch.float64)
    a = _unit(_centred(torch.randn(L, 1, generator=g, dtype=torch.float64)))
    b = _unit(torch.randn(M, 1, generator=g, dtype=torch.float64))
    p_l = torch.eye(L, dtype=torch.float64) - 1.0 / L - a @ a.T  # projector onto {1, a}⊥ (a ⟂ 1)
    p_m = torch.eye(M, dtype=torch.float64) - b @ b.T
    t = p_l @ torch.randn(L, M, generator=g, dtype=torch.float64) @ p_m
    s = spike * float(torch.linalg.matrix_norm(t, ord=2))
    spike_part = s * a @ b.T
    mean_part = mu.expand(L, M)
    return mean_part + spike_part + t, mean_part, spike_part, t


# ----------------------------------------------------------------------------------------------------------------
# One tensor, closed forms
# ----------------------------------------------------------------------------------------------------------------

def test_r2_alignment_and_coherence_with_a_dominant_planted_mean():
    g = _gen(1)
    mu = 5.0 * torch.randn(M, generator=g, dtype=torch.float64)
    n = _centred(torch.randn(L, M, generator=g, dtype=torch.float64))
    s = tensor_mean_bias_stats(mu + n)
    expected = L * float(mu @ mu) / (L * float(mu @ mu) + float((n * n).sum()))
    assert s["r2"] == pytest.approx(expected, rel=1e-12)
    assert s["energy_mean"] == pytest.approx(expected, rel=1e-12)
    assert s["cos_mu_v1"] > 0.999
    assert s["cos_mu_v2"] < 0.05
    assert s["sign_coherence"] == 1.0
    assert set(s) == set(STAT_KEYS)


def test_sign_coherence_equals_share_of_the_majority_sign():
    g = _gen(2)
    u = _unit(torch.randn(M, generator=g, dtype=torch.float64))
    c = torch.tensor([3.0] * (3 * L // 4) + [-1.0] * (L // 4), dtype=torch.float64)  # p_i = c_i, 75% positive
    p_u = torch.eye(M, dtype=torch.float64) - torch.outer(u, u)
    noise = _centred(torch.randn(L, M, generator=g, dtype=torch.float64)) @ p_u
    s = tensor_mean_bias_stats(torch.outer(c, u) + noise)
    assert s["sign_coherence"] == 0.75
    s_neg = tensor_mean_bias_stats(-(torch.outer(c, u) + noise))  # μ flips with the data: same coherence
    assert s_neg["sign_coherence"] == 0.75


def test_energy_split_matches_closed_form_for_rank_one_spike_plus_tail():
    x, mean_part, spike_part, tail = _planted(3)
    s = tensor_mean_bias_stats(x)
    total = float((x * x).sum())
    assert s["energy_mean"] == pytest.approx(float((mean_part ** 2).sum()) / total, rel=1e-10)
    assert s["energy_spike"] == pytest.approx(float((spike_part ** 2).sum()) / total, rel=1e-10)
    assert s["energy_tail"] == pytest.approx(float((tail ** 2).sum()) / total, rel=1e-10)
    assert s["energy_mean"] + s["energy_spike"] + s["energy_tail"] == pytest.approx(1.0, abs=1e-12)
    # Spike rank 2 takes the largest tail direction into the spike: the tail shrinks by exactly σ_max(T)².
    s2 = tensor_mean_bias_stats(x, spike_rank_frac=2 / M)
    sigma_t = float(torch.linalg.matrix_norm(tail, ord=2))
    assert s2["energy_tail"] == pytest.approx((float((tail ** 2).sum()) - sigma_t ** 2) / total, rel=1e-9)


def test_outlier_attribution_matches_the_planted_components():
    x, mean_part, spike_part, tail = _planted(4, mu_scale=0.5)
    frac = 0.01
    s = tensor_mean_bias_stats(x, outlier_frac=frac)
    idx = x.abs().flatten().topk(int(frac * L * M)).indices
    x_sq = x.flatten()[idx] ** 2
    for key, part in (("outlier_mean_share", mean_part), ("outlier_spike_share", spike_part),
                      ("outlier_tail_share", tail)):
        assert s[key] == pytest.approx(float((part.flatten()[idx] ** 2 / x_sq).mean()), rel=1e-8), key


def test_outlier_attribution_of_pure_mean_and_pure_spike():
    mu = torch.randint(-8, 9, (M,), generator=_gen(5)).double() / 4  # dyadic: the mean over 64 rows is exact
    mu[0] = 10.0
    s = tensor_mean_bias_stats(mu.expand(64, M).clone())
    assert (s["outlier_mean_share"], s["outlier_spike_share"], s["outlier_tail_share"]) == (1.0, 0.0, 0.0)
    assert s["energy_mean"] == 1.0 and s["r2"] == 1.0
    assert math.isnan(s["amax_inflation"])  # every centred block is 0: no block to compare

    _, _, spike_part, _ = _planted(6)
    s = tensor_mean_bias_stats(spike_part)
    assert s["outlier_spike_share"] == pytest.approx(1.0, abs=1e-9)
    assert s["outlier_mean_share"] == pytest.approx(0.0, abs=1e-9)
    assert s["outlier_tail_share"] == pytest.approx(0.0, abs=1e-9)
    assert s["energy_spike"] == pytest.approx(1.0, abs=1e-9)


def test_averis_beats_plain_fp4_when_a_large_mean_is_planted():
    # The planted mean is exactly representable in both formats (E2M1 grid values × 2, a 12 = 2·6 in every
    # block sets the scale), and the noise is exactly centred: Q(μ) = μ, so Q_A's error is the residual's alone,
    # while plain FP4 quantizes the small noise on the coarse grid around the large mean.
    g = _gen(7)
    grid = torch.tensor([1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    signs = torch.randint(0, 2, (M,), generator=g).double() * 2 - 1
    mu = 2 * grid[torch.randint(0, 5, (M,), generator=g)] * signs
    mu[::16] = 12.0
    x = mu + _centred(torch.randn(L, M, generator=g, dtype=torch.float64))
    w = torch.randn(32, M, generator=g, dtype=torch.float64) / math.sqrt(M)
    for fmt in ("nvfp4", "mxfp4"):
        s = tensor_mean_bias_stats(x, format=fmt, weight=w)
        assert set(s) == set(STAT_KEYS + GEMM_KEYS)
        assert s["r2"] > 0.95, fmt
        assert s["qerr_averis"] < 0.3 * s["qerr_plain"], fmt
        assert s["gemm_err_averis"] < s["gemm_err_plain"], fmt  # Q(W)'s own error bounds the gain here
        assert s["amax_inflation"] > 3.0, fmt


def test_an_extreme_mean_channel_crushes_its_block_to_zero_codes():
    g = _gen(8)
    mu = torch.zeros(M, dtype=torch.float64)
    mu[::16] = 100.0  # one extreme channel per NVFP4 block
    x = mu + torch.randn(L, M, generator=g, dtype=torch.float64)
    s = tensor_mean_bias_stats(x)
    assert s["zero_code_share"] > 0.5 > 0.1 > s["zero_code_share_centered"]
    assert s["amax_inflation"] > 20.0
    assert s["outlier_mean_share"] > 0.9 and s["outlier_tail_share"] < 0.01


def test_amax_inflation_is_one_without_a_mean():
    a = torch.randint(-20, 21, (L // 2, M), generator=_gen(8)).double()
    x = torch.cat([a, -a])  # every channel symmetric: the mean is exactly 0, so X − 1μᵀ = X
    s = tensor_mean_bias_stats(x)
    assert s["amax_inflation"] == 1.0
    assert s["r2"] == 0.0 and s["energy_mean"] == 0.0
    assert s["qerr_averis"] == s["qerr_plain"]
    assert s["zero_code_share"] == s["zero_code_share_centered"]
    assert math.isnan(s["cos_mu_v1"]) and math.isnan(s["sign_coherence"])  # μ = 0: undefined


def test_planted_mean_inflates_block_amax():
    g = _gen(9)
    x = 3.0 + torch.randn(L, M, generator=g, dtype=torch.float64)
    assert tensor_mean_bias_stats(x)["amax_inflation"] > 1.0


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_token_subsampling_is_deterministic_and_evenly_spaced():
    x = torch.randn(4, 250, M, generator=_gen(10))
    s = tensor_mean_bias_stats(x, max_tokens=100)
    assert _same(s, tensor_mean_bias_stats(x, max_tokens=100))
    assert _same(s, tensor_mean_bias_stats(x.reshape(1000, M)[::10], max_tokens=None))
    assert not _same(s, tensor_mean_bias_stats(x, max_tokens=None))


def test_bad_inputs():
    x = torch.randn(32, M, generator=_gen(11))
    with pytest.raises(ValueError, match="format"):
        tensor_mean_bias_stats(x, format="fp3")
    with pytest.raises(ValueError, match="does not fit"):
        tensor_mean_bias_stats(x, weight=torch.randn(8, M + 1))
    x[3, 5] = float("nan")
    assert all(math.isnan(v) for v in tensor_mean_bias_stats(x).values())


def test_summarize_mean_and_argmax_per_statistic():
    results = {"a": {"r2": 0.1, "qerr_plain": 0.2, "projections": [0.5, 1.0]},
               "b": {"r2": 0.3, "qerr_plain": float("nan")},
               "a" + GRAD_SUFFIX: {"r2": float("nan")}}
    s = summarize(results)
    assert s["r2"]["mean"] == pytest.approx(0.2) and s["r2"]["argmax"] == "b" and s["r2"]["n"] == 2
    assert s["qerr_plain"] == {"mean": 0.2, "max": 0.2, "argmax": "a", "n": 1}
    assert s["grad_output/r2"]["argmax"] is None and math.isnan(s["grad_output/r2"]["mean"])
    assert "projections" not in s


# ----------------------------------------------------------------------------------------------------------------
# A tiny Llama
# ----------------------------------------------------------------------------------------------------------------

LINEARS = [f"model.layers.{i}.{n}" for i in range(2) for n in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")]


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batch(seed: int = 0, n: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (n, seq), generator=_gen(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _in_decoder_layers(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("model.layers.")


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return _tiny_llama()


def _assert_clean(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, name
        assert not m._backward_hooks and not m._backward_pre_hooks, name
    assert model.training and all(m.training for m in model.modules())


def test_hooks_cover_every_decoder_linear_and_leave_the_model_untouched(llama):
    llama.train()
    marker = torch.full_like(llama.lm_head.weight, 7.0)
    llama.lm_head.weight.grad = marker  # an accumulated gradient the diagnostic must not touch
    res = mean_bias(llama, _batch(), gradients=True, modules=_in_decoder_layers)
    assert set(res) == set(LINEARS) | {n + GRAD_SUFFIX for n in LINEARS}
    for name, stats in res.items():
        assert set(stats) == set(STAT_KEYS + GEMM_KEYS), name
        assert all(math.isfinite(v) for v in stats.values()), name
    _assert_clean(llama)
    assert llama.lm_head.weight.grad is marker and bool((marker == 7.0).all())
    llama.lm_head.weight.grad = None
    assert all(p.grad is None for p in llama.parameters())


def test_default_targets_and_input_only_mode(llama):
    llama.train()
    res = mean_bias(llama, _batch(1))
    assert sorted(res) == sorted(LINEARS)  # a plain model: every nn.Linear but lm_head
    _assert_clean(llama)
    assert all(p.grad is None for p in llama.parameters())


def test_layer_stats_equal_the_tensor_function_on_captured_tensors(llama):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    mods = [llama.get_submodule(n) for n in names]
    inputs, grads = {}, {}

    def keep(store: dict, name: str, t: torch.Tensor) -> None:
        store.setdefault(name, t.detach().clone())

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(inputs, n, args[0]))
               for n, m in zip(names, mods)]
    handles += [m.register_full_backward_hook(lambda mod, gi, go, n=n: keep(grads, n, go[0]))
                for n, m in zip(names, mods)]
    try:
        llama.eval()
        llama(**_batch(2)).loss.backward()
        llama.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    llama.train()
    res = mean_bias(llama, _batch(2), gradients=True, modules=names, format="mxfp4", keep_projections=True)
    for n, m in zip(names, mods):  # k_proj reuses q_proj's input analysis: only its GEMM errors are recomputed
        proj = res[n].pop("projections")
        assert len(proj) == 32 and proj == sorted(proj)
        assert _same(res[n], tensor_mean_bias_stats(inputs[n], format="mxfp4", weight=m.weight)), n
        res[n + GRAD_SUFFIX].pop("projections")
        expected = tensor_mean_bias_stats(grads[n], format="mxfp4", weight=m.weight.t())
        assert res[n + GRAD_SUFFIX] == pytest.approx(expected, rel=1e-9, abs=1e-12), n
    with pytest.raises(KeyError, match="not found"):
        mean_bias(llama, _batch(), modules=["model.layers.9.mlp.down_proj"])


def test_hooks_are_removed_when_the_pass_fails(llama):
    llama.train()
    bad = _batch(3)
    bad["labels"] = bad["labels"][:, :5]  # shape mismatch: the loss fails after the forward hooks ran
    with pytest.raises(Exception):
        mean_bias(llama, bad, gradients=True, modules=_in_decoder_layers)
    _assert_clean(llama)
    assert all(p.grad is None for p in llama.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Trainer callback
# ----------------------------------------------------------------------------------------------------------------

class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, seq), generator=_gen(12))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def _train(tmp_path, callbacks) -> LlamaForCausalLM:
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama(seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_RandomTokens(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_callback_logs_every_n_steps_without_changing_training(tmp_path):
    cb = MeanBiasCallback(_batch(4), every_n_steps=2, gradients=True, modules=_in_decoder_layers)
    with_cb = _train(tmp_path / "a", [cb])
    without = _train(tmp_path / "b", [])

    logged = [e for e in with_cb.state.log_history if any(k.startswith("meanbias/") for k in e)]
    assert [e["step"] for e in logged] == [2, 4]
    assert cb.history == logged
    for e in logged:
        for stat in ("r2", "cos_mu_v1", "qerr_plain", "qerr_averis"):
            assert math.isfinite(e[f"meanbias/{stat}"]) and math.isfinite(e[f"meanbias/grad_output/{stat}"])
    model = with_cb.model
    assert all(p.grad is None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), without.model.parameters()):
        assert torch.equal(p, q), name  # bit-identical training with and without the callback
    losses = [e["loss"] for e in with_cb.state.log_history if "loss" in e]
    assert losses == [e["loss"] for e in without.state.log_history if "loss" in e]


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------

def test_plots_are_written(llama, tmp_path):
    pytest.importorskip("matplotlib")
    from hf_lowbit.diagnostics.plots import plot_mean_bias

    res = mean_bias(llama, _batch(5), gradients=True, modules=_in_decoder_layers, keep_projections=True)
    paths = plot_mean_bias(res, tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"mean_bias_r2_cos.png", "mean_bias_energy.png", "mean_bias_r2_cos_grad_output.png",
            "mean_bias_energy_grad_output.png"} <= names
    assert any(n.startswith("mean_bias_projections_") for n in names) and len(paths) == 5
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = plot_mean_bias({LINEARS[0]: res[LINEARS[0]]}, tmp_path / "one", layer=LINEARS[0])[-1]
    assert chosen.name == f"mean_bias_projections_{LINEARS[0]}.png" and chosen.stat().st_size > 0
    with pytest.raises(KeyError):
        plot_mean_bias({n: {k: v for k, v in s.items() if k != "projections"} for n, s in res.items()},
                       tmp_path / "none", layer=LINEARS[0])
