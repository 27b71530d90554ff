"""LiteAttention: the functional op, the per-layer module, and input validation."""

from __future__ import annotations

import math
import os
import warnings
from typing import Literal, Union, overload

import torch

from .plan import RangesLike, build_plan, normalize_ranges, range_flags
from .quantize import Quant, check_quant, quantize_inputs
from .reference import reference_forward
from .schedule import ThresholdLike, ThresholdSchedule, check_int, check_threshold, is_real
from .state import CallStats, SkipState, TileGeometry, check_block_sizes, default_block_sizes, pack_bits

Backend = Literal["auto", "reference", "triton"]
Output = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

TRITON_DTYPES = (torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str) -> None:
    """Raise a ValueError unless ``backend`` names one (see ``Backend``)."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' picks Triton for CUDA tensors and the reference elsewhere."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if q.is_cuda else "reference"
    if backend == "triton" and not q.is_cuda and not _interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {q.device}); "
            "set TRITON_INTERPRET=1 to run the kernel on the CPU interpreter"
        )
    return backend


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> str:
    """Raise TypeError/ValueError naming the argument if q, k, v cannot be attended by ``backend``;
    return the backend that will run ('auto' resolved)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    for what, dim in (("batch", 0), ("heads", 2), ("head_dim", 3)):
        if q.shape[dim] != k.shape[dim]:
            raise ValueError(f"q and k must have the same {what} (dim {dim}), got {q.shape[dim]} and {k.shape[dim]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    backend = resolve_backend(backend, q)
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"the triton backend takes float16 or bfloat16 inputs, got {q.dtype}")
        head_dim = q.shape[3]
        if head_dim % 16 or head_dim > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"the triton backend takes head_dim a multiple of 16 up to {TRITON_MAX_HEAD_DIM}, got {head_dim}")
    return backend


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not is_real(scale) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (= head_dim ** -0.5), got {scale!r}")
    return float(scale)


def lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SkipState | None = None,
    *,
    threshold: float = -10.0,
    scale: float | None = None,
    return_lse: bool = False,
    must_do: RangesLike = None,
    must_skip: RangesLike = None,
    backend: Backend = "auto",
    step: int | None = None,
    quant: Quant | None = None,
) -> Output:
    """Softmax attention that skips the tiles ``state`` marks and marks newly negligible ones.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D). With ``state=None`` this is dense attention (same
    kernel, nothing skipped or marked). ``threshold`` is in log2 units (see the README); -inf
    marks nothing. ``must_do`` / ``must_skip`` are key ranges [start, end). Returns the output
    (q's shape and dtype), and the LSE (B, H, Sq) float32 if ``return_lse``.
    The state must have been built for these shapes (see ``SkipState.for_inputs``); ``step``
    (the denoising step, default: the state's call counter) is recorded in its statistics.
    ``quant="qk_int8_pv_fp8"`` runs the 8-bit path (``liteattention.quantize``): Q and K in int8,
    K smoothed, V and P in FP8; it marks from the scores it computes.
    """
    backend_name = check_inputs(q, k, v, backend)
    check_quant(quant)
    threshold = check_threshold(threshold)
    scale = check_scale(scale, q.shape[3])
    if step is not None:
        step = check_int("step", step, 0)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    if state is not None:
        if not isinstance(state, SkipState):
            raise TypeError(f"state must be a SkipState or None, got {type(state).__name__}")
        reason = state.mismatch(q, k)
        if reason is not None:
            raise ValueError(f"state does not fit the inputs: {reason}; build one for them: SkipState.for_inputs(q, k)")
        geometry = state.geometry
    else:
        geometry = TileGeometry(seq_q, seq_k, *default_block_sizes(head_dim))
    must_do = normalize_ranges(must_do, seq_k, "must_do")
    must_skip = normalize_ranges(must_skip, seq_k, "must_skip")
    range_flags(geometry, must_do, must_skip)  # raises for clashing ranges before any work
    mark = state is not None and threshold != -math.inf

    if backend_name == "triton":
        out, lse, stats = _triton_call(q, k, v, state, geometry, scale, threshold, must_do, must_skip, return_lse, quant)
    else:
        out, lse, stats = _reference_call(q, k, v, state, geometry, scale, threshold, must_do, must_skip, mark, quant)
    if state is not None:
        state.record(threshold, stats, step)
    return (out, lse) if return_lse else out


def _reference_call(q, k, v, state, geometry, scale, threshold, must_do, must_skip, mark, quant):
    batch, _, heads, _ = q.shape
    mask = state.mask() if state is not None else None
    plan = build_plan(geometry, batch, heads, q.device, mask, must_do, must_skip)
    if quant is None:
        out, lse, marked = reference_forward(q, k, v, plan, scale=scale, threshold=threshold, mark=mark)
    else:
        # The 8-bit path's semantics: attention over the values its kernel computes with.
        quantized = quantize_inputs(q, k, v, geometry)
        out, lse, marked = reference_forward(*quantized.dequantized(), plan, scale=scale, threshold=threshold, mark=mark)
        out, lse = out.to(q.dtype), lse + quantized.lse_shift(q, scale)
    stats = None
    if state is not None:
        newly = marked.sum() if marked is not None else torch.zeros((), dtype=torch.int64)
        stats = torch.stack([plan.computed_count(batch, heads), mask.sum(), newly])
        if marked is not None:
            state.bits |= pack_bits(marked)
    return out, lse, stats


def _triton_call(q, k, v, state, geometry, scale, threshold, must_do, must_skip, return_lse, quant):
    from . import kernels  # imports Triton: only for calls that run a kernel

    bits = state.bits if state is not None else None
    return kernels.forward(
        q, k, v, geometry, scale=scale, threshold=threshold, bits=bits, must_do=must_do, must_skip=must_skip,
        return_lse=return_lse, quant=quant,
    )


class LiteAttention:
    """Attention for one layer, with its persistent skip mask.

    Use one instance per attention layer (and per classifier-free-guidance branch): the mask
    records which tiles of *this* layer's attention matrix were negligible, which differs from
    layer to layer and between conditional and unconditional inputs.

    >>> attn = LiteAttention(threshold=-10.0)
    >>> out = attn(q, k, v)          # step 0: computes everything, marks negligible tiles
    >>> out = attn(q2, k2, v2)       # step 1: skips them, marks more
    >>> attn.reset()                 # new video
    """

    def __init__(
        self,
        threshold: ThresholdLike = -10.0,
        *,
        enabled: bool = True,
        block_m: int | None = None,
        block_n: int | None = None,
        backend: Backend = "auto",
        quant: Quant | None = None,
    ) -> None:
        self.schedule = ThresholdSchedule(threshold)
        check_block_sizes(block_m, block_n)
        check_backend(backend)
        check_quant(quant)
        self.quant = quant
        self.block_m, self.block_n = block_m, block_n
        self.enabled = enabled
        self.backend: Backend = backend
        self.state: SkipState | None = None

    @overload
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: Literal[False] = ..., scale: float | None = ..., must_do: RangesLike = ..., must_skip: RangesLike = ..., step: int | None = ...) -> torch.Tensor: ...
    @overload
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: Literal[True], scale: float | None = ..., must_do: RangesLike = ..., must_skip: RangesLike = ..., step: int | None = ...) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        must_do: RangesLike = None,
        must_skip: RangesLike = None,
        step: int | None = None,
    ) -> Output:
        """Attend q (B, Sq, H, D) to k, v (B, Sk, H, D).

        ``step`` picks the threshold from the schedule (default: the number of calls since the
        last reset). When disabled, this is dense attention and the state is left alone.
        """
        kwargs = dict(
            scale=scale, return_lse=return_lse, must_do=must_do, must_skip=must_skip, backend=self.backend, quant=self.quant,
        )
        if not self.enabled:
            return lite_attention(q, k, v, None, **kwargs)
        check_inputs(q, k, v, self.backend)
        state = self.state
        reason = None if state is None else state.mismatch(q, k)
        if state is None or reason is not None:
            state = SkipState.for_inputs(q, k, self.block_m, self.block_n)
        step = state.step if step is None else step
        out = lite_attention(q, k, v, state, threshold=self.schedule(step), step=step, **kwargs)
        # The new state replaces the old one only once the call has succeeded: a call with a bad
        # argument leaves the old masks as they were.
        if reason is not None and self.state.step > 0:  # a fresh or just reset state held nothing
            warnings.warn(f"LiteAttention: rebuilding the skip state, {reason}", stacklevel=2)
        self.state = state
        return out

    def reset(self) -> None:
        """Forget the mask and statistics (call before each new video)."""
        if self.state is not None:
            self.state.reset()

    def mask(self) -> torch.Tensor | None:
        """The skip mask, bool (B, H, Qt, Kt), True = skipped from the next call on; None before any call."""
        return None if self.state is None else self.state.mask()

    @property
    def step(self) -> int:
        return 0 if self.state is None else self.state.step

    @property
    def last_stats(self) -> CallStats | None:
        return None if self.state is None else self.state.last_stats

    @property
    def last_sparsity(self) -> float | None:
        """Fraction of tiles the last call skipped (waits for that call on the GPU)."""
        stats = self.last_stats
        return None if stats is None else stats.sparsity

    def __repr__(self) -> str:
        quant = f", quant={self.quant!r}" if self.quant else ""
        return f"LiteAttention(threshold={self.schedule!r}, enabled={self.enabled}{quant}, state={self.state!r})"
