"""LiteAttention: evolutionary tile skipping for the self-attention of video diffusion transformers."""

from .attention import LiteAttention, lite_attention
from .quantize import Quant
from .schedule import ThresholdSchedule
from .state import CallStats, SkipState, TileGeometry

__all__ = [
    "CallStats", "LiteAttention", "Profile", "Quant", "SkipState", "ThresholdSchedule", "TileGeometry", "calibrate",
    "lite_attention", "load_profile",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Calibration needs diffusers (it runs pipelines): imported on first use, not with the operator.
    if name in ("calibrate", "Profile", "load_profile"):
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
