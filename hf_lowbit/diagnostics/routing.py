"""Route-wise effective composition number of MH-MoE / LoRAMoE routing (ALGORITHMS.md §4).

A route r is what one adapter module decided for a token: the tuple of per-slice expert choices for MH-MoE, the
expert set for LoRAMoE (``num_heads=1``). A composition c is the tuple of factor labels of the token (domain, label,
frequency bucket, position bucket, or whatever the caller passes). For each route

    N_eff(r) = 1 / Σ_c p(c | r)²

is the number of factor compositions the route effectively mixes (1 = pure). The paper's finding is that routes
mixing more compositions forget more in continual learning, so each route is paired with the mean increase of the
old-task loss of its tokens after training the next task. Layers are summarised by the old-task-mass weighted mean
``Σ_r (n_r / N) N_eff(r)``. Routes holding few tokens bias N_eff toward 1, so token counts are always reported.

Typical use (old-task tokens, routes taken before training the next task):

    factors = token_factors(ids, mask, domain=task_ids, label=label_ids)
    routes = collect_routes(model, ids, mask)            # {module name: [N, H, k]}
    before = token_losses(model, ids, mask)              # [N]
    ... train the next task ...
    after = token_losses(model, ids, mask)
    per_layer = {name: routing_neff(r, factors, loss_before=before, loss_after=after) for name, r in routes.items()}
    layer_summary(per_layer)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.nn import functional as F

FactorInput = Mapping[str, torch.Tensor] | torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Route and composition keys
# ---------------------------------------------------------------------------------------------------------------------
def _route_key(row: Sequence[Sequence[int]]) -> tuple:
    """Readable key of one canonical route: the expert set (one slice) or a per-slice tuple (ints at top-1)."""
    if len(row) == 1:
        return tuple(int(e) for e in row[0])
    return tuple(int(s[0]) if len(s) == 1 else tuple(int(e) for e in s) for s in row)


def route_ids(routes: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
    """Map per-token routes to dense ids ``[N]`` and their keys.

    `routes`: ``[N]`` (already route ids; keys are the ids), ``[N, k]`` (one slice: LoRAMoE expert indices) or
    ``[N, H, k]`` (MH-MoE per-slice indices). Indices within a slice are sorted first: a route is the *set* of
    experts each slice selected, not their order.
    """
    if routes.dim() == 1:
        uniq, inverse = torch.unique(routes, return_inverse=True)
        return inverse, [(int(u),) for u in uniq]
    rows = routes.reshape(routes.shape[0], 1, -1) if routes.dim() == 2 else routes
    canonical = rows.sort(dim=-1).values
    uniq, inverse = torch.unique(canonical.reshape(canonical.shape[0], -1), dim=0, return_inverse=True)
    keys = [_route_key(u.reshape(rows.shape[1], rows.shape[2]).tolist()) for u in uniq]
    return inverse, keys


def composition_ids(factors: FactorInput) -> torch.Tensor:
    """Dense ids ``[N]`` of the factor tuples c: one id per distinct combination of labels."""
    if isinstance(factors, Mapping):
        if not factors:
            raise ValueError("routing_neff: pass at least one factor")
        columns = [torch.as_tensor(v).reshape(-1).long() for v in factors.values()]
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise ValueError(f"routing_neff: factors have different lengths {sorted(lengths)}")
        table = torch.stack(columns, dim=1)
    else:
        table = torch.as_tensor(factors).long()
        table = table.reshape(-1, 1) if table.dim() == 1 else table
    return torch.unique(table, dim=0, return_inverse=True)[1]


# ---------------------------------------------------------------------------------------------------------------------
# Built-in factor labels
# ---------------------------------------------------------------------------------------------------------------------
def frequency_buckets(token_ids: torch.Tensor, n_buckets: int = 4, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket of each token by the log frequency of its id, with equal token mass per bucket (0 = rarest).

    `counts` ``[vocab]`` gives corpus frequencies; by default they are counted on `token_ids` itself.
    """
    ids = token_ids.reshape(-1).long()
    if counts is None:
        counts = torch.bincount(ids)
    logf = torch.log(counts.double().clamp_min(1))[ids]
    if n_buckets <= 1 or ids.numel() == 0:
        return torch.zeros_like(ids)
    edges = torch.quantile(logf, torch.linspace(0, 1, n_buckets + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(logf, edges, right=True)


def position_buckets(positions: torch.Tensor, n_buckets: int = 4) -> torch.Tensor:
    """Log2 buckets of the position in the sequence: 0, 1-2, 3-6, 7-14, … (the last bucket takes the rest)."""
    pos = positions.reshape(-1).long()
    return torch.floor(torch.log2(pos.double() + 1)).long().clamp(max=n_buckets - 1)


def _per_token(value: torch.Tensor | Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sequence ``[B]`` (or per-token ``[B, T]``) label to the flattened valid tokens."""
    v = torch.as_tensor(value).long()
    if v.dim() == 1:
        v = v[:, None].expand_as(mask)
    return v[mask]


def token_factors(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  domain: torch.Tensor | Sequence[int] | None = None,
                  label: torch.Tensor | Sequence[int] | None = None, n_freq_buckets: int = 4,
                  n_pos_buckets: int = 4, token_counts: torch.Tensor | None = None,
                  extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-token factor labels over the valid tokens of ``input_ids [B, T]`` (flattened row-major).

    Built in: ``frequency`` and ``position`` buckets; ``domain`` and ``label`` when given per sequence ``[B]`` or per
    token ``[B, T]``; `extra` adds any other ``[B]`` / ``[B, T]`` labels.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    out = {"frequency": frequency_buckets(input_ids[mask], n_freq_buckets, token_counts),
           "position": position_buckets(positions[mask], n_pos_buckets)}
    for name, value in (("domain", domain), ("label", label), *((extra or {}).items())):
        if value is not None:
            out[name] = _per_token(value, mask)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# N_eff
# ---------------------------------------------------------------------------------------------------------------------
def _weighted_pearson(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    den = torch.sqrt((w * (x - mx) ** 2).sum() * (w * (y - my) ** 2).sum())
    return float(cov / den) if den > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).scatter_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype).scatter_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


@dataclass
class RouteNeff:
    """N_eff of every route of one adapter module, with token counts and (optionally) the paired loss increase.

    `loss_increase[r]` is the mean of ``loss_after − loss_before`` over the route's tokens that carry a loss
    (`loss_tokens[r]` of them; NaN where none).
    """

    routes: list[tuple]
    counts: torch.Tensor
    neff: torch.Tensor
    loss_increase: torch.Tensor | None = None
    loss_tokens: torch.Tensor | None = None

    def summary(self, min_tokens: int = 1) -> dict[str, float | int]:
        """Mass-weighted mean N_eff (all routes and routes with >= `min_tokens` tokens) and the N_eff/forgetting
        correlations across routes (mass-weighted Pearson, Spearman)."""
        counts = self.counts.double()
        total = counts.sum()
        keep = self.counts >= min_tokens
        out: dict[str, float | int] = {
            "tokens": int(total), "routes": len(self.routes), "min_tokens": min_tokens,
            "routes_with_min_tokens": int(keep.sum()),
            "neff_weighted": float((counts * self.neff).sum() / total) if total > 0 else float("nan"),
            "neff_weighted_min_tokens": (float((counts[keep] * self.neff[keep]).sum() / counts[keep].sum())
                                         if keep.any() else float("nan")),
            "neff_max": float(self.neff.max()) if len(self.neff) else float("nan"),
        }
        if self.loss_increase is not None:
            ok = keep & torch.isfinite(self.loss_increase)
            w = self.loss_tokens.double()
            out["loss_increase_weighted"] = (float((w[ok] * self.loss_increase[ok]).sum() / w[ok].sum())
                                             if ok.any() and w[ok].sum() > 0 else float("nan"))
            if int(ok.sum()) >= 3:
                x, y = self.neff[ok], self.loss_increase[ok]
                out["corr_neff_loss_increase"] = _weighted_pearson(x, y, w[ok])
                out["spearman_neff_loss_increase"] = _weighted_pearson(_ranks(x), _ranks(y), torch.ones_like(x))
            else:
                out["corr_neff_loss_increase"] = out["spearman_neff_loss_increase"] = float("nan")
        return out

    def table(self, limit: int | None = None) -> list[dict]:
        """Routes by decreasing token count, JSON-ready: route, tokens, n_eff (, loss_increase, loss_tokens)."""
        order = torch.argsort(self.counts, descending=True, stable=True)[:limit]
        rows = []
        for i in order.tolist():
            row = {"route": self.routes[i], "tokens": int(self.counts[i]), "n_eff": float(self.neff[i])}
            if self.loss_increase is not None:
                inc = float(self.loss_increase[i])
                row["loss_increase"] = inc if math.isfinite(inc) else None
                row["loss_tokens"] = int(self.loss_tokens[i])
            rows.append(row)
        return rows


def routing_neff(routes: torch.Tensor, factors: FactorInput, *, loss_before: torch.Tensor | None = None,
                 loss_after: torch.Tensor | None = None) -> RouteNeff:
    """Per-route ``N_eff(r) = 1 / Σ_c p(c|r)²`` over N tokens.

    Args:
        routes: ``[N]`` route ids, ``[N, k]`` LoRAMoE expert indices or ``[N, H, k]`` MH-MoE per-slice indices.
        factors: ``{name: [N] labels}`` or an ``[N, F]`` label table; c is the tuple of a token's labels.
        loss_before, loss_after: per-token old-task losses ``[N]`` before/after training the next task (NaN where a
            token has no loss); when both are given each route gets its mean loss increase.
    """
    rid, keys = route_ids(routes)
    cid = composition_ids(factors)
    if len(cid) != len(rid):
        raise ValueError(f"routing_neff: {len(rid)} routed tokens but {len(cid)} factor labels")
    n_routes, n_comp = len(keys), int(cid.max()) + 1 if len(cid) else 1
    counts = torch.bincount(rid, minlength=n_routes)
    pairs, pair_counts = torch.unique(rid * n_comp + cid, return_counts=True)
    pair_route = pairs // n_comp
    p = pair_counts.double() / counts[pair_route].double()
    purity = torch.zeros(n_routes, dtype=torch.float64).scatter_add_(0, pair_route, p * p)
    result = RouteNeff(keys, counts, 1.0 / purity)
    if (loss_before is None) != (loss_after is None):
        raise ValueError("routing_neff: pass both loss_before and loss_after, or neither")
    if loss_before is not None:
        delta = (loss_after.reshape(-1).double() - loss_before.reshape(-1).double())
        if len(delta) != len(rid):
            raise ValueError(f"routing_neff: {len(rid)} routed tokens but {len(delta)} losses")
        ok = torch.isfinite(delta)
        n_loss = torch.zeros(n_routes, dtype=torch.float64).scatter_add_(0, rid[ok], torch.ones_like(delta[ok]))
        sums = torch.zeros(n_routes, dtype=torch.float64).scatter_add_(0, rid[ok], delta[ok])
        result.loss_increase = torch.where(n_loss > 0, sums / n_loss.clamp_min(1), torch.full_like(sums, math.nan))
        result.loss_tokens = n_loss.long()
    return result


def layer_summary(per_layer: Mapping[str, RouteNeff], min_tokens: int = 1) -> dict:
    """Per-layer summaries and their mean over layers (each layer's N_eff is already mass-weighted)."""
    layers = {name: r.summary(min_tokens) for name, r in per_layer.items()}
    keys = [k for k, v in next(iter(layers.values()), {}).items() if isinstance(v, float)]
    mean = {}
    for key in keys:
        values = [v[key] for v in layers.values() if isinstance(v.get(key), float) and math.isfinite(v[key])]
        mean[key] = sum(values) / len(values) if values else float("nan")
    return {"layers": layers, "mean_over_layers": mean}


# ---------------------------------------------------------------------------------------------------------------------
# Collecting routes and per-token losses from a model
# ---------------------------------------------------------------------------------------------------------------------
def _batches(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int):
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for i in range(0, len(input_ids), batch_size):
        yield input_ids[i:i + batch_size], mask[i:i + batch_size]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_routes(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   batch_size: int = 16, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Routes ``[N, H, k]`` of every MH-MoE / LoRAMoE module over the valid tokens of ``input_ids [B, T]``."""
    from hf_lowbit.model_patches.mhmoe import record_routes

    device, out = _device(model), {}
    with record_routes(model, adapter_name) as sinks:
        for ids, mask in _batches(input_ids, attention_mask, batch_size):
            model(input_ids=ids.to(device), attention_mask=mask.long().to(device))
            for name, sink in sinks.items():
                out.setdefault(name, []).append(sink.pop()[mask.to(device)].cpu())
                sink.clear()
    return {name: torch.cat(chunks) for name, chunks in out.items()}


@torch.no_grad()
def token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, batch_size: int = 16) -> torch.Tensor:
    """Per-token next-token NLL ``[N]`` over the valid tokens (position t holds the loss of predicting t+1, the
    token its route at t produced). NaN where the next token is padding, absent or labelled -100."""
    device, out = _device(model), []
    labels = input_ids if labels is None else labels
    for i, (ids, mask) in enumerate(_batches(input_ids, attention_mask, batch_size)):
        lab = labels[i * batch_size:(i + 1) * batch_size].clone()
        lab[~mask] = -100
        logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.float()
        target = torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], -100)], dim=1).to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
        nll = torch.where(target >= 0, nll, torch.full_like(nll, math.nan))
        out.append(nll[mask.to(device)].cpu())
    return torch.cat(out)


__all__ = ["RouteNeff", "collect_routes", "composition_ids", "frequency_buckets", "layer_summary",
           "position_buckets", "route_ids", "routing_neff", "token_factors", "token_losses"]
