"""`hf-lowbit demo`: the whole user journey on embedded data, in minutes on a CPU.

1. Train a byte-level BPE tokenizer on the Shakespeare text shipped in the package and build a tiny Qwen3-style
   model (random init), saved as an ordinary Hugging Face checkpoint.
2. Train it with `transformers.Trainer` twice from the same init on the same token stream: once in high precision
   (BF16 on a GPU, FP32 on a CPU) and once loaded with `quantization_config=hf_lowbit.LowBitConfig()` (NVFP4
   W4A4G4 with Averis mean-centring).
3. Report both held-out losses, `hf_lowbit.finalize` the FP4 model, save it, reload it with plain
   `from_pretrained` (no config), check the logits are identical, and generate a line of text.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

DATA_FILES = ("macbeth.txt", "sonnets.txt")


@dataclass
class DemoResult:
    """What the demo measured (also printed)."""

    baseline_loss: float
    lowbit_loss: float
    checkpoint: str
    checkpoint_bytes: int
    sample: str
    device: str


def demo_text() -> str:
    """The embedded demo corpus (public-domain Shakespeare)."""
    root = resources.files("hf_lowbit.data")
    return "\n\n".join(root.joinpath(name).read_text(encoding="utf-8") for name in DATA_FILES)


def train_tokenizer(text: str, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `text` (no download), as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of a token stream as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        n = (len(ids) // block) * block
        self.blocks = ids[:n].reshape(-1, block)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tiny_qwen3_config(vocab_size: int, hidden: int = 128, layers: int = 4):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def held_out_loss(model, data: TokenBlocks, batch_size: int = 16) -> float:
    """Mean next-token loss over the evaluation blocks."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids = data.blocks[i: i + batch_size].to(device)
            losses.append(model(ids, labels=ids).loss.float().item() * len(ids))
    return sum(losses) / len(data)


def _train(model, train: TokenBlocks, out: Path, steps: int, batch_size: int, lr: float, bf16: bool):
    """Train with `transformers.Trainer`; returns the model with Accelerate's autocast wrapper removed."""
    from accelerate.utils import extract_model_from_parallel
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], seed=0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, log_level="error", disable_tqdm=False)
    Trainer(model=model, args=args, train_dataset=train).train()
    # With bf16=True Accelerate wraps model.forward in autocast, and the wrapper stays on the object: unwrap so
    # that evaluation and the reload check compare the same (full-precision) computation.
    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output_dir={str(out)!r} exists and is not empty; pass --overwrite to replace it "
                                  "or choose another --output-dir (nothing was changed)")
    if out.exists() and not os.access(out, os.W_OK):
        raise PermissionError(f"output_dir={str(out)!r} is not writable")


def run_demo(output_dir: str = "hf_lowbit_demo", steps: int = 200, batch_size: int = 8, block: int = 128,
             lr: float = 2e-3, overwrite: bool = False, fmt: str = "nvfp4") -> DemoResult:
    """Run the demo; returns the measured losses and where the packed checkpoint is."""
    import hf_lowbit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, value, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("block", block, 8)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}={value!r} is not valid; allowed: an integer >= {lo}")
    if not (isinstance(lr, float) and 0 < lr < 1):
        raise ValueError(f"lr={lr!r} is not valid; allowed: a float in (0, 1)")
    hf_lowbit.LowBitConfig(format=fmt)  # validates the format name before any work
    out = Path(output_dir).resolve()
    _check_output_dir(out, overwrite)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    t0 = time.time()

    print(f"[1/4] tokenizer + tiny Qwen3-style model (device: {device})")
    text = demo_text()
    tokenizer = train_tokenizer(text)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    split = int(len(ids) * 0.95)
    train, held_out = TokenBlocks(ids[:split], block), TokenBlocks(ids[split:], block)
    torch.manual_seed(0)
    base_dir = out / "init"
    AutoModelForCausalLM.from_config(tiny_qwen3_config(len(tokenizer))).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    print(f"      {len(ids):,} tokens ({len(train)} train / {len(held_out)} held-out blocks of {block})")

    precision = "BF16" if bf16 else "FP32"
    print(f"[2/4] training in {precision} ({steps} steps)")
    model = AutoModelForCausalLM.from_pretrained(base_dir).to(device)
    model = _train(model, train, out / "runs" / "baseline", steps, batch_size, lr, bf16)
    baseline_loss = held_out_loss(model, held_out)
    del model

    print(f"[3/4] training with LowBitConfig(format={fmt!r}) — W4A4G4 + Averis ({steps} steps)")
    cfg = hf_lowbit.LowBitConfig(format=fmt)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg).to(device)
    model = _train(model, train, out / "runs" / fmt, steps, batch_size, lr, bf16)
    lowbit_loss = held_out_loss(model, held_out)

    print("[4/4] finalize → save → reload with plain from_pretrained → generate")
    hf_lowbit.finalize(model)
    ckpt = out / f"{fmt}-model"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    probe = held_out.blocks[:2].to(device)
    with torch.no_grad():
        before = model(probe).logits
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        same = torch.equal(reloaded(probe).logits, before)
        prompt = tok("MACBETH.\n", return_tensors="pt").to(device)
        torch.manual_seed(0)
        gen = reloaded.generate(**prompt, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8,
                                pad_token_id=tok.pad_token_id)
    sample = tok.decode(gen[0], skip_special_tokens=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    shutil.rmtree(out / "runs", ignore_errors=True)

    gap = 100 * (lowbit_loss - baseline_loss) / baseline_loss
    print("\n" + "=" * 72)
    print(f"held-out loss  {precision:>5}: {baseline_loss:.4f}   (perplexity {math.exp(baseline_loss):.1f})")
    print(f"held-out loss  {fmt.upper():>5}: {lowbit_loss:.4f}   (perplexity {math.exp(lowbit_loss):.1f}, "
          f"gap {gap:+.2f}%)")
    print(f"reloaded packed checkpoint gives identical logits: {same}")
    print(f"sample: {sample!r}")
    print(f"packed checkpoint: {ckpt}  ({size / 1e6:.2f} MB safetensors)")
    print(f"reload it with:  import hf_lowbit; AutoModelForCausalLM.from_pretrained({str(ckpt)!r})")
    print(f"total time {time.time() - t0:.0f} s")
    if not same:
        raise RuntimeError("reloaded checkpoint does not reproduce the finalized model's logits")
    return DemoResult(baseline_loss, lowbit_loss, str(ckpt), size, sample, device)
