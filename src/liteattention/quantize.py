"""The quantized path's input transform, shared by every backend (``quant="qk_int8_pv_fp8"``).

As in SageAttention2: Q and K in int8 (per tile), K smoothed, V and the softmax weights P in FP8
e4m3; both products accumulate in fp32. The 8-bit tensor cores of Ada and Hopper have twice the
bf16 throughput.

- **K is smoothed**: its mean over the keys (per batch, head and channel) is subtracted. That
  shifts every score of a query row by the same ``q . mean(k)``, which the softmax ignores and so
  does the marking rule (it compares scores of one row with each other); the LSE gets the shift
  back. Video transformers' keys share a large channel-wise offset; with it taken out, int8 keeps
  its resolution for what tells keys apart.
- **Q and K** are rounded to int8 per tile (``block_m`` queries or ``block_n`` keys of one head),
  symmetric, scale = amax / 127. The kernel multiplies the exact int32 dot products by
  ``q_scale * k_scale``, so the scores it computes (and marks from) are those of the dequantized
  tensors, up to fp32 rounding.
- **V is smoothed** too, and its mean added back to the output: each output row is a weighted mean
  of V's rows (weights that sum to 1, over the tiles computed), so the shift passes through exactly.
- **V** is rounded to FP8 e4m3 per channel (batch, head, channel), scale = amax / 448, and stored
  transposed (B, H, D, Sk): the 8-bit tensor cores take their second operand with the reduction
  (key) axis contiguous.
- **P** is rounded to FP8 in the kernel, after scaling the row max to ``P_MAX`` (the reference does
  not model this rounding; its error is part of the measured accuracy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from .state import TileGeometry

Quant = Literal["qk_int8_pv_fp8"]
QUANT_MODES: tuple[str, ...] = ("qk_int8_pv_fp8",)

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
P_MAX = 256.0  # P's row max in FP8: a power of two (exact exp2), below FP8_MAX with a margin
V_ALIGN = 16  # the transposed V's key axis is padded to 16 bytes for TMA


def check_quant(quant: str | None) -> None:
    """Raise a ValueError unless ``quant`` is None or names a mode of ``QUANT_MODES``."""
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"quant must be None or one of {', '.join(map(repr, QUANT_MODES))}, got {quant!r}")


@dataclass(frozen=True)
class QuantizedInputs:
    """q, k, v as the quantized kernel reads them (see the module docstring)."""

    q: torch.Tensor  # int8 (B, Sq, H, D)
    k: torch.Tensor  # int8 (B, Sk, H, D), smoothed
    v_t: torch.Tensor  # float8_e4m3fn (B, H, D, Sk rounded up to V_ALIGN), zero beyond Sk
    q_scale: torch.Tensor  # float32 (B, H, Qt)
    k_scale: torch.Tensor  # float32 (B, H, Kt)
    v_scale: torch.Tensor  # float32 (B, H, D)
    k_mean: torch.Tensor  # float32 (B, H, D): what smoothing took out of K
    v_mean: torch.Tensor  # float32 (B, H, D): what smoothing took out of V (added to the output)
    geometry: TileGeometry  # the tiles the scales belong to

    def lse_shift(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """What smoothing took out of each row's scores, in the LSE's units: scale * q . mean(k),
        float32 (B, H, Sq). Added to the LSE the kernel computes from the smoothed K."""
        return torch.einsum("bshd,bhd->bhs", q.float(), self.k_mean) * scale

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 q, smoothed k, v (B, S, H, D): the values the kernel computes with (v with its
        mean back in)."""
        g = self.geometry
        q = _untiled(_tiled(self.q.float(), g.block_m) * _per_tile(self.q_scale), g.seq_q)
        k = _untiled(_tiled(self.k.float(), g.block_n) * _per_tile(self.k_scale), g.seq_k)
        v = self.v_t[..., : g.seq_k].float().permute(0, 3, 1, 2) * self.v_scale[:, None] + self.v_mean[:, None]
        return q, k, v


def _tiled(t: torch.Tensor, block: int) -> torch.Tensor:
    """t (B, S, H, D) as (B, tiles, block, H, D), zero-padded to whole tiles."""
    tiles = -(-t.shape[1] // block)
    return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, tiles * block - t.shape[1])).unflatten(1, (tiles, block))


def _untiled(t: torch.Tensor, seq: int) -> torch.Tensor:
    return t.flatten(1, 2)[:, :seq]


def _per_tile(scale: torch.Tensor) -> torch.Tensor:
    """Scales (B, H, tiles) broadcast against a tiled tensor (B, tiles, block, H, D)."""
    return scale.transpose(1, 2)[:, :, None, :, None]


def _int8_per_tile(t: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (B, S, H, D) float32 -> int8 values and float32 scales (B, H, tiles), one per tile of
    ``block`` tokens of one head."""
    tiled = _tiled(t, block)
    scale = tiled.abs().amax(dim=(2, 4)).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # (B, tiles, H)
    scale = scale.transpose(1, 2).contiguous()
    values = (tiled / _per_tile(scale)).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return _untiled(values, t.shape[1]), scale


def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: TileGeometry) -> QuantizedInputs:
    """Quantize q (B, Sq, H, D) and k, v (B, Sk, H, D) for tiles of ``geometry``. On a GPU the
    PyTorch ops run compiled (``torch.compile`` fuses their passes over float32 copies into a few
    kernels), once per shape."""
    quantize = _compiled_quantize() if q.is_cuda else _quantize
    return QuantizedInputs(*quantize(q, k, v, geometry.block_m, geometry.block_n), geometry)


@functools.cache
def _compiled_quantize():
    return torch.compile(_quantize, dynamic=False)


def _quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, ...]:
    """QuantizedInputs' tensors, in its order."""
    batch, seq_k, heads, head_dim = k.shape
    k_mean = torch.mean(k, dim=1, dtype=torch.float32)  # (B, H, D)
    v_mean = torch.mean(v, dim=1, dtype=torch.float32)
    q8, q_scale = _int8_per_tile(q.float(), block_m)
    k8, k_scale = _int8_per_tile(k.float() - k_mean[:, None], block_n)
    v_smooth = v.float() - v_mean[:, None]
    v_scale = v_smooth.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX  # (B, H, D)
    v8 = (v_smooth / v_scale[:, None]).to(torch.float8_e4m3fn)
    v_t = torch.zeros(batch, heads, head_dim, -(-seq_k // V_ALIGN) * V_ALIGN, dtype=torch.float8_e4m3fn, device=v.device)
    v_t[..., :seq_k] = v8.permute(0, 2, 3, 1)
    return q8, k8, v_t, q_scale, k_scale, v_scale, k_mean, v_mean
