"""Shared by the tests of the demo and coherence commands: a tiny, sharpened random demo model."""

from __future__ import annotations

import torch

from liteattention.models import DemoModelConfig, DemoVideoModel, build_demo_model

# 2 layers, 2 heads, 2 x 8 x 8 = 128 video tokens: 8 x 8 tiles of 16 x 16.
TINY = DemoModelConfig(
    num_layers=2,
    num_heads=2,
    head_dim=32,
    ffn_dim=64,
    text_dim=32,
    num_frames=2,
    height=16,
    width=16,
)
BLOCK = 16
STEPS = 3
SHARPEN = 6.0  # scales q and k: a random model's attention is too flat for any tile to be negligible


def sharp_tiny_model() -> DemoVideoModel:
    """A random tiny demo model whose attention is peaked enough for some tiles to be negligible."""
    torch.manual_seed(0)
    model = build_demo_model(TINY).eval()
    with torch.no_grad():
        for block in model.transformer.blocks:
            # Wan normalises q and k (RMSNorm), so their scale is the norms' weights.
            block.attn1.norm_q.weight.mul_(SHARPEN)
            block.attn1.norm_k.weight.mul_(SHARPEN)
    return model
