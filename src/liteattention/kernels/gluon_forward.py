"""Hopper (sm_90) attention forward in Gluon: warp-specialised, with in-kernel marking.

Same contract as ``_lite_attention_fwd`` in triton_forward.py (same work list, mask, statistics),
scheduled the way FlashAttention-3 schedules Hopper, which Triton's own pipeliner does not:

- one producer warp issues every TMA load (Q once, then K and V of each listed tile into a ring of
  STAGES buffers), so the compute warps never wait on address math or copies;
- two consumer warpgroups each own 64 rows of the 128-row q-tile and share the K/V ring;
- inside a consumer, QK^T of the next visited tiles and PV of the previous ones are issued back
  to back as asynchronous wgmma, and the softmax starts while PV is still on the tensor cores
  (ptxas moves most exponentials after the PV wait; the other consumer's wgmma keep the tensor
  cores busy meanwhile, and pinning them under PV measured slower: docs/performance.md, v10);
- at head dim 64, where a step's exponentials take as long as its matrix products, the two
  consumers take turns issuing their wgmma (ping-pong on named barriers), so that one's softmax
  runs while the other's matrix products do;
- with 64-key tiles, two tiles make one 128-key step: the producer copies both into one ring
  buffer, so a step is one QK^T and one PV wgmma and one softmax update, exactly as with 128-key
  tiles, while each tile still gets its own verdict (from the maxima of its half of the scores);
- persistent: one program per SM works through the q-tiles, which its producer claims one by one
  from a counter in row order and hands to the consumers with their Q; the K/V ring, the Q
  buffers and the ping-pong turns run on from one q-tile to the next, so a q-tile's Q load and
  first copies go out under the previous one's last steps. A launched block per q-tile paid all
  of that alone, about 4.6 steps' worth, a third of a q-tile's time at 90% skipped on LTX-Video.

Marking needs every row of the q-tile, but the rows are split over eight warps and each row's
columns over four threads: each thread judges its own columns of its two rows against the
rows' running maxima (a tile is negligible for a row when it is for all four threads), keeps one
bit per tile for both rows, and after each group of GROUP tiles (an inner loop over its steps;
one loop that stores in every step where ptxas schedules that better, _nested_steps) each warp
reduces its threads' bits into one word with a warp-wide AND and stores it (no shared memory, no
barrier, no atomics, no waiting on memory inside the loop);
``_apply_verdicts`` then marks the tiles all eight warps found negligible, one program per row.
"""

from __future__ import annotations

import enum
import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..plan import range_words
from ..state import TileGeometry
from .common import LOG2E, TRITON_VERSION, launch_buffers
from .triton_compat import arrive_when_all_past, tma_load
from .worklist import WorkList, and_combine, mark_word, plan_unmasked

# Rows of the q-tile per consumer warpgroup (one wgmma M extent); the q-tile has two halves.
HALF_M: gl.constexpr = gl.constexpr(64)
# Visited tiles whose verdict bits are reduced together (bits of one uint32 per row).
GROUP: gl.constexpr = gl.constexpr(32)
# Consumer warps per q-tile, each storing its own verdict word per group.
VERDICT_WARPS: gl.constexpr = gl.constexpr(8)
# Shared memory per block on sm_90, minus headroom for the barriers.
SMEM_BYTES = 227 * 1024 - 1024
# Registers per thread asked for the second consumer warpgroup and the producer warpgroup; the
# first consumer gets what is left of the 168 per thread x 12 warps the kernel is launched with.
CONSUMER_REGS: gl.constexpr = gl.constexpr(232)
PRODUCER_REGS: gl.constexpr = gl.constexpr(24)


class NamedBarrier(enum.IntEnum):
    """Hardware named barriers (bar.sync / bar.arrive ids) the kernel uses itself; Triton's own
    partitions take the low ids."""

    # The ping-pong: consumer 0 waits for its turn on PINGPONG_0, consumer 1 on PINGPONG_1.
    PINGPONG_0 = 10
    PINGPONG_1 = 11
    # The producer warp alone: orders its lanes' stores of a claim before one lane's arrive.
    CLAIM = 12


@gluon.jit
def _tile_of(entry):
    """The k-tile of a work-list entry (kt, or -(kt + 1) for a must-do tile)."""
    return gl.where(entry >= 0, entry, -entry - 1)


@gluon.jit
def _visited_tile(entries_row, pos, USE_LIST: gl.constexpr):
    """The k-tile at visit position pos: the work list's entry, or pos itself without a list."""
    if USE_LIST:
        return _tile_of(gl.load(entries_row + pos))
    else:
        return pos


@gluon.constexpr_function
def _tile_layout(desc_layout):
    """The 2-D shared layout of a tile that a (1, rows, cols) descriptor copies: the same bytes."""
    return gl.NVMMASharedLayout(
        swizzle_byte_width=desc_layout.swizzle_byte_width, element_bitwidth=desc_layout.element_bitwidth, rank=2,
    )


@gluon.jit
def _copy_tile(desc, b, row, col, ready, buf, start: gl.constexpr = 0, pred=True):
    """TMA copy of the tile at rows row.. of batch element b (columns col..) into rows start.. of
    the 2-D buffer ``buf``, arriving on ready. The descriptor is (B, S, H * D): rows past S are
    zero-filled, never read from the next batch element (whose non-finite values would turn into
    NaN here, as 0 * inf)."""
    ROWS: gl.constexpr = desc.block_type.shape[1]
    tma_load(desc, [b, row, col], ready, buf.reshape([1] + buf.type.shape).slice(start, ROWS, 1), pred=pred)


@gluon.jit
def _copy_step(desc, buf, ready, entries_row, i, count, b, col, USE_LIST: gl.constexpr):
    """TMA copies of step i's k-tiles (rows of desc) into one ring buffer, arriving on ready. A
    last step with one tile (count odd) fills its empty half with that tile again: finite keys,
    which the consumers mask out."""
    BLOCK_N: gl.constexpr = desc.block_type.shape[1]
    STEP_TILES: gl.constexpr = buf.type.shape[0] // BLOCK_N
    for t in gl.static_range(STEP_TILES):
        kt = _visited_tile(entries_row, gl.minimum(i * STEP_TILES + t, count - 1), USE_LIST)
        _copy_tile(desc, b, kt * BLOCK_N, col, ready, buf, t * BLOCK_N)


@gluon.jit
def _count_of(Counts, tile, rows, k_tiles, USE_LIST: gl.constexpr):
    """Listed tiles of q-tile ``tile`` (a row of the (b, h, q-tile) grid; 0 past the last row)."""
    if USE_LIST:
        return gl.load(Counts + tile, mask=tile < rows, other=0)
    else:
        return gl.where(tile < rows, k_tiles, 0)


@gluon.jit
def _tile_origin(tile, q_tiles, heads):
    """Batch element, head and first row of q-tile ``tile``."""
    bh = tile // q_tiles
    return bh // heads, bh % heads, (tile % q_tiles) * (2 * HALF_M)


@gluon.jit
def _hand_over(q_desc, q_smem, q_ready, q_empty, claims, started, tile, count, q_tiles, heads):
    """The producer gives the consumers their next q-tile (``started`` earlier ones): once both are
    done with the Q buffer it takes, the q-tile and its count go into that buffer's claim and its
    Q halves are copied in (no copy for a count of 0, or for a tile past the rows, which tells the
    consumers to stop). The claim is written before the arrivals on q_ready, whose release makes
    it visible to the consumers that wait on them."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    Q_BUFS: gl.constexpr = q_smem.type.shape[0] // 2
    slot = started % Q_BUFS
    for half in gl.static_range(2):
        # The first round passes.
        mbarrier.wait(q_empty.index(2 * slot + half), ((started // Q_BUFS) & 1) ^ 1)
    fields = gl.arange(0, 2, layout=gl.BlockedLayout([2], [32], [1], [0]))
    claim = gl.where(fields == 0, tile, count)
    claims.index(slot).store(claim)
    _claim_stored(claim)
    b, h, q_row0 = _tile_origin(tile, q_tiles, heads)
    for half in gl.static_range(2):
        ready = q_ready.index(2 * slot + half)
        mbarrier.expect(ready, q_desc.block_type.nbytes, pred=count > 0)
        mbarrier.arrive(ready, pred=count == 0)
        _copy_tile(q_desc, b, q_row0 + half * HALF_M, h * HEAD_DIM, ready, q_smem.index(2 * slot + half), pred=count > 0)


@gluon.jit
def _claim_stored(claim):
    """A barrier over the producer warp after the claim's store. Every lane holds the claim and
    stores it, but one lane arrives on q_ready, and its release orders only its own store: the
    barrier puts the other lanes' stores before it (Gluon's thread_barrier is a warp sync here,
    which ptxas drops). The claim's two int32 per thread make one barrier per thread (pack=2)."""
    gl.inline_asm_elementwise(_CLAIM_STORED_PTX, "=r,=r,r,r", [claim], dtype=gl.int32, is_pure=False, pack=2)


_CLAIM_STORED_PTX: gl.constexpr = gl.constexpr(f"bar.sync {NamedBarrier.CLAIM:d}, 32; mov.b32 $0, $2; mov.b32 $1, $3;")


@gluon.jit
def _claim(claims, q_ready, started, half: gl.constexpr):
    """A consumer's next q-tile and its count, once the producer handed it over (and its Q landed)."""
    Q_BUFS: gl.constexpr = claims.type.shape[0]
    slot = started % Q_BUFS
    mbarrier.wait(q_ready.index(2 * slot + half), (started // Q_BUFS) & 1)
    fields_layout: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
    claim = claims.index(slot).load(fields_layout)
    fields = gl.arange(0, 2, layout=fields_layout)
    return gl.sum(gl.where(fields == 0, claim, 0), 0), gl.sum(gl.where(fields == 1, claim, 0), 0)


@gluon.jit
def _load_partition(
    q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, q_empty, claims, k_ready, v_ready, kv_empty,
    Entries, Counts, Next, rows, q_tiles, heads, k_tiles, USE_LIST: gl.constexpr,
):
    """The producer warp: claims q-tiles (its program's own first, then the next unclaimed one from
    the counter at Next, in row order, as a hardware grid would hand out blocks, so q-tiles of
    uneven work balance over the programs), hands each to the consumers with its Q, then copies K
    and V of each step's listed tiles into the ring (one or two tiles per buffer). The ring and
    the Q buffers run on across q-tiles, so the next q-tile's first copies go out while the
    consumers still work on the previous one."""
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    STEP_TILES: gl.constexpr = k_bufs.type.shape[1] // BLOCK_N
    base = 0  # steps copied for earlier q-tiles: the ring position
    started = 0  # q-tiles handed over
    tile = gl.program_id(0)
    count = _count_of(Counts, tile, rows, k_tiles, USE_LIST)
    while tile < rows:
        # Claimed and counted a q-tile ahead: the latency stays under this q-tile's copies.
        next_tile = gl.num_programs(0) + gl.atomic_add(Next, 1)
        next_count = _count_of(Counts, next_tile, rows, k_tiles, USE_LIST)
        _hand_over(q_desc, q_smem, q_ready, q_empty, claims, started, tile, count, q_tiles, heads)
        b, h, q_row0 = _tile_origin(tile, q_tiles, heads)
        entries_row = Entries + tile.to(gl.int64) * k_tiles
        steps = gl.cdiv(count, STEP_TILES)
        for i in range(steps):
            j = base + i
            stage = j % STAGES
            # Wait until both consumers released the buffers' previous step (the first round passes).
            mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(stage), STEP_TILES * k_desc.block_type.nbytes)
            mbarrier.expect(v_ready.index(stage), STEP_TILES * v_desc.block_type.nbytes)
            # All of the step's K goes before its V.
            _copy_step(k_desc, k_bufs.index(stage), k_ready.index(stage), entries_row, i, count, b, h * HEAD_DIM, USE_LIST)
            _copy_step(v_desc, v_bufs.index(stage), v_ready.index(stage), entries_row, i, count, b, h * HEAD_DIM, USE_LIST)
        base += steps
        started += 1
        tile = next_tile
        count = next_count
    _hand_over(q_desc, q_smem, q_ready, q_empty, claims, started, rows, 0, q_tiles, heads)


@gluon.jit
def _step_keys(
    entries_row, step, count, seq_k, STEP_N: gl.constexpr, BLOCK_N: gl.constexpr, USE_LIST: gl.constexpr,
    layout: gl.constexpr,
):
    """Key index of each column of step ``step``'s scores (visit positions step * STEP_TILES and
    on). A position past count, the empty half of a last step, gets keys past seq_k."""
    STEP_TILES: gl.constexpr = STEP_N // BLOCK_N
    cols = gl.arange(0, STEP_N, layout=layout)
    keys = cols
    for t in gl.static_range(STEP_TILES):
        pos = step * STEP_TILES + t
        kt = gl.where(pos < count, _visited_tile(entries_row, gl.minimum(pos, count - 1), USE_LIST), gl.cdiv(seq_k, BLOCK_N))
        keys = gl.where(cols // BLOCK_N == t, kt * BLOCK_N + cols % BLOCK_N, keys)
    return keys


@gluon.jit
def _masked(s, keys, seq_k, MASKED: gl.constexpr):
    """With MASKED, keys past seq_k (another batch element's, zero fill, or an empty half) get
    -inf. The scores stay unscaled: see _online_softmax."""
    if MASKED:
        return s + gl.where(keys < seq_k, 0.0, float("-inf"))[None, :]
    else:
        return s


@gluon.jit
def _store_verdict(warp_bits, group, verdicts_row):
    """Each warp's word of group ``group``: bit j set when all its 16 rows found the tile at visit
    position group * GROUP + j negligible. Each thread's bits already cover its two rows
    (_verdict_bit), so a warp-wide redux gives the word, with no shared memory or barrier (the
    cross-warp reduction spilled registers in this loop). A plain store: the loop never waits on
    memory."""
    word = gl.inline_asm_elementwise(
        "redux.sync.and.b32 $0, $1, 0xffffffff;", "=r,r", [warp_bits], dtype=gl.uint32, is_pure=True, pack=1,
    )
    warp = gl.arange(0, HALF_M // 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, word.type.layout)))
    ptr, word = gl.broadcast(verdicts_row + group * VERDICT_WARPS + warp[:, None, None], word)
    gl.store(ptr, word)


@triton.jit
def _apply_verdicts(
    Verdicts, Entries, Counts, Bits, Stats, k_tiles, words, groups, GROUP_SIZE: tl.constexpr, WARPS: tl.constexpr,
):
    """Mark the tiles that every consumer warp of a q-tile found negligible (one program per row)."""
    row = tl.program_id(0).to(tl.int64)
    count = tl.load(Counts + row)
    newly = tl.zeros([], dtype=tl.int64)
    for group in range(0, tl.cdiv(count, GROUP_SIZE)):
        word = tl.reduce(tl.load(Verdicts + (row * groups + group) * WARPS + tl.arange(0, WARPS)), 0, and_combine)
        newly += mark_word(word, group * GROUP_SIZE, count, Entries + row * k_tiles, Bits + row * words, GROUP_SIZE)
    tl.atomic_add(Stats + 2, newly)


@gluon.constexpr_function
def _packed_cvt(dtype):
    """One PTX conversion of two floats to a 16-bit pair, element 0 in the low half."""
    return "cvt.rn.bf16x2.f32 $0, $2, $1;" if dtype == gl.bfloat16 else "cvt.rn.f16x2.f32 $0, $2, $1;"


@gluon.jit
def _p_operand(p, k_bufs, BLOCK_N: gl.constexpr, MARK: gl.constexpr):
    """P in the 16-bit type of K and V, for the PV wgmma. From 64 scalar conversions ptxas packs
    the pairs in the opposite order and swaps the halves back before the wgmma, 32 PRMT per step;
    one packed conversion per pair needs no swap."""
    if _packed_p(k_bufs.type.shape[1] // BLOCK_N, k_bufs.type.shape[2], MARK):
        return gl.inline_asm_elementwise(
            _packed_cvt(k_bufs.dtype), "=r,r,r", [p], dtype=k_bufs.dtype, is_pure=True, pack=2,
        )
    else:
        return p.to(k_bufs.dtype)


@gluon.jit
def _issue_qk(q, k_bufs, k_ready, j, zero_s):
    """Start S = Q K_j^T for the j-th visited tile once its K has landed."""
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    mbarrier.wait(k_ready.index(j % STAGES), (j // STAGES) & 1)
    return warpgroup_mma(q, k_bufs.index(j % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(p_op, v_bufs, v_ready, j, acc):
    """Start acc += P V_j for the j-th visited tile once its V has landed."""
    STAGES: gl.constexpr = v_bufs.type.shape[0]
    mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
    return warpgroup_mma(p_op, v_bufs.index(j % STAGES), acc, is_async=True)


@gluon.constexpr_function
def _turn_ptx(half, wait):
    """PTX of one turn of the ping-pong: consumer ``half`` waits on its own named barrier and
    passes the turn with an arrive, which does not wait, on the other's; both count the two
    warpgroups' 256 threads. The moves copy the token."""
    own, other = (NamedBarrier.PINGPONG_0, NamedBarrier.PINGPONG_1)[:: 1 if half == 0 else -1]
    barrier = f"bar.sync {own:d}, 256;" if wait else f"bar.arrive {other:d}, 256;"
    return barrier + " mov.b32 $0, $2; mov.b32 $1, $3;"


@gluon.jit
def _turn(token, half: gl.constexpr, WAIT: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, wait for this consumer's turn to issue wgmma (WAIT), or pass the turn to the
    other consumer, so that the two consumers' matrix products alternate on the tensor cores and
    each one's softmax runs under the other's (FlashAttention-3's ping-pong). Gluon has no op for
    named barriers, and inline asm is elementwise over a tensor: the token holds two int32 per
    thread, so pack=2 emits one barrier per thread, and threading it through every turn keeps
    the barriers in program order."""
    if PINGPONG:
        token = gl.inline_asm_elementwise(
            _turn_ptx(half, WAIT), "=r,=r,r,r", [token], dtype=gl.int32, is_pure=False, pack=2,
        )
    return token


@gluon.jit
def _release(kv_empty, i):
    """Hand the buffers of step i back to the producer, once every warp of this warpgroup is past
    the wgmma that read them."""
    STAGES: gl.constexpr = kv_empty.type.shape[0]
    arrive_when_all_past(kv_empty.index(i % STAGES))


@gluon.jit
def _per_row(x, like):
    """Row vector x ([M]) as a column of like's layout ([M, 4], a thread's own value per row)."""
    return gl.convert_layout(x, gl.SliceLayout(1, like.type.layout), assert_trivial=True)[:, None]


@gluon.jit
def _row_pairs(x):
    """x ([M, 4], rows as a wgmma accumulator lays them out: a thread holds rows r and r + 8 of
    its warp's 16) as two [M // 16, 8, 4] tensors (warp, row r, quad lane) of the rows r and of
    the rows r + 8: registers only."""
    M: gl.constexpr = x.type.shape[0]
    return gl.split(gl.reshape(x, [M // 16, 2, 8, 4]).permute((0, 2, 3, 1)))


@gluon.constexpr_function
def _both_below_ptx(bit):
    """PTX: the word with only ``bit`` set when $1 < $2 and $3 < $4, else 0: two compares chained
    on one predicate, and a select. From two comparisons and an AND, LLVM packed the two flags
    into 16 bits and tested them, four instructions more."""
    return (
        "{ .reg .pred p; setp.lt.f32 p, $1, $2; setp.lt.and.f32 p, $3, $4, p; "
        f"selp.b32 $0, {1 << bit:#x}, 0, p; }}"
    )


@gluon.jit
def _verdict_bit(own_max, qk_scale, m, row_threshold, BIT: gl.constexpr):
    """Bit BIT set where a tile is negligible in this thread's columns of both its rows: each row's
    own max (unscaled) against its running max m, below its threshold. With the two rows' AND in
    the thread, the verdict bits take one register per thread ([M // 16, 8, 4]), not one per row."""
    gap0, gap1 = _row_pairs(own_max * qk_scale - _per_row(m, own_max))
    threshold0, threshold1 = _row_pairs(gl.broadcast(_per_row(row_threshold, own_max), own_max)[0])
    return gl.inline_asm_elementwise(
        _both_below_ptx(BIT), "=r,f,f,f,f", [gap0, threshold0, gap1, threshold1],
        dtype=gl.uint32, is_pure=True, pack=1,
    )


@gluon.jit
def _row_max_tree(s, like):
    """The max of each row of s (a wgmma accumulator, [M, N]) in like's layout, folded as a tree:
    a thread holds columns 8c + 2l and 8c + 2l + 1 (quad lane l), so halving on the column's
    high bits pairs a thread's own values (depth log2(N / 8) + 1, then the quad's shuffles),
    where gl.max folds them one after another, a chain of N / 4 per row. See _tree_row_max."""
    M: gl.constexpr = s.type.shape[0]
    N: gl.constexpr = s.type.shape[1]
    x = s
    for level in gl.static_range(N.bit_length() - 4):
        x = gl.max(gl.reshape(x, [M, 2, N // (2 << level)]), 1)
    return gl.convert_layout(gl.max(x, 1), like.type.layout, assert_trivial=True)


@gluon.jit
def _online_softmax(
    s, qk_scale, m_i, l_i, warp_bits, row_threshold, MARK: gl.constexpr, ABOVE_MAX: gl.constexpr,
    BLOCK_N: gl.constexpr, TREE_MAX: gl.constexpr,
):
    """One step's update of the running max and sum (log2 units) from unscaled scores s; returns
    P and the output's rescale factor. The row maxima are taken before scaling and scaled once
    per row: qk_scale > 0 and rounding is monotonic, so max(s) * qk_scale is bit-identical to
    max(s * qk_scale), and ptxas fuses the scale into the exponent's FFMA, which saves a multiply
    per score. With MARK, also shifts in this thread's verdict bit of each of the step's tiles: a
    tile's gap is its max against the running max just before it, so the marks are the same
    whether the tiles come one or two per step. The verdicts use the thread's own maxima, before
    the maxima are reduced over the quad of threads that shares a row (a max is below a bound
    when each part is; _store_verdict's AND covers the quad), so marking adds no shuffles."""
    if MARK:
        M: gl.constexpr = s.type.shape[0]
        STEP_TILES: gl.constexpr = s.type.shape[1] // BLOCK_N
        # Each thread's max over its own columns of each tile, [M, STEP_TILES, 4]: a wgmma
        # accumulator gives lane l of a quad columns 8c + 2l and 8c + 2l + 1.
        own = gl.max(gl.max(gl.reshape(s, [M, STEP_TILES, BLOCK_N // 8, 4, 2]), 4), 2)
        # The row max: over the thread's tiles first (registers), then over the quad (two
        # shuffles); the other order shuffles once per tile.
        row_max = gl.convert_layout(gl.max(gl.max(own, 1), 1), m_i.type.layout, assert_trivial=True)
        m_new = gl.maximum(m_i, row_max * qk_scale)
    elif TREE_MAX:
        m_new = gl.maximum(m_i, _row_max_tree(s, m_i) * qk_scale)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    if MARK:
        # After P's exponentials in the source, or Triton 3.8 and 3.9 start them only after all
        # of the verdict arithmetic (3.6 interleaves the two either way; docs/performance.md, v24).
        # Shifted in at the top of warp_bits: after GROUP // STEP_TILES steps, bit j holds the
        # verdict of the group's j-th tile, and older bits have shifted out (no reset, and a
        # constant shift rather than one by the tile's position).
        warp_bits = warp_bits >> STEP_TILES
        if STEP_TILES == 1:
            own0 = gl.reshape(own, [M, 4])
            warp_bits = warp_bits | _verdict_bit(own0, qk_scale, m_i, row_threshold, 31)
        else:
            own0, own1 = gl.split(own.permute((0, 2, 1)))
            # The second tile's gap is against the max after the first, m_mid. A threshold <= 0
            # only marks a tile whose max is below m_mid, so then m_new = m_mid, and the gap
            # against m_new is the same verdict without reducing the first tile's max on its own.
            m_mid = m_new
            if ABOVE_MAX:
                max0 = gl.convert_layout(gl.max(own0, 1), m_i.type.layout, assert_trivial=True)
                m_mid = gl.maximum(m_i, max0 * qk_scale)
            warp_bits = warp_bits | _verdict_bit(own0, qk_scale, m_i, row_threshold, 30)
            warp_bits = warp_bits | _verdict_bit(own1, qk_scale, m_mid, row_threshold, 31)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha, warp_bits


@gluon.jit
def _step(
    q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, keys, p_op, m_i, l_i, acc, warp_bits, zero_s, row_threshold,
    seq_k, qk_scale, BLOCK_N: gl.constexpr, MARK: gl.constexpr, ABOVE_MAX: gl.constexpr, TREE_MAX: gl.constexpr,
    MASKED: gl.constexpr, half: gl.constexpr, PINGPONG: gl.constexpr, token,
):
    """Step i (> 0): its QK^T and PV of step i - 1 in flight together, then its softmax while that
    PV runs. Returns the operand of its own PV and the updated row state."""
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    token = _turn(token, half, True, PINGPONG)
    s = _issue_qk(q, k_bufs, k_ready, i, zero_s)
    acc = _issue_pv(p_op, v_bufs, v_ready, i - 1, acc)
    token = _turn(token, half, False, PINGPONG)
    # wgmma groups retire in order: one outstanding means QK^T of step i is done.
    s = warpgroup_mma_wait(1, deps=(s,))
    p, m_i, l_i, alpha, warp_bits = _online_softmax(
        _masked(s, keys, seq_k, MASKED), qk_scale, m_i, l_i, warp_bits, row_threshold,
        MARK, ABOVE_MAX, BLOCK_N, TREE_MAX,
    )
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    _release(kv_empty, i - 1)
    acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
    p_op = gl.convert_layout(_p_operand(p, k_bufs, BLOCK_N, MARK), p_layout)
    return p_op, m_i, l_i, acc, warp_bits, token


@gluon.jit
def _consume(
    q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, m_i, l_i, acc, zero_s, row_threshold,
    entries_row, verdicts_row, count, steps, base, seq_k, qk_scale, token,
    BLOCK_N: gl.constexpr, USE_LIST: gl.constexpr, MARK: gl.constexpr, ABOVE_MAX: gl.constexpr,
    MASK_ENDS: gl.constexpr, half: gl.constexpr, PINGPONG: gl.constexpr,
):
    """Every listed tile of one q-tile (count), STEP_TILES per step (``steps`` steps, one softmax
    update and one output rescale each), from ring position ``base`` on. Returns the running
    max, sum and output, the verdict bits not yet stored, and the ping-pong token.

    Only the first and the last step can hold a key to mask (MASK_ENDS): the partial last k-tile
    is visited first or last (the diagonal tile, then the rest ascending, ``plan_work``; plain
    ascending without a list), and only the last step can have an empty half. So only the steps
    at the ends load entries and mask; the steps in between do neither (a per-step entry load
    cost 6-20% at Wan 480p, docs/performance.md, v9)."""
    STEP_N: gl.constexpr = k_bufs.type.shape[1]
    cols: gl.constexpr = gl.SliceLayout(0, zero_s.type.layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    TREE_MAX: gl.constexpr = _tree_row_max(USE_LIST, MARK, PINGPONG)
    # Step 0 alone: nothing to overlap its softmax with yet. Its first tile's gap is +inf (no
    # running max), so no row finds it negligible and it is never marked.
    keys = 0
    if MASK_ENDS:
        keys = _step_keys(entries_row, 0, count, seq_k, STEP_N, BLOCK_N, USE_LIST, cols)
    # Rounds of wgmma issue: step 0's QK^T, each later step's QK^T and PV, the last PV; with
    # PINGPONG each round waits for this consumer's turn and passes it on.
    token = _turn(token, half, True, PINGPONG)
    s = _issue_qk(q, k_bufs, k_ready, base, zero_s)
    token = _turn(token, half, False, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, m_i, l_i, alpha, warp_bits = _online_softmax(
        _masked(s, keys, seq_k, MASK_ENDS), qk_scale, m_i, l_i, 0, row_threshold, MARK, ABOVE_MAX, BLOCK_N, TREE_MAX,
    )
    p_op = gl.convert_layout(_p_operand(p, k_bufs, BLOCK_N, MARK), p_layout)
    # The loops count ring positions (base + step).
    GROUP_STEPS: gl.constexpr = GROUP // (STEP_N // BLOCK_N)
    if _nested_steps(USE_LIST, MARK, PINGPONG):
        for start in range(0, steps - 1, GROUP_STEPS):
            first = start + (start == 0)  # step 0 went above
            end = start + GROUP_STEPS if start + GROUP_STEPS < steps - 1 else steps - 1
            for i in range(base + first, base + end):
                p_op, m_i, l_i, acc, warp_bits, token = _step(
                    q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, 0, p_op, m_i, l_i, acc, warp_bits, zero_s,
                    row_threshold, seq_k, qk_scale, BLOCK_N, MARK, ABOVE_MAX, TREE_MAX, False, half, PINGPONG, token,
                )
            # A step's tiles never straddle two groups: GROUP is a multiple of STEP_TILES.
            if MARK and start + GROUP_STEPS <= steps - 1:
                _store_verdict(warp_bits, start // GROUP_STEPS, verdicts_row)
    else:
        for i in range(base + 1, base + steps - 1):
            p_op, m_i, l_i, acc, warp_bits, token = _step(
                q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, i, 0, p_op, m_i, l_i, acc, warp_bits, zero_s,
                row_threshold, seq_k, qk_scale, BLOCK_N, MARK, ABOVE_MAX, TREE_MAX, False, half, PINGPONG, token,
            )
            # Each step stores its group's word as it stands, with no test for the group's end:
            # the group's last step stores it whole (the last group is stored after the loop).
            if MARK:
                _store_verdict(warp_bits, (i - base) // GROUP_STEPS, verdicts_row)
    last = base + steps - 1
    if steps > 1:
        if MASK_ENDS:
            keys = _step_keys(entries_row, steps - 1, count, seq_k, STEP_N, BLOCK_N, USE_LIST, cols)
        p_op, m_i, l_i, acc, warp_bits, token = _step(
            q, k_bufs, v_bufs, k_ready, v_ready, kv_empty, last, keys, p_op, m_i, l_i, acc, warp_bits, zero_s,
            row_threshold, seq_k, qk_scale, BLOCK_N, MARK, ABOVE_MAX, TREE_MAX, MASK_ENDS, half, PINGPONG, token,
        )
    token = _turn(token, half, True, PINGPONG)
    acc = _issue_pv(p_op, v_bufs, v_ready, last, acc)
    token = _turn(token, half, False, PINGPONG)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    _release(kv_empty, last)
    return m_i, l_i, acc, warp_bits, token


@gluon.jit
def _consumer_partition(
    half: gl.constexpr, q_smem, k_bufs, v_bufs, q_ready, q_empty, claims, k_ready, v_ready, kv_empty,
    Out, Lse, Entries, Verdicts, rows, q_tiles, heads, k_tiles, groups,
    seq_q, seq_k, stride_ob, stride_os, stride_oh, qk_scale, threshold,
    BLOCK_N: gl.constexpr, USE_LIST: gl.constexpr, MARK: gl.constexpr, ABOVE_MAX: gl.constexpr,
    WRITE_LSE: gl.constexpr, MASK_ENDS: gl.constexpr, PINGPONG: gl.constexpr,
):
    """One warpgroup: rows [half * 64, half * 64 + 64) of each q-tile the producer hands over, over
    every listed tile, then their output (and LSE), until it hands over a tile past the rows."""
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    STEP_N: gl.constexpr = k_bufs.type.shape[1]
    STEP_TILES: gl.constexpr = STEP_N // BLOCK_N
    Q_BUFS: gl.constexpr = q_smem.type.shape[0] // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, STEP_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    zero_s = gl.zeros([HALF_M, STEP_N], gl.float32, s_layout)

    # The ping-pong turns run on across q-tiles. Consumer 1 passes the first turn here, so
    # consumer 0 issues first; at the end consumer 0 takes the turn consumer 1 passed after its
    # last round (every arrive meets a wait).
    token = gl.zeros([HALF_M], gl.int32, s_rows)
    if half == 1:
        token = _turn(token, half, False, PINGPONG)
    base = 0  # steps consumed for earlier q-tiles: the ring position
    started = 0  # q-tiles taken over
    tile, count = _claim(claims, q_ready, started, half)
    while tile < rows:
        slot = 2 * (started % Q_BUFS) + half
        first_row = _tile_origin(tile, q_tiles, heads)[2] + half * HALF_M
        # Rows past seq_q never veto a mark: every gap is below their threshold (+inf; a gap of
        # +inf, before any running max, or NaN, all keys masked, is so in every row and vetoes
        # anyway).
        padding_rows = first_row + gl.arange(0, HALF_M, layout=s_rows) >= seq_q
        row_threshold = gl.where(padding_rows, float("inf"), threshold)
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([HALF_M], gl.float32, s_rows)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        if count > 0:
            verdicts_row = Verdicts + tile.to(gl.int64) * (groups * VERDICT_WARPS) + half * (VERDICT_WARPS // 2)
            steps = gl.cdiv(count, STEP_TILES)
            m_i, l_i, acc, warp_bits, token = _consume(
                q_smem.index(slot), k_bufs, v_bufs, k_ready, v_ready, kv_empty, m_i, l_i, acc, zero_s, row_threshold,
                Entries + tile.to(gl.int64) * k_tiles, verdicts_row, count, steps, base, seq_k, qk_scale, token,
                BLOCK_N, USE_LIST, MARK, ABOVE_MAX, MASK_ENDS, half, PINGPONG,
            )
            # The last group's word, whole (the loops store whole only the groups that end before
            # the last step); its bits were shifted in at the top, so shift them down to bit 0.
            if MARK:
                last = steps * STEP_TILES - 1
                _store_verdict(warp_bits >> (GROUP - 1 - last % GROUP).to(gl.uint32), last // GROUP, verdicts_row)
            base += steps
        # The claim and Q are free for the producer's next hand-over once every warp is past its
        # last wgmma and has read the claim.
        arrive_when_all_past(q_empty.index(slot))

        out = acc / gl.convert_layout(l_i, o_rows)[:, None]
        # Worked out here rather than kept live through the steps.
        b, h, _ = _tile_origin(tile, q_tiles, heads)
        offs_m = first_row + gl.arange(0, HALF_M, layout=o_rows)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        # A masked store, not TMA: rows past seq_q would land in the next batch element.
        gl.store(
            Out + b.to(gl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(dtype),
            mask=(offs_m < seq_q)[:, None],
        )
        if WRITE_LSE:
            lse_rows = first_row + gl.arange(0, HALF_M, layout=s_rows)
            lse = (m_i + gl.log2(l_i)) / LOG2E
            gl.store(Lse + (tile // q_tiles).to(gl.int64) * seq_q + lse_rows, lse, mask=lse_rows < seq_q)
        started += 1
        tile, count = _claim(claims, q_ready, started, half)
    if half == 0:
        token = _turn(token, half, True, PINGPONG)


@gluon.jit
def _gluon_attention_fwd(
    q_desc, k_desc, v_desc, Out, Lse, Verdicts, Entries, Counts, Next,
    stride_ob, stride_os, stride_oh,
    rows, q_tiles, heads, seq_q, seq_k, k_tiles, groups,
    qk_scale, threshold,
    STAGES: gl.constexpr, Q_BUFS: gl.constexpr, USE_LIST: gl.constexpr, MARK: gl.constexpr,
    ABOVE_MAX: gl.constexpr, WRITE_LSE: gl.constexpr, MASK_ENDS: gl.constexpr, STEP_TILES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Persistent: each program works through q-tiles (rows (b, h, q-tile) of the tile grid) until
    none is left, so one q-tile's loads and first steps go under the previous one's last steps
    and output store, instead of each q-tile paying its own launch, Q load and pipeline fill.
    Next: a zeroed counter of the q-tiles claimed after each program's first."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[2]
    # Q_BUFS pairs of halves: with two, the next q-tile's Q loads while this one's is in use.
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * Q_BUFS, HALF_M, HEAD_DIM], _tile_layout(q_desc.layout))
    # A ring buffer holds one step: STEP_TILES k-tiles, one TMA copy each.
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, STEP_TILES * BLOCK_N, HEAD_DIM], _tile_layout(k_desc.layout))
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, STEP_TILES * BLOCK_N, HEAD_DIM], _tile_layout(v_desc.layout))
    q_ready = gl.allocate_shared_memory(gl.int64, [2 * Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2 * Q_BUFS, 1], mbarrier.MBarrierLayout())
    # Per Q buffer, the q-tile whose Q it holds and that q-tile's count.
    claims = gl.allocate_shared_memory(gl.int32, [Q_BUFS, 2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for slot in gl.static_range(2 * Q_BUFS):
        mbarrier.init(q_ready.index(slot), count=1)
        mbarrier.init(q_empty.index(slot), count=1)  # the consumer of that half
    for stage in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(stage), count=1)
        mbarrier.init(v_ready.index(stage), count=1)
        mbarrier.init(kv_empty.index(stage), count=2)  # one arrival per consumer
    fence_async_shared()

    gl.warp_specialize(
        [
            (_consumer_partition, (
                0, q_smem, k_bufs, v_bufs, q_ready, q_empty, claims, k_ready, v_ready, kv_empty,
                Out, Lse, Entries, Verdicts, rows, q_tiles, heads, k_tiles, groups,
                seq_q, seq_k, stride_ob, stride_os, stride_oh, qk_scale, threshold,
                BLOCK_N, USE_LIST, MARK, ABOVE_MAX, WRITE_LSE, MASK_ENDS, PINGPONG,
            )),
            (_consumer_partition, (
                1, q_smem, k_bufs, v_bufs, q_ready, q_empty, claims, k_ready, v_ready, kv_empty,
                Out, Lse, Entries, Verdicts, rows, q_tiles, heads, k_tiles, groups,
                seq_q, seq_k, stride_ob, stride_os, stride_oh, qk_scale, threshold,
                BLOCK_N, USE_LIST, MARK, ABOVE_MAX, WRITE_LSE, MASK_ENDS, PINGPONG,
            )),
            (_load_partition, (
                q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_ready, q_empty, claims, k_ready, v_ready, kv_empty,
                Entries, Counts, Next, rows, q_tiles, heads, k_tiles, USE_LIST,
            )),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


# --------------------------------------------------------------------------------------------------
# Build switches: what each build compiles, from its tile shape, head dim and mode, and why (the
# measurements are in docs/performance.md).
# --------------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _packed_p(step_tiles, head_dim, mark):
    """Whether P is converted pair by pair: at head dim 128 (2-7% faster there), except for single
    128-key tiles with marking, where that build spills registers. At head dim 64 ptxas then
    schedules the wgmma differently and dense mode was 12% slower (docs/performance.md, v16)."""
    return head_dim == 128 and not (step_tiles == 1 and mark)


@gluon.constexpr_function
def _tree_row_max(use_list, mark, pingpong):
    """Whether the row max of a build without marking is folded as a tree (_row_max_tree). Only
    the work list with ping-pong (head dim 64) takes it: that loop ran 7% faster with it, while
    dense mode at head dim 64 was 2% slower and the list at head dim 128 5% slower, the step
    loops' wgmma and exponentials placed elsewhere by ptxas (docs/performance.md, v19)."""
    return use_list and pingpong and not mark


@gluon.constexpr_function
def _nested_steps(use_list, mark, pingpong):
    """Whether the steps of each group of GROUP tiles run in an inner loop rather than in one loop.
    With marking, each group's verdict word is then stored once, after its inner loop (one loop
    that tested for a group's end in every step was 1.6-12% slower in a first step, v17). Except
    at head dim 64 (ping-pong) from Triton 3.9, whose ptxas made that loop 8-11% slower than
    under 3.6: there one loop that stores the group's word in every step took a first step from
    1.10 to 1.03-1.04 of dense (under 3.6 and 3.8 it ran 5-7% slower; v25). Without marking,
    nesting only moves ptxas's schedule: the list with ping-pong (head dim 64) ran 11% faster
    nested, but dense mode was 3-7% slower and the list at head dim 128 2.5% slower
    (docs/performance.md, v17)."""
    if mark:
        return not (pingpong and TRITON_VERSION >= (3, 9))
    return use_list and pingpong


def _smem_bytes(step_n: int, head_dim: int, itemsize: int) -> tuple[int, int]:
    """Shared memory of one Q buffer (the q-tile's two halves) and of one K/V ring stage."""
    return 2 * HALF_M.value * head_dim * itemsize, 2 * step_n * head_dim * itemsize


def stages_for(step_n: int, head_dim: int, itemsize: int = 2) -> int:
    """Deepest K/V ring (at most 6) of step_n-key buffers that fits next to Q's two halves in
    shared memory."""
    q_bytes, stage_bytes = _smem_bytes(step_n, head_dim, itemsize)
    return max(0, min(6, (SMEM_BYTES - q_bytes) // stage_bytes))


def q_buffers(step_n: int, head_dim: int, stages: int, itemsize: int = 2) -> int:
    """Q buffers (pairs of halves) next to a ring of ``stages``: two where they fit (head dim 64),
    so that a program's next q-tile loads its Q before the current one is done with its own."""
    q_bytes, stage_bytes = _smem_bytes(step_n, head_dim, itemsize)
    return 2 if 2 * q_bytes + stages * stage_bytes <= SMEM_BYTES else 1


def step_tiles(block_n: int) -> int:
    """k-tiles per step: two 64-key tiles make one 128-key step (one wgmma each way and one softmax
    update per 128 keys, with the verdicts still per 64-key tile); 128-key tiles go one per step."""
    return 2 if block_n == 64 else 1


def default_stages(step_n: int, head_dim: int, itemsize: int = 2) -> int:
    """The ring depth measured best with 128-key steps: 3 (2 to 4 within noise of each other at
    head dim 128; 5 at head dim 64 was slower with marking, docs/performance.md, v13)."""
    return min(3, stages_for(step_n, head_dim, itemsize))


def pingpong(head_dim: int) -> bool:
    """Whether the two consumers take turns issuing wgmma: at head dim 64, where a step's
    exponentials take as long as its matrix products, it made LTX-Video's dense mode 8% and its
    steps with marking 7-8% faster than without; at head dim 128 it moved times by -2% to +2.4%
    (docs/performance.md, v14)."""
    return head_dim == 64


def dense_as_list(head_dim: int) -> bool:
    """Whether a dense call runs the work-list build over every k-tile instead of the dense build:
    at head dim 64 from Triton 3.9 on, whose dense step loop ran 7-10% slower than the list's
    (1.09-1.13x cuDNN on LTX-Video, H100; under 3.6 the two are within 1%; docs/performance.md,
    "Tuning under Triton 3.9"). Planning the list costs about 13 us."""
    return head_dim == 64 and TRITON_VERSION >= (3, 9)


def verdicts_shape(batch: int, heads: int, geometry: TileGeometry) -> tuple[int, int, int]:
    """Shape of a marking call's scratch: each consumer warp's verdict words per (batch, head,
    q-tile) row, one int32 per GROUP visited tiles."""
    return (batch * heads * geometry.q_tiles, triton.cdiv(geometry.k_tiles, GROUP.value), VERDICT_WARPS.value)


def unsupported_shape(geometry: TileGeometry, head_dim: int) -> str | None:
    """Why the Gluon kernel does not take this tile shape and (padded) head dim, or None if it
    does: it runs 128-row q-tiles with 64- or 128-key k-tiles at head dims 64 and 128, where it
    measured faster than the portable kernel (docs/performance.md)."""
    if geometry.block_m != 2 * HALF_M.value:
        return f"block_m={geometry.block_m}: it takes 128-row q-tiles"
    if geometry.block_n not in (64, 128):
        return f"block_n={geometry.block_n}: it takes 64- or 128-key k-tiles"
    if head_dim not in (64, 128):
        return f"head dim padded to {head_dim}: it takes head dims 33 to 128 (padded to 64 or 128)"
    return None


# 4 + 4 + 1 warps occupy three warpgroups: 12 x 32 threads x 168 registers fit the 64K register
# file; the producer then gives its registers up to the two consumers. FP fusion (FMA) stated,
# not defaulted: the scale folds into the exponent's FFMA, and Triton 3.10 turns the default off.
LAUNCH_OPTIONS = {"num_warps": 4, "maxnreg": 168, "enable_fp_fusion": True}


def _constexprs(
    head_dim: int, block_n: int, tiles: int, stages: int, *, use_list: bool, mark: bool, partial_n: bool,
    lse: bool, above_max: bool = False, itemsize: int = 2,
) -> dict[str, int | bool]:
    """The kernel's compile-time options. ``partial_n``: seq_k is not a multiple of block_n;
    ``above_max``: the threshold is positive, so a tile whose max is above the running max can be
    marked (two tiles per step then reduce the first one's max on its own)."""
    return {
        "STAGES": stages, "Q_BUFS": q_buffers(tiles * block_n, head_dim, stages, itemsize), "USE_LIST": use_list,
        "MARK": mark, "ABOVE_MAX": mark and above_max, "WRITE_LSE": lse, "MASK_ENDS": partial_n or tiles > 1,
        "STEP_TILES": tiles, "PINGPONG": pingpong(head_dim),
    }


def compile_for_sm90(
    head_dim: int, block_n: int, *, use_list: bool, mark: bool, partial_n: bool, lse: bool, above_max: bool = False,
):
    """The kernel compiled for sm_90 on any machine (ptxas runs on the host, no GPU needed), with
    the options ``gluon_forward`` would pick: for the compile tests and for reading its SASS
    (bench/gluon_sass.py). Call it without TRITON_INTERPRET, which replaces the kernel's
    functions with the interpreter's."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(rows: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[1,{rows},{head_dim}],{layout!r}>"

    signature = {
        "q_desc": desc(HALF_M.value), "k_desc": desc(block_n), "v_desc": desc(block_n), "Out": "*bf16",
        "Lse": "*fp32", "Verdicts": "*i32", "Entries": "*i32", "Counts": "*i32", "Next": "*i32", "stride_ob": "i32",
        "stride_os": "i32", "stride_oh": "i32", "rows": "i32", "q_tiles": "i32", "heads": "i32", "seq_q": "i32",
        "seq_k": "i32", "k_tiles": "i32", "groups": "i32", "qk_scale": "fp32", "threshold": "fp32",
    }
    tiles = step_tiles(block_n)
    stages = default_stages(tiles * block_n, head_dim)
    constexprs = _constexprs(
        head_dim, block_n, tiles, stages, use_list=use_list, mark=mark, partial_n=partial_n, lse=lse, above_max=above_max,
    )
    signature.update({name: "constexpr" for name in constexprs})
    source = GluonASTSource(fn=_gluon_attention_fwd, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: the persistent grid's size."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """3-D TMA descriptor over (B, S, H * D), tiles of (1, rows, D): rows past S are zero-filled,
    so a partial last tile never reads the next batch element. t's (H, D) must be contiguous."""
    batch, seq, heads, head_dim = t.shape
    block = [1, rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(t, [batch, seq, heads * head_dim], [t.stride(0), t.stride(1), 1], block, layout)


def gluon_forward(
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
    stages: int | None = None,
    pairs: bool | None = None,
    programs: int | None = None,
    dense_list: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the Gluon kernel (then, when marking, the pass that applies the verdicts);
    arguments as for :func:`triton_forward.triton_forward`. ``stages`` (K/V ring depth) and
    ``pairs`` (two 64-key tiles per step) override the defaults, for measurements, as does
    ``dense_list`` (whether a dense call runs the list build, by default :func:`dense_as_list`);
    ``programs`` (persistent programs, by default one per SM) for tests, which need several
    q-tiles per program at small sizes."""
    batch, seq_q, heads, head_dim = q.shape
    bn = geometry.block_n
    if pairs and bn != 64:
        raise ValueError(f"pairs: two tiles per step need 64-key tiles; got block_n={bn}")
    tiles = step_tiles(bn) if pairs is None else 1 + bool(pairs)
    stages = default_stages(tiles * bn, head_dim, q.element_size()) if stages is None else stages
    # A step holds the buffers of the steps whose QK^T and PV are in flight (two); a smaller ring
    # would wait forever for a buffer it holds itself.
    fits = stages_for(tiles * bn, head_dim, q.element_size())
    if stages < 2 or stages > fits:
        raise ValueError(
            f"stages: expected 2 to {fits} for {tiles} tile(s) per step at block_n={bn}, "
            f"head_dim={head_dim}; got {stages}"
        )
    if programs is None:
        programs = _sm_count(q.device)
    elif programs < 1:
        raise ValueError(f"programs: expected at least 1; got {programs}")
    if dense_list is None:
        dense_list = dense_as_list(head_dim)
    if work is None and bits is None and dense_list:
        # Its own statistics: a dense call counts no planned tiles.
        work = plan_unmasked(batch, heads, *range_words(geometry, (), (), q.device), geometry, torch.zeros_like(stats))
    mark, out, lse, dummy, entries, counts = launch_buffers(q, threshold, bits, work, return_lse)
    scratch = verdicts_shape(batch, heads, geometry)
    rows, groups = scratch[:2]
    verdicts = torch.empty(scratch, dtype=torch.int32, device=q.device) if mark else dummy
    _gluon_attention_fwd[(min(programs, rows),)](
        _descriptor(q, HALF_M.value), _descriptor(k, bn), _descriptor(v, bn),
        out, lse if lse is not None else dummy, verdicts, entries, counts,
        torch.zeros(1, dtype=torch.int32, device=q.device),  # the q-tile counter
        out.stride(0), out.stride(1), out.stride(2),
        rows, geometry.q_tiles, heads, seq_q, k.shape[1], geometry.k_tiles, groups,
        scale * LOG2E.value, threshold if mark else 0.0,
        **_constexprs(
            head_dim, bn, tiles, stages, use_list=work is not None, mark=mark, partial_n=k.shape[1] % bn != 0,
            lse=return_lse, above_max=threshold > 0, itemsize=q.element_size(),
        ),
        **LAUNCH_OPTIONS,
    )
    if mark:
        _apply_verdicts[(rows,)](
            verdicts, entries, counts, bits, stats, geometry.k_tiles, geometry.words, groups,
            GROUP_SIZE=GROUP.value, WARPS=VERDICT_WARPS.value,
        )
    return out, lse
