"""apply_lite_attention on tiny random diffusers video transformers (CPU, reference backend)."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.attention_dispatch import dispatch_attention_fn

from liteattention.integrations import apply_lite_attention
from liteattention.integrations.diffusers import _trampolines, _valid_key_prefix

BLOCK = 16  # tile size: 128 video tokens make 8 x 8 tiles
TEXT = 16  # text tokens per prompt
HUNYUAN_VALID_TEXT = 11  # the rest is padding, masked; the 128 + 11 valid keys end inside a tile
TIMESTEPS = (999.0, 800.0, 600.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _wan(batch: int, seed: int, layers: int = 2):
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=32,
    )
    inputs = {
        "hidden_states": _randn(batch, 4, 2, 16, 16, seed=seed),
        "encoder_hidden_states": _randn(batch, TEXT, 32, seed=seed + 1),
    }
    return model, inputs


def _ltx(batch: int, seed: int):
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
        num_layers=2, caption_channels=32,
    )
    inputs = {
        "hidden_states": _randn(batch, 2 * 8 * 8, 8, seed=seed),
        "encoder_hidden_states": _randn(batch, TEXT, 32, seed=seed + 1),
        "encoder_attention_mask": torch.ones(batch, TEXT),
        "num_frames": 2, "height": 8, "width": 8,
    }
    return model, inputs


def _hunyuan(batch: int, seed: int):
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(8, 12, 12),
    )
    text_mask = torch.ones(batch, TEXT)
    text_mask[:, HUNYUAN_VALID_TEXT:] = 0
    inputs = {
        "hidden_states": _randn(batch, 4, 2, 16, 16, seed=seed),
        "encoder_hidden_states": _randn(batch, TEXT, 16, seed=seed + 1),
        "encoder_attention_mask": text_mask,
        "pooled_projections": _randn(batch, 8, seed=seed + 2),
        "guidance": torch.full((batch,), 3.0),
    }
    return model, inputs


def _cogvideox(batch: int, seed: int):
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    )
    angles = _randn(2 * 8 * 8, 32, seed=seed + 2)  # stands in for the pipeline's 3-D RoPE
    inputs = {
        "hidden_states": _randn(batch, 2, 4, 16, 16, seed=seed),
        "encoder_hidden_states": _randn(batch, TEXT, 32, seed=seed + 1),
        "image_rotary_emb": (angles.cos(), angles.sin()),
    }
    return model, inputs


BUILDERS = {"wan": _wan, "ltx": _ltx, "hunyuan": _hunyuan, "cogvideox": _cogvideox}
# Key range of the text tokens in the joint self-attention (after HunyuanVideo's padding is dropped).
TEXT_KEYS = {"hunyuan": (128, 128 + HUNYUAN_VALID_TEXT), "cogvideox": (0, TEXT)}


def build(name: str, batch: int = 1, seed: int = 0, **options):
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name](batch, seed, **options)
    return model.eval(), inputs


def forward(model: torch.nn.Module, inputs: dict, timestep: float) -> torch.Tensor:
    batch = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    with torch.no_grad():
        return model(**inputs, timestep=torch.full((batch,), timestep), return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def processors(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


@pytest.mark.parametrize("name", BUILDERS)
def test_never_marking_matches_the_model_and_remove_restores_it(name: str) -> None:
    model, inputs = build(name)
    unpatched = copy.deepcopy(model)
    before = processors(model)
    with apply_lite_attention(model, float("-inf"), block_m=BLOCK, block_n=BLOCK) as handle:
        changed = {n for n, p in processors(model).items() if p is not before[n]}
        assert changed == set(handle.layer_names)  # self-attention only; cross-attention untouched
        for t in TIMESTEPS:
            torch.testing.assert_close(forward(model, inputs, t), forward(unpatched, inputs, t))
        assert handle.stats() == {0: {layer: [0.0] * len(TIMESTEPS) for layer in handle.layers}}
    assert all(p is before[n] for n, p in processors(model).items())
    assert torch.equal(forward(model, inputs, TIMESTEPS[0]), forward(unpatched, inputs, TIMESTEPS[0]))


@pytest.mark.parametrize("name", BUILDERS)
def test_marking_skips_later_steps_and_never_the_text_keys(name: str) -> None:
    model, inputs = build(name)
    # Empty text embeddings: their keys draw little attention, so tiles of them would be marked if
    # they were not must-do.
    inputs["encoder_hidden_states"] = torch.zeros_like(inputs["encoder_hidden_states"])
    unpatched = copy.deepcopy(model)
    # Threshold 0 marks a tile whenever none of its scores reaches the running row max: on random
    # weights (near-uniform attention) that is the setting that marks tiles at all.
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    for step, t in enumerate(TIMESTEPS):
        out = forward(model, inputs, t)
        assert (handle.step, handle.branch) == (step, 0)
        assert rel_err(out, forward(unpatched, inputs, t)) < 2e-2
    sparsity = handle.stats()[0]
    assert set(sparsity) == set(handle.layers)
    for per_step in sparsity.values():
        assert per_step[0] == 0.0 and per_step[-1] > 0.0
    masks = handle.masks(0)
    assert set(masks) == set(handle.layers) and all(m.any() for m in masks.values())
    if name in TEXT_KEYS:
        start, end = TEXT_KEYS[name]
        text_tiles = slice(start // BLOCK, math.ceil(end / BLOCK))
        assert not any(m[..., text_tiles].any() for m in masks.values())


def test_the_8_bit_path_runs_in_every_patched_layer() -> None:
    """quant= reaches every layer's op: the output is close to the model's (8-bit error), differs
    from the 16-bit path's, and the layers still mark."""
    model, inputs = build("wan")
    unpatched = copy.deepcopy(model)
    calls = []

    def counting(run, layer, q, k, v, **kwargs):
        calls.append(layer)
        return run(layer, q, k, v, **kwargs)

    with apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK, quant="qk_int8_pv_fp8") as handle:
        with handle.intercept(counting):
            quantized = [forward(model, inputs, t) for t in TIMESTEPS]
        assert len(calls) == len(TIMESTEPS) * len(handle.layers)
        assert all(per_step[-1] > 0.0 for per_step in handle.stats()[0].values())
    with apply_lite_attention(model, float("-inf"), block_m=BLOCK, block_n=BLOCK, quant="qk_int8_pv_fp8"):
        dense_8_bit = forward(model, inputs, TIMESTEPS[0])
    with apply_lite_attention(model, float("-inf"), block_m=BLOCK, block_n=BLOCK):
        dense_16_bit = forward(model, inputs, TIMESTEPS[0])
    reference = forward(unpatched, inputs, TIMESTEPS[0])
    assert rel_err(dense_8_bit, reference) < 5e-2 and not torch.equal(dense_8_bit, dense_16_bit)
    assert torch.equal(quantized[0], dense_8_bit)  # step 0 marks but skips nothing
    with pytest.raises(ValueError, match="quant must be None or one of"):
        apply_lite_attention(model, quant="fp8")


def test_cfg_branches_keep_separate_masks() -> None:
    model, cond = build("wan")
    uncond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]))
    alone = copy.deepcopy(model)
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    reference = apply_lite_attention(alone, 0.0, block_m=BLOCK, block_n=BLOCK)
    for step, t in enumerate(TIMESTEPS):
        forward(model, cond, t)
        out = forward(model, uncond, t)  # second call at the same timestep: branch 1
        assert (handle.step, handle.branch) == (step, 1)
        # Branch 1 behaves exactly like a model that only ever saw the unconditional input.
        assert torch.equal(out, forward(alone, uncond, t))
    cond_masks, uncond_masks = handle.masks(0), handle.masks(1)
    assert all(torch.equal(uncond_masks[layer], reference.masks(0)[layer]) for layer in handle.layers)
    # Layer 0's self-attention sees no text yet; from layer 1 on, the branches' masks differ.
    assert not torch.equal(cond_masks[1], uncond_masks[1])
    assert set(handle.stats()) == {0, 1}


def test_a_new_generation_starts_from_an_empty_mask() -> None:
    model, inputs = build("ltx")
    fresh = copy.deepcopy(model)
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    first = [forward(model, inputs, t) for t in TIMESTEPS]
    assert any(m.any() for m in handle.masks().values())
    # The timestep goes back up: a new generation, identical to the first one.
    again = [forward(model, inputs, t) for t in TIMESTEPS]
    assert handle.step == len(TIMESTEPS) - 1
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(len(s) == len(TIMESTEPS) for s in handle.stats()[0].values())
    # An explicit reset does the same where the timestep alone cannot tell.
    forward(model, inputs, TIMESTEPS[-1])
    assert handle.branch == 1  # same timestep as the previous call: read as a second CFG branch
    handle.reset()
    out = forward(model, inputs, TIMESTEPS[-1])
    assert (handle.step, handle.branch) == (0, 0)
    assert handle.stats() == {0: {layer: [0.0] for layer in handle.layers}}
    apply_lite_attention(fresh, 0.0, block_m=BLOCK, block_n=BLOCK)
    assert torch.equal(out, forward(fresh, inputs, TIMESTEPS[-1]))


def test_disabled_runs_the_original_processors_and_leaves_state_alone() -> None:
    model, inputs = build("cogvideox")
    unpatched = copy.deepcopy(model)
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    forward(model, inputs, TIMESTEPS[0])
    forward(model, inputs, TIMESTEPS[1])
    masks = handle.masks()
    handle.disable()
    assert not handle.enabled
    assert torch.equal(forward(model, inputs, TIMESTEPS[2]), forward(unpatched, inputs, TIMESTEPS[2]))
    assert handle.step == 2
    assert all(torch.equal(masks[layer], mask) for layer, mask in handle.masks().items())
    assert all(math.isnan(s[2]) for s in handle.stats()[0].values())  # ran dense at step 2
    handle.enable()
    forward(model, inputs, TIMESTEPS[2] - 100)
    assert all(s[3] > 0 for s in handle.stats()[0].values())


def test_layer_selection_and_per_layer_thresholds() -> None:
    model, inputs = build("wan")
    with apply_lite_attention(model, layers=[1], block_m=BLOCK, block_n=BLOCK) as handle:
        assert handle.layers == (1,) and handle.layer_names == ("blocks.0.attn1", "blocks.1.attn1")
        assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    with apply_lite_attention(model, block_m=BLOCK, block_n=BLOCK, layers=lambda i: 0.0 if i == 0 else None) as handle:
        assert handle.layers == (0,)
    per_layer = {0: float("-inf"), 1: [float("-inf"), 0.0]}  # layer 1: a per-step schedule
    with apply_lite_attention(model, layers=per_layer, block_m=BLOCK, block_n=BLOCK) as handle:
        for t in TIMESTEPS:
            forward(model, inputs, t)
        sparsity = handle.stats()[0]
        assert sparsity[0] == [0.0] * len(TIMESTEPS) and sparsity[1][-1] > 0.0
    with pytest.raises(ValueError, match="layers"):
        apply_lite_attention(model, layers=[2])
    with pytest.raises(TypeError, match="layers"):
        apply_lite_attention(model, layers=["0"])
    with pytest.raises(TypeError, match="threshold"):
        apply_lite_attention(model, {0: -10.0})
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_unsupported_model_or_double_application_raises() -> None:
    with pytest.raises(TypeError, match=r"WanTransformer3DModel.*CogVideoXTransformer3DModel"):
        apply_lite_attention(torch.nn.Linear(2, 2))
    model, _ = build("wan")
    with apply_lite_attention(model), pytest.raises(ValueError, match="already applied"):
        apply_lite_attention(model)


def test_patched_global_passes_other_calls_through_and_is_restored_on_remove() -> None:
    model, inputs = build("wan")
    other, _ = build("wan", seed=1)
    module = sys.modules[type(model.blocks[0].attn1.processor).__call__.__module__]
    before = module.dispatch_attention_fn  # a trampoline already if other tests left handles applied

    def failing(step: int) -> float:
        raise RuntimeError("schedule failed")

    handle = apply_lite_attention(model, layers={0: -10.0, 1: failing}, block_m=BLOCK, block_n=BLOCK)
    second = apply_lite_attention(other, block_m=BLOCK, block_n=BLOCK)
    with pytest.raises(RuntimeError, match="schedule failed"):
        forward(model, inputs, TIMESTEPS[0])
    # While applied, the module's global is a trampoline that answers any call not made by a patched
    # processor exactly as the original does.
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    assert module.dispatch_attention_fn is not dispatch_attention_fn
    assert torch.equal(module.dispatch_attention_fn(q, k, v), dispatch_attention_fn(q, k, v))
    handle.remove()
    assert module.dispatch_attention_fn is not dispatch_attention_fn  # the other handle still needs it
    second.remove()
    assert module.dispatch_attention_fn is before
    if not _trampolines:  # no handle left anywhere: the original function itself
        assert module.dispatch_attention_fn is dispatch_attention_fn


def test_a_mask_that_is_not_a_shared_padding_tail_runs_dense_with_one_warning() -> None:
    model, inputs = build("hunyuan", batch=2)
    inputs["encoder_attention_mask"][1] = 1.0  # the two prompts have different lengths
    expected = forward(model, inputs, TIMESTEPS[0])
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = forward(model, inputs, TIMESTEPS[0])
    assert torch.equal(out, expected)
    assert [str(w.message) for w in caught if "dense" in str(w.message)] == [
        "LiteAttention runs the model's dense attention for calls with an attention mask other than a "
        "batch-uniform key-padding mask hiding a tail of keys (warned once)"
    ]
    assert handle.masks() == {}


@pytest.mark.parametrize(
    ("mask", "valid"),
    [
        (torch.tensor([[True] * 5 + [False] * 3]).expand(2, 8), 5),  # (B, Sk) bool
        (torch.tensor([0.0] * 6 + [-math.inf] * 2).view(1, 1, 1, 8), 6),  # additive, broadcast
        (torch.tensor([0.0] * 7 + [-1e4]).view(1, 1, 1, 8), 7),  # diffusers' legacy additive value
        (torch.ones(2, 1, 3, 8, dtype=torch.bool), 8),  # masks nothing
        (torch.tensor([True, False] * 4).view(1, 1, 1, 8), None),  # a hole, not a tail
        (torch.tensor([0.0] * 7 + [-1.0]).view(1, 1, 1, 8), None),  # a soft bias
        (torch.tensor([[True] * 8, [True] * 4 + [False] * 4]), None),  # differs across the batch
        (torch.tril(torch.ones(3, 8, dtype=torch.bool)), None),  # differs across queries
    ],
)
def test_key_padding_mask_analysis(mask: torch.Tensor, valid: int | None) -> None:
    assert _valid_key_prefix(mask, batch=2, heads=2, seq_q=3, seq_k=8) == valid


def test_intercept_wraps_every_patched_call_and_nests() -> None:
    model, inputs = build("wan")
    reference = forward(model, inputs, TIMESTEPS[0])
    seen: list[tuple[str, int]] = []

    def tag(name):
        def wrapper(run, layer, q, k, v, **kwargs):
            seen.append((name, layer))
            return run(layer, q, k, v, **kwargs)

        return wrapper

    with apply_lite_attention(model, float("-inf"), block_m=BLOCK, block_n=BLOCK) as handle:
        with handle.intercept(tag("outer")), handle.intercept(tag("inner")):
            torch.testing.assert_close(forward(model, inputs, TIMESTEPS[0]), reference)
        assert seen == [(name, layer) for layer in handle.layers for name in ("inner", "outer")]
        seen.clear()
        forward(model, inputs, TIMESTEPS[1])
        assert seen == [], "an interceptor outlived its with block"
