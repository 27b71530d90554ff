"""The bundled demo model: a tiny text-to-video Wan transformer trained on procedural videos."""

from .demo_model import (
    DemoModelConfig,
    DemoVideoModel,
    build_demo_model,
    load_demo_model,
    save_demo_model,
)
from .sampling import GeneratedVideo, generate_video, save_video_grid
from .video_data import DEMO_PROMPTS

__all__ = [
    "DEMO_PROMPTS",
    "DemoModelConfig",
    "DemoVideoModel",
    "GeneratedVideo",
    "build_demo_model",
    "generate_video",
    "load_demo_model",
    "save_demo_model",
    "save_video_grid",
]
