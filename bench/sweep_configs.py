"""Launch-configuration sweep for the portable Triton kernel on one GPU (recorded in
docs/performance.md; its picks are triton_forward.LAUNCH_CONFIGS).

For each shape and tile geometry, and every (num_warps, num_stages): dense mode (no list), the
work-list path with marking off, a first step (marking on, nothing skipped) and 50% random
skipping, next to cuDNN SDPA. The portable kernel is called directly (on sm_90 the library would
pick the Gluon kernel for some geometries), and all configurations and cases of a geometry are
timed in one interleaved run (liteattention.bench.interleaved_ms).
Usage: PYTHONPATH=src python bench/sweep_configs.py [--shapes 1,40,32760,128] [--configs 8x3,8x5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattention.bench import interleaved_ms, make_mask
from liteattention.kernels import STATS, plan_work
from liteattention.kernels import triton_forward as tf
from liteattention.plan import range_words
from liteattention.state import TileGeometry, pack_bits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1,40,32760,128;1,32,16384,64")
    parser.add_argument("--tiles", default="128x64,128x128")
    parser.add_argument("--configs", default="4x2,4x3,8x2,8x3,8x4,8x5")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for shape, tiles in itertools.product(args.shapes.split(";"), args.tiles.split(",")):
        b, h, s, d = map(int, shape.split(","))
        bm, bn = map(int, tiles.split("x"))
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        g = TileGeometry(s, s, bm, bn)
        do_words, skip_words = range_words(g, (), (), q.device)
        stats = torch.zeros(STATS, dtype=torch.int64, device="cuda")
        zero = torch.zeros(g.mask_shape(b, h), dtype=torch.int32, device="cuda")
        half = pack_bits(make_mask("random", 0.5, g, b, h, q.device))
        bits = zero.clone()

        def run(config, mask=None, threshold=-math.inf):
            """Dense mode without a mask; else plan from the mask and walk the list, marking into it
            when threshold > -inf."""
            work = None if mask is None else plan_work(mask, do_words, skip_words, g, stats)
            return tf.triton_forward(q, k, v, g, scale=d**-0.5, threshold=threshold, bits=mask, work=work,
                                     stats=stats, return_lse=False, config=config)[0]

        cases = {"cudnn": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
        rows = {}
        for cfg in args.configs.split(","):
            config = tuple(map(int, cfg.split("x")))
            row = dict(shape=shape, tiles=tiles, warps=config[0], stages=config[1])
            try:  # a config the compiler rejects (shared memory, registers) is reported, not timed
                row["err"] = ((run(config).float() - ref.float()).norm() / ref.float().norm()).item()
                run(config, zero.clone())
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                print(f"  {shape} {tiles} w{config[0]} s{config[1]}: {row['error']}", flush=True)
            else:
                cases[f"{cfg}/dense"] = lambda config=config: run(config)
                cases[f"{cfg}/list"] = lambda config=config: run(config, zero)
                cases[f"{cfg}/first"] = lambda config=config: run(config, bits.zero_(), -10.0)
                cases[f"{cfg}/half"] = lambda config=config: run(config, bits.copy_(half), -10.0)
            rows[cfg] = row
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            times = {key: statistics.median(ts) for key, ts in interleaved_ms(cases, args.rounds).items()}
        cudnn = times["cudnn"]
        print(f"shape {shape} tiles {tiles}: cuDNN {cudnn:.3f} ms", flush=True)
        for cfg, row in rows.items():
            row["cudnn_ms"] = cudnn
            results.append(row)
            if "error" in row:
                continue
            row.update({f"{case}_ms": times[f"{cfg}/{case}"] for case in ("dense", "list", "first", "half")})
            dense = row["dense_ms"]
            print(f"  {tiles} w{row['warps']} s{row['stages']}: dense {dense:.3f} ({dense / cudnn:.3f}x cuDNN, err {row['err']:.1e}) "
                  f"list {row['list_ms'] / dense:.3f}x first {row['first_ms'] / dense:.3f}x half {row['half_ms'] / dense:.3f}x", flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
