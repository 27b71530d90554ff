"""The reference backend: a readable PyTorch tile loop that defines LiteAttention's semantics.

It is the oracle the kernels are tested against and the CPU execution path. Every q-tile visits
its k-tiles in the plan's order and runs the online-softmax update on the computed ones, applying
the marking rule with the running row maxima it holds at that moment. q-tiles are independent, so
the loop runs over visit positions p and handles, at each p, the p-th tile of every (batch, head,
q-tile) row at once, gathering only the rows that compute their p-th tile: work is proportional to
the tiles computed.
"""

from __future__ import annotations

import math

import torch

from .plan import TilePlan

LOG2E = math.log2(math.e)


def _tiles(t: torch.Tensor, block: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, count, block, D), zero-padded to whole tiles."""
    t = t.transpose(1, 2).to(dtype)
    t = torch.nn.functional.pad(t, (0, 0, 0, count * block - t.shape[2]))
    return t.unflatten(2, (count, block))


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
    device = q.device
    q_tiles = _tiles(q, g.block_m, g.q_tiles, work_dtype)  # (B, H, Qt, BM, D)
    k_tiles = _tiles(k, g.block_n, g.k_tiles, work_dtype)  # (B, H, Kt, BN, D)
    v_tiles = _tiles(v, g.block_n, g.k_tiles, work_dtype)
    # Padding keys score -inf; padding query rows are computed but never stored and never veto a mark.
    key_valid = (torch.arange(g.k_tiles * g.block_n, device=device) < g.seq_k).view(g.k_tiles, g.block_n)
    row_padding = (torch.arange(g.q_tiles * g.block_m, device=device) >= g.seq_q).view(g.q_tiles, g.block_m)

    rows = (batch, heads, g.q_tiles)
    m = torch.full((*rows, g.block_m), -math.inf, dtype=work_dtype, device=device)  # running max (log2)
    l = torch.zeros_like(m)  # running sum of exp2(s - m)
    acc = torch.zeros(*rows, g.block_m, head_dim, dtype=work_dtype, device=device)
    marked = torch.zeros(*rows, g.k_tiles, dtype=torch.bool, device=device) if mark else None
    scale_log2 = scale * LOG2E  # scores in log2 units, as the online softmax uses them

    if plan.computed is None:  # dense: every row computes its p-th tile, at every p
        every_row = torch.ones(rows, dtype=torch.bool, device=device).nonzero(as_tuple=True)
    for p in range(g.k_tiles):
        kt = plan.order[:, p]  # the k-tile each q-tile visits at position p
        if plan.computed is None:
            b, h, i = every_row
        else:  # the rows computing their p-th tile
            computed = plan.computed.gather(-1, kt.view(1, 1, -1, 1).expand(*rows, 1)).squeeze(-1)
            b, h, i = computed.nonzero(as_tuple=True)
        if b.numel() == 0:
            continue
        j = kt[i]
        s = (q_tiles[b, h, i] @ k_tiles[b, h, j].transpose(-1, -2)) * scale_log2  # (N, BM, BN)
        s = s.masked_fill(~key_valid[j][:, None, :], -math.inf)
        tile_max = s.amax(-1)
        m_prev = m[b, h, i]
        if mark:
            # Marking rule: every row's tile max lies `threshold` below the running max before the
            # tile. m_prev = -inf before the first computed tile, so that tile is never marked.
            negligible = ((tile_max - m_prev) < threshold) | row_padding[i]
            marked[b, h, i, j] = negligible.all(-1) & plan.markable[j]
        m_new = torch.maximum(m_prev, tile_max)
        alpha = torch.exp2(m_prev - m_new)
        weights = torch.exp2(s - m_new[..., None])
        l[b, h, i] = l[b, h, i] * alpha + weights.sum(-1)
        acc[b, h, i] = acc[b, h, i] * alpha[..., None] + weights @ v_tiles[b, h, j]
        m[b, h, i] = m_new

    out = (acc / l[..., None]).flatten(2, 3)[:, :, : g.seq_q]
    lse = ((m + torch.log2(l)) / LOG2E).flatten(2, 3)[:, :, : g.seq_q]
    # Contiguous, as the GPU kernels return them (a caller may .view the heads together).
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.to(torch.float32).contiguous(), marked
