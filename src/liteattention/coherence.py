"""``liteattention coherence``: do negligible tiles stay negligible across denoising steps?

LiteAttention skips a tile in every step after the one that found it negligible, which is only
sound if negligibility persists from step to step. This measures it on the demo model. One video
is sampled densely; every self-attention call (each layer, both CFG branches) is answered by the
reference backend (``reference_forward``) with a plan that computes every tile and marks, once per
threshold: that gives the marking rule's verdict on every tile, with the running row maxima of a
dense visit in the kernel's order (diagonal tile first, then ascending). The operator's own rule
is reused, not re-implemented; the video is the dense one (nothing is skipped).

Reported, per threshold, pooled over layers, CFG branches, heads and start steps t:

* persistence at lag k: P(negligible at t + k | negligible at t);
* chance: the same probability if the verdicts at t + k were independent of those at t
  (the negligible fraction at t + k of that layer and branch, weighted like the persistence);
* to the end: P(negligible at every later step | negligible at t), what skipping forever assumes;
* the negligible fraction at each step.

    liteattention coherence                       # bundled model, thresholds -6,-8,-10,-14
    liteattention coherence --thresholds=-8,-12 --steps 20 --out coherence-results
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .attention import check_scale
from .experiment import CoherenceConfig, prepare_model, write_json
from .integrations import apply_lite_attention
from .integrations.diffusers import LiteAttentionHandle
from .models import DemoVideoModel
from .plan import RangesLike, build_plan, normalize_ranges
from .reference import reference_forward
from .state import TileGeometry

TABLE_LAGS = (1, 5, 10)  # lag 0 is 100% by definition


class RuleProbe:
    """Attention-call wrapper (see ``LiteAttentionHandle.intercept``): answers each call with the dense reference
    output and records, for each threshold, which tiles the marking rule finds negligible.

    The wrapped LiteAttention call (``run``) is not made: the reference computes every tile, so
    its output already is the dense answer.
    """

    def __init__(self, handle: LiteAttentionHandle, thresholds: Sequence[float], block_m: int, block_n: int) -> None:
        self._handle = handle
        self._thresholds = tuple(thresholds)
        self._blocks = (block_m, block_n)
        # (branch, layer) -> {step: bool (thresholds, B * H * Qt * Kt)}
        self.verdicts: dict[tuple[int, int], dict[int, torch.Tensor]] = {}

    def __call__(
        self, run: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        *, scale: float | None = None, must_do: RangesLike = None,
    ) -> torch.Tensor:
        batch, seq_q, heads, head_dim = q.shape
        seq_k = k.shape[1]
        geometry = TileGeometry(seq_q, seq_k, *self._blocks)
        # No skip mask: every tile is computed, so each verdict uses the dense running row max.
        plan = build_plan(geometry, batch, heads, q.device, None, normalize_ranges(must_do, seq_k, "must_do"), ())
        scale = check_scale(scale, head_dim)
        marks = []
        for threshold in self._thresholds:
            out, _, marked = reference_forward(q, k, v, plan, scale=scale, threshold=threshold, mark=True)
            marks.append(marked.flatten().cpu())
        self.verdicts.setdefault((self._handle.branch, layer), {})[self._handle.step] = torch.stack(marks)
        return out

    def negligible(self, steps: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """bool (thresholds, steps, series, tiles) and the (branch, layer) of each series."""
        series = sorted(self.verdicts)
        for key in series:
            if sorted(self.verdicts[key]) != list(range(steps)):
                seen = sorted(self.verdicts[key])
                raise RuntimeError(f"branch {key[0]} layer {key[1]}: expected one call per step, got steps {seen}")
        stacked = torch.stack([torch.stack([self.verdicts[key][t] for t in range(steps)]) for key in series])
        return stacked.permute(2, 1, 0, 3), series


def persistence(negligible: torch.Tensor, lag: int) -> tuple[float, float]:
    """(P(negligible at t + lag | negligible at t), its chance level) for ``negligible`` bool
    (steps, series, tiles), pooled over start steps and series; NaN if nothing is negligible."""
    steps = negligible.shape[0]
    if not 0 <= lag < steps:
        raise ValueError(f"lag: expected an integer in [0, {steps - 1}], got {lag}")
    now, later = negligible[: steps - lag], negligible[lag:]
    base = now.sum(-1, dtype=torch.float64)  # (steps - lag, series)
    total = base.sum()
    if total == 0:
        return math.nan, math.nan
    kept = (now & later).sum(dtype=torch.float64)
    chance = (base * later.to(torch.float64).mean(-1)).sum()
    return (kept / total).item(), (chance / total).item()


def persistence_to_end(negligible: torch.Tensor) -> float:
    """P(negligible at every later step | negligible at t), pooled over t < last step and series."""
    if negligible.shape[0] < 2:
        return math.nan
    # stays[t]: negligible at t and at every step after it (a running AND from the last step back).
    stays = negligible.flip(0).to(torch.uint8).cummin(0).values.flip(0).bool()
    base = negligible[:-1].sum(dtype=torch.float64)
    return (stays[:-1].sum(dtype=torch.float64) / base).item() if base > 0 else math.nan


@dataclass(frozen=True)
class CoherenceResult:
    """Persistence statistics per threshold."""

    config: CoherenceConfig
    device: str
    series: list[tuple[int, int]]  # (CFG branch, layer) of each mask series
    tiles_per_series: int  # B * H * Qt * Kt
    persistence: dict[float, list[float]]  # threshold -> per lag 0 .. steps - 1
    chance: dict[float, list[float]]
    to_end: dict[float, float]
    fraction: dict[float, list[float]]  # threshold -> negligible fraction per step (all series)
    fraction_per_series: dict[float, list[list[float]]]  # threshold -> [series][step]


def analyse(negligible: torch.Tensor, series: list[tuple[int, int]], config: CoherenceConfig) -> CoherenceResult:
    """Statistics of ``negligible`` bool (thresholds, steps, series, tiles) collected under ``config``."""
    by_threshold = dict(zip(config.thresholds, negligible, strict=True))
    lags = range(config.steps)
    pairs = {t: [persistence(n, lag) for lag in lags] for t, n in by_threshold.items()}
    return CoherenceResult(
        config=config,
        device=str(config.torch_device),
        series=series,
        tiles_per_series=negligible.shape[-1],
        persistence={t: [p for p, _ in values] for t, values in pairs.items()},
        chance={t: [c for _, c in values] for t, values in pairs.items()},
        to_end={t: persistence_to_end(n) for t, n in by_threshold.items()},
        fraction={t: n.float().mean((1, 2)).tolist() for t, n in by_threshold.items()},
        fraction_per_series={t: n.float().mean(2).T.tolist() for t, n in by_threshold.items()},
    )


def collect_negligible(
    config: CoherenceConfig, model: DemoVideoModel, *, progress: bool = True
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Sample the configured video densely on ``model`` (placed already); return the marking
    rule's verdicts, bool (thresholds, steps, series, tiles), and the (branch, layer) of each series."""
    # threshold -inf: the handle only tracks steps and branches; the probe answers every call.
    handle = apply_lite_attention(model.transformer, -math.inf, block_m=config.block_m, block_n=config.block_n)
    probe = RuleProbe(handle, config.thresholds, config.block_m, config.block_n)
    try:
        with handle.intercept(probe):
            config.sample(model, progress=progress)
    finally:
        handle.remove()
    return probe.negligible(config.steps)


def run_coherence(
    config: CoherenceConfig, model: DemoVideoModel | None = None, *, progress: bool = True
) -> CoherenceResult:
    """Measure persistence on ``model`` (default: the demo model from ``config.weights``)."""
    negligible, series = collect_negligible(config, prepare_model(config, model), progress=progress)
    return analyse(negligible, series, config)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return "     -" if math.isnan(value) else f"{100 * value:5.1f}%"


def format_table(result: CoherenceResult) -> str:
    """Printed table: per threshold, the negligible fraction and persistence (vs chance) at a few lags."""
    lags = [lag for lag in TABLE_LAGS if lag < result.config.steps]
    last = result.config.steps - 1
    header = f"  {'threshold':>9}  {'neg@0':>6}  {'neg@' + str(last // 2):>6}  {'neg@' + str(last):>6}"
    header += "".join(f"  {'t+' + str(lag):>6} {'chance':>6}" for lag in lags) + f"  {'to end':>6}"
    lines = [
        "",
        f"Coherence of negligible tiles: {result.config.prompt!r}, {result.config.steps} steps, "
        f"tiles {result.config.block_m}x{result.config.block_n}, {len(result.series)} layer-branch series "
        f"of {result.tiles_per_series} tiles, verdicts by reference_forward on {result.device}",
        "  neg@t: fraction of tiles negligible at step t;  t+k: P(still negligible k steps later);",
        "  chance: that probability were the verdicts independent;  to end: P(negligible at every later step)",
        header,
    ]
    for threshold in result.config.thresholds:
        fraction = result.fraction[threshold]
        row = f"  {threshold:>9g}  " + "  ".join(_percent(fraction[s]) for s in (0, last // 2, last))
        row += "".join(
            f"  {_percent(result.persistence[threshold][lag])} {_percent(result.chance[threshold][lag])}"
            for lag in lags
        )
        lines.append(row + f"  {_percent(result.to_end[threshold])}")
    return "\n".join(lines)


def plot(result: CoherenceResult, path: Path) -> Path:
    """PNG: persistence vs lag (with chance, dashed) and negligible fraction per step, per threshold."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for index, threshold in enumerate(result.config.thresholds):
        color = f"C{index}"
        left.plot(np.multiply(result.persistence[threshold], 100), "-o", ms=3, color=color, label=f"{threshold:g}")
        left.plot(np.multiply(result.chance[threshold], 100), "--", color=color, lw=1)
        right.plot(np.multiply(result.fraction[threshold], 100), "-o", ms=3, color=color, label=f"{threshold:g}")
    left.set_xlabel("lag k (steps)")
    left.set_ylabel("P(negligible at t+k | negligible at t) (%)")
    left.set_title("Persistence (dashed: chance)")
    left.set_ylim(0, 101)
    right.set_xlabel("denoising step")
    right.set_ylabel("tiles negligible (%)")
    right.set_title("Negligible fraction (dense evaluation)")
    right.set_ylim(0, 100)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title="threshold (log2)", fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def summary(result: CoherenceResult) -> dict[str, Any]:
    """Everything the command measured, as a JSON-ready dict (thresholds as keys)."""
    return {
        "config": vars(result.config),
        "device": result.device,
        "verdicts_by": "reference_forward, every tile computed, mark=True",
        "series": [{"branch": branch, "layer": layer} for branch, layer in result.series],
        "tiles_per_series": result.tiles_per_series,
        "persistence_by_lag": result.persistence,
        "chance_by_lag": result.chance,
        "persistence_to_end": result.to_end,
        "negligible_fraction_by_step": result.fraction,
        "negligible_fraction_by_series_and_step": result.fraction_per_series,
    }


def write_outputs(result: CoherenceResult, out: Path) -> dict[str, Path]:
    """Write coherence.json and coherence.png into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json(summary(result), out / "coherence.json"),
        "plot": plot(result, out / "coherence.png"),
    }


def main(config: CoherenceConfig) -> CoherenceResult:
    """Run the measurement, write its files and print its table."""
    result = run_coherence(config)
    files = write_outputs(result, config.out)
    print(format_table(result))
    print("\nFiles\n" + "\n".join(f"  {name:<6}{path}" for name, path in files.items()))
    return result
