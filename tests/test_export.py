"""hf_lowbit.export → compressed-tensors packed FP4, validated by loading it with the compressed-tensors package."""

import json
import os
import warnings

import pytest
import torch

import hf_lowbit
from hf_lowbit import LowBitConfig, LowBitLinear
from hf_lowbit.export import FUSED_GROUPS, export
from hf_lowbit.numerics import dequantize, quantize

from conftest import load_checked, saved_tensors

ct = pytest.importorskip("compressed_tensors", reason="pip install 'hf-lowbit[export]'")


def _ct_scheme(path):
    """compressed-tensors' own parse of the exported config.json (schema check) and its compressor class."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = dict(json.loads((path / "config.json").read_text())["quantization_config"])
    for key in ("quant_method", "version", "sparsity_config", "transform_config"):
        qc.pop(key)
    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    return scheme, BaseCompressor.get_value_from_registry(config.format)


def _ct_weight(tensors, prefix, scheme, compressor) -> torch.Tensor:
    state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == prefix}
    return compressor.decompress(state, scheme)["weight"]


def _load_with_ct(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model already has a quantization_config": intended, dequantize=True
        warnings.simplefilter("ignore", UserWarning)
        model, info = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_compressed_tensors_round_trip_dense(fmt, tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode="infer", format=fmt, activations="none")).eval()
    report = export(model, tmp_path / "ct")
    assert report.ct_format == f"{fmt}-pack-quantized" and report.linears == 14
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors" and "auto_map" not in cfg
    assert sorted(cfg["quantization_config"]["ignore"]) == ["lm_head"]
    loaded = _load_with_ct(tmp_path / "ct")
    files = saved_tensors(tmp_path / "ct")
    changed = {r["module"] for r in report.requantized}
    assert bool(changed) == (fmt == "nvfp4")  # MXFP4 has no global scale: every layer is exact
    for name, m in model.named_modules():
        if not isinstance(m, LowBitLinear):
            continue
        assert files[f"{name}.weight_packed"].dtype == torch.uint8 and f"{name}.weight" not in files
        got = loaded.get_submodule(name).weight.float()
        if name in changed:  # one shared tensor scale for the fused group: a fresh RTN of the FP4 weight
            shared = files[f"{name}.weight_global_scale"].reciprocal().reshape(())
            p = quantize(m.dequantized_weight(), "nvfp4", 1, tensor_scale=shared)
            want = dequantize(p)
        else:
            want = m.dequantized_weight()
        assert torch.equal(got, want.to(torch.bfloat16).float()), name  # bit for bit (CT decodes to BF16)
    if fmt == "nvfp4":
        for layer in range(2):
            for group in FUSED_GROUPS[:2]:
                prefix = f"model.layers.{layer}.{'self_attn' if 'q_proj' in group else 'mlp'}"
                scales = {files[f"{prefix}.{leaf}.weight_global_scale"].item() for leaf in group}
                assert len(scales) == 1, (prefix, group)  # what vLLM needs for its fused GEMMs
        assert 0 < report.max_relative_change < 0.1
    ours = model.state_dict()
    for key, value in loaded.state_dict().items():  # every other tensor arrives unchanged
        if key.rsplit(".", 1)[0] not in {n for n, m in model.named_modules() if isinstance(m, LowBitLinear)}:
            assert torch.equal(value, ours[key]), key


def test_moe_experts_decompress_bit_for_bit(tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen2_moe"), LowBitConfig(mode="infer"))
    report = export(model, tmp_path / "ct")
    assert report.experts == 2
    files = saved_tensors(tmp_path / "ct")
    scheme, compressor = _ct_scheme(tmp_path / "ct")
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.dequantized_weights()
    inter = experts.intermediate_dim
    for e in range(experts.num_experts):
        prefix = f"model.layers.1.mlp.experts.{e}"
        for leaf, want in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e])):
            got = _ct_weight(files, f"{prefix}.{leaf}", scheme, compressor)
            assert torch.equal(got.float(), want.to(torch.bfloat16).float()), (e, leaf)
        assert files[f"{prefix}.gate_proj.weight_global_scale"] == files[f"{prefix}.up_proj.weight_global_scale"]
    assert not any(k.endswith(("_scale", "_proj")) and ".experts." in k and k.count(".") == 5 for k in files)
    assert "model.layers.0.mlp.shared_expert_gate.weight" in files  # high precision, listed in ignore
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == sorted(["lm_head"] + [f"model.layers.{i}.mlp.{m}" for i in range(2)
                                           for m in ("gate", "shared_expert_gate")])  # routers too (vLLM)


def test_train_model_exports_like_its_finalized_copy(tiny_model_dir, tmp_path):
    train = load_checked(tiny_model_dir("llama"), LowBitConfig())
    export(train, tmp_path / "a")
    export(hf_lowbit.finalize(train, inplace=False), tmp_path / "b")
    a, b = saved_tensors(tmp_path / "a"), saved_tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "compressed-tensors" in card and "vllm serve" in card and "import hf_lowbit" not in card


def test_errors(tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode="infer"))
    with pytest.raises(ValueError, match=r"export: format='gguf' is not supported; allowed: \['compressed-tensors'\]"):
        export(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match=r"export: fused_scales='max' is not valid; allowed: \['requantize', "):
        export(model, tmp_path / "x", fused_scales="max")
    with pytest.raises(ValueError, match=r"export: \['model.layers.0.self_attn.q_proj', .*\] are fused .*one NVFP4 "
                                         r"tensor scale.*allowed: fused_scales='requantize'"):
        export(model, tmp_path / "x", fused_scales="error")
    with pytest.raises(ValueError, match=r"export: the model is not an hf_lowbit model .*allowed: a model loaded"):
        export(load_checked(tiny_model_dir("qwen3")), tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"out_dir='.*full' exists and is not empty; allowed: a new or empty"):
        export(model, tmp_path / "full")
    with pytest.raises(PermissionError, match=r"out_dir='.*keep.txt/sub' is not writable"):
        export(model, tmp_path / "full" / "keep.txt" / "sub")
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    ds = load_checked(tiny_model_dir("deepseek_v2"), LowBitConfig(mode="infer", format="mxfp4"))
    with pytest.raises(ValueError, match=r"export: model.layers.\d.self_attn.kv_b_proj.in_features=16 is not a "
                                         r"multiple of the mxfp4 block size 32; allowed:"):
        export(ds, tmp_path / "ds")
