"""The reference backend: a readable PyTorch tile loop that defines LiteAttention's semantics.

It is the oracle the kernels are tested against and the CPU execution path. For each q-tile it
visits the k-tiles in the plan's order, runs the online-softmax update on the computed ones, and
applies the marking rule with the running row maxima it has at that moment. Work is batched over
(batch, head); a tile that no (batch, head) computes is not touched at all.
"""

from __future__ import annotations

import math

import torch

from .plan import TilePlan

LOG2E = math.log2(math.e)


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: TilePlan,
    *,
    scale: float,
    threshold: float,
    mark: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention over the plan's computed tiles.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D). Returns the output (q's shape and dtype), the LSE
    (B, H, Sq) float32 in natural log, and, if ``mark``, the newly marked tiles (B, H, Qt, Kt) bool.
    """
    g = plan.geometry
    batch, _, heads, head_dim = q.shape
    work_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(work_dtype) for t in (q, k, v))  # (B, H, S, D)
    out = torch.empty(batch, heads, g.seq_q, head_dim, dtype=work_dtype, device=q.device)
    lse = torch.empty(batch, heads, g.seq_q, dtype=work_dtype, device=q.device)
    marked = torch.zeros(batch, heads, g.q_tiles, g.k_tiles, dtype=torch.bool, device=q.device) if mark else None
    markable = plan.markable.tolist()
    order = plan.order.tolist()
    scale_log2 = scale * LOG2E  # scores in log2 units, as the online softmax uses them

    for i in range(g.q_tiles):
        rows = slice(i * g.block_m, min((i + 1) * g.block_m, g.seq_q))
        q_tile = qh[:, :, rows]
        m = torch.full(q_tile.shape[:-1], -math.inf, dtype=work_dtype, device=q.device)  # running max (log2)
        l = torch.zeros_like(m)  # running sum of exp2(s - m)
        acc = torch.zeros_like(q_tile)
        for j in order[i]:
            computed = None if plan.computed is None else plan.computed[:, :, i, j]  # (B, H)
            if computed is not None and not bool(computed.any()):
                continue
            cols = slice(j * g.block_n, min((j + 1) * g.block_n, g.seq_k))
            s = (q_tile @ kh[:, :, cols].transpose(-1, -2)) * scale_log2  # (B, H, rows, cols)
            tile_max = s.amax(-1)
            if mark and markable[j]:
                # Marking rule: every row's tile max lies `threshold` below the running max before
                # the tile. m = -inf before the first computed tile, so that tile is never marked.
                negligible = ((tile_max - m) < threshold).all(-1)
                marked[:, :, i, j] = negligible if computed is None else negligible & computed
            if computed is not None:
                off = ~computed[..., None]
                s = s.masked_fill(off[..., None], -math.inf)
                tile_max = tile_max.masked_fill(off, -math.inf)
            m_new = torch.maximum(m, tile_max)
            # Rows of a (batch, head) that skips this tile keep m_new = m; where m is still -inf the
            # plain formula would give exp2(-inf + inf) = NaN, so those rows are pinned to a no-op.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp2(m - m_safe)
            p = torch.exp2(s - m_safe[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vh[:, :, cols]
            m = m_new
        out[:, :, rows] = acc / l[..., None]
        lse[:, :, rows] = (m + torch.log2(l)) / LOG2E

    return out.transpose(1, 2).to(q.dtype), lse.to(torch.float32), marked
