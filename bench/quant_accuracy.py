"""The 8-bit path's per-call accuracy at every benchmark shape, on the CPU, for a few heads at the
full sequence length: what bench/quant_kernel.py measures on the GPU for whole shapes, where GPU
time allows only some.

The 8-bit kernel's output is simulated: attention over the dequantized q, smoothed k and v
(``QuantizedInputs.dequantized``, the reference semantics) with P rounded to FP8 e4m3 as the
kernel rounds it, its row max scaled to P_MAX (here the row's final max; the kernel rounds against
the running max, which differs only for weights below 2^-14 of it, FP8's subnormals). Compared
with float32 attention on the same bf16 inputs, and with that rounded to bf16 (bf16 dense).
Structured inputs (liteattention.synthetic.video_qkv: head 0 nearly uniform, the last head the
most peaked) take the first, middle and last head; Gaussian inputs one head.

    PYTHONPATH=src python bench/quant_accuracy.py --out docs/perf/quant-accuracy-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from quant_kernel import errors  # this folder's: the same figures as on the GPU

from liteattention.bench import SHAPES
from liteattention.quantize import P_MAX, quantize_inputs
from liteattention.state import TileGeometry, default_block_sizes
from liteattention.synthetic import video_qkv

CHUNK = 512  # query rows per block of the dense computations


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, round_p: bool) -> torch.Tensor:
    """float32 softmax attention of one head, q (Sq, D), k, v (Sk, D); ``round_p``: P in FP8 as the
    8-bit kernel rounds it."""
    scale = q.shape[1] ** -0.5
    out = []
    for start in range(0, q.shape[0], CHUNK):
        s = (q[start : start + CHUNK] @ k.T) * scale
        p = torch.exp(s - s.amax(1, keepdim=True)) * P_MAX
        rounded = p.to(torch.float8_e4m3fn).float() if round_p else p
        out.append((rounded @ v) / p.sum(1, keepdim=True))  # the kernel sums P before rounding it
    return torch.cat(out)


def measure(name: str, inputs: str) -> list[dict]:
    shape = SHAPES[name]
    if inputs == "structured":
        q, k, v = video_qkv(1, shape.grid, shape.heads, shape.head_dim)  # bf16
        heads = sorted({0, shape.heads // 2, shape.heads - 1})
    else:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, shape.seq, 1, shape.head_dim, generator=g).to(torch.bfloat16) for _ in range(3))
        heads = [0]
    geometry = TileGeometry(q.shape[1], k.shape[1], *default_block_sizes(shape.head_dim))
    rows = []
    for h in heads:
        start = time.perf_counter()
        qh, kh, vh = (t[:, :, h : h + 1].contiguous() for t in (q, k, v))
        dq, dk, dv = quantize_inputs(qh, kh, vh, geometry).dequantized()
        exact = attention(qh[0, :, 0].float(), kh[0, :, 0].float(), vh[0, :, 0].float(), round_p=False)
        quant = attention(dq[0, :, 0], dk[0, :, 0], dv[0, :, 0], round_p=True)
        row = {"shape": name, "inputs": inputs, "head": h, "tokens": q.shape[1],
               "vs_bf16_dense": errors(quant, exact.to(torch.bfloat16)), "vs_fp32": errors(quant, exact),
               "seconds": time.perf_counter() - start}
        print(f"{name:>13} {inputs:>10} head {h:>2}: cosine vs bf16 dense {row['vs_bf16_dense']['cosine']:.6f}, "
              f"rel L2 {row['vs_bf16_dense']['rel_l2']:.4f} ({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", type=Path, required=True, help="JSON file")
    args = p.parse_args()
    rows = []
    for name in args.shapes.split(","):
        for inputs in ("structured", "random"):
            rows += measure(name, inputs)
            args.out.write_text(json.dumps(rows, indent=1))
    worst = min(rows, key=lambda r: r["vs_bf16_dense"]["cosine"])
    structured = [r for r in rows if r["inputs"] == "structured"]
    print(f"structured: cosine >= {min(r['vs_bf16_dense']['cosine'] for r in structured):.6f} over "
          f"{len(structured)} heads; worst of all: {worst['shape']} {worst['inputs']} {worst['vs_bf16_dense']['cosine']:.6f}"
          f"{'' if math.isfinite(worst['vs_bf16_dense']['cosine']) else ' (not finite)'}")


if __name__ == "__main__":
    main()
