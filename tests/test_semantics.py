"""The LiteAttention contract, checked on every backend against float64 softmax attention.

Each test runs on the reference (float32 and bfloat16) and on the Triton kernel (float16 and
bfloat16; under TRITON_INTERPRET=1 when there is no GPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, FULL
from helpers import expand_tile_mask, rel_err, softmax_attention, tiled_inputs

from liteattention import LiteAttention, SkipState, lite_attention
from liteattention.plan import visit_order
from liteattention.state import TileGeometry

BACKENDS = [
    pytest.param("reference", torch.float32, id="reference-f32"),
    pytest.param("reference", torch.bfloat16, id="reference-bf16"),
    pytest.param("triton", torch.float16, id="triton-f16"),
    pytest.param("triton", torch.bfloat16, id="triton-bf16"),
]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def device_for(backend):
    return DEVICE if backend == "triton" else "cpu"


def randn(*shape, dtype, device):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def check_close(out, lse, q, k, v, dtype, key_mask=None, scale=None):
    ref_out, ref_lse = softmax_attention(q, k, v, scale=scale, key_mask=key_mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref_out.cpu()) < TOL[dtype]
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert (lse.double().cpu() - ref_lse.cpu()).abs().max().item() < LSE_TOL[dtype]


DENSE_SHAPES = [
    # (batch, seq_q, seq_k, heads, head_dim)
    (1, 1, 1, 1, 64),
    (2, 127, 127, 2, 64),
    (1, 129, 129, 1, 128),
    (1, 1000, 1000, 1, 64),
    (2, 100, 257, 1, 32),   # Sq != Sk
    (1, 257, 70, 2, 96),    # Sq != Sk, head dim padded to 128 in the kernel
    (1, 70, 70, 1, 256),    # 64 x 64 tiles by default at this head dim
]
if FULL:
    DENSE_SHAPES += [(1, 5000, 5000, 4, 128), (1, 32760, 32760, 2, 128), (1, 5000, 5000, 4, 64), (2, 32760, 32760, 1, 64)]


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_modes_equal_softmax_attention(backend, dtype, shape):
    """Skipping disabled, and a state with threshold=-inf, both give exact attention and LSE."""
    b, sq, sk, h, d = shape
    if backend == "reference" and b * sq * h > 10**5:
        pytest.skip("full sizes run on the kernel; the reference tile loop is the CPU path")
    dev = device_for(backend)
    q, k, v = randn(b, sq, h, d, dtype=dtype, device=dev), randn(b, sk, h, d, dtype=dtype, device=dev), randn(b, sk, h, d, dtype=dtype, device=dev)
    out, lse = lite_attention(q, k, v, None, return_lse=True, backend=backend)
    check_close(out, lse, q, k, v, dtype)
    attn = LiteAttention(threshold=-math.inf, backend=backend)
    for _ in range(2):
        out, lse = attn(q, k, v, return_lse=True)
        check_close(out, lse, q, k, v, dtype)
        assert attn.last_sparsity == 0.0 and not attn.mask().any()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_scale_argument(backend, dtype):
    dev = device_for(backend)
    q, k, v = (randn(1, 70, 2, 64, dtype=dtype, device=dev) for _ in range(3))
    out, lse = lite_attention(q, k, v, scale=0.3, return_lse=True, backend=backend)
    check_close(out, lse, q, k, v, dtype, scale=0.3)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_huge_threshold_marks_all_but_first_visited_tile(backend, dtype):
    dev = device_for(backend)
    q, k, v = (randn(2, 100, 2, 32, dtype=dtype, device=dev) for _ in range(3))
    attn = LiteAttention(threshold=1e4, block_m=32, block_n=16, backend=backend)
    attn(q, k, v)
    mask = attn.mask()
    g = attn.state.geometry
    first = g.diagonal_tiles(mask.device)
    expected = torch.ones_like(mask)
    expected[:, :, torch.arange(g.q_tiles), first] = False
    assert torch.equal(mask, expected)
    # Next step: only the diagonal tile is computed, and the output is attention over it alone.
    out, lse = attn(q, k, v, return_lse=True)
    assert attn.last_stats.computed_tiles == 2 * 2 * g.q_tiles
    key_mask = expand_tile_mask(~expected, g.block_m, g.block_n, 100, 100)
    check_close(out, lse, q, k, v, dtype, key_mask=key_mask)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_crafted_negligible_tiles_are_marked_exactly_and_skipped(backend, dtype):
    b, s, h, d, bm, bn = 2, 96, 2, 32, 32, 16
    dev = device_for(backend)
    g = TileGeometry(s, s, bm, bn)
    negligible = torch.rand(b, h, g.k_tiles) < 0.4
    # The diagonal tile of each q-tile is visited first and must stay important, so that the
    # expected marks are exactly the negligible tiles of each row.
    diag = g.diagonal_tiles()
    negligible[..., diag] = False
    q, k, v = tiled_inputs(b, s, h, d, bn, dtype, dev, negligible)
    attn = LiteAttention(threshold=-8.0, block_m=bm, block_n=bn, backend=backend)
    attn(q, k, v)
    expected = negligible[:, :, None, :].expand(b, h, g.q_tiles, g.k_tiles)
    assert torch.equal(attn.mask().cpu(), expected)
    assert attn.last_stats.newly_marked == int(expected.sum())
    # Step 1 skips them: its output is exact attention over the remaining keys.
    out, lse = attn(q, k, v, return_lse=True)
    assert attn.last_sparsity == pytest.approx(expected.float().mean().item())
    check_close(out, lse, q, k, v, dtype, key_mask=expand_tile_mask(~expected, bm, bn, s, s))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_skipped_values_are_never_read(backend, dtype):
    """Whole-tile elimination: NaN in the values of skipped tiles must not reach the output."""
    b, s, h, d, bm, bn = 1, 64, 1, 32, 32, 16
    dev = device_for(backend)
    negligible = torch.tensor([[[False, True, False, True]]])
    q, k, v = tiled_inputs(b, s, h, d, bn, dtype, dev, negligible)
    attn = LiteAttention(threshold=-8.0, block_m=bm, block_n=bn, backend=backend)
    attn(q, k, v)
    assert attn.mask().sum() == 2 * 2
    v_nan = v.clone()
    v_nan[:, 16:32] = float("nan")
    v_nan[:, 48:64] = float("nan")
    k_nan = k.clone()
    k_nan[:, 16:32] = float("nan")
    out = attn(q, k_nan, v_nan)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_marks_are_monotone_and_minus_inf_marks_nothing(backend, dtype):
    dev = device_for(backend)
    b, s, h, d, bm, bn = 1, 80, 2, 32, 16, 16
    g = TileGeometry(s, s, bm, bn)
    lite = LiteAttention(threshold=[-12.0, -8.0, -8.0, -4.0], block_m=bm, block_n=bn, backend=backend)
    never = LiteAttention(threshold=-math.inf, block_m=bm, block_n=bn, backend=backend)
    previous = torch.zeros(b, h, g.q_tiles, g.k_tiles, dtype=torch.bool)
    for step in range(4):
        negligible = torch.rand(b, h, g.k_tiles) < 0.5
        q, k, v = tiled_inputs(b, s, h, d, bn, dtype, dev, negligible, seed=step)
        lite(q, k, v)
        never(q, k, v)
        mask = lite.mask().cpu()
        assert (mask | previous).equal(mask), "a mark disappeared"
        previous = mask
        assert not never.mask().any() and never.last_sparsity == 0.0
    assert previous.any()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("edge", [-1, 0, 1])
def test_must_do_and_must_skip_at_tile_edges(backend, dtype, edge):
    """Ranges starting/ending at a tile boundary and one key either side of it."""
    b, s, h, d, bm, bn = 1, 80, 2, 32, 16, 16
    dev = device_for(backend)
    q, k, v = (randn(b, s, h, d, dtype=dtype, device=dev) for _ in range(3))
    skip = (16 + edge, 48 + edge)   # wholly covers k-tile 2 always; tiles 1 and 3 only when edge==0
    do = (64 + edge, 80)            # overlaps tile 4 always, tile 3 when edge == -1
    attn = LiteAttention(threshold=1e4, block_m=bm, block_n=bn, backend=backend)
    out, lse = attn(q, k, v, must_do=do, must_skip=skip, return_lse=True)
    skipped_tiles = {1, 2} if edge == 0 else {2}
    if edge == -1:
        skipped_tiles = {1}
    done_tiles = {3, 4} if edge == -1 else {4}
    computed = torch.ones(5, dtype=torch.bool)
    computed[list(skipped_tiles)] = False
    key_mask = computed.repeat_interleave(bn)[None, None, None, :s].expand(b, h, s, s)
    check_close(out, lse, q, k, v, dtype, key_mask=key_mask)
    mask = attn.mask()
    assert not mask[..., sorted(done_tiles)].any(), "a must-do tile was marked"
    assert not mask[..., sorted(skipped_tiles)].any(), "a must-skip tile was marked"
    assert attn.last_stats.computed_tiles == b * h * 5 * int(computed.sum())


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_must_do_over_whole_axis_skips_nothing(backend, dtype):
    dev = device_for(backend)
    q, k, v = (randn(1, 50, 2, 32, dtype=dtype, device=dev) for _ in range(3))
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16, backend=backend)
    for _ in range(3):
        out, lse = attn(q, k, v, must_do=(0, 50), return_lse=True)
        assert not attn.mask().any() and attn.last_sparsity == 0.0
    check_close(out, lse, q, k, v, dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("block_n, head_dim", [(64, 64), (128, 128)])
# The poisoned element's own NaN arithmetic, which the interpreter's numpy reports.
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_a_non_finite_value_stays_in_its_batch_element(backend, dtype, block_n, head_dim):
    """inf or NaN in one batch element's q, k or v changes no other (batch, head)'s output, LSE
    or marks, bit for bit: a partial last tile never reads the next batch element's rows (where
    a weight of 0 times inf would be NaN). Default q-tiles of 128 rows, so on a Hopper GPU this is
    the Gluon kernel."""
    device = device_for(backend)
    batch, seq, heads = 3, 100, 2
    clean = [randn(batch, seq, heads, head_dim, dtype=dtype, device=device) for _ in range(3)]
    results = []
    for poison in (None, "q", "k", "v"):
        q, k, v = (t.clone() for t in clean)
        if poison is not None:
            {"q": q, "k": k, "v": v}[poison][1, 0, 0] = float("inf") if poison != "q" else float("nan")
        state = SkipState.for_inputs(q, k, block_n=block_n)
        calls = [lite_attention(q, k, v, state, threshold=-3.0, return_lse=True, backend=backend) for _ in range(2)]
        results.append((calls, state.mask()))
    others = torch.ones(batch, heads, dtype=torch.bool)
    others[1, 0] = False  # the poisoned (batch, head)
    (clean_calls, clean_mask), *poisoned = results
    for calls, mask in poisoned:
        assert torch.equal(mask[others], clean_mask[others])
        for (out, lse), (clean_out, clean_lse) in zip(calls, clean_calls):
            assert torch.equal(out.transpose(1, 2)[others], clean_out.transpose(1, 2)[others])
            assert torch.equal(lse[others], clean_lse[others])


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_the_anchor_tile_keeps_every_row_attending(backend, dtype):
    """Marks made under one must-skip range can cover every tile that another call leaves: here
    q-tile 0 marks k-tile 2 while k-tile 0 is must-skip, then k-tile 1 once k-tile 0 is back. Its
    anchor, the first tile in visit order that is not must-skip (k-tile 1 when k-tile 0 is), is
    computed anyway, so no row loses every key (they were NaN, with an LSE of -inf)."""
    device = device_for(backend)
    seq, dim, block = 48, 16, 16
    q, k, v = 0.1 * torch.randn(1, seq, 1, dim), 0.1 * torch.randn(1, seq, 1, dim), torch.randn(1, seq, 1, dim)
    q[..., 0] = 1.0
    # Scores of 20, 10 and 0 nats on k-tiles 0, 1 and 2: each 14 log2 units below the one before.
    k[0, :, 0, 0] = torch.tensor([20.0, 10.0, 0.0]).repeat_interleave(block) / dim**-0.5
    q, k, v = (t.to(dtype=dtype, device=device) for t in (q, k, v))
    state = SkipState.for_inputs(q, k, block, block)
    for must_skip in [(0, 16), None, (0, 16)]:
        out, lse = lite_attention(q, k, v, state, threshold=-2.0, must_skip=must_skip, return_lse=True, backend=backend)
    assert state.mask()[0, 0, 0].tolist() == [False, True, True]  # q-tile 0's k-tiles 1 and 2 are marked
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Each q-tile computes its anchor alone: k-tile 1 for q-tiles 0 and 1, its diagonal tile 2 for
    # q-tile 2 (whose k-tile 1 is marked).
    computed = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    key_mask = expand_tile_mask(computed[None, None], block, block, seq, seq)
    check_close(out, lse, q, k, v, dtype, key_mask=key_mask)
    assert state.last_stats.computed_tiles == 3


def test_visit_order_is_diagonal_first_then_ascending():
    g = TileGeometry(seq_q=100, seq_k=300, block_m=32, block_n=64)
    order = visit_order(g, torch.device("cpu"))
    # q-tile 2 starts at row 64 -> key 192 -> k-tile 3.
    assert order[2].tolist() == [3, 0, 1, 2, 4]
    assert order[0].tolist() == [0, 1, 2, 3, 4]
    assert all(sorted(row) == list(range(5)) for row in order.tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_over_steps(dtype):
    """Same marks bit for bit and the same outputs, over simulated denoising steps."""
    b, s, h, d, bm, bn = 2, 112, 2, 64, 32, 16
    sizes = [(b, s, h, d, bm, bn)]
    if FULL:
        sizes += [(1, 5000, 4, 128, 128, 64), (1, 5000, 2, 64, 128, 64)]
    for b, s, h, d, bm, bn in sizes:
        g = TileGeometry(s, s, bm, bn)
        ref = LiteAttention(threshold=lambda t: -12.0 + 2 * t, block_m=bm, block_n=bn, backend="reference")
        tri = LiteAttention(threshold=lambda t: -12.0 + 2 * t, block_m=bm, block_n=bn, backend="triton")
        base = torch.rand(b, h, g.k_tiles) < 0.3
        for step in range(4):
            # The pattern drifts a little each step, as attention does between denoising steps.
            negligible = base ^ (torch.rand(b, h, g.k_tiles) < 0.1)
            q, k, v = tiled_inputs(b, s, h, d, bn, dtype, DEVICE, negligible, seed=step)
            out_tri = tri(q, k, v)
            out_ref = ref(q.cpu(), k.cpu(), v.cpu())
            assert torch.equal(tri.mask().cpu(), ref.mask()), f"marks differ at step {step}"
            assert tri.last_stats == ref.last_stats
            assert rel_err(out_tri.cpu(), out_ref) < TOL[dtype]
        assert ref.mask().any() and ref.last_sparsity > 0


@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_marks_across_verdict_groups(dtype):
    """Rows with more than 64 computed tiles: verdicts are reduced in groups of 64 visited tiles."""
    b, sq, sk, h, d, bm, bn = 1, 40, 16 * 150, 1, 32, 16, 16
    g = TileGeometry(sq, sk, bm, bn)
    negligible = torch.rand(b, h, g.k_tiles) < 0.5
    negligible[..., g.diagonal_tiles()] = False
    q, k, v = tiled_inputs(b, sk, h, d, bn, dtype, DEVICE, negligible, seq_q=sq)
    ref = LiteAttention(threshold=-8.0, block_m=bm, block_n=bn, backend="reference")
    tri = LiteAttention(threshold=-8.0, block_m=bm, block_n=bn, backend="triton")
    tri(q, k, v)
    ref(q.cpu(), k.cpu(), v.cpu())
    expected = negligible[:, :, None, :].expand(b, h, g.q_tiles, g.k_tiles)
    assert torch.equal(ref.mask(), expected)
    assert torch.equal(tri.mask().cpu(), expected)
    assert tri.last_stats == ref.last_stats


def test_state_memory_is_bit_packed():
    state = SkipState(1, 40, 75600, 75600, 128, dtype=torch.bfloat16, device="meta")
    g = state.geometry
    assert (g.q_tiles, g.k_tiles) == (591, 1182)
    assert state.nbytes == 40 * 591 * 37 * 4  # 3.5 MB for the Wan2.1-14B 720p shape


@pytest.mark.parametrize("seq_q,seq_k", [(100, 300), (300, 100), (96, 96)])
def test_triton_work_planner_matches_plan(seq_q, seq_k):
    """The GPU planner lists exactly the plan's computed tiles, in visit order, must-do flagged."""
    from liteattention.kernels import STATS, plan_work
    from liteattention.plan import build_plan, range_words

    b, h = 2, 3
    g = TileGeometry(seq_q, seq_k, 16, 16)
    mask = torch.rand(b, h, g.q_tiles, g.k_tiles) < 0.5
    must_do, must_skip = ((0, 20),), ((40, 70),)
    plan = build_plan(g, b, h, torch.device("cpu"), mask, must_do, must_skip)
    state = SkipState(b, h, seq_q, seq_k, 32, dtype=torch.float16, device=DEVICE, block_m=16, block_n=16)
    state.set_mask(mask)
    stats = torch.zeros(STATS, dtype=torch.int64, device=DEVICE)
    work = plan_work(state.bits, *range_words(g, must_do, must_skip, torch.device(DEVICE)), g, stats)
    entries, counts = work.entries.cpu(), work.counts.cpu()
    for bi in range(b):
        for hi in range(h):
            for i in range(g.q_tiles):
                expected = [j for j in plan.order[i].tolist() if plan.computed[bi, hi, i, j]]
                n = counts[bi, hi, i].item()
                listed = entries[bi, hi, i, :n].tolist()
                assert [e if e >= 0 else -e - 1 for e in listed] == expected
                assert [e < 0 for e in listed] == [not plan.markable[j] for j in expected]
    assert stats.tolist()[:2] == [int(plan.computed.sum()), int(mask.sum())]


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU synchronisation")
def test_triton_call_with_state_never_waits_for_the_gpu():
    """A layer's call queues its work and returns: nothing on the way (planning inputs, statistics)
    waits for the GPU, so the host prepares the next layer while this one runs."""
    q, k, v = (torch.randn(1, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attn = LiteAttention(threshold=-8.0)
    attn(q, k, v, must_do=(0, 77))  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the check sees a copy from host memory, which waits
            torch.ones(4).to("cuda")
        attn(q, k, v, must_do=(0, 77))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert attn.step == 2
