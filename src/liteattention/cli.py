"""The ``liteattention`` command line: demo, bench."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    from .bench import PATTERNS, SHAPES, SPARSITIES

    parser = argparse.ArgumentParser(prog="liteattention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="GPU benchmark: LiteAttention vs cuDNN/flash SDPA vs FlexAttention")
    bench.add_argument("--shapes", type=_names, default=list(SHAPES), help=f"comma-separated, from {','.join(SHAPES)}")
    bench.add_argument("--sparsities", type=_floats, default=list(SPARSITIES), help="comma-separated skipped fractions")
    bench.add_argument("--patterns", type=_names, default=list(PATTERNS), help=f"comma-separated, from {','.join(PATTERNS)}")
    bench.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run_bench

        run_bench(args.shapes, args.sparsities, args.patterns, out=args.out, flex=not args.no_flex)


if __name__ == "__main__":
    main()
