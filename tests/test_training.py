"""Trainer full-parameter QAT on a mode='train' model, and PEFT LoRA on a packed mode='infer' base."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_lowbit
from hf_lowbit import LowBitConfig, LowBitLinear


class RepeatingText(torch.utils.data.Dataset):
    """A few fixed random sequences: a model that learns should drive their loss down fast."""

    def __init__(self, n=8, length=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, steps, lr):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             lr_scheduler_type="constant", seed=0)


def _eval_loss(model, data):
    batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    with torch.no_grad():
        return model(batch, labels=batch).loss.item()


def test_trainer_qat_loss_decreases(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), quantization_config=LowBitConfig())
    data = RepeatingText()
    before = _eval_loss(model, data)
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    Trainer(model=model, args=_args(tmp_path, 30, 3e-3), train_dataset=data).train()
    after = _eval_loss(model, data)
    assert after < before - 0.5, (before, after)
    assert not torch.equal(w0, model.model.layers[0].mlp.down_proj.weight)  # master weights were trained


def test_trainer_refuses_full_training_of_a_packed_model(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"),
                                                 quantization_config=LowBitConfig(mode="infer"))
    assert not model.hf_quantizer.is_qat_trainable
    with pytest.raises(ValueError):
        Trainer(model=model, args=_args(tmp_path, 1, 1e-3), train_dataset=RepeatingText())


def test_lora_on_packed_base_trains_saves_reloads_and_merges(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LowBitConfig(mode="infer", activations="none")
    path = tiny_model_dir("qwen3")
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    packed_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    data = RepeatingText()
    before = _eval_loss(model, data)
    Trainer(model=model, args=_args(tmp_path / "run", 30, 1e-2), train_dataset=data).train()
    after = _eval_loss(model, data)
    assert after < before - 0.3, (before, after)
    for n, p in base.named_parameters():  # the packed base did not move
        if "lora_" not in n:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, packed_before[key]), n

    batch = torch.stack([data[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        logits = model(batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg), tmp_path / "adapter")
    assert isinstance(reloaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer, LowBitLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, logits)  # bit-identical through PEFT save/load

    # merge: dequantize → add the LoRA delta → requantize; unmerge restores the packed weights exactly
    q = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    codes = q.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = hf_lowbit.numerics.quantize(q.base_layer.dequantized_weight() + q.get_delta_weight("default"))
    reloaded.merge_adapter()
    assert q.base_layer.weight.dtype == torch.uint8 and not torch.equal(q.base_layer.weight, codes)
    assert torch.equal(q.base_layer.weight, expected.codes) and torch.equal(q.base_layer.weight_scale,
                                                                          expected.scales)
    with torch.no_grad():
        merged = reloaded(batch).logits
    assert torch.isfinite(merged).all() and not torch.equal(merged, logits)  # lossy: the sum is re-rounded
    reloaded.unmerge_adapter()
    assert torch.equal(q.base_layer.weight, codes)
    plain = reloaded.merge_and_unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, LowBitLinear)


def test_gradient_checkpointing_and_finalize_copy(tiny_model_dir, tmp_path):
    cfg = LowBitConfig(stochastic_rounding="none")  # SR streams advance per call; RTN makes runs comparable
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), quantization_config=cfg)
    data = RepeatingText()
    batch = torch.stack([data[i]["input_ids"] for i in range(4)])
    model.train()
    model(batch, labels=batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(batch, labels=batch).loss.backward()
    for n, p in model.named_parameters():  # RTN activations: recomputation reproduces the forward exactly
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-5), n
    packed = hf_lowbit.finalize(model, inplace=False)
    assert model.model.layers[0].mlp.up_proj.mode == "train"
    assert model.config.quantization_config.mode == "train"
    assert packed.model.layers[0].mlp.up_proj.mode == "infer"
    assert packed.config.quantization_config.mode == "infer"
