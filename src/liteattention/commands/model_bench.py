"""``liteattention bench --model``: one denoising step of a full-size Wan2.1 transformer, per configuration.

The diffusers ``WanTransformer3DModel`` is built with random weights (no download) at the real latent
and text shapes, and one transformer forward (one denoising step of one CFG branch) is timed in each
configuration of :func:`step_configs`: diffusers' own attention (torch SDPA, cuDNN or flash on a GPU),
LiteAttention in dense mode (threshold -inf: nothing marked, nothing skipped), LiteAttention with a skip
mask injected into every self-attention layer at each requested sparsity (each in every mode of
``LITE_MODES`` asked for: the 16-bit path and the 8-bit one), and the step with its
self-attention replaced by a free op (each call returns its values: the output's shape, no work),
which is the rest of the step, so that ``1 - rest / step`` is the self-attention share of a step.

Random weights have no attention structure for marking to find, so the sparse configurations get
their sparsity injected (random tile masks, or a band around the diagonal), with threshold -inf so
the masks stay as injected; the output reports the fraction of tiles the masks mark and the fraction
the kernel skipped (a q-tile's first visited tile is always computed, so slightly fewer).

Applying LiteAttention rebinds diffusers' attention dispatch in the Wan module to a pass-through
(see ``integrations/diffusers.py``), so the diffusers configuration makes one more Python call per
attention call than an untouched model: microseconds against a step's seconds.

Every configuration runs on its own copy of the transformer's module tree that shares every weight
(no extra memory), with its own LiteAttention handle and masks for the whole run; so the timed
steps can be interleaved: each round runs one step of every configuration, in a fresh random order,
and the times are medians over the rounds (a GPU under sustained load slows its clock, which would
otherwise favour whatever runs first).

    liteattention bench --model wan2.1-14b --resolution 720p --out results/model
    liteattention bench --model tiny --resolution tiny --device cpu --rounds 1 --out /tmp/model-bench
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..bench import PATTERNS, make_mask
from ..experiment import Placement, check_int, resolve_device, resolve_dtype, write_json
from ..models.wan import LatentSize, WanArchitecture, latent_shape, latent_size, video_tokens, wan_architecture
from ..schedule import is_real
from ..state import TileGeometry, default_block_sizes

if TYPE_CHECKING:
    from ..integrations import LiteAttentionHandle

DEFAULT_SPARSITIES = (0.42, 0.5, 0.75)
PROJECTED_STEPS = 50  # a 50-step generation with classifier-free guidance: two forwards per step
FORWARDS_PER_STEP = 2
SEED = 0
TIMESTEP = 999.0  # the first step's; the time a forward takes does not depend on it
NOTE = (
    "Random weights: their attention has no structure for marking to find, so the sparse configurations' "
    "sparsity is injected (a tile mask per self-attention layer, threshold -inf), not reached by LiteAttention. "
    "So those steps do not mark, and the 50-step projection has no dense warm-up steps: a real generation pays both."
)


@dataclass(frozen=True)
class StepConfig:
    """One way of running the transformer's step: a row of the benchmark.

    ``lite`` is None for diffusers' own attention; otherwise LiteAttention is applied with threshold
    -inf and these extra ``apply_lite_attention`` keyword arguments.
    """

    name: str
    lite: Mapping[str, Any] | None = None
    sparsity: float | None = None  # fraction of tiles to mark skipped in every self-attention mask
    pattern: str = "random"  # of the injected masks (see liteattention.bench.make_mask)
    self_attention: bool = True  # False: each self-attention call returns its values (the rest of the step)

    @property
    def description(self) -> str:
        if not self.self_attention:
            return "self-attention replaced by a free op: the rest of the step"
        if self.lite is None:
            return "diffusers' default attention (torch SDPA)"
        extra = "".join(f", {key}={value!r}" for key, value in self.lite.items())
        if self.sparsity is None:
            return f"LiteAttention dense (threshold -inf{extra})"
        return f"LiteAttention, {self.pattern} mask injected at {self.sparsity:g}{extra}"


DIFFUSERS = StepConfig("diffusers")
LITE_DENSE = StepConfig("lite-dense", lite={})
# The step without its self-attention, which the self-attention shares are read from.
REST = StepConfig("no-self-attention", lite={}, self_attention=False)
# Timed in every run, before the sparse configurations (from the sparsities and patterns) and REST.
BASE_CONFIGS = (DIFFUSERS, LITE_DENSE)
# LiteAttention's modes, by name prefix: apply_lite_attention options. Each gets a dense
# configuration (after the first, which is LITE_DENSE) and one per (pattern, sparsity).
LITE_MODES: dict[str, dict[str, Any]] = {"lite": {}, "lite-8bit": {"quant": "qk_int8_pv_fp8"}}


def step_configs(sparsities: Sequence[float], patterns: Sequence[str], modes: Sequence[str] = ("lite",)) -> list[StepConfig]:
    """The configurations a run times: BASE_CONFIGS, the other modes' dense ones, one per
    (mode, pattern, sparsity), then REST."""
    configs = list(BASE_CONFIGS)
    configs += [StepConfig(f"{mode}-dense", lite=LITE_MODES[mode]) for mode in modes if mode != "lite"]
    configs += [
        StepConfig(f"{mode}-{pattern}-{sparsity:g}", lite=LITE_MODES[mode], sparsity=sparsity, pattern=pattern)
        for mode in modes
        for pattern in patterns
        for sparsity in sparsities
    ]
    return [*configs, REST]


@dataclass(frozen=True)
class ModelBenchConfig(Placement):
    """Options of ``liteattention bench --model``."""

    model: str = "wan2.1-1.3b"
    resolution: str = "480p"
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    patterns: tuple[str, ...] = ("random",)
    modes: tuple[str, ...] = tuple(LITE_MODES)  # LiteAttention's modes (LITE_MODES) to time
    warmup_steps: int = 1
    rounds: int = 3
    device: str = "auto"
    dtype: str = "auto"
    out: Path = Path("bench-results")
    progress: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        wan_architecture(self.model)
        latent_size(self.resolution)
        for name in ("sparsities", "patterns", "modes"):  # the command line gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for sparsity in self.sparsities:
            if not is_real(sparsity) or not 0.0 <= sparsity < 1.0:
                raise ValueError(f"sparsities: each must be a fraction of tiles in [0, 1), got {sparsity!r}")
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ValueError(f"sparsities: expected distinct values, got {list(self.sparsities)}")
        if not self.patterns or any(p not in PATTERNS for p in self.patterns) or len(set(self.patterns)) != len(self.patterns):
            raise ValueError(f"patterns: expected distinct names from {', '.join(PATTERNS)}, got {list(self.patterns)}")
        if not self.modes or self.modes[0] != "lite" or any(m not in LITE_MODES for m in self.modes):
            raise ValueError(f"modes: expected lite, then any of {', '.join(list(LITE_MODES)[1:])}, got {list(self.modes)}")
        # The first step allocates the skip masks that the sparse configurations are injected into.
        check_int("warmup_steps", self.warmup_steps, 1)
        check_int("rounds", self.rounds, 1)
        device = resolve_device(self.device)
        resolve_dtype(self.dtype, device)
        if device.type == "cpu" and self.model != "tiny":
            raise ValueError(f"device: {self.model} is benchmarked on a CUDA GPU; on the CPU use --model tiny")


@dataclass
class ConfigResult:
    """What one configuration measured. Sparsities: mean over layers (and timed steps); None without LiteAttention."""

    name: str
    description: str
    lite: dict[str, Any] | None
    target_sparsity: float | None
    mask_sparsity: float | None  # fraction of tiles the masks mark
    skipped_sparsity: float | None  # fraction of tiles the kernel skipped in the timed steps
    step_s: list[float]  # one per round
    median_step_s: float
    speedup_vs_diffusers: float = math.nan
    self_attention_share: float | None = None  # of this configuration's step
    projected_generation_s: float = math.nan  # PROJECTED_STEPS steps, FORWARDS_PER_STEP forwards each


@dataclass(frozen=True)
class Equivalence:
    """LiteAttention's dense output against torch SDPA's on the q, k, v of one real attention call."""

    layer: int
    shape: tuple[int, ...]  # q: (B, S, H, D)
    max_abs_error: float
    rel_l2: float
    cosine: float
    reference_max_abs: float  # the largest |output| of SDPA, to read max_abs_error against


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules (processors included) whose parameters and buffers are ``model``'s
    own tensors: a configuration of its own at no memory cost."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def tile_geometry(architecture: WanArchitecture, size: LatentSize, lite: Mapping[str, Any]) -> TileGeometry:
    """The tile grid of the self-attention calls (the tile sizes the integration takes for them)."""
    tokens = video_tokens(architecture, size)
    default_m, default_n = default_block_sizes(architecture.head_dim)
    return TileGeometry(tokens, tokens, lite.get("block_m") or default_m, lite.get("block_n") or default_n)


def _values_as_output(run: Callable[..., torch.Tensor], layer: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """A free stand-in for self-attention: the values have the output's shape (Sk = Sq, one head dim)."""
    return v


def attention_equivalence(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          scale: float | None) -> Equivalence:
    """Compare ``out`` (LiteAttention's output for q, k, v: (B, S, H, D)) with torch SDPA's in the same
    dtype; the differences are taken in float64, so a cosine of 1 is not a rounding artefact."""
    reference = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale).transpose(1, 2)
    ours, reference = out.double().flatten(), reference.double().flatten()
    error = ours - reference
    return Equivalence(
        layer=layer,
        shape=tuple(q.shape),
        max_abs_error=error.abs().max().item(),
        rel_l2=(error.norm() / reference.norm()).item(),
        cosine=F.cosine_similarity(ours, reference, dim=0).item(),
        reference_max_abs=reference.abs().max().item(),
    )


def _seconds(call: Callable[[], None], device: torch.device) -> float:
    """Wall time of ``call``: CUDA events on a GPU (queued work finished first), a host clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@dataclass
class _Variant:
    """A configuration's transformer (a weight-sharing copy), its LiteAttention handle and step count."""

    config: StepConfig
    transformer: torch.nn.Module
    handle: LiteAttentionHandle | None
    steps: int = 0  # calls so far: the step index of the next (one growing generation, branch 0)
    times: list[float] = field(default_factory=list)

    def step(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """One transformer forward, as a pipeline's denoising loop calls it."""
        replace = self.handle is not None and not self.config.self_attention
        with (
            torch.no_grad(),  # not inference_mode: the masks must stay writable outside it
            self.transformer.cache_context("cond", step_index=self.steps),
            self.handle.intercept(_values_as_output) if replace else contextlib.nullcontext(),
        ):
            self.transformer(**inputs, return_dict=False)
        self.steps += 1


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_model_bench(config: ModelBenchConfig) -> dict[str, Any]:
    """Time every configuration; returns the report (what ``model_bench.json`` holds)."""
    from tqdm.auto import tqdm

    from ..models.wan import build_wan, wan_inputs

    architecture, size = wan_architecture(config.model), latent_size(config.resolution)
    device, dtype = config.torch_device, config.torch_dtype
    if config.progress:
        tqdm.write(f"building {config.model} ({architecture.layers} layers, {architecture.heads} heads of "
                   f"{architecture.head_dim}) on {device} in {str(dtype).removeprefix('torch.')}, random weights")
    model = build_wan(architecture, device, dtype, seed=SEED)
    inputs = {**wan_inputs(architecture, size, device, dtype, seed=SEED), "timestep": torch.full((1,), TIMESTEP, device=device)}
    variants = _variants(model, step_configs(config.sparsities, config.patterns, config.modes))
    bar = tqdm(total=len(variants) * (config.warmup_steps + config.rounds), unit="step", disable=not config.progress)
    equivalence = None
    for variant in variants:  # warm-up: compilation, allocations; the masks exist after the first step
        bar.set_description(f"warm-up {variant.config.name}")
        for _ in range(config.warmup_steps):
            if variant.config.name == LITE_DENSE.name and equivalence is None:
                equivalence = _step_and_compare(variant, inputs)
            else:
                variant.step(inputs)
            bar.update()
        if variant.config.sparsity is not None:
            _inject(variant, architecture, size, device)
    order = random.Random(SEED)
    for round_index in range(config.rounds):
        bar.set_description(f"round {round_index + 1}/{config.rounds}")
        for variant in order.sample(variants, len(variants)):
            variant.times.append(_seconds(functools.partial(variant.step, inputs), device))
            bar.update()
    bar.close()
    results = [_result(variant, config.warmup_steps) for variant in variants]
    _compare(results)
    return {
        "meta": _meta(config, architecture, size, device, dtype),
        "configurations": [asdict(result) for result in results],
        "equivalence": None if equivalence is None else asdict(equivalence),
    }


def _variants(model: torch.nn.Module, configs: Sequence[StepConfig]) -> list[_Variant]:
    """A weight-sharing copy of ``model`` per configuration, with LiteAttention applied as it says."""
    from ..integrations import apply_lite_attention

    variants = []
    for config in configs:
        transformer = weight_sharing_copy(model)
        handle = None if config.lite is None else apply_lite_attention(transformer, -math.inf, **config.lite)
        variants.append(_Variant(config, transformer, handle))
    return variants


def _step_and_compare(variant: _Variant, inputs: Mapping[str, torch.Tensor]) -> Equivalence:
    """One step of ``variant`` (LiteAttention dense), comparing its first self-attention call with SDPA."""
    assert variant.handle is not None
    first = variant.handle.layers[0]
    captured: dict[str, Any] = {}

    def capture(run: Callable[..., torch.Tensor], layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        out = run(layer, q, k, v, **kwargs)
        if layer == first:
            captured.update(q=q, k=k, v=v, out=out, scale=kwargs.get("scale"))
        return out

    with variant.handle.intercept(capture):
        variant.step(inputs)
    return attention_equivalence(first, **captured)


def _inject(variant: _Variant, architecture: WanArchitecture, size: LatentSize, device: torch.device) -> None:
    """Give every self-attention layer of ``variant`` its own mask of the configured pattern and sparsity."""
    config, handle = variant.config, variant.handle
    assert handle is not None and config.sparsity is not None and config.lite is not None
    geometry = tile_geometry(architecture, size, config.lite)
    masks = {
        layer: make_mask(config.pattern, config.sparsity, geometry, 1, architecture.heads, device, seed=SEED + layer)
        for layer in handle.layers
    }
    handle.set_masks(masks)


def _result(variant: _Variant, warmup_steps: int) -> ConfigResult:
    config, handle = variant.config, variant.handle
    mask_sparsity = skipped = None
    if handle is not None and config.self_attention:
        masks = handle.masks()
        mask_sparsity = statistics.fmean(mask.float().mean().item() for mask in masks.values())
        timed = [s for per_step in handle.stats()[0].values() for s in per_step[warmup_steps:] if not math.isnan(s)]
        skipped = statistics.fmean(timed) if timed else None
    return ConfigResult(
        name=config.name, description=config.description, lite=None if config.lite is None else dict(config.lite),
        target_sparsity=config.sparsity, mask_sparsity=mask_sparsity, skipped_sparsity=skipped,
        step_s=variant.times, median_step_s=statistics.median(variant.times),
    )


def _compare(results: list[ConfigResult]) -> None:
    """Fill in the figures that relate configurations: speed-up, self-attention share, projection."""
    by_name = {result.name: result for result in results}
    baseline, rest = by_name[DIFFUSERS.name].median_step_s, by_name[REST.name].median_step_s
    for result in results:
        result.speedup_vs_diffusers = baseline / result.median_step_s
        if result.name != REST.name:
            result.self_attention_share = 1.0 - rest / result.median_step_s
        result.projected_generation_s = PROJECTED_STEPS * FORWARDS_PER_STEP * result.median_step_s


def _meta(config: ModelBenchConfig, architecture: WanArchitecture, size: LatentSize, device: torch.device,
          dtype: torch.dtype) -> dict[str, Any]:
    import diffusers
    import triton

    return {
        "model": config.model,
        "resolution": config.resolution,
        "latent_shape": latent_shape(architecture, size),
        "video_tokens": video_tokens(architecture, size),
        "text_tokens": architecture.text_tokens,
        "layers": architecture.layers,
        "heads": architecture.heads,
        "head_dim": architecture.head_dim,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__},
        "warmup_steps": config.warmup_steps,
        "rounds": config.rounds,
        "timing": "each round: one transformer forward per configuration, in a fresh random order; medians over the rounds "
                  + ("(CUDA events)" if device.type == "cuda" else "(host clock)"),
        "self_attention_share": f"1 - time of {REST.name!r} / time of the configuration",
        "projection": f"{PROJECTED_STEPS} steps x {FORWARDS_PER_STEP} forwards (CFG) x the median step; "
                      "text encoder and VAE not included",
        "equivalence": "first self-attention layer, first warm-up step of lite-dense: LiteAttention's output vs "
                       "torch SDPA (its default backend) on the same q, k, v",
        "note": NOTE,
    }


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a markdown table with a header saying what was run, and the equivalence check."""
    meta = report["meta"]
    lines = [
        f"{meta['model']} at {meta['resolution']}: {meta['video_tokens']:,} video tokens, {meta['text_tokens']} text "
        f"tokens; {meta['device']}, {meta['dtype']}; {meta['warmup_steps']} warm-up + {meta['rounds']} timed steps "
        "per configuration, interleaved",
        NOTE,
        "",
        "| configuration | mask sparsity | skipped | step (s) | vs diffusers | self-attention share "
        f"| {PROJECTED_STEPS} steps with CFG (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["configurations"]:
        share = "-" if row["self_attention_share"] is None else f"{row['self_attention_share']:.1%}"
        lines.append(
            f"| {row['name']} | {_fraction(row['mask_sparsity'])} | {_fraction(row['skipped_sparsity'])} "
            f"| {row['median_step_s']:.4g} | {row['speedup_vs_diffusers']:.3f} | {share} "
            f"| {row['projected_generation_s']:.4g} |"
        )
    check = report["equivalence"]
    if check is not None:
        lines += [
            "",
            f"Equivalence (layer {check['layer']}, q {tuple(check['shape'])}): LiteAttention dense vs torch SDPA: "
            f"max abs error {check['max_abs_error']:.3g} (|output| up to {check['reference_max_abs']:.3g}), "
            f"rel L2 {check['rel_l2']:.3g}, cosine {check['cosine']:.6f}",
        ]
    return "\n".join(lines)


def plot_step_times(report: Mapping[str, Any], path: Path) -> Path | None:
    """A bar per configuration (median step time, speed-up vs diffusers); None without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["configurations"]
    meta = report["meta"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    names = [row["name"] for row in rows][::-1]
    times = [row["median_step_s"] for row in rows][::-1]
    bars = ax.barh(names, times, color=["C7" if n == REST.name else "C3" if n == DIFFUSERS.name else "C0" for n in names])
    for bar, row in zip(bars, rows[::-1]):
        ax.annotate(f" {row['speedup_vs_diffusers']:.2f}x", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    va="center", fontsize=8)
    ax.set_xlabel("median time of one denoising step (s); labels: speed-up vs diffusers")
    ax.set_title(f"{meta['model']} {meta['resolution']}, {meta['device']} (random weights, injected sparsity)", fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU: the tiny model's many small ops only slow down with more."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(config: ModelBenchConfig) -> dict[str, Any]:
    """Run the benchmark; write model_bench.json, model_bench.md and model_bench.png into ``config.out``."""
    with _threads(config.torch_device):
        report = run_model_bench(config)
    config.out.mkdir(parents=True, exist_ok=True)
    table = format_table(report)
    files = [write_json(report, config.out / "model_bench.json"), config.out / "model_bench.md"]
    files[1].write_text(table + "\n")
    plot = plot_step_times(report, config.out / "model_bench.png")
    print("\n" + table)
    if report["equivalence"] is not None and report["equivalence"]["rel_l2"] > 2e-2:
        print("WARNING: LiteAttention's dense output is far from SDPA's (rel L2 > 0.02)")
    print("\nwrote " + ", ".join(str(f) for f in files) + ("" if plot is None else f", {plot}") +
          ("" if plot is not None else " (no plot: matplotlib is not installed)"))
    return report
