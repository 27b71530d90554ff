"""LiteAttention for diffusers video transformers (written against diffusers 0.42).

``apply_lite_attention(transformer, threshold)`` replaces the self-attention processor of every
transformer block with a thin wrapper: the wrapper runs the model's own processor (projections, norms,
RoPE, output split all stay the model's code) and intercepts only its attention call, which it routes to
the registered op ``torch.ops.liteattention.attention`` (:mod:`liteattention.ops`) with that layer's skip
mask. Cross-attention (text -> video) and the text-only token refiner of HunyuanVideo stay dense and
untouched.

Supported: ``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``,
``HunyuanVideoTransformer3DModel`` and ``CogVideoXTransformer3DModel``.

Joint attention. HunyuanVideo (dual- and single-stream blocks) and CogVideoX attend over one sequence of
video and text tokens; CogVideoX puts the text first, HunyuanVideo appends it after the video. The text
keys are passed as ``must_do``, so only video-to-video tiles can be skipped.

Attention masks are honoured, never dropped. A key-padding mask that hides a contiguous tail of keys,
identically for the whole batch (HunyuanVideo's text padding), is applied by leaving those keys out of
the call (exact; they are never computed). Any other mask, and any call with dropout, causal masking,
GQA or extra attention kwargs, runs the model's own attention function for that call, with a one-time
warning per reason.

Step and branch rules. The threshold schedule is indexed by the denoising step; each classifier-free-
guidance branch keeps its own mask per layer. Two sources tell the step and the branch, the first that
applies wins:

1. The pipeline's cache context (diffusers pipelines wrap every transformer call in
   ``transformer.cache_context(name, step_index=i, ...)``): the branch is the context's name
   (``"cond"`` is branch 0, ``"uncond"`` branch 1: names are numbered in the order they first appear in
   a generation; a CFG batch doubled into one call, ``"cond_uncond"``, is one branch: the mask is per
   batch element), the step is its ``step_index`` (without one, the number of earlier calls under that
   name). A new generation starts after the pipeline resets its hooks at the end of a call
   (``maybe_free_model_hooks``), or when ``step_index`` goes back. This is read outside the transformer's
   code, so it costs a compiled transformer nothing.
2. Bare transformer calls (no cache context): the ``timestep`` the transformer receives (per-token
   timesteps, as in Wan 2.2 TI2V, are reduced to their maximum).

   * The step index is the number of distinct timesteps seen before the current one since the generation
     started, so the first step is 0. It is counted per transformer (each expert of Wan 2.2 A14B counts
     its own steps).
   * A call with the same timestep as the previous call is the next CFG branch of the same step: the k-th
     call at a timestep is branch k (pipelines call cond first, then uncond).
   * A lower timestep starts the next step at branch 0.
   * A higher timestep starts a new generation (this includes a repeat of the first timestep once steps
     have passed, since schedules decrease).

   Reading the timestep's value needs the host: when the whole transformer is compiled, this rule runs
   inside a registered op (``liteattention::timestep_clock``), at run time, so it neither breaks the
   graph nor recompiles it. A missing timestep, or one that is not a number or a non-empty tensor of
   numbers (None, a string...), is a TypeError naming it, checked before the op, while tracing.

A new generation empties every mask, clears the stats and restarts the step index at 0.
``handle.reset()`` does the same explicitly; call it between generations that cannot be told apart
(e.g. bare single-step calls).

torch.compile. The attention call is one opaque op node; the per-layer mask, tile counters and threshold
are tensors the processors hold, inputs of the graph, so the same compiled code serves every layer
(``compile_repeated_blocks``) and every step: nothing the compiler specialises on changes from call to
call. The step and branch bookkeeping runs outside the graph (cache context, forward pre-hook under
regional compilation) or inside the timestep op. A branch switch swaps the branch's masks into the live
tensors in place (a device copy of the packed masks, about 0.6 MiB per layer for Wan2.1-1.3B at 480p).

Context parallelism (diffusers' ``enable_parallelism(config=ContextParallelConfig(...))``, Wan and LTX:
the models that have a context-parallel plan in diffusers 0.42). diffusers calls a backend's forward op once
per key/value shard and merges the shards' outputs by their LSE; LiteAttention passes its own forward op,
which gives every shard call its own mask: Ulysses (all-to-all over heads) makes one call over the whole
sequence for this rank's heads, so its masks are the single-device masks of those heads; ring attention
makes one call per key/value shard, so the masks are per (query shard, key/value shard), and the marking
rule's running maximum restarts at each shard (see the README's semantics).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTransformer3DModel,
)
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from torch.overrides import TorchFunctionMode

from .. import ops
from ..quantize import Quant, check_quant
from ..schedule import ThresholdLike, ThresholdSchedule
from ..state import HISTORY_SIZE, TileGeometry, check_block_sizes, default_block_sizes, pack_bits, unpack_bits

__all__ = ["LiteAttentionHandle", "LiteAttentionProcessor", "apply_lite_attention"]

AttentionWrapper = Callable[..., torch.Tensor]
"""``wrapper(run, layer, q, k, v, **kwargs) -> output`` (see ``LiteAttentionHandle.intercept``)."""

LayerSelection = Iterable[int] | Mapping[int, ThresholdLike] | Callable[[int], ThresholdLike | None]
"""Which self-attention layers to patch, optionally with a threshold each (see ``apply_lite_attention``)."""

_HOOK_NAME = "liteattention"


# --------------------------------------------------------------------------------------------------
# Interception of the processors' attention call
# --------------------------------------------------------------------------------------------------


class _LiteBackend:
    """Stands in for the attention backend of the processor copy a LiteAttentionProcessor runs: the
    dispatch trampoline recognises it and hands the call to ``processor``; ``backend`` is the backend
    the model's processor had (used for the calls LiteAttention declines)."""

    __slots__ = ("backend", "processor")

    def __init__(self, processor: LiteAttentionProcessor, backend: Any) -> None:
        self.processor, self.backend = processor, backend


def _dispatch_call(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    attention_kwargs=None, *, backend=None, parallel_config=None,
):
    """The arguments of ``dispatch_attention_fn`` that matter here; ``plain`` is False for calls with
    dropout, causal masking, GQA or extra attention kwargs."""
    plain = dropout_p == 0.0 and not is_causal and not enable_gqa and not attention_kwargs
    return query, key, value, attn_mask, scale, plain, parallel_config


def _sdpa_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The arguments of ``F.scaled_dot_product_attention``, q, k, v as (B, S, H, D)."""
    plain = dropout_p == 0.0 and not is_causal and not enable_gqa
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return q, k, v, attn_mask, scale, plain, None


# Module name -> (its original dispatch_attention_fn, number of handles that need the trampoline).
_trampolines: dict[str, tuple[Callable[..., torch.Tensor], int]] = {}
_trampoline_lock = threading.Lock()


def _trampoline(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def dispatch_attention_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        marker = kwargs.get("backend")
        if type(marker) is _LiteBackend:
            kwargs["backend"] = marker.backend
            return marker.processor._dispatch(original, *args, **kwargs)
        return original(*args, **kwargs)

    return dispatch_attention_fn


def _install_trampoline(module_name: str) -> None:
    """Route ``dispatch_attention_fn`` of ``module_name`` through the trampoline while a handle needs it.

    The Wan/LTX/HunyuanVideo processors look ``dispatch_attention_fn`` up in their module's globals at
    call time, and diffusers' backend registry is keyed by a closed enum (no custom backend can be
    registered), so that global is the one hook short of copying the processors. It is rebound once per
    module while any handle is applied (not per call: no lock or context manager in the traced code);
    the trampoline passes every call whose backend is not LiteAttention's marker straight through, so the
    model's other attention calls (cross-attention, unpatched layers, other models) are unaffected.
    """
    module = sys.modules[module_name]
    with _trampoline_lock:
        original, users = _trampolines.get(module_name, (module.dispatch_attention_fn, 0))
        if users == 0:
            module.dispatch_attention_fn = _trampoline(original)
        _trampolines[module_name] = (original, users + 1)


def _remove_trampoline(module_name: str) -> None:
    with _trampoline_lock:
        original, users = _trampolines[module_name]
        if users == 1:
            sys.modules[module_name].dispatch_attention_fn = original
            del _trampolines[module_name]
        else:
            _trampolines[module_name] = (original, users - 1)


class _SDPAMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to ``processor`` inside a ``with`` block.

    CogVideoX's processor calls torch's SDPA directly; a torch-function mode is torch's own
    thread-local, scoped hook for that, so nothing global (``torch.nn.functional``) is rebound.
    """

    def __init__(self, processor: LiteAttentionProcessor) -> None:
        super().__init__()
        self._processor = processor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self._processor._attend(*_sdpa_call(*args, **kwargs))
            if out is not None:
                return out.transpose(1, 2)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class _Site:
    """How the model's processors call attention: through ``dispatch_attention_fn`` (rebound in their
    module) or through torch's SDPA (a torch-function mode per call)."""

    dispatch: bool


_DISPATCH = _Site(dispatch=True)
_SDPA = _Site(dispatch=False)


# --------------------------------------------------------------------------------------------------
# Supported models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelSpec:
    model: type
    blocks: tuple[tuple[str, str], ...]  # (ModuleList attribute, self-attention attribute of each block)
    processors: tuple[type, ...]  # the model's own processors, whose attention call we intercept
    site: _Site
    text_first: bool  # joint attention: text keys before (CogVideoX) or after (HunyuanVideo) the video


_SPECS = (
    _ModelSpec(WanTransformer3DModel, (("blocks", "attn1"),), (WanAttnProcessor,), _DISPATCH, False),
    _ModelSpec(
        LTXVideoTransformer3DModel, (("transformer_blocks", "attn1"),), (LTXVideoAttnProcessor,), _DISPATCH, False
    ),
    _ModelSpec(
        HunyuanVideoTransformer3DModel,
        (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        (HunyuanVideoAttnProcessor2_0,),
        _DISPATCH,
        False,
    ),
    _ModelSpec(
        CogVideoXTransformer3DModel,
        (("transformer_blocks", "attn1"),),
        (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
        _SDPA,
        True,
    ),
)


def model_spec(transformer: torch.nn.Module) -> _ModelSpec:
    """The patching recipe for ``transformer``'s class; a TypeError naming the supported classes if none."""
    spec = next((s for s in _SPECS if isinstance(transformer, s.model)), None)
    if spec is None:
        supported = ", ".join(s.model.__name__ for s in _SPECS)
        raise TypeError(f"transformer: expected one of {supported}; got {type(transformer).__name__}")
    return spec


def _valid_key_prefix(mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_k: int) -> int | None:
    """Number of valid leading keys if ``mask`` only hides a contiguous tail of keys, identically for
    every batch element, head and query; else None.

    ``mask`` is a boolean keep-mask or an additive float mask, of any shape that broadcasts to
    (B, H, Sq, Sk), or (B, Sk) as dispatch_attention_fn's native backend reads a 2-D mask.
    """
    if mask.dtype == torch.bool:
        keep, binary = mask, None
    elif mask.is_floating_point():
        keep = mask == 0
        # exp(-1e4) underflows to 0 in every float dtype: such a bias hides its key entirely.
        binary = (keep | (mask <= -1e4)).all()
    else:
        return None
    if keep.ndim == 2 and keep.shape == (batch, seq_k):
        keep = keep[:, None, None, :]
    full = (batch, heads, seq_q, seq_k)
    broadcastable = keep.ndim <= 4 and all(n in (1, f) for n, f in zip(keep.shape[::-1], full[::-1], strict=False))
    if not broadcastable or keep.shape[-1] != seq_k:
        return None
    rows = keep.reshape(-1, seq_k)
    first = rows[0]
    ok = (rows == first).all() & (first[1:] <= first[:-1]).all()  # identical rows, valid keys first
    if binary is not None:
        ok &= binary
    ok, valid = torch.stack([ok.long(), first.sum()]).tolist()  # one host sync
    return valid if ok and valid > 0 else None


# --------------------------------------------------------------------------------------------------
# Processor wrapper
# --------------------------------------------------------------------------------------------------


def _forward_to_original(name: str) -> property:
    # diffusers configures processors by setting these attributes (set_attention_backend,
    # enable_parallelism); they belong to the original processor, which runs the dense paths, and to
    # the copy LiteAttention runs.
    def set_(self: LiteAttentionProcessor, value: Any) -> None:
        setattr(self.original, name, value)
        self._sync_inner()

    return property(lambda self: getattr(self.original, name), set_)


@dataclass
class _Live:
    """The tensors one layer's attention op reads and marks: the live branch's masks (one per
    key/value shard call: one without ring attention), the tile counters of the current call and the
    current threshold (a CPU scalar: the op reads it on the host, without a device sync)."""

    bits: list[torch.Tensor] = field(default_factory=list)
    geometry: list[TileGeometry] = field(default_factory=list)
    counts: torch.Tensor | None = None
    threshold: torch.Tensor = field(default_factory=lambda: torch.tensor(-math.inf, dtype=torch.float64))


class LiteAttentionProcessor:
    """Runs the model's own attention processor, routing its attention call to LiteAttention.

    Installed by :func:`apply_lite_attention`; ``original`` is the processor it wraps.
    """

    _attention_backend = _forward_to_original("_attention_backend")
    _parallel_config = _forward_to_original("_parallel_config")

    def __init__(self, original: Any, handle: LiteAttentionHandle, layer: int, spec: _ModelSpec) -> None:
        self.original = original
        self.layer = layer
        self._handle = handle
        self._spec = spec
        self._tiles = handle._tiles
        self.live = _Live()
        self._ring: tuple[int, int] | None = None  # (this rank's ring position, ring size) under ring attention
        parameters = list(inspect.signature(original.__call__).parameters)  # bound: attn first
        self._text_position = parameters.index("encoder_hidden_states") - 1 if "encoder_hidden_states" in parameters else 1 << 30
        self._text_tokens = 0
        self.inner = None
        self._sync_inner()

    def _sync_inner(self) -> None:
        """The copy of the original processor whose dispatch calls come to us (dispatch sites only)."""
        if self._spec.site.dispatch:
            inner = self.inner if self.inner is not None else type(self.original).__new__(type(self.original))
            inner.__dict__.update(self.original.__dict__)
            inner._attention_backend = _LiteBackend(self, getattr(self.original, "_attention_backend", None))
            self.inner = inner

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self._handle._enabled:
            return self.original(attn, *args, **kwargs)
        # Joint attention: the processor concatenates these text tokens with the video tokens.
        if "encoder_hidden_states" in kwargs:
            text = kwargs["encoder_hidden_states"]
        else:
            text = args[self._text_position] if len(args) > self._text_position else None
        self._text_tokens = 0 if text is None else text.shape[1]
        if self._spec.site.dispatch:
            return self.inner(attn, *args, **kwargs)
        with _SDPAMode(self):
            return self.original(attn, *args, **kwargs)

    def _dispatch(self, original: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._attend(*_dispatch_call(*args, **kwargs))
        return original(*args, **kwargs) if out is None else out

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        plain: bool,
        parallel: Any,
    ) -> torch.Tensor | None:
        """LiteAttention's answer to one intercepted call (q, k, v: (B, S, H, D)), or None to let the
        model's own attention function answer it."""
        if not plain:
            self._handle._decline("dropout, causal masking, GQA or attention kwargs")
            return None
        context_parallel = None if parallel is None else parallel.context_parallel_config
        if context_parallel is not None and context_parallel._world_size > 1:
            if mask is not None:
                self._handle._decline("an attention mask under context parallelism")
                return None
            return self._context_parallel(q, k, v, scale, parallel)
        batch, seq_q, heads, _ = q.shape
        seq_k = k.shape[1]
        valid = seq_k if mask is None else _valid_key_prefix(mask, batch, heads, seq_q, seq_k)
        if valid is None:
            self._handle._decline("an attention mask other than a batch-uniform key-padding mask hiding a tail of keys")
            return None
        must_do = None
        text_tokens = self._text_tokens
        if text_tokens:  # the text keys that are not padding
            start = 0 if self._spec.text_first else seq_k - text_tokens
            end = min(start + text_tokens, valid)
            must_do = (start, end) if end > start else None
        if valid < seq_k:
            # Padding keys are dropped rather than passed as must_skip: must_skip only skips whole
            # k-tiles, so a padding tail that starts inside a tile would still be attended to.
            k, v = k[:, :valid], v[:, :valid]
        if self._handle._interceptors:
            return self._handle._run(self.layer, q, k, v, scale=scale, must_do=must_do)
        return self._run_lite(q, k, v, scale=scale, must_do=must_do)[0]

    def _run_lite(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        must_do: tuple[int, int] | None = None,
        shard: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The op on this layer's live mask number ``shard``; (output, LSE (B, H, Sq))."""
        live = self.live
        batch, seq_q, heads, head_dim = q.shape
        seq_k = k.shape[1]
        if self._handle._profile is not None:
            # Per layer when eager. Compiled, once per shape and against every layer's: one block
            # compiled for all layers would otherwise guard, and recompile, on the layer index.
            layer = None if torch.compiler.is_compiling() else self.layer
            self._handle._profile.check_call(layer, seq_q, seq_k, heads, head_dim)
        default_m, default_n = default_block_sizes(head_dim)
        block_m = self._tiles[0] or default_m
        block_n = self._tiles[1] or default_n
        geometry = TileGeometry(seq_q, seq_k, block_m, block_n)
        shape = geometry.mask_shape(batch, heads)
        # A first call, or new shapes: a fresh mask (shapes are static to the compiler, so this runs
        # while tracing, once per shape).
        if shard == len(live.bits):
            live.bits.append(ops.state_zeros(list(shape), torch.int32, q.device))
            live.geometry.append(geometry)
        elif live.geometry[shard] != geometry or live.bits[shard].shape != shape or live.bits[shard].device != q.device:
            old, built = live.bits[shard], live.geometry[shard]
            if not torch.compiler.is_compiling() and (self._handle._live[0], self.layer) in self._handle._records:
                # Mid-generation (the layer has run at an earlier step): say that its marks are lost.
                # The stats keep the steps before. Not while tracing: what the handle has recorded
                # would become a guard of the graph.
                warnings.warn(
                    "LiteAttention: rebuilding the skip state, state was built for batch, heads "
                    f"{tuple(old.shape[:2])}, seq_q, seq_k {(built.seq_q, built.seq_k)} on {old.device} (inputs have "
                    f"{(batch, heads)}, {(seq_q, seq_k)} on {q.device})",
                    stacklevel=2,
                )
            live.bits[shard] = ops.state_zeros(list(shape), torch.int32, q.device)
            live.geometry[shard] = geometry
        if live.counts is None:
            live.counts = ops.state_zeros([ops.COUNTS], torch.int64, q.device)
        elif live.counts.device != q.device:
            live.counts = live.counts.to(q.device)  # the counts of the current step so far, kept
        ranges = [] if must_do is None else [must_do[0], must_do[1]]
        return torch.ops.liteattention.attention(
            q, k, v, live.bits[shard], live.counts, live.threshold, ranges, [], scale, block_m, block_n, "auto",
            self._handle._quant,
        )

    def _context_parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, parallel: Any):
        """diffusers' context-parallel attention (Ulysses, ring or both) with LiteAttention as the forward op:
        the i-th call of one attention call (the i-th key/value shard the ring visits) uses mask i."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        config = parallel.context_parallel_config
        self._ring = (config._ring_local_rank, config.ring_degree) if config.ring_degree > 1 else None
        calls = itertools.count()

        def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                       _save_ctx=True, _parallel_config=None):
            out, lse = self._run_lite(query, key, value, scale=scale, shard=next(calls))
            return (out, lse.transpose(1, 2)) if return_lse else out  # diffusers' LSE layout: (B, S, H)

        return _templated_context_parallel_attention(
            q, k, v, None, 0.0, False, scale, False, False,
            forward_op=forward_op, backward_op=_no_backward, _parallel_config=parallel,
        )

    def masks(self, bits: list[torch.Tensor]) -> torch.Tensor:
        """This layer's mask from its per-shard ``bits``: bool (B, H, Qt, Kt); under ring attention, the
        key/value shards' k-tiles side by side in key order (this rank's query rows of the full matrix)."""
        parts = [unpack_bits(b, g.k_tiles) for b, g in zip(bits, self.live.geometry, strict=True)]
        if self._ring is not None and len(parts) == self._ring[1]:
            rank, size = self._ring  # the ring visits shard (rank + i) % size at call i
            parts = [parts[(j - rank) % size] for j in range(size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _no_backward(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("LiteAttention is forward-only (inference)")


@functools.cache
def _processor_type(original_type: type) -> type[LiteAttentionProcessor]:
    """A LiteAttentionProcessor subclass whose ``__call__`` advertises ``original_type``'s signature.

    diffusers' ``Attention.forward`` drops keyword arguments the processor's signature does not name
    (e.g. ``image_rotary_emb``), so the wrapper must look like the processor it wraps.
    """

    def __call__(self: LiteAttentionProcessor, *args: Any, **kwargs: Any) -> Any:
        return LiteAttentionProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(original_type.__call__)
    return type(f"Lite{original_type.__name__}", (LiteAttentionProcessor,), {"__call__": __call__})


# --------------------------------------------------------------------------------------------------
# Step and branch tracking, and the handle
# --------------------------------------------------------------------------------------------------


@dataclass
class _Clock:
    """Denoising step and CFG branch of the current transformer call."""

    step: int = 0
    branch: int = 0
    last: float | None = None  # timestep of the previous bare call
    names: dict[str, int] = field(default_factory=dict)  # cache-context name -> branch
    entries: dict[str, int] = field(default_factory=dict)  # cache-context name -> calls under it
    started: bool = False  # a call has been seen in this generation
    ended: bool = False  # the pipeline reset its hooks: the next call starts a new generation

    def tick(self, timestep: float) -> bool:
        """Advance to a bare call at ``timestep``; returns True when it starts a new generation."""
        new = self.ended or self.last is None or timestep > self.last
        if new:
            self._restart()
        elif timestep == self.last:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self.last = timestep
        return new

    def enter(self, name: str, step_index: int | None) -> bool:
        """Advance to a call under the cache context ``name``; returns True when it starts a new generation."""
        step = self.entries.get(name, 0) if step_index is None else step_index
        new = self.ended or not self.started or step < self.step
        if new:
            self._restart()
            step = 0 if step_index is None else step_index
        self.branch = self.names.setdefault(name, len(self.names))
        self.entries[name] = self.entries.get(name, 0) + 1
        self.step = step
        self.last = None
        return new

    def _restart(self) -> None:
        self.step = self.branch = 0
        self.names.clear()
        self.entries.clear()
        self.started, self.ended = True, False


class _ContextWatcher(StateManager):
    """Learns of the pipeline's ``transformer.cache_context(...)`` (diffusers sets the context on the
    state managers of the stateful hooks registered on the model)."""

    def __init__(self, handle: LiteAttentionHandle) -> None:
        super().__init__(BaseState)
        self._handle = weakref.ref(handle)

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        handle = self._handle()
        if handle is not None:
            handle._on_context(context)


class _StepHook(ModelHook):
    """Registered on the transformer: pipelines' cache contexts and hook resets reach the handle through
    it, and bare calls (no cache context) tick the clock with their timestep before the forward runs, in
    the same frame as the forward (one graph when the whole transformer is compiled)."""

    _is_stateful = True

    def __init__(self, handle: LiteAttentionHandle, timestep_index: int) -> None:
        super().__init__()
        self.contexts = _ContextWatcher(handle)
        self._timestep_index = timestep_index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        handle = self.contexts._handle()
        if handle is None:
            return args, kwargs
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        else:
            timestep = args[self._timestep_index] if len(args) > self._timestep_index else None
        if not handle._in_context:
            handle._on_bare_call(timestep)
        if handle._profile is not None:
            # A profile checks each step's timestep against its own (another step count or scheduler).
            timestep = _timestep_tensor(timestep)
            if torch.compiler.is_compiling():  # the value is on the device: read at run time, in an op
                torch.ops.liteattention.profile_timestep(timestep, handle._id, handle._live_tensors()[2])
            else:
                handle._profile.check_timestep(handle._clock.step, float(timestep.max()))
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Pipelines reset their hooks at the end of each call: the next call is a new generation.
        # The masks and stats stay readable until then.
        handle = self.contexts._handle()
        if handle is not None:
            handle._clock.ended = True
        return module


def _timestep_tensor(timestep: Any) -> torch.Tensor:
    """``timestep`` (a number, or a tensor, array or list of numbers) as a tensor, or a TypeError naming
    it (missing, None, a string, an empty tensor...). Types and sizes only, known while the compiler
    traces the call, so the check costs no graph break; the value is read later."""
    if isinstance(timestep, torch.Tensor):
        tensor = timestep
    elif timestep is None or isinstance(timestep, (str, bytes)):
        tensor = None
    elif torch.compiler.is_compiling():
        tensor = torch.as_tensor(timestep)  # a number or a list of numbers: a constant of the graph
    else:
        try:
            tensor = torch.as_tensor(timestep)
        except (TypeError, ValueError, RuntimeError):  # an object, a ragged list...
            tensor = None
    if tensor is None or tensor.numel() == 0 or tensor.is_complex():
        raise TypeError(
            "timestep: expected a number or a tensor of numbers (LiteAttention counts denoising steps from it), "
            f"got {timestep!r}"
        )
    return tensor


_HANDLES: weakref.WeakValueDictionary[int, LiteAttentionHandle] = weakref.WeakValueDictionary()
_handle_ids = itertools.count()


@torch.library.custom_op(
    "liteattention::timestep_clock", mutates_args=("bits", "counts", "thresholds"), tags=ops.HOST_OP_TAGS,
)
def _timestep_clock(
    timestep: torch.Tensor, handle: int, bits: list[torch.Tensor], counts: list[torch.Tensor], thresholds: list[torch.Tensor]
) -> None:
    """The timestep rule for a bare call of a compiled transformer, at run time: advances the clock of
    handle ``handle`` and updates its layers' live tensors (given in the order of ``_live_tensors``)."""
    _HANDLES[handle]._tick(float(timestep.max()), bits, counts, thresholds)


@_timestep_clock.register_fake
def _(timestep, handle, bits, counts, thresholds) -> None:
    return None


@torch.library.custom_op("liteattention::profile_timestep", mutates_args=("thresholds",), tags=ops.HOST_OP_TAGS)
def _profile_timestep(timestep: torch.Tensor, handle: int, thresholds: list[torch.Tensor]) -> None:
    """A profile's timestep check for a compiled transformer, at run time. ``thresholds`` (the
    layers' live thresholds, left as they are) is declared mutated so that the compiler keeps, and
    orders after the clock, a call that returns nothing."""
    owner = _HANDLES[handle]
    owner._profile.check_timestep(owner._clock.step, float(timestep.max()))


@_profile_timestep.register_fake
def _(timestep, handle, thresholds) -> None:
    return None


class LiteAttentionHandle:
    """Controls LiteAttention on a patched transformer; returned by :func:`apply_lite_attention`.

    Usable as a context manager: leaving the ``with`` block calls :meth:`remove`.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        spec: _ModelSpec,
        modules: list[tuple[str, torch.nn.Module]],
        thresholds: dict[int, ThresholdLike],
        block_m: int | None,
        block_n: int | None,
        profile: Any = None,
        quant: Quant | None = None,
    ) -> None:
        check_quant(quant)
        self._quant = quant
        self._profile = profile  # a calibration Profile: thresholds per (branch, step, layer); checks calls
        timestep_index = list(inspect.signature(transformer.forward).parameters).index("timestep")
        self.layer_names: tuple[str, ...] = tuple(name for name, _ in modules)
        """Qualified names of all self-attention layers of the model; a layer's index is its id."""
        self.layers: tuple[int, ...] = tuple(thresholds)
        """Ids of the patched layers."""
        check_block_sizes(block_m, block_n)
        self._tiles = (block_m, block_n)
        self._schedules = {layer: ThresholdSchedule(threshold) for layer, threshold in thresholds.items()}
        self._clock = _Clock()
        self._enabled = True
        self._in_context = False  # a pipeline's cache context is active: it drives the clock
        self._warned: set[str] = set()
        self._interceptors: list[AttentionWrapper] = []
        # The live branch's masks are in the processors; the other branches' wait here.
        self._live = (0, 0)  # (branch, step) the live tensors belong to
        self._branches = 1
        self._stores: dict[int, dict[int, list[torch.Tensor]]] = {}  # branch -> layer -> masks per shard
        self._records: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (branch, layer) -> step -> counts
        self._processors: dict[int, LiteAttentionProcessor] = {}
        self._installed: list[tuple[torch.nn.Module, LiteAttentionProcessor]] = []
        self._trampoline_modules: list[str] = []
        for layer in self.layers:
            module = modules[layer][1]
            processor = _processor_type(type(module.processor))(module.processor, self, layer, spec)
            self._processors[layer] = processor
            self._installed.append((module, processor))
            if spec.site.dispatch:
                name = type(module.processor).__call__.__module__  # the globals the processor reads
                _install_trampoline(name)
                self._trampoline_modules.append(name)
            module.set_processor(processor)
        self._id = next(_handle_ids)
        _HANDLES[self._id] = self
        self._transformer = weakref.ref(transformer)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_StepHook(self, timestep_index), _HOOK_NAME)

    @property
    def enabled(self) -> bool:
        """Whether patched layers run LiteAttention; when False they run the original processors."""
        return self._enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        """Run the original processors (dense, no state touched); steps are still tracked."""
        self._enabled = False

    @property
    def step(self) -> int:
        """Denoising step index of the current (or last) transformer call."""
        return self._clock.step

    @property
    def branch(self) -> int:
        """CFG branch of the current (or last) transformer call."""
        return self._clock.branch

    def reset(self) -> None:
        """Start a new generation: empty masks, no stats, step counting restarts."""
        self._clock = _Clock()
        self._clear()
        for processor in self._processors.values():
            for bits in processor.live.bits:
                bits.zero_()
            if processor.live.counts is not None:
                processor.live.counts.zero_()

    def remove(self) -> None:
        """Put the original processors back (the same objects) and stop tracking steps. Idempotent."""
        for module, processor in self._installed:
            if module.processor is processor:  # leave alone a processor the user has set since
                module.set_processor(processor.original)
        self._installed = []
        for name in self._trampoline_modules:
            _remove_trampoline(name)
        self._trampoline_modules = []
        transformer = self._transformer()
        if transformer is not None and hasattr(transformer, "_diffusers_hook"):
            transformer._diffusers_hook.remove_hook(_HOOK_NAME, recurse=False)

    def stats(self) -> dict[int, dict[int, list[float]]]:
        """Skipped-tile fraction ``{branch: {layer: [sparsity per step]}}`` of the current generation.

        A step at which the layer ran dense (handle disabled, or a dense fallback) holds NaN, and so do
        steps older than a layer's last ``HISTORY_SIZE`` (1024). Under context parallelism: of this rank's
        share of the tiles.
        """
        live_branch, live_step = self._live
        for layer, processor in self._processors.items():
            if processor.live.counts is not None:
                self._flush(live_branch, live_step, layer, processor.live.counts)
        keys = [(key, step) for key, steps in sorted(self._records.items()) for step in steps]
        if not keys:
            return {}
        values = torch.stack([self._records[key][step].cpu() for key, step in keys]).tolist()  # one sync
        out: dict[int, dict[int, list[float]]] = {}
        for ((branch, layer), step), (computed, _, _, total) in zip(keys, values, strict=True):
            row = out.setdefault(branch, {}).setdefault(layer, [math.nan] * (self._clock.step + 1))
            if step < len(row) and total:
                row[step] = 1.0 - computed / total
        return out

    def masks(self, branch: int = 0) -> dict[int, torch.Tensor]:
        """Skip masks ``{layer: bool (B, H, Qt, Kt)}`` of one CFG branch; True = skipped from now on.

        Under context parallelism, this rank's part: its heads (Ulysses), its query rows with all keys (ring).
        """
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self._branches:
            raise ValueError(f"branch: expected an int in [0, {self._branches}), got {branch!r}")
        out = {}
        for layer, processor in self._processors.items():
            bits = processor.live.bits if branch == self._live[0] else self._stores.get(branch, {}).get(layer)
            if bits:
                out[layer] = processor.masks(bits)
        return out

    def set_masks(self, masks: Mapping[int, torch.Tensor]) -> None:
        """Replace the live CFG branch's skip masks: ``{layer: bool (B, H, Qt, Kt)}``, True = skipped
        (the inverse of :meth:`masks`), for benchmarks and experiments. The layers must have run once
        (that sizes their masks); not under ring attention, whose masks are split by key shard."""
        for layer, mask in masks.items():
            processor = self._processors.get(layer)
            current = None if processor is None or len(processor.live.bits) != 1 else processor.masks(processor.live.bits)
            if current is None or current.shape != mask.shape or mask.dtype != torch.bool:
                found = "no mask" if current is None else f"bool {tuple(current.shape)}"
                raise ValueError(f"masks[{layer}]: layer {layer} has {found}, got {mask.dtype} {tuple(mask.shape)}")
        for layer, mask in masks.items():
            (bits,) = self._processors[layer].live.bits
            bits.copy_(pack_bits(mask.to(bits.device)))

    def __enter__(self) -> LiteAttentionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def intercept(self, wrapper: AttentionWrapper) -> Iterator[None]:
        """Route every patched layer's attention call through ``wrapper(run, layer, q, k, v, **kwargs)``
        inside the ``with`` block; ``run`` (same arguments) is the LiteAttention call it stands in for.
        q, k, v are (B, S, H, D), after the model's projections and RoPE. For timing and probing (not
        under context parallelism); interceptors nest, the latest outermost."""
        self._interceptors.append(wrapper)
        try:
            yield
        finally:
            self._interceptors.remove(wrapper)

    # -- internals ---------------------------------------------------------------------------------

    def _clear(self) -> None:
        self._stores.clear()
        self._records.clear()
        self._live = (0, 0)
        self._branches = 1

    def _on_bare_call(self, timestep: Any) -> None:
        """The timestep rule, for a transformer call outside any cache context."""
        timestep = _timestep_tensor(timestep)
        if torch.compiler.is_compiling():
            # The timestep's value is on the device: read it at run time, inside an op.
            torch.ops.liteattention.timestep_clock(timestep, self._id, *self._live_tensors())
        else:
            self._tick(float(timestep.max()), *self._live_tensors())

    def _on_context(self, context: Any) -> None:
        if context is None:
            self._in_context = False
            return
        self._in_context = True
        new = self._clock.enter(context.name, context.step_index)
        self._switch(new, *self._live_tensors())

    def _tick(self, timestep: float, bits: list[torch.Tensor], counts: list[torch.Tensor], thresholds: list[torch.Tensor]) -> None:
        self._switch(self._clock.tick(timestep), bits, counts, thresholds)

    def _live_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's live masks, counters and threshold, flat, in layer order."""
        lives = [processor.live for processor in self._processors.values()]
        bits = [b for live in lives for b in live.bits]
        counts = [live.counts for live in lives if live.counts is not None]
        return bits, counts, [live.threshold for live in lives]

    def _switch(
        self, new: bool, bits: list[torch.Tensor], counts: list[torch.Tensor], thresholds: list[torch.Tensor]
    ) -> None:
        """Make the live tensors (given as ``_live_tensors`` lists them) serve the clock's (branch, step):
        file the finished call's counts, swap masks between branches, set the step's thresholds."""
        branch, step = self._clock.branch, self._clock.step
        live_branch, live_step = self._live
        bits_iter, counts_iter = iter(bits), iter(counts)
        for (layer, processor), threshold in zip(self._processors.items(), thresholds, strict=True):
            masks = [next(bits_iter) for _ in processor.live.bits]
            if processor.live.counts is not None:
                self._flush(live_branch, live_step, layer, next(counts_iter))
            if new:
                for mask in masks:
                    mask.zero_()
            elif branch != live_branch and masks:
                stored = self._stores.setdefault(live_branch, {}).get(layer)
                if stored is not None and [s.shape for s in stored] == [m.shape for m in masks]:
                    for s, m in zip(stored, masks):
                        s.copy_(m)
                else:
                    self._stores[live_branch][layer] = [m.clone() for m in masks]
                wanted = self._stores.get(branch, {}).get(layer)
                if wanted is not None and [w.shape for w in wanted] == [m.shape for m in masks]:
                    for w, m in zip(wanted, masks):
                        m.copy_(w)
                else:  # a branch's first call (or new shapes): an empty mask
                    for m in masks:
                        m.zero_()
            threshold.fill_(self._threshold(branch, step, layer))
        if new:
            self._clear()
        self._live = (branch, step)
        self._branches = max(self._branches, branch + 1)

    def _threshold(self, branch: int, step: int, layer: int) -> float:
        """The threshold of ``layer`` at (``branch``, ``step``): the profile's, else the layer's schedule."""
        profile = self._profile
        if profile is None:
            return self._schedules[layer](step)
        if branch >= profile.branches:
            from ..calibration.profile import ProfileError

            raise ProfileError(
                f"the profile was made for {profile.branches} CFG branches; this generation has branch {branch + 1}"
            )
        return profile.step_function(branch, layer)(step)

    def _flush(self, branch: int, step: int, layer: int, counts: torch.Tensor) -> None:
        """File a layer's counters under (branch, step) and zero them for the next call."""
        steps = self._records.setdefault((branch, layer), {})
        steps[step] = counts.clone() if step not in steps else steps[step] + counts
        counts.zero_()
        if len(steps) > HISTORY_SIZE:  # bounded like a SkipState's history: the oldest step goes
            del steps[next(iter(steps))]

    def _run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        run: Callable[..., torch.Tensor] = self._run_lite
        for wrapper in self._interceptors:
            run = functools.partial(wrapper, run)
        return run(layer, q, k, v, **kwargs)

    def _run_lite(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._processors[layer]._run_lite(q, k, v, **kwargs)[0]

    def _decline(self, reason: str) -> None:
        """Warn once per reason that a call runs the model's own attention function instead."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"LiteAttention runs the model's dense attention for calls with {reason} (warned once)", stacklevel=2
            )


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def apply_lite_attention(
    transformer: torch.nn.Module,
    threshold: ThresholdLike = -10.0,
    *,
    layers: LayerSelection | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    profile: Any = None,
    quant: Quant | None = None,
) -> LiteAttentionHandle:
    """Swap the self-attention of ``transformer``'s blocks for LiteAttention, each layer with its own state.

    Args:
        transformer: a ``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``,
            ``HunyuanVideoTransformer3DModel`` or ``CogVideoXTransformer3DModel``.
        threshold: per-step threshold (log2 units; -inf never marks) for every patched layer: a float,
            a sequence indexed by step, a callable ``step -> float`` or a ``ThresholdSchedule``.
        layers: which self-attention layers to patch, by index into ``handle.layer_names``
            (HunyuanVideo: dual-stream blocks first, then single-stream). None: all, with ``threshold``;
            an iterable of indices: those, with ``threshold``; a mapping ``index -> threshold``: those,
            each with its own; a callable ``index -> threshold or None``: per-layer thresholds, None
            leaving that layer unpatched.
        block_m, block_n: tile sizes for LiteAttention (None: its defaults).
        profile: a calibration profile (``liteattention.calibration.Profile`` or the path of its
            file) giving every layer a threshold per CFG branch and step; replaces ``threshold`` and
            ``layers``. It is refused, naming what differs, for another model class, layer count or
            tile size, and during generation for another attention shape, step count or timesteps.
        quant: ``"qk_int8_pv_fp8"`` runs the 8-bit path (``liteattention.quantize``; Ada or Hopper
            GPUs), None the 16-bit one.

    Returns:
        A :class:`LiteAttentionHandle`.
    """
    spec = model_spec(transformer)
    if isinstance(threshold, Mapping):
        raise TypeError(
            "threshold: expected a float, a per-step sequence, a callable or a ThresholdSchedule; "
            "pass per-layer thresholds as layers={index: threshold}"
        )
    modules = [
        (f"{blocks}.{i}.{attr}", getattr(block, attr))
        for blocks, attr in spec.blocks
        for i, block in enumerate(getattr(transformer, blocks))
    ]
    for name, module in modules:
        if isinstance(module.processor, LiteAttentionProcessor):
            raise ValueError(f"LiteAttention is already applied to this transformer ({name}); remove() it first")
        if not isinstance(module.processor, spec.processors):
            expected = " or ".join(p.__name__ for p in spec.processors)
            raise ValueError(
                f"{name} uses {type(module.processor).__name__}; LiteAttention wraps the model's own processor "
                f"({expected})"
            )
    if profile is not None:
        from ..calibration.profile import Profile, load_profile

        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        if layers is not None:
            raise TypeError("layers: a profile sets every layer's thresholds; pass profile or layers, not both")
        profile.check(model=type(transformer).__name__, layers=len(modules), block_m=block_m, block_n=block_n)
        block_m, block_n = profile.block_m, profile.block_n
    thresholds = _select_layers(layers, threshold, len(modules))
    return LiteAttentionHandle(transformer, spec, modules, thresholds, block_m, block_n, profile, quant)


def _select_layers(layers: LayerSelection | None, threshold: ThresholdLike, count: int) -> dict[int, ThresholdLike]:
    if layers is None:
        chosen = dict.fromkeys(range(count), threshold)
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    elif callable(layers):
        chosen = {i: t for i in range(count) if (t := layers(i)) is not None}
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        chosen = dict.fromkeys(layers, threshold)
    else:
        raise TypeError(
            "layers: expected None, an iterable of layer indices, a mapping index -> threshold or a callable "
            f"index -> threshold | None; got {type(layers).__name__}"
        )
    for index in chosen:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layers: layer indices must be ints, got {index!r}")
        if not 0 <= index < count:
            raise ValueError(f"layers: index {index} is out of range for {count} self-attention layers")
    return dict(sorted(chosen.items()))
