"""Where the first step's extra time goes (Gluon kernel, one GPU): dense mode, the work-list path
with marking off, and with marking on, timed in interleaved rounds so that drift shows as spread.
Usage: PYTHONPATH=src python bench/first_step_overhead.py [--shape 1,40,32760,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from liteattention.kernels import gluon_forward as gf
from liteattention.kernels import triton_forward as tf
from liteattention.plan import range_words
from liteattention.state import TileGeometry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1,40,32760,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=-10.0)
    args = parser.parse_args()
    b, h, s, d = map(int, args.shape.split(","))
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = TileGeometry(s, s, 128, 64)
    do_words, skip_words = range_words(g, (), (), q.device)
    stats = torch.zeros(3, dtype=torch.int64, device="cuda")
    bits = torch.zeros(b, h, g.q_tiles, g.words, dtype=torch.int32, device="cuda")
    work = tf.plan_work(bits, do_words, skip_words, g, stats)
    # The same tiles in plain ascending order: separates the visit order from the list mechanics.
    ascending = (torch.arange(g.k_tiles, dtype=torch.int32, device="cuda").expand_as(work[0]).contiguous(), work[1])

    def call(work, bits, threshold):
        return gf.gluon_forward(q, k, v, g, scale=d**-0.5, threshold=threshold, bits=bits, work=work,
                                stats=stats, return_lse=False)

    cases = {
        "dense (no list)": lambda: call(None, None, float("-inf")),
        "list, no marking": lambda: call(work, None, float("-inf")),
        "list + marking": lambda: call(work, bits, args.threshold),
        "ascending list, no marking": lambda: call(ascending, None, float("-inf")),
        "planner + list + marking": lambda: call(tf.plan_work(bits, do_words, skip_words, g, stats), bits, args.threshold),
        "planner alone": lambda: tf.plan_work(bits, do_words, skip_words, g, stats),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median"))
    dense = statistics.median(times["dense (no list)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26} median {med:8.3f} ms ({med / dense:.3f}x dense)  rounds {' '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
