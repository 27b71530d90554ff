"""Launch-configuration sweep for the Triton kernel on one GPU (recorded in docs/performance.md).

For each shape and tile geometry, times dense mode (no list), the work-list path
with marking off, a first step (marking on, nothing skipped) and 50% random skipping for every (num_warps, num_stages), next to cuDNN SDPA.
Usage: PYTHONPATH=src python bench/sweep_configs.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattention import SkipState, lite_attention
from liteattention.bench import make_mask
from liteattention.kernels import triton_forward as tf
from liteattention.state import TileGeometry


def bench(fn):
    return triton.testing.do_bench(fn, warmup=30, rep=120, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1,40,32760,128;1,32,16384,64")
    parser.add_argument("--tiles", default="128x64,128x128")
    parser.add_argument("--configs", default="4x2,4x3,8x2,8x3,8x4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for shape in args.shapes.split(";"):
        b, h, s, d = map(int, shape.split(","))
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            cudnn = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        print(f"shape {shape}: cuDNN {cudnn:.3f} ms", flush=True)
        for tiles, cfg in itertools.product(args.tiles.split(","), args.configs.split(",")):
            bm, bn = map(int, tiles.split("x"))
            warps, stages = map(int, cfg.split("x"))
            for use_list in (False, True):
                tf.LAUNCH_CONFIGS[(bm, bn, d, use_list)] = (warps, stages)
            g = TileGeometry(s, s, bm, bn)
            stats = torch.zeros(tf.STATS, dtype=torch.int64, device="cuda")
            state = SkipState.for_inputs(q, k, bm, bn)
            row = dict(shape=shape, tiles=tiles, warps=warps, stages=stages, cudnn_ms=cudnn)
            try:
                out, _ = tf.triton_forward(q, k, v, g, scale=d**-0.5, threshold=-math.inf, bits=None, work=None, stats=stats, return_lse=False)
                row["err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                row["dense_ms"] = bench(lambda: tf.triton_forward(q, k, v, g, scale=d**-0.5, threshold=-math.inf, bits=None, work=None, stats=stats, return_lse=False))

                row["list_ms"] = bench(lambda: lite_attention(q, k, v, state, threshold=-math.inf))

                def first():
                    state.bits.zero_()
                    lite_attention(q, k, v, state, threshold=-10.0)

                row["first_ms"] = bench(first)
                state.set_mask(make_mask("random", 0.5, g, b, h, q.device))
                saved = state.bits.clone()

                def half():
                    state.bits.copy_(saved)
                    lite_attention(q, k, v, state, threshold=-10.0)

                row["half_ms"] = bench(half)
            except Exception as exc:  # a config the compiler rejects (shared memory, registers)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            results.append(row)
            if "error" in row:
                print(f"  {tiles} w{warps} s{stages}: {row['error']}", flush=True)
            else:
                print(f"  {tiles} w{warps} s{stages}: dense {row['dense_ms']:.3f} ({row['dense_ms'] / cudnn:.3f}x cuDNN, err {row['err']:.1e}) "
                      f"list {row['list_ms'] / row['dense_ms']:.3f}x first {row['first_ms']:.3f} ({row['first_ms'] / row['dense_ms']:.3f}x) half {row['half_ms']:.3f} ({row['half_ms'] / row['dense_ms']:.3f}x)", flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
