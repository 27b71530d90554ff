"""LiteAttention as registered torch ops, for ``torch.compile`` (and anything else that traces).

``torch.ops.liteattention.attention`` is :func:`~liteattention.lite_attention` behind
``torch.library.custom_op``: the compiler sees one opaque node with a fake (shape-only)
implementation, instead of tracing into the Triton launch or the reference loop. The skip mask is
the op's ``bits`` argument, which it marks in place (declared as mutated, so the compiler orders
calls and keeps the writes), and ``counts`` accumulates on the device what each call did, without
a host sync. The threshold is a 0-d tensor, an input of the graph rather than a constant baked into
it: a new threshold (per step, per layer) reuses the compiled graph instead of recompiling it.

    shape = TileGeometry(Sq, Sk, block_m=128, block_n=64).mask_shape(B, H)  # (B, H, Qt, ceil(Kt / 32))
    bits = torch.zeros(shape, dtype=torch.int32, device=q.device)  # or a SkipState's bits
    counts = torch.zeros(COUNTS, dtype=torch.int64, device=q.device)
    out, lse = torch.ops.liteattention.attention(
        q, k, v, bits, counts, torch.tensor(-10.0, dtype=torch.float64),
        must_do=[0, 256], must_skip=[], scale=None, block_m=128, block_n=64, backend="auto", quant=None,
    )

``must_do`` / ``must_skip`` are flat lists ``[start0, end0, start1, end1, ...]`` (key ranges
[start, end)); ``scale=None`` means head_dim ** -0.5. ``bits=None`` is dense attention (``counts``
may then be None too). Keep the threshold tensor on the CPU: the op reads its value on the host
(the kernels take the threshold by value), and a CPU scalar costs no device sync.
"""

from __future__ import annotations

import math

import torch

from .attention import lite_attention
from .state import SkipState

__all__ = ["COUNTS", "HOST_OP_TAGS", "attention", "counts_sparsity", "state_zeros"]

HOST_OP_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
"""Tags of the ops that must run on the host at every call (attention: threshold and work list; the
step clock; the state allocation): under CUDA graphs (``mode="reduce-overhead"``) inductor splits the
graph around them and runs them eagerly between the captured parts, since a replayed graph would
repeat the recorded call's decisions (or reuse its memory). Without the tag (older torch), inductor
declines to capture any graph holding them (mutated inputs)."""

COUNTS = 4
"""Entries of the ``counts`` accumulator: tiles computed, tiles marked before the call, tiles newly
marked, tiles in all (B * H * Qt * Kt), each summed over the calls since it was zeroed."""


def counts_sparsity(counts: torch.Tensor) -> float:
    """Fraction of tiles skipped over the calls ``counts`` summed (NaN if none)."""
    computed, _, _, total = counts.tolist()
    return math.nan if total == 0 else 1.0 - computed / total


def _pairs(flat: list[int]) -> list[tuple[int, int]] | None:
    if len(flat) % 2:
        raise ValueError(f"ranges must be a flat list of (start, end) pairs, got {len(flat)} numbers")
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)] or None


class _CallState(SkipState):
    """The op's view of ``bits`` for one call: keeps that call's counts instead of a history."""

    call_counts: torch.Tensor

    def record(self, threshold: float, counts: torch.Tensor, step: int | None = None) -> None:
        self.call_counts = counts  # (computed, marked before, newly marked), maybe still on the device


@torch.library.custom_op("liteattention::attention", mutates_args=("bits", "counts"), tags=HOST_OP_TAGS)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bits: torch.Tensor | None,
    counts: torch.Tensor | None,
    threshold: torch.Tensor,
    must_do: list[int],
    must_skip: list[int],
    scale: float | None,
    block_m: int,
    block_n: int,
    backend: str,
    quant: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (q's shape and dtype) and LSE (B, H, Sq) float32 of :func:`lite_attention` with the
    mask ``bits``; adds the call's tile counts to ``counts`` (see ``COUNTS``)."""
    if threshold.numel() != 1:
        raise ValueError(f"threshold: expected a one-element tensor, got shape {tuple(threshold.shape)}")
    if counts is not None and tuple(counts.shape) != (COUNTS,):
        raise ValueError(f"counts: expected shape ({COUNTS},), got {tuple(counts.shape)}")
    kwargs = dict(
        threshold=float(threshold), scale=scale, return_lse=True, backend=backend,
        must_do=_pairs(must_do), must_skip=_pairs(must_skip), quant=quant,
    )
    if bits is None:
        out, lse = lite_attention(q, k, v, None, **kwargs)
        return out.contiguous(), lse.contiguous()
    state = _CallState.from_bits(bits, q.shape[1], k.shape[1], q.shape[3], q.dtype, block_m, block_n)
    out, lse = lite_attention(q, k, v, state, **kwargs)
    if counts is not None:
        counts[:3] += state.call_counts.to(device=counts.device, dtype=counts.dtype)
        counts[3] += state.total_tiles
    return out.contiguous(), lse.contiguous()  # the strides the fake promises


@attention.register_fake
def _(q, k, v, bits, counts, threshold, must_do, must_skip, scale, block_m, block_n, backend, quant=None):
    batch, seq_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@torch.library.custom_op("liteattention::state_zeros", mutates_args=(), tags=HOST_OP_TAGS)
def state_zeros(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new zeroed state tensor (a layer's mask or counters), made by an op: state made inside a
    graph captured by CUDA graphs would live in the graph's memory pool and be overwritten by its
    next replay; tagged like the attention op, this runs outside the captured parts."""
    return torch.zeros(shape, dtype=dtype, device=device)


@state_zeros.register_fake
def _(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)
