"""What both attention kernels' launchers share: the log2 scale, the statistics layout, and the
buffers every launch sets up."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .worklist import WorkList

# Scores are scaled by scale * LOG2E so the online softmax uses exp2; the LSE is divided back.
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
# The Triton release as (major, minor): what runs where, and what differs by more than a name.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Statistics written by the kernels, one int64 each: tiles computed, tiles marked before the call,
# tiles newly marked by the call.
STATS = 3


def launch_buffers(
    q: torch.Tensor, threshold: float, bits: torch.Tensor | None, work: WorkList | None, return_lse: bool,
) -> tuple[bool, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every forward launcher sets up: whether the call marks, the output, the LSE (or None),
    a one-element placeholder for pointer arguments a launch does not use, and the work list's
    entries and counts (placeholders without a list)."""
    batch, seq_q, heads, _ = q.shape
    mark = bits is not None and threshold != -math.inf
    if mark and work is None:
        raise ValueError("marking needs a work list")
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if return_lse else None
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    entries, counts = (work.entries, work.counts) if work is not None else (dummy, dummy)
    return mark, out, lse, dummy, entries, counts
