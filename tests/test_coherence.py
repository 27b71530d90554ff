"""`liteattention coherence` on a tiny random demo model, cross-checked against the operator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from demo_helpers import BLOCK, STEPS, sharp_tiny_model

from liteattention.coherence import (
    CoherenceConfig,
    analyse,
    collect_negligible,
    format_table,
    persistence,
    persistence_to_end,
    write_outputs,
)
from liteattention.integrations import apply_lite_attention
from liteattention.models import generate_video

THRESHOLDS = (-4.0, 0.0)  # both mark some tiles of the sharpened tiny model, neither marks all

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **overrides) -> CoherenceConfig:
    options = dict(
        steps=STEPS, thresholds=THRESHOLDS, block_m=BLOCK, block_n=BLOCK, device="cpu", out=tmp_path
    )
    return CoherenceConfig(**{**options, **overrides})


def test_persistence_statistics_on_a_known_sequence():
    # 1 series of 4 tiles over 3 steps.
    negligible = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[1, 0, 0, 0]]], dtype=torch.bool)
    assert persistence(negligible, 0) == (1.0, pytest.approx((2 * 0.5 + 2 * 0.5 + 1 * 0.25) / 5))
    # Pairs (0, 1) keep 1 of 2 tiles, pairs (1, 2) keep 1 of 2; chance = the later fractions, weighted.
    assert persistence(negligible, 1) == (0.5, pytest.approx((2 * 0.5 + 2 * 0.25) / 4))
    assert persistence(negligible, 2) == (0.5, 0.25)
    assert persistence_to_end(negligible) == 0.5  # only tile 0 stays negligible from steps 0 and 1
    assert math.isnan(persistence(torch.zeros(3, 1, 4, dtype=torch.bool), 1)[0])
    with pytest.raises(ValueError, match=r"lag: expected an integer in \[0, 2\]"):
        persistence(negligible, 3)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("coherence"))
    negligible, series = collect_negligible(config, sharp_tiny_model(), progress=False)
    return config, negligible, series


def test_coherence_on_a_tiny_model_matches_the_operator(collected):
    config, negligible, series = collected
    assert negligible.shape == (len(THRESHOLDS), STEPS, 4, 1 * 2 * 8 * 8)  # 2 layers x 2 CFG branches
    assert series == [(0, 0), (0, 1), (1, 0), (1, 1)]

    result = analyse(negligible, series, config)
    for threshold in THRESHOLDS:
        values = result.persistence[threshold] + result.chance[threshold] + [result.to_end[threshold]]
        assert all(0.0 <= value <= 1.0 for value in values)
        assert result.persistence[threshold][0] == 1.0
        assert len(result.fraction[threshold]) == STEPS
    assert 0.0 < result.fraction[-4.0][0] < result.fraction[0.0][0] < 1.0

    # At step 0 the skip mask is empty, so what LiteAttention marks is the rule on every tile.
    for index, threshold in enumerate(THRESHOLDS):
        model = sharp_tiny_model()
        handle = apply_lite_attention(model.transformer, threshold, block_m=BLOCK, block_n=BLOCK)
        generate_video(model, config.prompt, num_steps=1, seed=config.seed, progress=False)
        for position, (branch, layer) in enumerate(series):
            assert torch.equal(handle.masks(branch)[layer].flatten(), negligible[index, 0, position])
        handle.remove()


def test_outputs_and_table(collected):
    config, negligible, series = collected
    result = analyse(negligible, series, config)
    files = write_outputs(result, config.out)
    assert all(path.is_file() and path.stat().st_size > 0 for path in files.values())
    data = json.loads(files["json"].read_text())
    assert data["persistence_by_lag"]["-4.0"][0] == 1.0
    assert len(data["negligible_fraction_by_series_and_step"]["0.0"]) == len(series)
    table = format_table(result)
    assert all(f"{threshold:>9g}" in table for threshold in THRESHOLDS)


@pytest.mark.parametrize(
    "thresholds,pattern",
    [
        ((), "thresholds: expected at least one"),
        ((-math.inf,), "thresholds: expected finite values"),
        ((-6.0, -6.0), "thresholds: expected distinct values"),
        ((math.nan,), "thresholds must not be NaN"),
    ],
)
def test_bad_thresholds_raise_naming_the_option(tmp_path, thresholds, pattern):
    with pytest.raises(ValueError, match=pattern):
        _config(tmp_path, thresholds=thresholds)
