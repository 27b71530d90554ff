"""``liteattention bench --model``: the whole command on the tiny Wan, on the CPU; its option checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from liteattention.cli import main
from liteattention.commands.model_bench import (
    BASE_CONFIGS,
    REST,
    ModelBenchConfig,
    step_configs,
    tile_geometry,
    weight_sharing_copy,
)
from liteattention.integrations import apply_lite_attention
from liteattention.models.wan import build_wan, latent_size, video_tokens, wan_architecture, wan_inputs

TINY = ["--model", "tiny", "--resolution", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("model-bench")
    main(["bench", *TINY, "--sparsities", "0.25,0.5", "--patterns", "random,banded", "--rounds", "2", "--out", str(out)])
    return out, json.loads((out / "model_bench.json").read_text())


def test_every_configuration_is_timed_and_compared(report):
    out, data = report
    rows = {row["name"]: row for row in data["configurations"]}
    expected = [c.name for c in step_configs((0.25, 0.5), ("random", "banded"), ("lite", "lite-8bit"))]
    assert list(rows) == expected
    assert {"diffusers", "lite-dense", "lite-8bit-dense", "lite-8bit-random-0.5", "no-self-attention"} <= set(rows)
    for row in rows.values():
        assert len(row["step_s"]) == 2 and row["median_step_s"] > 0
        assert row["projected_generation_s"] == pytest.approx(100 * row["median_step_s"])
        assert row["speedup_vs_diffusers"] == pytest.approx(rows["diffusers"]["median_step_s"] / row["median_step_s"])
        assert (row["self_attention_share"] is None) == (row["name"] == REST.name)
    assert rows["diffusers"]["mask_sparsity"] is None and rows["lite-dense"]["skipped_sparsity"] == 0.0
    assert data["meta"]["video_tokens"] == 1024 and "injected" in data["meta"]["note"]
    table = (out / "model_bench.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "Random weights" in table
    assert (out / "model_bench.png").stat().st_size > 5_000


@pytest.mark.parametrize("mode", ["lite", "lite-8bit"])
@pytest.mark.parametrize("pattern", ["random", "banded"])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_injected_sparsity_is_close_to_the_target(report, mode, pattern, target):
    row = {row["name"]: row for row in report[1]["configurations"]}[f"{mode}-{pattern}-{target:g}"]
    assert abs(row["mask_sparsity"] - target) < 0.08  # 512 tiles in all
    # Each q-tile computes its first visited tile even if marked: at most one of its 16 k-tiles.
    assert row["mask_sparsity"] - 1 / 16 - 1e-9 <= row["skipped_sparsity"] <= row["mask_sparsity"] + 1e-9


def test_dense_mode_matches_sdpa_on_a_real_call(report):
    check = report[1]["equivalence"]
    assert check["layer"] == 0 and check["shape"] == [1, 1024, 2, 32]
    assert check["rel_l2"] < 1e-5 and check["cosine"] > 1 - 1e-6
    assert 0 <= check["max_abs_error"] < 1e-4 * max(1.0, check["reference_max_abs"])


def test_copies_share_weights_and_keep_their_own_masks(one_thread):
    architecture, size = wan_architecture("tiny"), latent_size("tiny")
    model = build_wan(architecture, "cpu", torch.float32)
    copies = [weight_sharing_copy(model) for _ in range(2)]
    for shared, copied in ((model.parameters(), copies[0].parameters()), (model.buffers(), copies[0].buffers())):
        assert all(a is b for a, b in zip(shared, copied, strict=True))
    assert copies[0].blocks[0].attn1 is not model.blocks[0].attn1
    handles = [apply_lite_attention(c, -math.inf) for c in copies]
    inputs = wan_inputs(architecture, size, "cpu", torch.float32)
    for transformer in copies:
        with torch.no_grad():
            transformer(**inputs, timestep=torch.tensor([999.0]), return_dict=False)
    geometry = tile_geometry(architecture, size, {})
    assert geometry.seq_q == video_tokens(architecture, size)
    mask = torch.rand(1, architecture.heads, geometry.q_tiles, geometry.k_tiles) < 0.5
    handles[0].set_masks({0: mask})
    assert torch.equal(handles[0].masks()[0], mask) and not handles[0].masks()[1].any()
    assert not handles[1].masks()[0].any()  # the other copy's masks are its own
    with pytest.raises(ValueError, match=r"masks\[0\]: layer 0 has bool \(1, 2, 8, 16\), got torch.bool \(1, 2, 8, 8\)"):
        handles[0].set_masks({0: mask[..., :8]})
    with pytest.raises(ValueError, match=r"masks\[0\]: layer 0 has bool \(1, 2, 8, 16\), got torch.float32"):
        handles[0].set_masks({0: mask.float()})


def test_configuration_table_takes_extra_lite_options():
    configs = step_configs((0.5,), ("random",))
    assert configs[: len(BASE_CONFIGS)] == list(BASE_CONFIGS) and configs[-1] == REST
    assert configs[len(BASE_CONFIGS)].lite == {} and configs[len(BASE_CONFIGS)].sparsity == 0.5
    assert "diffusers" in BASE_CONFIGS[0].description and BASE_CONFIGS[0].lite is None
    quantized = step_configs((0.5,), ("random",), ("lite", "lite-8bit"))
    assert [c.name for c in quantized] == [
        "diffusers", "lite-dense", "lite-8bit-dense", "lite-random-0.5", "lite-8bit-random-0.5", "no-self-attention",
    ]
    assert quantized[2].lite == {"quant": "qk_int8_pv_fp8"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "wan2.2-5b"], "model: expected one of wan2.1-1.3b, wan2.1-14b, tiny, got 'wan2.2-5b'"),
        ([*TINY, "--resolution", "1080p"], "resolution: expected one of 480p, 720p, tiny, got '1080p'"),
        ([*TINY, "--modes", "lite-8bit"], "modes: expected lite, then any of lite-8bit, got ['lite-8bit']"),
        ([*TINY, "--sparsities", "0.5,1"], "sparsities: each must be a fraction of tiles in [0, 1), got 1.0"),
        ([*TINY, "--sparsities", "-0.1"], "sparsities: each must be a fraction of tiles in [0, 1), got -0.1"),
        ([*TINY, "--sparsities", "0.5,0.5"], "sparsities: expected distinct values"),
        ([*TINY, "--patterns", "stripes"], "patterns: expected distinct names from random, banded"),
        ([*TINY, "--rounds", "0"], "rounds: expected an integer >= 1, got 0"),
        ([*TINY, "--warmup-steps", "0"], "warmup_steps: expected an integer >= 1, got 0"),
        (["--model", "wan2.1-14b", "--device", "cpu"], "device: wan2.1-14b is benchmarked on a CUDA GPU"),
        ([*TINY, "--shapes", "ltx"], "--shapes: an option of the kernel benchmark"),
        ([*TINY, "--no-flex"], "--no-flex: an option of the kernel benchmark"),
        (["--resolution", "720p"], "--resolution: an option of the model benchmark; add --model"),
    ],
)
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2  # argparse's usage error, before any work
    assert message in capsys.readouterr().err


def test_config_defaults_are_the_documented_ones():
    config = ModelBenchConfig(device="cpu", model="tiny")
    assert (config.resolution, config.sparsities, config.patterns) == ("480p", (0.42, 0.5, 0.75), ("random",))
    assert (config.warmup_steps, config.rounds) == (1, 3)
