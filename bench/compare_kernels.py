"""The Gluon (sm_90) kernel against the portable Triton kernel and cuDNN, side by side on one GPU.

For each shape: dense mode, a first step (marking on, nothing skipped yet) and random skipping at
50% and 90%, for the Triton kernel and Gluon variants (one or two tiles per step, K/V ring depth).
Outputs are cross-checked before anything is timed: values against cuDNN, marks and statistics
against the Triton kernel. All variants and cases of a shape are timed in one interleaved run
(liteattention.bench.interleaved_ms).
Usage: PYTHONPATH=src python bench/compare_kernels.py [--shapes 1,40,32760,128;1,32,16384,64]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattention.bench import interleaved_ms, make_mask
from liteattention.kernels import gluon_forward as gf
from liteattention.kernels import plan_work
from liteattention.kernels import triton_forward as tf
from liteattention.plan import range_words
from liteattention.state import TileGeometry, pack_bits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1,40,32760,128;1,32,16384,64")
    parser.add_argument("--tiles", default="128x64,128x128")
    parser.add_argument("--threshold", type=float, default=-10.0)
    parser.add_argument("--mark-threshold", type=float, default=-1.0)
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = []
    for shape in args.shapes.split(";"):
        b, h, s, d = map(int, shape.split(","))
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        row = {"shape": shape}
        print(f"shape {shape}", flush=True)
        scale = d**-0.5
        for tiles in args.tiles.split(","):
            bm, bn = map(int, tiles.split("x"))
            g = TileGeometry(s, s, bm, bn)
            do_words, skip_words = range_words(g, (), (), q.device)
            stats = torch.zeros(3, dtype=torch.int64, device="cuda")

            def run(forward, bits, threshold, use_list=True, **kw):
                work = plan_work(bits, do_words, skip_words, g, stats) if use_list else None
                return forward(q, k, v, g, scale=scale, threshold=threshold, bits=bits if use_list else None,
                               work=work, stats=stats, return_lse=False, **kw)[0]

            zero = torch.zeros(g.mask_shape(b, h), dtype=torch.int32, device="cuda")
            # The default launch, then its alternatives: a ring of two, and one 64-key tile per step.
            gluon_variants = [{}, {"stages": 2}] + ([{"pairs": False}] if gf.step_tiles(bn) > 1 else [])
            variants = [("triton", tf.triton_forward, {})] + [("gluon", gf.gluon_forward, kw) for kw in gluon_variants]
            # Correctness first: dense values against cuDNN; marks and statistics of a first step at a
            # threshold that marks many tiles, and 50% sparse values, against the Triton kernel.
            marks_ref = sparse_ref = None
            mask = pack_bits(make_mask("random", 0.5, g, b, h, q.device))
            for name, forward, kw in variants:
                tag = f"{tiles}/{name}" + "".join(f"/{key}{val}" for key, val in kw.items())
                err = ((run(forward, None, float("-inf"), use_list=False, **kw).float() - ref.float()).norm() / ref.float().norm()).item()
                bits = zero.clone()
                stats.zero_()
                run(forward, bits, args.mark_threshold, **kw)
                marked = (bits, stats.clone())
                sparse = run(forward, mask.clone(), float("-inf"), **kw).float()
                if marks_ref is None:
                    marks_ref, sparse_ref = marked, sparse
                same = torch.equal(marked[0], marks_ref[0]) and torch.equal(marked[1], marks_ref[1])
                sparse_err = ((sparse - sparse_ref).nan_to_num().norm() / sparse_ref.nan_to_num().norm()).item()
                print(f"  {tag:<40} dense err {err:.1e}  marks {'same' if same else 'DIFFER'} {marked[1].tolist()}  s=0.5 err {sparse_err:.1e}", flush=True)
                row[f"{tag}/ok"] = bool(err < 1e-2 and same and sparse_err < 1e-2)
            if args.no_time:
                continue
            # Every kernel variant and case of this shape in one interleaved timing (the H200's clock
            # drifts under load; see liteattention.bench.interleaved_ms).
            bits = zero.clone()
            cases = {"cudnn": lambda: F.scaled_dot_product_attention(qt, kt, vt)}
            masks = {sp: pack_bits(make_mask("random", sp, g, b, h, q.device)) for sp in (0.5, 0.9)}
            for name, forward, kw in variants:
                tag = f"{tiles}/{name}" + "".join(f"/{key}{val}" for key, val in kw.items())
                cases[f"{tag}/dense"] = lambda forward=forward, kw=kw: run(forward, None, float("-inf"), use_list=False, **kw)
                cases[f"{tag}/first"] = lambda forward=forward, kw=kw: run(forward, bits.zero_(), args.threshold, **kw)
                for sp, mask in masks.items():
                    cases[f"{tag}/s{sp}"] = lambda forward=forward, kw=kw, mask=mask: run(forward, bits.copy_(mask), args.threshold, **kw)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                times = {key: statistics.median(ts) for key, ts in interleaved_ms(cases, args.rounds).items()}
            cudnn = times.pop("cudnn")
            row[f"{tiles}/cudnn"] = cudnn
            print(f"  {tiles} cuDNN {cudnn:.3f} ms", flush=True)
            for name, _, kw in variants:
                tag = f"{tiles}/{name}" + "".join(f"/{key}{val}" for key, val in kw.items())
                dense, first = times[f"{tag}/dense"], times[f"{tag}/first"]
                line = f"  {tag:<40} dense {dense:8.3f} ms ({dense / cudnn:.3f}x cuDNN)  first {first:8.3f} ({first / dense:.3f}x dense)"
                for sp in masks:
                    line += f"  s={sp} {times[f'{tag}/s{sp}']:7.3f} ({times[f'{tag}/s{sp}'] / dense:.3f})"
                row.update({f"{tag}/{case}": times[f"{tag}/{case}"] for case in ("dense", "first", *(f"s{sp}" for sp in masks))})
                print(line, flush=True)
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
