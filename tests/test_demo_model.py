"""CPU tests of the bundled demo model: data, tokenizer, model, save/load, sampling, training."""

from __future__ import annotations

import pytest
import torch

from liteattention.models import (
    DEMO_PROMPTS,
    DemoModelConfig,
    DemoVideoModel,
    build_demo_model,
    generate_video,
    load_demo_model,
    save_demo_model,
)
from liteattention.models.sampling import make_scheduler
from liteattention.models.train import flow_matching_loss, learning_rate
from liteattention.models.video_data import (
    MAX_PROMPT_TOKENS,
    PAD_ID,
    VideoBatch,
    detokenize,
    sample_video_batch,
    tokenize,
)

# One layer and a 2 x 8 x 8 video (32 tokens) keep every test well under a second.
TINY = DemoModelConfig(
    num_layers=1, num_heads=2, head_dim=32, ffn_dim=64, text_dim=32, num_frames=2, height=8, width=8
)


@pytest.fixture
def tiny_model() -> DemoVideoModel:
    torch.manual_seed(0)
    return build_demo_model(TINY).eval()


def _batch(seed: int, size: int = 3) -> VideoBatch:
    return sample_video_batch(size, generator=torch.Generator().manual_seed(seed))


def test_video_batch_is_deterministic_in_range_and_wan_shaped():
    first, again, other = _batch(0), _batch(0), _batch(1)
    assert first.videos.shape == (3, 3, 8, 32, 32)  # (B, C, F, H, W)
    assert first.videos.dtype == torch.float32
    assert first.videos.min() >= -1.0 and first.videos.max() <= 1.0
    assert torch.equal(first.videos, again.videos)
    assert torch.equal(first.token_ids, again.token_ids)
    assert not torch.equal(first.videos, other.videos)
    # Frames differ: every video moves.
    assert (first.videos[:, :, 0] - first.videos[:, :, -1]).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_video_batch_prompts_match_their_token_ids():
    batch = _batch(2, size=16)
    assert torch.equal(tokenize(batch.prompts), batch.token_ids)
    assert all(" over " in prompt for prompt in batch.prompts)


def test_tokenizer_round_trips_and_pads():
    ids = tokenize([*DEMO_PROMPTS, ""])
    assert ids.shape == (len(DEMO_PROMPTS) + 1, MAX_PROMPT_TOKENS)
    assert detokenize(ids) == [*DEMO_PROMPTS, ""]
    assert (ids[-1] == PAD_ID).all()  # the empty prompt is the unconditional one
    shouted = tokenize(["RED  Circle rotating over blue stripes"])
    assert torch.equal(shouted, tokenize(["red circle rotating over blue stripes"]))


def test_tokenizer_rejects_bad_prompts():
    with pytest.raises(ValueError, match=r"unknown words \['dog'\]"):
        tokenize(["red dog rotating over blue stripes"])
    with pytest.raises(ValueError, match="at most"):
        tokenize(["red " * (MAX_PROMPT_TOKENS + 1)])
    with pytest.raises(ValueError, match="sequence of strings"):
        tokenize("red circle")


def test_config_defaults_and_validation():
    assert DemoModelConfig().num_video_tokens == 2048
    with pytest.raises(ValueError, match="head_dim"):
        DemoModelConfig(head_dim=48)
    with pytest.raises(ValueError, match="height"):
        DemoModelConfig(height=31)


def test_training_step_gives_finite_loss_and_updates_weights(tiny_model):
    model = tiny_model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batch = sample_video_batch(4, generator=generator, num_frames=2, height=8, width=8)
    before = model.transformer.proj_out.weight.detach().clone()
    loss = flow_matching_loss(
        model, batch.videos, batch.token_ids, generator=generator, prompt_dropout=0.1
    )
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and 0.1 < loss.item() < 10.0
    assert not torch.equal(before, model.transformer.proj_out.weight)


def test_learning_rate_warms_up_then_decays_to_zero():
    assert learning_rate(0.0, 1e-3, 0.1) == 0.0
    assert learning_rate(0.1, 1e-3, 0.1) == pytest.approx(1e-3)
    assert learning_rate(0.55, 1e-3, 0.1) == pytest.approx(0.5e-3)
    assert learning_rate(1.0, 1e-3, 0.1) == pytest.approx(0.0)


def test_save_load_round_trips_bit_exactly(tiny_model, tmp_path):
    save_demo_model(tiny_model, tmp_path, {"steps": 3})
    loaded = load_demo_model(folder=tmp_path)
    assert loaded.config == TINY
    assert loaded.training_metadata == {"steps": 3}
    original = tiny_model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        # Stored as float16 and loaded back into float32: exactly the float16 values.
        assert torch.equal(restored[name], tensor.half().float()), name


def test_load_without_weights_names_the_path_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"liteattention\.models\.train") as error:
        load_demo_model(folder=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_place_keeps_wan_float32_modules(tiny_model):
    model = tiny_model.place(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.transformer.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.transformer.rope.freqs_cos.dtype == torch.float32
    video = generate_video(model, DEMO_PROMPTS[0], num_steps=1, progress=False)
    assert torch.isfinite(video.frames).all()


def test_generate_video_shape_and_seed_determinism(tiny_model):
    steps = []
    video = generate_video(
        tiny_model,
        DEMO_PROMPTS[0],
        num_steps=2,
        seed=3,
        progress=False,
        step_callback=lambda i, t, latents: steps.append(i),
    )
    again = generate_video(tiny_model, DEMO_PROMPTS[0], num_steps=2, seed=3, progress=False)
    other = generate_video(tiny_model, DEMO_PROMPTS[0], num_steps=2, seed=4, progress=False)
    assert video.frames.shape == (2, 8, 8, 3)  # (F, H, W, RGB)
    assert video.frames.min() >= 0.0 and video.frames.max() <= 1.0
    assert torch.equal(video.frames, again.frames)
    assert not torch.equal(video.frames, other.frames)
    assert steps == [0, 1] and len(video.step_seconds) == 2


def test_generate_video_calls_transformer_like_the_wan_pipeline(tiny_model):
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["timestep"].clone(), kwargs["encoder_hidden_states"].clone()))

    tiny_model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    generate_video(tiny_model, DEMO_PROMPTS[1], num_steps=3, progress=False)
    scheduler = make_scheduler(TINY.flow_shift)
    scheduler.set_timesteps(3)
    assert len(calls) == 6  # conditional then unconditional at every step
    for step, t in enumerate(scheduler.timesteps):
        (cond_t, cond_text), (uncond_t, uncond_text) = calls[2 * step : 2 * step + 2]
        assert torch.equal(cond_t, t.expand(1)) and torch.equal(uncond_t, t.expand(1))
        assert not torch.equal(cond_text, uncond_text)
    with pytest.raises(ValueError, match="num_steps"):
        generate_video(tiny_model, DEMO_PROMPTS[1], num_steps=0)
