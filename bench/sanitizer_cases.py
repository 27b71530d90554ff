"""Odd-shaped calls of both GPU kernels, for compute-sanitizer (memcheck, racecheck, synccheck):
partial tiles, Sq != Sk, B > 1, head dims 48/96/256, must-do and must-skip ranges, marking on,
several calls on one state.

    compute-sanitizer --tool memcheck python3 bench/sanitizer_cases.py
"""

from __future__ import annotations

import argparse
import math

import torch

from liteattention import kernels
from liteattention.state import SkipState

# (batch, seq_q, seq_k, heads, head_dim, must_do, must_skip)
CASES = [
    (2, 200, 333, 3, 48, ((0, 17),), ()),
    (3, 129, 129, 2, 96, (), ((0, 64),)),
    (2, 257, 130, 2, 128, ((120, 130),), ()),
    (1, 100, 300, 2, 256, (), ((280, 300),)),
    (2, 1000, 777, 1, 64, ((0, 77),), ((640, 704),)),
]


def run(kernel: str, calls: int) -> int:
    launched = 0
    for batch, seq_q, seq_k, heads, head_dim, must_do, must_skip in CASES:
        for block_n in (64, 128):
            gen = torch.Generator(device="cuda").manual_seed(seq_q)
            q = torch.randn(batch, seq_q, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            k, v = (torch.randn(batch, seq_k, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
            k[:, seq_k // 2 :] *= 0.05  # weak keys: tiles to mark
            state = SkipState.for_inputs(q, k, block_n=block_n)
            choice = kernels.choose_kernel(q.device, state.geometry, kernels.kernel_head_dim(head_dim))
            if kernel == "gluon" and choice.kernel != "gluon":
                continue
            for call in range(calls):
                out, lse, stats = kernels.forward(
                    q, k, v, state.geometry, scale=head_dim**-0.5, threshold=-2.0 if call else -math.inf,
                    bits=state.bits, must_do=must_do, must_skip=must_skip, return_lse=True, kernel=kernel,
                )
                launched += 1
            dense, _, _ = kernels.forward(q, k, v, state.geometry, scale=head_dim**-0.5, threshold=-math.inf, bits=None, kernel=kernel)
            launched += 1
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(dense).all()
    return launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default="portable,gluon")
    parser.add_argument("--calls", type=int, default=3, help="calls per case on one state (marking from the second)")
    args = parser.parse_args()
    for kernel in args.kernels.split(","):
        print(f"{kernel}: {run(kernel, args.calls)} launches, all outputs finite", flush=True)


if __name__ == "__main__":
    main()
