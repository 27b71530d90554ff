"""Triton forward kernel: attention over a per-q-tile work list, marking negligible tiles in-kernel.

One program handles one (batch, head, q-tile). It walks its work list (the computed k-tiles in
visit order), runs the online softmax in log2 units with the softmax scale folded into the
scores, and, when marking is on, tests each tile against the running row maxima it already holds:
a tile whose every row max lies `threshold` below the running max is OR-ed into the packed skip
mask, which only this program writes for its row of tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..state import TileGeometry

LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 operands as raw uint16 bits; UPCAST (set only
    # when interpreting bfloat16) multiplies their exact float32 values instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _lite_attention_fwd(
    Q, K, V, Out, Lse, Bits, Entries, Counts,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    heads, seq_q, seq_k, k_tiles, words,
    qk_scale, threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LIST: tl.constexpr, MARK: tl.constexpr, WRITE_LSE: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    row = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m  # (b, h, q-tile) row of the tile grid

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < seq_q
    d_valid = offs_d < HEAD_DIM

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if USE_LIST:
        count = tl.load(Counts + row)
    else:
        count = k_tiles
    for idx in range(0, count):
        if USE_LIST:
            entry = tl.load(Entries + row * k_tiles + idx)
            kt = tl.where(entry >= 0, entry, -entry - 1)
        else:
            kt = idx
        offs_k = kt * BLOCK_N + offs_n
        k_valid = offs_k < seq_k
        k = tl.load(
            k_base + offs_k[None, :] * stride_ks + offs_d[:, None],
            mask=k_valid[None, :] & d_valid[:, None], other=0.0,
        )
        s = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT) * qk_scale
        if not EVEN_N:
            s = tl.where(k_valid[None, :], s, float("-inf"))
        tile_max = tl.max(s, 1)
        if MARK:
            # Padding rows count as negligible so they never veto a mark; the first visited tile
            # has m_i = -inf, so tile_max - m_i = +inf and it is never marked.
            negligible = ((tile_max - m_i) < threshold) | (offs_m >= seq_q)
            all_negligible = tl.min(negligible.to(tl.int32), 0) == 1
            tl.atomic_or(Bits + row * words + kt // 32, 1 << (kt % 32), mask=all_negligible & (entry >= 0))
        m_new = tl.maximum(m_i, tile_max)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_k[:, None] * stride_vs + offs_d[None, :],
            mask=k_valid[:, None] & d_valid[None, :], other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_valid)


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TileGeometry,
    *,
    scale: float,
    threshold: float,
    bits: torch.Tensor | None,
    work: tuple[torch.Tensor, torch.Tensor] | None,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel. ``work`` is (entries, counts) from TilePlan.work_list, or None for every
    tile in ascending order; ``bits`` is the packed mask to mark into, or None for no marking."""
    batch, seq_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if return_lse else None
    mark = bits is not None and threshold != -math.inf
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    entries, counts = work if work is not None else (dummy, dummy)
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (geometry.q_tiles, batch * heads)
    _lite_attention_fwd[grid](
        q, k, v, out, lse if lse is not None else dummy, bits if mark else dummy, entries, counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq_q, k.shape[1], geometry.k_tiles, geometry.words,
        scale * LOG2E, threshold if mark else 0.0,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=geometry.block_m, BLOCK_N=geometry.block_n,
        USE_LIST=work is not None, MARK=mark, WRITE_LSE=return_lse, EVEN_N=k.shape[1] % geometry.block_n == 0,
        UPCAST_DOT=q.dtype == torch.bfloat16 and not q.is_cuda,
        num_warps=4 if geometry.block_m * block_d <= 64 * 128 else 8,
        num_stages=2,
    )
    return out, lse
