"""Shared fixtures: tiny random Hugging Face models saved to a temp dir, reloaded through from_pretrained."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_config(kind: str):
    """Configs from HF_INTEGRATION.md: run forward+backward on a CPU in milliseconds."""
    from transformers import LlamaConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    if kind == "qwen3":
        return Qwen3Config(**COMMON, head_dim=16)
    if kind == "llama":
        return LlamaConfig(**COMMON)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if kind in ("deepseek_v2", "deepseek_v3"):
        from transformers import DeepseekV2Config, DeepseekV3Config

        ds = dict(**{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)
        if kind == "deepseek_v2":
            return DeepseekV2Config(**ds, topk_method="group_limited_greedy")
        return DeepseekV3Config(**ds, num_mtp_layers=0)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                              num_experts_per_tok=2)
    raise ValueError(kind)


def _interpreter_max_drops_nan_as_on_gpu() -> None:
    """Under TRITON_INTERPRET=1, `tl.maximum` / `tl.minimum` without `propagate_nan` run NumPy's maximum / minimum,
    which propagate NaN, while the compiled code (PTX max.f32 / min.f32) returns the non-NaN operand. A kernel that
    loses a NaN on the GPU then passes on the CPU (the grouped statistics did, 2026-11-30). The CPU suite runs them
    with the GPU's semantics (np.fmax / np.fmin)."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    builder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    builder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    with contextlib.suppress(ImportError):
        _interpreter_max_drops_nan_as_on_gpu()


@pytest.fixture(autouse=True)
def fresh_kernel_settings():
    """The kernels read their HF_LOWBIT_* switches once (`env_setting`); every test starts from the environment as
    it is (a test that changes a switch after its first kernel call reloads them itself)."""
    try:
        from hf_lowbit.kernels._common import reload_env_settings
    except ImportError:  # no Triton: no kernel settings
        yield
        return
    reload_env_settings()
    yield
    reload_env_settings()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function kind -> path of a saved tiny random float32 model (built once per session)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(kind))
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path)
            cache[kind] = str(path)
        return cache[kind]

    return make


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 24), generator=g)


def load_checked(path, cfg=None, **kw):
    """from_pretrained that fails on any missing / unexpected / mismatched key (transformers only warns)."""
    from transformers import AutoModelForCausalLM

    kw = {"quantization_config": cfg, **kw} if cfg is not None else kw
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{key}: {info[key]}"
    return model


def saved_tensors(path) -> dict:
    """Every tensor of the safetensors files in a checkpoint directory (all shards), by key."""
    import os

    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@contextlib.contextmanager
def kernel_switch(monkeypatch, name: str, value: str):
    """An ``HF_LOWBIT_*`` kernel switch set to `value` for the block (the kernels cache their switches: reloaded on
    entry and exit)."""
    from hf_lowbit.kernels._common import reload_env_settings

    monkeypatch.setenv(name, value)
    reload_env_settings()
    try:
        yield
    finally:
        monkeypatch.delenv(name)
        reload_env_settings()


def kernel_test_device() -> str:
    """Device of the Triton kernel tests: the CPU under TRITON_INTERPRET=1 (tiny shapes), else a CUDA GPU; skips
    the calling test module when neither is there."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
