"""Text-to-video sampling with the demo model, structured like diffusers' Wan pipeline.

Each step calls the Wan transformer twice, conditional then unconditional, inside
`cache_context("cond")` / `cache_context("uncond")`, with the timestep expanded to the batch
exactly as `WanPipeline` does; hooks written for the Wan pipeline therefore see the same calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .demo_model import NUM_TRAIN_TIMESTEPS, DemoVideoModel

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GeneratedVideo:
    """A sampled video and how long each denoising step took."""

    frames: torch.Tensor  # (F, H, W, 3) float32 in [0, 1], on the CPU
    step_seconds: list[float]  # wall time of each step (both transformer calls + scheduler)

    @property
    def total_seconds(self) -> float:
        """Wall time of the whole sampling loop."""
        return sum(self.step_seconds)


def make_scheduler(flow_shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler matching training (timestep = 1000 * sigma)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=flow_shift
    )


def _synchronize(device: torch.device) -> None:
    # Step timings are only meaningful once queued GPU work has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_video(
    model: DemoVideoModel,
    prompt: str,
    *,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    step_callback: StepCallback | None = None,
) -> GeneratedVideo:
    """Sample one video for `prompt` with classifier-free guidance.

    The starting noise is drawn on the CPU from `seed`, so it is the same on every device.
    `device` / `dtype` (default: the model's) move and cast the model in place (`place`).
    `step_callback(step_index, timestep, latents)` runs after each scheduler step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: expected a positive integer, got {num_steps}")
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale: expected >= 1.0, got {guidance_scale}")
    model.place(device, dtype)
    device, dtype = model.device, model.dtype
    transformer = model.transformer

    # Same prompt validation and encoding for both branches; "" is the unconditional prompt.
    prompt_embeds, negative_prompt_embeds = model.encode_prompts([prompt, ""]).split(1)

    scheduler = make_scheduler(model.config.flow_shift)
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)  # as WanPipeline: avoids a device->host sync per step
    noise_generator = torch.Generator().manual_seed(seed)
    # Latents stay float32 between steps (the pipeline lets them follow the model's dtype).
    latents = torch.randn((1, *model.config.video_shape), generator=noise_generator).to(device)

    step_seconds = []
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress)):
        _synchronize(device)
        start = time.perf_counter()
        latent_model_input = latents.to(dtype)
        timestep = t.expand(latents.shape[0])
        predictions = []
        for branch, embeds in (("cond", prompt_embeds), ("uncond", negative_prompt_embeds)):
            with transformer.cache_context(branch):
                predictions.append(
                    transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=embeds,
                        return_dict=False,
                    )[0].float()
                )
        noise_pred, noise_uncond = predictions
        noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if step_callback is not None:
            step_callback(i, t, latents)
        _synchronize(device)
        step_seconds.append(time.perf_counter() - start)

    frames = ((latents[0].float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 3, 0).cpu()
    return GeneratedVideo(frames=frames, step_seconds=step_seconds)


def save_video_grid(
    videos: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path
) -> Path:
    """Save videos ((F, H, W, 3) in [0, 1]) as a PNG grid: a row of frames per video."""
    if len(videos) != len(labels) or not videos:
        raise ValueError(
            "videos, labels: expected the same non-zero length, "
            f"got {len(videos)} and {len(labels)}"
        )
    num_frames = videos[0].shape[0]
    figure = Figure(figsize=(1.0 * num_frames, 1.25 * len(videos)))
    rows = figure.subfigures(len(videos), 1, squeeze=False)[:, 0]
    for row, video, label in zip(rows, videos, labels, strict=True):
        # A title per row rather than per axis, so that long prompts do not squeeze the frames.
        row.suptitle(label, x=0.01, ha="left", fontsize=9)
        row.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, wspace=0.05)
        for frame, ax in zip(video, row.subplots(1, num_frames, squeeze=False)[0], strict=True):
            ax.imshow(frame.numpy(), interpolation="nearest")
            ax.set_axis_off()
    figure.savefig(path, dpi=100)
    return Path(path)
