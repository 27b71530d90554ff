"""The registered op compiled on the GPU, in each torch.compile mode, against eager calls.

Thresholds change from call to call (as a schedule changes them from step to step): the compiled
op must follow them, marking the same tiles as eager ``lite_attention``. Under mode="reduce-overhead"
(CUDA graphs) inductor may decline to capture a graph that takes the threshold as a CPU scalar; the
perf hints it prints say so. Usage: PYTHONPATH=src python bench/compile_op.py
"""

import math

import torch

from liteattention import SkipState, lite_attention
from liteattention.ops import COUNTS
torch._logging.set_logs(perf_hints=True, cudagraphs=True)
q, k, v = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
def attend(q, k, v, bits, counts, th):
    out, _ = torch.ops.liteattention.attention(q, k, v, bits, counts, th, [], [], None, 128, 64, "auto")
    return out * 2
for mode in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
    torch._dynamo.reset()
    f = torch.compile(attend, fullgraph=True, mode=mode)
    st = SkipState.for_inputs(q, k); bits = torch.zeros_like(st.bits); counts = torch.zeros(COUNTS, dtype=torch.int64, device="cuda")
    ok = True
    for th in (-math.inf, -4.0, -4.0, -2.0, -2.0, -1.0):
        got = f(q, k, v, bits, counts, torch.tensor(th, dtype=torch.float64))
        exp = lite_attention(q, k, v, st, threshold=th) * 2
        ok &= torch.equal(bits, st.bits) and (got.float() - exp.float()).abs().max().item() < 1e-2
    print(mode, "match eager:", ok, "marked:", st.mask().float().mean().item(), counts.tolist())
