#!/usr/bin/env python
"""Cost and accuracy of the SD-MoE basis refresh (the batched FP32 SVD of every W_c) per cuSOLVER driver.

The refresh runs every `refresh_every` (16) optimizer steps; on the small MoE of `bench_moe.py` it was the larger
part of SD-MoE's step-time overhead. This script times `refresh_bases` on stacks of `SDMoEExperts` of a given shape
(one expert each: the refresh only reads W_c) for every driver of `SVD_DRIVERS`, and measures how far each driver's
top-k subspaces are from an FP64 SVD (max entry of ``U Uᵀ − U* U*ᵀ`` and ``V Vᵀ − V* V*ᵀ`` on the first matrices).
W_c is a rank-k signal plus Gaussian noise (``--noise`` sets its share), as after training from a preserve init.

    python scripts/bench_sd_refresh.py --out refresh.json                 # GPU: the shapes below, every driver
    python scripts/bench_sd_refresh.py --tiny --out /tmp/refresh.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowbit.cli import require_min_ints, require_new_path
from hf_lowbit.model_patches.sd_moe import DEFAULT_SVD_DRIVER, SVD_DRIVERS

#: (name, MoE layers, hidden, expert intermediate)
SHAPES = [("bench_moe LM (Qwen3-MoE 512/256)", 4, 512, 256),
          ("Qwen3-30B-A3B (2048/768)", 48, 2048, 768),
          ("DeepSeek-V2-Lite (2048/1408)", 26, 2048, 1408)]
TINY_SHAPES = [("tiny", 2, 64, 32)]


def build(layers: int, hidden: int, inter: int, rank: int, noise: float, device: torch.device,
          seed: int) -> list[Any]:
    """`layers` single-expert SDMoEExperts with W_c = rank-k signal + noise (FP32)."""
    from hf_lowbit.model_patches.sd_moe import SD_MATRICES, SDMoEExperts

    g = torch.Generator().manual_seed(seed)
    mods = []
    for _ in range(layers):
        mod = SDMoEExperts(1, hidden, inter, nn.SiLU(), rank=rank, device=device)
        with torch.no_grad():
            for m in SD_MATRICES:
                rows, cols = mod._shape(m)
                u = torch.linalg.qr(torch.randn(rows, rank, generator=g)).Q
                v = torch.linalg.qr(torch.randn(cols, rank, generator=g)).Q
                s = torch.linspace(2.0, 1.0, rank)
                signal = (u * s) @ v.T
                w = signal + noise * torch.randn(rows, cols, generator=g) / (rows ** 0.5 + cols ** 0.5)
                mod.common(m).copy_(w.to(device))
        mods.append(mod)
    return mods


def subspace_error(mods: list[Any], check: int) -> float:
    """Max entry of the projector difference to an FP64 CPU SVD over the first `check` modules' matrices."""
    from hf_lowbit.model_patches.sd_moe import SD_MATRICES

    worst = 0.0
    for mod in mods[:check]:
        for m in SD_MATRICES:
            u, _, vh = torch.linalg.svd(mod.common(m).detach().double().cpu(), full_matrices=False)
            k = mod.rank
            bu, bv = (b.double().cpu() for b in mod.bases(m))
            worst = max(worst, float((bu @ bu.T - u[:, :k] @ u[:, :k].T).abs().max()),
                        float((bv @ bv.T - vh[:k].T @ vh[:k]).abs().max()))
    return worst


def time_refresh(mods: list[Any], device: torch.device, reps: int) -> list[float]:
    """Milliseconds of `refresh_bases` over `mods` (synchronized), after one warm-up."""
    from hf_lowbit.model_patches.sd_moe import _refresh_modules

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    _refresh_modules(mods)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        _refresh_modules(mods)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(shapes: list[tuple], drivers: list[str], rank: int, noise: float, reps: int, check: int,
        device: torch.device, on_row=None) -> list[dict[str, Any]]:
    """One row per (shape, driver); `on_row(rows)` after each (the script rewrites its JSON: a timeout keeps rows)."""
    import os

    rows = []
    for name, layers, hidden, inter in shapes:
        mods = build(layers, hidden, inter, rank, noise, device, seed=0)
        for driver in drivers:
            os.environ["HF_LOWBIT_SD_SVD_DRIVER"] = driver if driver in SVD_DRIVERS else DEFAULT_SVD_DRIVER
            try:
                times = time_refresh(mods, device, reps)
                row = {"shape": name, "layers": layers, "hidden": hidden, "intermediate": inter,
                       "matrices": 3 * layers, "driver": driver, "median_ms": statistics.median(times),
                       "min_ms": min(times), "subspace_err": subspace_error(mods, check)}
            except Exception as exc:  # a driver cuSOLVER refuses for this shape: recorded, the others still run
                row = {"shape": name, "driver": driver, "error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                os.environ.pop("HF_LOWBIT_SD_SVD_DRIVER", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="one toy shape on the CPU")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.5, help="noise norm relative to the smallest signal value")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--check", type=int, default=2, help="modules whose subspaces are compared with an FP64 SVD")
    p.add_argument("--drivers", default=",".join(SVD_DRIVERS),
                   help=f"comma list of {list(SVD_DRIVERS)} (CUDA; the CPU runs LAPACK and 'subspace')")
    p.add_argument("--shapes", default=None, help="comma list of shape indices into SHAPES (default: all)")
    p.add_argument("--out", type=Path, required=True, help="JSON results; must not exist")
    args = p.parse_args(argv)
    require_min_ints(p, [("--rank", args.rank, 1), ("--reps", args.reps, 1), ("--check", args.check, 0)])
    if args.noise < 0:
        p.error(f"--noise={args.noise} is not valid; allowed: a number >= 0")
    drivers = [d for d in args.drivers.split(",") if d]
    if not drivers or any(d not in SVD_DRIVERS for d in drivers):
        p.error(f"--drivers={args.drivers!r} is not valid; allowed: a comma list of {list(SVD_DRIVERS)}")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes is not None:
        try:
            shapes = [shapes[int(i)] for i in args.shapes.split(",")]
        except (ValueError, IndexError):
            p.error(f"--shapes={args.shapes!r} is not valid; allowed: a comma list of indices 0..{len(shapes) - 1}")
    require_new_path(p, "--out", args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type != "cuda":  # cuSOLVER's drivers do not apply on the CPU: LAPACK, plus "subspace" if asked
        drivers = ["lapack"] + [d for d in drivers if d == "subspace"]
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "rank": args.rank, "noise": args.noise, "reps": args.reps}

    def write(rows: list[dict[str, Any]]) -> None:
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))

    rows = run(shapes, drivers, args.rank, args.noise, args.reps, args.check, device,
               on_row=write)
    write(rows)
    return rows


def best_driver(rows: list[dict[str, Any]], shape: str, max_err: float = 1e-3) -> str:
    """The fastest driver for `shape` among those whose subspaces are within `max_err` (the default if none)."""
    ok = [r for r in rows if r["shape"] == shape and "median_ms" in r and r["subspace_err"] <= max_err]
    return min(ok, key=lambda r: r["median_ms"])["driver"] if ok else DEFAULT_SVD_DRIVER


if __name__ == "__main__":
    main()
