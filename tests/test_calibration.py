"""Calibration: tile arithmetic against the operator, the trajectory search, profile files."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from demo_helpers import BLOCK, STEPS, TINY, sharp_tiny_model

from liteattention import SkipState, lite_attention
from liteattention.calibration import Profile, ProfileError, calibrate, load_profile
from liteattention.calibration.tiles import evaluate_call
from liteattention.commands.calibrate import demo_generator, generate_videos
from liteattention.integrations import apply_lite_attention
from liteattention.models import generate_video
from liteattention.plan import anchor_tiles, build_plan, must_do_tiles, visit_order
from liteattention.reference import reference_forward
from liteattention.state import TileGeometry

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("red circle bouncing horizontally over blue stripes", "blue cross circling over red stripes")
GRID = (-12.0, -8.0, -6.0, -4.0, -2.0)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 100, 3, 16, generator=g) * 3
    k = torch.randn(2, 90, 3, 16, generator=g) * 3
    v = torch.randn(2, 90, 3, 16, generator=g)
    geometry = TileGeometry(100, 90, 16, 16)
    must_do = ((20, 30),)
    mask = torch.rand(2, 3, geometry.q_tiles, geometry.k_tiles, generator=g) < 0.2
    mask &= ~must_do_tiles(must_do, geometry, q.device)
    mask &= ~anchor_tiles(visit_order(geometry, q.device), torch.zeros(geometry.k_tiles, dtype=torch.bool))
    return q, k, v, geometry, must_do, mask


def test_scores_give_the_operators_marks_and_candidates_its_outputs():
    q, k, v, geometry, must_do, mask = _inputs()
    scale = 16**-0.5
    grid = torch.tensor([-10.0, -6.0, -3.0, -1.0], dtype=torch.float64)
    _, committer = evaluate_call(q, k, v, geometry, scale=scale, mask=mask, previous_scores=None, grid=grid,
                                 metric="rel_l2", must_do=must_do)
    out, same_mask, scores = committer.commit(0)
    assert torch.equal(same_mask, mask)
    plan = build_plan(geometry, 2, 3, q.device, mask, must_do, ())
    for threshold in grid.tolist():
        expected, _, marked = reference_forward(q, k, v, plan, scale=scale, threshold=threshold, mark=True)
        assert torch.equal(scores < threshold, marked)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # Candidate i adds the tiles with score < grid[i - 1]: its output is the operator's under that mask.
    errors, committer = evaluate_call(q, k, v, geometry, scale=scale, mask=mask, previous_scores=scores, grid=grid,
                                      metric="rel_l2", must_do=must_do)
    dense = lite_attention(q, k, v, threshold=-math.inf)
    for candidate in range(len(grid) + 1):
        out, new_mask, _ = committer.commit(candidate)
        limit = -math.inf if candidate == 0 else grid[candidate - 1].item()
        assert torch.equal(new_mask, mask | (scores < limit))
        state = SkipState.for_inputs(q, k, 16, 16)
        state.set_mask(new_mask)
        lite = lite_attention(q, k, v, state, threshold=-math.inf, must_do=must_do)
        torch.testing.assert_close(out, lite, atol=1e-5, rtol=1e-5)
        rel = (lite - dense).double().flatten(1).norm(dim=1) / dense.double().flatten(1).norm(dim=1)
        torch.testing.assert_close(errors[:, candidate], rel, atol=1e-5, rtol=1e-4)


def test_chunked_evaluation_matches(monkeypatch):
    import liteattention.calibration.tiles as tiles

    q, k, v, geometry, must_do, mask = _inputs(1)
    grid = torch.tensor([-8.0, -4.0], dtype=torch.float64)
    kwargs = dict(scale=0.25, mask=mask, grid=grid, metric="cosine", must_do=must_do)
    _, first = evaluate_call(q, k, v, geometry, previous_scores=None, **kwargs)
    scores = first.commit(0)[2]
    errors, whole = evaluate_call(q, k, v, geometry, previous_scores=scores, **kwargs)
    monkeypatch.setattr(tiles, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(tiles, "KEEP_ELEMENTS", 100)
    chunked_errors, chunked = tiles.evaluate_call(q, k, v, geometry, previous_scores=scores, **kwargs)
    torch.testing.assert_close(chunked_errors, errors)
    for a, b in zip(whole.commit(2), chunked.commit(2), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
    """One calibration of the tiny model (per-call bound and PSNR bound), shared by the tests."""
    model = sharp_tiny_model()
    generate = demo_generator(model, STEPS)
    profile = calibrate(prompts=PROMPTS, seeds=(0,), max_error=0.05, min_psnr=30.0, generate=generate,
                        transformer=model.transformer, grid=GRID, block_m=BLOCK, block_n=BLOCK, max_trials=3,
                        progress=False)
    return model, profile


def _errors_with_operator(model, profile, prompts, seeds):
    """Per-call rel-L2 errors of the real operator under ``profile`` against dense attention on
    the same inputs, and the videos."""
    handle = apply_lite_attention(model.transformer, profile=profile)
    errors = []

    def probe(run, layer, q, k, v, **kwargs):
        out = run(layer, q, k, v, **kwargs)
        dense = lite_attention(q, k, v, threshold=-math.inf, scale=kwargs.get("scale"))
        errors.append(float(((out - dense).norm() / dense.norm()).max()))
        return out

    try:
        with handle.intercept(probe):
            videos = generate_videos(model, prompts, seeds, num_steps=profile.steps)
    finally:
        handle.remove()
    return errors, videos


def test_budgets_hold_on_the_calibration_prompts(tiny_calibration):
    model, profile = tiny_calibration
    cal = profile.calibration
    assert cal["met"] == {"max_error": True, "min_psnr": True}
    assert cal["mean_sparsity"] > 0.0 and min(cal["psnr_db"]) >= 30.0
    assert cal["max_call_error"] <= 0.05
    # Applied with the operator itself, one video at a time: the same bounds.
    for prompt in PROMPTS:
        errors, videos = _errors_with_operator(model, profile, [prompt], [0])
        assert max(errors) <= 0.05 * 1.01
        dense = generate_video(model, prompt, num_steps=STEPS, progress=False).frames
        mse = float(((videos[0] - dense) ** 2).mean())
        assert 10 * math.log10(1 / mse) >= 30.0 - 0.5


def test_profile_shape_and_what_it_says(tiny_calibration):
    model, profile = tiny_calibration
    assert (profile.branches, profile.steps, profile.layers) == (2, STEPS, TINY.num_layers)
    assert profile.model == "WanTransformer3DModel" and (profile.block_m, profile.block_n) == (BLOCK, BLOCK)
    assert profile.shapes == ((128, 128, 2, 32),) * 2
    assert len(profile.timesteps) == STEPS
    assert all(t == -math.inf for branch in profile.thresholds for t in branch[-1])  # the last step marks for nobody
    assert all(t == -math.inf or t in GRID for branch in profile.thresholds for row in branch for t in row)


def test_deterministic_for_a_seed(tiny_calibration):
    model, profile = tiny_calibration
    again = calibrate(prompts=PROMPTS, seeds=(0,), max_error=profile.calibration["per_call_bound"],
                      generate=demo_generator(model, STEPS), transformer=model.transformer, grid=GRID,
                      block_m=BLOCK, block_n=BLOCK, progress=False)
    assert again.thresholds == profile.thresholds
    assert again.calibration["sparsity_per_step"] == profile.calibration["sparsity_per_step"]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_round_trip(tiny_calibration, tmp_path, suffix):
    _, profile = tiny_calibration
    path = profile.save(tmp_path / f"p{suffix}")
    loaded = load_profile(path)
    assert loaded == profile
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def _edit(profile: Profile, tmp_path, change) -> str:
    data = json.loads(profile.save(tmp_path / "p.json").read_text())
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError) as error:
        load_profile(tmp_path / "bad.json")
    return str(error.value)


def test_bad_files_are_refused_naming_the_fault(tiny_calibration, tmp_path):
    _, profile = tiny_calibration
    assert "not a LiteAttention profile" in _edit(profile, tmp_path, lambda d: d.update(format="x"))
    assert "format_version 9" in _edit(profile, tmp_path, lambda d: d.update(format_version=9))
    assert "missing tiles.block_n" in _edit(profile, tmp_path, lambda d: d["tiles"].pop("block_n"))
    assert "thresholds[1]: expected 3 steps" in _edit(
        profile, tmp_path, lambda d: d["schedule"]["thresholds"][1].pop())
    assert "must not be NaN" in _edit(profile, tmp_path, lambda d: d["schedule"]["thresholds"][0][0].__setitem__(0, "nan"))
    assert "block_m: expected one of" in _edit(profile, tmp_path, lambda d: d["tiles"].update(block_m=48))
    (tmp_path / "broken.toml").write_text("format = ")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(tmp_path / "broken.toml")
    with pytest.raises(ProfileError, match="expected a .json or .toml"):
        load_profile(tmp_path / "p.yaml")


def test_mismatched_runs_are_refused_saying_what_differs(tiny_calibration):
    model, profile = tiny_calibration
    with pytest.raises(ProfileError, match=r"3 steps \(this run: 5"):
        profile.check(steps=5)
    with pytest.raises(ProfileError, match=r"block_m 16 \(this run: 32\)"):
        apply_lite_attention(model.transformer, profile=profile, block_m=32)
    # Another step count shows up as other timesteps at step 1.
    handle = apply_lite_attention(model.transformer, profile=profile)
    try:
        with pytest.raises(ProfileError, match="made for 3 steps with timesteps"):
            generate_video(model, PROMPTS[0], num_steps=5, progress=False)
    finally:
        handle.remove()
    # Another model: a different layer count.
    from liteattention.models import DemoModelConfig, build_demo_model

    other = build_demo_model(DemoModelConfig(**{**TINY.__dict__, "num_layers": 3}))
    with pytest.raises(ProfileError, match=r"2 self-attention layers \(this run: 3\)"):
        apply_lite_attention(other.transformer, profile=profile)


def test_resample_keeps_the_shape_and_drops_the_timestep_check(tiny_calibration):
    _, profile = tiny_calibration
    longer = profile.resample(6)
    assert longer.steps == 6 and longer.timesteps is None and longer.calibration["resampled_from_steps"] == 3
    assert longer.thresholds[0][0] == profile.thresholds[0][0]
    assert all(t == -math.inf for t in longer.thresholds[0][-1])


def test_budget_needs_a_knob():
    with pytest.raises(ValueError, match="set max_error, min_psnr or target_sparsity"):
        calibrate(prompts=PROMPTS, generate=lambda p, s: None, transformer=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="metric: expected one of"):
        calibrate(prompts=PROMPTS, metric="l3", max_error=0.1, generate=lambda p, s: None,
                  transformer=torch.nn.Linear(1, 1))


def test_numpy_numbers_are_taken_and_saved_as_numbers(tiny_calibration, tmp_path):
    import numpy as np

    from liteattention.calibration import Budget

    _, profile = tiny_calibration
    budget = Budget(max_error=np.float32(0.05), min_psnr=np.float64(30.0), target_sparsity=np.float64(0.2))
    assert type(budget.max_error) is float and budget.max_error == pytest.approx(0.05)
    numpy_profile = replace(profile, budget=budget, calibration={**profile.calibration, "grid": list(np.array(GRID))})
    for suffix in (".json", ".toml"):
        assert load_profile(numpy_profile.save(tmp_path / f"p{suffix}")).budget == budget


@pytest.mark.parametrize("bad", [
    dict(max_error=True), dict(max_error=math.inf), dict(max_error=0.0), dict(min_psnr=math.nan),
    dict(target_sparsity=1.0), dict(target_sparsity="0.5"),
])
def test_bad_budgets_are_refused_naming_the_bound(bad):
    from liteattention.calibration import Budget

    with pytest.raises(ValueError, match=f"{next(iter(bad))}: expected"):
        Budget(**bad)


def test_calibrate_checks_its_arguments_before_generating():
    import numpy as np

    generated = []

    def generate(prompts, seeds):
        generated.append(seeds)
        raise AssertionError("generated before the arguments were checked")

    model = sharp_tiny_model()
    kwargs = dict(prompts=PROMPTS, max_error=0.05, generate=generate, transformer=model.transformer)
    for bad, match in [
        (dict(seeds=np.array([0, -1])), "seeds: expected a non-empty sequence of non-negative ints"),
        (dict(seeds=[]), "seeds: expected"),
        (dict(grid=torch.tensor([-8.0, math.inf])), "grid: expected a non-empty sequence of finite thresholds"),
        (dict(grid=-8.0), "grid: expected"),
        (dict(transformer=torch.nn.Linear(1, 1)), "transformer: expected one of WanTransformer3DModel"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            calibrate(**{**kwargs, **bad})
    assert not generated
    # numpy and torch numbers are taken: the run gets that far.
    with pytest.raises(AssertionError, match="generated before"):
        calibrate(**kwargs, seeds=np.array([0, 1]), grid=np.linspace(-12, -2, 6), progress=False)
    assert generated == [[0, 1, 0, 1]] and all(type(s) is int for s in generated[0])  # every (prompt, seed)


def test_top_level_names():
    import liteattention

    assert liteattention.calibrate is calibrate and liteattention.load_profile is load_profile


def test_cli_calibrate_then_demo_with_the_profile(tmp_path, capsys):
    from liteattention.cli import main as cli_main
    from liteattention.models import save_demo_model

    weights = save_demo_model(sharp_tiny_model(), tmp_path / "weights")
    common = ["--weights", str(weights), "--steps", str(STEPS), "--block-m", str(BLOCK), "--block-n", str(BLOCK),
              "--device", "cpu"]
    cli_main(["calibrate", *common, "--max-error", "0.05", "--format", "toml", "--out", str(tmp_path / "cal")])
    report = capsys.readouterr().out
    assert "Calibrated profile: WanTransformer3DModel, 2 layers, 3 steps" in report
    assert {p.name for p in (tmp_path / "cal").iterdir()} == {"profile.toml", "thresholds.png", "sparsity.png"}
    profile = tmp_path / "cal" / "profile.toml"
    cli_main(["demo", *common, "--warmup-steps", "0", "--profile", str(profile), "--out", str(tmp_path / "demo")])
    assert "profile " + str(profile) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["demo", *common[:2], "--steps", "4", "--block-m", "16", "--block-n", "16", "--warmup-steps", "0",
                  "--profile", str(profile)])
    assert "3 steps (this run: 4" in capsys.readouterr().err


def test_sparsity_target_takes_the_least_bound_that_reaches_it(tiny_calibration):
    model, _ = tiny_calibration
    profile = calibrate(prompts=PROMPTS[:1], target_sparsity=0.01, generate=demo_generator(model, STEPS),
                        transformer=model.transformer, grid=GRID, block_m=BLOCK, block_n=BLOCK, max_trials=2,
                        progress=False)
    cal = profile.calibration
    assert cal["met"] == {"target_sparsity": True} and cal["mean_sparsity"] >= 0.01
    reaching = [t for t in cal["trials"] if t["mean_sparsity"] >= 0.01]
    assert cal["per_call_bound"] == min(t["per_call_bound"] for t in reaching)
