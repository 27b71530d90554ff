"""Calibration: thresholds per (CFG branch, step, layer) from a quality budget, on the user's own
pipeline, along the calibrated trajectory.

The trajectory search (one generation). The calibration videos are generated once, as one batch,
with every self-attention call answered here instead of by the operator. Each layer (and CFG
branch) keeps the mask the profile chosen so far has built. A threshold of step t only marks
tiles, which are skipped from step t + 1 on, so it is chosen at step t + 1, on that call's real
inputs: from step t's marking scores (``tiles.py``: for every tile the call computed, the
smallest threshold that marks it) every candidate threshold of the grid gives a mask (the current
one plus the tiles it marks), and the call's exact output under each of them is compared with
dense attention on the same inputs. The largest threshold whose error stays within the per-call
bound, for every video of the batch, is committed; the call returns the output under that mask,
so later layers and steps run on the calibrated trajectory and errors compound exactly as they
will when the profile is applied. Then the call's own scores are kept for the next step. Early
steps stay dense where every candidate exceeds the bound: nothing is hard-coded. A mask that has
grown too large for a later call (the attention moved on) cannot be undone: such calls are
counted as violations and reported (``calibration["violations"]``).

The budget search. The per-call bound ``eps`` the trajectory search selects with is the one knob.
The constraints are checked on the whole trajectory: every call's error within ``max_error`` (a
mask chosen within the bound at step t + 1 can outgrow it later, as the attention moves on) and
each calibration video's PSNR against its dense video at least ``min_psnr``. The largest eps that
meets them is found by bracketing (factors of 4) then bisection over log(eps): with ``max_error``
alone the first trial is eps = max_error and usually the last. A ``target_sparsity`` then lowers
eps to the least that reaches it. Each trial is one trajectory; the trajectory's videos are what
the profile produces (up to tiles within float noise of a threshold), so no separate check is
needed.

Cost: one dense generation of the calibration batch (the PSNR reference), plus one trajectory
per trial. In a trajectory each attention call costs one unfused attention (QK^T, exp, per-tile
PV) plus, per grid value, O(Sq * Kt * D) work, and at shapes where the grid's candidate outputs do
not fit in memory, a second QK^T and softmax.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attention import check_scale
from ..integrations import apply_lite_attention
from ..integrations.diffusers import model_spec
from ..plan import normalize_ranges
from ..schedule import check_int, is_real
from ..state import TileGeometry, check_block_sizes, default_block_sizes
from .profile import Budget, Profile
from .tiles import evaluate_call

DEFAULT_GRID = tuple(float(t) for t in range(-16, 1))
"""Candidate thresholds (log2), besides -inf: -16, -15, ..., 0."""
DEFAULT_MAX_ERROR = {"rel_l2": 0.5, "l1": 0.5, "cosine": 0.1}
"""Upper end of the per-call bound when only min_psnr or target_sparsity is given."""
START_ERROR = {"rel_l2": 0.02, "l1": 0.02, "cosine": 0.0005}
"""First per-call bound tried by the search."""
MIN_ERROR_FACTOR = 1e-3  # the search gives up below START_ERROR * this: the dense profile
Generate = Callable[[Sequence[str], Sequence[int]], torch.Tensor]
"""``generate(prompts, seeds) -> videos``: one batched generation, a video per (prompt, seed) pair,
values in [0, 1] (any layout with the batch first)."""


@dataclass
class Trial:
    """One trajectory at per-call bound ``eps``."""

    eps: float
    thresholds: np.ndarray  # (branches, steps, layers)
    sparsity: np.ndarray  # (branches, steps, layers): tiles skipped per call, mean over the batch
    errors: np.ndarray  # (branches, steps, layers): error of the call under the committed mask (max over the batch)
    violations: int
    videos: torch.Tensor
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_sparsity(self) -> float:
        return float(self.sparsity.mean())

    @property
    def min_psnr(self) -> float:
        return min(self.psnr) if self.psnr else math.nan


def step_weight(step: int, steps: int | None) -> float:
    """Share of the per-call bound for the marks of ``step`` in a ``steps``-step generation:
    (step + 1) / (steps - 1), rising linearly to 1 at the last step that marks for a later one.

    A mark made at step t is skipped in every later call, while the attention keeps moving:
    marks of the early, noisy steps are the least reliable (``docs/coherence.md``: step 0 is the
    exception to persistence) and their error compounds through the most steps. The ramp makes the search stricter there; how strict, per layer, is still the
    search's choice. 1 when the step count is unknown."""
    if steps is None or steps < 2:
        return 1.0
    return min(1.0, (step + 1) / (steps - 1))


class _Series:
    """The mask and pending scores of one (branch, layer) along the trajectory."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.step = -1


class TrajectoryProbe:
    """Attention-call wrapper (``LiteAttentionHandle.intercept``) that runs the greedy trajectory
    search at per-call bound ``eps`` and answers every call with its committed output."""

    def __init__(self, handle: Any, *, eps: float, metric: str, grid: Sequence[float], block_m: int | None,
                 block_n: int | None, steps: int | None = None) -> None:
        self._handle = handle
        self.eps, self.metric = eps, metric
        self._steps = steps  # known: the marks of step t get the bound eps * step_weight(t, steps)
        self._grid = sorted(float(t) for t in grid)
        self._blocks = (block_m, block_n)
        self.series: dict[tuple[int, int], _Series] = {}
        self.thresholds: dict[tuple[int, int, int], float] = {}  # (branch, step, layer)
        self.sparsity: dict[tuple[int, int, int], float] = {}
        self.errors: dict[tuple[int, int, int], float] = {}
        self.shapes: dict[int, tuple[int, int, int, int]] = {}
        self.blocks: tuple[int, int] | None = None
        self.violations = 0

    def __call__(self, run: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float | None = None, must_do: Any = None, **_: Any) -> torch.Tensor:
        branch, step = self._handle.branch, self._handle.step
        batch, seq_q, heads, head_dim = q.shape
        seq_k = k.shape[1]
        self.shapes.setdefault(layer, (seq_q, seq_k, heads, head_dim))
        default_m, default_n = default_block_sizes(head_dim)
        block_m = self._blocks[0] or default_m
        block_n = self._blocks[1] or default_n
        self.blocks = (block_m, block_n)
        geometry = TileGeometry(seq_q, seq_k, block_m, block_n)
        series = self.series.get((branch, layer))
        if series is None or step <= series.step:  # a new generation
            series = self.series[(branch, layer)] = _Series()
        if series.step >= 0 and step != series.step + 1:
            raise RuntimeError(f"branch {branch} layer {layer}: step {step} follows step {series.step}")
        grid = torch.tensor(self._grid, dtype=torch.float64, device=q.device)
        errors, committer = evaluate_call(
            q, k, v, geometry, scale=check_scale(scale, head_dim), mask=series.mask,
            previous_scores=series.scores if series.step >= 0 else None, grid=grid, metric=self.metric,
            must_do=normalize_ranges(must_do, seq_k, "must_do"),
        )
        worst = errors.max(0).values  # over the batch
        chosen = 0
        if series.step >= 0:
            bound = self.eps * step_weight(series.step, self._steps)
            within = (worst <= bound).nonzero().flatten().tolist()
            chosen = max(within) if within else 0
            if not within:
                self.violations += 1
            self.thresholds[(branch, series.step, layer)] = -math.inf if chosen == 0 else float(grid[chosen - 1])
        out, series.mask, series.scores = committer.commit(chosen)
        series.step = step
        self.errors[(branch, step, layer)] = float(worst[chosen])
        self.sparsity[(branch, step, layer)] = float(series.mask.float().mean())
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, sparsity, errors), each (branches, steps, layers); the last step's
        threshold (it marks for no later call) is -inf."""
        branches = 1 + max(b for b, _, _ in self.sparsity)
        steps = 1 + max(s for _, s, _ in self.sparsity)
        layers = 1 + max(layer for _, _, layer in self.sparsity)
        thresholds = np.full((branches, steps, layers), -np.inf)
        sparsity = np.zeros((branches, steps, layers))
        errors = np.zeros((branches, steps, layers))
        for (b, s, layer), value in self.thresholds.items():
            thresholds[b, s, layer] = value
        for (b, s, layer), value in self.sparsity.items():
            sparsity[b, s, layer] = value
            errors[b, s, layer] = self.errors[(b, s, layer)]
        return thresholds, sparsity, errors


class _TimestepRecorder:
    """Forward pre-hook keeping the timestep of each transformer call (one per step and branch)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self._index = list(inspect.signature(transformer.forward).parameters).index("timestep")
        self.values: list[float] = []
        self._hook = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[self._index]
        self.values.append(float(torch.as_tensor(timestep).max()))

    def remove(self) -> None:
        self._hook.remove()

    def per_step(self) -> list[float]:
        """Distinct timesteps in call order (the CFG branches of a step share one)."""
        steps: list[float] = []
        for value in self.values:
            if not steps or value != steps[-1]:
                steps.append(value)
        return steps


def video_psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR (dB) of two videos with values in [0, 1]; inf when identical."""
    mse = float(((reference.double() - test.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _ssim(reference: torch.Tensor, test: torch.Tensor) -> float:
    """SSIM averaged over frames, for (F, H, W, 3) videos; NaN for other layouts."""
    if reference.ndim != 4 or reference.shape[-1] != 3:
        return math.nan
    from skimage.metrics import structural_similarity

    return float(np.mean([
        structural_similarity(r.numpy(), t.numpy(), data_range=1.0, channel_axis=-1)
        for r, t in zip(reference.float().cpu(), test.float().cpu(), strict=True)
    ]))


class Calibrator:
    """Runs trajectories on one pipeline; :func:`calibrate` drives it."""

    def __init__(self, generate: Generate, transformer: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int],
                 *, metric: str, grid: Sequence[float], block_m: int | None, block_n: int | None,
                 ramp: bool = True, progress: bool = True) -> None:
        self.generate, self.transformer = generate, transformer
        self.prompts = [p for p in prompts for _ in seeds]
        self.seeds = [s for _ in prompts for s in seeds]
        self.metric, self.grid = metric, tuple(grid)
        self.block_m, self.block_n = block_m, block_n
        self.progress = progress
        self.ramp = ramp
        self.steps: int | None = None
        self.dense: torch.Tensor | None = None
        self.trials: list[Trial] = []
        self.timesteps: list[float] = []
        self.layer_names: tuple[str, ...] = ()
        self.shapes: dict[int, tuple[int, int, int, int]] = {}
        self.blocks: tuple[int, int] | None = None
        self.dense_seconds = 0.0

    def _note(self, text: str) -> None:
        if self.progress:
            tqdm.write(text)

    def run_dense(self) -> torch.Tensor:
        """The dense videos (the PSNR reference); also counts the generation's steps."""
        start = time.perf_counter()
        recorder = _TimestepRecorder(self.transformer)
        try:
            self.dense = self.generate(self.prompts, self.seeds).detach().float().cpu()
        finally:
            recorder.remove()
        self.steps = len(recorder.per_step())
        self.dense_seconds = time.perf_counter() - start
        return self.dense

    def trial(self, eps: float) -> Trial:
        for done in self.trials:  # the search may ask for a bound twice
            if done.eps == eps:
                return done
        start = time.perf_counter()
        handle = apply_lite_attention(self.transformer, -math.inf, block_m=self.block_m, block_n=self.block_n)
        probe = TrajectoryProbe(handle, eps=eps, metric=self.metric, grid=self.grid, block_m=self.block_m,
                                block_n=self.block_n, steps=self.steps if self.ramp else None)
        recorder = _TimestepRecorder(self.transformer)
        try:
            with handle.intercept(probe):
                videos = self.generate(self.prompts, self.seeds).detach().float().cpu()
            self.layer_names = handle.layer_names
        finally:
            recorder.remove()
            handle.remove()
        thresholds, sparsity, errors = probe.arrays()
        self.timesteps, self.shapes, self.blocks = recorder.per_step(), probe.shapes, probe.blocks
        trial = Trial(eps, thresholds, sparsity, errors, probe.violations, videos)
        if self.dense is not None:
            trial.psnr = [video_psnr(d, v) for d, v in zip(self.dense, videos, strict=True)]
            trial.ssim = [_ssim(d, v) for d, v in zip(self.dense, videos, strict=True)]
        trial.seconds = time.perf_counter() - start
        self.trials.append(trial)
        psnr = f", min PSNR {trial.min_psnr:.2f} dB" if trial.psnr else ""
        self._note(f"  trial {len(self.trials)}: per-call {self.metric} <= {eps:.4g}: sparsity "
                   f"{100 * trial.mean_sparsity:.1f}%{psnr}, {trial.violations} calls over ({trial.seconds:.0f} s)")
        return trial

    def profile(self, trial: Trial, budget: Budget, extra: dict[str, Any]) -> Profile:
        steps = trial.thresholds.shape[1]
        timesteps = self.timesteps if len(self.timesteps) == steps else None
        assert self.blocks is not None
        return Profile(
            thresholds=tuple(tuple(tuple(float(t) for t in row) for row in branch) for branch in trial.thresholds),
            model=type(self.transformer).__name__,
            layer_names=tuple(self.layer_names),
            shapes=tuple(self.shapes[layer] for layer in range(len(self.layer_names))),
            block_m=self.blocks[0],
            block_n=self.blocks[1],
            timesteps=None if timesteps is None else tuple(timesteps),
            budget=budget,
            calibration={
                "prompts": list(self.prompts),
                "seeds": list(self.seeds),
                "metric": self.metric,
                "per_call_bound": trial.eps,
                "step_weights": "linear ramp (step + 1) / (steps - 1)" if self.ramp else "uniform",
                "grid": list(self.grid),
                "mean_sparsity": trial.mean_sparsity,
                "sparsity_per_step": trial.sparsity.mean((0, 2)).tolist(),
                "max_call_error": float(trial.errors.max()),
                "violations": trial.violations,
                "psnr_db": trial.psnr,
                "ssim": trial.ssim,
                "trials": [{"per_call_bound": t.eps, "mean_sparsity": t.mean_sparsity, "min_psnr_db": t.min_psnr}
                           for t in self.trials],
                "dense_generations": 1 if self.dense is not None else 0,
                "trajectory_generations": len(self.trials),
                **extra,
            },
        )


def _search(trial: Callable[[float], Trial], ok: Callable[[Trial], bool], start: float, low: float, high: float,
            iterations: int) -> tuple[Trial | None, Trial | None]:
    """Largest eps in [low, high] with ``ok`` (assumed true below some eps, false above), by
    bracketing in factors of 4 from ``start``, then bisection in log(eps). Returns the best trial
    with ``ok`` and the least trial without (either may be None)."""
    good: Trial | None = None
    bad: Trial | None = None
    eps = min(max(start, low), high)
    for _ in range(iterations):
        t = trial(eps)
        if ok(t):
            good = t if good is None or t.eps > good.eps else good
        else:
            bad = t if bad is None or t.eps < bad.eps else bad
        if good is not None and good.eps >= high:
            break
        if bad is not None and bad.eps <= low:
            break
        if good is None:
            eps = max(bad.eps / 4.0, low)
        elif bad is None:
            eps = min(good.eps * 4.0, high)
        else:
            if bad.eps / good.eps < 1.15:
                break
            eps = math.sqrt(good.eps * bad.eps)
    return good, bad


def _from_pipeline(pipeline: Any, num_inference_steps: int | None, kwargs: dict[str, Any]) -> tuple[Generate, torch.nn.Module]:
    transformer = getattr(pipeline, "transformer", None)
    if transformer is None:
        raise TypeError("pipeline: expected a diffusers pipeline with a .transformer, or pass generate= and transformer=")

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        device = getattr(pipeline, "device", "cpu")
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        options = dict(kwargs)
        if num_inference_steps is not None:
            options["num_inference_steps"] = num_inference_steps
        result = pipeline(prompt=list(prompts), generator=generators, output_type="pt", **options)
        frames = result.frames if hasattr(result, "frames") else result[0]
        return torch.as_tensor(frames)

    return generate, transformer


def _finite(value: Any) -> float:
    if not (is_real(value) and math.isfinite(value)):
        raise ValueError
    return float(value)


def _numbers(name: str, values: Any, expected: str, convert: Callable[[Any], Any]) -> list:
    """``values`` (a sequence, numpy array or tensor) as a non-empty list of Python numbers, each
    through ``convert``; a ValueError naming ``name`` otherwise."""
    problem = ValueError(f"{name}: expected a non-empty sequence of {expected}, got {values!r}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise problem
    items = values.tolist() if isinstance(values, (np.ndarray, torch.Tensor)) else list(values)
    if not isinstance(items, list) or not items:
        raise problem
    try:
        return [convert(v) for v in items]
    except ValueError:
        raise problem from None


def calibrate(
    pipeline: Any = None,
    prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    *,
    metric: str = "rel_l2",
    max_error: float | None = None,
    min_psnr: float | None = None,
    target_sparsity: float | None = None,
    generate: Generate | None = None,
    transformer: torch.nn.Module | None = None,
    num_inference_steps: int | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    block_m: int | None = None,
    block_n: int | None = None,
    max_trials: int = 6,
    ramp: bool = True,
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> Profile:
    """Calibrate thresholds per (CFG branch, step, layer) for a budget on the user's pipeline.

    Args:
        pipeline: a diffusers pipeline whose ``transformer`` ``apply_lite_attention`` supports; it
            is called once per trial as ``pipeline(prompt=prompts, generator=[...], output_type="pt",
            num_inference_steps=..., **pipeline_kwargs)``. Or None, with ``generate`` and ``transformer``.
        prompts, seeds: the calibration videos: every (prompt, seed) pair, generated as one batch.
        metric: per-call error metric against dense attention: 'rel_l2', 'cosine' or 'l1'.
        max_error: bound on every attention call's error (the quality budget per call).
        min_psnr: bound (dB) on each calibration video's PSNR against its dense video.
        target_sparsity: mean fraction of tiles skipped to reach (within the other bounds).
        generate: ``generate(prompts, seeds) -> videos`` in [0, 1], batch first: one batched
            generation that runs ``transformer``.
        grid: candidate thresholds (log2) besides -inf.
        block_m, block_n: tile sizes (None: the operator's defaults for the head dim).
        max_trials: trajectories per search phase (each one generation of the batch).
        ramp: select the marks of step t with the per-call bound scaled by (t + 1) / (steps - 1)
            (see ``step_weight``), stricter at the early steps; False: the same bound at every step.
            The ``max_error`` constraint holds for every call either way.

    Returns:
        A :class:`Profile`; ``profile.calibration`` holds what it reached on the calibration
        videos (sparsity, PSNR, SSIM, worst per-call error, violations, every trial).
    """
    budget = Budget(metric, max_error, min_psnr, target_sparsity)
    if generate is None:
        if pipeline is None:
            raise TypeError("calibrate: pass a diffusers pipeline, or generate= and transformer=")
        generate, found = _from_pipeline(pipeline, num_inference_steps, pipeline_kwargs)
        transformer = transformer or found
    elif transformer is None:
        raise TypeError("calibrate: generate= needs transformer= (the model whose attention is calibrated)")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts: expected a non-empty sequence of prompts")
    seeds = _numbers("seeds", seeds, "non-negative ints", lambda s: check_int("seeds", s, 0))
    if block_m is not None or block_n is not None:
        check_block_sizes(block_m or 128, block_n or 64)
    grid = _numbers("grid", grid, "finite thresholds (log2), e.g. -20 .. 0", _finite)
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"max_trials: expected a positive int, got {max_trials!r}")

    model_spec(transformer)  # an unsupported model is refused before the dense generation, not after
    start_time = time.perf_counter()
    cal = Calibrator(generate, transformer, prompts, seeds, metric=metric, grid=grid, block_m=block_m,
                     block_n=block_n, ramp=ramp, progress=progress)
    cal._note(f"calibrating {len(cal.prompts)} videos: dense reference")
    cal.run_dense()
    high = max_error if max_error is not None else DEFAULT_MAX_ERROR[metric]
    low = START_ERROR[metric] * MIN_ERROR_FACTOR

    def quality_ok(t: Trial) -> bool:
        # Every call of every calibration video within max_error (a mask chosen within the bound
        # can outgrow it at later steps: then a lower selection bound is searched), and the PSNR.
        return (max_error is None or float(t.errors.max()) <= max_error) and (
            min_psnr is None or t.min_psnr >= min_psnr)

    start = high if min_psnr is None else min(START_ERROR[metric], high)
    chosen, _ = _search(cal.trial, quality_ok, start, low, high, max_trials)
    if chosen is None:  # nothing met the bounds: the dense profile does
        chosen = cal.trial(0.0)
    if target_sparsity is not None and chosen.mean_sparsity >= target_sparsity:
        # The least bound that reaches the target: less error at the sparsity asked for.
        _search(cal.trial, lambda t: t.mean_sparsity < target_sparsity, START_ERROR[metric], low, chosen.eps,
                max_trials)
        enough = [t for t in cal.trials if t.mean_sparsity >= target_sparsity and quality_ok(t)]
        chosen = min(enough, key=lambda t: t.eps, default=chosen)
    met = {
        "max_error": None if max_error is None else bool(chosen.errors.max() <= max_error),
        "min_psnr": None if min_psnr is None else bool(quality_ok(chosen)),
        "target_sparsity": None if target_sparsity is None else bool(chosen.mean_sparsity >= target_sparsity),
    }
    extra = {"met": {k: v for k, v in met.items() if v is not None},
             "seconds": time.perf_counter() - start_time}
    return cal.profile(chosen, budget, extra)
