"""Mean-bias diagnostics of FP4 GEMM operands (ALGORITHMS.md §2, "Mean-bias diagnostics", items 1-6).

Paper A ("The Curse and Blessing of Mean Bias in FP4-Quantized LLM Training") finds that LLM activations carry a
coherent rank-one mean component that dominates their energy, aligns with the top singular direction, sets the
FP4 block scales and crushes the rest of the distribution into few codes. The functions here measure that on any
tensor, on every GEMM input of a model, and periodically during `transformers.Trainer` training:

* :func:`tensor_mean_bias_stats`: all statistics of one (tokens × channels) tensor.
* :func:`mean_bias`: hooks a model's linear layers, runs one batch and returns the statistics of every layer's
  input X (and, with ``gradients=True``, of its output gradient D = ∂L/∂Y).
* :func:`summarize`: mean over layers and the worst layer of each statistic.
* :class:`MeanBiasCallback`: a `TrainerCallback` logging :func:`mean_bias` summaries every N steps.

Everything is computed in float64 on the CPU on a deterministic, evenly spaced subsample of the tokens; only the
FP4 quantizer itself runs in float32 (the reference numerics, :func:`hf_lowbit.numerics.fake_quantize`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..numerics import fake_quantize, get_format

__all__ = ["STAT_KEYS", "GEMM_KEYS", "GRAD_SUFFIX", "tensor_mean_bias_stats", "mean_bias", "summarize",
           "MeanBiasCallback"]

#: Keys every :func:`tensor_mean_bias_stats` result holds.
STAT_KEYS: tuple[str, ...] = (
    "r2", "cos_mu_v1", "cos_mu_v2", "sign_coherence",
    "energy_mean", "energy_spike", "energy_tail",
    "outlier_mean_share", "outlier_spike_share", "outlier_tail_share",
    "amax_inflation", "zero_code_share", "zero_code_share_centered", "qerr_plain", "qerr_averis",
)
#: Keys added when a weight is given.
GEMM_KEYS: tuple[str, ...] = ("gemm_err_plain", "gemm_err_averis")
#: Suffix of the result keys that hold output-gradient statistics in :func:`mean_bias`.
GRAD_SUFFIX = ".grad_output"
#: Most sorted projections kept per layer by ``keep_projections=True``.
MAX_PROJECTIONS = 2048

ModuleSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None


# ----------------------------------------------------------------------------------------------------------------
# One tensor
# ----------------------------------------------------------------------------------------------------------------

def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN where the denominator is 0 (the statistic is undefined, e.g. on an all-zero tensor)."""
    return num / den if den != 0 else float("nan")


def _even_indices(n: int, k: int) -> torch.Tensor:
    """``k`` distinct, evenly spaced indices into ``range(n)`` (``k <= n``), first and spacing deterministic."""
    return torch.arange(k, dtype=torch.long) * n // k


def _as_matrix(x: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """Flatten leading dims to (tokens × channels), subsample evenly spaced rows, return float64 on the CPU."""
    if x.dim() == 0:
        raise ValueError("mean-bias statistics need a tensor with a channel dimension, got a scalar")
    x = x.detach().reshape(-1, x.shape[-1])
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be a positive integer or None")
        if x.shape[0] > max_tokens:
            x = x[_even_indices(x.shape[0], max_tokens).to(x.device)]
    return x.to(device="cpu", dtype=torch.float64)


def _block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per 1×B block (along channels, zero-padded) maxima of |x|, shape (tokens, n_blocks)."""
    pad = -x.shape[1] % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.abs().reshape(x.shape[0], -1, block).amax(dim=-1)


def _q(x: torch.Tensor, format: str) -> torch.Tensor:
    """Q(x): RTN fake quantization along the last axis (float32 numerics), returned as float64."""
    return fake_quantize(x.float(), format, axis=-1, rounding="rtn").double()


def _spectrum(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-``k`` squared singular values of ``x`` (descending, clamped ≥ 0) and their singular vectors.

    Uses ``eigh`` of the Gram matrix of the smaller side, in float64 (several times cheaper than a full SVD and
    far more accurate than the statistics need). Returns ``(sigma2, vectors, right)``: ``vectors`` are the right
    singular vectors (m × k) if ``right`` else the left ones (l × k).
    """
    l, m = x.shape
    right = m <= l
    gram = x.T @ x if right else x @ x.T
    evals, evecs = torch.linalg.eigh(gram)
    k = min(k, evals.numel())
    sigma2 = evals.flip(0)[:k].clamp(min=0.0)
    vecs = evecs.flip(1)[:, :k]
    return sigma2, vecs, right


def _right_vectors(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` unit right singular vectors of ``x`` as columns (NaN columns where the singular value is 0)."""
    sigma2, vecs, right = _spectrum(x, k)
    if right:
        return vecs
    sigma = sigma2.sqrt()
    v = x.T @ vecs
    return v / torch.where(sigma > 0, sigma, torch.full_like(sigma, float("nan")))


def _check_fracs(spike_rank_frac: float, outlier_frac: float) -> None:
    if not 0.0 <= spike_rank_frac <= 1.0:
        raise ValueError(f"spike_rank_frac={spike_rank_frac} must lie in [0, 1]")
    if not 0.0 <= outlier_frac <= 1.0:
        raise ValueError(f"outlier_frac={outlier_frac} must lie in [0, 1]")


def _as_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A GEMM weight (n × m) as float64 on the CPU, after checking that it fits ``channels``."""
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit an input with {channels} channels "
                         f"(expected n × {channels})")
    return weight.detach().to(device="cpu", dtype=torch.float64)


def _averis(x2: torch.Tensor, mu: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q(X), Q(R) and Q_A(X) = 1·Q(μ) + Q(R), μ quantized on its own as a 1×m tensor."""
    q_x = _q(x2, format)
    q_r = _q(x2 - mu, format)
    return q_x, q_r, _q(mu[None, :], format) + q_r


def _matrix_stats(x2: torch.Tensor, format: str, spike_rank_frac: float,
                  outlier_frac: float) -> tuple[dict[str, float], torch.Tensor | None]:
    """Statistics (``STAT_KEYS``) of a finite, non-empty float64 (l × m) matrix, plus its sorted projections."""
    nan = float("nan")
    l, m = x2.shape
    mu = x2.mean(dim=0)
    r = x2 - mu
    sq_x = float((x2 * x2).sum())
    sq_mean = l * float(mu @ mu)
    sq_res = float((r * r).sum())
    mu_norm = math.sqrt(float(mu @ mu))
    out: dict[str, float] = {}

    # 1. share of energy in the mean component.
    out["r2"] = _ratio(sq_mean, sq_x)

    # 2. alignment of μ with the top right singular vectors of the uncentred X.
    v = _right_vectors(x2, 2)
    for i in (1, 2):
        ok = i <= v.shape[1] and mu_norm > 0
        out[f"cos_mu_v{i}"] = abs(float(v[:, i - 1] @ mu)) / mu_norm if ok else nan

    # 3. sign coherence of the token projections onto μ/‖μ‖.
    proj = x2 @ (mu / mu_norm) if mu_norm > 0 else None
    out["sign_coherence"] = (nan if proj is None else
                             max(float((proj > 0).double().mean()), float((proj < 0).double().mean())))

    # 4. energy split mean / spike (rank-k SVD of R) / tail. ‖X‖² = l‖μ‖² + ‖R‖² because 1ᵀR = 0, so the shares
    # are normalised by that sum and add up to 1 to rounding.
    k = max(1, int(spike_rank_frac * m))
    sigma2, basis, right = _spectrum(r, k)
    sq_spike = min(float(sigma2.sum()), sq_res)
    total = sq_mean + sq_res
    out["energy_mean"] = _ratio(sq_mean, total)
    out["energy_spike"] = _ratio(sq_spike, total)
    out["energy_tail"] = _ratio(sq_res - sq_spike, total)

    # 5. outlier attribution X_ij = μ_j + spike_ij + tail_ij at the largest |X_ij|. X_spike is the projection of R
    # onto its top-k singular subspace (R·V·Vᵀ or U·Uᵀ·R), evaluated only at the selected entries.
    n_out = min(l * m, max(1, int(outlier_frac * l * m)))
    flat = x2.abs().flatten().topk(n_out).indices
    rows, cols = flat // m, flat % m
    xv = x2[rows, cols]
    keep = xv != 0
    rows, cols, xv = rows[keep], cols[keep], xv[keep]
    if xv.numel():
        if right:
            spike = ((r[rows] @ basis) * basis[cols]).sum(dim=1)
        else:
            spike = (basis[rows] * (basis.T @ r[:, cols]).T).sum(dim=1)
        tail = r[rows, cols] - spike
        x_sq = xv * xv
        out["outlier_mean_share"] = float((mu[cols] ** 2 / x_sq).mean())
        out["outlier_spike_share"] = float((spike ** 2 / x_sq).mean())
        out["outlier_tail_share"] = float((tail ** 2 / x_sq).mean())
    else:
        out["outlier_mean_share"] = out["outlier_spike_share"] = out["outlier_tail_share"] = nan

    # 6. quantization effect.
    block = get_format(format).block_size
    amax_x = _block_amax(x2, block)
    amax_r = _block_amax(r, block)
    valid = amax_r > 0
    out["amax_inflation"] = float((amax_x[valid] / amax_r[valid]).mean()) if bool(valid.any()) else nan
    q_x, q_r, q_a = _averis(x2, mu, format)
    out["zero_code_share"] = float((q_x == 0).double().mean())
    out["zero_code_share_centered"] = float((q_r == 0).double().mean())
    norm_x = math.sqrt(sq_x)
    out["qerr_plain"] = _ratio(float(torch.linalg.vector_norm(q_x - x2)), norm_x)
    out["qerr_averis"] = _ratio(float(torch.linalg.vector_norm(q_a - x2)), norm_x)

    sorted_proj = None if proj is None else proj.sort().values
    return {key: out[key] for key in STAT_KEYS}, sorted_proj


def _gemm_stats(x2: torch.Tensor, w: torch.Tensor, format: str) -> dict[str, float]:
    """Relative errors of Q(X)Q(W)ᵀ and Q_A(X)Q(W)ᵀ against the float64 product XWᵀ."""
    if not torch.isfinite(x2).all() or not torch.isfinite(w).all():
        return dict.fromkeys(GEMM_KEYS, float("nan"))
    q_x, _, q_a = _averis(x2, x2.mean(dim=0), format)
    q_w = _q(w, format)
    y = x2 @ w.T
    norm_y = float(torch.linalg.vector_norm(y))
    return {"gemm_err_plain": _ratio(float(torch.linalg.vector_norm(q_x @ q_w.T - y)), norm_y),
            "gemm_err_averis": _ratio(float(torch.linalg.vector_norm(q_a @ q_w.T - y)), norm_y)}


def _analyse(x2: torch.Tensor, format: str, spike_rank_frac: float, outlier_frac: float,
             w: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor | None]:
    """All statistics of a prepared matrix: NaN everywhere for empty or non-finite input."""
    get_format(format)
    if x2.numel() == 0 or not torch.isfinite(x2).all():
        stats, proj = dict.fromkeys(STAT_KEYS, float("nan")), None
    else:
        stats, proj = _matrix_stats(x2, format, spike_rank_frac, outlier_frac)
    if w is not None:
        stats.update(_gemm_stats(x2, w, format))
    return stats, proj


def tensor_mean_bias_stats(x: torch.Tensor, format: str = "nvfp4", spike_rank_frac: float = 0.01,
                           outlier_frac: float = 0.001, max_tokens: int | None = 4096,
                           weight: torch.Tensor | None = None) -> dict[str, float]:
    """Mean-bias statistics of one GEMM operand ``x`` (tokens × channels; leading dims are flattened).

    With l tokens and m channels, μ the per-channel mean over tokens, R = X − 1μᵀ the centred residual and Q the
    FP4 quantizer of ``format`` (1×B blocks along channels, RTN), the returned keys are:

    * ``r2``: l‖μ‖² / ‖X‖_F², the share of energy in the mean component.
    * ``cos_mu_v1``, ``cos_mu_v2``: |cos(μ, v_i)| for the top two right singular vectors of the uncentred X.
    * ``sign_coherence``: max(frac(p > 0), frac(p < 0)) of the token projections p_i = x_iᵀμ/‖μ‖.
    * ``energy_mean``, ``energy_spike``, ``energy_tail``: ‖1μᵀ‖², ‖X_spike‖², ‖X_tail‖² as shares of ‖X‖²
      (summing to 1), X_spike the rank-max(1, ⌊spike_rank_frac·m⌋) truncated SVD of R, X_tail = R − X_spike.
    * ``outlier_mean_share``, ``outlier_spike_share``, ``outlier_tail_share``: over the top ``outlier_frac`` (at
      least one) of the entries by |X_ij|, the means of μ_j²/X_ij², (X_spike)_ij²/X_ij², (X_tail)_ij²/X_ij². They
      need not sum to 1 (cross terms); a share near 1 means that component alone makes the outlier.
    * ``amax_inflation``: mean over 1×B blocks of amax(X block) / amax(R block), skipping blocks where R is 0.
    * ``zero_code_share``, ``zero_code_share_centered``: share of entries of Q(X), resp. Q(R), that are zero.
    * ``qerr_plain``: ‖Q(X) − X‖/‖X‖; ``qerr_averis``: ‖Q_A(X) − X‖/‖X‖ with Q_A(X) = 1·Q(μ) + Q(R), the mean
      quantized on its own as a 1×m tensor (Averis).
    * only if ``weight`` (n × m) is given: ``gemm_err_plain`` = ‖Q(X)Q(W)ᵀ − XWᵀ‖/‖XWᵀ‖ and ``gemm_err_averis``
      with Q_A(X) in place of Q(X); W is quantized along its last axis (pass Wᵀ for the dgrad GEMM D·W).

    Above ``max_tokens`` rows, an evenly spaced, deterministic subset of the tokens is used. Undefined ratios
    (an all-zero tensor, μ = 0 for the cosines) are NaN; a tensor holding NaN/Inf gives NaN for every key.
    """
    _check_fracs(spike_rank_frac, outlier_frac)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        x2 = _as_matrix(x, max_tokens)
        w = None if weight is None else _as_weight(weight, x2.shape[1])
        stats, _ = _analyse(x2, format, spike_rank_frac, outlier_frac, w)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# A model
# ----------------------------------------------------------------------------------------------------------------

def _lowbit_linear_class() -> type | None:
    """`hf_lowbit.layers.LowBitLinear` if it can be imported (imported lazily: diagnostics must not need it)."""
    try:
        from ..layers import LowBitLinear
    except ImportError:
        return None
    return LowBitLinear


def _select_modules(model: nn.Module, modules: ModuleSelector) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs to hook, in `named_modules` order."""
    named = list(model.named_modules())
    if modules is None:
        cls = _lowbit_linear_class()
        chosen = [(n, m) for n, m in named if cls is not None and isinstance(m, cls)]
        if not chosen:  # a plain (not converted) model: every linear except the output head
            chosen = [(n, m) for n, m in named if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
        return chosen
    if callable(modules):
        return [(n, m) for n, m in named if n and modules(n, m)]
    if isinstance(modules, str):
        raise TypeError("modules must be a list of module names or a predicate (name, module) -> bool, got a str")
    lookup = dict(named)
    missing = [n for n in modules if n not in lookup]
    if missing:
        raise KeyError(f"modules not found in the model: {missing}")
    wanted = set(modules)
    return [(n, m) for n, m in named if n in wanted]


def _module_format(module: nn.Module, format: str | None) -> str:
    """Explicit ``format`` if given, else the module's own ``recipe.format``, else NVFP4."""
    if format is not None:
        return format
    return getattr(getattr(module, "recipe", None), "format", None) or "nvfp4"


def _module_weight(module: nn.Module) -> torch.Tensor | None:
    """The dense high-precision weight of a linear module, ``None`` if it has none (e.g. packed FP4 storage)."""
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point():
        return w
    return None


def _first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The activation a linear module is called with (first tensor positional argument, else keyword)."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_of(outputs: Any) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("gradients=True: the model output has no scalar loss (does the batch hold labels?)")
    return loss


def _store(results: dict, name: str, stats: dict[str, float], proj: torch.Tensor | None,
           keep_projections: bool) -> None:
    entry: dict[str, Any] = dict(stats)
    if keep_projections and proj is not None:
        if proj.numel() > MAX_PROJECTIONS:  # keep both ends: evenly spaced ranks including the first and last
            idx = torch.linspace(0, proj.numel() - 1, MAX_PROJECTIONS).round().long()
            proj = proj[idx]
        entry["projections"] = proj.tolist()
    results[name] = entry


def mean_bias(model: nn.Module, batch: Mapping[str, Any], gradients: bool = False, modules: ModuleSelector = None,
              format: str | None = None, max_tokens: int | None = 4096, keep_projections: bool = False,
              spike_rank_frac: float = 0.01, outlier_frac: float = 0.001) -> dict[str, dict[str, Any]]:
    """Mean-bias statistics (see :func:`tensor_mean_bias_stats`) of the input X of every target linear module.

    Runs ``model(**batch)`` once in eval mode with forward pre-hooks on the targets. Targets (``modules``): a list
    of qualified names or a predicate ``(name, module) -> bool``; by default every `LowBitLinear`, or, in a model
    without any, every `nn.Linear` except ``lm_head``. ``format`` defaults to each module's ``recipe.format``
    (else NVFP4). A dense weight adds the GEMM errors of Y = XWᵀ.

    With ``gradients=True`` and ``labels`` in the batch, the loss is also back-propagated and the output gradient
    D = ∂L/∂Y of each target is analysed under ``"<name>.grad_output"`` (GEMM errors for the dgrad D·W).
    ``keep_projections=True`` adds ``"projections"``: the sorted token projections p_i (≤ 2048, evenly spaced
    ranks) used by :func:`hf_lowbit.diagnostics.plots.plot_mean_bias`.

    The pass leaves the model as it found it: every hook is removed (also on error), every module's train/eval
    flag is restored, existing ``.grad`` tensors are put back untouched (the ones the pass made are dropped), the
    RNG state is restored and so are `LowBitLinear` call counters (their stochastic-rounding streams). A module
    called several times in one forward is analysed on its first call.
    """
    _check_fracs(spike_rank_frac, outlier_frac)
    if format is not None:
        get_format(format)
    targets = _select_modules(model, modules)
    results: dict[str, dict[str, Any]] = {}
    if not targets:
        return results
    device = _model_device(model)
    batch = _to_device(batch, device)
    want_grads = gradients and "labels" in batch
    if gradients and not want_grads:
        warnings.warn("mean_bias(gradients=True): the batch has no 'labels', so there is no loss to "
                      "differentiate; only input statistics are computed", stacklevel=2)

    # q/k/v (gate/up) projections receive the very same tensor object: analyse it once, redo only the GEMM errors.
    # Only the latest input is remembered, so no activation is kept alive beyond the next hooked call.
    last: dict[str, Any] = {}

    def analyse(name: str, module: nn.Module, t: torch.Tensor, weight: torch.Tensor | None) -> None:
        if name in results or not t.is_floating_point():
            return
        fmt = _module_format(module, format)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            key = (t, t._version, fmt)
            if last.get("key") is not None and last["key"][0] is t and last["key"][1:] == key[1:]:
                x2, stats, proj = last["x2"], dict(last["stats"]), last["proj"]
            else:
                x2 = _as_matrix(t, max_tokens)
                stats, proj = _analyse(x2, fmt, spike_rank_frac, outlier_frac, None)
                last.update(key=key, x2=x2, stats=stats, proj=proj)
                stats = dict(stats)
            if weight is not None:
                stats.update(_gemm_stats(x2, _as_weight(weight, x2.shape[1]), fmt))
        _store(results, name, stats, proj, keep_projections)

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs)
            if x is not None:
                analyse(name, module, x, _module_weight(module))
        return hook

    def grad_hook(name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            d = grad_output[0] if grad_output else None
            if d is not None:
                w = _module_weight(module)  # dgrad dX = D·W: W quantized along out-features, i.e. Q(Wᵀ)
                analyse(name + GRAD_SUFFIX, module, d, None if w is None else w.t())
        return hook

    modes = {m: m.training for m in model.modules()}
    # LowBitLinear derives its stochastic-rounding seed from a per-module call counter: put it back, so that a
    # diagnostic pass does not shift the noise streams of the training run.
    counters = {m: m.calls for m in model.modules() if isinstance(getattr(m, "calls", None), int)}
    saved_grads = {p: p.grad for p in model.parameters()} if want_grads else {}
    rng_devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                   if device.type == "cuda" else [])
    handles = []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            for name, module in targets:
                handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                if want_grads:
                    handles.append(module.register_full_backward_hook(grad_hook(name)))
            model.eval()
            if want_grads:
                for p in saved_grads:
                    p.grad = None
                with torch.enable_grad():
                    _loss_of(model(**batch)).backward()
            else:
                with torch.no_grad():
                    model(**batch)
    finally:
        last.clear()
        for h in handles:
            h.remove()
        for p, g in saved_grads.items():
            p.grad = g
        model.train(modes[model])  # lets train() overrides run, then every module gets its exact old flag
        for m, flag in modes.items():
            m.training = flag
        for m, calls in counters.items():
            m.calls = calls
    return results


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per statistic, across layers: ``{"mean", "max", "argmax", "n"}`` over the finite values.

    Input statistics keep their name (``"r2"``); output-gradient entries (``"<layer>.grad_output"``) are
    summarised separately under ``"grad_output/<stat>"``. ``argmax`` names the layer with the largest value (the
    layer, without the suffix); NaN values are skipped and a statistic without finite values gives NaN / None.
    """
    values: dict[str, list[tuple[str, float]]] = {}
    for name, stats in results.items():
        is_grad = name.endswith(GRAD_SUFFIX)
        layer = name[: -len(GRAD_SUFFIX)] if is_grad else name
        for key, v in stats.items():
            if _is_number(v):
                values.setdefault(f"grad_output/{key}" if is_grad else key, []).append((layer, float(v)))
    summary: dict[str, dict[str, Any]] = {}
    for key, pairs in values.items():
        finite = [(layer, v) for layer, v in pairs if math.isfinite(v)]
        if finite:
            layer, vmax = max(finite, key=lambda lv: lv[1])
            summary[key] = {"mean": math.fsum(v for _, v in finite) / len(finite), "max": vmax, "argmax": layer,
                            "n": len(finite)}
        else:
            summary[key] = {"mean": float("nan"), "max": float("nan"), "argmax": None, "n": 0}
    return summary


class MeanBiasCallback(TrainerCallback):
    """Log mean-bias statistics of a fixed batch every ``every_n_steps`` optimizer steps of a `Trainer` run.

    Each time, :func:`mean_bias` runs on the trainer's model and the mean over layers of each statistic in
    ``stats`` is appended to ``state.log_history`` as ``{"meanbias/<stat>": value, ..., "step": global_step}``
    (output-gradient statistics as ``"meanbias/grad_output/<stat>"`` when ``gradients=True``) and to
    ``self.history``. Training is unaffected: the pass runs without autograd (unless ``gradients``), and
    :func:`mean_bias` restores modes, gradients, RNG state and stochastic-rounding counters. ``max_tokens``
    defaults to 1024 (not 4096 as in :func:`mean_bias`): the two float64 eigendecompositions per layer cost
    O(min(tokens, channels)³) on the CPU, and periodic logging should stay cheap next to the training steps.
    """

    def __init__(self, batch: Mapping[str, Any], every_n_steps: int = 100,
                 stats: Iterable[str] = ("r2", "cos_mu_v1", "qerr_plain", "qerr_averis"), gradients: bool = False,
                 modules: ModuleSelector = None, format: str | None = None, max_tokens: int | None = 1024) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be a positive integer")
        self.stats = tuple(stats)
        unknown = [s for s in self.stats if s not in STAT_KEYS + GEMM_KEYS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; allowed: {list(STAT_KEYS + GEMM_KEYS)}")
        self.batch = dict(batch)
        self.every_n_steps = every_n_steps
        self.gradients = gradients
        self.modules = modules
        self.format = format
        self.max_tokens = max_tokens
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        """Every ``every_n_steps`` global steps: run :func:`mean_bias` on ``kwargs['model']`` and log it."""
        if state.global_step % self.every_n_steps:
            return control
        model = kwargs.get("model")
        if model is None:
            raise ValueError("MeanBiasCallback needs the model: the Trainer passes it as kwargs['model']")
        results = mean_bias(model, self.batch, gradients=self.gradients, modules=self.modules, format=self.format,
                            max_tokens=self.max_tokens)
        summary = summarize(results)
        entry: dict[str, float] = {}
        for prefix in ("", "grad_output/"):
            for stat in self.stats:
                if prefix + stat in summary:
                    entry[f"meanbias/{prefix}{stat}"] = summary[prefix + stat]["mean"]
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        entry["step"] = state.global_step
        state.log_history.append(entry)
        self.history.append(dict(entry))
        return control
