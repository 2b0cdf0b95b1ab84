"""`hf-lowbit diagnose`: mean-bias report of a checkpoint on a text, as JSON plus PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def run_diagnose(model_path: str, text_file: str | None, output_dir: str, tokens: int = 2048, block: int = 256,
                 gradients: bool = False, overwrite: bool = False) -> dict:
    """Load `model_path` (float or hf_lowbit checkpoint, with its tokenizer), run `mean_bias` on `tokens` tokens of
    `text_file` (default: the packaged demo text) and write ``mean_bias.json``, ``summary.json`` and plots."""
    import hf_lowbit  # noqa: F401  (registers the quantizer before from_pretrained)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo import demo_text
    from .diagnostics import mean_bias, summarize

    for name, value, lo in (("tokens", tokens, 16), ("block", block, 8)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name}={value!r} is not valid; allowed: an integer >= {lo}")
    if not Path(model_path).exists():
        raise ValueError(f"model={model_path!r} is not a local checkpoint directory")
    if text_file is not None and not Path(text_file).is_file():
        raise ValueError(f"text={text_file!r} is not a readable file")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir={output_dir!r} exists and is not empty; pass --overwrite")
    text = Path(text_file).read_text(encoding="utf-8") if text_file else demo_text()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ids = torch.tensor(tokenizer(text)["input_ids"][:tokens], dtype=torch.long)
    n = (len(ids) // block) * block
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one block of {block}")
    batch = {"input_ids": ids[:n].reshape(-1, block).to(device)}
    if gradients:
        batch["labels"] = batch["input_ids"]
    results = mean_bias(model, batch, gradients=gradients, keep_projections=True)
    summary = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mean_bias.json").write_text(json.dumps(results, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        from .diagnostics.plots import plot_mean_bias

        plots = [str(p) for p in plot_mean_bias(results, out)]
    except ImportError as err:
        plots = []
        print(f"plots skipped: {err}")
    print(f"{len(results)} GEMM operands analysed; mean over layers:")
    for key in ("r2", "cos_mu_v1", "qerr_plain", "qerr_averis"):
        if key in summary:
            print(f"  {key:>12}: {summary[key]['mean']:.4f}  (max {summary[key]['max']:.4f} at "
                  f"{summary[key]['argmax']})")
    print(f"written: {out / 'mean_bias.json'}, {out / 'summary.json'}" + (f", {len(plots)} plots" if plots else ""))
    return summary
