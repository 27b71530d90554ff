"""The portable Triton attention forward with in-kernel marking: any GPU Triton supports, and the
CPU interpreter.

``_lite_attention_fwd``: one program per (batch, head, q-tile) row walks its work list with TMA tensor-descriptor loads,
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

from ..quantize import P_MAX as _P_MAX
from ..quantize import QuantizedInputs
from ..state import TileGeometry
from .common import LOG2E, launch_buffers
from .worklist import WorkList, and_combine, mark_word

# Visited tiles whose marking verdicts are reduced across rows together (bits of one int64).
GROUP: tl.constexpr = tl.constexpr(64)
P_MAX: tl.constexpr = tl.constexpr(_P_MAX)
LOG2_P_MAX: tl.constexpr = tl.constexpr(math.log2(_P_MAX))


@triton.jit
def _mark_group(row_bits, group_start, count, entries_row, bits_row, Stats):
    """Mark the tiles at visit positions [group_start, group_start + GROUP) found negligible in every row."""
    word = tl.reduce(row_bits, 0, and_combine)
    tl.atomic_add(Stats + 2, mark_word(word, group_start, count, entries_row, bits_row, GROUP))


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bfloat16 operands as raw uint16 bits; UPCAST (set only
    # when interpreting bfloat16) multiplies their exact float32 values instead.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(desc, b, row0, h, HEAD_DIM: tl.constexpr):
    """Tile of tokens row0.. of (batch b, head h). The descriptor views the tensor as
    (B, S, H * D), so rows past the sequence end are zero-filled (never the next batch element's,
    whose non-finite values would turn into NaN as 0 * inf); every caller masks them out."""
    ROWS: tl.constexpr = desc.block_shape[1]
    return desc.load([b, row0, h * HEAD_DIM]).reshape(ROWS, HEAD_DIM)


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
    q, k_desc, v_desc, b, h, bh, kt, m_i, l_i, acc, seq_k, qk_scale, KScale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    QUANT: tl.constexpr, I2F_MAGIC: tl.constexpr, PV_FRESH: tl.constexpr,
):
    """Online-softmax update with k-tile kt (log2 units). Also returns each row's gap: the tile's
    row max minus the running max before it, which the marking rule compares to the threshold.
    QUANT: q and k are int8 (q's tile scale folded into qk_scale, k's at KScale[kt]) and v is FP8,
    transposed (quantize.py); the update is the same, on the scores this computes."""
    BLOCK_M: tl.constexpr = q.shape[0]
    k = _load_tile(k_desc, b, kt * BLOCK_N, h, HEAD_DIM)
    shift = 0.0
    if QUANT:
        qk_scale = qk_scale * tl.load(KScale + kt)
        if I2F_MAGIC:
            # int32 -> float32 without I2F (a quarter-rate instruction): |products| < 2^22 (at most
            # 256 * 127^2), so adding them to the bits of 1.5 * 2^23 gives that float plus them,
            # whose offset the scaling FMA takes out again.
            s = (tl.dot(q, tl.trans(k)) + 0x4B400000).to(tl.float32, bitcast=True)
            shift = -12582912.0 * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)).to(tl.float32)  # exact int32 products
    else:
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST_DOT)
    if EVEN_N and I2F_MAGIC:
        s = s * qk_scale + shift
    elif EVEN_N:
        s = s * qk_scale
    else:
        # Keys past the end (zero-filled) get -inf, folded into the scaling as one FMA.
        offs_n = tl.arange(0, BLOCK_N)
        s = s * qk_scale + tl.where(kt * BLOCK_N + offs_n < seq_k, shift, float("-inf"))[None, :]
    tile_max = tl.max(s, 1)
    m_new = tl.maximum(m_i, tile_max)
    if QUANT:
        p = tl.math.exp2(s - m_new[:, None] + LOG2_P_MAX)  # row max P_MAX, for FP8's resolution
    else:
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if QUANT:
        # v_desc views v_t as (B * H, D, Sk): tiles (D, BLOCK_N), the key axis contiguous as the 8-bit
        # MMA wants it. Each tile's product goes to a fresh accumulator, added to acc in fp32:
        # Hopper's FP8 MMA accumulates with reduced precision, so only BLOCK_N products share it.
        v_t = v_desc.load([bh, 0, kt * BLOCK_N]).reshape(HEAD_DIM, BLOCK_N)
        if PV_FRESH:
            acc = acc + tl.dot(p.to(v_t.dtype), tl.trans(v_t))
        else:
            acc = tl.dot(p.to(v_t.dtype), tl.trans(v_t), acc)
    else:
        v = _load_tile(v_desc, b, kt * BLOCK_N, h, HEAD_DIM)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
    return m_new, l_i, acc, tile_max - m_i


@triton.jit
def _lite_attention_fwd(
    q_desc, k_desc, v_desc, Out, Lse, Bits, Entries, Counts, Stats, QScale, KScale, VScale, VMean,
    stride_ob, stride_os, stride_oh,
    heads, seq_q, seq_k, k_tiles, words,
    qk_scale, threshold,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_LIST: tl.constexpr, MARK: tl.constexpr, WRITE_LSE: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr, I2F_MAGIC: tl.constexpr, PV_FRESH: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    row = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m  # (b, h, q-tile) row of the tile grid
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    q = _load_tile(q_desc, b, pid_m * BLOCK_M, h, HEAD_DIM)
    if QUANT:
        qk_scale = qk_scale * tl.load(QScale + row)
        KScale += pid_bh.to(tl.int64) * k_tiles
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
                    q, k_desc, v_desc, b, h, pid_bh, kt, m_i, l_i, acc, seq_k, qk_scale, KScale, HEAD_DIM, BLOCK_N, EVEN_N,
                    UPCAST_DOT, QUANT, I2F_MAGIC, PV_FRESH,
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
                q, k_desc, v_desc, b, h, pid_bh, kt, m_i, l_i, acc, seq_k, qk_scale, KScale, HEAD_DIM, BLOCK_N, EVEN_N,
                UPCAST_DOT, QUANT, I2F_MAGIC, PV_FRESH,
            )

    offs_d = tl.arange(0, HEAD_DIM)
    if QUANT:
        channel = pid_bh.to(tl.int64) * HEAD_DIM + offs_d
        out = acc * (tl.load(VScale + channel)[None, :] / l_i[:, None]) + tl.load(VMean + channel)[None, :]
    else:
        out = acc / l_i[:, None]
    # A masked store, not TMA: the rows past seq_q would land in the next batch element.
    tl.store(
        Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=(offs_m < seq_q)[:, None],
    )
    if WRITE_LSE:
        if QUANT:
            l_i = l_i / P_MAX
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

# The same for the 8-bit path (quantize.py), whose K and V tiles take half the shared memory: the
# dense loop from the H100 sweep in docs/performance.md (bench/quant_kernel.py --sweep); the work-list
# loop takes the same, unswept.
QUANT_LAUNCH_CONFIGS: dict[tuple[int, int, int, bool], tuple[int, int]] = {
    (128, 64, 128, False): (8, 4),
    (128, 64, 128, True): (8, 4),
    (128, 64, 64, False): (4, 4),
    (128, 64, 64, True): (4, 4),
}


# Shared memory the untuned default may fill: K and V tiles for each pipeline stage, and the Q tile
# (164 KiB on an A100, 227 KiB on Hopper, less a margin for the compiler's own buffers).
SHARED_MEMORY_BUDGET = 160 * 1024


def launch_config(
    block_m: int, block_n: int, head_dim: int, use_list: bool, quantized: bool = False,
) -> tuple[int, int]:
    """(num_warps, num_stages): the swept configuration, else a default whose pipeline fits in
    shared memory (two stages where they fit, else one: head dim 256 with 128-key tiles)."""
    table = QUANT_LAUNCH_CONFIGS if quantized else LAUNCH_CONFIGS
    if (block_m, block_n, head_dim, use_list) in table:
        return table[(block_m, block_n, head_dim, use_list)]
    element = 1 if quantized else 2
    q_bytes, kv_bytes = block_m * head_dim * element, 2 * block_n * head_dim * element
    stages = 2 if q_bytes + 2 * kv_bytes <= SHARED_MEMORY_BUDGET else 1
    return (4 if block_m * head_dim <= 128 * 64 else 8, stages)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """3-D TMA descriptor over (B, S, H * D), tiles of (1, rows, D): rows past S are zero-filled,
    so a partial last tile never reads the next batch element. t's (H, D) must be contiguous."""
    batch, seq, heads, head_dim = t.shape
    return TensorDescriptor(t, [batch, seq, heads * head_dim], [t.stride(0), t.stride(1), 1], [1, rows, head_dim])


def _transposed_descriptor(v_t: torch.Tensor, seq_k: int, cols: int) -> TensorDescriptor:
    """3-D TMA descriptor over the quantized V, (B * H, D, Sk), tiles of (1, D, cols): keys past
    Sk are zero-filled."""
    batch, heads, head_dim, padded = v_t.shape
    return TensorDescriptor(v_t, [batch * heads, head_dim, seq_k], [head_dim * padded, padded, 1], [1, head_dim, cols])


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TileGeometry,
    *,
    scale: float,
    threshold: float,
    bits: torch.Tensor | None,
    work: WorkList | None,
    stats: torch.Tensor,
    return_lse: bool,
    quantized: QuantizedInputs | None = None,
    config: tuple[int, int] | None = None,
    quant_variant: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the attention kernel.

    ``work`` is the call's work list (worklist.plan_work), or None for every tile in ascending
    order. ``bits`` is the packed mask to mark into, or None for no marking (needs ``work``).
    ``quantized``: q, k, v quantized (quantize.quantize_inputs) for the 8-bit path; q still gives
    the output's dtype, and the LSE is that of the smoothed K (the caller shifts it back).
    ``config`` = (num_warps, num_stages) overrides the recorded launch configuration;
    ``quant_variant`` = (int32 scores converted by the magic-number add, P.V into a fresh
    accumulator) picks the 8-bit kernel's variant (bench/quant_kernel.py times them).
    """
    batch, seq_q, heads, head_dim = q.shape
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"the kernel takes a power-of-two head_dim >= 16 (pad first), got {head_dim}")
    mark, out, lse, dummy, entries, counts = launch_buffers(q, threshold, bits, work, return_lse)
    bm, bn = geometry.block_m, geometry.block_n
    num_warps, num_stages = config or launch_config(bm, bn, head_dim, work is not None, quantized is not None)
    if quantized is None:
        descriptors = (_descriptor(q, bm), _descriptor(k, bn), _descriptor(v, bn))
        scales = (dummy, dummy, dummy, dummy)
    else:
        qz = quantized
        descriptors = (_descriptor(qz.q, bm), _descriptor(qz.k, bn), _transposed_descriptor(qz.v_t, k.shape[1], bn))
        scales = (qz.q_scale, qz.k_scale, qz.v_scale, qz.v_mean)
    _lite_attention_fwd[(geometry.q_tiles, batch * heads)](
        *descriptors,
        out, lse if lse is not None else dummy, bits if mark else dummy, entries, counts, stats, *scales,
        out.stride(0), out.stride(1), out.stride(2),
        heads, seq_q, k.shape[1], geometry.k_tiles, geometry.words,
        scale * LOG2E.value, threshold if mark else 0.0,
        HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
        USE_LIST=work is not None, MARK=mark, WRITE_LSE=return_lse, EVEN_N=k.shape[1] % bn == 0,
        UPCAST_DOT=q.dtype == torch.bfloat16 and not q.is_cuda, QUANT=quantized is not None,
        I2F_MAGIC=quantized is not None and quant_variant[0], PV_FRESH=quant_variant[1],
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,  # as in gluon_forward.LAUNCH_OPTIONS
    )
    return out, lse
