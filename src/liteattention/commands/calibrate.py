"""``liteattention calibrate``: a threshold profile for the bundled demo model, from a budget.

Runs ``liteattention.calibrate`` on the demo model (its sampler, batched over the calibration
prompts and seeds), writes the profile (.json or .toml), a step x layer heatmap of the chosen
thresholds per CFG branch and the sparsity per step, and prints what the profile reached.

    liteattention calibrate --psnr 35                     # as sparse as PSNR >= 35 dB allows
    liteattention calibrate --max-error 0.05 --metric rel_l2 --out my-profile
    liteattention demo --profile liteattention-calibrate/profile.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

# Light to import (the command line builds its options from CalibrateConfig): matplotlib and
# diffusers load with the functions that need them.
from ..experiment import DEFAULT_BLOCK, DEFAULT_STEPS, Placement, check_int, resolve_device, resolve_dtype
from ..models.video_data import DEMO_PROMPTS, tokenize
from ..state import check_block_sizes

# Calibration prompts and seeds by default; the evidence (docs/calibration.md) holds the other
# DEMO_PROMPTS and other seeds out.
DEFAULT_PROMPTS = DEMO_PROMPTS[:2]
DEFAULT_SEEDS = (0,)
BRANCH_NAMES = ("cond", "uncond")


@dataclass(frozen=True)
class CalibrateConfig(Placement):
    """Options of ``liteattention calibrate``."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 5.0
    metric: str = "rel_l2"
    max_error: float | None = None
    psnr: float | None = None
    sparsity: float | None = None
    max_trials: int = 6
    device: str = "auto"
    dtype: str = "auto"
    block_m: int = DEFAULT_BLOCK
    block_n: int = DEFAULT_BLOCK
    weights: Path | None = None
    out: Path = Path("liteattention-calibrate")
    format: str = "json"
    progress: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        from ..calibration import Budget

        if not self.prompts:
            raise ValueError("prompts: expected at least one prompt")
        tokenize(list(self.prompts))  # names unknown words
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        for seed in self.seeds:
            check_int("seeds", seed, 0)
        check_int("steps", self.steps, 1)
        check_int("max_trials", self.max_trials, 1)
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale: expected a float >= 1.0, got {self.guidance_scale!r}")
        if self.max_error is None and self.psnr is None and self.sparsity is None:
            raise ValueError("budget: set --max-error, --psnr or --sparsity (any or all)")
        Budget(self.metric, self.max_error, self.psnr, self.sparsity)  # validates each
        check_block_sizes(self.block_m, self.block_n)
        if self.format not in ("json", "toml"):
            raise ValueError(f"format: expected 'json' or 'toml', got {self.format!r}")
        resolve_dtype(self.dtype, resolve_device(self.device))


@torch.no_grad()
def generate_videos(model: Any, prompts: Sequence[str], seeds: Sequence[int], *, num_steps: int,
                    guidance_scale: float = 5.0, progress: bool = False) -> torch.Tensor:
    """The demo model's sampler (``models.sampling.generate_video``) for a batch: video i from
    ``prompts[i]`` and the noise of ``seeds[i]`` (the same noise as ``generate_video``). Returns
    (N, F, H, W, 3) float32 in [0, 1] on the CPU."""
    from ..models.sampling import make_scheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"prompts, seeds: expected the same length, got {len(prompts)} and {len(seeds)}")
    device, dtype = model.device, model.dtype
    transformer = model.transformer
    embeds = model.encode_prompts([*prompts, *[""] * len(prompts)])
    prompt_embeds, negative_embeds = embeds[: len(prompts)], embeds[len(prompts):]
    scheduler = make_scheduler(model.config.flow_shift)
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    latents = torch.cat([
        torch.randn((1, *model.config.video_shape), generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ]).to(device)
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        latent_input = latents.to(dtype)
        timestep = t.expand(latents.shape[0])
        predictions = []
        for branch, context in (("cond", prompt_embeds), ("uncond", negative_embeds)):
            with transformer.cache_context(branch):
                predictions.append(transformer(hidden_states=latent_input, timestep=timestep,
                                               encoder_hidden_states=context, return_dict=False)[0].float())
        cond, uncond = predictions
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
    return ((latents.float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 4, 1).cpu()


def demo_generator(model: Any, steps: int, guidance_scale: float = 5.0, progress: bool = False):
    """``generate(prompts, seeds)`` for ``calibrate`` on the demo model."""
    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        return generate_videos(model, prompts, seeds, num_steps=steps, guidance_scale=guidance_scale, progress=progress)

    return generate


def run_calibration(config: CalibrateConfig, model: Any = None):
    """Calibrate the demo model (default: bundled weights) for ``config``; returns the profile."""
    from ..calibration import calibrate

    if model is None:
        from ..models import load_demo_model

        model = load_demo_model(config.torch_device, config.torch_dtype, folder=config.weights)
    else:
        model = model.place(config.torch_device, config.torch_dtype).eval()
    return calibrate(
        prompts=config.prompts, seeds=config.seeds, metric=config.metric, max_error=config.max_error,
        min_psnr=config.psnr, target_sparsity=config.sparsity,
        generate=demo_generator(model, config.steps, config.guidance_scale, progress=config.progress),
        transformer=model.transformer, block_m=config.block_m, block_n=config.block_n,
        max_trials=config.max_trials, progress=config.progress,
    )


# --------------------------------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------------------------------


def plot_thresholds(profile: Any, path: Path) -> Path:
    """PNG heatmap of the thresholds, step x layer, one panel per CFG branch (grey = -inf)."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = np.array(profile.thresholds, dtype=float)  # (branches, steps, layers)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (-20.0, 0.0)
    if low == high:
        low, high = low - 1.0, high + 1.0
    figure = Figure(figsize=(2.2 + 1.6 * profile.branches * max(1, profile.layers / 4), 0.22 * profile.steps + 1.6),
                    layout="constrained")
    axes = figure.subplots(1, profile.branches, squeeze=False)[0]
    for branch, ax in enumerate(axes):
        shown = np.ma.masked_invalid(values[branch])
        image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=Normalize(low, high), interpolation="nearest")
        ax.set_facecolor("0.8")
        ax.set_title(BRANCH_NAMES[branch] if branch < len(BRANCH_NAMES) else f"branch {branch}", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if branch == 0:
            ax.set_ylabel("denoising step (grey: -inf, marks nothing)")
    figure.colorbar(image, ax=list(axes), label="threshold (log2)")
    figure.suptitle("Calibrated thresholds (a step's marks are skipped from the next step on)", fontsize=9)
    figure.savefig(path, dpi=110)
    return path


def plot_sparsity(profile: Any, path: Path) -> Path:
    """PNG of the fraction of tiles skipped per step on the calibration videos."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.8), layout="constrained")
    ax = figure.subplots()
    per_step = profile.calibration["sparsity_per_step"]
    ax.plot(np.multiply(per_step, 100), "k-o", ms=3, label="mean over layers and branches")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("tiles skipped (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"Calibrated profile: {100 * profile.calibration['mean_sparsity']:.1f}% of tiles skipped on average")
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def write_outputs(profile: Any, config: CalibrateConfig) -> dict[str, Path]:
    config.out.mkdir(parents=True, exist_ok=True)
    return {
        "profile": profile.save(config.out / f"profile.{config.format}"),
        "thresholds": plot_thresholds(profile, config.out / "thresholds.png"),
        "sparsity": plot_sparsity(profile, config.out / "sparsity.png"),
    }


def format_report(profile: Any, files: dict[str, Path]) -> str:
    cal = profile.calibration
    psnr = ", ".join(f"{p:.2f}" for p in cal["psnr_db"])
    ssim = ", ".join(f"{s:.4f}" for s in cal["ssim"])
    met = ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in cal["met"].items())
    lines = [
        "",
        f"Calibrated profile: {profile.summary()}",
        f"  on {len(cal['prompts'])} videos ({', '.join(f'{p!r} seed {s}' for p, s in zip(cal['prompts'], cal['seeds']))})",
        f"  per-call {cal['metric']} bound {cal['per_call_bound']:.4g}; worst call {cal['max_call_error']:.4g}; "
        f"{cal['violations']} calls over the bound (their mask had grown too large)",
        f"  mean sparsity {100 * cal['mean_sparsity']:.1f}%; PSNR vs dense {psnr} dB; SSIM {ssim}",
        f"  budget: {met}",
        f"  cost: {cal['dense_generations']} dense + {cal['trajectory_generations']} trajectory generations, "
        f"{cal['seconds']:.0f} s",
        "",
        "Thresholds per step (branch cond; layers left to right)",
        *(f"  {step:>4}  " + " ".join(f"{t:>6g}" for t in row) + f"   {100 * sp:5.1f}% skipped"
          for step, (row, sp) in enumerate(zip(profile.thresholds[0], cal["sparsity_per_step"]))),
        "",
        "Files",
        *(f"  {name:<11}{path}" for name, path in files.items()),
    ]
    return "\n".join(lines)


def main(config: CalibrateConfig):
    start = time.perf_counter()
    profile = run_calibration(config)
    files = write_outputs(profile, config)
    print(format_report(profile, files))
    if config.progress:
        print(f"\n({time.perf_counter() - start:.0f} s)")
    return profile
