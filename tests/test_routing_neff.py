"""Route-wise N_eff: hand-built routing tables, built-in factor labels, and route/loss collection from a model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_lowbit.diagnostics.routing import (collect_routes, composition_ids, frequency_buckets, layer_summary,
                                           position_buckets, route_ids, routing_neff, token_factors, token_losses)
from hf_lowbit.model_patches.mhmoe import MHMoEConfig
from peft import get_peft_model

from conftest import tiny_config


def test_neff_on_a_hand_built_loramoe_table():
    # route {0,1}: compositions a a b b  -> p = (1/2, 1/2)      -> N_eff = 2
    # route {2,3}: a a a (indices given in both orders)         -> N_eff = 1
    # route {0,2}: a b c                                          -> N_eff = 3
    routes = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [2, 3], [3, 2], [2, 3], [0, 2], [2, 0], [0, 2]])
    comp = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 1, 2])
    before = torch.zeros(10, dtype=torch.float64)
    after = torch.tensor([1.0, 3.0, 1.0, 3.0, 0.5, 0.5, math.nan, 4.0, 5.0, 6.0], dtype=torch.float64)
    res = routing_neff(routes, {"c": comp}, loss_before=before, loss_after=after)
    by_route = {k: i for i, k in enumerate(res.routes)}
    assert set(by_route) == {(0, 1), (2, 3), (0, 2)}
    expect = {(0, 1): (4, 2.0, 2.0, 4), (2, 3): (3, 1.0, 0.5, 2), (0, 2): (3, 3.0, 5.0, 3)}
    for key, (count, neff, inc, n_loss) in expect.items():
        i = by_route[key]
        assert int(res.counts[i]) == count
        assert float(res.neff[i]) == pytest.approx(neff)
        assert float(res.loss_increase[i]) == pytest.approx(inc)
        assert int(res.loss_tokens[i]) == n_loss
    s = res.summary()
    assert s["tokens"] == 10 and s["routes"] == 3
    assert s["neff_weighted"] == pytest.approx((4 * 2 + 3 * 1 + 3 * 3) / 10)
    assert s["loss_increase_weighted"] == pytest.approx((4 * 2.0 + 2 * 0.5 + 3 * 5.0) / 9)
    assert s["corr_neff_loss_increase"] > 0.9 and s["spearman_neff_loss_increase"] == pytest.approx(1.0)
    # routes with fewer than 4 tokens are left out of the filtered mean
    assert res.summary(min_tokens=4)["neff_weighted_min_tokens"] == pytest.approx(2.0)
    assert res.table()[0]["route"] == (0, 1) and res.table()[0]["tokens"] == 4


def test_neff_on_mhmoe_per_slice_tuples_with_two_factors():
    # H=2 slices, top-1: route = (slice-0 expert, slice-1 expert)
    routes = torch.tensor([[[0], [1]], [[0], [1]], [[0], [1]], [[1], [1]], [[1], [1]]])
    domain = torch.tensor([0, 0, 1, 0, 0])
    label = torch.tensor([5, 5, 5, 7, 7])
    res = routing_neff(routes, {"domain": domain, "label": label})
    by_route = dict(zip(res.routes, res.neff.tolist()))
    # (0,1): compositions (0,5) (0,5) (1,5) -> p = (2/3, 1/3) -> 1 / (4/9 + 1/9) = 9/5
    assert by_route == {(0, 1): pytest.approx(9 / 5), (1, 1): pytest.approx(1.0)}
    # top-2 per slice: the route is the per-slice expert *set*
    ids, keys = route_ids(torch.tensor([[[0, 2], [1, 3]], [[2, 0], [3, 1]]]))
    assert ids.tolist() == [0, 0] and keys == [((0, 2), (1, 3))]
    # an [N, F] label table is the same as a dict of columns
    table = torch.stack([domain, label], dim=1)
    assert torch.equal(composition_ids(table), composition_ids({"d": domain, "l": label}))


def test_builtin_factor_labels():
    assert position_buckets(torch.arange(10), 4).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    ids = torch.tensor([5] * 6 + [7] * 3 + [9])
    buckets = frequency_buckets(ids, n_buckets=3)
    assert buckets[0] > buckets[6] > buckets[9]  # frequent tokens land in higher buckets
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    f = token_factors(input_ids, mask, domain=[0, 1], label=torch.tensor([[3, 3, 3, 3], [4, 4, 4, 4]]))
    assert f["domain"].tolist() == [0, 0, 0, 1, 1] and f["label"].tolist() == [3, 3, 3, 4, 4]
    assert f["position"].tolist() == [0, 1, 1, 0, 1] and len(f["frequency"]) == 5


def test_layer_summary_and_validation():
    routes = torch.tensor([0, 0, 1, 1])
    res = {"a": routing_neff(routes, {"c": torch.tensor([0, 1, 0, 0])}),
           "b": routing_neff(routes, {"c": torch.tensor([0, 0, 0, 0])})}
    summary = layer_summary(res)
    assert summary["layers"]["a"]["neff_weighted"] == pytest.approx(1.5)
    assert summary["mean_over_layers"]["neff_weighted"] == pytest.approx(1.25)
    with pytest.raises(ValueError, match="both"):
        routing_neff(routes, {"c": routes}, loss_before=torch.zeros(4))
    with pytest.raises(ValueError, match="factor labels"):
        routing_neff(routes, {"c": torch.zeros(3)})


def test_collect_routes_and_token_losses_from_a_peft_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3")).eval()
    model = get_peft_model(model, MHMoEConfig(num_heads=4, num_experts=4, top_k=2, r=2, init_weights=False)).eval()
    ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    routes = collect_routes(model, ids, mask, batch_size=2)
    assert len(routes) == 2 and all(r.shape == (int(mask.sum()), 4, 2) for r in routes.values())
    # batch composition and padding do not change the routes of valid tokens (causal attention, right padding)
    alone = collect_routes(model, ids[1:2, :7], batch_size=1)
    for name, r in routes.items():
        assert torch.equal(r[10:17].sort(-1).values, alone[name].sort(-1).values)
    losses = token_losses(model, ids[:1])
    with torch.no_grad():
        ref = model(ids[:1], labels=ids[:1]).loss
    assert torch.isnan(losses[-1]) and losses[:-1].mean().item() == pytest.approx(ref.item(), rel=1e-5)
    factors = token_factors(ids, mask, domain=[0, 1, 2])
    res = routing_neff(next(iter(routes.values())), factors)
    assert int(res.counts.sum()) == int(mask.sum())
