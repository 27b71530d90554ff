"""LiteAttention: evolutionary tile skipping for the self-attention of video diffusion transformers."""

from .attention import LiteAttention, lite_attention
from .schedule import ThresholdSchedule
from .state import CallStats, SkipState, TileGeometry

__all__ = ["CallStats", "LiteAttention", "SkipState", "ThresholdSchedule", "TileGeometry", "lite_attention"]
__version__ = "0.1.0"
