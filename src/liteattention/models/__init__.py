"""The bundled demo model: a tiny text-to-video Wan transformer trained on procedural videos; and, in
``models.wan`` (imported by its own name), the full-size Wan2.1 architectures the benchmarks build.

Names load on first use (PEP 562): the model and its sampler need diffusers, while the prompt
vocabulary (``video_data``) does not, so the command line can check options without it."""

import importlib
from typing import Any

_MODULE_OF = {
    "DemoModelConfig": "demo_model",
    "DemoVideoModel": "demo_model",
    "build_demo_model": "demo_model",
    "load_demo_model": "demo_model",
    "save_demo_model": "demo_model",
    "GeneratedVideo": "sampling",
    "generate_video": "sampling",
    "save_video_grid": "sampling",
    "DEMO_PROMPTS": "video_data",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
