"""Triton kernels: work planning from the packed skip mask, and the attention forward with in-kernel marking.

``_plan_work``: one program per (batch, head, q-tile) row unpacks the row's mask bits, applies the
must-do / must-skip tile flags, and writes the computed k-tiles in visit order (diagonal first,
then ascending) as a compact work list; it also counts computed and already-marked tiles.

``_lite_attention_fwd``: one program per row walks its work list with TMA tensor-descriptor loads,
runs the online softmax in log2 units with the scale folded in, and tests each tile against the
running row maxima it already holds. The per-row verdicts of 64 consecutive tiles are kept as bits
in one int64 per row, and reduced across rows once per 64 tiles (a cross-warp reduction per tile
would cost ~13% at head dim 128); the tiles negligible in every row are OR-ed into the mask, which
only this program writes for its row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..state import TileGeometry

# Scores are scaled by scale * LOG2E so the online softmax uses exp2; the LSE is divided back.
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
# Visited tiles whose marking verdicts are reduced across rows together (bits of one int64).
GROUP: tl.constexpr = tl.constexpr(64)
# Statistics written by the kernels, one int64 each: tiles computed, tiles marked before the call,
# tiles newly marked by the call.
STATS = 3


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
    computed = valid & ((~marked & ~_bit(SkipWords, kt, valid)) | must_do)
    rank = tl.cumsum(computed.to(tl.int32), 0) - 1
    tl.store(Entries + row * k_tiles + rank, tl.where(must_do, -kt - 1, kt), mask=computed)
    count = tl.sum(computed.to(tl.int32), 0)
    tl.store(Counts + row, count)
    tl.atomic_add(Stats, count.to(tl.int64))
    tl.atomic_add(Stats + 1, tl.sum((valid & marked).to(tl.int64), 0))


@triton.jit
def _and(a, b):
    return a & b


@triton.jit
def _mark_word(word, group_start, count, entries_row, bits_row, SIZE: tl.constexpr):
    """Mark the tiles at visit positions [group_start, group_start + SIZE) whose bit is set in
    word (bit j for position group_start + j; must-do entries never); returns how many."""
    lane = tl.arange(0, SIZE)
    pos = group_start + lane
    entry = tl.load(entries_row + pos, mask=pos < count, other=-1)
    hit = (pos < count) & (entry >= 0) & (((word >> lane.to(tl.int64)) & 1) == 1)
    tl.atomic_or(bits_row + entry // 32, 1 << (entry % 32), mask=hit)
    return tl.sum(hit.to(tl.int64), 0)


@triton.jit
def _mark_group(row_bits, group_start, count, entries_row, bits_row, Stats):
    """Mark the tiles at visit positions [group_start, group_start + GROUP) found negligible in every row."""
    word = tl.reduce(row_bits, 0, _and)
    tl.atomic_add(Stats + 2, _mark_word(word, group_start, count, entries_row, bits_row, GROUP))


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 operands as raw uint16 bits; UPCAST (set only
    # when interpreting bfloat16) multiplies their exact float32 values instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(desc, b, row0, h, seq, HEAD_DIM: tl.constexpr):
    """Tile of tokens row0.. of (batch b, head h). The descriptor views the tensor as
    (B * S, H * D), so rows past the sequence end belong to the next batch element (or are
    zero-filled past the tensor's end); every caller masks them out."""
    return desc.load([b * seq + row0, h * HEAD_DIM])


@triton.jit
def _tile_at(entries_row, idx, USE_LIST: tl.constexpr):
    """The k-tile at visit position idx: from the work list, or idx itself (dense, ascending)."""
    if USE_LIST:
        entry = tl.load(entries_row + idx)
        return tl.where(entry >= 0, entry, -entry - 1)
    else:
        return idx


@triton.jit
def _attend_tile(
    q, k_desc, v_desc, b, h, kt, m_i, l_i, acc, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online-softmax update with k-tile kt (log2 units). Also returns each row's gap: the tile's
    row max minus the running max before it, which the marking rule compares to the threshold."""
    BLOCK_M: tl.constexpr = q.shape[0]
    k = _load_tile(k_desc, b, kt * BLOCK_N, h, seq_k, HEAD_DIM)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT)
    if EVEN_N:
        s = s * qk_scale
    else:
        # Keys past the end (zero-filled or another batch element's) get -inf, folded into the
        # scaling as one FMA.
        offs_n = tl.arange(0, BLOCK_N)
        s = s * qk_scale + tl.where(kt * BLOCK_N + offs_n < seq_k, 0.0, float("-inf"))[None, :]
    tile_max = tl.max(s, 1)
    m_new = tl.maximum(m_i, tile_max)
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(v_desc, b, kt * BLOCK_N, h, seq_k, HEAD_DIM)
    acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
    return m_new, l_i, acc, tile_max - m_i


@triton.jit
def _lite_attention_fwd(
    q_desc, k_desc, v_desc, Out, Lse, Bits, Entries, Counts, Stats,
    stride_ob, stride_os, stride_oh,
    heads, seq_q, seq_k, k_tiles, words,
    qk_scale, threshold,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LIST: tl.constexpr, MARK: tl.constexpr, WRITE_LSE: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    row = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m  # (b, h, q-tile) row of the tile grid
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    q = _load_tile(q_desc, b, pid_m * BLOCK_M, h, seq_q, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    padding_rows = offs_m >= seq_q  # never veto a mark
    entries_row = Entries + row * k_tiles
    bits_row = Bits + row * words

    if USE_LIST:
        count = tl.load(Counts + row)
    else:
        count = k_tiles
    if MARK:
        # Groups of GROUP visited tiles: the verdict bits of a group are reduced across rows once,
        # after its inner loop, so the inner loop stays free of branches and pipelines like the
        # dense one (each group pays one pipeline ramp).
        for group_start in range(0, count, GROUP):
            row_bits = tl.zeros([BLOCK_M], dtype=tl.int64)
            for idx in range(group_start, tl.minimum(group_start + GROUP, count)):
                kt = _tile_at(entries_row, idx, USE_LIST)
                m_i, l_i, acc, gap = _attend_tile(
                    q, k_desc, v_desc, b, h, kt, m_i, l_i, acc, seq_k, qk_scale, HEAD_DIM, BLOCK_N, EVEN_N, UPCAST_DOT,
                )
                # Bit idx - group_start of each row: this row finds the tile negligible. The first
                # visited tile has gap = +inf (no running max yet), so it is never marked.
                negligible = (gap < threshold) | padding_rows
                row_bits = row_bits | (negligible.to(tl.int64) << (idx - group_start))
            _mark_group(row_bits, group_start, count, entries_row, bits_row, Stats)
    else:
        for idx in range(0, count):
            kt = _tile_at(entries_row, idx, USE_LIST)
            m_i, l_i, acc, gap = _attend_tile(
                q, k_desc, v_desc, b, h, kt, m_i, l_i, acc, seq_k, qk_scale, HEAD_DIM, BLOCK_N, EVEN_N, UPCAST_DOT,
            )

    out = acc / l_i[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    # A masked store, not TMA: the rows past seq_q would land in the next batch element.
    tl.store(
        Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=(offs_m < seq_q)[:, None],
    )
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) / LOG2E
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


# (block_m, block_n, head_dim, uses a work list) -> (num_warps, num_stages), from the H200 sweep
# in docs/performance.md (bench/sweep_configs.py). The work-list loop loads its k-tile index
# through the pipeline too, so it needs two more stages for the same K/V prefetch depth.
LAUNCH_CONFIGS: dict[tuple[int, int, int, bool], tuple[int, int]] = {
    (128, 64, 128, False): (8, 3),
    (128, 64, 128, True): (8, 5),
    (128, 64, 64, False): (4, 5),
    (128, 64, 64, True): (4, 5),
    (128, 128, 128, False): (8, 3),
    (128, 128, 128, True): (8, 3),
    (128, 128, 64, False): (8, 3),
    (128, 128, 64, True): (4, 5),
}


def launch_config(block_m: int, block_n: int, head_dim: int, use_list: bool) -> tuple[int, int]:
    default = (4 if block_m * head_dim <= 128 * 64 else 8, 2)
    return LAUNCH_CONFIGS.get((block_m, block_n, head_dim, use_list), default)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """2-D TMA descriptor over (B * S, H * D); t must be contiguous in (S, H, D) per batch element."""
    batch, seq, heads, head_dim = t.shape
    return TensorDescriptor(t, [batch * seq, heads * head_dim], [t.stride(1), 1], [rows, head_dim])


def plan_work(
    bits: torch.Tensor, do_words: torch.Tensor, skip_words: torch.Tensor, geometry: TileGeometry, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Work list (entries (B, H, Qt, Kt) int32, counts (B, H, Qt) int32) from the packed mask.

    Row r's first counts[r] entries are its computed k-tiles in visit order, each stored as kt
    when it may be marked and as -(kt + 1) when it is must-do. The order (diagonal first, then
    ascending) puts the partial last k-tile, if computed, first or last: the Gluon kernel masks
    and reads entries only there.
    """
    batch, heads, q_tiles, _ = bits.shape
    g = geometry
    entries = torch.empty(batch, heads, q_tiles, g.k_tiles, dtype=torch.int32, device=bits.device)
    counts = torch.empty(batch, heads, q_tiles, dtype=torch.int32, device=bits.device)
    _plan_work[(batch * heads * q_tiles,)](
        bits, do_words, skip_words, entries, counts, stats,
        q_tiles, g.k_tiles, g.words, g.seq_q, g.seq_k,
        BLOCK_M=g.block_m, BLOCK_N=g.block_n, BLOCK_K=max(32, triton.next_power_of_2(g.k_tiles)),
    )
    return entries, counts


def launch_buffers(
    q: torch.Tensor,
    threshold: float,
    bits: torch.Tensor | None,
    work: tuple[torch.Tensor, torch.Tensor] | None,
    return_lse: bool,
) -> tuple[bool, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every forward launcher sets up: whether the call marks, the output, the LSE (or None),
    a one-element placeholder for pointer arguments a launch does not use, and the work list's
    (entries, counts) (placeholders without a list)."""
    batch, seq_q, heads, _ = q.shape
    mark = bits is not None and threshold != -math.inf
    if mark and work is None:
        raise ValueError("marking needs a work list")
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if return_lse else None
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    entries, counts = work if work is not None else (dummy, dummy)
    return mark, out, lse, dummy, entries, counts


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
    stats: torch.Tensor,
    return_lse: bool,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the attention kernel.

    ``work`` is (entries, counts) from :func:`plan_work`, or None for every tile in ascending
    order. ``bits`` is the packed mask to mark into, or None for no marking (needs ``work``).
    ``config`` = (num_warps, num_stages) overrides the recorded launch configuration.
    """
    batch, seq_q, heads, head_dim = q.shape
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the kernel takes a power-of-two head_dim >= 16 (pad first), got {head_dim}")
    mark, out, lse, dummy, entries, counts = launch_buffers(q, threshold, bits, work, return_lse)
    bm, bn = geometry.block_m, geometry.block_n
    num_warps, num_stages = config or launch_config(bm, bn, head_dim, work is not None)
    _lite_attention_fwd[(geometry.q_tiles, batch * heads)](
        _descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn),
        out, lse if lse is not None else dummy, bits if mark else dummy, entries, counts, stats,
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq_q, k.shape[1], geometry.k_tiles, geometry.words,
        scale * LOG2E.value, threshold if mark else 0.0,
        HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
        USE_LIST=work is not None, MARK=mark, WRITE_LSE=return_lse, EVEN_N=k.shape[1] % bn == 0,
        UPCAST_DOT=q.dtype == torch.bfloat16 and not q.is_cuda,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
