"""``liteattention demo``: one video sampled densely and with LiteAttention, compared.

Both runs use the demo model, the same prompt and the same starting noise, and both go through
``apply_lite_attention`` with the same tile sizes, so their attention calls run the same operator
on the same backend (Triton on CUDA, the PyTorch reference tile loop elsewhere). The dense run
has threshold -inf: it marks, hence skips, nothing. Attention time is the time spent inside those
attention calls (CUDA events on the GPU, ``time.perf_counter`` on the CPU).

    liteattention demo                        # bundled model, defaults below
    liteattention demo --threshold=-8 --warmup-steps 2 --out my-demo
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .experiment import DemoConfig, backend_name, prepare_model, write_json
from .integrations import apply_lite_attention
from .models import DemoVideoModel
from .state import pack_bits

DIFF_GAIN = 4.0  # the difference panel shows DIFF_GAIN * |LiteAttention - dense|
GIF_SCALE = 8  # nearest-neighbour upscaling of the 32 x 32 frames
GIF_FRAME_MS = 250
MASK_LAYERS = 4  # the mask figure shows up to this many layers (evenly spread) ...
MASK_HEADS = 2  # ... and their heads that skip most by the end
MASK_COLUMNS = 20  # ... at up to this many steps (evenly spread, last one included)
# The handle numbers CFG branches by call order; generate_video calls the conditional branch first.
COND, UNCOND = 0, 1
BRANCHES = {COND: "cond", UNCOND: "uncond"}
DENSE_BASELINE = "apply_lite_attention with threshold -inf (same operator and backend, nothing skipped)"
# Runs of one configuration whose attention times differ by more than this make its speed-up noise.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class RunResult:
    """One sampled video and its timings."""

    frames: torch.Tensor  # (F, H, W, 3) float32 in [0, 1]
    total_seconds: float  # sampling: every transformer call and scheduler step
    attention_seconds: float  # inside the self-attention calls
    attention_calls: int

    def timings(self) -> dict[str, float | int]:
        return {
            "total_seconds": self.total_seconds,
            "attention_seconds": self.attention_seconds,
            "attention_calls": self.attention_calls,
        }

    @staticmethod
    def mean(runs: list[RunResult]) -> tuple[RunResult, float | None]:
        """The first run's video with the mean times of ``runs``, and the larger spread of their
        attention and total times ((max - min) / mean; None for one run)."""
        attention = [run.attention_seconds for run in runs]
        total = [run.total_seconds for run in runs]
        spread = max((max(t) - min(t)) / np.mean(t) for t in (attention, total)) if len(runs) > 1 else None
        mean = RunResult(runs[0].frames, float(np.mean(total)), float(np.mean(attention)), runs[0].attention_calls)
        return mean, None if spread is None else float(spread)


@dataclass(frozen=True)
class DemoResult:
    """Everything ``liteattention demo`` reports."""

    config: DemoConfig
    device: str
    dtype: str
    backend: str
    dense: RunResult
    lite: RunResult
    sparsity: dict[int, dict[int, list[float]]]  # LiteAttention run: {branch: {layer: [per step]}}
    masks: list[dict[int, torch.Tensor]]  # conditional branch, after each step: {layer: (B, H, Qt, Kt)}
    psnr: float  # LiteAttention video vs dense video, dB
    ssim: float
    state_bytes: dict[int, int]  # per layer and CFG branch
    timing_spread: float | None  # the larger spread of the two configurations' runs; None for one round

    @property
    def timing_is_noise(self) -> bool:
        return self.timing_spread is not None and self.timing_spread > NOISY_SPREAD

    def mean_sparsity(self, branch: int) -> list[float]:
        """Skipped-tile fraction per step, averaged over layers."""
        return np.mean(list(self.sparsity[branch].values()), axis=0).tolist()

    @property
    def timing_method(self) -> str:
        return "CUDA events" if self.device.startswith("cuda") else "time.perf_counter"

    @property
    def state_bytes_total(self) -> int:
        return sum(self.state_bytes.values()) * len(self.sparsity)


class AttentionTimer:
    """An attention-call wrapper (see ``LiteAttentionHandle.intercept``) summing the time spent inside the calls.

    CUDA events on the GPU, so no call waits for the GPU; ``time.perf_counter`` on the CPU, where
    the calls are synchronous.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self.calls = 0

    def __call__(self, run: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        start_time = time.perf_counter()
        out = run(*args, **kwargs)
        self._seconds += time.perf_counter() - start_time
        return out

    @property
    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
            self._events.clear()
        return self._seconds


def _sample(
    model: DemoVideoModel, config: DemoConfig, threshold: Any, progress: bool, quant: str | None = None,
) -> tuple[RunResult, dict[int, dict[int, list[float]]], list[dict[int, torch.Tensor]]]:
    """Sample the configured video with LiteAttention at ``threshold`` (per step, or a calibration
    Profile) on every self-attention layer, in the ``quant`` path; also return its sparsity stats
    and its conditional masks after each step."""
    if isinstance(threshold, list):
        handle = apply_lite_attention(model.transformer, threshold, block_m=config.block_m, block_n=config.block_n, quant=quant)
    else:
        handle = apply_lite_attention(model.transformer, profile=threshold, quant=quant)
    timer = AttentionTimer(config.torch_device)
    masks: list[dict[int, torch.Tensor]] = []

    def keep_masks(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> None:
        # Counted in the step's time, so both runs copy their masks, the dense run its empty ones.
        masks.append({layer: mask.cpu() for layer, mask in handle.masks(COND).items()})

    try:
        with handle.intercept(timer):
            video = config.sample(model, progress=progress, step_callback=keep_masks)
        stats = handle.stats()
    finally:
        handle.remove()
    run = RunResult(video.frames, video.total_seconds, timer.seconds, timer.calls)
    return run, stats, masks


def _compile_kernels(model: DemoVideoModel, config: DemoConfig) -> None:
    """Sample briefly with both thresholds so that Triton compiles its kernel variants (marking
    or not, with or without a work list, in the LiteAttention run's path) before the timed runs,
    not during the first one."""
    short = dataclasses.replace(config, steps=2, warmup_steps=0, profile=None)
    for quant in dict.fromkeys((None, config.quant)):  # the dense run's path, then the LiteAttention run's
        for threshold in ([-math.inf], [config.threshold]):
            _sample(model, short, threshold, progress=False, quant=quant)


def _schedule_name(config: DemoConfig) -> str:
    quant = f", quant={config.quant}" if config.quant else ""
    if config.profile is not None:
        return f"profile {config.profile}{quant}: thresholds per step and layer; shown: the largest over layers"
    return f"threshold {config.threshold:g}, warm-up {config.warmup_steps} steps{quant}"


def video_psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of two videos with values in [0, 1]; inf when they are identical."""
    if torch.equal(reference, test):
        return math.inf  # skimage would divide by a zero error
    return float(peak_signal_noise_ratio(reference.numpy(), test.numpy(), data_range=1.0))


def video_ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """SSIM of two (F, H, W, 3) videos in [0, 1], averaged over frames."""
    scores = [
        structural_similarity(ref.numpy(), tst.numpy(), data_range=1.0, channel_axis=-1)
        for ref, tst in zip(reference, test, strict=True)
    ]
    return float(np.mean(scores))


def run_demo(config: DemoConfig, model: DemoVideoModel | None = None, *, progress: bool = True) -> DemoResult:
    """Sample the configured video densely, then with LiteAttention, and compare them.

    ``model``: default the demo model from ``config.weights`` (bundled weights if None).
    ``progress``: announce each run and show its progress bar.
    """
    model = prepare_model(config, model)
    if config.torch_device.type == "cuda":
        _compile_kernels(model, config)
    runs: dict[str, list[RunResult]] = {"dense": [], "lite": []}
    lite_threshold = config.load_profile() or config.schedule()
    for round in range(config.timing_rounds):
        # Alternating order, so that a machine getting busier or quieter weighs on both alike.
        for kind in ("dense", "lite") if round % 2 == 0 else ("lite", "dense"):
            if progress:
                what = f"dense run: {DENSE_BASELINE}" if kind == "dense" else f"LiteAttention run ({_schedule_name(config)})"
                print(f"[timing round {round + 1}/{config.timing_rounds}] {what}", flush=True)
            if kind == "dense":  # 16-bit whatever --quant says: the baseline both are compared with
                run, stats, step_masks = _sample(model, config, [-math.inf], progress)
            else:
                run, stats, step_masks = _sample(model, config, lite_threshold, progress, quant=config.quant)
            runs[kind].append(run)
            if kind == "lite" and round == 0:
                sparsity, masks = stats, step_masks
    (dense, dense_spread), (lite, lite_spread) = RunResult.mean(runs["dense"]), RunResult.mean(runs["lite"])
    return DemoResult(
        config=config,
        device=str(config.torch_device),
        dtype=str(config.torch_dtype).removeprefix("torch."),
        backend=backend_name(config.torch_device),
        dense=dense,
        lite=lite,
        sparsity=sparsity,
        masks=masks,
        psnr=video_psnr(dense.frames, lite.frames),
        ssim=video_ssim(dense.frames, lite.frames),
        # The state stores the mask bit-packed, exactly as pack_bits lays it out.
        state_bytes={layer: pack_bits(mask).nbytes for layer, mask in masks[-1].items()},
        timing_spread=None if dense_spread is None else max(dense_spread, lite_spread),
    )


# --------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def save_comparison_gif(dense: torch.Tensor, lite: torch.Tensor, path: Path) -> Path:
    """Animated GIF of the two (F, H, W, 3) videos and their amplified difference, side by side."""
    difference = ((lite - dense).abs() * DIFF_GAIN).clamp(0.0, 1.0)
    panels = [(_to_uint8(video), label) for video, label in (
        (dense, "dense"), (lite, "LiteAttention"), (difference, f"{DIFF_GAIN:g}x |difference|"),
    )]
    num_frames, height, width, _ = dense.shape
    panel_w, panel_h, gap, header = width * GIF_SCALE, height * GIF_SCALE, 8, 28
    font = ImageFont.load_default(size=16)
    images = []
    for index in range(num_frames):
        canvas = Image.new("RGB", (3 * panel_w + 4 * gap, panel_h + header + gap), "white")
        draw = ImageDraw.Draw(canvas)
        for column, (frames, label) in enumerate(panels):
            x = gap + column * (panel_w + gap)
            frame = Image.fromarray(frames[index]).resize((panel_w, panel_h), Image.Resampling.NEAREST)
            canvas.paste(frame, (x, header))
            draw.text((x, 5), label, fill="black", font=font)
        draw.text((canvas.width - gap, 5), f"frame {index + 1}/{num_frames}", fill="gray", font=font, anchor="ra")
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def _spread(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices evenly spread over range(count), first and last included."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _busiest_heads(mask: torch.Tensor) -> list[int]:
    """The MASK_HEADS heads of ``mask`` (B, H, Qt, Kt) with the most skipped tiles, in order."""
    counts = mask.sum((0, 2, 3))
    return sorted(counts.topk(min(MASK_HEADS, len(counts))).indices.tolist())


def plot_masks(masks: list[dict[int, torch.Tensor]], schedule: list[float], path: Path) -> Path:
    """PNG grid of skip masks (dark = skipped): a row per (layer, head), a column per step."""
    layers = sorted(masks[-1])
    layers = [layers[i] for i in _spread(len(layers), MASK_LAYERS)]
    steps = _spread(len(masks), MASK_COLUMNS)
    rows = [(layer, head) for layer in layers for head in _busiest_heads(masks[-1][layer])]
    figure = Figure(figsize=(0.75 * len(steps) + 1.0, 0.8 * len(rows) + 0.9), layout="constrained")
    axes = figure.subplots(len(rows), len(steps), squeeze=False)
    for r, (layer, head) in enumerate(rows):
        for c, step in enumerate(steps):
            ax = axes[r, c]
            # Batch element 0; white = computed, black = skipped from the next step on.
            ax.imshow((~masks[step][layer][0, head]).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{step}\n{schedule[step]:g}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"L{layer} H{head}", fontsize=8)
    figure.suptitle(
        "Skip masks after each step (columns: step, threshold), q-tiles down, k-tiles across; "
        "black = skipped from the next step on",
        fontsize=9,
    )
    figure.savefig(path, dpi=110)
    return path


def plot_sparsity(result: DemoResult, path: Path) -> Path:
    """PNG of the skipped-tile fraction per step: a line per layer (conditional branch) + means."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for layer, values in result.sparsity[COND].items():
        ax.plot(np.multiply(values, 100), lw=1, alpha=0.6, label=f"layer {layer}")
    ax.plot(np.multiply(result.mean_sparsity(COND), 100), "k-", lw=2.5, label="mean (cond)")
    ax.plot(np.multiply(result.mean_sparsity(UNCOND), 100), "k--", lw=1.5, label="mean (uncond)")
    warmup = result.config.warmup_steps if result.config.profile is None else 0
    if warmup:
        ax.axvspan(-0.5, warmup - 0.5, color="gray", alpha=0.15, label="warm-up (threshold -inf)")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("tiles skipped (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"LiteAttention sparsity, {_schedule_name(result.config)}", fontsize=8 if result.config.profile else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    figure.savefig(path, dpi=110)
    return path


def summary(result: DemoResult) -> dict[str, Any]:
    """The figures the demo prints, as a JSON-ready dict."""
    config = result.config
    return {
        "config": {**vars(config), "schedule": config.schedule()},
        "device": result.device,
        "dtype": result.dtype,
        "backend": result.backend,
        "dense_baseline": DENSE_BASELINE,
        "timing_method": result.timing_method,
        "dense": result.dense.timings(),
        "lite": result.lite.timings(),
        "attention_speedup": result.dense.attention_seconds / result.lite.attention_seconds,
        "total_speedup": result.dense.total_seconds / result.lite.total_seconds,
        "timing_rounds": result.config.timing_rounds,
        "timing_spread": result.timing_spread,
        "timing_is_noise": result.timing_is_noise,
        "psnr_db": result.psnr,
        "ssim": result.ssim,
        "sparsity_mean_per_step": {name: result.mean_sparsity(b) for b, name in BRANCHES.items()},
        "sparsity_mean_over_steps": {name: float(np.mean(result.mean_sparsity(b))) for b, name in BRANCHES.items()},
        "sparsity_per_layer_per_step": {name: result.sparsity[b] for b, name in BRANCHES.items()},
        "state_bytes_per_layer_per_branch": result.state_bytes,
        "state_bytes_total": result.state_bytes_total,
    }


def write_outputs(result: DemoResult, out: Path) -> dict[str, Path]:
    """Write the GIF, the two plots and summary.json into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "comparison": save_comparison_gif(result.dense.frames, result.lite.frames, out / "comparison.gif"),
        "masks": plot_masks(result.masks, result.config.schedule(), out / "masks.png"),
        "sparsity": plot_sparsity(result, out / "sparsity.png"),
    }
    files["summary"] = write_json({**summary(result), "files": files}, out / "summary.json")
    return files


# --------------------------------------------------------------------------------------------------
# Printed report
# --------------------------------------------------------------------------------------------------


def _seconds_row(name: str, dense: float, lite: float) -> str:
    return f"  {name:<24}{dense:>8.2f} s{lite:>14.2f} s{dense / lite:>9.2f}x"


def _bytes(count: int) -> str:
    return f"{count} B" if count < 1024 else f"{count / 1024:.1f} KiB"


def _timing_note(result: DemoResult) -> str:
    rounds = result.config.timing_rounds
    if result.timing_spread is None:
        return "  (one timing round: how noisy these times are was not measured)"
    note = (
        f"  means of {rounds} rounds in alternating order; runs of one configuration differ by up to "
        f"{result.timing_spread:.0%}"
    )
    if result.timing_is_noise:
        note += ": too noisy for these speed-ups to mean much (a busy machine?)"
    return note


def format_report(result: DemoResult, files: dict[str, Path]) -> str:
    """The demo's printed report."""
    config = result.config
    cond, uncond = result.mean_sparsity(COND), result.mean_sparsity(UNCOND)
    lines = [
        "",
        f"LiteAttention demo: {config.prompt!r}",
        f"  {config.steps} steps, guidance {config.guidance_scale:g}, seed {config.seed}, "
        f"{result.device} {result.dtype}, backend {result.backend}, tiles {config.block_m}x{config.block_n}",
        f"  threshold {config.threshold:g} (log2) after {config.warmup_steps} warm-up steps at -inf"
        + (f", quant={config.quant} (the dense run is 16-bit)" if config.quant else "")
        if config.profile is None else f"  {_schedule_name(config)}",
        "",
        "Tiles skipped per step (mean over layers)",
        f"  {'step':>4}  {'threshold':>9}  {'cond':>7}  {'uncond':>7}",
        *(
            f"  {step:>4}  {threshold:>9g}  {100 * cond[step]:6.1f}%  {100 * uncond[step]:6.1f}%"
            for step, threshold in enumerate(config.schedule())
        ),
        f"  {'all':>4}  {'':>9}  {100 * np.mean(cond):6.1f}%  {100 * np.mean(uncond):6.1f}%",
        "",
        f"Time ({result.timing_method}; the dense run is the same operator with threshold -inf)",
        f"  {'':<24}{'dense':>10}{'LiteAttention':>16}{'speed-up':>10}",
        _seconds_row(f"attention ({result.lite.attention_calls} calls)", result.dense.attention_seconds,
                     result.lite.attention_seconds),
        _seconds_row("total sampling", result.dense.total_seconds, result.lite.total_seconds),
        _timing_note(result),
    ]
    per_layer = ", ".join(f"L{layer} {_bytes(count)}" for layer, count in result.state_bytes.items())
    lines += [
        "",
        "LiteAttention video vs dense video",
        f"  PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}",
        "",
        "State memory (bit-packed skip mask) per layer and CFG branch",
        f"  {per_layer}; {_bytes(result.state_bytes_total)} in all ({len(result.sparsity)} branches)",
        "",
        "Files",
        *(f"  {name:<11}{path}" for name, path in files.items()),
    ]
    return "\n".join(lines)


def main(config: DemoConfig) -> DemoResult:
    """Run the demo, write its files and print its report."""
    result = run_demo(config)
    print(format_report(result, write_outputs(result, config.out)))
    return result
