"""Synthetic q, k, v with the structure of a video transformer's self-attention, at any size.

Random Gaussian inputs make every score about equal: attention is nearly uniform, every key
matters a little, and quantization errors average out in ways real attention's do not. Video DiT
attention is peaked and local instead (a token attends mostly to its neighbours in space and time),
and its keys and values carry a large offset per channel (what SageAttention smooths away). These
inputs have both: tokens on a (frames, height, width) grid, q and k share random Fourier features of
the position (so q . k falls off with distance), plus content noise, a channel offset on k and v,
and a few heads that attend almost uniformly.
"""

from __future__ import annotations

import math

import torch


def video_qkv(
    batch: int,
    grid: tuple[int, int, int],
    heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    locality: float = 12.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, F*H*W, heads, head_dim) for tokens on a ``grid`` of (frames, height, width).

    ``locality`` sets how peaked attention is: the positional part of a score spans up to
    ``locality`` nats from near to far tokens in the last head, less in the others (head 0 is
    nearly uniform).
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    axes = [torch.arange(n, dtype=torch.float32, device=device) / n for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (S, 3) in [0, 1)
    seq = pos.shape[0]
    half = head_dim // 2
    # Random Fourier features: cos(w . (p_i - p_j)) = cos(w.p_i)cos(w.p_j) + sin(w.p_i)sin(w.p_j).
    freqs = torch.randn(heads, 3, half, generator=g, device=device) * torch.tensor([4.0, 12.0, 12.0], device=device)[:, None]
    phase = torch.einsum("sc,hcf->shf", pos, freqs)  # (S, heads, half)
    features = torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(half)  # (S, heads, D), |.| = 1
    # q . k / sqrt(D) gets locality_h * cos-similarity of the features.
    amplitude = (torch.linspace(0.0, locality, heads, device=device).view(1, heads, 1) * math.sqrt(head_dim)).sqrt()
    shape = (batch, seq, heads, head_dim)

    def noise(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=g, device=device)

    q = (features * amplitude + 0.5 * noise(*shape)).to(dtype)
    k = (features * amplitude + 0.5 * noise(*shape) + 3.0 * noise(1, 1, heads, head_dim)).to(dtype)  # keys' channel offset
    v = (noise(*shape) + 2.0 * noise(1, 1, heads, head_dim)).to(dtype)
    return q, k, v
