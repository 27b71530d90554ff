"""Wan2.1 text-to-video transformer architectures and latent sizes, for benchmarks with random weights.

The one place the full-size architectures are written down (``liteattention bench --model`` and
``bench/compile_step.py`` build from it). Light to import: diffusers loads in :func:`build_wan`.

Shapes are those of 81-frame videos: the VAE compresses time 4x (81 frames -> 21 latent frames) and
space 8x; the transformer's (1, 2, 2) patches then give one token per 2 x 2 latent pixels of a
latent frame. Text is umT5's 512 tokens of 4096 channels.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel


@dataclass(frozen=True)
class WanArchitecture:
    """A ``WanTransformer3DModel`` configuration and the prompt length it is run with."""

    name: str
    config: Mapping[str, Any]  # WanTransformer3DModel keyword arguments
    text_tokens: int

    @property
    def layers(self) -> int:
        return self.config["num_layers"]

    @property
    def heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def head_dim(self) -> int:
        return self.config["attention_head_dim"]


@dataclass(frozen=True)
class LatentSize:
    """Latent frames, height and width of one video (what the transformer receives)."""

    name: str
    frames: int
    height: int
    width: int


def _wan21(layers: int, heads: int, ffn_dim: int) -> dict[str, Any]:
    return dict(
        num_layers=layers, num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn_dim, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )


WAN_MODELS = {
    a.name: a
    for a in (
        WanArchitecture("wan2.1-1.3b", _wan21(layers=30, heads=12, ffn_dim=8960), text_tokens=512),
        WanArchitecture("wan2.1-14b", _wan21(layers=40, heads=40, ffn_dim=13824), text_tokens=512),
        # For tests on the CPU: the same code paths at a size the reference backend runs in seconds.
        WanArchitecture(
            "tiny",
            dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, in_channels=4,
                 out_channels=4, text_dim=32, freq_dim=32, patch_size=(1, 2, 2)),
            text_tokens=16,
        ),
    )
}

LATENT_SIZES = {
    s.name: s
    for s in (
        LatentSize("480p", 21, 60, 104),  # 832 x 480: 32,760 tokens
        LatentSize("720p", 21, 90, 160),  # 1280 x 720: 75,600 tokens
        LatentSize("tiny", 2, 32, 64),  # 1,024 tokens: enough tiles for sparsity to mean something
    )
}


def _lookup(table: Mapping[str, Any], name: str, option: str) -> Any:
    if name not in table:
        raise ValueError(f"{option}: expected one of {', '.join(table)}, got {name!r}")
    return table[name]


def wan_architecture(name: str) -> WanArchitecture:
    """The architecture called ``name`` (a key of WAN_MODELS); a ValueError naming ``model`` otherwise."""
    return _lookup(WAN_MODELS, name, "model")


def latent_size(name: str) -> LatentSize:
    """The latent size called ``name`` (a key of LATENT_SIZES); a ValueError naming ``resolution`` otherwise."""
    return _lookup(LATENT_SIZES, name, "resolution")


def latent_shape(architecture: WanArchitecture, size: LatentSize) -> tuple[int, int, int, int, int]:
    """(B, C, F, H, W) of the latents, batch 1."""
    return (1, architecture.config["in_channels"], size.frames, size.height, size.width)


def video_tokens(architecture: WanArchitecture, size: LatentSize) -> int:
    """Length of the self-attention sequence: one token per patch of the latents."""
    p_t, p_h, p_w = architecture.config["patch_size"]
    return (size.frames // p_t) * (size.height // p_h) * (size.width // p_w)


def build_wan(architecture: WanArchitecture, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> WanTransformer3DModel:
    """The transformer with random weights, in eval mode, built directly on ``device`` (a 14B model
    never passes through host memory) and cast to ``dtype`` as ``from_pretrained(torch_dtype=dtype)``
    casts it: the modules diffusers keeps in float32 (time embedding, norms, RoPE) stay there."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**architecture.config).eval()
    keep = set(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(dtype)  # one tensor at a time: the peak is the float32 model
    return model


def wan_inputs(
    architecture: WanArchitecture, size: LatentSize, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random latents and text embeddings of the right shapes: the transformer's ``hidden_states``
    and ``encoder_hidden_states`` (the timestep is the caller's)."""
    generator = torch.Generator(device).manual_seed(seed)
    text_shape = (1, architecture.text_tokens, architecture.config["text_dim"])
    return {
        "hidden_states": torch.randn(latent_shape(architecture, size), generator=generator, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(text_shape, generator=generator, device=device, dtype=dtype),
    }
