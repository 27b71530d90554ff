"""Shared plumbing of the ``demo`` and ``coherence`` commands: their options, device and dtype
choice, model loading, and JSON output. Light to import (no diffusers): the command line builds
its options from the configs here."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .attention import TRITON_DTYPES, resolve_backend
from .models.video_data import DEMO_PROMPTS, tokenize
from .quantize import check_quant
from .schedule import check_int, check_threshold
from .state import check_block_sizes

if TYPE_CHECKING:
    from .models import DemoVideoModel, GeneratedVideo

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Placement:
    """The torch device and dtype of a config's ``device`` and ``dtype`` options."""

    device: str
    dtype: str

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device)


@dataclass(frozen=True)
class RunConfig(Placement):
    """Options shared by the commands that sample one video from the demo model."""

    prompt: str = DEMO_PROMPTS[0]
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on CUDA, float32 elsewhere) or a key of DTYPES
    block_m: int = 64
    block_n: int = 64
    weights: Path | None = None  # folder with demo_model.safetensors + config.json; None: bundled
    out: Path = Path("liteattention-out")
    # Intra-op CPU threads; None: 1 on the CPU, where the tiny model's many small ops only slow
    # down with more (by 8x with the other core busy), and torch's default with CUDA.
    threads: int | None = None

    def __post_init__(self) -> None:
        tokenize([self.prompt])  # raises a ValueError naming the prompt's unknown words
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed, 0)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale: expected a float >= 1.0, got {self.guidance_scale!r}")
        check_block_sizes(self.block_m, self.block_n)
        resolve_dtype(self.dtype, resolve_device(self.device))

    def sample(self, model: DemoVideoModel, *, progress: bool, **kwargs: Any) -> GeneratedVideo:
        """The video these options describe (prompt, steps, guidance, seed); ``kwargs`` go to
        ``generate_video``."""
        from .models import generate_video

        return generate_video(
            model, self.prompt, num_steps=self.steps, guidance_scale=self.guidance_scale,
            seed=self.seed, progress=progress, **kwargs,
        )


# The demo's defaults, in one place: re-tune them whenever the bundled weights change. On the
# bundled model (CPU, float32) they skip 19% of the tiles over the run (27% at the last step) at a
# PSNR of 45 dB; -8 / 2 steps gave 15% at 48 dB, -6 / 2 steps 23% at 38 dB, -4 / 4 steps 27% at 34 dB.
DEFAULT_THRESHOLD = -6.0  # log2 units below the running row max
DEFAULT_WARMUP_STEPS = 4  # first steps run with threshold -inf: they shape the whole video
DEFAULT_STEPS = 20  # the demo model's sampling schedule
DEFAULT_BLOCK = 64  # 2048 video tokens -> a 32 x 32 tile grid per head


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """Options of ``liteattention demo``."""

    steps: int = DEFAULT_STEPS
    block_m: int = DEFAULT_BLOCK
    block_n: int = DEFAULT_BLOCK
    threshold: float = DEFAULT_THRESHOLD
    warmup_steps: int | None = None  # None: DEFAULT_WARMUP_STEPS, at most a fifth of the steps
    out: Path = Path("liteattention-demo")
    # Timing rounds: each samples both videos, in alternating order (dense first, then LiteAttention
    # first), so that both see the same machine; times are means over the rounds.
    timing_rounds: int = 2
    profile: Path | None = None  # a calibrated profile file: replaces threshold and warmup_steps
    quant: str | None = None  # the LiteAttention run's path (liteattention.quantize); the dense run is 16-bit

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold(self.threshold)
        check_quant(self.quant)
        if self.warmup_steps is None:
            # Scaled down for short runs (--steps 2 would otherwise be all warm-up, and refused).
            # The dataclass is frozen: the resolved value is set once, here.
            default = min(DEFAULT_WARMUP_STEPS, self.steps * DEFAULT_WARMUP_STEPS // DEFAULT_STEPS)
            object.__setattr__(self, "warmup_steps", default)
        check_int("warmup_steps", self.warmup_steps, 0, self.steps)
        check_int("timing_rounds", self.timing_rounds, 1)
        if self.profile is not None:  # a ProfileError (ValueError) says what is wrong or differs
            self.load_profile().check(steps=self.steps, block_m=self.block_m, block_n=self.block_n)

    def load_profile(self):
        """The calibration Profile read from ``profile`` (None without one)."""
        if self.profile is None:
            return None
        from .calibration.profile import load_profile

        return load_profile(self.profile)

    def schedule(self) -> list[float]:
        """LiteAttention's threshold at each step: -inf during the warm-up, then ``threshold``.
        With a profile: the largest threshold over the layers of the conditional branch."""
        if self.profile is not None:
            return [max(row) for row in self.load_profile().thresholds[0]]
        return [-math.inf] * self.warmup_steps + [self.threshold] * (self.steps - self.warmup_steps)


# The thresholds liteattention coherence follows by default.
DEFAULT_THRESHOLDS = (-6.0, -8.0, -10.0, -14.0)


@dataclass(frozen=True)
class CoherenceConfig(RunConfig):
    """Options of ``liteattention coherence``."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    out: Path = Path("liteattention-coherence")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.thresholds:
            raise ValueError("thresholds: expected at least one finite threshold (log2 units, e.g. -10)")
        for threshold in self.thresholds:
            # -inf marks nothing: there would be no tile to follow.
            if check_threshold(threshold, "thresholds") == -math.inf:
                raise ValueError("thresholds: expected finite values (log2 units, e.g. -10), got -inf")
        if len(set(self.thresholds)) != len(self.thresholds):
            raise ValueError(f"thresholds: expected distinct values, got {list(self.thresholds)}")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else the CPU; otherwise 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (the Triton kernel's input type), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype: the Triton kernel (used on CUDA) takes float16 or bfloat16, got {name}")
    return dtype


def backend_name(device: torch.device) -> str:
    """The LiteAttention backend that runs on ``device`` (what backend='auto' picks)."""
    return resolve_backend("auto", torch.empty(0, device=device))


def prepare_model(config: RunConfig, model: DemoVideoModel | None) -> DemoVideoModel:
    """``model`` (or the demo model from ``config.weights``, default bundled) on the configured
    device and dtype, in eval mode; sets the configured CPU thread count."""
    if config.threads is not None or config.torch_device.type == "cpu":
        torch.set_num_threads(config.threads or 1)
    if model is None:
        from .models import load_demo_model

        return load_demo_model(config.torch_device, config.torch_dtype, folder=config.weights)
    return model.place(config.torch_device, config.torch_dtype).eval()


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as the strings 'inf', '-inf', 'nan' (JSON has none) and
    paths as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    return path
