"""The 8-bit path (quant="qk_int8_pv_fp8") at the benchmark shapes, on one GPU, in one process:
its accuracy against 16-bit attention, and its time against cuDNN and our bf16 kernel.

Accuracy, per shape, on two kinds of inputs: structured (liteattention.synthetic.video_qkv: local,
peaked heads and nearly uniform ones, channel offsets on k and v) and i.i.d. Gaussian. Errors are
given against float32 attention (PyTorch's memory-efficient SDPA in float32) and against bf16
dense attention (cuDNN): cosine similarity, relative L2, and the LSE's largest error.

Time: cuDNN SDPA, our bf16 dense (the Gluon kernel on Hopper), the 8-bit path dense (its input
quantization included) and with injected random masks, the quantization alone (eager and compiled)
and the kernel variants (quant_variant), timed interleaved (liteattention.bench).
``--sweep`` also times the 8-bit kernel's launch configurations (num_warps, num_stages).

    PYTHONPATH=src python bench/quant_kernel.py --out results/quant            # on the GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liteattention import SkipState, kernels, lite_attention
from liteattention.bench import SHAPES, interleaved_ms, make_mask
from liteattention.quantize import _quantize, quantize_inputs
from liteattention.synthetic import video_qkv

QUANT = "qk_int8_pv_fp8"
SPARSITIES = (0.25, 0.5, 0.75, 0.9)
SWEEP = [(w, s) for w, s in itertools.product((4, 8), (2, 3, 4, 5))]
# Kernel variants (quant_variant): int32 -> float32 by the magic-number add instead of I2F; P.V
# into a fresh accumulator added in fp32 (else accumulated in the MMA, at its reduced FP8 precision).
VARIANTS = {"i2f-fresh": (False, True), "magic-fresh": (True, True), "i2f-mma": (False, False), "magic-mma": (True, False)}


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative L2, reduced in float64 (float32 sums over millions of
    elements move the cosine in its fifth decimal)."""
    a, b = out.double().flatten(), ref.double().flatten()
    return {"cosine": F.cosine_similarity(a, b, dim=0).item(), "rel_l2": ((a - b).norm() / b.norm()).item()}


def sdpa(q, k, v, backend):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


def exact_lse(q, k, chunk=256):
    """float32 LSE (B, H, Sq), in chunks of queries."""
    qt, kt = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    scale = q.shape[-1] ** -0.5
    return torch.cat([torch.logsumexp(qt[:, :, i : i + chunk] @ kt.transpose(-1, -2) * scale, -1)
                      for i in range(0, qt.shape[2], chunk)], -1)


def accuracy(name: str, inputs: str) -> dict:
    shape = SHAPES[name]
    if inputs == "structured":
        q, k, v = video_qkv(1, shape.grid, shape.heads, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    else:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, shape.seq, shape.heads, shape.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
    exact = sdpa(q.float(), k.float(), v.float(), SDPBackend.EFFICIENT_ATTENTION)
    cudnn = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    quant, quant_lse = lite_attention(q, k, v, quant=QUANT, return_lse=True)
    dense, dense_lse = lite_attention(q, k, v, return_lse=True)
    lse = exact_lse(q, k)
    result = {
        "shape": name, "inputs": inputs,
        "quant_vs_bf16_dense": errors(quant, cudnn),
        "quant_vs_fp32": errors(quant, exact),
        "bf16_dense_vs_fp32": errors(dense, exact),
        "quant_lse_max_err": (quant_lse - lse).abs().max().item(),
        "bf16_lse_max_err": (dense_lse - lse).abs().max().item(),
    }
    print(f"{name:>13} {inputs:>10}: vs bf16 cuDNN cos {result['quant_vs_bf16_dense']['cosine']:.6f} rel L2 "
          f"{result['quant_vs_bf16_dense']['rel_l2']:.4f}; vs fp32 cos {result['quant_vs_fp32']['cosine']:.6f} "
          f"(bf16 dense {result['bf16_dense_vs_fp32']['cosine']:.6f}); LSE err {result['quant_lse_max_err']:.4f}", flush=True)
    return result


def speed(name: str, rounds: int, sweep: bool) -> dict:
    shape = SHAPES[name]
    q, k, v = video_qkv(1, shape.grid, shape.heads, shape.head_dim, device="cuda", dtype=torch.bfloat16)
    cases = {
        "cudnn": lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION),
        "ours-bf16": lambda: lite_attention(q, k, v),
        "quant-dense": lambda: lite_attention(q, k, v, quant=QUANT),
    }
    state = SkipState.for_inputs(q, k)
    g = state.geometry
    measured = {}
    for target in SPARSITIES:
        state.set_mask(make_mask("random", target, g, 1, shape.heads, q.device))
        saved = state.bits.clone()

        def sparse(saved=saved):
            state.bits.copy_(saved)
            return lite_attention(q, k, v, state, threshold=-10.0, quant=QUANT)

        sparse()
        measured[target] = state.last_stats.sparsity  # tiles skipped: the mask less each q-tile's anchor
        cases[f"quant-s{target}"] = sparse
    # The quantization alone: PyTorch ops as written (eager) and as the 8-bit path runs them (compiled).
    cases["quantize-eager"] = lambda: _quantize(q, k, v, g.block_m, g.block_n)
    cases["quantize-compiled"] = lambda: quantize_inputs(q, k, v, g)
    scale = shape.head_dim**-0.5
    cudnn_out = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    variant_errors = {}
    for label, variant in VARIANTS.items():
        def run_variant(variant=variant):
            return kernels.forward(q, k, v, g, scale=scale, threshold=-math.inf, bits=None, quant=QUANT,
                                   quant_variant=variant)[0]
        variant_errors[label] = errors(run_variant(), cudnn_out)
        cases[f"variant-{label}"] = run_variant
    if sweep:
        for w, s in SWEEP:
            def launch(w=w, s=s):
                return kernels.forward(q, k, v, g, scale=shape.head_dim**-0.5, threshold=-math.inf, bits=None,
                                       quant=QUANT, config=(w, s))
            try:
                launch()
            except Exception as error:  # a configuration may not fit in shared memory
                print(f"  config {w} warps, {s} stages: {type(error).__name__}")
                continue
            cases[f"quant-dense-w{w}s{s}"] = launch
    times = {name_: statistics.median(t) for name_, t in interleaved_ms(cases, rounds).items()}
    cudnn, quant = times["cudnn"], times["quant-dense"]
    result = {"shape": name, "ms": times, "sparsity": measured, "variant_errors_vs_cudnn": variant_errors,
              "quant_dense_vs_cudnn": quant / cudnn, "bf16_dense_vs_cudnn": times["ours-bf16"] / cudnn,
              "quant_sparse_vs_quant_dense": {t: times[f"quant-s{t}"] / quant for t in SPARSITIES}}
    line = ", ".join(f"s={measured[t]:.2f}: {times[f'quant-s{t}'] / quant:.3f}" for t in SPARSITIES)
    print(f"{name:>13}: cuDNN {cudnn:.2f} ms, ours bf16 {times['ours-bf16']:.2f} ms ({result['bf16_dense_vs_cudnn']:.3f}), "
          f"8-bit dense {quant:.2f} ms ({result['quant_dense_vs_cudnn']:.3f} of cuDNN); 8-bit sparse / dense: {line}", flush=True)
    print(f"  quantization alone: eager {times['quantize-eager']:.2f} ms, compiled {times['quantize-compiled']:.2f} ms", flush=True)
    print("  variants: " + ", ".join(f"{label} {times[f'variant-{label}']:.2f} ms (cos {variant_errors[label]['cosine']:.6f})"
                                     for label in VARIANTS), flush=True)
    if sweep:
        best = sorted((t, c) for c, t in times.items() if c.startswith("quant-dense-w"))
        print("  sweep (ms): " + ", ".join(f"{c[12:]} {t:.2f}" for t, c in best), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="wan14b-480p,wan1.3b-480p,ltx,wan-720p")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the 8-bit kernel's launch configurations")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "accuracy": [], "speed": []}
    for name in args.shapes.split(","):
        for inputs in ("structured", "random"):
            report["accuracy"].append(accuracy(name, inputs))
            torch.cuda.empty_cache()
        if not args.no_speed:
            report["speed"].append(speed(name, args.rounds, args.sweep))
            torch.cuda.empty_cache()
        (args.out / "quant_kernel.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
