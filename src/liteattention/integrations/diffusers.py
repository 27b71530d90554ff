"""LiteAttention for diffusers video transformers (written against diffusers 0.42).

``apply_lite_attention(transformer, threshold)`` replaces the self-attention processor of every
transformer block with a thin wrapper: the wrapper runs the model's own processor (projections, norms,
RoPE, output split all stay the model's code) and intercepts only its attention call, which it routes to
a :class:`~liteattention.LiteAttention` holding that layer's skip mask. Cross-attention (text -> video)
and the text-only token refiner of HunyuanVideo stay dense and untouched.

Supported: ``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``,
``HunyuanVideoTransformer3DModel`` and ``CogVideoXTransformer3DModel``.

Joint attention. HunyuanVideo (dual- and single-stream blocks) and CogVideoX attend over one sequence of
video and text tokens; CogVideoX puts the text first, HunyuanVideo appends it after the video. The text
keys are passed as ``must_do``, so only video-to-video tiles can be skipped.

Attention masks are honoured, never dropped. A key-padding mask that hides a contiguous tail of keys,
identically for the whole batch (HunyuanVideo's text padding), is applied by leaving those keys out of
the call (exact; they are never computed). Any other mask, and any call with dropout, causal masking,
GQA, context parallelism or extra attention kwargs, runs the model's own attention function for that
call, with a one-time warning per reason.

Step and branch rules. The threshold schedule is indexed by the denoising step, derived from the
``timestep`` each forward call of the transformer receives (per-token timesteps, as in Wan 2.2 TI2V,
are reduced to their maximum):

* The step index is the number of distinct timesteps seen before the current one since the generation
  started, so the first step is 0. It is counted per transformer (each expert of Wan 2.2 A14B counts
  its own steps).
* A call with the same timestep as the previous call is the next classifier-free-guidance branch of
  the same step: the k-th call at a timestep is branch k (pipelines call cond first, then uncond), and
  every branch has its own LiteAttention, hence its own mask, per layer. A CFG batch doubled into one
  call needs nothing: the mask is per batch element.
* A lower timestep starts the next step at branch 0.
* A higher timestep starts a new generation (this includes a repeat of the first timestep once steps
  have passed, since schedules decrease): every mask is emptied, the stats are cleared and the step
  index restarts at 0. ``handle.reset()`` does the same explicitly; call it between generations that
  cannot be told apart this way (e.g. single-step ones).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTransformer3DModel,
)
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from torch.overrides import TorchFunctionMode

from ..attention import LiteAttention
from ..state import SkipState
from ..schedule import ThresholdLike

__all__ = ["LiteAttentionHandle", "LiteAttentionProcessor", "apply_lite_attention"]

AttentionWrapper = Callable[..., torch.Tensor]
"""``wrapper(run, layer, q, k, v, **kwargs) -> output`` (see ``LiteAttentionHandle.intercept``)."""

LayerSelection = Iterable[int] | Mapping[int, ThresholdLike] | Callable[[int], ThresholdLike | None]
"""Which self-attention layers to patch, optionally with a threshold each (see ``apply_lite_attention``)."""

# (q, k, v, attn_mask, scale, plain) -> output, or None to run the original function. q, k, v and the
# output are (B, S, H, D); ``plain`` is False for calls with dropout, causal masking, GQA, context
# parallelism or extra attention kwargs.
_Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float | None, bool], torch.Tensor | None
]


# --------------------------------------------------------------------------------------------------
# Interception of the processors' attention call
# --------------------------------------------------------------------------------------------------

# The attention hook of the processor call in flight in this thread/context (None: pass through).
_ACTIVE: ContextVar[Callable[..., torch.Tensor] | None] = ContextVar("liteattention_active", default=None)
_patch_lock = threading.Lock()
_patch_depth: dict[str, int] = {}  # module name -> processor calls in flight that need its trampoline
_patch_original: dict[str, Callable[..., torch.Tensor]] = {}


@contextmanager
def _rebind_dispatch(module_name: str, hook: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Route this context's ``dispatch_attention_fn`` calls in ``module_name`` to ``hook``.

    The Wan/LTX/HunyuanVideo processors look ``dispatch_attention_fn`` up in their module's globals at
    call time, and diffusers' backend registry is keyed by a closed enum (no custom backend can be
    registered), so rebinding that global for the duration of the call is the one hook short of copying
    the processors. The rebinding is reference-counted under a lock, so concurrent calls share one
    trampoline and the last one out restores the original; the trampoline reads a ContextVar, so other
    threads and every other caller in the module go straight to the original function.
    """
    module = sys.modules[module_name]
    with _patch_lock:
        if _patch_depth.get(module_name, 0) == 0:
            original = _patch_original[module_name] = module.dispatch_attention_fn
            module.dispatch_attention_fn = _trampoline(original)
        _patch_depth[module_name] = _patch_depth.get(module_name, 0) + 1
    token = _ACTIVE.set(hook)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with _patch_lock:
            _patch_depth[module_name] -= 1
            if _patch_depth[module_name] == 0:
                module.dispatch_attention_fn = _patch_original.pop(module_name)


def _trampoline(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def dispatch_attention_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        hook = _ACTIVE.get()
        return original(*args, **kwargs) if hook is None else hook(original, *args, **kwargs)

    return dispatch_attention_fn


class _SDPAMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to ``hook`` inside a ``with`` block.

    CogVideoX's processor calls torch's SDPA directly; a torch-function mode is torch's own
    thread-local, scoped hook for that, so nothing global (``torch.nn.functional``) is rebound.
    """

    def __init__(self, hook: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self._hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._hook(func, *args, **kwargs)
        return func(*args, **kwargs)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Signature of ``F.scaled_dot_product_attention`` (a builtin, which ``inspect`` cannot read)."""


@dataclass(frozen=True)
class _Site:
    """An attention function the model's processors call, and how to intercept it."""

    signature: inspect.Signature
    heads_first: bool  # (B, H, S, D) like SDPA; else (B, S, H, D) like dispatch_attention_fn and LiteAttention
    intercept: Callable[[type, Callable[..., torch.Tensor]], AbstractContextManager[None]]

    def call(self, attend: _Attend, original: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run an intercepted call through ``attend``, or ``original`` where ``attend`` declines (None)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        rest = dict(bound.arguments)
        q, k, v, mask, scale = (rest.pop(name) for name in ("query", "key", "value", "attn_mask", "scale"))
        rest.pop("backend", None)  # the backend is what LiteAttention replaces
        plain = all(value == self.signature.parameters[name].default for name, value in rest.items())
        if self.heads_first:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = attend(q, k, v, mask, scale, plain)
        if out is None:
            return original(*args, **kwargs)
        return out.transpose(1, 2) if self.heads_first else out


def _intercept_dispatch(processor_type: type, hook: Callable[..., torch.Tensor]) -> AbstractContextManager[None]:
    # The module whose globals the processor's __call__ reads (not type.__module__: a subclass may live elsewhere).
    return _rebind_dispatch(processor_type.__call__.__module__, hook)


def _intercept_sdpa(processor_type: type, hook: Callable[..., torch.Tensor]) -> AbstractContextManager[None]:
    return _SDPAMode(hook)


_DISPATCH = _Site(inspect.signature(dispatch_attention_fn), False, _intercept_dispatch)
_SDPA = _Site(inspect.signature(_sdpa), True, _intercept_sdpa)


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
# Processor wrapper and handle
# --------------------------------------------------------------------------------------------------


def _forward_to_original(name: str) -> property:
    # diffusers configures processors by setting these attributes (set_attention_backend,
    # enable_parallelism); they belong to the original processor, which runs the dense paths.
    return property(lambda self: getattr(self.original, name), lambda self, value: setattr(self.original, name, value))


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
        self._signature = inspect.signature(original.__call__)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self._handle.enabled:
            return self.original(attn, *args, **kwargs)
        # Joint attention: the processor concatenates these text tokens with the video tokens.
        text = self._signature.bind(attn, *args, **kwargs).arguments.get("encoder_hidden_states")
        attend = functools.partial(self._attend, 0 if text is None else text.shape[1])
        site = self._spec.site
        with site.intercept(type(self.original), functools.partial(site.call, attend)):
            return self.original(attn, *args, **kwargs)

    def _attend(
        self,
        text_tokens: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        plain: bool,
    ) -> torch.Tensor | None:
        if not plain:
            self._handle._decline("dropout, causal masking, GQA, context parallelism or attention kwargs")
            return None
        batch, seq_q, heads, _ = q.shape
        seq_k = k.shape[1]
        valid = seq_k if mask is None else _valid_key_prefix(mask, batch, heads, seq_q, seq_k)
        if valid is None:
            self._handle._decline("an attention mask other than a batch-uniform key-padding mask hiding a tail of keys")
            return None
        must_do = None
        if text_tokens:  # the text keys that are not padding
            start = 0 if self._spec.text_first else seq_k - text_tokens
            end = min(start + text_tokens, valid)
            must_do = (start, end) if end > start else None
        # Padding keys are dropped rather than passed as must_skip: must_skip only skips whole
        # k-tiles, so a padding tail that starts inside a tile would still be attended to.
        return self._handle._run(self.layer, q, k[:, :valid], v[:, :valid], scale=scale, must_do=must_do)


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


@dataclass
class _Clock:
    """Denoising step and CFG branch, derived from the timesteps the transformer receives."""

    step: int = 0
    branch: int = 0
    last: float | None = None

    def tick(self, timestep: float) -> bool:
        """Advance to ``timestep``; returns True when it starts a new generation."""
        new = self.last is None or timestep > self.last
        if new:
            self.step = self.branch = 0
        elif timestep == self.last:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self.last = timestep
        return new


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
    ) -> None:
        timestep_index = list(inspect.signature(transformer.forward).parameters).index("timestep")
        self.layer_names: tuple[str, ...] = tuple(name for name, _ in modules)
        """Qualified names of all self-attention layers of the model; a layer's index is its id."""
        self.layers: tuple[int, ...] = tuple(thresholds)
        """Ids of the patched layers."""
        self._thresholds = thresholds
        self._tiles = {"block_m": block_m, "block_n": block_n}
        self._clock = _Clock()
        self._clear()  # builds branch 0, which validates the thresholds and tile sizes
        self._enabled = True
        self._warned: set[str] = set()
        self._interceptors: list[AttentionWrapper] = []
        self._installed: list[tuple[torch.nn.Module, LiteAttentionProcessor]] = []
        for layer in self.layers:
            module = modules[layer][1]
            processor = _processor_type(type(module.processor))(module.processor, self, layer, spec)
            self._installed.append((module, processor))
            module.set_processor(processor)
        self._hook = transformer.register_forward_pre_hook(
            functools.partial(self._on_forward, timestep_index), with_kwargs=True
        )

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

    def remove(self) -> None:
        """Put the original processors back (the same objects) and stop tracking steps. Idempotent."""
        for module, processor in self._installed:
            if module.processor is processor:  # leave alone a processor the user has set since
                module.set_processor(processor.original)
        self._installed = []
        self._hook.remove()

    def stats(self) -> dict[int, dict[int, list[float]]]:
        """Skipped-tile fraction ``{branch: {layer: [sparsity per step]}}`` of the current generation.

        A step at which the layer ran dense (handle disabled, or a dense fallback) holds NaN, and
        so do steps older than the last ``HISTORY_SIZE`` (1024) calls of a layer's state.
        """
        out: dict[int, dict[int, list[float]]] = {}
        for (branch, layer), steps in sorted(self._steps.items()):
            row = [math.nan] * (self._clock.step + 1)
            current = _sparsity(steps, self._ops[branch][layer].state)
            for step, sparsity in {**self._rebuilt.get((branch, layer), {}), **current}.items():
                row[step] = sparsity
            out.setdefault(branch, {})[layer] = row
        return out

    def masks(self, branch: int = 0) -> dict[int, torch.Tensor]:
        """Skip masks ``{layer: bool (B, H, Qt, Kt)}`` of one CFG branch; True = skipped from now on."""
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < len(self._ops):
            raise ValueError(f"branch: expected an int in [0, {len(self._ops)}), got {branch!r}")
        return {layer: mask for layer, op in self._ops[branch].items() if (mask := op.mask()) is not None}

    def __enter__(self) -> LiteAttentionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _new_ops(self) -> dict[int, LiteAttention]:
        return {layer: LiteAttention(threshold, **self._tiles) for layer, threshold in self._thresholds.items()}

    def _clear(self) -> None:
        # Fresh operators rather than reset() ones: a new generation may bring new shapes (prompt length).
        self._ops: list[dict[int, LiteAttention]] = [self._new_ops()]  # per CFG branch
        self._steps: dict[tuple[int, int], list[int]] = {}  # (branch, layer) -> step of each call to its state
        # (branch, layer) -> {step: sparsity} of the calls to states that new shapes replaced since.
        self._rebuilt: dict[tuple[int, int], dict[int, float]] = {}

    def _on_forward(self, timestep_index: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        else:
            timestep = args[timestep_index] if len(args) > timestep_index else None
        try:
            value = float(torch.as_tensor(timestep).max())
        except (TypeError, ValueError, RuntimeError):  # None, a string, an empty tensor...
            raise TypeError(
                "timestep: expected a number or a tensor of numbers (LiteAttention counts denoising steps "
                f"from it), got {timestep!r}"
            ) from None
        if self._clock.tick(value):
            self._clear()
        while len(self._ops) <= self._clock.branch:
            self._ops.append(self._new_ops())

    @contextmanager
    def intercept(self, wrapper: AttentionWrapper) -> Iterator[None]:
        """Route every patched layer's attention call through ``wrapper(run, layer, q, k, v, **kwargs)``
        inside the ``with`` block; ``run`` (same arguments) is the LiteAttention call it stands in for.
        q, k, v are (B, S, H, D), after the model's projections and RoPE. For timing and probing;
        interceptors nest, the latest outermost."""
        self._interceptors.append(wrapper)
        try:
            yield
        finally:
            self._interceptors.remove(wrapper)

    def _run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        run: Callable[..., torch.Tensor] = self._run_lite
        for wrapper in self._interceptors:
            run = functools.partial(wrapper, run)
        return run(layer, q, k, v, **kwargs)

    def _run_lite(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        branch, step = self._clock.branch, self._clock.step
        op = self._ops[branch][layer]
        before = op.state
        out = op(q, k, v, step=step, **kwargs)
        key = (branch, layer)
        if before is not None and op.state is not before:
            # New shapes (a dtype change, say) replaced the layer's state: keep what the old one
            # recorded (reading it waits for the GPU, once per replacement).
            self._rebuilt[key] = {**self._rebuilt.get(key, {}), **_sparsity(self._steps[key], before)}
            self._steps[key] = []
        self._steps.setdefault(key, []).append(step)
        return out

    def _decline(self, reason: str) -> None:
        """Warn once per reason that a call runs the model's own attention function instead."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"LiteAttention runs the model's dense attention for calls with {reason} (warned once)", stacklevel=2
            )


def _sparsity(steps: list[int], state: SkipState) -> dict[int, float]:
    """{step: sparsity} of the calls ``state`` holds statistics of: the latest of ``steps``, the
    steps of every call to it (its history is a ring)."""
    history = state.history
    return {step: call.sparsity for step, call in zip(steps[len(steps) - len(history) :], history, strict=True)}


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

    Returns:
        A :class:`LiteAttentionHandle`.
    """
    spec = next((s for s in _SPECS if isinstance(transformer, s.model)), None)
    if spec is None:
        supported = ", ".join(s.model.__name__ for s in _SPECS)
        raise TypeError(f"transformer: expected one of {supported}; got {type(transformer).__name__}")
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
    thresholds = _select_layers(layers, threshold, len(modules))
    return LiteAttentionHandle(transformer, spec, modules, thresholds, block_m, block_n)


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
