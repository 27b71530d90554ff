"""Triton kernels: work planning from the packed skip mask, and the attention forward with in-kernel marking.

``_plan_work``: one program per (batch, head, q-tile) row unpacks the row's mask bits, applies the
must-do / must-skip tile flags, and writes the computed k-tiles in visit order (diagonal first,
then ascending) as a compact work list; it also counts computed and already-marked tiles.

``_lite_attention_fwd``: one program per row walks its work list with TMA tensor-descriptor loads,
runs the online softmax in log2 units with the scale folded in, and tests each tile against the
running row maxima it already holds. The per-row verdicts of 32 consecutive tiles are kept as bits
in one int32 per row, and reduced across rows once per 32 tiles (a cross-warp reduction per tile
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

LOG2E = math.log2(math.e)
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
def _mark_group(row_bits, group_start, count, entries_row, bits_row, Stats):
    """Mark the tiles at visit positions [group_start, group_start + 32) found negligible in every row."""
    word = tl.reduce(row_bits, 0, _and)
    lane = tl.arange(0, 32)
    pos = group_start + lane
    entry = tl.load(entries_row + pos, mask=pos < count, other=-1)
    hit = (pos < count) & (entry >= 0) & (((word >> lane) & 1) == 1)
    tl.atomic_or(bits_row + entry // 32, 1 << (entry % 32), mask=hit)
    tl.atomic_add(Stats + 2, tl.sum(hit.to(tl.int64), 0))


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
    q_desc, k_desc, v_desc, o_desc, Lse, Bits, Entries, Counts, Stats,
    heads, seq_q, seq_k, k_tiles, words,
    qk_scale, threshold,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LIST: tl.constexpr, MARK: tl.constexpr, WRITE_LSE: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    row = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m  # (b, h, q-tile) row of the tile grid
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)

    q = q_desc.load([b, pid_m * BLOCK_M, h, 0]).reshape([BLOCK_M, BLOCK_D])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_bits = tl.zeros([BLOCK_M], dtype=tl.int32)
    padding_rows = offs_m >= seq_q  # never veto a mark
    entries_row = Entries + row * k_tiles
    bits_row = Bits + row * words

    if USE_LIST:
        count = tl.load(Counts + row)
    else:
        count = k_tiles
    for idx in range(0, count):
        if USE_LIST:
            entry = tl.load(entries_row + idx)
            kt = tl.where(entry >= 0, entry, -entry - 1)
        else:
            kt = idx
        k = k_desc.load([b, kt * BLOCK_N, h, 0]).reshape([BLOCK_N, BLOCK_D])
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT)
        if EVEN_N:
            s = s * qk_scale
        else:
            # Keys past the end (zero-filled by TMA) get -inf, folded into the scaling as one FMA.
            s = s * qk_scale + tl.where(kt * BLOCK_N + offs_n < seq_k, 0.0, float("-inf"))[None, :]
        tile_max = tl.max(s, 1)
        if MARK:
            # Bit idx % 32 of each row: this row finds the tile negligible. The first visited
            # tile has m_i = -inf, so tile_max - m_i = +inf and it is never marked.
            negligible = ((tile_max - m_i) < threshold) | padding_rows
            row_bits = row_bits | (negligible.to(tl.int32) << (idx % 32))
            if (idx % 32 == 31) | (idx == count - 1):
                _mark_group(row_bits, idx - idx % 32, count, entries_row, bits_row, Stats)
                row_bits = tl.zeros([BLOCK_M], dtype=tl.int32)
        m_new = tl.maximum(m_i, tile_max)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([b, kt * BLOCK_N, h, 0]).reshape([BLOCK_N, BLOCK_D])
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
        m_i = m_new

    out = acc / l_i[:, None]
    o_desc.store([b, pid_m * BLOCK_M, h, 0], out.to(o_desc.dtype).reshape([1, BLOCK_M, 1, BLOCK_D]))
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


# (block_m, block_n, head_dim bucket) -> (num_warps, num_stages), measured on an H200 (docs/performance.md).
LAUNCH_CONFIGS: dict[tuple[int, int, int], tuple[int, int]] = {}


def launch_config(block_m: int, block_n: int, block_d: int) -> tuple[int, int]:
    default = (4 if block_m * block_d <= 128 * 128 else 8, 2)
    return LAUNCH_CONFIGS.get((block_m, block_n, block_d), default)


def _descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, block_d])


def plan_work(
    bits: torch.Tensor, do_words: torch.Tensor, skip_words: torch.Tensor, geometry: TileGeometry, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Work list (entries (B, H, Qt, Kt) int32, counts (B, H, Qt) int32) from the packed mask.

    Row r's first counts[r] entries are its computed k-tiles in visit order, each stored as kt
    when it may be marked and as -(kt + 1) when it is must-do.
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
    mark = bits is not None and threshold != -math.inf
    if mark and work is None:
        raise ValueError("marking needs a work list")
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device) if return_lse else None
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    entries, counts = work if work is not None else (dummy, dummy)
    block_d = max(16, triton.next_power_of_2(head_dim))
    bm, bn = geometry.block_m, geometry.block_n
    num_warps, num_stages = config or launch_config(bm, bn, block_d)
    _lite_attention_fwd[(geometry.q_tiles, batch * heads)](
        _descriptor(q, bm, block_d), _descriptor(k, bn, block_d), _descriptor(v, bn, block_d), _descriptor(out, bm, block_d),
        lse if lse is not None else dummy, bits if mark else dummy, entries, counts, stats,
        heads, seq_q, k.shape[1], geometry.k_tiles, geometry.words,
        scale * LOG2E, threshold if mark else 0.0,
        BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        USE_LIST=work is not None, MARK=mark, WRITE_LSE=return_lse, EVEN_N=k.shape[1] % bn == 0,
        UPCAST_DOT=q.dtype == torch.bfloat16 and not q.is_cuda,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
