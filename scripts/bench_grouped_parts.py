"""Parts of the FP4 MoE experts' step at P8 shapes, timed alone: the six batched GEMMs, each through cuBLAS + the
epilogue pass and through the Triton GEMM with its fused epilogue at every tile config (which path and config to
run per GEMM kind), and the grouped statistics pass per HF_LOWBIT_GSTATS config (activations with a padding mask,
weights without), with torch's `aminmax` as the bandwidth reference.

    python scripts/bench_grouped_parts.py [--experts 128 --capacity 608 --hidden 2048 --intermediate 768]
                                          [--out grouped_parts.json]

Operands are random BF16 in the layouts the grouped linear passes (fprop and dgrad row-major, dgrad's weight and
both wgrad operands transposed views); the epilogue flags are the linear's (tensor scales, the rank-1 row for fprop
and dgrad with the padding mask, the two rank-1 wgrad terms). Device milliseconds from `triton.testing.do_bench`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch

from hf_lowbit.cli import require_min_ints, require_new_path


def gemm_cases(e: int, c: int, h: int, i: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """name → the arguments of `scaled_gemm` / `cublas_epilogue` for one GEMM of the experts' fwd+bwd."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    def vec(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device) + 0.5

    mask = torch.ones(e, c, device=device)
    mask[:, c - c // 8:] = 0
    x, w_gu = rnd(e, c, h), rnd(e, 2 * i, h)
    hh, w_dn = rnd(e, c, i), rnd(e, h, i)
    d_dn, d_gu = rnd(e, c, h), rnd(e, c, 2 * i)
    scales = dict(sa=vec(e), sb=vec(e))
    return {
        "fprop_gate_up": dict(a=x, b=w_gu, vrow=vec(e, 2 * i), row_mask=mask, **scales),
        "fprop_down": dict(a=hh, b=w_dn, vrow=vec(e, h), row_mask=mask, **scales),
        "dgrad_down": dict(a=d_dn, b=w_dn.transpose(1, 2), vrow=vec(e, i), row_mask=mask, **scales),
        "dgrad_gate_up": dict(a=d_gu, b=w_gu.transpose(1, 2), vrow=vec(e, h), row_mask=mask, **scales),
        "wgrad_gate_up": dict(a=d_gu.transpose(1, 2), b=x.transpose(1, 2), r1=(vec(e, 2 * i), vec(e, h)),
                              r2=(vec(e, 2 * i), vec(e, h)), **scales),
        "wgrad_down": dict(a=d_dn.transpose(1, 2), b=hh.transpose(1, 2), r1=(vec(e, h), vec(e, i)),
                           r2=(vec(e, h), vec(e, i)), **scales),
    }


def triton_config_runner(case: dict[str, Any], cfg: Any) -> Callable[[], None]:
    """One launch of the batched Triton GEMM at tile config `cfg` with the case's epilogue."""
    from hf_lowbit.kernels import gemm

    a, b = case["a"], case["b"]
    G, M, K = a.shape
    N = b.shape[1]
    out = torch.empty(G, M, N, device=a.device, dtype=torch.bfloat16)
    dummy = torch.zeros(1, device=a.device)
    u1, v1 = case.get("r1", (dummy, dummy))
    u2, v2 = case.get("r2", (dummy, dummy))
    common = dict(HAS_SCALE=True, HAS_VROW="vrow" in case, HAS_R1="r1" in case, HAS_R2="r2" in case, WGRAD=False,
                  HAS_RMASK="row_mask" in case, ROUND_BF16=True)
    args = (a, b, out, M, N, K, a.stride(1), a.stride(2), b.stride(1), b.stride(2), out.stride(1), out.stride(2),
            case["sa"], case["sb"], case.get("vrow", dummy), u1, v1, u2, v2, case.get("row_mask", dummy),
            a.stride(0), b.stride(0), out.stride(0), 0.0)
    return lambda: gemm._launch_config(args, M, N, K, G, common, cfg, False)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from triton.testing import do_bench

    from hf_lowbit.kernels import gemm

    device = torch.device("cuda")
    cases = gemm_cases(args.experts, args.capacity, args.hidden, args.intermediate, device)
    configs = {f"cfg{j}": c for j, c in enumerate(gemm.grouped_configs())}  # cfg0: the batched default
    results: dict[str, Any] = {}
    for name, case in cases.items():
        kw = {k: v for k, v in case.items() if k not in ("a", "b")}
        row: dict[str, Any] = {"cublas32": do_bench(lambda: gemm.cublas_epilogue(
            case["a"], case["b"], torch.bfloat16, fp32_product=True, **kw), warmup=10, rep=50)}
        for label, cfg in configs.items():
            row[label] = do_bench(triton_config_runner(case, cfg), warmup=10, rep=50)
        best = min((k for k in row if k != "cublas32"), key=row.__getitem__)
        row["best_triton"], row["best_triton_vs_cublas32"] = best, round(row[best] / row["cublas32"], 3)
        results[name] = row
        print(f"{name:15s} cublas32 {row['cublas32']:.3f} ms, best Triton {best} {row[best]:.3f} ms "
              f"({row['best_triton_vs_cublas32']}x)", flush=True)
    results["configs"] = {k: str(v) for k, v in configs.items()}
    results["device"] = torch.cuda.get_device_name()
    return results


STATS_CONFIGS = ("16,128,4", "32,128,4", "32,128,8", "8,128,4", "16,256,8", "32,64,4")


def measure_stats(args: argparse.Namespace) -> dict[str, Any]:
    """ms and GB/s of `group_stats` on the gate_up input (masked, centred) and weight (abs-max) per config."""
    import os

    from triton.testing import do_bench

    from hf_lowbit.kernels._common import reload_env_settings
    from hf_lowbit.kernels.grouped import group_stats

    dev = torch.device("cuda")
    e, c, h, i = args.experts, args.capacity, args.hidden, args.intermediate
    x = torch.randn(e, c, h, device=dev).to(torch.bfloat16)
    mask = torch.ones(e, c, device=dev)
    mask[:, c - c // 8:] = 0
    counts = mask.sum(1)
    w = torch.randn(e, 2 * i, h, device=dev).to(torch.bfloat16)
    cases = {"activations": lambda: group_stats(x, mask, counts, True, True),
             "weights": lambda: group_stats(w, None, None, False, True)}
    gb = {"activations": x.numel() * 2 / 1e9, "weights": w.numel() * 2 / 1e9}
    out: dict[str, Any] = {"aminmax_weights": do_bench(lambda: torch.aminmax(w, dim=1), warmup=10, rep=50)}
    for cfg in STATS_CONFIGS:
        os.environ["HF_LOWBIT_GSTATS"] = cfg
        reload_env_settings()
        for name, fn in cases.items():
            ms = do_bench(fn, warmup=10, rep=50)
            out[f"{name}@{cfg}"] = {"ms": round(ms, 4), "GB_per_s": round(gb[name] / ms * 1e3, 1)}
            print(f"stats {name:11s} {cfg:9s} {ms:.4f} ms {gb[name] / ms * 1e3:7.1f} GB/s", flush=True)
    os.environ.pop("HF_LOWBIT_GSTATS")
    reload_env_settings()
    print(f"aminmax weights {out['aminmax_weights']:.4f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--capacity", type=int, default=608)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    require_min_ints(parser, [(f"--{k}", getattr(args, k), 1) for k in ("experts", "capacity", "hidden",
                                                                           "intermediate")])
    require_new_path(parser, "--out", args.out)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times GPU kernels)")
    results = {"stats": measure_stats(args)} | measure(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
