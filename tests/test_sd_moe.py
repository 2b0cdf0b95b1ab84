"""SD-MoE (ALGORITHMS.md §3): init modes, gradient rule, refresh schedule in a real Trainer, fold-back, FP4."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import load_checked, tiny_config
from hf_lowbit.model_patches.sd_moe import (SD_MATRICES, SDMoECallback, SDMoEExperts, after_optimizer_step,
                                            apply_sd_moe, double_complement, install_gradient_hooks,
                                            project_gradients, refresh_bases, sd_modules, svd_driver)

FAMILIES = ["qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
_CACHE: dict[str, torch.nn.Module] = {}


def stock(kind: str):
    from transformers import AutoModelForCausalLM

    if kind not in _CACHE:
        torch.manual_seed(0)
        _CACHE[kind] = AutoModelForCausalLM.from_config(tiny_config(kind))
    return copy.deepcopy(_CACHE[kind])


def _ids(seed=1, b=2, t=24):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def _raw(module, m, t):  # per-expert part of matrix type m in a fused tensor t
    return module.unique(m, t)


@pytest.mark.parametrize("kind", FAMILIES)
def test_preserve_equals_stock_and_gradient_rule(kind):
    base = stock(kind)
    sd = copy.deepcopy(base)
    names = apply_sd_moe(sd, rank=4)
    assert names and all(isinstance(sd.get_submodule(n), SDMoEExperts) for n in names)
    ids = _ids()
    ref = base(ids, labels=ids)
    out = sd(ids, labels=ids)
    assert (out.logits - ref.logits).abs().max() < 1e-5
    ref.loss.backward()
    out.loss.backward()
    project_gradients(sd)
    for name in names:
        mod, old = sd.get_submodule(name), base.get_submodule(name)
        for m in SD_MATRICES:
            u, v = mod.bases(m)
            assert u.shape[1] == 4 and torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)
            raw = _raw(mod, m, old.down_proj.grad if m == "down" else old.gate_up_proj.grad)  # G⁽ⁱ⁾ [E, o, i]
            gu = mod._unique_grad(m)
            gc = mod.common(m).grad
            scale = raw.abs().max()
            assert (u.T @ gu).abs().max() <= 1e-5 * scale + 1e-9          # U_kᵀ G_u ≈ 0
            assert (gu @ v).abs().max() <= 1e-5 * scale + 1e-9             # G_u V_k ≈ 0
            assert torch.allclose(gu, double_complement(raw, u, v), atol=1e-6)
            assert torch.allclose(gc + gu.sum(0), raw.sum(0), atol=1e-5 * float(scale) + 1e-8)  # G_c + ΣG_u = ΣG


def test_init_modes_and_hooks_with_accumulation():
    base = stock("qwen3_moe")
    proj = copy.deepcopy(base)
    apply_sd_moe(proj, rank=4, init="project")
    scratch = copy.deepcopy(base)
    apply_sd_moe(scratch, rank=4, init="scratch", seed=3)
    for model in (proj, scratch):
        for _, mod in sd_modules(model):
            for m in SD_MATRICES:
                u, v = mod.bases(m)
                wu = mod.unique(m).detach()
                assert (u.T @ wu).abs().max() < 1e-5 and (wu @ v).abs().max() < 1e-5
                assert torch.linalg.matrix_rank(mod.common(m).detach()) == 4
    # scratch: every W_u has W's tail spectrum; different experts get different bases
    mod = next(sd_modules(scratch))[1]
    s = torch.linalg.svdvals(mod.unique("gate").detach())
    assert torch.allclose(s[0], s[1], atol=1e-5) and not torch.allclose(mod.unique("gate")[0], mod.unique("gate")[1])
    # hook route with 2 accumulated micro-batches == explicit projection of the accumulated sum
    a, b = copy.deepcopy(proj), copy.deepcopy(proj)
    with install_gradient_hooks(a):
        for seed in (1, 2):
            a(_ids(seed), labels=_ids(seed)).loss.backward()
    for seed in (1, 2):
        b(_ids(seed), labels=_ids(seed)).loss.backward()
    project_gradients(b)
    for (_, ma), (_, mb) in zip(sd_modules(a), sd_modules(b)):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6)
        assert not ma.__dict__["_hooks"]


def test_ablations_update_projection_and_residual_fold():
    model = stock("qwen2_moe")
    apply_sd_moe(model, rank=4, refresh_every=2, project_updates=True, fold_residual=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mod = next(sd_modules(model))[1]
    before = {m: mod.unique(m).detach().clone() for m in SD_MATRICES}
    model(_ids(), labels=_ids()).loss.backward()
    project_gradients(model)
    opt.step()
    assert not after_optimizer_step(model)                      # step 1: no refresh
    for m in SD_MATRICES:
        u, v = mod.bases(m)
        delta = mod.unique(m).detach() - before[m]
        assert delta.abs().max() > 0
        assert (u.T @ delta).abs().max() < 1e-6 and (delta @ v).abs().max() < 1e-6
    combined = mod.combined_weights()
    opt.zero_grad()
    assert after_optimizer_step(model) and mod.refreshes == 1   # step 2: refresh, W_c → rank k, sum unchanged
    for m in SD_MATRICES:
        assert torch.linalg.matrix_rank(mod.common(m).detach(), atol=1e-5) <= 4
    for x, y in zip(combined, mod.combined_weights()):
        assert torch.allclose(x, y, atol=1e-6)


def test_trainer_refresh_schedule_and_projection_before_clipping(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = stock("deepseek_v3")
    apply_sd_moe(model, rank=4, refresh_every=2)
    seen = []

    class Probe(TrainerCallback):  # runs before SDMoECallback: the hooks must already have projected
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            worst = 0.0
            for _, mod in sd_modules(model):
                for m in SD_MATRICES:
                    u, v = mod.bases(m)
                    g = mod._unique_grad(m)
                    worst = max(worst, float((u.T @ g).abs().max() / g.abs().max().clamp_min(1e-30)),
                                float((g @ v).abs().max() / g.abs().max().clamp_min(1e-30)))
            seen.append(worst)

    data = [{"input_ids": _ids(i, 1, 16)[0], "labels": _ids(i, 1, 16)[0]} for i in range(20)]
    sd_cb = SDMoECallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, max_grad_norm=1.0, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=100, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Probe(), sd_cb]).train()
    assert len(seen) == 5 and max(seen) < 1e-5
    assert sd_cb.refresh_steps == [2, 4]
    assert all(mod.refreshes == 2 and mod.optimizer_steps == 5 and not mod.__dict__["_hooks"]
               for _, mod in sd_modules(model))


def test_fold_back_loads_in_plain_transformers(tmp_path):
    import hf_lowbit

    model = stock("qwen2_moe")
    apply_sd_moe(model, rank=4, init="project")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(_ids(), labels=_ids()).loss.backward()
    project_gradients(model)
    opt.step()
    refresh_bases(model)
    ids = _ids(5)
    with torch.no_grad():
        want = model(ids).logits
    hf_lowbit.finalize(model)
    assert not list(sd_modules(model))
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "ckpt")
    # the checkpoint is stock: no quantization_config, no SD-MoE keys, loads with strict key checks in plain
    # transformers (no hf_lowbit quantizer involved: nothing in config.json refers to it)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("common_" in k or "sd_" in k.rsplit(".", 1)[-1] for k in keys)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys  # transformers' legacy per-expert layout
    plain = load_checked(tmp_path / "ckpt")
    assert type(plain.model.layers[0].mlp.experts).__module__.startswith("transformers.")
    with torch.no_grad():
        assert (plain(ids).logits - want).abs().max() < 1e-5
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "quantization_config" not in config


def test_sd_fp4_trains_reloads_and_finalizes(tiny_model_dir, tmp_path):
    import hf_lowbit

    cfg = hf_lowbit.LowBitConfig(moe="sd", sd_rank=4, sd_refresh_every=2)
    model = load_checked(tiny_model_dir("qwen3_moe"), cfg)
    mods = [m for _, m in sd_modules(model)]
    assert mods and all(m.recipe is not None for m in mods)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(7, 4, 32)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        project_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        after_optimizer_step(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] and mods[0].refreshes == 2
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "train")                 # train-mode SD checkpoint: W_c + W_u reload by name
    again = load_checked(tmp_path / "train")
    assert all(isinstance(m, SDMoEExperts) for _, m in sd_modules(again))
    with torch.no_grad():
        assert (again(ids).logits - want).abs().max() < 1e-4
    hf_lowbit.finalize(model)
    assert not list(sd_modules(model))
    model.save_pretrained(tmp_path / "infer")
    packed = load_checked(tmp_path / "infer")
    with torch.no_grad():
        got = packed(ids).logits
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.5 * want.abs().max()


def _random_grads(model, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, mod in sd_modules(model):
        for p in mod.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.device, dtype)


def _reference(mod, name, g):
    """The gradient rule for parameter ``name`` of ``mod`` on gradient ``g``, from `double_complement`."""
    if name.startswith("common_"):
        m = name[len("common_"):]
        return g.float() - double_complement(g, *mod.bases(m))
    return torch.cat([double_complement(_raw(mod, m, g), *mod.bases(m))
                      for m in (("gate", "up") if name == "gate_up_proj" else ("down",))], 1)


def test_hooks_project_each_gradient_once(monkeypatch):
    import hf_lowbit.model_patches.sd_moe as sd_moe

    model = stock("qwen3_moe")
    apply_sd_moe(model, rank=4, init="project")
    seen, calls = [], []
    real = sd_moe._project_stack

    def spy(owner, slot, uniques, commons):
        calls.append(slot)
        seen.extend(g for g, _ in uniques + commons)
        return real(owner, slot, uniques, commons)

    monkeypatch.setattr(sd_moe, "_project_stack", spy)
    with install_gradient_hooks(model):
        model(_ids(), labels=_ids()).loss.backward()
    params = [p for _, mod in sd_modules(model) for p in mod.parameters()]
    assert len(params) == 10 and all(p.grad is not None for p in params)
    assert len(seen) == len(params) and all(sum(g is p.grad for g in seen) == 1 for p in params)
    # one batched projection at the end of the pass: the two same-shape layers as 2 problems (gate/up, down),
    # not 5 per layer as per-parameter hooks would
    assert len(calls) == 2
    assert all(not mod.__dict__["_hooks"] for _, mod in sd_modules(model))  # removed on exiting the context


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_model_projection_equals_per_module(monkeypatch, dtype):
    import hf_lowbit.model_patches.sd_moe as sd_moe

    model = stock("qwen3_moe").to(dtype)
    apply_sd_moe(model, rank=4, init="project")
    _random_grads(model, dtype)
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    per_module, small = copy.deepcopy(model), copy.deepcopy(model)
    for copied in (per_module, small):
        for n, p in copied.named_parameters():
            p.grad = raw[n].clone() if n in raw else None
    batches = []
    monkeypatch.setattr(sd_moe, "_project_modules",
                        lambda mods, real=sd_moe._project_modules: (batches.append(len(mods)), real(mods)))
    project_gradients(model)                                     # both MoE layers in one batched problem
    assert batches == [2]
    for _, mod in sd_modules(per_module):
        mod.project_gradients()                                  # one module at a time, W_u per parameter
    monkeypatch.setattr(sd_moe, "GROUP_NUMEL", 0)
    monkeypatch.setattr(sd_moe, "GROUP_NUMEL_CPU", 0)
    project_gradients(small)                                     # no stacking: the per-module route
    assert batches == [2]
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7            # FP32 rounding / one BF16 ulp (of the largest)
    mods = {n: m for n, m in sd_modules(model)}
    for name, p in model.named_parameters():
        if name not in raw:
            continue
        mod_name, pname = name.rsplit(".", 1)
        want = _reference(mods[mod_name], pname, raw[name])
        atol = ulp * float(raw[name].abs().max())
        assert p.grad.dtype == dtype and torch.allclose(p.grad.float(), want, atol=atol, rtol=0)
        for other in (per_module, small):
            assert torch.allclose(p.grad, other.get_parameter(name).grad, atol=atol, rtol=0)
    project_gradients(model)                                     # idempotent (bases served from the cache)
    for name, p in model.named_parameters():
        if name in raw:
            mod_name, pname = name.rsplit(".", 1)
            assert torch.allclose(p.grad.float(), _reference(mods[mod_name], pname, raw[name]),
                                  atol=2 * ulp * float(raw[name].abs().max()), rtol=0)


def _sd_model_with_moved_wc(seed: int, relative: float | None = None):
    """The tiny Qwen3-MoE with SD-MoE ("project" init, rank 4) whose every W_c got Gaussian noise: std 1, or
    `relative` × max|W_c| (a W_c after some training)."""
    model = stock("qwen3_moe")
    apply_sd_moe(model, rank=4, init="project")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sd_modules(model):
            for m in SD_MATRICES:
                wc = mod.common(m)
                scale = 1.0 if relative is None else relative * float(wc.abs().max())
                wc.add_(scale * torch.randn(wc.shape, generator=g))
    return model


def test_batched_refresh_matches_per_matrix_svd():
    model = _sd_model_with_moved_wc(2)
    refresh_bases(model)
    for _, mod in sd_modules(model):
        assert mod.refreshes == 1
        for m in SD_MATRICES:
            u, s, vh = torch.linalg.svd(mod.common(m).detach(), full_matrices=False)
            bu, bv = mod.bases(m)
            assert bu.shape == (mod.common(m).shape[0], 4) and bv.shape == (mod.common(m).shape[1], 4)
            assert torch.allclose(bu @ bu.T, u[:, :4] @ u[:, :4].T, atol=1e-5)   # same subspaces (signs free)
            assert torch.allclose(bv @ bv.T, vh[:4].T @ vh[:4], atol=1e-5)


@pytest.mark.parametrize("driver", [None, "torch", "gesvda", "gesvdj"])
def test_refresh_svd_driver(monkeypatch, driver):
    """HF_LOWBIT_SD_SVD_DRIVER picks the cuSOLVER method on CUDA (unset: gesvda; "torch": PyTorch's choice; ignored
    on CPU, where only the selection and the refusal are checked; on a GPU the run below uses the driver) and every
    driver gives the top-k subspaces of the per-matrix SVD; an unknown name is refused with the allowed ones."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = stock("qwen3_moe").to(device)
    apply_sd_moe(model, rank=4, init="project")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, mod in sd_modules(model):
            for m in SD_MATRICES:
                mod.common(m).add_(torch.randn(mod.common(m).shape, generator=g).to(device))
    if driver is None:
        monkeypatch.delenv("HF_LOWBIT_SD_SVD_DRIVER", raising=False)
    else:
        monkeypatch.setenv("HF_LOWBIT_SD_SVD_DRIVER", driver)
    expect = {None: "gesvda", "torch": None}.get(driver, driver)
    assert svd_driver(torch.device("cuda")) == expect and svd_driver(torch.device("cpu")) is None
    refresh_bases(model)
    for _, mod in sd_modules(model):
        for m in SD_MATRICES:
            u, s, vh = torch.linalg.svd(mod.common(m).detach().double().cpu(), full_matrices=False)
            bu, bv = (b.double().cpu() for b in mod.bases(m))
            assert torch.allclose(bu @ bu.T, u[:, :4] @ u[:, :4].T, atol=1e-4)
            assert torch.allclose(bv @ bv.T, vh[:4].T @ vh[:4], atol=1e-4)
    monkeypatch.setenv("HF_LOWBIT_SD_SVD_DRIVER", "lanczos")
    with pytest.raises(ValueError, match="HF_LOWBIT_SD_SVD_DRIVER='lanczos'.*allowed"):
        refresh_bases(model)


def test_refresh_recomputes_non_finite_bases_of_an_approximate_driver(monkeypatch):
    """When the refresh driver (gesvda on CUDA) returns non-finite factors for a finite W_c, the stack is recomputed
    with PyTorch's default driver; a non-finite W_c is left to give non-finite bases (nothing to recover)."""
    from hf_lowbit.model_patches import sd_moe

    real_svd = torch.linalg.svd
    calls = []

    def flaky_svd(w, full_matrices=True, driver=None):
        calls.append(driver)
        u, s, vh = real_svd(torch.nan_to_num(w), full_matrices=full_matrices)  # LAPACK refuses NaN; cuSOLVER not
        return (u * float("nan"), s, vh) if driver == "gesvda" or not torch.isfinite(w).all() else (u, s, vh)

    monkeypatch.setattr(sd_moe, "svd_driver", lambda device: "gesvda")
    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    w = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(0))
    u, s, vh = sd_moe._stack_svd(w)
    assert calls == ["gesvda", None] and torch.isfinite(u).all()
    torch.testing.assert_close((u * s[:, None]) @ vh, w, rtol=1e-5, atol=1e-5)
    calls.clear()
    w[1, 0, 0] = float("nan")
    sd_moe._stack_svd(w)
    assert calls == ["gesvda"]


def test_refresh_recomputes_when_the_approximate_driver_fails_to_converge(monkeypatch):
    """gesvda raised `LinAlgError` (did not converge) on an exactly rank-k FP32 W_c on an H200: the refresh then uses
    PyTorch's default driver; an error of the default driver itself propagates."""
    from hf_lowbit.model_patches import sd_moe

    real_svd = torch.linalg.svd
    calls = []

    def failing_svd(w, full_matrices=True, driver=None):
        calls.append(driver)
        if driver == "gesvda" or w.shape[0] == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(w, full_matrices=full_matrices)

    monkeypatch.setattr(sd_moe, "svd_driver", lambda device: "gesvda")
    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    w = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(0))
    u, s, vh = sd_moe._stack_svd(w)
    assert calls == ["gesvda", None]
    torch.testing.assert_close((u * s[:, None]) @ vh, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        sd_moe._stack_svd(w[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs in the GPU acceptance stage)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_rule_equals_eager_rule_across_refreshes(monkeypatch, dtype):
    """On CUDA the batched rule is replayed as a CUDA graph: the same gradients as the eager ops, with new gradients
    on every replay and new bases after a refresh."""
    from hf_lowbit.model_patches.sd_graph import graphs_enabled

    model = stock("qwen3_moe").to("cuda", dtype)
    apply_sd_moe(model, rank=4, init="project")
    eager = copy.deepcopy(model)
    assert graphs_enabled(torch.device("cuda"))
    for step in range(3):
        _random_grads(model, dtype, seed=step)
        for n, p in eager.named_parameters():
            other = model.get_parameter(n)
            p.grad = None if other.grad is None else other.grad.clone()
        project_gradients(model)
        monkeypatch.setenv("HF_LOWBIT_SD_GRAPH", "0")
        project_gradients(eager)
        monkeypatch.delenv("HF_LOWBIT_SD_GRAPH")
        for n, p in model.named_parameters():
            if p.grad is not None:
                q = eager.get_parameter(n).grad
                assert torch.allclose(p.grad.float(), q.float(), atol=1e-6 * float(q.abs().max()) + 1e-30, rtol=1e-5)
        graphs = [m.__dict__.get("_rule_graphs", {}) for _, m in sd_modules(model)]
        assert sum(len(g) for g in graphs) == 2  # one graph per problem (gate/up, down), captured once
        gen = torch.Generator().manual_seed(10 + step)
        with torch.no_grad():  # move W_c (the same in both), then refresh: the graph must use the new bases
            for (_, a), (_, b) in zip(sd_modules(model), sd_modules(eager)):
                for m in SD_MATRICES:
                    delta = torch.randn(a.common(m).shape, generator=gen).to("cuda", dtype)
                    a.common(m).add_(delta)
                    b.common(m).add_(delta)
        refresh_bases(model)
        refresh_bases(eager)


def _projector_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ a.mT - b @ b.mT).abs().max())


def test_subspace_svd_finds_the_top_k_subspaces():
    """The opt-in "subspace" refresh (block power iteration + Rayleigh-Ritz): on rank-k-plus-noise matrices (a W_c
    after training from a preserve init) its top-k subspaces equal an FP64 SVD's, warm-started from slightly moved
    bases or cold (zero start); an exactly rank-k and a zero matrix give finite, orthonormal bases."""
    from hf_lowbit.model_patches.sd_moe import subspace_svd

    gen = torch.Generator().manual_seed(0)
    n_mat, m, n, k = 4, 96, 64, 8
    u = torch.linalg.qr(torch.randn(n_mat, m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n_mat, n, k, generator=gen)).Q
    signal = (u * torch.linspace(2.0, 1.0, k)) @ v.mT
    w = signal + 0.3 * torch.randn(n_mat, m, n, generator=gen) / (m ** 0.5 + n ** 0.5)
    ref_u, _, ref_vh = torch.linalg.svd(w.double(), full_matrices=False)
    ref_u, ref_v = ref_u[..., :k], ref_vh[..., :k, :].mT
    moved = torch.linalg.qr(ref_v.float() + 0.05 * torch.randn(n_mat, n, k, generator=gen)).Q
    for start, tol in ((moved, 1e-5), (torch.zeros(n_mat, n, k), 1e-4)):  # FP32; a full FP32 SVD: ~3e-7
        bu, s, bvh = subspace_svd(w, start)
        assert bu.shape == (n_mat, m, 2 * k) and s.shape == (n_mat, 2 * k) and bvh.shape == (n_mat, 2 * k, n)
        assert _projector_error(bu[..., :k].double(), ref_u) < tol
        assert _projector_error(bvh[..., :k, :].mT.double(), ref_v) < tol
        torch.testing.assert_close(s[..., :k], torch.linalg.svdvals(w)[..., :k], rtol=1e-5, atol=1e-6)
    for exact in (signal, torch.zeros_like(signal)):
        bu, s, bvh = subspace_svd(exact, moved)
        basis = bvh[..., :k, :].mT
        assert torch.isfinite(bu).all() and torch.isfinite(basis).all()
        torch.testing.assert_close(basis.mT @ basis, torch.eye(k).expand(n_mat, k, k), rtol=0, atol=1e-5)
    assert _projector_error(subspace_svd(signal, moved)[2][..., :k, :].mT.double(), v.double()) < 1e-5


def test_refresh_with_the_subspace_driver_matches_the_default(monkeypatch):
    """HF_LOWBIT_SD_SVD_DRIVER=subspace: refreshing a trained-looking SD-MoE model gives the same bases (projectors)
    as the default driver; its warm start is the previous bases."""
    model = _sd_model_with_moved_wc(3, relative=0.01)
    reference = copy.deepcopy(model)
    refresh_bases(reference)
    monkeypatch.setenv("HF_LOWBIT_SD_SVD_DRIVER", "subspace")
    refresh_bases(model)
    for (_, a), (_, b) in zip(sd_modules(model), sd_modules(reference)):
        for m in SD_MATRICES:
            for x, y in zip(a.bases(m), b.bases(m)):
                assert _projector_error(x, y) < 1e-5


def test_graph_switch_values(monkeypatch):
    """HF_LOWBIT_SD_GRAPH: 1 (default) replays the rule as a CUDA graph on CUDA only, 0 runs the eager ops, anything
    else is refused by name (checked before the batched rule writes any gradient)."""
    from hf_lowbit.model_patches.sd_graph import graphs_enabled

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("HF_LOWBIT_SD_GRAPH", raising=False)
    assert graphs_enabled(cuda) and not graphs_enabled(cpu)
    monkeypatch.setenv("HF_LOWBIT_SD_GRAPH", "0")
    assert not graphs_enabled(cuda)
    monkeypatch.setenv("HF_LOWBIT_SD_GRAPH", "off")
    with pytest.raises(ValueError, match=r"HF_LOWBIT_SD_GRAPH='off' is not supported; allowed: \['0', '1'\]"):
        graphs_enabled(cuda)
