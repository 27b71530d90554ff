"""The 8-bit path (quant="qk_int8_pv_fp8"): its input transform, its accuracy against 16-bit
attention, the kernel against the reference semantics, marking on the scores it computes, and
its errors. The accuracy bar at full size (cosine >= 0.999) is measured on the GPU
(bench/quant_accuracy.py); these CPU cases are small, where errors average out less."""

from __future__ import annotations


import pytest
import torch
from conftest import DEVICE
from helpers import rel_err, softmax_attention

from liteattention import LiteAttention, SkipState, lite_attention
from liteattention.kernels import choose_kernel
from liteattention.quantize import FP8_MAX, INT8_MAX, quantize_inputs
from liteattention.state import TileGeometry
from liteattention.synthetic import video_qkv

QUANT = "qk_int8_pv_fp8"


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_quantized_values_are_within_half_a_step_of_the_inputs():
    q, k, v = video_qkv(2, (2, 8, 10), 3, 64, dtype=torch.float32, seed=1)
    g = TileGeometry(q.shape[1], k.shape[1], 64, 32)
    qz = quantize_inputs(q, k, v, g)
    assert qz.q.dtype == qz.k.dtype == torch.int8 and qz.v_t.dtype == torch.float8_e4m3fn
    assert qz.q_scale.shape == (2, 3, g.q_tiles) and qz.k_scale.shape == (2, 3, g.k_tiles)
    assert qz.v_t.shape[-1] % 16 == 0 and not qz.v_t[..., g.seq_k:].float().any()  # zero padding
    dq, dk, dv = qz.dequantized()
    smoothed_k = k - k.mean(1, keepdim=True)
    # int8: half a step of the tile's scale; the scales come from the tiles' amax.
    q_step = qz.q_scale.repeat_interleave(64, -1)[..., : g.seq_q].transpose(1, 2)[..., None]
    k_step = qz.k_scale.repeat_interleave(32, -1)[..., : g.seq_k].transpose(1, 2)[..., None]
    assert ((dq - q).abs() <= q_step / 2 + 1e-6).all()
    assert ((dk - smoothed_k).abs() <= k_step / 2 + 1e-5).all()
    assert torch.allclose(qz.q_scale[:, :, 0], q[:, :64].abs().amax((1, 3)) / INT8_MAX)
    # FP8 e4m3 has 3 mantissa bits: a relative error of at most 2^-4 above its normal range's floor.
    v_err = (dv - v).abs()
    assert (v_err <= (v - v.mean(1, keepdim=True)).abs() / 16 + qz.v_scale[:, None] * 2.0**-9 + 1e-6).all()
    assert torch.allclose(qz.v_scale, (v - v.mean(1, keepdim=True)).abs().amax(1) / FP8_MAX)


def test_the_compiled_quantization_gpus_run_equals_the_eager_one():
    """On a GPU quantize_inputs runs its ops through torch.compile; here both forms, on the CPU."""
    from liteattention.quantize import _compiled_quantize, _quantize

    q, k, v = video_qkv(1, (2, 8, 9), 2, 64, dtype=torch.bfloat16, seed=2)
    compiled, eager = _compiled_quantize()(q, k, v, 64, 32), _quantize(q, k, v, 64, 32)
    for a, b in zip(compiled, eager, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_attention_is_close_to_16_bit_attention(backend):
    """Structured inputs (local, peaked heads and a nearly uniform one; channel offsets on k and v):
    the output within cosine 0.998 and the LSE within 0.1 of exact attention."""
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v = video_qkv(2, (3, 8, 12), 4, 64, dtype=torch.bfloat16, device=device)
    out, lse = lite_attention(q, k, v, backend=backend, return_lse=True, quant=QUANT)
    exact, exact_lse = softmax_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()
    assert cosine(out.cpu(), exact.cpu()) > 0.998
    assert rel_err(out.cpu(), exact.cpu()) < 0.06
    assert (lse.double().cpu() - exact_lse.cpu()).abs().max().item() < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_the_quantized_reference_over_steps(dtype):
    """The kernel against the reference semantics (attention over the dequantized values): the
    same marks call after call (the rule applies to the scores the quantized path computes), outputs within the FP8 rounding of P, the same LSE. Sq != Sk and
    partial tiles at both ends."""
    q, k, v = video_qkv(2, (3, 7, 9), 2, 64, dtype=dtype, device=DEVICE, seed=3)
    k, v = k[:, :150], v[:, :150]
    states = {b: SkipState.for_inputs(q, k, 64, 32) for b in ("reference", "triton")}
    for step in range(3):
        results = {
            b: lite_attention(q, k, v, states[b], threshold=-4.0, return_lse=True, backend=b, quant=QUANT)
            for b in states
        }
        assert torch.equal(states["triton"].mask().cpu(), states["reference"].mask().cpu())
        (out, lse), (ref_out, ref_lse) = results["triton"], results["reference"]
        assert rel_err(out.cpu(), ref_out.cpu()) < 0.03
        assert (lse.cpu() - ref_lse.cpu()).abs().max().item() < 1e-3
    assert states["triton"].mask().any() and not states["triton"].mask().all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantized_scales_stay_in_their_batch_element(backend):
    """Scales and means are per (batch, head): inf in one batch element's v leaves the others'
    outputs bit for bit."""
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v = video_qkv(2, (1, 8, 12), 2, 32, dtype=torch.float16, device=device)
    clean = lite_attention(q, k, v, backend=backend, quant=QUANT)
    v = v.clone()
    v[1, 3, 0, 5] = float("inf")
    poisoned = lite_attention(q, k, v, backend=backend, quant=QUANT)
    assert torch.equal(poisoned[0], clean[0]) and torch.equal(poisoned[1, :, 1], clean[1, :, 1])


def test_the_module_form_takes_quant():
    q, k, v = video_qkv(1, (1, 8, 8), 1, 32, dtype=torch.float32)
    attn = LiteAttention(threshold=-3.0, backend="reference", quant=QUANT)
    assert "quant='qk_int8_pv_fp8'" in repr(attn)
    first = attn(q, k, v)
    assert torch.equal(first, lite_attention(q, k, v, backend="reference", quant=QUANT))
    attn(q, k, v)
    assert attn.step == 2


def test_bad_quant_values_are_rejected_early():
    with pytest.raises(ValueError, match="quant must be None or one of 'qk_int8_pv_fp8', got 'fp4'"):
        LiteAttention(quant="fp4")
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match="quant must be None"):
        lite_attention(q, q, q, quant="int8")


def test_gpus_without_fp8_tensor_cores_get_a_clear_error():
    g = TileGeometry(256, 256, 128, 64)
    with pytest.raises(ValueError, match=r"needs FP8 tensor cores \(sm_89 or newer.*got sm_80"):
        choose_kernel(torch.device("cuda"), g, 128, capability=(8, 0), quant=QUANT)
    choice = choose_kernel(torch.device("cuda"), g, 128, capability=(9, 0), quant=QUANT)
    assert choice.kernel == "portable" and "portable kernel" in choice.reason
