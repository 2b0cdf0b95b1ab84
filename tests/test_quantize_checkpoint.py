"""hf-lowbit quantize: shard-by-shard conversion equal to from_pretrained + save_pretrained, memory, errors."""

import argparse
import importlib
import json
import os
import re
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from hf_lowbit import LowBitConfig, LowBitLinear
from hf_lowbit.quantize_checkpoint import cli_quantize, quantize_checkpoint

from conftest import load_checked, saved_tensors, tiny_config
from hub_server import HubServer


def _sharded(kind, root, dtype=torch.float32, max_shard_size="40KB"):
    """A tiny random checkpoint split into several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(kind)).to(dtype).save_pretrained(root, max_shard_size=max_shard_size)
    assert (root / "model.safetensors.index.json").is_file()
    return root


@pytest.mark.parametrize("kind,dtype,options", [
    ("qwen3", torch.float32, {}),
    ("qwen3_moe", torch.bfloat16, {"format": "mxfp4"}),
    ("qwen2_moe", torch.float32, {"weight_blocks": "2d", "activations": "none", "mean_center": False,
                                  "modules_to_not_convert": ["lm_head", "mlp.gate", "shared_expert_gate", "o_proj"]}),
])
def test_equals_from_pretrained_then_save_pretrained(kind, dtype, options, tmp_path):
    src = _sharded(kind, tmp_path / "src", dtype)
    report = quantize_checkpoint(src, tmp_path / "out", verify=False, chunk_elements=1000, **options)
    assert report.input_shards > 2 and report.output_shards > 1
    ref = load_checked(src, LowBitConfig(mode="infer", **options))
    ref.save_pretrained(tmp_path / "ref")
    ours, theirs = saved_tensors(tmp_path / "out"), saved_tensors(tmp_path / "ref")
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # same names, dtypes and bits: *.weight uint8 codes, *.weight_scale, *.weight_tensor_scale
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "out" / name).read_text()) == json.loads((tmp_path / "ref" / name).read_text())
    assert report.linears == sum(isinstance(m, LowBitLinear) for m in ref.modules())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert set(index["weight_map"].values()) <= set(os.listdir(tmp_path / "out"))


def test_verification_card_and_reload(tiny_model_dir, tmp_path, input_ids):
    report = quantize_checkpoint(tiny_model_dir("qwen3"), tmp_path / "out")
    err = report.logit_error
    assert err.prompts == 3 and err.tokens == 48 and 0 < err.rel_rms < 0.5 and 0 < err.max_abs and \
        0.5 < err.top1_agreement <= 1
    assert report.size_ratio < 0.35 and "logit error vs the float model" in report.summary()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Verification" in card and f"{err.rel_rms:.4f}" in card and "| `mode` | `infer` |" in card
    model = load_checked(tmp_path / "out")
    assert isinstance(model.model.layers[1].mlp.down_proj, LowBitLinear)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def _rss() -> dict[str, int]:
    status = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux peak-RSS reset")
def test_peak_memory_below_checkpoint_size(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=6, head_dim=64,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src", max_shard_size="1MB")
    total = sum(p.stat().st_size for p in (tmp_path / "src").glob("*.safetensors"))
    quantize_checkpoint(tiny_model_dir("llama"), tmp_path / "warm", verify=False)  # one-time allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak RSS (VmHWM)
    before = _rss()["VmRSS"]
    report = quantize_checkpoint(tmp_path / "src", tmp_path / "out", verify=False, chunk_elements=1 << 16)
    peak = _rss()["VmHWM"] - before
    print(f"\npeak RSS increase {peak / 1e6:.1f} MB while converting {total / 1e6:.1f} MB in "
          f"{report.input_shards} shards ({report.output_bytes / 1e6:.1f} MB out)")
    assert report.input_shards >= 8 and peak < total / 2


def test_from_hub_id_and_push(tmp_path, monkeypatch):
    with HubServer() as hub:
        url = hub.url
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        api = huggingface_hub.HfApi(endpoint=url)
        api.create_repo("org/float")
        api.upload_folder(repo_id="org/float", folder_path=str(_sharded("llama", tmp_path / "src")))
        report = quantize_checkpoint("org/float", tmp_path / "out", verify=False, push_to="org/float-nvfp4")
        files = hub.files("org/float-nvfp4")
    assert report.pushed_to == "org/float-nvfp4" and report.output_shards > 1
    for name in os.listdir(tmp_path / "out"):
        assert files[name] == (tmp_path / "out" / name).read_bytes()
    card = files["README.md"].decode()
    assert "base_model: org/float" in card and 'from_pretrained("org/float-nvfp4")' in card


def test_cli_entry_point(tiny_model_dir, tmp_path, capsys):
    args = argparse.Namespace(src=tiny_model_dir("qwen3_moe"), out=str(tmp_path / "o"), format="nvfp4",
                              activations="fp4", no_mean_center=False, weight_blocks="1d", mx_scale="floor",
                              modules_to_not_convert=None, dtype=None, overwrite=False, no_verify=True, push_to=None,
                              private=False, token=None, revision=None)
    assert cli_quantize(args) == 0
    assert "2 MoE expert blocks packed" in capsys.readouterr().out


# -- errors: field, value and what is allowed; nothing saved is lost ------------------------------------------------

@pytest.fixture
def existing_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def _untouched(out):
    assert (out / "keep.txt").read_text() == "precious" and os.listdir(out) == ["keep.txt"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("options,match", [
    ({"mode": "train"}, r"quantize: mode='train' is not valid; allowed: 'infer'"),
    ({"moe": "sd"}, r"quantize: moe='sd' is not valid; allowed: None"),
    ({"hadamard": True, "block_axis": "last"}, r"LowBitConfig: hadamard=True is not valid; allowed: False when"),
    ({"format": "int4"}, r"LowBitConfig: format='int4' is not valid; allowed: \['mxfp4', 'nvfp4'\]"),
    ({"dtype": "int8"}, r"quantize: dtype='int8' is not valid; allowed: 'float32'"),
    ({"push_to": "bad id!"}, r"quantize: push_to='bad id!' is not a valid Hub repo id; allowed:"),
])
def test_conflicting_or_invalid_options(options, match, tiny_model_dir, existing_out):
    with pytest.raises(ValueError, match=match):
        quantize_checkpoint(tiny_model_dir("qwen3"), existing_out, overwrite=True, **options)
    _untouched(existing_out)


def test_bad_sources(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"quantize: src='no such/repo!!' is not a valid Hub repo id; allowed:"):
        quantize_checkpoint("no such/repo!!", tmp_path / "o")
    with pytest.raises(ValueError, match=r"src='\./missing' is not a directory; allowed: a checkpoint folder or"):
        quantize_checkpoint("./missing", tmp_path / "o")
    with HubServer() as hub:  # a well-formed id that does not exist
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
            with pytest.raises(ValueError, match=r"src='me/absent' could not be downloaded .*RepositoryNotFound"):
                quantize_checkpoint("me/absent", tmp_path / "o")
    (tmp_path / "bin").mkdir()
    shutil.copy(os.path.join(tiny_model_dir("qwen3"), "config.json"), tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"quantize: src=.* has no model.safetensors .*\['pytorch_model.bin'\]\); "
                                         r"allowed: a safetensors checkpoint"):
        quantize_checkpoint(tmp_path / "bin", tmp_path / "o")
    quantize_checkpoint(tiny_model_dir("qwen3"), tmp_path / "q", verify=False)
    with pytest.raises(ValueError, match=r"is already quantized \(quantization_config.quant_method='hf_lowbit'\); "
                                         r"allowed: a float checkpoint"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unsupported_model_type(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=64).save_pretrained(tmp_path / "t5")
    save_file({"shared.weight": torch.zeros(64, 32)}, str(tmp_path / "t5" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"quantize: model_type='t5' is not supported .*allowed: causal language"):
        quantize_checkpoint(tmp_path / "t5", tmp_path / "o")
    cfg = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    with pytest.raises(ValueError, match=r"quantize: model_type='no_such_model' \(src=.*\) is not known to "
                                         r"transformers .*; allowed: causal"):
        quantize_checkpoint(tmp_path / "t5", tmp_path / "o")


def test_output_errors(tiny_model_dir, existing_out, tmp_path):
    src = tiny_model_dir("qwen3")
    with pytest.raises(FileExistsError, match=r"out='.*out' exists and is not empty; allowed: a new or empty "
                                              r"folder, or overwrite=True"):
        quantize_checkpoint(src, existing_out)
    _untouched(existing_out)
    with pytest.raises(ValueError, match=r"out='.*keep.txt' is a file; allowed: a new folder"):
        quantize_checkpoint(src, existing_out / "keep.txt")
    with pytest.raises(PermissionError, match=r"out='.*keep.txt/sub' is not writable .*; allowed: a path in a "
                                              r"writable folder"):
        quantize_checkpoint(src, existing_out / "keep.txt" / "sub")
    with pytest.raises(ValueError, match=r"is the source folder or inside it; allowed: a separate folder"):
        quantize_checkpoint(src, os.path.join(src, "packed"))
    _untouched(existing_out)


def test_failure_midway_keeps_existing_output(tiny_model_dir, existing_out, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("verification failed")

    monkeypatch.setattr(importlib.import_module("hf_lowbit.quantize_checkpoint"), "verify_logits", boom)
    with pytest.raises(RuntimeError, match="verification failed"):
        quantize_checkpoint(tiny_model_dir("qwen3"), existing_out, overwrite=True)
    _untouched(existing_out)
    monkeypatch.undo()
    quantize_checkpoint(tiny_model_dir("qwen3"), existing_out, overwrite=True, verify=False)
    assert not (existing_out / "keep.txt").exists() and (existing_out / "model.safetensors").is_file()
    assert not [p for p in existing_out.parent.iterdir() if p.name.startswith(".out.")]
