"""torch.compile: the registered op, and a tiny Wan transformer with apply_lite_attention compiled whole
(fullgraph) and by regions (compile_repeated_blocks), on the CPU.

What is held: no graph breaks, a number of compiled graphs that does not grow with steps or layers
(one recompile after the first call, which allocates the masks), and the same outputs, masks and
stats as the eager model. The model tests use dynamo's "aot_eager" backend (same graphs and guards
as inductor, without its code generation, which costs tens of seconds per graph on a small CPU); the
op is also compiled with inductor.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from liteattention import SkipState, TileGeometry, lite_attention
from liteattention.integrations import apply_lite_attention
from liteattention.ops import COUNTS, counts_sparsity

from helpers import tiled_inputs
from test_integration_diffusers import BLOCK, build

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEPS = (999.0, 800.0, 600.0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_op_matches_lite_attention_and_marks_its_bits_argument(backend: str) -> None:
    negligible = torch.zeros(1, 2, 4, dtype=torch.bool)
    negligible[..., 2:] = True
    q, k, v = tiled_inputs(1, 64, 2, 32, 16, torch.float16, "cpu", negligible)
    state = SkipState.for_inputs(q, k, 16, 16)
    bits = torch.zeros_like(state.bits)
    counts = torch.zeros(COUNTS, dtype=torch.int64)
    for _ in range(2):
        out, lse = lite_attention(q, k, v, state, threshold=-8.0, return_lse=True, must_do=(0, 8), backend=backend)
        got, got_lse = torch.ops.liteattention.attention(
            q, k, v, bits, counts, torch.tensor(-8.0, dtype=torch.float64), [0, 8], [], None, 16, 16, backend
        )
        assert torch.equal(got, out) and torch.equal(got_lse, lse)
        assert torch.equal(bits, state.bits)
    history = state.history
    mask = state.mask()
    assert mask.any() and not (mask & ~negligible[:, :, None, :]).any()
    assert counts.tolist() == [
        sum(c.computed_tiles for c in history), 0 + history[0].marked_after,
        history[0].newly_marked, 2 * state.total_tiles,
    ]
    assert counts_sparsity(counts) == pytest.approx(sum(c.sparsity for c in history) / 2)
    dense, _ = torch.ops.liteattention.attention(q, k, v, None, None, torch.tensor(-8.0), [], [], None, 16, 16, backend)
    torch.testing.assert_close(dense, lite_attention(q, k, v, backend=backend))


@pytest.mark.parametrize("quant", [None, "qk_int8_pv_fp8"])
def test_opcheck(quant) -> None:
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    bits = torch.zeros(1, 2, 3, 1, dtype=torch.int32)
    counts = torch.zeros(COUNTS, dtype=torch.int64)
    args = (q, k, v, bits, counts, torch.tensor(0.0, dtype=torch.float64), [], [0, 4], 0.25, 16, 16, "reference", quant)
    torch.library.opcheck(torch.ops.liteattention.attention.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_host_deciding_ops_are_kept_out_of_cuda_graphs() -> None:
    """The attention op (threshold and work list decided on the host), the step clock and the state
    allocation carry the tag that makes inductor split a CUDA-graphed region around them
    (mode="reduce-overhead"), instead of replaying the recorded call's decisions or making the
    masks in a graph's memory pool. bench/compile_op.py checks the op on a GPU."""
    lite = torch.ops.liteattention
    for op in (lite.attention.default, lite.timestep_clock.default, lite.state_zeros.default):
        assert torch.Tag.cudagraph_unsafe in op.tags, op


def test_a_new_threshold_reuses_the_compiled_graph() -> None:
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    bits = torch.zeros(1, 2, 4, 1, dtype=torch.int32)
    counts = torch.zeros(COUNTS, dtype=torch.int64)

    def attend(q, k, v, bits, counts, threshold):
        out, _ = torch.ops.liteattention.attention(q, k, v, bits, counts, threshold, [], [], None, 16, 16, "auto")
        return out * 2

    compiled = torch.compile(attend, fullgraph=True)  # inductor
    state = SkipState.for_inputs(q, k, 16, 16)
    for threshold in (-math.inf, 0.0, -1.0, -2.0):
        got = compiled(q, k, v, bits, counts, torch.tensor(threshold, dtype=torch.float64))
        expected = lite_attention(q, k, v, state, threshold=threshold) * 2
        torch.testing.assert_close(got, expected)
        assert torch.equal(bits, state.bits)
    assert state.mask().any()
    assert _graphs() == 1 and not counters["graph_break"]


def _run(model, handle, inputs, uncond, *, context: bool):
    """Three denoising steps with CFG (cond, then uncond), as bare calls or as a pipeline makes them."""
    outs = []
    for step, t in enumerate(TIMESTEPS):
        for name, kwargs in (("cond", inputs), ("uncond", uncond)):
            timestep = torch.full((1,), t)
            with torch.no_grad():
                if context:
                    with handle_model(model).cache_context(name, step_index=step):
                        outs.append(model(**kwargs, timestep=timestep, return_dict=False)[0])
                else:
                    outs.append(model(**kwargs, timestep=timestep, return_dict=False)[0])
            assert (handle.step, handle.branch) == (step, name == "uncond")
        if step == 0:
            after_first_step = _graphs()
    return outs, after_first_step


def handle_model(model):
    return getattr(model, "_orig_mod", model)


@pytest.mark.parametrize(
    ("how", "context", "graphs"),
    [
        ("blocks", False, 2),  # one graph for every block: the first call, then with masks allocated
        ("blocks", True, 2),
        ("whole", False, 2),  # the timestep rule runs inside the graph, as an op
        ("whole", True, 2),
    ],
)
def test_compiled_transformer_has_no_breaks_and_no_recompiles_per_step_or_layer(how, context, graphs) -> None:
    model, inputs = build("wan")
    uncond = dict(inputs, encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"]))
    eager = copy.deepcopy(model)
    expected_handle = apply_lite_attention(eager, 0.0, block_m=BLOCK, block_n=BLOCK)
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    if how == "blocks":
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, after_first_step = _run(compiled, handle, inputs, uncond, context=context)
    expected, _ = _run(eager, expected_handle, inputs, uncond, context=context)

    assert not counters["graph_break"]
    assert _graphs() == after_first_step == graphs  # nothing recompiled from step 1 on, for any layer
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for branch in (0, 1):
        masks, reference = handle.masks(branch), expected_handle.masks(branch)
        assert set(masks) == set(handle.layers) and any(m.any() for m in masks.values())
        assert all(torch.equal(masks[layer], reference[layer]) for layer in handle.layers)
    assert handle.stats() == expected_handle.stats()


def test_state_made_while_compiled_comes_from_the_tagged_op() -> None:
    """The first compiled call makes every layer's mask and counters. Made by plain zeros inside
    the graph, they would be outputs of a CUDA-graphed region, overwritten by its next replay (as
    on an H100 under mode="reduce-overhead"); the tagged op runs outside the captured parts."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, inputs = build("wan")
    handle = apply_lite_attention(model, -5.0, block_m=BLOCK, block_n=BLOCK)
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=record)(**inputs, timestep=torch.full((1,), 900.0), return_dict=False)
    made = [node for gm in graphs for node in gm.graph.nodes if str(node.target).startswith("liteattention.state_zeros")]
    zeros = [node for gm in graphs for node in gm.graph.nodes if node.target in (torch.zeros, torch.ops.aten.zeros.default)]
    assert len(made) == 2 * len(handle.layers)  # a mask and the counters per layer
    assert not [node for node in zeros if node.kwargs.get("dtype") in (torch.int32, torch.int64)], zeros


def test_explain_finds_one_graph_and_no_breaks() -> None:
    model, inputs = build("wan")
    apply_lite_attention(model, -5.0, block_m=BLOCK, block_n=BLOCK)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs, timestep=torch.full((1,), 999.0), return_dict=False)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("how", ["blocks", "whole", "fullgraph"])
def test_bad_timestep_is_named_when_compiled(how) -> None:
    """The timestep is checked (type, emptiness) before the clock op, while tracing: a bad one is the
    eager TypeError under regional compilation and under torch.compile with graph breaks allowed. With
    fullgraph=True, dynamo turns any exception the traced code raises into its own error; that one
    still carries the TypeError's message."""
    model, inputs = build("wan")
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    if how == "blocks":
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=how == "fullgraph", backend="aot_eager")
    error = torch._dynamo.exc.Unsupported if how == "fullgraph" else TypeError
    for kwargs in ({"timestep": None}, {"timestep": "abc"}, {"timestep": torch.zeros(0)}, {}):
        with torch.no_grad(), pytest.raises(error, match="timestep: expected a number or a tensor of numbers"):
            compiled(**inputs, **kwargs, return_dict=False)
    # Nothing changed: a good call starts the generation at step 0.
    with torch.no_grad():
        compiled(**inputs, timestep=torch.full((1,), 999.0), return_dict=False)
    assert (handle.step, handle.branch) == (0, 0) and handle.stats()[0][0][0] == 0.0


def test_tile_geometry_takes_symbolic_sizes() -> None:
    """The integration sizes its masks with TileGeometry while dynamo traces: with dynamic shapes the
    sequence length is a SymInt, and the mask shape must follow it without a recompile (lengths with
    more than one mask word per row: torch specializes a dimension of size 1)."""

    def mask_for(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(TileGeometry(x.shape[0], x.shape[0], 128, 64).mask_shape(1, 2), dtype=torch.int32)

    compiled = torch.compile(mask_for, backend="aot_eager", dynamic=True, fullgraph=True)
    for seq in (4100, 70000, 5000):
        expected = (1, 2, math.ceil(seq / 128), math.ceil(seq / 64 / 32))
        assert compiled(torch.empty(seq)).shape == TileGeometry(seq, seq, 128, 64).mask_shape(1, 2) == expected
    assert _graphs() == 1


@pytest.mark.parametrize("how", ["blocks", "whole"])
@pytest.mark.parametrize("dynamic", [None, True])
def test_a_compiled_model_takes_a_new_frame_count(how, dynamic) -> None:
    """A second generation with more frames, compiled: the sequence length turns symbolic (dynamo
    marks it dynamic when it changes, or from the start with dynamic=True); each layer gets a
    fresh mask for the new length, and outputs, masks and stats stay the eager model's."""
    model, inputs = build("wan")
    eager = copy.deepcopy(model)
    expected_handle = apply_lite_attention(eager, 0.0, block_m=BLOCK, block_n=BLOCK)
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    if how == "blocks":
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager", dynamic=dynamic)
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    longer = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    for frames in (inputs["hidden_states"], longer):
        step_inputs = dict(inputs, hidden_states=frames)
        for t in TIMESTEPS[:2]:
            timestep = torch.full((1,), t)
            with torch.no_grad():
                got = compiled(**step_inputs, timestep=timestep, return_dict=False)[0]
                expected = eager(**step_inputs, timestep=timestep, return_dict=False)[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        masks, reference = handle.masks(0), expected_handle.masks(0)
        assert all(torch.equal(masks[layer], reference[layer]) for layer in handle.layers)
        assert any(m.any() for m in masks.values())
    assert handle.stats() == expected_handle.stats()
    assert not counters["graph_break"]


def _wan_profile(thresholds: tuple[float, ...]):
    """A one-branch profile for build("wan", layers=len(thresholds)): those per-layer thresholds at
    every step of TIMESTEPS."""
    from liteattention.calibration import Budget, Profile

    layers = len(thresholds)
    return Profile(
        thresholds=((thresholds,) * len(TIMESTEPS),), model="WanTransformer3DModel",
        layer_names=tuple(f"blocks.{i}.attn1" for i in range(layers)), shapes=((128, 128, 2, 32),) * layers,
        block_m=BLOCK, block_n=BLOCK, timesteps=TIMESTEPS, budget=Budget(max_error=0.05),
    )


def test_a_profile_under_regional_compilation_compiles_one_block_for_all_layers() -> None:
    """Per-layer thresholds from a profile, compile_repeated_blocks over 6 layers: two graphs, as
    with one threshold (the profile's shape check does not guard on the layer index), the eager
    model's outputs, and a call of another shape refused."""
    model, inputs = build("wan", layers=6)
    eager = copy.deepcopy(model)
    profile = _wan_profile(tuple(-0.5 * (layer % 3) for layer in range(6)))
    handle, expected_handle = apply_lite_attention(model, profile=profile), apply_lite_attention(eager, profile=profile)
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    for t in TIMESTEPS:
        with torch.no_grad():
            got = model(**inputs, timestep=torch.full((1,), t), return_dict=False)[0]
            expected = eager(**inputs, timestep=torch.full((1,), t), return_dict=False)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _graphs() == 2 and not counters["graph_break"]
    assert handle.stats() == expected_handle.stats() and any(m.any() for m in handle.masks(0).values())
    longer = dict(inputs, hidden_states=torch.randn(1, 4, 4, 16, 16))
    with torch.no_grad(), pytest.raises(Exception, match="no layer's of the profile"):
        model(**longer, timestep=torch.full((1,), TIMESTEPS[0]), return_dict=False)


@pytest.mark.parametrize("context", [False, True])
def test_a_profile_checks_the_timesteps_under_whole_model_compile(context) -> None:
    """The timestep's value is on the device while the compiled graph runs: the profile reads it in
    an op at run time, and refuses another scheduler's timesteps as the eager model does."""
    from liteattention.calibration import ProfileError

    model, inputs = build("wan")
    apply_lite_attention(model, profile=_wan_profile((0.0, 0.0)))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def step(index: int, t: float) -> None:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if context:
                stack.enter_context(model.cache_context("cond", step_index=index))
            compiled(**inputs, timestep=torch.full((1,), t), return_dict=False)

    for index, t in enumerate(TIMESTEPS):  # the profile's own timesteps: accepted, two graphs
        step(index, t)
    assert _graphs() == 2
    step(0, TIMESTEPS[0])  # a new generation with other timesteps
    with pytest.raises(ProfileError, match="this generation's step 1 has timestep 700"):
        step(1, 700.0)
