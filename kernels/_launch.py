"""Direct launches of compiled Triton kernels (opt-in: ``HF_LOWBIT_FAST_LAUNCH=1``, default off until measured).

An FP4 linear makes ~16 kernel launches per training step, and on an H200 host each of ours costs ~40 µs in
`JITFunction.run` (binding and specializing ~45 arguments, cache-key hashing, knob and device lookups) and in
Triton's C launcher, which asks the driver about every pointer argument (`cuPointerGetAttribute`). At a hidden
size of 1024 that host time exceeds the GPU time (benchmarks/NOTES.md). `direct_launch` caches the compiled kernel
per *specialization key* (what Triton's binder specializes on: dtypes, 16-byte alignment of pointers, integers
equal to 1 / divisible by 16 / their width, constexpr values and launch options) and later launches it through
`CompiledKernel.run` with the pointers passed as integers (the launcher's fast path). The first launch of every key
goes through Triton's normal path, so compilation, caching and errors are Triton's own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from triton import knobs as _knobs

from hf_lowbit.kernels._common import interpreting

__all__ = ["direct_launch", "fast_launch_enabled", "set_fast_launch", "specialization_key"]

_ENV = "HF_LOWBIT_FAST_LAUNCH"
_ENV_VALUE = os.environ.get(_ENV, "0")
#: a bad value is reported at the first launch (an exception at import would silently drop the Triton backend)
_ENV_ERROR = None if _ENV_VALUE in ("0", "1") else \
    f"{_ENV}={_ENV_VALUE!r} is not valid; allowed: '0' (Triton's launch path, default) or '1' (direct launches)"
_ENABLED = _ENV_VALUE == "1"
_I32 = (-(2 ** 31), 2 ** 31)
_U64 = 2 ** 63


def fast_launch_enabled() -> bool:
    return _ENABLED


def set_fast_launch(enabled: bool) -> None:
    """Switch direct launches on or off for this process (the benchmark measures both in one run)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def _hooked() -> bool:
    """True when launch hooks are registered with Triton (its HookChain objects are never None in 3.6)."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _int_class(v: int) -> int:
    """Triton's integer argument types: 0 = i32, 1 = i64, 2 = u64."""
    if _I32[0] <= v < _I32[1]:
        return 0
    return 1 if -_U64 <= v < _U64 else 2


def specialization_key(params: list, values: list) -> tuple | None:
    """A key that differs whenever Triton's binder would specialize the call differently (None: not covered)."""
    key = []
    for p, v in zip(params, values):
        if p.is_constexpr:
            key.append((type(v), v))  # 0, 0.0 and False are different constexprs to Triton
        elif isinstance(v, torch.Tensor):
            key.append((v.dtype, v.is_cuda, None if p.do_not_specialize_on_alignment else v.data_ptr() % 16 == 0))
        elif isinstance(v, bool):
            key.append(("u1",))
        elif isinstance(v, int):
            if p.do_not_specialize:
                key.append(_int_class(v))
            else:
                key.append((_int_class(v), v == 1, v % 16 == 0))
        elif isinstance(v, float):
            key.append(("fp32",))
        elif v is None:
            key.append(None)
        else:
            return None
    return tuple(key)


class DirectLauncher:
    """``kernel[grid](*args, **kwargs)`` as for the wrapped `triton.jit` function, with direct launches on a hit."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._params = list(fn.params)
        self._names = [p.name for p in self._params]
        self._known = set(self._names)
        self._cache: dict[tuple, Any] = {}

    def __getattr__(self, name: str) -> Any:  # params, arg_names, ... of the wrapped function
        if name == "fn":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: Any, args: tuple, kwargs: dict) -> Any:
        if _ENV_ERROR is not None:
            raise ValueError(_ENV_ERROR)
        if not _ENABLED or callable(grid):
            return self.fn[grid](*args, **kwargs)
        try:
            values = list(args) + [kwargs[n] for n in self._names[len(args):]]
        except KeyError:  # a parameter left to its default: Triton's path
            return self.fn[grid](*args, **kwargs)
        spec = specialization_key(self._params, values)
        if spec is None:
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self._known))
        key = (spec, options, device)
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            self._cache[key] = kernel
            return kernel
        if _hooked():  # a profiler hooked into Triton's launches: its path
            return self.fn[grid](*args, **kwargs)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        flat = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values]
        stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's own launch path asks for
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *flat)
        return kernel


def direct_launch(fn: Any) -> Any:
    """Wrap a host-launched `triton.jit` kernel (unchanged under the CPU interpreter)."""
    if interpreting() or not hasattr(fn, "params"):
        return fn
    return DirectLauncher(fn)
