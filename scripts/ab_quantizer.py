"""Same-call A/B of the fused quantizer: an earlier commit's kernels against the working tree's, on one GPU.

Cross-call timings on a lent GPU drift by a few percent; a kernel change is judged by timing both versions in one
call. `--prepare REV` (here, where git is) writes REV's `kernels/_common.py` and `kernels/quantize.py` into
DIR/qh/ as a package of their own; the run (on the GPU machine, DIR carried along) then

* checks every output of the two `averis_quantize` versions bitwise on an edge-value tensor (zeros, 1e-30 rows,
  3e30 entries, exact E2M1 ties) and a random one, for NVFP4 / MXFP4, RTN / SR, centred or not, three output
  configurations; SR outputs are compared only where the streams do not enter (scales, statistics), and the new
  version's SR codes are checked against its own dequantized operands instead;
* times both on an 8192×4096 BF16 tensor as CUDA-graph replays (no host launch cost).

    python scripts/ab_quantizer.py --prepare 1adc53c            # here
    python scripts/ab_quantizer.py --out ab.json                 # on the GPU machine (carry .abtest)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

from hf_lowbit.cli import require_new_path

FILES = ("_common.py", "quantize.py")
CONFIGS = {
    "both_dq": dict(row=True, col=True, row_packed=False, row_dq=True, col_packed=False, col_dq=True, col_sum=True),
    "row_packed": dict(row=True, col=False, row_packed=True),
    "both_packed": dict(row=True, col=True, row_packed=True, col_packed=True),
}
SR_ONLY_SAME = ("mean", "tensor_scale", "camax", "row.scales", "col.scales")


def prepare(rev: str, folder: Path) -> Path:
    """REV's quantizer sources into folder/qh (their `hf_lowbit.kernels._common` imports pointed at the copy); all
    sources are read from git before anything is written."""
    root = Path(__file__).resolve().parents[1]
    sources = {name: subprocess.run(["git", "show", f"{rev}:kernels/{name}"], cwd=root, capture_output=True,
                                    text=True, check=True).stdout for name in FILES}
    pkg = folder / "qh"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, src in sources.items():
        (pkg / name).write_text(src.replace("from hf_lowbit.kernels._common import", "from qh._common import"))
    return pkg


def _outputs(q) -> dict:
    out = {k: getattr(q, k) for k in ("mean", "mean_q", "tensor_scale", "row_dq", "col_dq", "col_sum", "camax")
           if getattr(q, k, None) is not None}
    for axis in ("row", "col"):
        p = getattr(q, axis)
        if p is not None:
            out[f"{axis}.codes"], out[f"{axis}.scales"] = p.codes, p.scales
    return out


def _same_bits(a, b) -> bool:
    import torch

    if a.dtype.is_floating_point:
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        return bool(torch.equal(a.view(view), b.view(view)))
    return bool(torch.equal(a, b))


def _edge_tensor(device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(1)
    e = torch.randn(1024, 512, generator=g) * torch.exp(torch.randn(1024, 1, generator=g) * 4)
    e[::7, ::3] = 0.0
    e[5, :] = 1e-30
    e[9, :64] = 3e30
    e[11, :] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(64)
    return e.to(torch.bfloat16).to(device)


def mismatches(old, new, tensors) -> list[str]:
    """Outputs where the two versions differ (see the module docstring for what SR compares)."""
    import torch

    from hf_lowbit.numerics import dequantize

    bad = []
    for fmt in ("nvfp4", "mxfp4"):
        for rnd in ("rtn", "sr"):
            for cname, cfg in CONFIGS.items():
                for center in (True, False):
                    for t in tensors:
                        a = _outputs(old.averis_quantize(t, fmt, center=center, rounding=rnd, seed=3, **cfg))
                        b = _outputs(new.averis_quantize(t, fmt, center=center, rounding=rnd, seed=3, **cfg))
                        for k in a:
                            if (rnd == "rtn" or k in SR_ONLY_SAME) and not _same_bits(a[k], b[k]):
                                bad.append(f"{fmt} {rnd} {cname} center={center} {k}")
                    if rnd == "sr" and cname == "both_dq":  # SR codes agree with the dq operand of one launch
                        q = new.averis_quantize(tensors[0], fmt, center=center, rounding=rnd, seed=3, row=True,
                                                col=True, row_packed=True, row_dq=True, col_packed=True, col_dq=True)
                        for p, dq in ((q.row, q.row_dq), (q.col, q.col_dq)):
                            if p.tensor_scale is not None:  # the dq operands carry no tensor scale
                                p = dataclasses.replace(p, tensor_scale=p.tensor_scale.new_ones(()))
                            # values: Triton negates as 0 − x, so a code-8 operand is +0 where dequantize gives −0
                            if not torch.equal(dequantize(p).to(dq.dtype), dq):
                                bad.append(f"{fmt} sr codes vs dq center={center}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", metavar="REV", help="write REV's quantizer sources into DIR/qh and stop")
    ap.add_argument("--dir", default=".abtest", help="folder of the earlier version (default .abtest)")
    ap.add_argument("--out", help="write the results as JSON here (must not exist)")
    a = ap.parse_args(argv)
    folder = Path(a.dir)
    if a.prepare:
        if (folder / "qh").exists():
            ap.error(f"--dir={a.dir!r} already holds an earlier version (qh/); allowed: a folder without one "
                     "(remove it first: nothing is overwritten)")
        try:
            pkg = prepare(a.prepare, folder)
        except subprocess.CalledProcessError as err:
            ap.error(f"--prepare={a.prepare!r}: git cannot show kernels/ at that revision ({err.stderr.strip()}); "
                     "allowed: a commit of this repository")
        print(f"wrote {', '.join(FILES)} of {a.prepare} to {pkg}")
        return 0
    if a.out:
        require_new_path(ap, "--out", a.out)
    if not (folder / "qh" / "quantize.py").exists():
        ap.error(f"--dir={a.dir!r} holds no earlier version; allowed: a folder written by --prepare REV")
    import torch
    import triton

    if not torch.cuda.is_available():
        ap.error("no CUDA device: this script times GPU kernels; allowed: a machine with a CUDA GPU")
    sys.path.insert(0, str(folder))
    old = importlib.import_module("qh.quantize")
    from probe_quantizer import graph_ms  # scripts/ is on the path when this runs as a script

    from hf_lowbit.kernels import quantize as new

    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16) + 1.0
    bad = mismatches(old, new, [_edge_tensor("cuda"), x[:1000, :1000]])
    print("exactness: the two versions agree on every compared output" if not bad else f"MISMATCH: {bad}",
          flush=True)
    rows = []
    for fmt in ("nvfp4", "mxfp4"):
        for rnd in ("rtn", "sr"):
            for cname, cfg in CONFIGS.items():
                if rnd == "sr" and cname != "both_dq":
                    continue
                t_old = graph_ms(lambda: old.averis_quantize(x, fmt, rounding=rnd, **cfg)) * 1e3
                t_new = graph_ms(lambda: new.averis_quantize(x, fmt, rounding=rnd, **cfg)) * 1e3
                rows.append(dict(format=fmt, rounding=rnd, config=cname, old_us=t_old, new_us=t_new,
                                 ratio=t_new / t_old))
                print(f"{fmt} {rnd} {cname:12s} old {t_old:7.1f} us  new {t_new:7.1f} us  new/old "
                      f"{t_new / t_old:.3f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           shape=list(x.shape), mismatches=bad, rows=rows), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
