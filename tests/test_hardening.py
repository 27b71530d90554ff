"""Issue 18: a failed call keeps the state, arguments are checked where they are given, statistics
stay bounded, and the commands check their output folder before any work."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiled_inputs

from liteattention import LiteAttention, SkipState, lite_attention
from liteattention.state import HISTORY_SIZE


def qkv(b=1, s=40, h=2, d=32, dtype=torch.float32):
    return tuple(torch.randn(b, s, h, d, dtype=dtype) for _ in range(3))


# --------------------------------------------------------------------------------------------------
# A failed call leaves the state alone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [dict(must_do=[(10, 5)]), dict(must_do=(0, 20), must_skip=(0, 16)), dict(scale=-1.0), dict(step=-1)]
)
def test_failed_call_with_new_shapes_keeps_the_old_state(bad):
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    attn(*qkv())
    state, mask = attn.state, attn.mask()
    assert mask.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rebuilding" warning for a call that does not happen
        with pytest.raises((ValueError, TypeError)):
            attn(*qkv(s=50), **bad)
    assert attn.state is state and attn.step == 1 and torch.equal(attn.mask(), mask)
    assert len(state.history) == 1
    # The same shapes as before still find their masks.
    attn(*qkv())
    assert attn.state is state and attn.last_sparsity > 0


def test_failed_call_with_the_same_shapes_records_nothing():
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    q, k, v = qkv()
    attn(q, k, v)
    mask = attn.mask()
    with pytest.raises(ValueError, match="must be disjoint"):
        attn(q, k, v, must_do=(0, 20), must_skip=(0, 16))
    assert attn.step == 1 and len(attn.state.history) == 1 and torch.equal(attn.mask(), mask)


def test_rebuild_still_warns_once_the_call_succeeds():
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    attn(*qkv())
    with pytest.warns(UserWarning, match=r"rebuilding the skip state, state was built for seq_q 40 \(inputs have 50\)"):
        attn(*qkv(s=50))
    assert attn.state.geometry.seq_q == 50 and attn.step == 1


# --------------------------------------------------------------------------------------------------
# Arguments checked where they are given, naming the argument
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(block_m=0), r"block_m must be one of \(16, 32, 64, 128\), got 0"),
        (dict(block_n=0), r"block_n must be one of \(16, 32, 64, 128\), got 0"),
        (dict(block_m=True), "block_m must be one of"),
        (dict(backend="bogus"), "backend must be 'auto', 'reference' or 'triton', got 'bogus'"),
    ],
)
def test_lite_attention_checks_its_options_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LiteAttention(**kwargs)


@pytest.mark.parametrize("step", ["abc", -3, 1.0, True])
def test_bad_step_is_rejected_not_recorded(step):
    q, k, v = qkv()
    state = SkipState.for_inputs(q, k)
    with pytest.raises(ValueError, match=r"step: expected an integer >= 0, got"):
        lite_attention(q, k, v, state, step=step)
    assert state.step == 0 and state.history == []
    with pytest.raises(ValueError, match="step: expected an integer >= 0"):
        LiteAttention()(q, k, v, step=step)


def test_numpy_integer_step_is_recorded_as_an_int():
    q, k, v = qkv()
    state = SkipState.for_inputs(q, k)
    lite_attention(q, k, v, state, step=np.int64(3))
    assert state.history[0].step == 3 and type(state.history[0].step) is int


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(dtype="float32"), TypeError, "dtype must be a floating-point torch.dtype .*, got 'float32'"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point torch.dtype"),
        (dict(device="gpu"), ValueError, "device must name a torch device .*, got 'gpu'"),
        (dict(device=0), TypeError, "device must be a torch.device or a string"),
        (dict(batch=0), ValueError, "batch: expected an integer >= 1, got 0"),
        (dict(history_size=0), ValueError, "history_size: expected an integer >= 1, got 0"),
    ],
)
def test_skip_state_checks_its_arguments(kwargs, exc, pattern):
    args = dict(batch=1, heads=2, seq_q=40, seq_k=40, head_dim=32, dtype=torch.float32, device="cpu")
    with pytest.raises(exc, match=pattern):
        SkipState(**{**args, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_state_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda' requested, but CUDA is not available"):
        SkipState(1, 2, 40, 40, 32, dtype=torch.float16, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_takes_the_index_of_the_current_device():
    q, k, v = qkv(dtype=torch.float16)
    q, k, v = (t.cuda() for t in (q, k, v))
    state = SkipState(1, 2, 40, 40, 32, dtype=torch.float16, device="cuda")
    assert state.device == q.device == torch.device("cuda", torch.cuda.current_device())
    lite_attention(q, k, v, state)  # the functional form accepts its own state
    assert state.step == 1


def test_a_bare_list_pair_is_one_range():
    q, k, v = qkv()
    attn = LiteAttention(threshold=1e4, block_m=16, block_n=16)
    attn(q, k, v, must_do=[0, 10])
    attn(q, k, v, must_do=[np.int64(0), np.int64(10)])
    assert not attn.mask()[..., 0].any(), "k-tile 0 is must-do"
    with pytest.raises(TypeError, match=r"must_do\[0\] must be a \(start, end\) pair of ints, got 0; write one range as"):
        attn(q, k, v, must_do=[0, 10, 20])


@pytest.mark.parametrize("value", [np.float32(-3.0), np.float64(-3.0), np.int32(-3)])
def test_numpy_scalars_are_real_numbers(value):
    q, k, v = qkv()
    state = SkipState.for_inputs(q, k)
    lite_attention(q, k, v, state, threshold=value, scale=abs(value) / 10)
    assert state.history[0].threshold == -3.0 and type(state.history[0].threshold) is float
    assert LiteAttention(threshold=value).schedule(0) == -3.0
    assert LiteAttention(threshold=[-math.inf, value]).schedule(1) == -3.0


# --------------------------------------------------------------------------------------------------
# Statistics stay bounded
# --------------------------------------------------------------------------------------------------


def test_head_dim_256_with_128_key_tiles_fits_in_shared_memory():
    """The portable kernel's untuned pipeline at head dim 256 and 128-key tiles: two stages of K and
    V tiles need 288 KiB of shared memory, more than any GPU has (Triton's OutOfResources on an
    H100); one stage fits. On the CPU this runs under the interpreter, on a GPU for real."""
    from conftest import DEVICE
    from liteattention.kernels.triton_forward import launch_config

    assert launch_config(64, 128, 256, True) == (8, 1) and launch_config(64, 64, 256, True) == (8, 2)
    q, k, v = (torch.randn(1, 130, 1, 256, dtype=torch.float16, device=DEVICE) for _ in range(3))
    out = LiteAttention(threshold=-4.0, block_n=128, backend="triton")(q, k, v)
    expected = torch.softmax((q.double()[0, :, 0] @ k.double()[0, :, 0].T) / 16, -1) @ v.double()[0, :, 0]
    assert (out[0, :, 0].double() - expected).abs().max().item() < 5e-3


def test_statistics_keep_the_last_history_size_calls():
    q, k, v = qkv()
    state = SkipState.for_inputs(q, k, block_m=16, block_n=16, history_size=3)
    for step in range(5):
        lite_attention(q, k, v, state, threshold=1e4, step=step)
        # Unread statistics (device tensors on the GPU) are bounded as well.
        assert len(state._pending) <= 3
    assert [call.step for call in state.history] == [2, 3, 4]
    assert state.last_stats.step == 4 and state.step == 5
    for step in range(5, 7):
        lite_attention(q, k, v, state, threshold=1e4, step=step)
        assert state.last_stats.step == step
    assert [call.step for call in state.history] == [4, 5, 6]
    state.reset()
    assert state.history == [] and state.last_stats is None


def test_operator_states_have_the_default_bound():
    attn = LiteAttention()
    attn(*qkv())
    assert attn.state.history_size == HISTORY_SIZE


# --------------------------------------------------------------------------------------------------
# diffusers integration
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def wan():
    pytest.importorskip("diffusers")
    from test_integration_diffusers import build

    return build("wan")


def test_stats_survive_new_shapes_mid_generation(wan):
    """Inputs that change mid-generation keep the stats of the earlier steps. A layer's mask follows its
    tile grid: a new dtype keeps it (marks go on accumulating); new lengths (a frame more) rebuild it,
    with a warning, and the rebuilt step starts from an empty mask."""
    from test_integration_diffusers import BLOCK, forward

    from liteattention.integrations import apply_lite_attention

    model, inputs = wan
    handle = apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    forward(model, inputs, 999.0)
    forward(model, inputs, 800.0)
    before = handle.stats()[0]
    assert before[0][1] > 0.0
    model.to(torch.float64)
    inputs = {key: val.double() for key, val in inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the masks still fit: nothing rebuilt
        forward(model, inputs, 600.0)
    after = handle.stats()[0]
    for layer, row in after.items():
        assert row[:2] == before[layer] and row[2] >= row[1]
    longer = {**inputs, "hidden_states": torch.randn(1, 4, 3, 16, 16, dtype=torch.float64)}  # 192 tokens
    with pytest.warns(UserWarning, match="rebuilding the skip state"):
        forward(model, longer, 400.0)
    final = handle.stats()[0]
    for layer, row in final.items():
        assert row[:3] == after[layer] and row[3] == 0.0
    assert all(mask.shape[-2:] == (12, 12) for mask in handle.masks().values())


@pytest.mark.parametrize("timestep", [None, "abc", torch.zeros(0)])
def test_bad_timestep_is_named(wan, timestep):
    from test_integration_diffusers import BLOCK

    from liteattention.integrations import apply_lite_attention

    model, inputs = wan
    apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    with pytest.raises(TypeError, match="timestep: expected a number or a tensor of numbers"):
        model(**inputs, timestep=timestep)


def test_missing_timestep_is_named(wan):
    from test_integration_diffusers import BLOCK

    from liteattention.integrations import apply_lite_attention

    model, inputs = wan
    apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    with pytest.raises(TypeError, match=r"timestep: expected a number or a tensor of numbers .*, got None"):
        model(**inputs)


def test_layer_stats_keep_the_last_history_size_steps(wan, monkeypatch):
    import liteattention.integrations.diffusers as integration
    from test_integration_diffusers import BLOCK, forward

    monkeypatch.setattr(integration, "HISTORY_SIZE", 3)
    model, inputs = wan
    handle = integration.apply_lite_attention(model, 0.0, block_m=BLOCK, block_n=BLOCK)
    for timestep in (999.0, 900.0, 800.0, 700.0):
        forward(model, inputs, timestep)
    handle.stats()  # files the live step's counts too
    forward(model, inputs, 600.0)
    rows = handle.stats()[0]
    assert all(len(steps) <= 3 for steps in handle._records.values())
    for row in rows.values():
        assert len(row) == 5 and all(math.isnan(x) for x in row[:2]) and not any(math.isnan(x) for x in row[2:])


# --------------------------------------------------------------------------------------------------
# Command line: options and the output folder, checked before any work
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def commands(monkeypatch):
    """The demo and coherence commands replaced by a recorder: what the CLI would run, with what."""
    import liteattention.coherence
    import liteattention.demo

    ran = []
    monkeypatch.setattr(liteattention.demo, "main", ran.append)
    monkeypatch.setattr(liteattention.coherence, "main", ran.append)
    return ran


def usage_error(capsys, argv) -> str:
    from liteattention.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "coherence"])
def test_out_folder_problems_are_usage_errors_before_any_work(command, commands, capsys, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    places = {file: "a file of that name exists", file / "sub": "Not a directory"}
    if Path("/proc/self").is_dir():  # /proc takes no new folders, even from root
        places[Path("/proc/liteattention-out")] = "No such file or directory"
    for out, reason in places.items():
        err = usage_error(capsys, [command, "--out", str(out)])
        assert f"--out: cannot write into the folder {str(out)!r} ({reason})" in err
    assert commands == []


def test_out_folder_is_created_before_the_run(commands, tmp_path):
    from liteattention.cli import main as cli_main

    out = tmp_path / "a" / "b"
    cli_main(["demo", "--out", str(out), "--device", "cpu"])
    assert out.is_dir() and commands[0].out == out


def test_short_demo_scales_its_default_warmup(commands, capsys, tmp_path):
    from liteattention.cli import main as cli_main
    from liteattention.experiment import DemoConfig

    cli_main(["demo", "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert commands[0].warmup_steps == 0 and commands[0].schedule() == [-6.0, -6.0]
    assert [DemoConfig(steps=steps, device="cpu").warmup_steps for steps in (1, 5, 10, 20, 50)] == [0, 1, 2, 4, 4]
    err = usage_error(capsys, ["demo", "--steps", "2", "--warmup-steps", "3", "--out", str(tmp_path)])
    assert "warmup_steps: expected an integer >= 0 and <= 2" in err


def test_bad_threshold_list_names_the_option(capsys):
    err = usage_error(capsys, ["coherence", "--thresholds=abc"])
    assert "argument --thresholds: expected comma-separated numbers, got 'abc'" in err
    assert "_floats" not in err


# --------------------------------------------------------------------------------------------------
# Inputs on a GPU that is not the current one
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_call_on_another_gpu_than_the_current_one_runs_on_its_own():
    """A model placed on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and give the
    reference's output and marks."""
    torch.cuda.set_device(0)
    negligible = torch.rand(2, 2, 5, generator=torch.Generator().manual_seed(0)) < 0.5  # (B, H, Kt)
    q, k, v = tiled_inputs(2, 300, 2, 64, 64, torch.bfloat16, "cuda:1", negligible)
    results = {}
    for backend in ("triton", "reference"):
        state = SkipState.for_inputs(q, k, block_m=128, block_n=64)
        outs = [lite_attention(q, k, v, state, threshold=-4.0, backend=backend) for _ in range(2)]
        results[backend] = outs, state.mask()
    assert torch.cuda.current_device() == 0
    (outs, mask), (ref_outs, ref_mask) = results["triton"], results["reference"]
    assert torch.equal(mask, ref_mask) and mask.any()
    for out, ref in zip(outs, ref_outs):
        assert out.device == torch.device("cuda:1")
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
