"""Procedural captioned videos for the demo model, and the tokenizer of their prompts.

Each video shows one textured sprite (a few shapes, colours and textures) moving over a
moving, darker background; its prompt names every choice, e.g.
"red striped circle bouncing horizontally over blue stripes". Rendering is vectorised in
torch on the device of the generator, so a training batch costs a few kernels on a GPU.
Videos are pixels in [-1, 1], laid out (B, C=3, F, H, W) as diffusers' Wan transformer expects.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# RGB in [0, 1]. Backgrounds reuse these colours, darkened, so the sprite stays readable.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.20, 0.80, 0.25),
    "blue": (0.20, 0.40, 1.00),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.65, 0.30, 0.90),
    "white": (0.95, 0.95, 0.95),
}
# The empty texture is a plain sprite: it adds no word to the prompt.
TEXTURES: tuple[str, ...] = ("", "striped", "checkered")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
MOTIONS: tuple[str, ...] = (
    "bouncing horizontally",
    "bouncing vertically",
    "moving diagonally",
    "rotating",
    "circling",
)
BACKGROUNDS: tuple[str, ...] = ("stripes", "tiles", "gradient")

# Prompt template: colour [texture] shape motion "over" background-colour background.
_SLOTS: tuple[tuple[str, ...], ...] = (
    tuple(COLOURS),
    TEXTURES,
    SHAPES,
    MOTIONS,
    ("over",),
    tuple(COLOURS),
    BACKGROUNDS,
)

PAD_TOKEN = "<pad>"
PAD_ID = 0
VOCABULARY: tuple[str, ...] = (
    PAD_TOKEN,
    *dict.fromkeys(word for slot in _SLOTS for phrase in slot for word in phrase.split()),
)
_WORD_TO_ID = {word: index for index, word in enumerate(VOCABULARY)}
MAX_PROMPT_TOKENS = sum(max(len(phrase.split()) for phrase in slot) for slot in _SLOTS)

# Prompts shown in the training report and used by the demos; all follow the template.
DEMO_PROMPTS: tuple[str, ...] = (
    "red circle bouncing horizontally over blue stripes",
    "yellow checkered square rotating over purple gradient",
    "white striped triangle moving diagonally over green tiles",
    "blue cross circling over red stripes",
)


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (len(prompts), MAX_PROMPT_TOKENS), right-padded with PAD_ID.

    Words are separated by whitespace and matched case-insensitively; the empty prompt is
    all padding, which the model reads as "unconditional".
    """
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a sequence of strings, got a single string")
    ids = torch.full((len(prompts), MAX_PROMPT_TOKENS), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > MAX_PROMPT_TOKENS:
            raise ValueError(
                f"prompt {prompt!r}: expected at most {MAX_PROMPT_TOKENS} words, got {len(words)}"
            )
        unknown = [word for word in words if word not in _WORD_TO_ID or word == PAD_TOKEN]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r}: unknown words {unknown}; expected words from "
                f"{list(VOCABULARY[1:])}"
            )
        ids[row, : len(words)] = torch.tensor([_WORD_TO_ID[word] for word in words])
    return ids


def detokenize(token_ids: torch.Tensor) -> list[str]:
    """Prompts of a (B, L) tensor of token ids, padding dropped (inverse of `tokenize`)."""
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids: expected shape (batch, length), got {tuple(token_ids.shape)}")
    return [" ".join(VOCABULARY[i] for i in row if i != PAD_ID) for row in token_ids.tolist()]


@dataclass(frozen=True)
class VideoBatch:
    """Videos (B, 3, F, H, W) in [-1, 1] and their prompts' token ids (B, MAX_PROMPT_TOKENS)."""

    videos: torch.Tensor
    token_ids: torch.Tensor

    @property
    def prompts(self) -> list[str]:
        """The prompts as text."""
        return detokenize(self.token_ids)


@functools.cache
def _phrase_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per slot, a (num_options, max_words) tensor of token ids padded with PAD_ID, on `device`.

    Cached so that a training loop does not copy them to the GPU at every batch.
    """
    tables = []
    for slot in _SLOTS:
        width = max(len(phrase.split()) for phrase in slot)
        table = torch.full((len(slot), width), PAD_ID, dtype=torch.long)
        for row, phrase in enumerate(slot):
            words = phrase.split()
            table[row, : len(words)] = torch.tensor([_WORD_TO_ID[word] for word in words])
        tables.append(table.to(device))
    return tuple(tables)


@functools.cache
def _palette(device: torch.device) -> torch.Tensor:
    """(len(COLOURS), 3) RGB table on `device` (cached, as `_phrase_tables`)."""
    return torch.tensor(list(COLOURS.values()), device=device)


def _prompt_token_ids(choices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token ids of the prompts of per-slot option indices, built on their device.

    Concatenates each slot's padded phrase, then moves the padding to the end with a stable
    sort, so no per-sample Python (and no GPU->CPU sync) is needed.
    """
    tables = _phrase_tables(choices[0].device)
    ids = torch.cat([table[choice] for table, choice in zip(tables, choices, strict=True)], dim=1)
    order = torch.sort((ids == PAD_ID).to(torch.uint8), dim=1, stable=True).indices
    return ids.gather(1, order)


def _uniform(
    low: float, high: float, size: int, generator: torch.Generator, *, signed: bool = False
) -> torch.Tensor:
    """`size` values uniform in [low, high); with `signed`, each negated with probability 1/2."""
    values = low + (high - low) * torch.rand(size, generator=generator, device=generator.device)
    if signed:
        sign = torch.randint(0, 2, (size,), generator=generator, device=generator.device)
        values = values * (sign * 2.0 - 1.0)
    return values


def _triangle_wave(phase: torch.Tensor) -> torch.Tensor:
    """Period-1 wave in [-1, 1] that moves at constant speed and reflects: a bounce."""
    return 4.0 * (phase - torch.floor(phase + 0.5)).abs() - 1.0


def _soft_square(wave: torch.Tensor) -> torch.Tensor:
    """Map a sine wave to a [0, 1] square wave with softened edges (less aliasing at 32 px)."""
    return 0.5 + 0.5 * (3.0 * wave).clamp(-1.0, 1.0)


def _select(choice: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """candidates (K, B, ...) -> (B, ...): sample b takes candidates[choice[b], b]."""
    return candidates[choice, torch.arange(choice.shape[0], device=choice.device)]


def _shape_distance(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance, in sprite radii, to each sample's shape (negative inside).

    u, v: sprite-local coordinates (B, F, H, W) with the sprite's radius as unit; v points down.
    """
    au, av = u.abs(), v.abs()
    square = torch.maximum(au, av) - 1.0
    circle = torch.sqrt(u * u + v * v) - 1.0
    # Upward equilateral triangle in a circle of radius 1.25 (larger than the other shapes so
    # that its area is comparable): base at v = 0.625, apex at v = -1.25. The slanted edges'
    # function sqrt(3)|u| - v has gradient norm 2, hence the halving.
    triangle = torch.maximum(v - 0.625, (math.sqrt(3.0) * au - v - 1.25) / 2.0)
    arm = 0.35  # half-width of the cross's bars
    cross = torch.minimum(torch.maximum(au - 1.0, av - arm), torch.maximum(au - arm, av - 1.0))
    return _select(shape, torch.stack((square, circle, triangle, cross)))  # rows follow SHAPES


def _sprite_trajectory(
    motion: torch.Tensor, radius: torch.Tensor, num_frames: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre x, y (normalised coordinates) and rotation angle, each (B, F), per motion."""
    batch = motion.shape[0]
    frames = torch.arange(num_frames, device=motion.device, dtype=torch.float32)

    def per_sample(low: float, high: float, signed: bool = False) -> torch.Tensor:
        return _uniform(low, high, batch, generator, signed=signed)[:, None]

    # Largest centre offset that keeps the whole sprite (up to 1.25 radii) inside the frame.
    reach = (1.0 - 1.25 * radius)[:, None]
    # Bounces: 0.08-0.15 cycles per frame, i.e. 2-4 px per frame on a 32 px frame.
    bounce = reach * _triangle_wave(per_sample(0.0, 1.0) + per_sample(0.08, 0.15, True) * frames)
    still_x = per_sample(-0.7, 0.7) * reach + torch.zeros_like(bounce)
    still_y = per_sample(-0.7, 0.7) * reach + torch.zeros_like(bounce)
    diagonal = per_sample(1.0, 1.0, True)  # down-right or up-right
    spin = per_sample(0.0, 2.0 * math.pi) + per_sample(0.2, 0.4, True) * frames
    orbit = per_sample(0.0, 2.0 * math.pi) + per_sample(0.35, 0.6, True) * frames
    upright = torch.zeros_like(bounce)

    # Rows follow MOTIONS; every candidate is computed and each sample's own motion picked,
    # which is cheaper on a GPU than branching per sample.
    x = (bounce, still_x, bounce, 0.5 * still_x, 0.8 * reach * orbit.cos())
    y = (still_y, bounce, diagonal * bounce, 0.5 * still_y, 0.8 * reach * orbit.sin())
    angle = (upright, upright, upright, spin, upright)
    return tuple(_select(motion, torch.stack(candidates)) for candidates in (x, y, angle))


def _background(
    pattern: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    num_frames: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Moving background intensity in [0, 1], (B, F, H, W), for each sample's pattern.

    xs (1, 1, 1, W) and ys (1, 1, H, 1) are the pixel centres in normalised coordinates.
    """
    batch = pattern.shape[0]
    frames = torch.arange(num_frames, device=xs.device, dtype=torch.float32).view(1, -1, 1, 1)

    def per_sample(low: float, high: float, signed: bool = False) -> torch.Tensor:
        return _uniform(low, high, batch, generator, signed=signed).view(-1, 1, 1, 1)

    # Stripes: horizontal or vertical, period 8 px, scrolling 0.5-1.6 px per frame.
    across = torch.where(per_sample(-1.0, 1.0) > 0, xs, ys)
    scroll = per_sample(0.03, 0.1, True) * frames
    stripes = _soft_square(torch.sin(2.0 * math.pi * (across - scroll) / 0.5))
    # Tiles: a checkerboard of 12 px tiles drifting diagonally.
    drift = per_sample(0.03, 0.08) * frames
    tiles = _soft_square(
        torch.sin(math.pi * (xs - drift) / 0.75) * torch.sin(math.pi * (ys - drift) / 0.75)
    )
    # Gradient: a smooth wave two frames wide, in any direction, sliding along it.
    direction = per_sample(0.0, 2.0 * math.pi)
    along = xs * direction.cos() + ys * direction.sin()
    phase = per_sample(0.0, 2.0 * math.pi) - per_sample(0.15, 0.3) * frames
    gradient = 0.5 + 0.5 * torch.sin(math.pi * along / 2.0 + phase)
    return _select(pattern, torch.stack((stripes, tiles, gradient)))  # rows follow BACKGROUNDS


def sample_video_batch(
    batch_size: int,
    *,
    generator: torch.Generator,
    num_frames: int = 8,
    height: int = 32,
    width: int = 32,
) -> VideoBatch:
    """Render `batch_size` random captioned videos on the generator's device.

    Deterministic given the generator's state; videos are (B, 3, F, H, W) in [-1, 1].
    """
    sizes = {"batch_size": batch_size, "num_frames": num_frames, "height": height, "width": width}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    device = generator.device

    def choose(options: int) -> torch.Tensor:
        return torch.randint(0, options, (batch_size,), generator=generator, device=device)

    colour, texture, shape = choose(len(COLOURS)), choose(len(TEXTURES)), choose(len(SHAPES))
    motion, background = choose(len(MOTIONS)), choose(len(BACKGROUNDS))
    # A background colour other than the sprite's, so that the sprite never blends in.
    background_colour = (colour + 1 + choose(len(COLOURS) - 1)) % len(COLOURS)

    # Pixel centres in normalised coordinates [-1, 1]; y grows downwards as in images.
    ys = ((torch.arange(height, device=device) + 0.5) / height * 2.0 - 1.0).view(1, 1, -1, 1)
    xs = ((torch.arange(width, device=device) + 0.5) / width * 2.0 - 1.0).view(1, 1, 1, -1)

    radius = _uniform(0.28, 0.4, batch_size, generator)  # 4.5-6.4 px on a 32 px frame
    centre_x, centre_y, angle = _sprite_trajectory(motion, radius, num_frames, generator)
    dx, dy = xs - centre_x[..., None, None], ys - centre_y[..., None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    r = radius.view(-1, 1, 1, 1)
    u, v = (cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r
    # Signed distance in pixels -> coverage, with a one-pixel anti-aliased edge.
    pixels_per_radius = r * min(height, width) / 2.0
    coverage = (0.5 - _shape_distance(shape, u, v) * pixels_per_radius).clamp(0.0, 1.0)

    # Textures live in sprite coordinates, so they turn with a rotating sprite.
    stripes = _soft_square(torch.sin(2.0 * math.pi * u))
    checks = _soft_square(torch.sin(2.0 * math.pi * u) * torch.sin(2.0 * math.pi * v))
    pattern = _select(texture, torch.stack((torch.ones_like(u), stripes, checks)))
    sprite_level = 0.35 + 0.65 * pattern
    background_level = 0.15 + 0.4 * _background(background, xs, ys, num_frames, generator)

    palette = _palette(device)
    sprite = palette[colour].view(-1, 3, 1, 1, 1) * sprite_level.unsqueeze(1)
    scene = palette[background_colour].view(-1, 3, 1, 1, 1) * background_level.unsqueeze(1)
    coverage = coverage.unsqueeze(1)
    videos = (coverage * sprite + (1.0 - coverage) * scene) * 2.0 - 1.0

    over = torch.zeros_like(motion)  # the single option of the "over" slot
    choices = (colour, texture, shape, motion, over, background_colour, background)
    return VideoBatch(videos=videos, token_ids=_prompt_token_ids(choices))
