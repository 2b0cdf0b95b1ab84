"""An hf_lowbit checkpoint in a process that never imported hf_lowbit: loud failure, never random weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from hf_lowbit import LowBitConfig, LowBitLinear, guard

from conftest import load_checked

# One fresh interpreter that does not import hf_lowbit probes every case in turn (interpreter start-up is the slow
# part); the case that makes hf_lowbit unimportable runs first and removes its blocker afterwards, the
# trust_remote_code case (which imports hf_lowbit through the shim) runs last. Prints one JSON line.
_PROBE = textwrap.dedent("""
    import io, json, logging, sys
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    class Block:  # hf_lowbit unimportable, as in an environment where it is not installed
        def find_spec(self, name, path=None, target=None):
            if name == "hf_lowbit" or name.startswith("hf_lowbit."):
                raise ModuleNotFoundError(f"No module named '{name}'")

    results = {}
    for case in sys.argv[1:]:
        name, path, how = case.split("|")
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        hf_logging.get_logger().addHandler(handler)
        if how == "blocked":
            sys.meta_path.insert(0, Block())
        out = {}
        try:
            kwargs = {"trust_remote_code": True} if how in ("remote", "blocked") else {}
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            q = model.model.layers[0].self_attn.q_proj
            out.update(loaded=type(q).__name__, dtype=str(q.weight.dtype))
            torch.save(q.weight.detach().float(), f"{path}/probe_q_{name}.pt")
        except Exception as err:
            out["error"] = f"{type(err).__name__}: {err}"
        out["hf_lowbit_imported"] = "hf_lowbit" in sys.modules
        out["log"] = stream.getvalue()
        hf_logging.get_logger().removeHandler(handler)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, Block)]
        results[name] = out
    print("PROBE" + json.dumps(results))
""")


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """An infer (packed) and a train (master weights) hf_lowbit checkpoint of the tiny qwen3."""
    root = tmp_path_factory.mktemp("guard")
    src = tiny_model_dir("qwen3")
    for mode in ("infer", "train"):
        load_checked(src, LowBitConfig(mode=mode)).save_pretrained(root / mode)
    return root


@pytest.fixture(scope="module")
def probe(saved):
    """What a process without `import hf_lowbit` gets for each case."""
    cases = [f"blocked|{saved / 'infer'}|blocked", f"infer|{saved / 'infer'}|default",
             f"train|{saved / 'train'}|default", f"remote|{saved / 'infer'}|remote"]
    env = {**os.environ, "HF_HOME": str(saved / "hf_home"), "HF_HUB_OFFLINE": "1"}
    # cwd outside the repo: from its root, `import transformers` would pick up the top-level kernels/ folder
    # (installed as hf_lowbit.kernels), which imports hf_lowbit and would hide what a user's process does.
    res = subprocess.run([sys.executable, "-c", _PROBE, *cases], capture_output=True, text=True, timeout=300,
                         env=env, cwd=saved)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(line[5:])


def test_saved_checkpoints_carry_the_shim(saved):
    for mode in ("infer", "train"):
        cfg = json.loads((saved / mode / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == guard.SHIM_REF
        assert (saved / mode / guard.SHIM_FILE).read_text() == guard.SHIM_SOURCE


def test_stock_load_of_packed_checkpoint_fails_loudly(probe):
    out = probe["infer"]
    assert "error" in out and "RuntimeError" in out["error"] and "ignore_mismatched_sizes" in out["error"], out
    assert "Unknown quantization type, got hf_lowbit" in out["log"]


def test_stock_load_of_train_checkpoint_is_the_master_weights_not_random(probe, saved):
    out = probe["train"]
    assert out.get("loaded") == "Linear" and not out["hf_lowbit_imported"], out
    assert "Unknown quantization type, got hf_lowbit" in out["log"]
    with safe_open(str(saved / "train" / "model.safetensors"), "pt") as f:
        master = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(torch.load(saved / "train" / "probe_q_train.pt"), master)


def test_trust_remote_code_shim_imports_hf_lowbit(probe, saved):
    out = probe["remote"]
    assert out.get("loaded") == "LowBitLinear" and out["hf_lowbit_imported"] and out["dtype"] == "torch.uint8", out
    expected = load_checked(saved / "infer").model.layers[0].self_attn.q_proj.weight
    assert torch.equal(torch.load(saved / "infer" / "probe_q_remote.pt"), expected.float())


def test_shim_without_hf_lowbit_installed_names_it(probe):
    out = probe["blocked"]
    assert "error" in out and "hf_lowbit" in out["error"] and "pip install" in out["error"], out


def test_reload_with_hf_lowbit_imported_ignores_the_shim(saved):
    model = load_checked(saved / "infer")  # auto_map present, trust_remote_code unset: built-in class + quantizer
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowBitLinear)
    assert type(model).__module__.startswith("transformers.")


def test_dequantized_model_saves_without_shim(saved, tmp_path):
    model = load_checked(saved / "infer")
    model.dequantize()
    model.save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in cfg and "quantization_config" not in cfg
    assert not (tmp_path / "plain" / guard.SHIM_FILE).exists() and not (tmp_path / "plain" / "README.md").exists()


def test_strip_config_keeps_foreign_auto_map():
    cfg = {"auto_map": {"AutoModelForCausalLM": guard.SHIM_REF, "AutoConfig": "x.Y"}, "a": 1}
    assert guard.strip_config(cfg) == {"auto_map": {"AutoConfig": "x.Y"}, "a": 1}
    assert guard.strip_config({"auto_map": {"AutoModelForCausalLM": guard.SHIM_REF}}) == {}
