"""Triton kernels for mean-centred FP4 on Hopper, registered as the backend ``"triton"``.

This module may also be imported as a top-level module named ``kernels`` (transformers probes for a package of
that name when the repository root is on sys.path), so: absolute imports only, nothing raised at import on a
machine without triton or without a GPU, and nothing registered there.
"""

from __future__ import annotations

__all__ = ["is_available", "reload_env_settings", "TRITON_AVAILABLE"]

TRITON_AVAILABLE = False

try:  # never raise at import time: CPU-only machines, no triton, or a triton that fails to import
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the environment
    TRITON_AVAILABLE = False


def reload_env_settings() -> None:
    """Re-read the kernels' ``HF_LOWBIT_*`` switches from the environment (they are read once, at first use)."""
    if TRITON_AVAILABLE:
        from hf_lowbit.kernels._common import reload_env_settings as reload

        reload()


def is_available(device) -> bool:
    """True for CUDA devices of compute capability >= 9.0 (Hopper) with triton importable."""
    if not TRITON_AVAILABLE:
        return False
    try:
        import torch

        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device) >= (9, 0)
    except Exception:
        return False


if TRITON_AVAILABLE:
    try:
        from hf_lowbit.backend import register_backend
        from hf_lowbit.kernels.linear import TritonBackend

        register_backend("triton", TritonBackend, is_available)
        __all__ += ["TritonBackend"]
    except Exception:  # pragma: no cover - a broken triton install leaves the torch backend in charge
        TRITON_AVAILABLE = False
