"""The kernels' one public entry: :func:`forward` runs one attention call with the Gluon sm_90
kernel or the portable Triton kernel, and :func:`choose_kernel` says which one a call gets, and why.

- ``gluon_forward.py``: the warp-specialised Hopper kernel (Gluon, Triton's lower-level dialect).
- ``triton_forward.py``: the portable kernel (any GPU Triton supports, and the CPU interpreter).
- ``worklist.py``: the work list both kernels walk, built on the device from the packed mask.
- ``common.py``: what the two launchers share; ``triton_compat.py``: the Triton-release shim.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch
import triton

from ..plan import Range, range_words
from ..quantize import Quant, quantize_inputs
from ..state import TileGeometry
from .common import STATS, TRITON_VERSION
from .triton_forward import triton_forward
from .worklist import WorkList, plan_unmasked, plan_work

__all__ = ["STATS", "KernelChoice", "WorkList", "choose_kernel", "forward", "kernel_head_dim", "plan_work"]

KernelName = Literal["gluon", "portable"]

# Oldest and newest Triton releases the Gluon kernel is compiled and tested with; a newer one is
# tried, and a failed compile falls back to the portable kernel with a warning.
GLUON_TRITON = ((3, 6), (3, 9))
FP8_CAPABILITY = (8, 9)  # the quantized path's FP8 products need Ada or newer


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs a call, and why; ``triton_bound``: the portable kernel runs on a Hopper GPU
    because of the Triton release alone."""

    kernel: KernelName
    reason: str
    triton_bound: bool = False


def kernel_head_dim(head_dim: int) -> int:
    """The head dim the kernels run at: the next power of two (>= 16); the inputs are zero-padded
    to it (zeros change no dot product)."""
    return max(16, 1 << (head_dim - 1).bit_length())


@functools.cache
def _gluon() -> tuple[ModuleType | None, str]:
    """The Gluon kernel module, or None and why this Triton cannot build it."""
    if TRITON_VERSION < GLUON_TRITON[0]:
        return None, f"Triton {triton.__version__} predates the Gluon API the kernel is written for (3.6 on)"
    try:
        from . import gluon_forward
    except (ImportError, AttributeError) as error:
        return None, f"Triton {triton.__version__} lacks the Gluon API the kernel uses ({error})"
    return gluon_forward, ""


_gluon_failed: str | None = None  # set when an untested Triton failed to compile the Gluon kernel


def choose_kernel(
    device: torch.device, geometry: TileGeometry, head_dim: int, capability: tuple[int, int] | None = None,
    quant: Quant | None = None,
) -> KernelChoice:
    """The kernel a call on ``device`` with this tile geometry and (padded) head dim gets;
    ``capability`` stands in for a CUDA device's own (to ask what a GPU not present would get).
    Raises a ValueError where the ``quant`` path cannot run on that GPU."""
    if quant is not None:
        if device.type == "cuda":
            capability = capability or torch.cuda.get_device_capability(device)
            if capability < FP8_CAPABILITY:
                raise ValueError(
                    f"quant={quant!r} needs FP8 tensor cores (sm_89 or newer: Ada, Hopper, Blackwell), "
                    f"got sm_{capability[0]}{capability[1]}; use quant=None"
                )
        return KernelChoice("portable", f"quant={quant!r} runs on the portable kernel (the Gluon kernel is 16-bit only)")
    if os.environ.get("LITEATTENTION_GLUON", "1") == "0":
        return KernelChoice("portable", "LITEATTENTION_GLUON=0 is set")
    if device.type != "cuda":
        return KernelChoice("portable", f"{device.type} tensors: the Gluon kernel runs on CUDA GPUs only")
    capability = capability or torch.cuda.get_device_capability(device)
    if capability != (9, 0):
        return KernelChoice("portable", f"sm_{capability[0]}{capability[1]}: the Gluon kernel is built for sm_90 (Hopper)")
    module, why = _gluon()
    if module is None or _gluon_failed is not None:
        return KernelChoice("portable", why or _gluon_failed, triton_bound=True)
    shape = module.unsupported_shape(geometry, head_dim)
    if shape is not None:
        return KernelChoice("portable", shape)
    tested = "" if TRITON_VERSION <= GLUON_TRITON[1] else ", untested on this Triton"
    tiles = f"{geometry.block_m}x{geometry.block_n} tiles"
    return KernelChoice("gluon", f"sm_90 with Triton {triton.__version__}{tested}, {tiles}, head dim padded to {head_dim}")


@functools.cache
def _warn_portable_on_hopper(reason: str) -> None:
    """Once per reason: a Hopper GPU runs the slower portable kernel because of the Triton release."""
    warnings.warn(
        f"LiteAttention: the Gluon sm_90 kernel cannot run ({reason}); the portable Triton kernel runs "
        "instead, about 1.2-1.3x cuDNN's dense time rather than 0.8-0.9x. Triton 3.6 to 3.9 run the Gluon kernel.",
        stacklevel=4,
    )


def kernel_layout(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """t (B, S, H, D) as the kernels' TMA descriptors address it: D zero-padded to ``head_dim``,
    (H, D) contiguous, batch and row strides 16-byte aligned (a q/k/v slice of a fused projection
    qualifies), 16-byte aligned start. Copies only when needed."""
    if t.shape[3] != head_dim:
        return torch.nn.functional.pad(t, (0, head_dim - t.shape[3]))
    step = 16 // t.element_size()
    addressable = (
        t.stride(3) == 1 and t.stride(2) == head_dim and t.stride(1) % step == 0 and t.stride(0) % step == 0
        and t.data_ptr() % 16 == 0
    )
    return t if addressable else t.contiguous()


def _on_q_device(fn):
    """Run ``fn`` with q's GPU current: Triton launches on the current device, which is not q's when
    a model sits on cuda:1 while cuda:0 is current (the guard FlashAttention's launchers take)."""

    @functools.wraps(fn)
    def on_q_device(q: torch.Tensor, *args: Any, **kwargs: Any):
        if q.is_cuda and q.device.index != torch.cuda.current_device():
            with torch.cuda.device(q.device):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)

    return on_q_device


@_on_q_device
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: TileGeometry,
    *,
    scale: float,
    threshold: float,
    bits: torch.Tensor | None,
    must_do: tuple[Range, ...] = (),
    must_skip: tuple[Range, ...] = (),
    return_lse: bool = False,
    quant: Quant | None = None,
    kernel: KernelName | None = None,
    **tuning: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One attention call: q (B, Sq, H, D), k and v (B, Sk, H, D), float16 or bfloat16, any head
    dim up to 256 (padded here), on a GPU or under the CPU interpreter.

    ``bits`` is the packed skip mask (B, H, Qt, words) to skip and mark into, or None (dense:
    nothing skipped or marked, unless must_skip ranges are given). ``threshold`` -inf marks
    nothing. Ranges are validated, normalised (start, end) pairs. ``quant`` picks the 8-bit path
    (quantize.py; the portable kernel runs it). Returns the output, the LSE
    (or None) and the statistics (tiles computed, marked before, newly marked; int64, on the
    device, not waited for). ``kernel`` forces one kernel (an error if it cannot run);
    ``tuning`` passes launch options to it (benchmarks and tests).
    """
    batch, _, heads, head_dim = q.shape
    padded = kernel_head_dim(head_dim)
    q, k, v = (kernel_layout(t, padded) for t in (q, k, v))
    stats = torch.zeros(STATS, dtype=torch.int64, device=q.device)
    work = None
    if bits is not None or must_skip:
        words = range_words(geometry, must_do, must_skip, q.device)
        if bits is not None:
            work = plan_work(bits, *words, geometry, stats)
        else:  # must_skip alone: planned from an empty mask, none to mark into
            work = plan_unmasked(batch, heads, *words, geometry, stats)
    choice = choose_kernel(q.device, geometry, padded, quant=quant)
    if kernel == "gluon" and choice.kernel != "gluon":
        raise ValueError(f"kernel='gluon' cannot run this call: {choice.reason}")
    name = kernel or choice.kernel
    if choice.triton_bound and kernel is None:
        _warn_portable_on_hopper(choice.reason)
    args = dict(scale=scale, threshold=threshold, bits=bits, work=work, stats=stats, return_lse=return_lse)
    if quant is not None:
        quantized = quantize_inputs(q, k, v, geometry)
        out, lse = triton_forward(q, k, v, geometry, **args, quantized=quantized, **tuning)
        if lse is not None:
            lse += quantized.lse_shift(q, scale)
    elif name == "gluon":
        out, lse = _run_gluon(q, k, v, geometry, args, tuning, forced=kernel == "gluon")
    else:
        out, lse = triton_forward(q, k, v, geometry, **args, **tuning)
    if padded != head_dim:
        out = out[..., :head_dim].contiguous()
    return out, lse, stats


def _run_gluon(q, k, v, geometry, args, tuning, *, forced: bool):
    """The Gluon kernel; on a Triton newer than tested, a failed compile falls back to the portable
    kernel for the rest of the process, with one warning."""
    global _gluon_failed
    module = _gluon()[0]
    if TRITON_VERSION <= GLUON_TRITON[1] or forced:
        return module.gluon_forward(q, k, v, geometry, **args, **tuning)
    try:
        return module.gluon_forward(q, k, v, geometry, **args, **tuning)
    except triton.compiler.errors.CompilationError as error:
        _gluon_failed = f"Triton {triton.__version__} failed to compile it: {str(error).strip().splitlines()[-1]}"
        _warn_portable_on_hopper(_gluon_failed)
        return triton_forward(q, k, v, geometry, **args)
