"""The `hf-lowbit` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def require_min_ints(parser: argparse.ArgumentParser, checks: list[tuple[str, int | None, int]]) -> None:
    """`parser.error` for the first ``(flag, value, low)`` whose value is below `low` (None: not given, skipped),
    naming the flag, the value and what is allowed; the scripts call it before any work."""
    for flag, value, low in checks:
        if value is not None and value < low:
            parser.error(f"{flag}={value} is not valid; allowed: an integer >= {low}")


def require_new_path(parser: argparse.ArgumentParser, flag: str, path) -> None:
    """`parser.error` when the output `path` of `flag` (None: not given) already exists: nothing is overwritten."""
    if path is not None and Path(path).exists():
        parser.error(f"{flag}={str(path)!r} exists; allowed: a new path (nothing was changed)")


def add_linear_shape_args(parser: argparse.ArgumentParser, m: int, k: int, n: int, iters: int) -> None:
    """``--m --k --n`` (one linear layer: tokens, in, out features) and ``--iters`` of the profiling scripts."""
    for flag, default in (("--m", m), ("--k", k), ("--n", n), ("--iters", iters)):
        parser.add_argument(flag, type=int, default=default)


def linear_shape_checks(args: argparse.Namespace) -> list[tuple[str, int | None, int]]:
    """The `require_min_ints` checks of `add_linear_shape_args` (K: at least one 16-wide block)."""
    return [("--m", args.m, 1), ("--k", args.k, 16), ("--n", args.n, 1), ("--iters", args.iters, 1)]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size, block=args.block,
             lr=args.lr, overwrite=args.overwrite, fmt=args.format)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from .diagnose import run_diagnose

    run_diagnose(args.model, args.text, args.output_dir, tokens=args.tokens, block=args.block,
                 gradients=args.gradients, overwrite=args.overwrite)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .kernels.bench import main as bench_main

    rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return bench_main(rest)


def _quantize(args: argparse.Namespace) -> int:
    from .quantize_checkpoint import cli_quantize

    return cli_quantize(args)


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """`hf-lowbit quantize SRC OUT`: float checkpoint → packed FP4 checkpoint, shard by shard."""
    q = sub.add_parser("quantize", help="convert a float checkpoint (hub id or directory) into a packed FP4 "
                                        "checkpoint, shard by shard; verify by reloading; optionally push")
    q.add_argument("src", help="hub id or local directory of a float safetensors checkpoint")
    q.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
    q.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"], help="(default: %(default)s)")
    q.add_argument("--activations", default="fp4", choices=["fp4", "none"],
                   help="fp4: W4A4 at inference; none: weight-only W4A16 (default: %(default)s)")
    q.add_argument("--no-mean-center", action="store_true", help="no Averis mean-centring of activations")
    q.add_argument("--weight-blocks", default="1d", choices=["1d", "2d"], help="(default: %(default)s)")
    q.add_argument("--mx-scale", default="floor", choices=["floor", "ceil"], help="MXFP4 block-scale rounding")
    q.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="PATTERN",
                   help="module name patterns kept in high precision (default: embeddings, lm_head, routers)")
    q.add_argument("--dtype", default=None, help="dtype of the high-precision tensors (default: the source's)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (only after success)")
    q.add_argument("--no-verify", action="store_true", help="skip the reload + logit-error check")
    q.add_argument("--push-to", default=None, metavar="REPO_ID", help="also push the result to this Hub repo")
    q.add_argument("--private", action="store_true", help="create the pushed repo as private")
    q.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    q.add_argument("--revision", default=None, help="revision of a hub SRC")
    q.set_defaults(func=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-lowbit", description="Mean-centred FP4 training and inference "
                                     "for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny model in high precision and in FP4 on embedded text, "
                                       "then finalize, save, reload and generate")
    demo.add_argument("--output-dir", default="hf_lowbit_demo", help="where checkpoints go (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="training steps per run (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--format", default="nvfp4", help="nvfp4 or mxfp4")
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    demo.set_defaults(func=_demo)

    diag = sub.add_parser("diagnose", help="mean-bias report (JSON + PNG) of a checkpoint's FP4 GEMM inputs")
    diag.add_argument("model", help="checkpoint directory (with tokenizer), float or hf_lowbit")
    diag.add_argument("--text", default=None, help="text file to run (default: the packaged demo text)")
    diag.add_argument("--output-dir", default="hf_lowbit_diagnose")
    diag.add_argument("--tokens", type=int, default=2048)
    diag.add_argument("--block", type=int, default=256)
    diag.add_argument("--gradients", action="store_true", help="also analyse output gradients (runs backward)")
    diag.add_argument("--overwrite", action="store_true")
    diag.set_defaults(func=_diagnose)

    _add_quantize_parser(sub)

    from .train import add_arguments as _train_arguments, main_from_args as _train_main

    train = sub.add_parser("train", help="pretrain or fine-tune a causal LM with Trainer in BF16 or an FP4 recipe; "
                                         "runs under `accelerate launch` (DDP, FSDP2)")
    _train_arguments(train)
    train.set_defaults(func=_train_main)

    bench = sub.add_parser("bench", help="kernel and LowBitLinear benchmarks on a CUDA GPU (table + JSON); "
                                         "see `hf-lowbit bench --help`")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark owns its flags
        args = argparse.Namespace(bench_args=argv[1:], command="bench", func=_bench)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, PermissionError, RuntimeError) as err:
        print(f"hf-lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
