"""Bad input raises a clear error naming the argument; state is never silently reused."""

from __future__ import annotations

import math

import pytest
import torch

from liteattention import LiteAttention, SkipState, ThresholdSchedule, lite_attention
from liteattention.state import pack_bits, unpack_bits


def qkv(b=1, s=40, h=2, d=32, dtype=torch.float32, sk=None):
    sk = s if sk is None else sk
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, sk, h, d, dtype=dtype), torch.randn(b, sk, h, d, dtype=dtype)


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \(batch, seq, heads, head_dim\)"),
        (lambda q, k, v: (q, k[..., :16], v), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1]), ValueError, "same heads"),
        (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "same head_dim"),
        (lambda q, k, v: (q[:1], torch.cat([k, k]), torch.cat([v, v])), ValueError, "same batch"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be a floating-point tensor"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, "q must not be empty"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lite_attention(*make(*qkv()))
    with pytest.raises(exc, match=pattern):
        LiteAttention()(*make(*qkv()))


def test_triton_backend_rejects_dtype_and_head_dim():
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        lite_attention(*qkv(), backend="triton")
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        lite_attention(*qkv(d=40, dtype=torch.float16), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        lite_attention(*qkv(), backend="cuda")


@pytest.mark.parametrize("threshold,exc", [(math.nan, ValueError), (math.inf, ValueError), ("-10", TypeError), (None, TypeError)])
def test_bad_threshold(threshold, exc):
    with pytest.raises(exc, match="threshold"):
        lite_attention(*qkv(), SkipState(1, 2, 40, 40, 32, dtype=torch.float32, device="cpu"), threshold=threshold)
    with pytest.raises(exc, match="threshold"):
        LiteAttention(threshold=threshold)


def test_bad_schedule_values():
    with pytest.raises(ValueError, match=r"threshold\[1\] must not be NaN"):
        ThresholdSchedule([-10.0, math.nan])
    with pytest.raises(ValueError, match="must not be empty"):
        ThresholdSchedule([])
    attn = LiteAttention(threshold=lambda step: math.nan)
    with pytest.raises(ValueError, match=r"threshold\(0\) must not be NaN"):
        attn(*qkv())


def test_schedule_per_step():
    sched = ThresholdSchedule([-20.0, -15.0, -10.0])
    assert [sched(i) for i in range(5)] == [-20.0, -15.0, -10.0, -10.0, -10.0]
    assert ThresholdSchedule(lambda t: -20.0 + t)(3) == -17.0
    assert ThresholdSchedule(-5)(100) == -5.0
    attn = LiteAttention(threshold=[-math.inf, 1e4], block_m=16, block_n=16)
    q, k, v = qkv()
    attn(q, k, v)
    assert attn.last_stats.threshold == -math.inf and not attn.mask().any()
    attn(q, k, v)
    assert attn.last_stats.threshold == 1e4 and attn.mask().any()
    attn(q, k, v, step=0)
    assert attn.last_stats.threshold == -math.inf


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(must_do=(10, 5)), ValueError, r"must_do\[0\] = \(10, 5\) must satisfy 0 <= start < end <= 40"),
        (dict(must_do=(-1, 5)), ValueError, r"must_do\[0\]"),
        (dict(must_skip=[(0, 41)]), ValueError, r"must_skip\[0\] = \(0, 41\)"),
        (dict(must_skip=[(0, 8), (3.0, 9)]), TypeError, r"must_skip\[1\] must be a \(start, end\) pair of ints"),
        (dict(must_skip="0:10"), TypeError, "must_skip must be a"),
        (dict(must_skip=(0, 40)), ValueError, "must_skip covers every key tile"),
        (dict(must_do=(0, 20), must_skip=(0, 16)), ValueError, "must be disjoint"),
        (dict(scale=0.0), ValueError, "scale must be a positive finite float"),
        (dict(scale=math.nan), ValueError, "scale must be"),
    ],
)
def test_bad_ranges_and_scale(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LiteAttention(block_m=16, block_n=16)(*qkv(), **kwargs)


def test_bad_block_sizes():
    with pytest.raises(ValueError, match="block_m must be one of"):
        LiteAttention(block_m=48)
    with pytest.raises(ValueError, match="block_n must be one of"):
        SkipState(1, 1, 10, 10, 32, dtype=torch.float32, device="cpu", block_n=8)


@pytest.mark.parametrize(
    "change",
    [
        dict(b=2), dict(s=41), dict(sk=50), dict(h=3), dict(d=64), dict(dtype=torch.float64),
    ],
    ids=["batch", "seq_q", "seq_k", "heads", "head_dim", "dtype"],
)
def test_state_mismatch_is_rejected_or_rebuilt(change):
    q, k, v = qkv()
    state = SkipState.for_inputs(q, k)
    lite_attention(q, k, v, state, threshold=1e4)
    q2, k2, v2 = qkv(**change)
    with pytest.raises(ValueError, match="state does not fit the inputs: state was built for"):
        lite_attention(q2, k2, v2, state)
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    attn(q, k, v)
    assert attn.mask().any()
    with pytest.warns(UserWarning, match="rebuilding the skip state"):
        attn(q2, k2, v2)
    assert attn.step == 1 and attn.mask().shape[0] == q2.shape[0]


def test_state_reset_disable_and_stats():
    q, k, v = qkv(s=64)
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    attn(q, k, v)
    first = attn.last_stats
    assert first.step == 0 and first.sparsity == 0.0 and first.newly_marked == 2 * 4 * 3
    assert first.marked_fraction == pytest.approx(0.75)
    attn(q, k, v)
    assert attn.last_sparsity == pytest.approx(0.75) and attn.last_stats.newly_marked == 0
    attn.enabled = False
    attn(q, k, v)
    assert attn.step == 2, "a disabled call must not touch the state"
    attn.enabled = True
    attn.reset()
    assert attn.step == 0 and not attn.mask().any() and attn.last_stats is None


def test_pack_roundtrip_and_set_mask():
    mask = torch.rand(2, 3, 5, 70) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 70), mask)
    assert pack_bits(torch.ones(1, 32, dtype=torch.bool)).item() == -1
    state = SkipState(2, 3, 5 * 16, 70 * 16, 32, dtype=torch.float32, device="cpu", block_m=16, block_n=16)
    state.set_mask(mask)
    assert torch.equal(state.mask(), mask)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3, 5, 70\)"):
        state.set_mask(mask[..., :69])


def test_functional_state_type_checked():
    with pytest.raises(TypeError, match="state must be a SkipState"):
        lite_attention(*qkv(), state="mask")


def test_state_and_geometry_constructors_name_the_bad_argument():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"q must be a tensor of shape \(batch, seq, heads, head_dim\), got \(40, 2, 32\)"):
        SkipState.for_inputs(q[0], k)
    with pytest.raises(ValueError, match="k must be a tensor of shape"):
        SkipState.for_inputs(q, None)
    from liteattention import TileGeometry

    with pytest.raises(ValueError, match="block_m: expected an integer >= 1, got 0"):
        TileGeometry(10, 10, 0, 64)
    with pytest.raises(ValueError, match="seq_k: expected a sequence length >= 1, got 0"):
        TileGeometry(10, 0, 64, 64)


def test_the_registered_op_checks_its_tensors_before_marking():
    from liteattention.ops import COUNTS
    from liteattention.state import TileGeometry

    q, k, v = qkv(s=64)
    bits = torch.zeros(TileGeometry(64, 64, 16, 16).mask_shape(1, 2), dtype=torch.int32)
    args = dict(must_do=[], must_skip=[], scale=None, block_m=16, block_n=16, backend="reference")
    threshold = torch.tensor(1e4, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"counts: expected shape \({COUNTS},\), got \(3,\)"):
        torch.ops.liteattention.attention(q, k, v, bits, torch.zeros(3, dtype=torch.int64), threshold, **args)
    with pytest.raises(ValueError, match=r"threshold: expected a one-element tensor, got shape \(2,\)"):
        torch.ops.liteattention.attention(q, k, v, bits, None, threshold.repeat(2), **args)
    assert not bits.any(), "a refused call must not mark"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_outputs_are_contiguous_whatever_the_input_layout(backend):
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(s=100, dtype=dtype))  # heads outer
    out, lse = lite_attention(q, k, v, SkipState.for_inputs(q, k), threshold=-4.0, return_lse=True, backend=backend)
    assert out.is_contiguous() and lse.is_contiguous()
    out.view(1, 100, -1)  # heads merged, as the models do next
