"""The registered op compiled on the GPU, in each torch.compile mode, against eager calls.

Thresholds change from call to call (as a schedule changes them from step to step): the compiled
op must follow them, marking the same tiles as eager ``lite_attention``. Under mode="reduce-overhead"
(CUDA graphs) inductor may decline to capture a graph that takes the threshold as a CPU scalar; the
perf hints it prints say so. Usage: PYTHONPATH=src python bench/compile_op.py
"""

import argparse
import math

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,4096,8,128", help="B,S,H,D (bfloat16 on cuda)")
    p.add_argument("--modes", default="default,reduce-overhead,max-autotune-no-cudagraphs")
    args = p.parse_args()

    from liteattention import SkipState, lite_attention
    from liteattention.ops import COUNTS

    torch._logging.set_logs(perf_hints=True, cudagraphs=True)
    shape = tuple(int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def attend(q, k, v, bits, counts, threshold):
        out, _ = torch.ops.liteattention.attention(q, k, v, bits, counts, threshold, [], [], None, 128, 64, "auto")
        return out * 2

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
        print(f"{mode}: same outputs and marks as eager: {same}; marked {state.mask().float().mean().item():.3f}; counts {counts.tolist()}")


if __name__ == "__main__":
    main()
