"""`liteattention demo` end to end on a tiny random demo model (CPU, reference backend)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from demo_helpers import BLOCK, STEPS, sharp_tiny_model

from liteattention.cli import main as cli_main
from liteattention.demo import DemoConfig, format_report, run_demo, write_outputs
from liteattention.models import DemoVideoModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_model() -> DemoVideoModel:
    return sharp_tiny_model()


def _config(tmp_path, **overrides) -> DemoConfig:
    options = dict(
        steps=STEPS,
        warmup_steps=1,
        threshold=-4.0,
        block_m=BLOCK,
        block_n=BLOCK,
        device="cpu",
        out=tmp_path,
    )
    return DemoConfig(**{**options, **overrides})


def test_demo_writes_every_file_and_consistent_figures(tiny_model, tmp_path):
    result = run_demo(_config(tmp_path), model=tiny_model, progress=False)
    files = write_outputs(result, tmp_path)

    assert {path.name for path in files.values()} == {
        "comparison.gif",
        "masks.png",
        "sparsity.png",
        "summary.json",
    }
    assert all(path.is_file() and path.stat().st_size > 0 for path in files.values())
    assert len(result.mean_sparsity(0)) == STEPS and len(result.mean_sparsity(1)) == STEPS
    assert result.mean_sparsity(0)[:2] == [
        0.0,
        0.0,
    ]  # step 0 has no marks, step 1 the warm-up's (none)
    assert result.mean_sparsity(0)[2] > 0.0
    assert len(result.masks) == STEPS
    assert math.isfinite(result.psnr) and math.isfinite(result.ssim)
    # Every self-attention call of both runs was timed: 2 layers x 2 CFG branches per step.
    assert result.dense.attention_calls == result.lite.attention_calls == 2 * 2 * STEPS
    assert 0 < result.lite.attention_seconds < result.lite.total_seconds
    # 1 x 2 heads x 8 q-tiles, one int32 word per row of 8 k-tiles.
    assert result.state_bytes == {0: 64, 1: 64}

    summary = json.loads(files["summary"].read_text())
    assert summary["config"]["schedule"] == ["-inf", -4.0, -4.0]
    assert len(summary["sparsity_mean_per_step"]["cond"]) == STEPS
    assert summary["psnr_db"] == result.psnr
    report = format_report(result, files)
    assert f"PSNR {result.psnr:.2f} dB" in report and str(files["summary"]) in report


def test_threshold_minus_inf_reproduces_the_dense_video(tiny_model, tmp_path):
    result = run_demo(_config(tmp_path, threshold=-math.inf), model=tiny_model, progress=False)
    assert torch.equal(result.lite.frames, result.dense.frames)
    assert result.psnr == math.inf and result.ssim == pytest.approx(1.0)
    assert result.mean_sparsity(0) == [0.0] * STEPS


def test_quant_runs_the_lite_video_in_the_8_bit_path_against_a_16_bit_dense_one(tiny_model, tmp_path):
    """--quant: never marking, the videos differ by the 8-bit error alone; the dense run is the
    16-bit one of a run without --quant."""
    plain = run_demo(_config(tmp_path, threshold=-math.inf), model=tiny_model, progress=False)
    result = run_demo(_config(tmp_path, threshold=-math.inf, quant="qk_int8_pv_fp8"), model=tiny_model, progress=False)
    assert torch.equal(result.dense.frames, plain.dense.frames)
    assert not torch.equal(result.lite.frames, result.dense.frames)
    assert 25.0 < result.psnr < math.inf and result.ssim > 0.9
    assert "quant=qk_int8_pv_fp8" in format_report(result, {})


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"steps": 0}, r"steps: expected an integer >= 1"),
        ({"prompt": "a dog"}, r"prompt 'a dog': unknown words \['a', 'dog'\]"),
        ({"warmup_steps": 4}, r"warmup_steps: expected an integer >= 0 and <= 3"),
        ({"block_m": 48}, r"block_m must be one of"),
        ({"threshold": math.nan}, r"threshold must not be NaN"),
        ({"guidance_scale": 0.5}, r"guidance_scale: expected a float >= 1.0"),
        ({"dtype": "float8"}, r"dtype: expected 'auto' or one of float32, float16, bfloat16"),
        ({"device": "tpu"}, r"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"quant": "fp8"}, r"quant must be None or one of 'qk_int8_pv_fp8', got 'fp8'"),
    ],
)
def test_bad_options_raise_naming_the_option(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _config(tmp_path, **overrides)


def test_cli_reports_bad_options_as_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "steps: expected an integer >= 1" in capsys.readouterr().err


def test_timing_rounds_alternate_the_runs_and_flag_noise(tiny_model, tmp_path, monkeypatch):
    """Round 1 samples dense then LiteAttention, round 2 the other way round; times are means over
    the rounds, and runs of one configuration 25% apart make the report call its speed-ups noise."""
    import liteattention.demo as demo

    real_sample, order = demo._sample, []
    seconds = iter([1.0, 0.5, 0.6, 1.25])  # dense, lite | lite, dense

    def timed_sample(model, config, threshold, progress, **kwargs):
        run, stats, masks = real_sample(model, config, threshold, progress, **kwargs)
        order.append("dense" if threshold == [-math.inf] else "lite")
        return demo.RunResult(run.frames, 10.0, next(seconds), run.attention_calls), stats, masks

    monkeypatch.setattr(demo, "_sample", timed_sample)
    result = run_demo(_config(tmp_path, timing_rounds=2), model=tiny_model, progress=False)
    assert order == ["dense", "lite", "lite", "dense"]
    assert (result.dense.attention_seconds, result.lite.attention_seconds) == (1.125, 0.55)
    assert result.timing_spread == pytest.approx(0.25 / 1.125) and result.timing_is_noise
    assert "too noisy for these speed-ups to mean much" in format_report(result, {})


def test_noise_in_the_total_time_is_flagged_too(tiny_model, tmp_path, monkeypatch):
    """Steady attention times but total sampling times 40% apart: the total speed-up is noise."""
    import liteattention.demo as demo

    real_sample, totals = demo._sample, iter([10.0, 10.0, 10.0, 14.0])  # dense, lite | lite, dense

    def timed_sample(model, config, threshold, progress, **kwargs):
        run, stats, masks = real_sample(model, config, threshold, progress, **kwargs)
        return demo.RunResult(run.frames, next(totals), 1.0, run.attention_calls), stats, masks

    monkeypatch.setattr(demo, "_sample", timed_sample)
    result = run_demo(_config(tmp_path, timing_rounds=2), model=tiny_model, progress=False)
    assert result.timing_spread == pytest.approx(4.0 / 12.0) and result.timing_is_noise


def test_one_timing_round_says_its_noise_is_unmeasured(tiny_model, tmp_path):
    result = run_demo(_config(tmp_path, timing_rounds=1), model=tiny_model, progress=False)
    assert result.timing_spread is None and not result.timing_is_noise
    assert "one timing round" in format_report(result, {})
