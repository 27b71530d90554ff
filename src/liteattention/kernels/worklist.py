"""The work list: which k-tiles each q-tile computes, in which order, built on the device from
the packed skip mask; and the marking of tiles through it, which both attention kernels share.

``plan_work`` runs one program per (batch, head, q-tile) row: it unpacks the row's mask bits,
applies the must-do / must-skip tile flags and the anchor rule (plan.py holds the same rules for
the reference), and writes the computed k-tiles in visit order, the diagonal tile first and then
the rest ascending; it also counts computed and already-marked tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..state import TileGeometry


@dataclass(frozen=True)
class WorkList:
    """The k-tiles each (batch, head, q-tile) row computes in one call, in visit order.

    entries: int32 (B, H, Qt, Kt). Row r's first ``counts[r]`` entries are its computed k-tiles
        in visit order, each stored as ``kt`` when the call may mark it and as ``-(kt + 1)`` when
        it is must-do (never marked); the entries after them are undefined.
    counts: int32 (B, H, Qt), at least 1 per row (the anchor tile).

    The order puts a partial last k-tile, if computed, first or last in a row: the Gluon kernel
    masks keys and reads entries only at the ends of a row.
    """

    entries: torch.Tensor
    counts: torch.Tensor


@triton.jit
def _bit(words_ptr, index, mask):
    word = tl.load(words_ptr + index // 32, mask=mask, other=0)
    return ((word >> (index % 32)) & 1) == 1


@triton.jit
def _plan_work(
    Bits, DoWords, SkipWords, Entries, Counts, Stats,
    q_tiles, k_tiles, words, seq_q, seq_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    q_tile = tl.program_id(0) % q_tiles
    pos = tl.arange(0, BLOCK_K)
    valid = pos < k_tiles
    # Visit order: the diagonal tile (holding key floor(first_row * Sk / Sq)) first, then ascending.
    diag = ((q_tile.to(tl.int64) * BLOCK_M * seq_k) // seq_q // BLOCK_N).to(tl.int32)
    kt = tl.where(pos == 0, diag, tl.where(pos <= diag, pos - 1, pos))
    marked = _bit(Bits + row * words, kt, valid)
    must_do = _bit(DoWords, kt, valid)
    must_skip = _bit(SkipWords, kt, valid)
    # The anchor, the first tile in visit order that is not must-skip, is computed even if marked
    # (plan.anchor_tiles): no row is left without keys.
    anchor = pos == tl.min(tl.where(valid & ~must_skip, pos, BLOCK_K), 0)
    computed = valid & ((~marked & ~must_skip) | must_do | anchor)
    rank = tl.cumsum(computed.to(tl.int32), 0) - 1
    tl.store(Entries + row * k_tiles + rank, tl.where(must_do, -kt - 1, kt), mask=computed)
    count = tl.sum(computed.to(tl.int32), 0)
    tl.store(Counts + row, count)
    tl.atomic_add(Stats, count.to(tl.int64))
    tl.atomic_add(Stats + 1, tl.sum((valid & marked).to(tl.int64), 0))


def plan_work(
    bits: torch.Tensor, do_words: torch.Tensor, skip_words: torch.Tensor, geometry: TileGeometry, stats: torch.Tensor
) -> WorkList:
    """The work list of a call from the packed mask ``bits`` (B, H, Qt, words) and the packed
    must-do / must-skip tile flags (plan.range_words); adds the tiles computed and the tiles
    marked before the call to ``stats`` [0] and [1]."""
    batch, heads, q_tiles, _ = bits.shape
    g = geometry
    entries = torch.empty(batch, heads, q_tiles, g.k_tiles, dtype=torch.int32, device=bits.device)
    counts = torch.empty(batch, heads, q_tiles, dtype=torch.int32, device=bits.device)
    _plan_work[(batch * heads * q_tiles,)](
        bits, do_words, skip_words, entries, counts, stats,
        q_tiles, g.k_tiles, g.words, g.seq_q, g.seq_k,
        BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=max(32, triton.next_power_of_2(g.k_tiles)),
    )
    return WorkList(entries, counts)


def plan_unmasked(
    batch: int, heads: int, do_words: torch.Tensor, skip_words: torch.Tensor, geometry: TileGeometry, stats: torch.Tensor
) -> WorkList:
    """The work list of a call with no mask of its own: every tile but the must-skip ranges."""
    nothing = torch.zeros(geometry.mask_shape(batch, heads), dtype=torch.int32, device=do_words.device)
    return plan_work(nothing, do_words, skip_words, geometry, stats)


@triton.jit
def and_combine(a, b):
    return a & b


@triton.jit
def mark_word(word, group_start, count, entries_row, bits_row, SIZE: tl.constexpr):
    """Mark the tiles at visit positions [group_start, group_start + SIZE) of a work-list row whose
    bit is set in word (bit j for position group_start + j; must-do entries never); returns how
    many."""
    lane = tl.arange(0, SIZE)
    pos = group_start + lane
    entry = tl.load(entries_row + pos, mask=pos < count, other=-1)
    hit = (pos < count) & (entry >= 0) & (((word >> lane.to(tl.int64)) & 1) == 1)
    tl.atomic_or(bits_row + entry // 32, 1 << (entry % 32), mask=hit)
    return tl.sum(hit.to(tl.int64), 0)
