import json

import pytest

from hf_lowbit import LowBitConfig
from hf_lowbit.config import module_matches


def test_defaults_and_json_round_trip():
    cfg = LowBitConfig(format="mxfp4", mode="infer", hadamard=True, weight_blocks="2d", seed=3,
                       modules_to_not_convert=["lm_head", "layers.0.mlp"])
    d = json.loads(cfg.to_json_string())
    assert d["quant_method"] == "hf_lowbit"
    again = LowBitConfig.from_dict(d)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert LowBitConfig().format == "nvfp4" and LowBitConfig().mode == "train"


def test_recipe_reflects_switches():
    r = LowBitConfig(mean_center=True, mean_center_gradients=False, stochastic_rounding="all").recipe()
    assert r.center_activations and not r.center_gradients
    assert r.sr_weights and r.sr_activations and r.sr_gradients
    r = LowBitConfig(stochastic_rounding="gradients").recipe()
    assert not r.sr_weights and not r.sr_activations and r.sr_gradients
    r = LowBitConfig(stochastic_rounding="none", mean_center=False).recipe()
    assert not (r.sr_gradients or r.center_activations or r.center_gradients)


@pytest.mark.parametrize("field,value,allowed", [
    ("format", "fp4", "nvfp4"), ("mode", "eval", "train"), ("stochastic_rounding", "yes", "gradients"),
    ("block_axis", "first", "reduction"), ("weight_blocks", "3d", "2d"), ("activations", "int8", "fp4"),
    ("backend", "cuda", "triton"), ("mx_scale", "round", "ceil"), ("moe", "dense", "None"),
    ("sd_init", "random", "preserve"), ("mean_center", "yes", "True or False"),
    ("mean_center_activations", 1.5, "None, True or False"), ("seed", -1, "integer >= 0"),
    ("sd_rank", 0, "integer >= 1"), ("sd_refresh_every", 2.5, "integer >= 1"),
    ("modules_to_not_convert", "lm_head", "list"),
])
def test_every_field_is_validated(field, value, allowed):
    with pytest.raises(ValueError) as err:
        LowBitConfig(**{field: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and allowed in msg


def test_cross_field_rules_and_unknown_fields():
    with pytest.raises(ValueError, match="hadamard.*block_axis='reduction'"):
        LowBitConfig(hadamard=True, block_axis="last")
    with pytest.raises(ValueError, match="activations='none'.*mode='train'"):
        LowBitConfig(activations="none")
    with pytest.raises(ValueError, match="unknown field.*'formatt'"):
        LowBitConfig(formatt="nvfp4")
    cfg = LowBitConfig()
    with pytest.raises(ValueError, match="block_axis='diag'"):
        cfg.block_axis = "diag"  # assignments after construction are validated too


def test_module_patterns_match_whole_components():
    pats = ["mlp.gate", "lm_head"]
    assert module_matches("model.layers.0.mlp.gate", pats)
    assert not module_matches("model.layers.0.mlp.gate_proj", pats)
    assert module_matches("lm_head", pats)
    assert module_matches("model.layers.1", ["layers.1"]) and not module_matches("model.layers.11.x", ["layers.1"])
