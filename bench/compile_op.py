"""The registered op compiled on the GPU, in each torch.compile mode, against eager calls.

Thresholds change from call to call (as a schedule changes them from step to step): the compiled
op must follow them, marking the same tiles as eager ``lite_attention``. Under mode="reduce-overhead"
(CUDA graphs) inductor splits the graph around the op (tagged cudagraph_unsafe: it decides on the
host at every call) and captures the rest; its cudagraph log, printed here, shows the partitions.
Exits non-zero if a mode differs from eager or if no tile was marked.
Usage: PYTHONPATH=src python bench/compile_op.py
"""

import argparse
import math

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="4,16,64", help="latent frames,height,width of the video tokens (bfloat16 on cuda)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--modes", default="default,reduce-overhead,max-autotune-no-cudagraphs")
    args = p.parse_args()

    from liteattention import SkipState, lite_attention
    from liteattention.ops import COUNTS
    from liteattention.synthetic import video_qkv

    torch._logging.set_logs(perf_hints=True, cudagraphs=True)
    # Video-like tokens (attention peaked on nearby tokens, as in a real model), so that the
    # thresholds below mark tiles; i.i.d. Gaussians would leave every tile near its row maximum.
    grid = tuple(int(x) for x in args.grid.split(","))
    q, k, v = video_qkv(1, grid, args.heads, args.head_dim, device="cuda")

    def attend(q, k, v, bits, counts, threshold):
        out, _ = torch.ops.liteattention.attention(q, k, v, bits, counts, threshold, [], [], None, 128, 64, "auto")
        return out * 2

    failures = 0
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        compiled = torch.compile(attend, fullgraph=True, mode=mode)
        state = SkipState.for_inputs(q, k)
        bits = torch.zeros_like(state.bits)
        counts = torch.zeros(COUNTS, dtype=torch.int64, device="cuda")
        same = True
        for threshold in (-math.inf, -4.0, -4.0, -2.0, -2.0, -1.0):
            got = compiled(q, k, v, bits, counts, torch.tensor(threshold, dtype=torch.float64))
            expected = lite_attention(q, k, v, state, threshold=threshold) * 2
            same &= torch.equal(bits, state.bits) and (got.float() - expected.float()).abs().max().item() < 1e-2
        marked = state.mask().float().mean().item()
        print(f"{mode}: same outputs and marks as eager: {same}; marked {marked:.3f}; counts {counts.tolist()}")
        failures += (not same) + (marked == 0)
    if failures:
        raise SystemExit(f"{failures} failure(s): compiled and eager differ, or no tile was marked (no test of marking)")


if __name__ == "__main__":
    main()
