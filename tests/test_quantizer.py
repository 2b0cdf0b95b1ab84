"""from_pretrained with LowBitConfig: module swap, quantize-on-load, save → reload, sizes, errors."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import hf_lowbit
from conftest import load_checked
from hf_lowbit import LowBitConfig, LowBitLinear

ALL_KINDS = ["qwen3", "llama", "qwen3_moe", "qwen2_moe"]


def _load(path, cfg=None, **kw):
    return load_checked(path, cfg, **kw)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_decoder_linear_is_swapped_except_skips(kind, tiny_model_dir):
    model = _load(tiny_model_dir(kind), LowBitConfig())
    plain = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.startswith("model.layers.")]
    assert all(n.endswith("shared_expert_gate") for n in plain), plain  # only the configured skip remains
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    swapped = [n for n, m in model.named_modules() if isinstance(m, LowBitLinear)]
    assert any(n.endswith("self_attn.q_proj") for n in swapped) and any(n.endswith("o_proj") for n in swapped)
    if kind.endswith("moe"):
        router = model.model.layers[0].mlp.gate
        assert not isinstance(router, LowBitLinear) and router.weight.dtype == torch.float32
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable


def test_modules_to_not_convert_is_honoured(tiny_model_dir):
    cfg = LowBitConfig(modules_to_not_convert=["lm_head", "layers.1", "self_attn.v_proj"])
    model = _load(tiny_model_dir("qwen3"), cfg)
    layer0, layer1 = model.model.layers
    assert isinstance(layer0.self_attn.q_proj, LowBitLinear)
    assert type(layer0.self_attn.v_proj) is nn.Linear
    assert not any(isinstance(m, LowBitLinear) for m in layer1.modules())


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_train_finalize_save_reload_identical_logits(kind, fmt, tiny_model_dir, tmp_path, input_ids):
    model = _load(tiny_model_dir(kind), LowBitConfig(format=fmt))
    model.eval()
    with torch.no_grad():
        train_logits = model(input_ids).logits
    # a mode="train" checkpoint keeps master weights, so training resumes from exactly where it was
    model.save_pretrained(tmp_path / "train")
    resumed = _load(tmp_path / "train").eval()
    assert resumed.config.quantization_config.mode == "train"
    assert resumed.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(resumed(input_ids).logits, train_logits)

    hf_lowbit.finalize(model)
    with torch.no_grad():
        infer_logits = model(input_ids).logits
    assert torch.equal(infer_logits, train_logits)  # W4A4 packed forward == QAT forward (RTN)
    model.save_pretrained(tmp_path / "infer")
    saved_cfg = json.loads((tmp_path / "infer" / "config.json").read_text())["quantization_config"]
    assert saved_cfg["quant_method"] == "hf_lowbit" and saved_cfg["mode"] == "infer"
    reloaded = _load(tmp_path / "infer").eval()  # no quantization_config: read from config.json
    q = reloaded.model.layers[0].self_attn.q_proj
    assert q.mode == "infer" and q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, infer_logits)


@pytest.mark.parametrize("activations", ["fp4", "none"])
def test_quantize_on_load_equals_finalize(activations, tiny_model_dir, input_ids):
    path = tiny_model_dir("llama")
    on_load = _load(path, LowBitConfig(mode="infer", activations=activations)).eval()
    trained = hf_lowbit.finalize(_load(path, LowBitConfig()))
    trained.config.quantization_config.activations = activations
    for m in trained.modules():
        if isinstance(m, LowBitLinear):
            m.recipe = trained.config.quantization_config.recipe()
    for (n1, p1), (n2, p2) in zip(on_load.state_dict().items(), trained.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        assert torch.equal(on_load(input_ids).logits, trained.eval()(input_ids).logits)
    if activations == "none":  # W4A16 is the float model with dequantized weights
        ref = _load(path).eval()
        for name, m in on_load.named_modules():
            if isinstance(m, LowBitLinear):
                ref.get_submodule(name).weight.data = m.dequantized_weight()
        with torch.no_grad():
            assert torch.allclose(on_load(input_ids).logits, ref(input_ids).logits, atol=1e-5)


@pytest.mark.parametrize("fmt,limit", [("nvfp4", 0.29), ("mxfp4", 0.27)])
def test_packed_checkpoint_size(fmt, limit, tmp_path):
    from transformers import Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = _load(tmp_path / "bf16", LowBitConfig(format=fmt, mode="infer"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "fp4")

    def linear_bytes(path):
        total = 0
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            for key in f.keys():
                if ".layers." in key and "norm" not in key:
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
        return total

    ratio = linear_bytes(tmp_path / "fp4") / linear_bytes(tmp_path / "bf16")
    expected = (0.5 + 1 / {"nvfp4": 16, "mxfp4": 32}[fmt]) / 2  # 4 bits + one scale byte per block, vs 16 bits
    assert ratio <= limit and ratio == pytest.approx(expected, rel=0.01)


def test_dtype_and_environment_errors(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(), dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='triton' needs a CUDA GPU"):
            AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(backend="triton"))
    with pytest.raises(ValueError, match="disk offload"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(),
                                             device_map={"": "disk"})


def test_convert_in_memory_model_and_dequantize(tiny_model_dir, input_ids, tmp_path):
    ref = _load(tiny_model_dir("qwen3")).eval()
    loaded = _load(tiny_model_dir("qwen3"), LowBitConfig()).eval()
    converted = hf_lowbit.convert(_load(tiny_model_dir("qwen3")), LowBitConfig()).eval()
    with torch.no_grad():
        assert torch.equal(converted(input_ids).logits, loaded(input_ids).logits)
        assert not torch.equal(converted(input_ids).logits, ref(input_ids).logits)
    with pytest.raises(ValueError, match="already quantized"):
        hf_lowbit.convert(converted)
    converted.save_pretrained(tmp_path / "c")
    assert isinstance(_load(tmp_path / "c").model.layers[0].mlp.up_proj, LowBitLinear)
    hf_lowbit.finalize(converted)
    with torch.no_grad():
        packed_logits = converted(input_ids).logits
    plain = converted.dequantize()
    assert not any(isinstance(m, LowBitLinear) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    w = plain.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.float32 and torch.equal(hf_lowbit.numerics.fake_quantize(w), w)
    with torch.no_grad():
        assert packed_logits.shape == plain(input_ids).logits.shape
