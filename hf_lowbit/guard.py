"""Loud failure when an hf_lowbit checkpoint is loaded by a process that did not `import hf_lowbit`.

What stock transformers (5.17-5.23, checked) does with a checkpoint whose config.json says
``quant_method: "hf_lowbit"`` when the plugin is not registered: it logs "Unknown quantization type, got hf_lowbit"
and builds a plain float model. Then

* a packed (``mode="infer"``) checkpoint fails: every FP4 ``*.weight`` is ``uint8 [out, in/2]`` where the float
  model expects ``[out, in]``, and `from_pretrained` raises ``RuntimeError`` (size mismatch) unless the caller
  passes ``ignore_mismatched_sizes=True``. Nothing in the checkpoint can make that default path print a message
  naming hf_lowbit: transformers does not run checkpoint code by default and ignores unknown config keys;
* a ``mode="train"`` checkpoint loads as the float model of its master weights (real weights, not random), with
  the warning above naming hf_lowbit; it only lacks the FP4 forward.

On top of that, this module adds a documented ``trust_remote_code`` shim: `protect` writes `hf_lowbit_loader.py`
into the checkpoint and points config.json's ``auto_map["AutoModelForCausalLM"]`` at it. With
``from_pretrained(path, trust_remote_code=True)`` transformers first checks the shim's imports (a missing hf_lowbit
fails with "requires the following packages ...: hf_lowbit. Run `pip install hf_lowbit`"), then the shim imports
hf_lowbit and loads the model through it. In a process that imported hf_lowbit, ``auto_map`` is ignored
(transformers prefers its built-in class when ``trust_remote_code`` is not set), so reloading is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIM_FILE = "hf_lowbit_loader.py"
SHIM_REF = "hf_lowbit_loader.LowBitAutoModelForCausalLM"
AUTO_CLASS = "AutoModelForCausalLM"

SHIM_SOURCE = '''"""Loader for an hf_lowbit checkpoint: `from_pretrained(path, trust_remote_code=True)` works
without a prior `import hf_lowbit`. Written by hf_lowbit (https://pypi.org/project/hf-lowbit/): pip install hf-lowbit"""

import hf_lowbit  # noqa: F401  (registers quant_method "hf_lowbit" with transformers)
from transformers import AutoModelForCausalLM


class LowBitAutoModelForCausalLM:
    """Delegates to `AutoModelForCausalLM` once hf_lowbit is registered."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """Called by transformers on remote classes; the built-in class stays registered."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        kwargs["trust_remote_code"] = False  # the built-in model class, now with the hf_lowbit quantizer
        return AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
'''


def _read_config(save_directory: Path) -> dict | None:
    path = save_directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_config(save_directory: Path, data: dict) -> None:
    # Same layout as transformers' `to_json_file` (indent 2, sorted keys), written atomically.
    tmp = save_directory / "config.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, save_directory / "config.json")


def protect(save_directory: str | os.PathLike) -> None:
    """Add the trust_remote_code shim to a saved hf_lowbit checkpoint (idempotent)."""
    save_directory = Path(save_directory)
    data = _read_config(save_directory)
    if data is None:
        return
    (save_directory / SHIM_FILE).write_text(SHIM_SOURCE)
    auto_map = dict(data.get("auto_map") or {})
    if auto_map.get(AUTO_CLASS) != SHIM_REF:
        auto_map[AUTO_CLASS] = SHIM_REF
        data["auto_map"] = auto_map
        _write_config(save_directory, data)


def unprotect(save_directory: str | os.PathLike) -> None:
    """Remove the shim from a folder that no longer holds an hf_lowbit checkpoint (e.g. a dequantized model)."""
    save_directory = Path(save_directory)
    data = _read_config(save_directory)
    if data is not None and (data.get("auto_map") or {}).get(AUTO_CLASS) == SHIM_REF:
        auto_map = {k: v for k, v in data["auto_map"].items() if k != AUTO_CLASS}
        if auto_map:
            data["auto_map"] = auto_map
        else:
            data.pop("auto_map")
        _write_config(save_directory, data)
    shim = save_directory / SHIM_FILE
    if shim.is_file():
        shim.unlink()


def strip_config(config_dict: dict) -> dict:
    """A config dict without the shim's ``auto_map`` entry (for exports to other formats)."""
    auto_map = {k: v for k, v in (config_dict.get("auto_map") or {}).items() if v != SHIM_REF}
    out = {k: v for k, v in config_dict.items() if k != "auto_map"}
    if auto_map:
        out["auto_map"] = auto_map
    return out
