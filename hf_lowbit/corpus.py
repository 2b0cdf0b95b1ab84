"""Offline text for the reproduction scripts: the embedded Shakespeare (200 KB) or the installed site-packages'
Python source (hundreds of MB on any machine with torch and transformers), and a parallel chunked tokenization.

No network and no `datasets`: the GPU image has neither, and the same token stream must come out on every run
(files are read sorted by path).
"""

from __future__ import annotations

import site
from pathlib import Path

import torch

#: the text sources `load_text` knows
SOURCES = ("shakespeare", "site-packages")


def site_packages_text(max_bytes: int) -> str:
    """Concatenated .py files of the installed site-packages, sorted by path, up to `max_bytes` characters."""
    roots = sorted({Path(p) for p in site.getsitepackages() if Path(p).is_dir()})
    chunks, total = [], 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            chunks.append(text)
            total += len(text)
            if total >= max_bytes:
                return "\n".join(chunks)
    return "\n".join(chunks)


def load_text(source: str, max_bytes: int = 200_000_000) -> str:
    """The text of `source` (one of SOURCES); `max_bytes` caps the site-packages text."""
    if source == "shakespeare":
        from hf_lowbit.demo import demo_text

        return demo_text()
    if source == "site-packages":
        return site_packages_text(max_bytes)
    raise ValueError(f"text source {source!r} is not supported; allowed: {list(SOURCES)}")


def tokenize_chunked(tokenizer, text: str, chunk_chars: int = 1 << 20) -> torch.Tensor:
    """Token ids of `text`, tokenized as a batch of ~1 MB pieces cut at newlines (the fast tokenizer runs a batch in
    parallel; one huge string runs on one core)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        cut = text.rfind("\n", start, end) + 1 if end < len(text) else end
        end = cut if cut > start else end
        pieces.append(text[start:end])
        start = end
    ids = tokenizer(pieces)["input_ids"]
    return torch.tensor([i for piece in ids for i in piece], dtype=torch.long)
