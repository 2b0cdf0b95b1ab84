"""Model cards written by save_pretrained of hf_lowbit models: content, Hub metadata, sizes, user READMEs."""

import copy
import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

import hf_lowbit
from hf_lowbit import LowBitConfig
from hf_lowbit.model_card import (MARKER, checkpoint_sizes, is_hf_lowbit_card, read_training_metrics,
                                  render_model_card, set_card_info)

from conftest import load_checked


def _saved_bytes(path) -> int:
    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_card_written_on_save(mode, tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig(mode=mode, format="mxfp4"))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert is_hf_lowbit_card(text) and MARKER in text
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"hf_lowbit", "fp4", "mxfp4", "quantized"} <= set(card.data.tags)
    for field, value in LowBitConfig(mode=mode, format="mxfp4").to_dict().items():
        assert f"| `{field}` | `{value}` |" in text, field
    for needle in ("pip install hf-lowbit", "import hf_lowbit", "from_pretrained", "2603.10444", "2602.12556",
                   "2602.12587", "`lm_head (weight)`", "`model.embed_tokens (weight)`",
                   "`model.layers.*.self_attn.q_proj (weight)`", "trust_remote_code=True"):
        assert needle in text, needle
    assert ("Packed MXFP4 inference checkpoint" in text) == (mode == "infer")
    assert ("size-mismatch error" in text) == (mode == "infer")


def test_sizes_match_the_saved_files(tiny_model_dir, tmp_path):
    train = load_checked(tiny_model_dir("qwen3_moe"), LowBitConfig())
    packed = hf_lowbit.finalize(train, inplace=False)  # deep copy: its own save hooks, bound to the copy
    train.save_pretrained(tmp_path / "train")
    packed.save_pretrained(tmp_path / "infer")
    s_train, s_packed = checkpoint_sizes(train), checkpoint_sizes(packed)
    assert s_train.checkpoint_bytes == _saved_bytes(tmp_path / "train")
    assert s_packed.checkpoint_bytes == s_packed.packed_bytes == _saved_bytes(tmp_path / "infer")
    assert s_train.packed_bytes == s_packed.packed_bytes and s_train.bf16_bytes == s_packed.bf16_bytes
    # 4-bit codes + one E4M3 byte per 16 weights + 4 bytes of tensor scale per matrix, against 16 bits
    assert s_packed.fp4_ratio == pytest.approx((0.5 + 1 / 16) / 2, rel=0.02)
    assert "| `mode` | `infer` |" in (tmp_path / "infer" / "README.md").read_text()
    assert "`model.layers.*.mlp.experts (down_proj, gate_up_proj)`" in (tmp_path / "infer" / "README.md").read_text()


def test_meta_model_sizes_equal_real_ones(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    real = load_checked(tiny_model_dir("qwen2_moe"), LowBitConfig(mode="infer"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir("qwen2_moe")))
    hf_lowbit.convert(meta, LowBitConfig(mode="infer"))
    assert checkpoint_sizes(meta) == checkpoint_sizes(real)


def test_existing_user_readme_is_kept_and_ours_is_replaced(tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
    (tmp_path / "README.md").write_text("# my own notes\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own notes\n"
    (tmp_path / "README.md").write_text(f"old card\n{MARKER}\n")
    model.save_pretrained(tmp_path)
    assert "## Format and recipe" in (tmp_path / "README.md").read_text()


def test_metrics_base_model_and_hub_metadata(tiny_model_dir, tmp_path):
    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
    set_card_info(model, base_model="Qwen/Qwen3-0.6B", metrics={"eval_loss": 2.5}, license="apache-2.0")
    (tmp_path / "all_results.json").write_text(json.dumps({"train_loss": 3.25, "epoch": 1.0, "note": "x"}))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"
    text = str(card)
    assert "| eval_loss | 2.5 |" in text and "| train_loss | 3.25 |" in text and "note" not in text
    clone = copy.deepcopy(model)  # card facts travel with copies
    assert "Qwen/Qwen3-0.6B" in str(render_model_card(clone))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['loss'\]; allowed: \['base_model'"):
        set_card_info(model, loss=1.0)


def test_metrics_from_trainer_state(tmp_path):
    state = {"log_history": [{"loss": 4.0, "step": 10}, {"eval_loss": 3.5, "step": 10}, {"loss": 3.0, "step": 20}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert read_training_metrics(tmp_path) == {"loss": 3.0, "eval_loss": 3.5, "step": 20}


def test_render_refuses_float_models(tiny_model_dir):
    with pytest.raises(ValueError, match="no hf_lowbit LowBitConfig"):
        render_model_card(load_checked(tiny_model_dir("qwen3")))


def test_save_hooks_survive_pickle_and_deepcopy(tiny_model_dir, tmp_path):
    import pickle

    model = load_checked(tiny_model_dir("qwen3"), LowBitConfig())
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert clone.save_pretrained.model is clone and clone.push_to_hub.model is clone
    clone.save_pretrained(tmp_path)
    assert is_hf_lowbit_card((tmp_path / "README.md").read_text())
