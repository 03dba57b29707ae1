"""Command line: ``python -m benchmarks [--quick] [--suite NAME ...] [--out DIR] [--device cpu|cuda]``."""

import os
import sys

# Before anything imports triton or fastllm: the interpreter would time Python, not kernels,
# and fastllm's CPU C++ path is only dispatched when TRITON_INTERPRET is not set.
_INTERPRET = os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import environment, report, runner  # noqa: E402
from benchmarks.harness import Settings  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short case list (the README's command)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few repetitions (smoke test); implies --quick")
    p.add_argument(
        "--suite",
        nargs="+",
        choices=runner.SUITES,
        default=list(runner.SUITES),
        metavar="NAME",
        help=f"suites to run, in this order (default: all): {', '.join(runner.SUITES)}",
    )
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device-slug>/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if _INTERPRET is not None:
        print(f"benchmarks: unset TRITON_INTERPRET={_INTERPRET!r} (timing compiled kernels)", file=sys.stderr)
    device = torch.device(args.device)
    settings = Settings(device=device, quick=args.quick or args.tiny, tiny=args.tiny)
    out = args.out or environment.REPO / "benchmarks" / "results" / environment.device_slug(device)
    records, facts = runner.run(args.suite, settings)
    print(report.write(records, facts, out))
    print(f"wrote {out}/ (results.md, run.json, <suite>.json, <suite>.png) in {facts['seconds']} s", file=sys.stderr)
    return 3 if facts.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
