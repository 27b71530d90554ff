"""Thousands of LiteAttention calls with shape changes and resets; GPU memory and host memory
must stay flat (no state, statistics or scratch left behind).

    python3 bench/soak.py --calls 3000
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

from liteattention import LiteAttention

SHAPES = [(1, 1000, 2, 64), (2, 777, 3, 128), (1, 2048, 4, 96), (3, 333, 2, 64)]


def host_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the shape changes warn, on purpose
    inputs = [tuple(torch.randn(*shape, device=args.device, dtype=torch.bfloat16) for _ in range(3)) for shape in SHAPES]
    attn = LiteAttention(threshold=[-float("inf"), -8.0, -4.0])
    samples = []
    start = time.perf_counter()
    for call in range(args.calls):
        q, k, v = inputs[(call // 37) % len(inputs)]  # a new shape every 37 calls
        attn(q, k, v, must_do=(0, 17), return_lse=call % 2 == 0)
        if call % 50 == 49:
            attn.reset()
        if call % 250 == 0 or call == args.calls - 1:
            gpu = torch.cuda.memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
            samples.append((call, gpu, host_mib(), len(attn.state.history)))
    for call, gpu, host, history in samples:
        print(f"call {call:>6}: GPU {gpu:8.2f} MiB allocated, host {host:8.1f} MiB resident, history {history}")
    # After the first cycle through the shapes every allocation has been made once.
    settled = [s for s in samples if s[0] >= 4 * 37 * len(SHAPES)] or samples
    gpu_growth = max(s[1] for s in settled) - min(s[1] for s in settled)
    host_growth = settled[-1][2] - settled[0][2]
    print(f"{args.calls} calls in {time.perf_counter() - start:.1f} s; after warm-up GPU memory varies by "
          f"{gpu_growth:.2f} MiB, host memory grew {host_growth:.1f} MiB")


if __name__ == "__main__":
    main()
