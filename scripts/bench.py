"""CLI wrapper: python scripts/bench.py --out results.json [--quick] [--no-reference].

The benchmark itself lives in `hf_lowbit.kernels.bench` (`run_bench(...)`, used by `hf-lowbit bench`).
"""

from hf_lowbit.kernels.bench import main, run_bench  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
