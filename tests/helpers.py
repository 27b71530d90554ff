"""Shared test utilities: the float64 oracle and structured inputs with decision margins."""

from __future__ import annotations

import math

import torch


def softmax_attention(q, k, v, scale=None, key_mask=None):
    """Exact attention in float64. key_mask: bool (B, H, Sq, Sk), True = key attended."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask.to(s.device), -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vh
    return out.transpose(1, 2), lse


def expand_tile_mask(computed, block_m, block_n, seq_q, seq_k):
    """Tile-level bool (B, H, Qt, Kt) to element-level (B, H, Sq, Sk)."""
    return computed.repeat_interleave(block_m, 2)[:, :, :seq_q].repeat_interleave(block_n, 3)[..., :seq_k]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def tiled_inputs(batch, seq, heads, dim, block_n, dtype, device, negligible, gap=40.0, seed=0, seq_q=None):
    """q, k, v whose k-tiles carry a per-(b, h, k-tile) bias on the scores.

    Every query has a 1 in its first channel; keys of a tile in `negligible` (bool (B, H, Kt))
    get -gap / scale there, so their scores sit `gap` nats below the others, far from any
    threshold in [-20, -2]. The remaining channels are small noise, so the decisions of all other
    tiles have a margin of several log2 units too.
    """
    g = torch.Generator().manual_seed(seed)
    scale = dim**-0.5
    q = 0.3 * torch.randn(batch, seq if seq_q is None else seq_q, heads, dim, generator=g)
    k = 0.3 * torch.randn(batch, seq, heads, dim, generator=g)
    v = torch.randn(batch, seq, heads, dim, generator=g)
    q[..., 0] = 1.0
    bias = torch.where(negligible, -gap / scale, 0.0)  # (B, H, Kt)
    k[..., 0] = bias.repeat_interleave(block_n, -1)[..., :seq].transpose(1, 2)
    return (t.to(dtype=dtype, device=device) for t in (q, k, v))
