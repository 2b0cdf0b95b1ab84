"""Instruction counts of the fused quantizer's compiled code (SASS for sm_90), on any machine, no GPU needed.

The quantizer is bound by its instruction issue, not memory (benchmarks/NOTES.md): the SASS count of one tile
predicts its time within a factor ~2 and, more usefully, the direction and size of a change before a GPU run.
Each variant compiles `_quant_kernel` with the specializations a real launch gets (unit column stride, 16-divisible
sizes and pointers) and counts the instructions on the common path (the IEEE division's slow-path subroutine and
its call are left out). Runs as a script or through `count(...)`.

    python scripts/count_sass.py                                    # the default variants
    python scripts/count_sass.py nv:IS_NV=True,SR=False mx:IS_NV=False --json out.json
    python scripts/count_sass.py --other-kernels                    # compile (and count) the other kernels too

`--other-kernels` compiles the grouped statistics kernels, the grouped quantizer with its column sums and the GEMM
epilogue pass with the mean row for sm_90:
a kernel that does not compile for Hopper fails here, on any machine, instead of on the GPU.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_lowbit.cli import require_new_path

#: the linear's activation operand: both axes dequantized to BF16, column sums, centred, RTN, 64×64 tiles
# FMA_QUOT=False: the IEEE division (the FMA quotient's variant also holds the tile's IEEE fallback, which the count
# cannot tell from the executed path; compare it with the fallback stubbed out)
BASE = dict(BM=64, BK=64, B=16, IS_NV=True, CENTER=True, SR=False, MX_CEIL=False, FMA_QUOT=False, ROW=True,
            ROW_PACK=False, ROW_DQ=True, COL=True, COL_PACK=False, COL_DQ=True, COL_SUM=True, GROUPED=False,
            MEAN_Q=False)
DEFAULT_VARIANTS = {
    "nvfp4_both_dq": {},
    "nvfp4_both_dq_sr": dict(SR=True),
    "mxfp4_both_dq": dict(IS_NV=False, B=32),
    "nvfp4_row_packed": dict(COL=False, COL_DQ=False, COL_SUM=False, ROW_DQ=False, ROW_PACK=True, BM=32, BK=128),
}
_POINTERS = dict(x_ptr="*bf16", mean_ptr="*fp32", amax_ptr="*i32", rc_ptr="*u8", rs_ptr="*u8", rdq_ptr="*bf16",
                 cc_ptr="*u8", cs_ptr="*u8", cdq_ptr="*bf16", csum_ptr="*fp32", ts_out_ptr="*fp32", tsg_ptr="*fp32",
                 rowok_ptr="*u8", meanq_ptr="*fp32")
_DIV16 = {"sxm", "M", "K", "MP", "KP", "GL"} | set(_POINTERS)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_quant_kernel(num_warps: int = 4, **consts) -> bytes:
    """The cubin of `_quant_kernel` for sm_90 with these constexprs (on top of BASE)."""
    from hf_lowbit.kernels.quantize import _quant_kernel

    values = dict(BASE, **consts, sxk=1)  # Triton specializes a unit stride at launch
    names = _quant_kernel.arg_names
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown _quant_kernel constexpr(s) {unknown}; allowed: {sorted(BASE)}")
    sig = {a: "constexpr" if a in values else _POINTERS.get(a, "i32") for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a in _DIV16 and a not in values}
    src = ASTSource(fn=_quant_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in values.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm["cubin"]


def compile_sm90(fn, constexprs: dict, pointers: dict | None = None, num_warps: int = 4,
                 div16: set | None = None, num_stages: int | None = None) -> bytes:
    """The cubin of any @triton.jit kernel `fn` for sm_90: arguments named ``*_ptr`` are FP32 pointers unless
    `pointers` names another type, the others i32 unless in `constexprs`; `div16` names the arguments a launch
    specializes as multiples of 16 (aligned pointers, strides), which decides how wide the loads are."""
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    names = fn.arg_names
    unknown = sorted(set(constexprs) - set(names))
    if unknown:
        raise ValueError(f"unknown constexpr(s) {unknown} of {fn.__name__}; allowed: {names}")
    pointers = pointers or {}
    sig = {a: "constexpr" if a in constexprs else pointers.get(a, "*fp32" if a.endswith("_ptr") else "i32")
           for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if a in (div16 or set())}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = dict(num_warps=num_warps, **({} if num_stages is None else dict(num_stages=num_stages)))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def other_kernels() -> dict[str, bytes]:
    """The grouped path's statistics kernels, its quantizer with column sums and the epilogue pass with the mean row,
    compiled for sm_90."""
    from hf_lowbit.kernels import gemm, grouped

    # the specializations of a P8 launch: unit column stride, 16-divisible pointers, sizes and row strides (they
    # decide the load widths: without them the statistics compile to 2-byte loads)
    stats_div16 = {"z_ptr", "ok_ptr", "sum_ptr", "max_ptr", "min_ptr", "szg", "szl", "L", "K"}
    weights, masked = dict(ROWS_PER=256, BL=32, BK=128, szk=1), dict(ROWS_PER=256, BL=8, BK=128, szk=1)
    epilogue = dict(HAS_SCALE=True, HAS_VROW=False, HAS_R1=False, HAS_R2=False, WGRAD=False, HAS_RMASK=True,
                    HAS_MEAN=True, ROUND_BF16=True, BM=32, BN=128)
    epilogue_div16 = {n for n in gemm._epilogue_kernel.arg_names if n.endswith("_ptr")} | {"N", "scg", "sog"}
    return {
        "group_col_absmax": compile_sm90(grouped._group_col_absmax_kernel, weights, dict(z_ptr="*bf16"),
                                         div16=stats_div16),
        "group_col_stats": compile_sm90(grouped._group_col_stats_kernel, dict(masked, HAS_MASK=True),
                                        dict(z_ptr="*bf16"), div16=stats_div16),
        "group_finalize": compile_sm90(grouped._group_finalize_kernel, dict(CENTER=True, IS_NV=True, BS=4, BK=256)),
        "quant_grouped_col_sum": compile_quant_kernel(GROUPED=True, COL_SUM=True),
        "epilogue_mean_row": compile_sm90(gemm._epilogue_kernel, epilogue, dict(o_ptr="*bf16"), num_warps=4,
                                          div16=epilogue_div16),
    }


def count(cubin: bytes) -> dict:
    """Instructions on the common path, registers, and an opcode histogram of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    targets = [int(t, 16) for t in re.findall(r"CALL\.REL\.NOINC (0x[0-9a-f]+)", text)]
    end = min(targets) if targets else 1 << 62   # subroutines (the division's slow path) follow the main body
    ops: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            if int(m.group(1), 16) >= end:
                break
            ops[m.group(2)] += 1
    common = sum(ops.values()) - 2 * ops["CALL"]  # the slow-path call and its argument move are skipped at run time
    regs = re.search(r"REG:(\d+)", res)
    return dict(instructions=common, registers=int(regs.group(1)) if regs else None, opcodes=dict(ops.most_common()))


def _parse_variant(ap: argparse.ArgumentParser, spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    consts = {}
    for kv in filter(None, rest.split(",")):
        key, eq, val = kv.partition("=")
        if not eq or key not in BASE:
            ap.error(f"variant {spec!r}: {kv!r} must be KEY=VALUE with KEY one of {sorted(BASE)}")
        try:
            consts[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            ap.error(f"variant {spec!r}: value {val!r} of {key} is not a Python literal (True, 64, ...)")
    return name, consts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="NAME:KEY=VALUE,... (constexprs of _quant_kernel over BASE)")
    ap.add_argument("--json", help="write the counts here (must not exist)")
    ap.add_argument("--other-kernels", action="store_true", help="also compile and count the grouped path's kernels")
    a = ap.parse_args(argv)
    if a.json:
        require_new_path(ap, "--json", a.json)
    if not os.path.exists(_tool("ptxas")):
        ap.error(f"Triton's ptxas is missing at {_tool('ptxas')}; allowed: a Triton install with the NVIDIA backend")
    variants = dict(_parse_variant(ap, s) for s in a.variants) if a.variants else DEFAULT_VARIANTS
    rows = {}
    cubins = {name: (lambda c=consts: compile_quant_kernel(**c)) for name, consts in variants.items()}
    if a.other_kernels:
        variants = dict(variants)
        for name, cubin in other_kernels().items():
            cubins[name], variants[name] = (lambda b=cubin: b), {}
    for name, make in cubins.items():
        rows[name] = r = count(make())
        top = ", ".join(f"{k}:{v}" for k, v in list(r["opcodes"].items())[:10])
        print(f"{name:20s} {r['instructions']:6d} instructions  {r['registers']} registers  ({top})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(base=BASE, variants={k: dict(consts=variants[k], **v) for k, v in rows.items()}), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
