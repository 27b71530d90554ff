"""Tile arithmetic for calibration: marking scores, and the output of one call under many masks.

Both follow the operator's semantics (``reference.py``) but compute a whole call at once with
dense matrix products, which is what calibration needs:

* ``score``: for every tile a call computes, the smallest threshold that would have marked it.
  The marking rule marks a tile iff ``max_r (tile_max[r] - m_prev[r]) < threshold`` over its valid
  rows, where ``m_prev`` is the running row max before the tile in the visit order (diagonal tile
  first, then ascending) over the tiles the call computes. That maximum does not depend on the
  threshold, so one pass gives the marks of every threshold: ``marked(t) = score < t``. Tiles the
  call does not compute, must-do tiles and each q-tile's first computed tile score +inf.
* ``candidate outputs``: the call's exact softmax output when, on top of the current mask, the
  tiles with ``score_prev < t`` are skipped, for every threshold ``t`` of a grid at once. Each
  tile's share of the softmax (its exp-sum and exp-weighted value sum, against the dense row
  max) is computed once; a candidate's output is the kept shares' sum over their exp-sum. The
  candidates' masks are nested, so the removed shares are a cumulative sum over score buckets.

Work is chunked over (batch, head) pairs so that memory stays bounded at real model shapes.
"""

from __future__ import annotations

import math
import torch

from ..plan import anchor_tiles, must_do_tiles, visit_order
from ..reference import LOG2E
from ..state import TileGeometry

METRICS = ("rel_l2", "cosine", "l1")
"""Per-call error metrics against dense attention on the same inputs, per batch element:
rel_l2 = ||o - o_dense|| / ||o_dense||; l1 = sum |o - o_dense| / sum |o_dense| (relative L1);
cosine = mean over (head, query row) of 1 - cos(o_row, o_dense_row)."""

CHUNK_ELEMENTS = 2**24  # float32 elements of the largest per-chunk intermediate (64 MiB)
KEEP_ELEMENTS = 2**26  # candidate outputs of a whole call kept up to this size (256 MiB), else recomputed


def _tile_scores(tile_max: torch.Tensor, geometry: TileGeometry, computed: torch.Tensor, markable: torch.Tensor,
                 order: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Scores (C, Qt, Kt) from the tiles' row maxima ``tile_max`` (C, Qt, BM, Kt) in log2 units.

    computed: bool (C, Qt, Kt); markable: bool (Kt,); order: (Qt, Kt); row_valid: bool (Qt, BM).
    """
    c, nq = tile_max.shape[:2]
    g = geometry
    index = order.view(1, nq, 1, g.k_tiles).expand(c, -1, g.block_m, -1)
    visited = tile_max.gather(-1, index)  # in visit order
    computed_o = computed.gather(-1, order.expand(c, -1, -1))
    running = visited.masked_fill(~computed_o[:, :, None, :], -math.inf).cummax(-1).values
    m_prev = torch.cat([torch.full_like(running[..., :1], -math.inf), running[..., :-1]], -1)
    gap = visited - m_prev  # +inf before the first computed tile
    gap = gap.masked_fill(~row_valid.view(1, nq, g.block_m, 1), -math.inf)  # padding rows never veto
    score_o = gap.amax(2)  # (C, Qt, Kt) in visit order
    score_o = score_o.masked_fill(~computed_o | ~markable[order].unsqueeze(0), math.inf)
    score = torch.empty_like(score_o)
    return score.scatter_(-1, order.expand(c, -1, -1), score_o)


def _padded(t: torch.Tensor, length: int) -> torch.Tensor:
    """(C, S, D) zero-padded to (C, length, D)."""
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))


def _chunks(batch: int, heads: int, q_tiles: int, per_tile: int) -> list[tuple[int, int, int, int, int]]:
    """(batch index, first head, end head, first q-tile, end q-tile) chunks of about CHUNK_ELEMENTS
    elements each, ``per_tile`` being the elements one (head, q-tile) takes."""
    tiles = max(1, CHUNK_ELEMENTS // max(per_tile, 1))  # (head, q-tile) pairs per chunk
    if tiles >= q_tiles:
        step = min(heads, tiles // q_tiles)
        return [(b, h, min(h + step, heads), 0, q_tiles) for b in range(batch) for h in range(0, heads, step)]
    return [(b, h, h + 1, t, min(t + tiles, q_tiles)) for b in range(batch) for h in range(heads)
            for t in range(0, q_tiles, tiles)]


def _rows(t: torch.Tensor, b: int, h0: int, h1: int, t0: int, t1: int, block: int, work: torch.dtype) -> torch.Tensor:
    """Rows of tiles t0 .. t1 of t (B, S, H, D), heads h0 .. h1 of batch element b, as (C, rows, D) zero-padded."""
    return _padded(t[b, t0 * block : t1 * block, h0:h1].transpose(0, 1).to(work), (t1 - t0) * block)


def evaluate_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TileGeometry,
    *,
    scale: float,
    mask: torch.Tensor | None,
    previous_scores: torch.Tensor | None,
    grid: torch.Tensor,
    metric: str,
    must_do: tuple[tuple[int, int], ...] = (),
) -> tuple[torch.Tensor, "Committer"]:
    """Errors of every candidate mask of one call, and a committer that produces the chosen
    candidate's output and the call's own marking scores.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D). ``mask``: bool (B, H, Qt, Kt), the tiles skipped so far
    (None: none). ``previous_scores``: (B, H, Qt, Kt), the scores of this layer's previous call
    (None: no previous call; then only the first candidate exists). Candidate 0 adds no marks
    (threshold -inf); candidate i >= 1 adds the tiles with ``previous_scores < grid[i - 1]``
    (``grid`` ascending). Returns (errors (B, 1 + len(grid)) float64, committer).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    batch, seq_q, heads, head_dim = q.shape
    g = geometry
    device = q.device
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    count = 1 + (len(grid) if previous_scores is not None else 0)
    if mask is None:
        mask = torch.zeros(batch, heads, g.q_tiles, g.k_tiles, dtype=torch.bool, device=device)
    # Must-do tiles and each q-tile's anchor (its first visited tile) are always computed.
    order = visit_order(g, device)
    anchors = anchor_tiles(order, torch.zeros(g.k_tiles, dtype=torch.bool, device=device))
    mask = mask & ~must_do_tiles(must_do, g, device) & ~anchors
    # Bucket of each tile: 0..G-1 = first marked by grid[i] (candidate i + 1 on), G = never
    # marked, G + 1 = skipped already.
    buckets = len(grid) + 2
    if previous_scores is not None:
        bucket = torch.bucketize(previous_scores.to(grid.dtype), grid, right=True)
    else:
        bucket = torch.full(mask.shape, len(grid), dtype=torch.int64, device=device)
    bucket = bucket.masked_fill(mask, buckets - 1)
    sum_diff = torch.zeros(batch, count, dtype=torch.float64, device=device)
    sum_ref = torch.zeros(batch, dtype=torch.float64, device=device)
    key_valid = (torch.arange(g.k_tiles * g.block_n, device=device) < g.seq_k)
    row_valid = (torch.arange(g.q_tiles * g.block_m, device=device) < g.seq_q).view(g.q_tiles, g.block_m)
    scale_log2 = scale * LOG2E
    outputs: dict[tuple[int, int], torch.Tensor] = {}  # chunk -> candidate outputs, when kept
    maxima: dict[tuple[int, int], torch.Tensor] = {}  # chunk -> tile row maxima (C, Qt, BM, Kt), when kept
    per_tile = g.block_m * max(g.k_tiles * g.block_n, g.k_tiles * head_dim, buckets * head_dim, count * head_dim)
    chunks = _chunks(batch, heads, g.q_tiles, per_tile)
    keep = len(chunks) == 1 or batch * heads * g.q_tiles * g.block_m * count * head_dim <= KEEP_ELEMENTS
    for b, h0, h1, t0, t1 in chunks:
        c, nq = h1 - h0, t1 - t0
        qc = _rows(q, b, h0, h1, t0, t1, g.block_m, work)  # (C, nq * BM, D)
        kc = _rows(k, b, h0, h1, 0, g.k_tiles, g.block_n, work)
        vc = _rows(v, b, h0, h1, 0, g.k_tiles, g.block_n, work)
        s = (qc @ kc.transpose(1, 2)) * scale_log2
        s.masked_fill_(~key_valid, -math.inf)
        s = s.view(c, nq, g.block_m, g.k_tiles, g.block_n)
        skipped = mask[b, h0:h1, t0:t1].view(c, nq, 1, g.k_tiles, 1)
        # Shares of skipped tiles against the dense row max, the others against the row max over
        # the computed tiles, so that no candidate's kept sum underflows.
        tile_max = s.amax(-1, keepdim=True)  # (C, Qt, BM, Kt, 1)
        if keep:
            maxima[(b, h0, t0)] = tile_max.squeeze(-1)
        m_dense = tile_max.amax(3, keepdim=True)
        m_kept = tile_max.masked_fill(skipped, -math.inf).amax(3, keepdim=True)
        p = torch.exp2(s - torch.where(skipped, m_dense, m_kept))
        del s
        shares_l = p.sum(-1)  # (C, Qt, BM, Kt)
        shares_n = torch.einsum("cqmkn,cknd->cqmkd", p, vc.view(c, g.k_tiles, g.block_n, head_dim))
        del p
        idx = bucket[b, h0:h1, t0:t1].view(c, nq, 1, g.k_tiles)
        by_bucket_l = torch.zeros(c, nq, g.block_m, buckets, dtype=work, device=device)
        by_bucket_l.scatter_add_(-1, idx.expand(-1, -1, g.block_m, -1), shares_l)
        by_bucket_n = torch.zeros(c, nq, g.block_m, buckets, head_dim, dtype=work, device=device)
        by_bucket_n.scatter_add_(3, idx.unsqueeze(-1).expand(-1, -1, g.block_m, -1, head_dim), shares_n)
        del shares_l, shares_n
        # Kept shares of candidate i: buckets i .. G (a sum of kept parts only, no cancellation).
        kept_l = by_bucket_l[..., :-1].flip(3).cumsum(3).flip(3)[..., :count]  # (C, Qt, BM, count)
        kept_n = by_bucket_n[..., :-1, :].flip(3).cumsum(3).flip(3)[..., :count, :]
        cand = kept_n / kept_l.clamp_min(torch.finfo(work).tiny).unsqueeze(-1)  # (C, Qt, BM, count, D)
        rescale = torch.exp2(m_kept - m_dense).view(c, nq, g.block_m)  # <= 1
        total_l = by_bucket_l[..., -1] + kept_l[..., 0] * rescale
        total_n = by_bucket_n[..., -1, :] + kept_n[..., 0, :] * rescale.unsqueeze(-1)
        dense = total_n / total_l.unsqueeze(-1)  # (C, Qt, BM, D)
        valid = row_valid[t0:t1].view(1, nq, g.block_m, 1)
        diff = (cand - dense.unsqueeze(3)) * valid.unsqueeze(-1)
        ref = dense * valid
        if metric == "rel_l2":
            sum_diff[b] += diff.square().sum((0, 1, 2, 4)).double()
            sum_ref[b] += ref.square().sum().double()
        elif metric == "l1":
            sum_diff[b] += diff.abs().sum((0, 1, 2, 4)).double()
            sum_ref[b] += ref.abs().sum().double()
        else:
            cos = torch.nn.functional.cosine_similarity(cand, dense.unsqueeze(3).expand_as(cand), dim=-1)
            sum_diff[b] += ((1.0 - cos.double()) * valid).sum((0, 1, 2))
        if keep:
            outputs[(b, h0, t0)] = cand
    if metric == "rel_l2":
        errors = (sum_diff / sum_ref.clamp_min(1e-300).unsqueeze(1)).sqrt()
    elif metric == "l1":
        errors = sum_diff / sum_ref.clamp_min(1e-300).unsqueeze(1)
    else:
        errors = sum_diff / (heads * seq_q)
    committer = Committer(q, k, v, geometry, scale, mask, bucket, must_do, (outputs, maxima) if keep else None, chunks)
    return errors, committer


class Committer:
    """Turns the chosen candidate of :func:`evaluate_call` into the call's output and the new mask
    and scores. Reuses the candidate outputs when they were kept; otherwise recomputes, chunk by
    chunk, the exact attention over the kept tiles."""

    def __init__(self, q, k, v, geometry, scale, mask, bucket, must_do, outputs, chunks) -> None:
        self._q, self._k, self._v = q, k, v
        self._geometry, self._scale = geometry, scale
        self._mask, self._bucket, self._must_do = mask, bucket, must_do
        self._outputs, self._chunks = outputs, chunks

    def commit(self, candidate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output (B, Sq, H, D) in q's dtype, new mask bool (B, H, Qt, Kt), scores (B, H, Qt, Kt))
        for candidate ``candidate``: its mask is the old one plus buckets < candidate."""
        q, k, v, g = self._q, self._k, self._v, self._geometry
        batch, seq_q, heads, head_dim = q.shape
        device = q.device
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = self._mask | (self._bucket < candidate)
        markable = ~must_do_tiles(self._must_do, g, device)
        order = visit_order(g, device)
        key_valid = torch.arange(g.k_tiles * g.block_n, device=device) < g.seq_k
        row_valid = (torch.arange(g.q_tiles * g.block_m, device=device) < g.seq_q).view(g.q_tiles, g.block_m)
        scale_log2 = self._scale * LOG2E
        out = torch.empty(batch, heads, g.q_tiles * g.block_m, head_dim, dtype=work, device=device)
        scores = torch.empty(batch, heads, g.q_tiles, g.k_tiles, dtype=work, device=device)
        for b, h0, h1, t0, t1 in self._chunks:
            c, nq = h1 - h0, t1 - t0
            rows = slice(t0 * g.block_m, t1 * g.block_m)
            computed = ~mask[b, h0:h1, t0:t1]
            if self._outputs is not None:
                outputs, maxima = self._outputs
                tile_max = maxima[(b, h0, t0)]
                out[b, h0:h1, rows] = outputs[(b, h0, t0)][:, :, :, candidate].flatten(1, 2)
            else:
                qc = _rows(q, b, h0, h1, t0, t1, g.block_m, work)
                kc = _rows(k, b, h0, h1, 0, g.k_tiles, g.block_n, work)
                vc = _rows(v, b, h0, h1, 0, g.k_tiles, g.block_n, work)
                s = (qc @ kc.transpose(1, 2)) * scale_log2
                s.masked_fill_(~key_valid, -math.inf)
                tile_max = s.view(c, nq, g.block_m, g.k_tiles, g.block_n).amax(-1)
                skipped = (~computed).repeat_interleave(g.block_m, 1).repeat_interleave(g.block_n, 2)
                s.masked_fill_(skipped, -math.inf)
                out[b, h0:h1, rows] = torch.softmax(s * math.log(2.0), -1) @ vc
            scores[b, h0:h1, t0:t1] = _tile_scores(tile_max, g, computed, markable, order[t0:t1], row_valid[t0:t1])
        output = out[:, :, :seq_q].transpose(1, 2).to(q.dtype)
        return output, mask, scores
