"""Train the demo model with flow matching on procedural videos, within a wall-clock budget.

    PYTHONPATH=src python -m liteattention.models.train --minutes 8 --out DIR --device cuda

Objective (rectified flow, as FlowMatchEulerDiscreteScheduler samples it): for a clean video
x0, noise n and sigma s in (0, 1), the model sees x_s = (1 - s) x0 + s n at timestep 1000 s
and regresses the velocity n - x0. s is drawn logit-normal(0, 1) (as in SD3): most samples
land at mid noise, where the velocity is hardest to predict, and both ends are still seen.
10% of prompts are dropped (replaced by the empty prompt) to learn the unconditional branch of
classifier-free guidance. Videos are generated on the fly on the training device.

The learning rate (AdamW) warms up linearly then decays along a cosine, both over the fraction
of the time budget spent, so any device runs a complete schedule. From 20% of the budget an EMA
of the weights is kept, with a time constant of about 10% of the steps the measured throughput
predicts; the EMA is what gets saved and sampled.

Writes into --out: demo_model.safetensors, config.json, loss.json, loss.png, samples.png,
MODEL_CARD.md. Only the training loop counts towards --minutes; sampling and saving follow.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .demo_model import (
    NUM_TRAIN_TIMESTEPS,
    WEIGHTS_FILE,
    DemoModelConfig,
    DemoVideoModel,
    build_demo_model,
    count_parameters,
    save_demo_model,
)
from .sampling import generate_video, save_video_grid
from .video_data import DEMO_PROMPTS, PAD_ID, sample_video_batch

EMA_START = 0.2  # fraction of the budget after which the EMA starts (skips the fast early phase)
EMA_WINDOW = 0.1  # EMA time constant, as a fraction of the predicted number of steps
LOG_EVERY = 25  # steps between loss read-backs (each one is a device->host sync)
FINAL_LOSS_STEPS = 50  # the reported final loss is the mean over this many last steps
SAMPLE_STEPS = 20


def flow_matching_loss(
    model: DemoVideoModel,
    videos: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    prompt_dropout: float,
) -> torch.Tensor:
    """Mean squared error of the predicted velocity on one batch (see the module docstring)."""
    batch, device = videos.shape[0], videos.device
    sigmas = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    noise = torch.randn(videos.shape, generator=generator, device=device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - s) * videos + s * noise
    dropped = torch.rand(batch, generator=generator, device=device) < prompt_dropout
    token_ids = token_ids.masked_fill(dropped[:, None], PAD_ID)
    velocity = model(noisy, sigmas * NUM_TRAIN_TIMESTEPS, token_ids)
    return F.mse_loss(velocity.float(), noise - videos)


def learning_rate(progress: float, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up to `peak` over `warmup_fraction`, then cosine decay to 0 at progress 1."""
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    decay_progress = (progress - warmup_fraction) / (1.0 - warmup_fraction)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(decay_progress, 1.0)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; invalid values exit with a usage error naming the option."""
    parser = argparse.ArgumentParser(
        prog="python -m liteattention.models.train",
        description="Train the LiteAttention demo video model (flow matching, procedural data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="training time; sampling and saving follow"
    )
    parser.add_argument(
        "--out", type=Path, required=True, default=argparse.SUPPRESS, help="output folder"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument("--seed", type=int, default=0, help="model init, data and noise seed")
    parser.add_argument("--batch-size", type=int, default=128, help="videos per step")
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.05, help="share of the time spent warming up"
    )
    parser.add_argument(
        "--prompt-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)"
    )
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes: expected > 0, got {args.minutes}")
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected a positive integer, got {args.batch_size}")
    for name in ("warmup_fraction", "prompt_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            option = "--" + name.replace("_", "-")
            parser.error(f"{option}: expected a value in [0, 1), got {getattr(args, name)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {args.device!r} requested but CUDA is not available")
    return args


def _plot_loss(losses: list[float], path: Path) -> None:
    """Save the per-step loss curve (log scale) as a PNG."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    steps = torch.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 50)
    # Faint raw curve under a moving average, once there are enough steps to average.
    ax.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, label="per step")
    if window > 1:
        smooth = F.avg_pool1d(torch.tensor(losses)[None, None], window, stride=1)[0, 0]
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("Demo model training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=100)


def _model_card(config: DemoModelConfig, record: dict[str, Any]) -> str:
    """MODEL_CARD.md text from the config and the training record."""
    architecture = "\n".join(f"| {key} | {value} |" for key, value in asdict(config).items())
    return f"""# LiteAttention demo video model

A tiny text-to-video diffusion model bundled with LiteAttention so that its demos run on any
machine: diffusers' `WanTransformer3DModel` with a learned prompt encoder instead of T5;
{record["parameters"]:,} parameters ({record["transformer_parameters"]:,} in the Wan transformer).

## Data

Procedural videos, generated on the fly (`liteattention.models.video_data`): one sprite
(square, circle, triangle or cross; red, green, blue, yellow, purple or white; plain, striped
or checkered) bouncing horizontally, bouncing vertically, moving diagonally, rotating or
circling, over a darker moving background (scrolling stripes, drifting tiles or a sliding
gradient) of another colour. Prompts name every choice, e.g. "{DEMO_PROMPTS[0]}".
{config.num_frames} frames of {config.height}x{config.width} RGB pixels in [-1, 1], no VAE:
with Wan's (1, 2, 2) patches that is {config.num_video_tokens} video tokens per sample.

## Architecture

| field | value |
|---|---|
{architecture}

## Training

- Command: `{record["command"]}`
- Objective: flow matching (x_s = (1 - s) x0 + s noise, target noise - x0, timestep 1000 s,
  s ~ logit-normal(0, 1)), {record["prompt_dropout"]:.0%} prompt dropout for classifier-free
  guidance.
- Optimiser: AdamW, peak lr {record["peak_lr"]}, weight decay {record["weight_decay"]}, linear
  warm-up then cosine decay over the time budget, gradient clipping at {record["grad_clip"]};
  bf16 autocast on CUDA.
- Seed {record["seed"]}, batch size {record["batch_size"]}, {record["steps"]} steps
  ({record["samples_seen"]:,} videos), {record["train_seconds"]:.0f} s of training
  on {record["device"]}.
- Final loss (mean of the last {FINAL_LOSS_STEPS} steps): {record["final_loss"]:.4f}.
- Saved weights: {record["saved_weights"]} (float16), see `loss.png` and `samples.png`.
- Versions: torch {record["torch"]}, diffusers {record["diffusers"]}.
- Total wall time, with sampling and saving: {record["wall_seconds"]:.0f} s.

## Sampling

`liteattention.models.generate_video`: FlowMatchEulerDiscreteScheduler, {SAMPLE_STEPS} steps,
guidance scale 5, two transformer calls per step (conditional, unconditional) as in `WanPipeline`.
A {SAMPLE_STEPS}-step video took {record["sample_seconds"]:.2f} s on {record["device"]}.
"""


@dataclass(frozen=True)
class _Fit:
    """Outcome of the training loop."""

    model: DemoVideoModel  # the EMA when one was kept, else the trained model
    losses: list[float]
    learning_rates: list[float]
    seconds: float
    ema_decay: float | None


def _fit(model: DemoVideoModel, args: argparse.Namespace, device: torch.device) -> _Fit:
    """Train `model` (on `device`) until the time budget is spent."""
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=0.0, betas=(0.9, 0.99), weight_decay=args.weight_decay, fused=on_cuda
    )
    generator = torch.Generator(device).manual_seed(args.seed)
    config = model.config
    video_size = {"num_frames": config.num_frames, "height": config.height, "width": config.width}
    budget = args.minutes * 60.0
    losses: list[float] = []
    learning_rates: list[float] = []
    pending: list[torch.Tensor] = []  # losses not read back yet, to avoid a sync per step
    ema: AveragedModel | None = None
    ema_decay = None
    bar_format = "{l_bar}{bar}| {n:.0f}/{total} s {postfix}"
    bar = tqdm(total=round(budget), unit="s", desc="training", bar_format=bar_format)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < budget:
        progress = elapsed / budget
        lr = learning_rate(progress, args.lr, args.warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_video_batch(args.batch_size, generator=generator, **video_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = flow_matching_loss(
                model,
                batch.videos,
                batch.token_ids,
                generator=generator,
                prompt_dropout=args.prompt_dropout,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        pending.append(loss.detach())
        learning_rates.append(lr)
        step = len(learning_rates)

        if ema is not None:
            ema.update_parameters(model)
        elif progress >= EMA_START:
            predicted_steps = step / progress
            ema_decay = min(0.9999, max(0.9, 1.0 - 1.0 / (EMA_WINDOW * predicted_steps)))
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))

        if step % LOG_EVERY == 0:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
            bar.set_postfix_str(f"step {step} loss {losses[-1]:.4f} lr {lr:.2e}", refresh=False)
        bar.update(min(budget, time.monotonic() - start) - bar.n)
    if pending:
        losses.extend(torch.stack(pending).tolist())
    bar.update(budget - bar.n)
    bar.close()
    # The EMA exists once training ran past EMA_START; a shorter run keeps the raw weights.
    return _Fit(
        model=ema.module if ema is not None else model,
        losses=losses,
        learning_rates=learning_rates,
        seconds=time.monotonic() - start,
        ema_decay=ema_decay,
    )


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the whole training job described by `args`; return the training record."""
    wall_start = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)  # fail now rather than after training
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls outside autocast
    torch.manual_seed(args.seed)
    config = DemoModelConfig()
    fit = _fit(build_demo_model(config).to(device).train(), args, device)
    model = fit.model.eval()
    steps = len(fit.losses)
    record = {
        "command": command,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device)
        if on_cuda
        else f"CPU ({torch.get_num_threads()} threads)",
        "batch_size": args.batch_size,
        "steps": steps,
        "samples_seen": steps * args.batch_size,
        "peak_lr": args.lr,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "prompt_dropout": args.prompt_dropout,
        "saved_weights": "final (no EMA)"
        if fit.ema_decay is None
        else f"EMA (decay {fit.ema_decay:.5f})",
        "final_loss": sum(fit.losses[-FINAL_LOSS_STEPS:]) / len(fit.losses[-FINAL_LOSS_STEPS:]),
        "train_seconds": fit.seconds,
        "parameters": count_parameters(model),
        "transformer_parameters": count_parameters(model.transformer),
        "video_tokens": config.num_video_tokens,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    # Weights and losses first, so that a failure while sampling loses no training.
    save_demo_model(model, out, record)
    losses = {"loss": fit.losses, "lr": fit.learning_rates}
    (out / "loss.json").write_text(json.dumps(losses) + "\n")
    _plot_loss(fit.losses, out / "loss.png")

    videos = [
        generate_video(model, prompt, num_steps=SAMPLE_STEPS, seed=index, progress=False)
        for index, prompt in enumerate(DEMO_PROMPTS)
    ]
    save_video_grid([video.frames for video in videos], DEMO_PROMPTS, out / "samples.png")
    record["sample_seconds"] = videos[0].total_seconds
    record["wall_seconds"] = time.monotonic() - wall_start
    (out / "MODEL_CARD.md").write_text(_model_card(config, record))
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    record = train(args, shlex.join(["python", "-m", "liteattention.models.train", *argv]))
    print(
        f"trained {record['steps']} steps in {record['train_seconds']:.0f} s "
        f"on {record['device']}, final loss {record['final_loss']:.4f}; "
        f"wrote {args.out / WEIGHTS_FILE} and reports"
    )


if __name__ == "__main__":
    main()
