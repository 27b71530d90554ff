"""Where the first step's extra time goes (Gluon kernel, one GPU): dense mode, the work-list path
with marking off and on, the same list in ascending order, and the planner, timed in interleaved
rounds (liteattention.bench.interleaved_ms). Dense mode is timed twice, as two cases: their
difference is the noise floor. The SM clock and power are logged (nvidia-smi) while it runs.
Usage: PYTHONPATH=src python bench/first_step_overhead.py [--shape 1,40,32760,128] [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

import torch

from liteattention.bench import interleaved_ms
from liteattention.kernels import gluon_forward as gf
from liteattention.kernels import triton_forward as tf
from liteattention.plan import range_words
from liteattention.state import TileGeometry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1,40,32760,128")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=-10.0)
    parser.add_argument("--clock-log", default=None, help="file for nvidia-smi's clock and power samples")
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

    def first_step():
        bits.zero_()  # as in the benchmark: nothing marked yet, so the list holds every tile
        return call(tf.plan_work(bits, do_words, skip_words, g, stats), bits, args.threshold)

    cases = {
        "dense (no list)": lambda: call(None, None, float("-inf")),
        "dense again": lambda: call(None, None, float("-inf")),
        "list, no marking": lambda: call(work, None, float("-inf")),
        "list + marking": lambda: call(work, bits.zero_(), args.threshold),
        "ascending list, no marking": lambda: call(ascending, None, float("-inf")),
        "first step (planner + list + marking)": first_step,
        "planner alone": lambda: tf.plan_work(bits, do_words, skip_words, g, stats),
    }
    smi = None
    if args.clock_log:
        query = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv", "-lms", "200"],
                               stdout=open(args.clock_log, "w"), stderr=subprocess.STDOUT)
    try:
        times = interleaved_ms(cases, args.rounds)
    finally:
        if smi is not None:
            smi.terminate()
    dense = statistics.median(times["dense (no list)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<38} median {med:8.3f} ms ({med / dense:.3f}x dense)  min {min(ts):8.3f}  max {max(ts):8.3f}")


if __name__ == "__main__":
    main()
