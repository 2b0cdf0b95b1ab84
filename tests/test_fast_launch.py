"""Direct launches of compiled Triton kernels (`kernels/_launch.py`): the specialization key is at least as fine as
Triton's binder, and the launcher's bookkeeping (first launch through Triton, later launches direct with pointers as
integers in signature order) — on CPU with a stand-in kernel; the real launches run in the GPU kernel tests."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

import hf_lowbit.kernels._launch as L  # noqa: E402


def _param(name, constexpr=False, dns=False, dnsa=False):
    return SimpleNamespace(name=name, is_constexpr=constexpr, do_not_specialize=dns,
                           do_not_specialize_on_alignment=dnsa, is_const=False)


def _triton_spec(p, v):
    if p.is_constexpr:
        return ("constexpr", v)
    return native_specialize_impl(CUDABackend, v, p.is_const, not p.do_not_specialize,
                                  not p.do_not_specialize_on_alignment)


def test_key_separates_every_triton_specialization():
    base = torch.zeros(64, dtype=torch.float32)
    values = {
        "int": [0, 1, 2, 15, 16, 17, 32, -16, -1, 2 ** 31 - 16, 2 ** 31, 2 ** 31 + 1, -(2 ** 31) - 16, 2 ** 40,
                2 ** 63],
        "tensor": [base[0:4], base[1:5], base[4:8], base.to(torch.bfloat16)[8:12], base.to(torch.bfloat16)[9:12],
                   base.to(torch.uint8)[16:], base.to(torch.uint8)[17:]],
        "other": [True, False, 1.5, 0.0, None],
    }
    for p in (_param("a"), _param("b", dns=True), _param("c", dnsa=True), _param("d", constexpr=True)):
        groups: dict = {}
        for v in itertools.chain(*values.values()):
            if p.is_constexpr and isinstance(v, torch.Tensor):
                continue
            key = L.specialization_key([p], [v])
            assert key is not None
            groups.setdefault(key, set()).add(repr(_triton_spec(p, v)))
        assert all(len(specs) == 1 for specs in groups.values()), (p.name, groups)
    assert L.specialization_key([_param("x")], [object()]) is None  # unknown argument kinds: Triton's path


class _Compiled:
    def __init__(self):
        self.function, self.packed_metadata, self.runs = "fn", "meta", []

    def run(self, *args):
        self.runs.append(args)


class _FakeJit:
    """Stands in for a triton.jit function: (x_ptr, n, seed [not specialized], BLOCK: constexpr)."""

    def __init__(self):
        self.params = [_param("x_ptr"), _param("n"), _param("seed", dns=True), _param("BLOCK", constexpr=True)]
        self.slow = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return _Compiled()
        return launch


def test_first_launch_through_triton_then_direct(monkeypatch):
    monkeypatch.setattr(L, "_ENABLED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 1234, raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    fake = _FakeJit()
    k = L.DirectLauncher(fake)
    buf = torch.zeros(64)
    compiled = k[(4,)](buf, 32, 7, BLOCK=128, num_warps=4)
    assert len(fake.slow) == 1 and compiled.runs == []
    k[(5, 2)](buf, 48, 99, BLOCK=128, num_warps=4)  # same class of every argument (48 % 16 == 0): direct
    assert len(fake.slow) == 1
    assert compiled.runs == [(5, 2, 1, 1234, "fn", "meta", None, None, None, buf.data_ptr(), 48, 99, 128)]
    for args, kwargs in (((buf, 33, 7), dict(BLOCK=128, num_warps=4)),      # n no longer divisible by 16
                         ((buf[1:], 32, 7), dict(BLOCK=128, num_warps=4)),  # misaligned pointer
                         ((buf, 32, 7), dict(BLOCK=64, num_warps=4)),       # another constexpr
                         ((buf, 32, 7), dict(BLOCK=128, num_warps=8))):     # another launch option
        k[(1,)](*args, **kwargs)
    assert len(fake.slow) == 5
    k[lambda meta: (1,)](buf, 32, 7, BLOCK=128, num_warps=4)  # a grid function: Triton's path
    from triton.knobs import HookChain

    hooked = HookChain()
    hooked.add(lambda *a: None)
    monkeypatch.setattr(L._knobs.runtime, "launch_enter_hook", hooked)
    k[(1,)](buf, 32, 7, BLOCK=128, num_warps=4)               # a profiler hook is set: Triton's path
    assert len(fake.slow) == 7 and len(compiled.runs) == 1
    monkeypatch.setattr(L, "_ENABLED", False)
    k[(1,)](buf, 32, 7, BLOCK=128, num_warps=4)
    assert len(fake.slow) == 8


def test_kernels_are_wrapped_only_when_compiled():
    """Under the interpreter the kernels stay plain interpreted functions; compiled, they are DirectLaunchers that
    still expose Triton's attributes (checked in a subprocess without TRITON_INTERPRET)."""
    code = ("import hf_lowbit.kernels.quantize as q, hf_lowbit.kernels.gemm as g\n"
            "print(type(q._quant_kernel).__name__, type(g._gemm_kernel).__name__, g._gemm_kernel.params[0].name)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["DirectLauncher", "DirectLauncher", "a_ptr"]


def test_bad_switch_value_is_refused_at_the_first_launch():
    """HF_LOWBIT_FAST_LAUNCH other than 0/1 names the variable, the value and what is allowed; importing still works
    (an import error would silently leave the Triton backend unregistered)."""
    code = ("import hf_lowbit.kernels._launch as L\n"
            "from types import SimpleNamespace as S\n"
            "fn = S(params=[S(name='x', is_constexpr=False, do_not_specialize=False,"
            " do_not_specialize_on_alignment=False)])\n"
            "try:\n    L.DirectLauncher(fn)[(1,)](3)\nexcept ValueError as e:\n    print(e)\n")
    env = {**os.environ, "HF_LOWBIT_FAST_LAUNCH": "yes"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "HF_LOWBIT_FAST_LAUNCH='yes' is not valid; allowed: '0'" in out
