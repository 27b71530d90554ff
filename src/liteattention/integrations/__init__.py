"""Integrations of LiteAttention into model libraries."""

try:
    import diffusers  # noqa: F401
except ModuleNotFoundError as error:  # the operator alone was installed
    raise ModuleNotFoundError(
        "liteattention.integrations needs diffusers: pip install 'liteattention[diffusers]'", name=error.name
    ) from error

from .diffusers import LiteAttentionHandle, LiteAttentionProcessor, apply_lite_attention

__all__ = ["LiteAttentionHandle", "LiteAttentionProcessor", "apply_lite_attention"]
