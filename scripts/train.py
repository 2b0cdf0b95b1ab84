#!/usr/bin/env python
"""Causal-LM pretraining / fine-tuning with transformers.Trainer in BF16 or FP4 (hf_lowbit): a thin wrapper around
`hf_lowbit.train` (also installed as `hf-lowbit train`). See `python scripts/train.py --help` and the docstring of
hf_lowbit/train.py for data, precision, checkpoint, resume and multi-process (DDP / FSDP2) usage.

    python scripts/train.py --tiny --precision nvfp4-averis --output-dir runs/tiny
    accelerate launch --config_file scripts/accelerate/ddp.yaml scripts/train.py --model Qwen/Qwen3-0.6B \\
        --train-files data/ --precision nvfp4-averis --output-dir runs/qwen3-0.6b
"""

import sys

from hf_lowbit.train import main

if __name__ == "__main__":
    sys.exit(main())
