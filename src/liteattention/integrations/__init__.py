"""Integrations of LiteAttention into model libraries."""

from .diffusers import LiteAttentionHandle, LiteAttentionProcessor, apply_lite_attention

__all__ = ["LiteAttentionHandle", "LiteAttentionProcessor", "apply_lite_attention"]
