"""The bundled demo model: a tiny diffusers `WanTransformer3DModel` and a learned prompt encoder.

The transformer is diffusers' own Wan class, so everything that hooks into Wan (attention
processors, the LiteAttention integration) sees exactly what it would see in a real Wan model,
only with 8 x 16 x 16 = 2048 video tokens of a 3-channel 32 x 32 pixel video instead of VAE
latents. Prompts are encoded by a small transformer over the demo vocabulary (no T5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn

from .video_data import MAX_PROMPT_TOKENS, VOCABULARY, tokenize

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "demo_model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_COMMAND = (
    "PYTHONPATH=src python -m liteattention.models.train --minutes 8 --out DIR --device cuda"
)
# Flow-matching time scale shared by training and the scheduler: timestep = 1000 * sigma.
NUM_TRAIN_TIMESTEPS = 1000
# Stored weights dtype: half the size of float32, and more mantissa than bfloat16.
_STORAGE_DTYPE = torch.float16
_PATCH_SIZE = (1, 2, 2)
_PROMPT_HEADS = 4


@dataclass(frozen=True)
class DemoModelConfig:
    """Architecture of the demo model and the video size it was trained on."""

    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    text_dim: int = 128
    prompt_layers: int = 1
    num_frames: int = 8
    height: int = 32
    width: int = 32
    # Sampling schedule shift (FlowMatchEulerDiscreteScheduler's `shift`); 1 = uniform sigmas.
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.head_dim not in (32, 64, 128):
            raise ValueError(f"head_dim: expected 32, 64 or 128, got {self.head_dim}")
        positive = (
            "num_layers",
            "num_heads",
            "ffn_dim",
            "text_dim",
            "num_frames",
            "height",
            "width",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.text_dim % _PROMPT_HEADS:
            raise ValueError(
                f"text_dim: expected a multiple of {_PROMPT_HEADS}, got {self.text_dim}"
            )
        if self.prompt_layers < 0:
            raise ValueError(f"prompt_layers: expected >= 0, got {self.prompt_layers}")
        for name in ("height", "width"):
            if getattr(self, name) % _PATCH_SIZE[1]:
                raise ValueError(
                    f"{name}: expected a multiple of the patch size {_PATCH_SIZE[1]}, "
                    f"got {getattr(self, name)}"
                )
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift: expected > 0, got {self.flow_shift}")

    @property
    def num_video_tokens(self) -> int:
        """Sequence length of the transformer's self-attention."""
        t, h, w = _PATCH_SIZE
        return (self.num_frames // t) * (self.height // h) * (self.width // w)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one video."""
        return (3, self.num_frames, self.height, self.width)


class DemoVideoModel(nn.Module):
    """Prompt encoder + diffusers Wan transformer, predicting the flow-matching velocity."""

    def __init__(self, config: DemoModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(len(VOCABULARY), config.text_dim)
        self.position_embedding = nn.Embedding(MAX_PROMPT_TOKENS, config.text_dim)
        # Wan's cross-attention looks at each text token alone, so a word needs context to say
        # whose it is: the colour after "over" is the background's, not the sprite's.
        self.prompt_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                config.text_dim,
                nhead=_PROMPT_HEADS,
                dim_feedforward=4 * config.text_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            ),
            num_layers=config.prompt_layers,
            norm=nn.LayerNorm(config.text_dim),
            enable_nested_tensor=False,
        )
        self.transformer = WanTransformer3DModel(
            patch_size=_PATCH_SIZE,
            num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=config.text_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.num_layers,
        )
        # Filled by `load_demo_model` from config.json (training steps, loss, device, ...).
        self.training_metadata: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (some Wan modules stay float32, see `place`)."""
        return self.token_embedding.weight.dtype

    def encode_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, MAX_PROMPT_TOKENS) token ids -> Wan `encoder_hidden_states` (B, L, text_dim).

        Padding is embedded like any token (no mask), so the empty prompt gives a learned
        "unconditional" context, used for classifier-free guidance.
        """
        if token_ids.ndim != 2 or token_ids.shape[1] != MAX_PROMPT_TOKENS:
            raise ValueError(
                f"token_ids: expected shape (batch, {MAX_PROMPT_TOKENS}), "
                f"got {tuple(token_ids.shape)}"
            )
        positions = torch.arange(MAX_PROMPT_TOKENS, device=token_ids.device)
        return self.prompt_encoder(
            self.token_embedding(token_ids) + self.position_embedding(positions)
        )

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> Wan `encoder_hidden_states` (B, L, text_dim) on the model's device."""
        return self.encode_tokens(tokenize(prompts).to(self.device))

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """Velocity (noise - clean video) for noisy videos (B, 3, F, H, W) at `timestep` (B,)."""
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=self.encode_tokens(token_ids),
            return_dict=False,
        )[0]

    def place(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DemoVideoModel:
        """Move to `device` and cast to `dtype` in place, and return self.

        Unlike `nn.Module.to`, keeps the Wan modules that diffusers keeps in float32 when
        loading a low-precision Wan (rotary tables, time embedder, norms, modulation tables).
        """
        self.to(device=device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype: expected a floating point dtype, got {dtype}")
            keep = set(self.transformer._keep_in_fp32_modules or ())
            for name, tensor in chain(self.named_parameters(), self.named_buffers()):
                kept = name.startswith("transformer.") and not keep.isdisjoint(name.split("."))
                tensor.data = tensor.data.to(torch.float32 if kept else dtype)
        return self


def build_demo_model(config: DemoModelConfig | None = None) -> DemoVideoModel:
    """A randomly initialised demo model (float32, CPU); default config if none is given."""
    return DemoVideoModel(config or DemoModelConfig())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(parameter.numel() for parameter in model.parameters())


def save_demo_model(
    model: DemoVideoModel, folder: str | Path, extra_metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write `demo_model.safetensors` (float16) and `config.json` into `folder`; return it.

    `extra_metadata` must be JSON-serialisable; it is stored in config.json under "metadata".
    """
    folder = Path(folder)
    state = {
        name: tensor.detach().to("cpu", _STORAGE_DTYPE).contiguous()
        for name, tensor in model.state_dict().items()
    }
    overflowed = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if overflowed:
        raise ValueError(f"model: weights not finite in {_STORAGE_DTYPE} storage: {overflowed}")
    config = {
        "model": asdict(model.config),
        "weights_dtype": str(_STORAGE_DTYPE).removeprefix("torch."),
        "metadata": dict(extra_metadata or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_demo_model(
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    folder: str | Path | None = None,
) -> DemoVideoModel:
    """Load the trained demo model (bundled weights unless `folder` is given), in eval mode."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    weights_path, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    missing = [str(path) for path in (weights_path, config_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Demo model files not found: {', '.join(missing)}. Train the model with "
            f"`{TRAIN_COMMAND}` and copy {WEIGHTS_FILE} and {CONFIG_FILE} from DIR into {folder}."
        )
    saved = json.loads(config_path.read_text())
    model = build_demo_model(DemoModelConfig(**saved["model"]))
    model.load_state_dict(load_file(weights_path))
    model.training_metadata = saved.get("metadata", {})
    return model.place(device, dtype).eval()
